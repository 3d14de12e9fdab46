"""Time `rtl prune` in one process and under torchrun with N CPU processes; compare ticket Jaccards.

    python benchmarks/torchrun_timing.py [--nproc 2] [--out benchmarks/results/torchrun_cpu.json]

Each run is a fresh `rtl prune --quick --baselines "" --routers ""` (ticket search + joint retraining
only); the result file records the exact commands, the commit, the machine, wall times and each run's
mean ticket Jaccard per sparsity (from its results.json "similarity").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRUNE_ARGS = ["prune", "--quick", "--baselines", "", "--routers", "", "--no-progress"]


def _machine() -> dict:
    import torch
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_num_threads": torch.get_num_threads(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "load_average_at_start": list(os.getloadavg())}


def _commit() -> str:
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    return head + ("+uncommitted-changes" if dirty else "")


def _timed_run(cmd: list[str], out: Path) -> dict:
    t = time.perf_counter()
    proc = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    return {"command": " ".join(repr(c) if c == "" else c for c in cmd) + " --out DIR",
            "wall_s": round(wall, 1), "total_time_s": res["total_time_s"], "wall_time_s": res["wall_time_s"],
            "mean_jaccard": {str(s["sparsity"]): round(s["mean_jaccard"], 4) for s in res["similarity"]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2, help="torchrun --nproc_per_node")
    ap.add_argument("--out", default="benchmarks/results/torchrun_cpu.json")
    args = ap.parse_args(argv)
    if args.nproc < 2:
        raise SystemExit(f"--nproc must be at least 2 (got {args.nproc}); one process is always measured")
    record = {"benchmark": "rtl prune, 1 process vs torchrun", "commit": _commit(), "machine": _machine(),
              "command": "python benchmarks/torchrun_timing.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp:
        record["one_process"] = _timed_run(["rtl", *PRUNE_ARGS], Path(tmp) / "p1")
        print(f"1 process: {record['one_process']['wall_s']} s", flush=True)
        record[f"torchrun_{args.nproc}"] = _timed_run(
            ["torchrun", "--nproc_per_node", str(args.nproc), "--no-python", "rtl", *PRUNE_ARGS], Path(tmp) / "pn")
        print(f"torchrun {args.nproc}: {record[f'torchrun_{args.nproc}']['wall_s']} s", flush=True)
    record["slowdown"] = round(record[f"torchrun_{args.nproc}"]["wall_s"] / record["one_process"]["wall_s"], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
