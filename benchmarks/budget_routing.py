"""Budget-aware routing on the demo's domains: a ladder of nested tickets per domain vs single-sparsity RTL.

One search (per-domain IMP, weight granularity) records every domain's masks at several sparsities. The ladder
model holds all K x L tickets (``ladder_tickets``) and is retrained jointly; each single-sparsity RTL model holds
the K tickets of one sparsity, retrained the same number of epochs; single IMP is one ticket searched and
retrained on all domains' data at each sparsity. Costs are counted kept-weight MACs per input
(``ticket_costs``); quality per ticket is its accuracy on a validation split of its domain's training data. At
test time a centroid router predicts the domain and ``BudgetRouter`` picks the ticket under the budget:
``budget=`` caps every input, ``mean_budget=`` caps the test set's mean cost. The budget router's largest
per-input cost is checked against the budget.

    python benchmarks/budget_routing.py --out benchmarks/results/grow/budget_routing.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import rtl_plugin as rtl  # noqa: E402
from rtl_plugin.pruning.pruner import RTLPruner  # noqa: E402
from rtl_plugin.routing.budget import BudgetRouter, ladder_groups, ladder_tickets, ticket_costs  # noqa: E402
from rtl_plugin.routing.routers import create_router  # noqa: E402
from rtl_plugin.tasks.classification.data import load_domains  # noqa: E402
from rtl_plugin.tasks.classification.runner import make_model_factory  # noqa: E402
from rtl_plugin.training.retrain import joint_retrain  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grow_tickets import _commit, _machine  # noqa: E402


@torch.no_grad()
def predictions(routed, x, route) -> torch.Tensor:
    routed.eval()
    return torch.cat([routed(x[i:i + 256], route=route[i:i + 256]).argmax(1) for i in range(0, x.shape[0], 256)])


def loaders_of(x, y, dom, K, batch_size, seed):
    from torch.utils.data import DataLoader, TensorDataset
    out = {}
    for k in range(K):
        sel = dom == k
        g = torch.Generator().manual_seed(seed * 1000 + k)
        out[k] = DataLoader(TensorDataset(x[sel], y[sel]), batch_size=batch_size, shuffle=True, generator=g)
    return out


def retrained(make, args, ex, tickets, subsets):
    routed = rtl.wrap(make(args.seed), tickets.num_tickets, example_inputs=ex, granularity="weight")
    routed.set_tickets(tickets)  # the search's θ0 is make(seed)'s weights
    joint_retrain(routed, subsets, optimizer=torch.optim.Adam(routed.parameters(), lr=args.lr),
                  epochs=args.retrain_epochs, per_ticket_state=not args.shared_state, progress=False)
    return routed


def quality(routed, groups, xv, yv, dv) -> torch.Tensor:
    """Validation accuracy of every ticket on its group's validation data."""
    out = []
    for t, g in enumerate(groups.tolist()):
        sel = dv == g
        out.append(float((predictions(routed, xv[sel], torch.full((int(sel.sum()),), t)) == yv[sel]).float().mean()))
    return torch.tensor(out)


