"""Mean, spread and paired differences over seeds of ``speech_enhancement.py`` result files (one per seed).

    python benchmarks/aggregate_speech.py "benchmarks/results/speech_instances_shared_seed*.json"

Per test set (synthetic speech, real speech) and sparsity: the mean SI-SNRi (dB, ± sample std over seeds)
of every method / routing, and the issue's three comparisons as **paired** differences per seed (the
methods of one seed share the data, θ0 and the ticket search): RTL (context routing) − single IMP, RTL −
multi-model IMP (targets: >= 0) and learned router − oracle routing (target: >= -0.2 dB), each with its
mean, a two-sided 95% confidence interval of the mean (Student t over seeds) and in how many seeds the
target holds. Files must be one setting (they may differ only in the seed and in where / how verbosely
they ran). ``--json OUT`` also writes the aggregate.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import statistics
import sys
from pathlib import Path

# config fields that do not change the numbers (where the run happened, how it printed)
_RUN_ONLY = ("seed", "device", "progress", "verbose", "cache", "data_file", "figures")
# fields added after some result files were written, with the value those files ran with
_DEFAULTS = {"retrain_mode": "sequential"}
# config fields renamed since some result files were written (old -> new)
_RENAMED = {"rtl_retrain": "retrain_mode", "search_epochs": "epochs_per_round"}


def _setting(config: dict) -> dict:
    return {**_DEFAULTS, **{_RENAMED.get(k, k): v for k, v in config.items() if k not in _RUN_ONLY}}


def load_runs(pattern: str) -> list[dict]:
    """The result dicts of the files matching ``pattern``, checked to be one setting with distinct seeds."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"no file matches {pattern!r}")
    runs = []
    for f in files:
        d = json.loads(Path(f).read_text())
        if d.get("task") != "speech_enhancement" or "rows" not in d:
            raise SystemExit(f"{f} is not a speech_enhancement.py result (no task/rows)")
        runs.append(dict(d, _file=f))
    seeds = [r["config"]["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"the same seed appears twice ({seeds}); pass one file per seed")
    ref = _setting(runs[0]["config"])
    for r in runs[1:]:
        other = _setting(r["config"])
        if other != ref:
            diff = sorted(k for k in set(ref) | set(other) if ref.get(k) != other.get(k))
            raise SystemExit(f"{r['_file']} differs from {runs[0]['_file']} in {diff}; aggregate runs of one "
                             "setting (they may differ only in the seed)")
    return runs


def _t95(n: int) -> float:
    """Two-sided 95% Student-t quantile with n-1 degrees of freedom."""
    from scipy.stats import t
    return float(t.ppf(0.975, n - 1))


def paired(diffs: list[float], threshold: float = 0.0) -> dict:
    """Mean, 95% CI of the mean and the count of seeds with a difference >= ``threshold`` (the target holds)."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n > 1:
        half = _t95(n) * statistics.stdev(diffs) / math.sqrt(n)
        ci = [round(mean - half, 4), round(mean + half, 4)]
    else:
        ci = [None, None]
    return {"mean": round(mean, 4), "ci95": ci, "threshold": threshold,
            "met_seeds": f"{sum(d >= threshold - 1e-12 for d in diffs)}/{n}", "n": n,
            "per_seed": [round(d, 4) for d in diffs]}


def _value(run: dict, key: str, method: str, routing: str, sparsity: float) -> float | None:
    for row in run[key]:
        if row["method"] == method and row["routing"] == routing and abs(row["sparsity"] - sparsity) < 1e-9:
            return row["metrics"]["si_snri"]
    return None


def aggregate(runs: list[dict]) -> dict:
    out: dict = {"seeds": [r["config"]["seed"] for r in runs], "files": [r["_file"] for r in runs],
                 "config": _setting(runs[0]["config"]), "test_sets": {}}
    sps = [float(s) for s in runs[0]["config"]["sparsities"]]
    for key, name in (("rows", "synthetic"), ("rows_real", "real")):
        if not all(r.get(key) for r in runs):
            continue
        methods = sorted({(row["method"], row["routing"]) for row in runs[0][key]})
        table: dict = {}
        for meth, routing in methods:
            for s in ([0.0] if meth == "dense" else sps):
                vals = [_value(r, key, meth, routing, s) for r in runs]
                if any(v is None for v in vals):
                    raise SystemExit(f"{meth}/{routing} at {s} is missing from some files ({name} test set)")
                table.setdefault(f"{meth} {routing}", {})[str(s)] = {
                    "mean": round(statistics.fmean(vals), 4),
                    "std": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0, "n": len(vals)}
        comps: dict = {}
        for label, a, b, threshold in (("rtl_minus_single_imp", ("rtl", "context"), ("single_imp", "none"), 0.0),
                                       ("rtl_minus_multi_imp", ("rtl", "context"), ("multi_imp", "context"), 0.0),
                                       ("router_minus_oracle", ("rtl", "learned"), ("rtl", "context"), -0.2)):
            for s in sps:
                va = [_value(r, key, *a, s) for r in runs]
                vb = [_value(r, key, *b, s) for r in runs]
                if any(v is None for v in va + vb):
                    continue
                comps.setdefault(label, {})[str(s)] = paired([x - y for x, y in zip(va, vb)], threshold)
        out["test_sets"][name] = {"si_snri": table, "paired": comps}
    return out


def format_aggregate(agg: dict) -> str:
    lines = [f"seeds {agg['seeds']}  noise_split={agg['config'].get('noise_split')}  "
             f"retrain_mode={agg['config'].get('retrain_mode')}  per_ticket_state={agg['config'].get('per_ticket_state')}  train_per_env={agg['config'].get('train_per_env')}"]
    for name, ts in agg["test_sets"].items():
        sps = list(next(v for k, v in ts["si_snri"].items() if not k.startswith("dense")))
        lines.append(f"== {name} speech: SI-SNRi dB, mean ± std over seeds")
        lines.append(f"{'':<24s}" + "".join(f"{float(s) * 100:>15.0f}%" for s in sps))
        for meth, row in ts["si_snri"].items():
            if list(row) == ["0.0"]:  # dense: one model at 0% sparsity
                lines.append(f"{meth:<24s}{row['0.0']['mean']:>9.2f} ±{row['0.0']['std']:.2f}  (0% sparsity)")
                continue
            lines.append(f"{meth:<24s}" + "".join(f"{row[s]['mean']:>9.2f} ±{row[s]['std']:.2f}" for s in sps))
        lines.append("paired differences, dB: mean [95% CI] (seeds meeting the target: >= 0, router >= -0.2)")
        for label, row in ts["paired"].items():
            cells = []
            for s in sps:
                p = row[s]
                ci = "" if p["ci95"][0] is None else f" [{p['ci95'][0]:+.2f},{p['ci95'][1]:+.2f}]"
                cells.append(f"{p['mean']:+.2f}{ci} ({p['met_seeds']})")
            lines.append(f"{label:<24s}" + "  ".join(f"{c:>26s}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pattern", help="glob of result files, quoted")
    ap.add_argument("--json", default=None, help="also write the aggregate here")
    args = ap.parse_args(argv)
    agg = aggregate(load_runs(args.pattern))
    print(format_aggregate(agg))
    if args.json:
        Path(args.json).write_text(json.dumps(agg, indent=1) + "\n")
    return agg


if __name__ == "__main__":
    main(sys.argv[1:])
