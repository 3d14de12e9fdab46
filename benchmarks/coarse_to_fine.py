"""Coarse-to-fine routing on the demo's domains: domain tickets with nested sub-tickets vs flat routing.

Sub-groups: k-means clusters (``--clusters`` per domain) of each domain's pooled training images. Flat RTL: one
ticket per sub-group searched from the dense model, a flat centroid router over all sub-groups. Coarse-to-fine:
one ticket per domain searched to the first sparsity, then each sub-group's ticket searched from its domain's
masks to the last sparsity (``search_sub_tickets``: sub mask ⊆ parent mask), a two-level router (domain
centroid router, then a centroid router within the domain). Both routes run a ticket at the last sparsity, so the
per-input model cost is equal (reported); both models are retrained jointly for the same epochs.

    python benchmarks/coarse_to_fine.py --out benchmarks/results/grow/coarse_to_fine.json
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
from rtl_plugin.pruning.hierarchy import check_nested, search_sub_tickets  # noqa: E402
from rtl_plugin.pruning.pruner import RTLPruner  # noqa: E402
from rtl_plugin.routing.budget import ticket_costs  # noqa: E402
from rtl_plugin.routing.hierarchy import TwoLevelRouter  # noqa: E402
from rtl_plugin.routing.partition import by_kmeans  # noqa: E402
from rtl_plugin.routing.routers import create_router, pooled_features  # noqa: E402
from rtl_plugin.tasks.classification.data import load_domains  # noqa: E402
from rtl_plugin.tasks.classification.runner import make_model_factory  # noqa: E402
from rtl_plugin.training.retrain import joint_retrain  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budget_routing import loaders_of, predictions  # noqa: E402
from grow_tickets import _commit, _machine  # noqa: E402


def sub_groups(x, dom, K, clusters, seed):
    """Global sub-group id per sample (domain-major: domain d's clusters are d * clusters + c)."""
    out = torch.empty_like(dom)
    for d in range(K):
        sel = (dom == d).nonzero().flatten()
        part = by_kmeans(pooled_features(x[sel]), clusters, seed=seed)
        out[sel] = d * clusters + part.assignment
    return out


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="timm:test_resnet")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--max-per-domain", type=int, default=1200)
    p.add_argument("--clusters", type=int, default=3)
    p.add_argument("--sparsities", type=float, nargs=2, default=[0.5, 0.75], help="parent, sub-ticket sparsity")
    p.add_argument("--prune-fraction", type=float, default=0.5)
    p.add_argument("--retrain-epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/grow/coarse_to_fine.json"))
    return p.parse_args(argv)


def retrain(routed, subsets, args):
    joint_retrain(routed, subsets, optimizer=torch.optim.Adam(routed.parameters(), lr=args.lr),
                  epochs=args.retrain_epochs, progress=False)


def evaluate(routed, ids, xt, yt, ex) -> dict:
    costs = ticket_costs(routed, ex)
    return {"accuracy": round(float((predictions(routed, xt, ids) == yt).float().mean()), 4),
            "mean_macs": round(float(costs[ids].double().mean())), "union_weights": routed.tickets.union_count()}


def main(argv=None) -> int:
    args = parse(argv)
    t0 = time.perf_counter()
    record = {"benchmark": "coarse-to-fine vs flat routing", "command": "python " + " ".join(sys.argv),
              "commit": _commit(), "machine": _machine(),
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    train, test = load_domains(image_size=args.image_size, max_per_domain=args.max_per_domain, seed=args.seed)
    K, C = len(train.domain_names), args.clusters
    S = K * C
    sub = sub_groups(train.x, train.domain, K, C, args.seed)
    make = make_model_factory(args.model, len(train.class_names), 3)
    ex = torch.randn(1, 3, args.image_size, args.image_size)
    sub_loaders = loaders_of(train.x, train.y, sub, S, args.batch_size, args.seed)
    dom_loaders = loaders_of(train.x, train.y, train.domain, K, args.batch_size, args.seed)
    p_sp, s_sp = args.sparsities

    torch.manual_seed(args.seed)  # flat: S tickets from the dense model, flat router over S sub-groups
    flat = rtl.wrap(make(args.seed), S, example_inputs=ex, granularity="weight")
    RTLPruner(flat, sparsities=[p_sp, s_sp], prune_fraction=args.prune_fraction, progress=False).find_tickets(
        sub_loaders, optimizer=torch.optim.Adam(flat.parameters(), lr=args.lr))
    retrain(flat, sub_loaders, args)
    flat_router = create_router("centroid", num_tickets=S).fit(train.x, sub)
    t_flat = time.perf_counter() - t0

    t = time.perf_counter()  # coarse-to-fine: K parents (tickets 0..K-1), then S sub-tickets K..K+S-1
    torch.manual_seed(args.seed)
    tree = rtl.wrap(make(args.seed), K + S, example_inputs=ex, granularity="weight")
    RTLPruner(tree, sparsities=[p_sp], prune_fraction=args.prune_fraction, progress=False).find_tickets(
        dom_loaders, tickets=list(range(K)), optimizer=torch.optim.Adam(tree.parameters(), lr=args.lr))
    parents = {K + s: s // C for s in range(S)}
    search_sub_tickets(RTLPruner(tree, sparsities=[s_sp], prune_fraction=args.prune_fraction, progress=False),
                       parents, {K + s: sub_loaders[s] for s in range(S)},
                       optimizer=torch.optim.Adam(tree.parameters(), lr=args.lr))
    check_nested(tree.tickets, parents)
    retrain(tree, {**dom_loaders, **{K + s: sub_loaders[s] for s in range(S)}}, args)
    top = create_router("centroid", num_tickets=K).fit(train.x, train.domain)
    subs = [create_router("centroid", num_tickets=C).fit(train.x[train.domain == d], sub[train.domain == d] - d * C)
            for d in range(K)]
    two_level = TwoLevelRouter(top, subs, [[K + d * C + c for c in range(C)] for d in range(K)])
    t_tree = time.perf_counter() - t

    shape = tuple(test.x.shape[1:])
    record["flat"] = {**evaluate(flat, flat_router(test.x), test.x, test.y, ex),
                      "router_flops": flat_router.flops_per_sample(shape), "time_s": round(t_flat, 1)}
    record["coarse_to_fine"] = {**evaluate(tree, two_level(test.x), test.x, test.y, ex),
                                "router_flops": two_level.flops_per_sample(shape), "time_s": round(t_tree, 1),
                                "nested": True}
    record["coarse_to_fine_tickets_flat_router"] = evaluate(tree, flat_router(test.x) + K, test.x, test.y, ex)
    record["domain_parents_only"] = evaluate(tree, top(test.x), test.x, test.y, ex)
    record["total_time_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k not in ("machine", "config")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
