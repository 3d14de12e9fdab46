"""Mean and spread over seeds of ``segmentation_mosaic.py`` result files (one file per seed and encoder).

    python benchmarks/aggregate_segmentation.py "benchmarks/results/gpu/seg_class_n384_*_s*.json"

Prints, per encoder and sparsity, the mean mIoU (± sample std, n seeds) of every method / routing, the mean
RTL label-free − single-IMP gap and in how many seeds RTL label-free >= single IMP (the issue's target).
``--json OUT`` also writes the table.
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from pathlib import Path

# config fields renamed since some result files were written (old -> new)
_RENAMED = {"search_epochs": "epochs_per_round", "n_clusters": "num_clusters"}


def load_runs(pattern: str) -> dict[str, list[dict]]:
    """``{encoder: [run dict per file]}`` from the files matching ``pattern``."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"no file matches {pattern!r}")
    runs: dict[str, list[dict]] = {}
    for f in files:
        d = json.loads(Path(f).read_text())
        if d.get("benchmark") != "segmentation_mosaic":
            raise SystemExit(f"{f} is not a segmentation_mosaic.py result")
        for enc, r in d["runs"].items():
            r = dict(r, _file=f)
            runs.setdefault(enc, []).append(r)
    return runs


def aggregate(runs: dict[str, list[dict]]) -> dict:
    out: dict = {}
    for enc, rs in runs.items():
        seeds = [r["config"]["seed"] for r in rs]
        if len(set(seeds)) != len(seeds):
            raise SystemExit(f"{enc}: the same seed appears twice ({seeds}); pass one file per seed")
        ref = {k: v for k, v in rs[0]["config"].items() if k != "seed"}
        for r in rs[1:]:
            other = {k: v for k, v in r["config"].items() if k != "seed"}
            if other != ref:
                diff = sorted(k for k in set(ref) | set(other) if ref.get(k) != other.get(k))
                raise SystemExit(f"{enc}: {r['_file']} differs from {rs[0]['_file']} in {diff}; aggregate runs of "
                                 "one setting (they may differ only in the seed)")
        sps = sorted(rs[0]["miou"]["single_imp"]["direct"], key=float)
        table: dict = {}
        for meth, routings in rs[0]["miou"].items():
            for routing in routings:
                for s in sps:
                    vals = [r["miou"][meth][routing][s] for r in rs]
                    table.setdefault(f"{meth} {routing}", {})[s] = {
                        "mean": round(statistics.fmean(vals), 4),
                        "std": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0, "n": len(vals)}
        gap, wins = {}, {}
        if "rtl" in rs[0]["miou"]:
            for s in sps:
                d = [r["miou"]["rtl"]["label_free"][s] - r["miou"]["single_imp"]["direct"][s] for r in rs]
                gap[s] = round(statistics.fmean(d), 4)
                wins[s] = f"{sum(v >= 0 for v in d)}/{len(d)}"
        config = {_RENAMED.get(k, k): v for k, v in rs[0]["config"].items()}  # old files: old names
        out[enc] = {"seeds": seeds, "config": {k: config[k] for k in
                                                ("partition", "n_train", "n_test", "size", "epochs_per_round",
                                                 "retrain_epochs") if k in config},
                    "miou": table, "rtl_label_free_minus_single": gap, "rtl_label_free_ge_single_seeds": wins}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pattern", help="glob of result files, quoted")
    ap.add_argument("--json", default=None, help="also write the aggregate here")
    args = ap.parse_args(argv)
    agg = aggregate(load_runs(args.pattern))
    for enc, a in agg.items():
        print(f"== {enc}  seeds {a['seeds']}  {a['config']}")
        sps = list(next(iter(a["miou"].values())))
        print(f"{'mIoU':<22s}" + "".join(f"{float(s) * 100:>16.0f}%" for s in sps))
        for name, row in a["miou"].items():
            print(f"{name:<22s}" + "".join(f"{row[s]['mean']:>10.4f} ±{row[s]['std']:.4f}" for s in sps))
        if a["rtl_label_free_minus_single"]:
            print(f"{'RTL lf - single':<22s}" + "".join(f"{a['rtl_label_free_minus_single'][s]:>+17.4f}" for s in sps))
            print(f"{'seeds RTL lf >= single':<22s}" + "".join(f"{a['rtl_label_free_ge_single_seeds'][s]:>17s}" for s in sps))
    if args.json:
        Path(args.json).write_text(json.dumps(agg, indent=1) + "\n")
    return agg


if __name__ == "__main__":
    main(sys.argv[1:])
