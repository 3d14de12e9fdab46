"""A domain arrives later: add a ticket (grow_ticket) vs a ticket found jointly from the start vs fine-tuning.

The demo's domains with one label space for digits (``label_mode="shared"``: digits and MNIST both classes 0-9,
LFW 10-11). Phase 1 deploys K = 2 tickets (digits, LFW: per-ticket IMP + joint retraining); then MNIST arrives:

* ``grow``: ``grow_ticket`` adds ticket 2 and searches + retrains it on MNIST alone, the earlier tickets'
  weights read-only (their accuracy is measured before and after: it must not move);
* ``joint``: RTL with K = 3 from the start (all three domains searched and retrained together);
* ``finetune``: the phase-1 model's shared weights fine-tuned through the digits ticket on MNIST (every
  parameter trainable, same epochs as grow's retraining), then the old domains evaluated again (forgetting).

The centroid router is grown to K = 3 without the old data and its routing accuracy reported.

    python benchmarks/grow_tickets.py --out benchmarks/results/grow/grow_tickets.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import rtl_plugin as rtl  # noqa: E402
from rtl_plugin.pruning.grow import grow_ticket  # noqa: E402
from rtl_plugin.pruning.pruner import RTLPruner  # noqa: E402
from rtl_plugin.routing.grow import grow_router  # noqa: E402
from rtl_plugin.routing.routers import create_router  # noqa: E402
from rtl_plugin.tasks.classification.data import load_domains, make_loaders  # noqa: E402
from rtl_plugin.tasks.classification.runner import make_model_factory  # noqa: E402
from rtl_plugin.training.retrain import joint_retrain  # noqa: E402

DOMAINS = ("digits", "lfw", "mnist")  # mnist (ticket 2) arrives later


def _machine() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_num_threads": torch.get_num_threads(),
            "load_average_at_start": list(os.getloadavg())}


def _commit() -> str:
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    return head + ("+uncommitted-changes" if dirty else "")


@torch.no_grad()
def accuracy(routed, x, y, route) -> float:
    routed.eval()
    hits = 0
    for i in range(0, x.shape[0], 256):
        r = route if isinstance(route, int) else route[i:i + 256]
        hits += int((routed(x[i:i + 256], route=r).argmax(1) == y[i:i + 256]).sum())
    return hits / x.shape[0]


def per_domain(routed, test, tickets) -> dict:
    """Accuracy of domain d's test set through ticket tickets[d]."""
    out = {}
    for d, k in tickets.items():
        sel = test.domain == d
        out[DOMAINS[d]] = round(accuracy(routed, test.x[sel], test.y[sel], k), 4)
    return out


def rtl_pipeline(make, loaders, args, K, ex):
    routed = rtl.wrap(make(args.seed), K, example_inputs=ex, granularity=args.granularity)
    opt = torch.optim.Adam(routed.parameters(), lr=args.lr)
    pruner = RTLPruner(routed, sparsities=list(args.sparsities), prune_fraction=args.prune_fraction, progress=False)
    pruner.find_tickets({k: loaders[k] for k in range(K)}, optimizer=opt, epochs_per_round=args.epochs_per_round)
    joint_retrain(routed, {k: loaders[k] for k in range(K)}, optimizer=opt, epochs=args.retrain_epochs,
                  progress=False)
    return routed


def restore(make, args, ex, state, masks):
    """A fresh copy of the phase-1 model (K = 2)."""
    routed = rtl.wrap(make(args.seed), 2, example_inputs=ex, granularity=args.granularity)
    routed.load_state_dict(state)
    routed.set_tickets(masks.copy())
    return routed


