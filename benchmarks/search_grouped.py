"""Ticket search time: sequential vs grouped (vectorised) vs one single-mask IMP, in ONE run (issue 19, part 3).

    python benchmarks/search_grouped.py [--device cpu|cuda] [--threads 1] [--out FILE.json]

Three searches with the same schedule (``--sparsities``, ``--prune-fraction``, rewind to θ0, one epoch per round),
the same batch size and optimizer (Adam, lr 1e-3, fresh per round): ``RTLPruner.find_tickets`` over K subsets of
``--batches`` batches each, once with ``search_execution="sequential"`` and once with ``"grouped"``, and a
single-mask IMP (K = 1) over all K x ``--batches`` batches (the same samples). Every search runs ``--reps`` times
after one warm-up search each (interleaved; the minimum is kept). Times: process CPU seconds on the CPU (one
intra-op thread), wall seconds with CUDA synchronised on a GPU; the train / prune split is timed on the public
steps (``train_ticket`` / ``train_round_grouped`` and ``prune_round``).

It also counts how many mask entries the grouped search sets differently from the sequential one in the run's
dtype (float32 by default: summation order inside the batched kernels, see rtl_plugin/pruning/grouped_search.py),
and the largest relative difference of ticket 0's trained weights between the two.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import rtl_plugin as rtl
from rtl_plugin.pruning import grouped_search
from rtl_plugin.pruning.pruner import RTLPruner


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Clock:
    def __init__(self, dev):
        self.dev = dev

    def __enter__(self):
        sync(self.dev)
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.dev)
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c
        self.primary = self.cpu if self.dev.type == "cpu" else self.wall
        return False


def subset_loaders(a, dtype) -> dict:
    """K subsets of synthetic (x, y) data (subset k shifted by 0.1 k), shuffled by a per-loader generator."""
    out = {}
    for k in range(a.tickets):
        g = torch.Generator().manual_seed(100 + k)
        n = a.batches * a.batch
        x = (torch.randn(n, 3, a.image, a.image, generator=g) + 0.1 * k).to(dtype)
        y = torch.randint(0, a.classes, (n,), generator=g)
        out[k] = DataLoader(TensorDataset(x, y), batch_size=a.batch, shuffle=True,
                            generator=torch.Generator().manual_seed(k))
    return out


def all_data_loader(loaders: dict, batch: int) -> DataLoader:
    xs = torch.cat([dl.dataset.tensors[0] for dl in loaders.values()])
    ys = torch.cat([dl.dataset.tensors[1] for dl in loaders.values()])
    return DataLoader(TensorDataset(xs, ys), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))


def timed(obj, name: str, acc: dict, key: str, dev) -> None:
    """Wrap ``obj.name`` so that its time adds to ``acc[key]`` (an instance / module attribute; changes nothing)."""
    orig = getattr(obj, name)

    def wrapped(*args, **kw):
        with Clock(dev) as c:
            res = orig(*args, **kw)
        acc[key] += c.primary
        return res
    setattr(obj, name, wrapped)
    return orig


class TrainedWeights:
    """Round-end callback keeping ticket 0's trained prunable weights of its first round (when ``enabled``)."""

    def __init__(self, enabled: bool):
        self.enabled, self.seen = enabled, {}

    def on_trained(self, event) -> None:
        if self.enabled and event["ticket"] == 0 and event["round"] == 1:
            self.seen = {n: w.detach().clone() for n, w in event["model"].prunable_weights().items()}


def one_search(a, dev, dtype, kind: str, record_weights: bool = False) -> dict:
    """One search of ``kind`` ("single", "sequential", "grouped"): time, split, masks."""
    import timm
    torch.manual_seed(0)
    K = 1 if kind == "single" else a.tickets
    model = timm.create_model(a.model, num_classes=a.classes).to(dtype)
    r = rtl.wrap(model, K, example_inputs=torch.randn(1, 3, a.image, a.image, dtype=dtype),
                 granularity="weight").to(dev)
    cb = TrainedWeights(record_weights)
    p = RTLPruner(r, sparsities=a.sparsities, prune_fraction=a.prune_fraction, progress=False,
                  search_execution="grouped" if kind == "grouped" else "sequential", callbacks=[cb])
    acc = {"train": 0.0, "prune": 0.0}
    timed(p, "prune_round", acc, "prune", dev)
    restore = None
    if kind == "grouped":
        restore = timed(grouped_search, "train_round_grouped", acc, "train", dev)
    else:
        timed(p, "train_ticket", acc, "train", dev)
    loaders = subset_loaders(a, dtype)
    data = {0: all_data_loader(loaders, a.batch)} if kind == "single" else loaders
    try:
        with Clock(dev) as c:
            res = p.find_tickets(data, optimizer=torch.optim.Adam(r.parameters(), lr=1e-3), device=dev)
    finally:
        if restore is not None:
            grouped_search.train_round_grouped = restore
    return {"time": c.primary, "wall": c.wall, "cpu": c.cpu, "train": acc["train"], "prune": acc["prune"],
            "rounds": len(res.history), "masks": {s: {n: m.cpu() for n, m in ts.masks.items()}
                                                 for s, ts in res.tickets_at.items()}, "weights0": cb.seen}


