"""The RTL-vs-baselines comparison: dense, single-mask IMP variants and multi-model IMP at equal budgets, one
protocol (``compare(task, config, out_dir)``) that every task runner and benchmark uses."""
from rtl_plugin.comparison.protocol import (METHODS, ComparisonConfig, ComparisonTask, Evaluation, SingleImpSetup,
                                            compare)

__all__ = ["METHODS", "ComparisonConfig", "ComparisonTask", "Evaluation", "SingleImpSetup", "compare"]
