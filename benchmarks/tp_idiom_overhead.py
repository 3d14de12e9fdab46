"""What RTLPruner's torch-pruning idiom costs next to a stock torch-pruning pruner (CPU, one run).

    python benchmarks/tp_idiom_overhead.py [--out benchmarks/results/tp_idiom_overhead.json]

For each model: a stock ``tp.pruner.BasePruner`` (construction + ``iterative_steps`` steps, physically pruning)
vs ``rtl.RTLPruner`` with K tickets (construction, then ``begin(0)`` + the same steps, soft masks), both with
GroupMagnitudeImportance(p=2), pruning_ratio 0.5, round_to 8; then whether ``export_ticket`` of ticket 0 equals
the stock pruned model (parameter count and the max output difference). Times are wall seconds on this
machine; quote the ratios, measured in the same run.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import timm
import torch
import torch_pruning as tp
import torchvision

import rtl_plugin as rtl

MODELS = {"torchvision resnet18": lambda: torchvision.models.resnet18(num_classes=10),
          "timm mobilenetv2_050": lambda: timm.create_model("mobilenetv2_050", num_classes=10),
          "timm convnext_atto": lambda: timm.create_model("convnext_atto", num_classes=10)}


def _classifier(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 10]


def one(name: str, make, *, size: int, steps: int, num_tickets: int) -> dict:
    torch.manual_seed(0)
    stock_model = make().eval()
    model = copy.deepcopy(stock_model)
    ex = torch.randn(1, 3, size, size)
    opts = dict(importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5, round_to=8,
                iterative_steps=steps)
    t0 = time.perf_counter()
    stock = tp.pruner.BasePruner(stock_model, ex, ignored_layers=_classifier(stock_model), **opts)
    for _ in range(steps):
        stock.step()
    t_stock = time.perf_counter() - t0
    t0 = time.perf_counter()
    pruner = rtl.RTLPruner(model, ex, num_tickets=num_tickets, ignored_layers=_classifier(model), progress=False, **opts)
    t_construct = time.perf_counter() - t0
    pruner.begin(0)
    for _ in range(steps):
        pruner.step()
    t_rtl = time.perf_counter() - t0
    slim = rtl.export_ticket(pruner.routed, 0).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        diff = float((slim(x) - stock_model(x)).abs().max())
    return {"model": name, "stock_s": round(t_stock, 3), "rtl_construct_s": round(t_construct, 3),
            "rtl_total_s": round(t_rtl, 3), "ratio_rtl_to_stock": round(t_rtl / t_stock, 2),
            "params_stock": sum(p.numel() for p in stock_model.parameters()),
            "params_ticket0": sum(p.numel() for p in slim.parameters()), "max_abs_output_diff": diff,
            "ticket0_weight_sparsity": round(pruner.ticket_sparsity(0), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/tp_idiom_overhead.json")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--num-tickets", type=int, default=3)
    a = ap.parse_args()
    rows = [one(n, mk, size=a.size, steps=a.steps, num_tickets=a.num_tickets) for n, mk in MODELS.items()]
    for r in rows:
        print(r)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"command": f"python benchmarks/tp_idiom_overhead.py --size {a.size} --steps {a.steps} "
                      f"--num-tickets {a.num_tickets}", "commit": commit,
           "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                       "torch_pruning": tp.__version__, "load_average_at_start": list(os.getloadavg())},
           "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
