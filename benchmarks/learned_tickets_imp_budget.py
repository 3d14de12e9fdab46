"""Diagnostic for RESULTS §11b: is IMP-RTL's near-chance accuracy on the pretrained Lite0 suffix a bug or its
retraining budget? One seed, one sparsity: the benchmark's own data, suffix, linear probe and IMP search
(``learned_tickets.py``), then joint retraining continued past the benchmark's budget, printing each ticket's
accuracy on its own domain (oracle routing) after every ``retrain_epochs`` block, and each ticket's per-layer
kept fraction next to the one-shot global magnitude mask's.

    python benchmarks/learned_tickets_imp_budget.py --sparsity 0.9 --seed 0 --blocks 6 \
        --out benchmarks/results/learned_tickets/imp_rtl_budget_s90_seed0.json
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learned_tickets as L  # noqa: E402

import rtl_plugin as rtl  # noqa: E402
from rtl_plugin.persist.io import atomic_write_json  # noqa: E402
from rtl_plugin.training import joint_retrain  # noqa: E402


def oracle_accuracy(routed, data) -> list[float]:
    xt, yt, dt = data["test"]
    routed.eval()
    accs = []
    for k in range(L.K):
        sel = dt == k
        with torch.no_grad():
            out = routed(xt[sel], route=k)
        accs.append(round(float((out.argmax(1) == yt[sel]).float().mean()), 3))
    return accs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blocks", type=int, default=6, help="retraining blocks of the benchmark's budget each")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    a = L.parse(["--backbone", "lite0", "--epochs", "3", "--lr", "1e-3", "--pretrain-epochs", "20"])
    s, seed = args.sparsity, args.seed
    torch.manual_seed(seed)
    data = L.load_data(a, seed, 3)
    pre, data, _ = L.lite0_split(a, data, seed)
    L.probe_head(pre, data["train"], a.pretrain_epochs, a.lr, seed)
    pre.eval()
    x = data["train"][0]
    routed = L.wrap(pre, L.K, x)
    magnitude = L.magnitude_tickets(routed, s)
    subsets = L.domain_loaders(data, a, seed)
    pruner = rtl.RTLPruner(routed, sparsities=[s], prune_fraction=1.0 - (1.0 - s) ** (1.0 / L.IMP_ROUNDS),
                           progress=False)
    pruner.find_tickets(subsets, optimizer=torch.optim.Adam(routed.parameters(), lr=a.lr))
    density = {n: {"magnitude_ticket0": round(float(magnitude.masks[n][0].float().mean()), 4),
                   "imp_tickets": [round(float(m[k].float().mean()), 4) for k in range(L.K)]}
               for n, m in routed.tickets.masks.items()}
    m = max(len(v) for v in subsets.values())
    block = max(1, round(a.epochs * len(L.loader(x, batch_size=a.batch, seed=0)) / (m * L.K)))  # the benchmark's
    curve = [{"retrain_epochs": 0, "oracle_acc_per_domain": oracle_accuracy(routed, data)}]
    opt = torch.optim.Adam(routed.parameters(), lr=a.lr)
    for i in range(args.blocks):
        joint_retrain(routed, subsets, optimizer=opt, epochs=block, progress=False)
        curve.append({"retrain_epochs": (i + 1) * block, "oracle_acc_per_domain": oracle_accuracy(routed, data)})
        print(curve[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    atomic_write_json(Path(args.out), {
        "command": " ".join([Path(sys.executable).name] + sys.argv), "commit": commit,
        "machine": L.machine_info(1), "sparsity": s, "seed": seed, "benchmark_retrain_epochs": block,
        "batches_per_domain": {k: len(v) for k, v in subsets.items()}, "curve": curve, "per_layer_density": density,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


if __name__ == "__main__":
    main()