def finetune(routed, loader, args, ticket: int) -> None:
    """Every parameter trainable, the newcomer's data through ``ticket``: what forgets."""
    opt = torch.optim.Adam(routed.parameters(), lr=args.lr)
    view = routed.ticket_module(ticket)
    routed.train()
    for _ in range(args.retrain_epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(view(x), y).backward()
            opt.step()


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="timm:test_resnet")
    p.add_argument("--granularity", default="weight", choices=["weight", "channel"])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--max-per-domain", type=int, default=1500)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75])
    p.add_argument("--prune-fraction", type=float, default=0.5)
    p.add_argument("--epochs-per-round", type=int, default=1)
    p.add_argument("--retrain-epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-reuse", type=lambda v: None if v == "none" else float(v), nargs="+", default=[None, 0.5],
                   help="grow variants: overlap budgets ('none' = no budget)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/grow/grow_tickets.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    t0 = time.perf_counter()
    record = {"benchmark": "grow a ticket for a later domain", "command": "python " + " ".join(sys.argv),
              "commit": _commit(), "machine": _machine(), "config": {k: (str(v) if isinstance(v, Path) else v)
                                                                      for k, v in vars(args).items()}}
    train, test = load_domains(image_size=args.image_size, domains=DOMAINS, max_per_domain=args.max_per_domain,
                               seed=args.seed, label_mode="shared")
    loaders = make_loaders(train, batch_size=args.batch_size, seed=args.seed)
    make = make_model_factory(args.model, len(train.class_names), 3)
    ex = torch.randn(1, 3, args.image_size, args.image_size)
    torch.manual_seed(args.seed)
    timings = {}

    t = time.perf_counter()
    routed = rtl_pipeline(make, loaders, args, 2, ex)
    timings["phase1_s"] = time.perf_counter() - t
    phase1 = {"old": per_domain(routed, test, {0: 0, 1: 1}),
              "new_domain_through_digits_ticket": per_domain(routed, test, {2: 0})}
    state = {k: v.clone() for k, v in routed.state_dict().items()}
    masks = routed.tickets.copy()

    router = create_router("centroid", num_tickets=2).fit(train.x[train.domain < 2], train.domain[train.domain < 2])
    router3 = grow_router(router, train.x[train.domain == 2])
    routing = {"grown_centroid_router_accuracy": round(router3.accuracy(test.x, test.domain), 4)}
    grow = {}
    for budget in args.max_reuse:
        t = time.perf_counter()
        model = restore(make, args, ex, state, masks)
        grown = grow_ticket(model, loaders[2], sparsities=list(args.sparsities), prune_fraction=args.prune_fraction,
                            optimizer=torch.optim.Adam(model.parameters(), lr=args.lr), max_reuse=budget,
                            epochs_per_round=args.epochs_per_round, retrain_epochs=args.retrain_epochs)
        row = {"old": per_domain(model, test, {0: 0, 1: 1}), "new": per_domain(model, test, {2: 2}),
               "report": grown.report.to_dict(), "union_weights": model.tickets.union_count(),
               "sparsity": [round(float(s), 4) for s in model.tickets.sparsity()],
               "accuracy_all_domains_routed_by_grown_router": round(accuracy(model, test.x, test.y,
                                                                             router3(test.x)), 4),
               "time_s": round(time.perf_counter() - t, 1)}
        row["old_unchanged"] = row["old"] == phase1["old"]
        grow[f"max_reuse={budget}"] = row

    t = time.perf_counter()
    fresh = restore(make, args, ex, state, masks)
    finetune(fresh, loaders[2], args, ticket=0)
    timings["finetune_s"] = time.perf_counter() - t
    ft = {"old": per_domain(fresh, test, {0: 0, 1: 1}), "new": per_domain(fresh, test, {2: 0})}
    ft["old_drop"] = {d: round(phase1["old"][d] - ft["old"][d], 4) for d in ft["old"]}

    t = time.perf_counter()
    joint = rtl_pipeline(make, loaders, args, 3, ex)
    timings["joint_s"] = time.perf_counter() - t
    js = {"all": per_domain(joint, test, {0: 0, 1: 1, 2: 2}), "union_weights": joint.tickets.union_count(),
          "sparsity": [round(float(s), 4) for s in joint.tickets.sparsity()]}

    record.update(phase1=phase1, grow=grow, routing=routing, finetune=ft, joint=js,
                  prunable_weights=routed.space.num_weights,
                  timings_s={k: round(v, 1) for k, v in timings.items()},
                  total_time_s=round(time.perf_counter() - t0, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(json.dumps({k: record[k] for k in ("phase1", "grow", "routing", "finetune", "joint", "timings_s")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