def mask_difference(seq: dict, grp: dict) -> dict:
    out = {}
    for s in seq:
        diff = sum(int((seq[s][n] != grp[s][n]).sum()) for n in seq[s])
        total = sum(seq[s][n].numel() for n in seq[s])
        out[str(s)] = {"differing_entries": diff, "entries": total, "fraction": diff / total}
    return out


def weight_difference(seq: dict, grp: dict) -> dict:
    """How far ticket 0's trained weights are apart, relative to the largest weight."""
    scale = max(float(seq[n].double().abs().max()) for n in seq)
    diff = torch.cat([(seq[n].double() - grp[n].double()).abs().flatten() for n in seq]) / scale
    return {"max_rel": float(diff.max()), "fraction_equal": float((diff == 0).double().mean()),
            "fraction_above_1e-6": float((diff > 1e-6).double().mean()),
            "fraction_above_1e-4": float((diff > 1e-4).double().mean())}


def commit() -> str:
    """HEAD of the repository this script lives in, marked when tracked files have uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    return head + ("+uncommitted-changes" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--tickets", type=int, default=10)
    ap.add_argument("--batches", type=int, default=4, help="batches per ticket subset")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sparsities", default="0.5")
    ap.add_argument("--prune-fraction", type=float, default=0.5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/search_grouped_cpu.json")
    a = ap.parse_args()
    a.sparsities = [float(s) for s in a.sparsities.split(",")]
    started_at = commit()  # the code that runs (a commit made during the run would not be it)
    torch.set_num_threads(a.threads)
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    kinds = ("single", "sequential", "grouped")
    runs = {k: [] for k in kinds}
    for rep in range(a.reps + 1):  # rep 0: warm-up (cuDNN autotuning, allocator, first vmap), also the masks
        for k in kinds:
            runs[k].append(one_search(a, dev, dtype, k, record_weights=rep == 0 and k != "single"))
            print(k, f"rep {rep}", {x: round(v, 3) for x, v in runs[k][-1].items() if isinstance(v, float)}, flush=True)
    best = {k: min(runs[k][1:], key=lambda r: r["time"]) for k in kinds}
    first = {k: runs[k][0] for k in kinds}
    times = {f"{k}_{x}": best[k][x] for k in kinds for x in ("time", "wall", "cpu", "train", "prune")}
    ratios = {"sequential_vs_single_imp": best["sequential"]["time"] / best["single"]["time"],
              "grouped_vs_single_imp": best["grouped"]["time"] / best["single"]["time"],
              "grouped_vs_sequential": best["grouped"]["time"] / best["sequential"]["time"],
              "train_sequential_vs_single_imp": best["sequential"]["train"] / best["single"]["train"],
              "train_grouped_vs_single_imp": best["grouped"]["train"] / best["single"]["train"]}
    result = {
        "command": "python benchmarks/search_grouped.py " + " ".join(
            f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(a).items()),
        "commit": started_at,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "threads": torch.get_num_threads(), "load_average_at_end": list(os.getloadavg()),
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                    "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                    "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32},
        "clock": "process CPU seconds" if dev.type == "cpu" else "wall seconds, CUDA synchronised",
        "times_s": times, "ratios": ratios,
        "rounds": {k: best[k]["rounds"] for k in kinds},
        "masks_grouped_vs_sequential": mask_difference(first["sequential"]["masks"], first["grouped"]["masks"]),
        "trained_weights_ticket0_diff": weight_difference(first["sequential"]["weights0"],
                                                                  first["grouped"]["weights0"]),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