def point(routed, ids, costs, xt, yt) -> dict:
    acc = float((predictions(routed, xt, ids) == yt).float().mean())
    c = costs[ids].double()
    return {"accuracy": round(acc, 4), "mean_macs": round(float(c.mean())), "max_macs": int(c.max())}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="timm:test_resnet")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--max-per-domain", type=int, default=1200)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    p.add_argument("--prune-fraction", type=float, default=0.5)
    p.add_argument("--retrain-epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shared-state", action="store_true",
                   help="joint retraining with one optimizer state for all tickets (default: one per ticket)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/grow/budget_routing.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    t0 = time.perf_counter()
    record = {"benchmark": "budget-aware routing: ladder vs single-sparsity RTL", "command": "python " + " ".join(sys.argv),
              "commit": _commit(), "machine": _machine(),
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    train, test = load_domains(image_size=args.image_size, max_per_domain=args.max_per_domain, seed=args.seed)
    K, L = len(train.domain_names), len(args.sparsities)
    val = torch.arange(len(train)) % 5 == 0  # every 5th training sample: validation (ticket quality)
    xv, yv, dv = train.x[val], train.y[val], train.domain[val]
    xtr, ytr, dtr = train.x[~val], train.y[~val], train.domain[~val]
    subsets = loaders_of(xtr, ytr, dtr, K, args.batch_size, args.seed)
    make = make_model_factory(args.model, len(train.class_names), 3)
    ex = torch.randn(1, 3, args.image_size, args.image_size)

    torch.manual_seed(args.seed)
    searcher = rtl.wrap(make(args.seed), K, example_inputs=ex, granularity="weight")
    res = RTLPruner(searcher, sparsities=list(args.sparsities), prune_fraction=args.prune_fraction,
                    progress=False).find_tickets(subsets, optimizer=torch.optim.Adam(searcher.parameters(), lr=args.lr))
    router = create_router("centroid", num_tickets=K).fit(xtr, dtr)
    dom_pred = router(test.x)
    record["router_accuracy"] = round(float((dom_pred == test.domain).float().mean()), 4)

    ladder_model = retrained(make, args, ex, ladder_tickets(res.tickets_at), {t: subsets[t // L] for t in range(K * L)})
    groups = ladder_groups(K, L)
    costs = ticket_costs(ladder_model, test.x[:1])
    q = quality(ladder_model, groups, xv, yv, dv)
    budget_router = BudgetRouter(router, costs, groups, q)
    record["ladder"] = {"costs_macs": costs.tolist(), "val_quality": [round(v, 4) for v in q.tolist()]}

    single = {}
    for s in args.sparsities:
        model = retrained(make, args, ex, res.tickets_at[s], subsets)
        c = ticket_costs(model, test.x[:1])
        single[str(s)] = {**point(model, dom_pred, c, test.x, test.y), "costs_macs": c.tolist()}
    single_imp = {}  # one ticket searched and retrained on all domains' data (routing not needed)
    everything = loaders_of(xtr, ytr, torch.zeros_like(dtr), 1, args.batch_size, args.seed)
    imp_search = rtl.wrap(make(args.seed), 1, example_inputs=ex, granularity="weight")
    imp = RTLPruner(imp_search, sparsities=list(args.sparsities), prune_fraction=args.prune_fraction,
                    progress=False).find_tickets(everything, optimizer=torch.optim.Adam(imp_search.parameters(), lr=args.lr))
    for s in args.sparsities:
        model = retrained(make, args, ex, imp.tickets_at[s], everything)
        c = ticket_costs(model, test.x[:1])
        single_imp[str(s)] = point(model, torch.zeros_like(test.y), c, test.x, test.y)
    capped, mean = [], []
    for b in sorted({float(v) for v in costs.tolist()}):  # the quality-cost curve of the per-input cap
        ids = budget_router(test.x, budget=b)
        row = {"budget": b, **point(ladder_model, ids, costs, test.x, test.y)}
        row["within_budget"] = row["max_macs"] <= b
        capped.append(row)
    for s, r in single.items():  # equal average cost: the ladder spends single-sparsity RTL's mean cost
        ids = budget_router(test.x, mean_budget=r["mean_macs"])
        mean.append({"equal_to_single_sparsity": float(s), "mean_budget": r["mean_macs"],
                     **point(ladder_model, ids, costs, test.x, test.y), "single_accuracy": r["accuracy"]})
        ids = budget_router(test.x, budget=r["max_macs"])
        capped.append({"budget": r["max_macs"], "equal_to_single_sparsity": float(s),
                       **point(ladder_model, ids, costs, test.x, test.y), "single_accuracy": r["accuracy"]})
        capped[-1]["within_budget"] = capped[-1]["max_macs"] <= r["max_macs"]
    record.update(single_sparsity_rtl=single, single_imp=single_imp, budget_capped=capped, budget_mean=mean,
                  all_within_budget=all(r["within_budget"] for r in capped),
                  total_time_s=round(time.perf_counter() - t0, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(json.dumps({k: record[k] for k in ("router_accuracy", "single_sparsity_rtl", "single_imp", "budget_capped", "budget_mean",
                                             "all_within_budget", "total_time_s")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
