"""The RTL-vs-baselines comparison: dense, single-mask IMP variants and multi-model IMP at equal budgets."""
