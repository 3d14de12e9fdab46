"""Region-routed INR benchmark (paper §4, issue #5): RTL vs single IMP (region embedding) vs dense, PSNR.

    python benchmarks/inr_regions.py            # 3 mosaics (64x64, 4 regions), 25/50/75/90% (~8 min, 2 CPU cores)
    python benchmarks/inr_regions.py --quick    # 1 tiny mosaic, < 1 min

Writes benchmarks/results/inr_regions.json (per image and mean PSNR per method and sparsity, routing cost,
wall times) and reconstruction figures under benchmarks/results/inr_regions/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch initialises OpenMP (shared CPUs)

import torch  # noqa: E402

from rtl_plugin.inr import INRConfig, run_inr  # noqa: E402

HERE = Path(__file__).resolve().parent


def _mean(xs):
    return round(sum(xs) / len(xs), 4)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one tiny mosaic, seconds")
    ap.add_argument("--images", type=int, default=3, help="number of mosaics (image seeds 0..n-1)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--regions", type=int, default=4)
    ap.add_argument("--search-steps", type=int, default=None)
    ap.add_argument("--retrain-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--single-batches", choices=("full", "per_region"), default="full")
    ap.add_argument("--methods", default="rtl,single_imp,dense", help="comma-separated subset of rtl,single_imp,dense,multi_imp")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results" / "inr_regions.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    fig_dir = out.parent / out.stem
    kw = {k: v for k, v in dict(search_steps=args.search_steps, retrain_steps=args.retrain_steps, lr=args.lr,
                                single_batches=args.single_batches).items() if v is not None}
    kw["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.quick:
        cfgs = [INRConfig.quick(image_seed=0, figures_dir=str(fig_dir), **kw)]
    else:
        cfgs = [INRConfig(size=args.size, n_regions=args.regions, image_seed=i, figures_dir=str(fig_dir), **kw)
                for i in range(args.images)]
    t0 = time.perf_counter()
    per_image = []
    for cfg in cfgs:
        res = run_inr(cfg)
        res.pop("reconstructions")
        per_image.append(res)
        line = "  ".join(f"{m} " + "/".join(f"{v:.2f}" for v in res["psnr"][m].values())
                         for m in ("rtl", "single_imp", "multi_imp") if m in res["psnr"])
        print(f"image {cfg.image_seed} {res['image']['sources']}: {line}  dense {res['psnr'].get('dense', float('nan')):.2f}"
              f"  ({res['total_time_s']:.0f}s)", flush=True)
    methods = [m for m in ("rtl", "single_imp", "multi_imp") if m in per_image[0]["psnr"]]
    sps = sorted(per_image[0]["psnr"][methods[0]]) if methods else []
    mean = {m: {s: _mean([r["psnr"][m][s] for r in per_image]) for s in sps} for m in methods}
    if "dense" in per_image[0]["psnr"]:
        mean["dense"] = _mean([r["psnr"]["dense"] for r in per_image])
    gain = ({s: round(mean["rtl"][s] - mean["single_imp"][s], 4) for s in sps}
            if {"rtl", "single_imp"} <= set(methods) else {})
    target = {s: gain[s] >= 1.5 for s in gain if s in (0.5, 0.75)}
    summary = {
        "benchmark": "inr_regions", "command": "python benchmarks/inr_regions.py" + (" --quick" if args.quick else ""),
        "args": vars(args), "mean_psnr": mean, "rtl_minus_single_imp": gain,
        "target": {"rule": "RTL >= single IMP + 1.5 dB at 50% and 75% (mean over images)", "met": target},
        "images": per_image, "total_time_s": round(time.perf_counter() - t0, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                    "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, out)
    print("mean PSNR (dB)  " + "  ".join(f"{int(s * 100)}%" .rjust(8) for s in sps))
    for m in methods:
        print(f"{m:<15s}" + "  ".join(f"{mean[m][s]:8.2f}" for s in sps))
    if gain:
        print(f"{'RTL - single':<15s}" + "  ".join(f"{gain[s]:+8.2f}" for s in sps))
    print(f"dense {mean.get('dense', float('nan')):.2f} dB; target (+1.5 dB at 50/75%): {target}; "
          f"{summary['total_time_s']:.0f}s -> {out}")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
