"""Collapse sweep: which label-free signals warn ahead of RTL's quality drop, and does CollapseMonitor fire in time?

For each seed, on the Fashion-MNIST one-vs-rest class-ticket task of ``fashion_detectors.py`` (same model,
data, θ0, schedule), the ticket search runs with ``order="round"`` and a :class:`rtl_plugin.diagnostics.sweep.SweepRecorder`
(probe: unlabeled test images; metric: each trained ticket's detector balanced accuracy, labels used for the
evaluation only). Then the tickets at every target sparsity are jointly retrained and scored (the paper's
macro detector balanced accuracy, run-all): that is the ground truth "metric vs sparsity".

The monitor is applied offline to each recorded sweep (``CollapseMonitor.scan``), exactly as it would act
online as a callback (it sees the points in order and decides on the last one). Success, per seed: it fires at
a sparsity at or before the first target where the retrained metric is more than 5 points below its best, and
never at a sparsity where the metric is still within 1 point of its best.

Usage::

    nice -n 10 python benchmarks/collapse_sweep.py --seeds 0,1,2,3,4,5 --out benchmarks/results/collapse_sweep.json
    python benchmarks/collapse_sweep.py --quick
    python benchmarks/collapse_sweep.py --analyse benchmarks/results/collapse_sweep.json   # re-score the monitor
    python benchmarks/collapse_sweep.py --merge s0.json s1.json --out merged.json  # seeds run as separate processes
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rtl_plugin as rtl  # noqa: E402
from fashion_detectors import (K, code_commit, load_data, log, machine_info, model_factory,  # noqa: E402
                                read_mergeable)
from rtl_plugin.diagnostics.collapse import CollapseMonitor  # noqa: E402
from rtl_plugin.tasks.classification.detectors import detector_scores, detector_train_step, one_vs_rest_loaders  # noqa: E402
from rtl_plugin.persist.io import atomic_write_json  # noqa: E402
from rtl_plugin.tasks.metrics import detector_metrics  # noqa: E402
from rtl_plugin.pruning.pruner import RTLPruner  # noqa: E402
from rtl_plugin.diagnostics.sweep import Sweep, SweepRecorder  # noqa: E402
from rtl_plugin.training.retrain import joint_retrain  # noqa: E402

SIGNALS = ("mean_jaccard", "band_jaccard.deep", "band_jaccard.middle", "band_density.deep", "min_layer_density",
           "pruned_output_similarity",
           "allocation_churn", "prune_agreement", "round_agreement", "output_similarity")


def detector_balanced_accuracy(model, k: int, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        s = torch.cat([model(x[i:i + 512], route=k)[:, k] for i in range(0, len(x), 512)])
    model.train(was)
    pos = y == k
    tpr = float(((s > 0) & pos).sum()) / max(int(pos.sum()), 1)
    tnr = float(((s <= 0) & ~pos).sum()) / max(int((~pos).sum()), 1)
    return 0.5 * (tpr + tnr)


def run_seed(cfg: dict, seed: int) -> dict:
    t0 = time.perf_counter()
    xtr, ytr, xte, yte = load_data(cfg["train_per_class"], cfg["test_per_class"], seed)
    make = model_factory(cfg["model"])
    routed = rtl.wrap(make(seed), K, example_inputs=xtr[:1])
    theta0 = copy.deepcopy(routed.model.state_dict())
    loaders = one_vs_rest_loaders(xtr, ytr, num_classes=K, batch_size=cfg["batch_size"], seed=seed)
    g = torch.Generator().manual_seed(seed)
    probe = xte[torch.randperm(len(xte), generator=g)[:cfg["probe"]]]
    rec = SweepRecorder(probe=probe, predict=lambda out, k: (out[:, k] > 0).long(),
                        metric=lambda m, k: detector_balanced_accuracy(m, k, xte, yte))
    pruner = RTLPruner(routed, sparsities=cfg["sparsities"], prune_fraction=cfg["prune_fraction"],
                       order="round", callbacks=[rec], progress=cfg["progress"])
    opt = torch.optim.Adam(routed.parameters(), lr=cfg["lr"])  # cloned per ticket and round
    search = pruner.find_tickets(loaders, train_step=detector_train_step(), optimizer=opt,
                                 epochs_per_round=cfg["epochs_per_round"])
    t_search = time.perf_counter() - t0
    log(f"seed {seed}: search {len(rec.sweep.points) - 1} rounds in {t_search:.1f}s")
    truth = []
    for s in cfg["sparsities"]:
        routed.model.load_state_dict(theta0)
        routed.set_tickets(search.tickets_at[s])
        joint_retrain(routed, loaders, optimizer=torch.optim.Adam(routed.parameters(), lr=cfg["lr"]),
                      epochs=cfg["retrain_epochs"], train_step=detector_train_step(), progress=cfg["progress"])
        m = detector_metrics(detector_scores(routed, xte, batch_size=512), yte)
        truth.append({"sparsity": s, "balanced_accuracy": m["balanced_accuracy"], "auc": m["auc"]})
        log(f"seed {seed}: s={s:.3f} retrained bal_acc={m['balanced_accuracy']:.4f}")
    return {"seed": seed, "sweep": rec.sweep.to_dict(), "truth": truth, "wall_time_s": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------- evaluation
def ground_truth(truth: list[dict], key: str = "balanced_accuracy") -> dict:
    """First sparsity with a drop > 5 points below the best, last sparsity within 1 point of the best."""
    best = max(t[key] for t in truth)
    drop = next((t["sparsity"] for t in truth if t[key] < best - 0.05), None)
    healthy = [t["sparsity"] for t in truth if t[key] >= best - 0.01]
    # a drop that never recovers at higher sparsity (the cliff), as opposed to a dip or a gradual slide
    sustained = next((t["sparsity"] for i, t in enumerate(truth) if all(u[key] < best - 0.05 for u in truth[i:])), None)
    return {"best": best, "drop_at": drop, "sustained_drop_at": sustained, "last_healthy": max(healthy)}


def signal_value(point: dict, name: str):
    if "." in name:
        a, b = name.split(".")
        return point[a].get(b)
    return point.get(name)


def evaluate(per_seed: list[dict], monitor_kw: dict | None = None) -> dict:
    rows = []
    for r in per_seed:
        sweep = Sweep.from_dict(r["sweep"])
        gt = ground_truth(r["truth"])
        mon = CollapseMonitor(**(monitor_kw or {}))
        fired = mon.scan(sweep)
        ok_early = gt["drop_at"] is None or (fired is not None and fired["sparsity"] <= gt["drop_at"] + 1e-4)
        ok_false = fired is None or fired["sparsity"] > gt["last_healthy"] + 1e-4
        ok_sustained = gt["sustained_drop_at"] is None or (fired is not None and
                                                           fired["sparsity"] <= gt["sustained_drop_at"] + 1e-4)
        rows.append({"seed": r["seed"], **gt, "fired_at": None if fired is None else fired["sparsity"],
                     "in_time_sustained": ok_sustained,
                     "confidence": None if fired is None else fired["confidence"],
                     "reasons": None if fired is None else fired["reasons"],
                     "in_time": ok_early, "no_false_alarm": ok_false})
    mon = CollapseMonitor(**(monitor_kw or {}))  # the settings scored
    return {"rows": rows, "all_in_time": all(r["in_time"] for r in rows),
            "no_false_alarms": all(r["no_false_alarm"] for r in rows),
            "monitor": {"depletion_slope": mon.depletion_slope, "factor": mon.factor, "signals": mon.signals}}


def recorded_evaluation(per_seed: list[dict]) -> dict:
    """``evaluate`` with the default monitor, plus the commit of the code that scored it (what a result file keeps;
    the per-detector tables call ``evaluate`` many times and need no commit)."""
    ev = evaluate(per_seed)
    ev["monitor"]["scored_at_commit"] = code_commit()
    return ev


DETECTORS = {  # name -> CollapseMonitor settings: one signal each under the same step rule, then the default
    "mean Jaccard step (the paper)": dict(signals=["mean_jaccard"], depletion_slope=None),
    "band Jaccard step": dict(signals=["band_jaccard"], depletion_slope=None),
    "layer Jaccard step": dict(signals=["layer_jaccard"], depletion_slope=None),
    "layer density step": dict(signals=["layer_density"], depletion_slope=None),
    "allocation churn step": dict(signals=["allocation_churn"], depletion_slope=None),
    "prune agreement step": dict(signals=["prune_agreement"], depletion_slope=None),
    "round agreement step": dict(signals=["round_agreement"], depletion_slope=None),
    "output similarity step": dict(signals=["output_similarity"], depletion_slope=None),
    "pruned output similarity step": dict(signals=["pruned_output_similarity"], depletion_slope=None),
    "layer depletion slope > 2 only": dict(signals=["band_jaccard"], factor=1e12, depletion_slope=2.0),
    # 1.8 was read off the Kaiming-θ0 sweep's seed 0 (RESULTS §4); its other seeds test it held out
    "layer depletion slope > 1.8 only": dict(signals=["band_jaccard"], factor=1e12, depletion_slope=1.8),
    "CollapseMonitor() default": {},
}


def detector_table(tasks: dict[str, list[dict]]) -> str:
    """Where each detector fires per task and seed, vs the retrained metric's drop."""
    lines = ["| detector | " + " | ".join(f"{t}: fired at (seeds)" for t in tasks) + " | in time | false alarms |",
             "|---|" + "---|" * len(tasks) + "---|---|"]
    for name, kw in DETECTORS.items():
        cells, ok, fa, n = [], 0, 0, 0
        for task, per_seed in tasks.items():
            ev = evaluate(per_seed, kw)
            cells.append(" / ".join("–" if r["fired_at"] is None else f"{100 * r['fired_at']:.1f}" for r in ev["rows"]))
            ok += sum(r["in_time"] for r in ev["rows"])
            fa += sum(not r["no_false_alarm"] for r in ev["rows"])
            n += len(ev["rows"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ok}/{n} | {fa}/{n} |")
    return "\n".join(lines)


def demo_task(run_dirs: list[str]) -> list[dict]:
    """``rtl prune --collapse warn`` runs of the multi-domain task as {seed, sweep, truth} records."""
    out = []
    for d in run_dirs:
        r = json.loads((Path(d) / "results.json").read_text())
        truth = sorted(({"sparsity": row["sparsity"], "balanced_accuracy": row["metrics"]["balanced_accuracy"]}
                        for row in r["rows"] if row["method"] == "rtl" and row["routing"] == "context"),
                       key=lambda t: t["sparsity"])
        out.append({"seed": r["seed"], "sweep": json.loads((Path(d) / "sweep.json").read_text()), "truth": truth,
                    "command": r.get("config")})
    return out


def signal_table(per_seed: list[dict]) -> str:
    """Each signal along the sweep, mean over seeds, with the retrained/trained metric beside it."""
    sweeps = [r["sweep"]["points"] for r in per_seed]
    n = min(len(p) for p in sweeps)
    head = "| round | sparsity | trained-ticket bal. acc | " + " | ".join(SIGNALS) + " |"
    lines = [head, "|" + "---|" * (3 + len(SIGNALS))]
    for i in range(n):
        pts = [p[i] for p in sweeps]
        sp = np.mean([p["sparsity"] for p in pts])
        met = [p["mean_metric"] for p in pts if p.get("mean_metric") is not None]
        cells = []
        for s in SIGNALS:
            v = [signal_value(p, s) for p in pts]
            v = [x for x in v if x is not None]
            cells.append(f"{np.mean(v):.3f}" if v else "–")
        lines.append(f"| {i} | {100 * sp:.1f}% | {np.mean(met):.3f} | " if met else f"| {i} | {100 * sp:.1f}% | – | ")
        lines[-1] += " | ".join(cells) + " |"
    return "\n".join(lines)


def seed_table(rows: list[dict]) -> list[str]:
    pct = lambda v, none: none if v is None else f"{100 * v:.1f}%"  # noqa: E731
    yes = lambda b: "yes" if b else "NO"  # noqa: E731
    out = ["| seed | best bal. acc | first drop > 5 pts | sustained drop > 5 pts | last within 1 pt | monitor fired at "
           "| confidence | in time (first / sustained) | no false alarm |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = "" if r["confidence"] is None else f"{r['confidence']:.2f}"
        out.append(f"| {r['seed']} | {r['best']:.3f} | {pct(r['drop_at'], 'none')} | "
                   f"{pct(r['sustained_drop_at'], 'none')} | {pct(r['last_healthy'], '')} | "
                   f"{pct(r['fired_at'], 'never')} | {c} | {yes(r['in_time'])} / {yes(r['in_time_sustained'])} | "
                   f"{yes(r['no_false_alarm'])} |")
    return out


def markdown(results: dict) -> str:
    ev = results["evaluation"]
    out = seed_table(ev["rows"])
    out.append("")
    out.append("Retrained RTL balanced accuracy per target sparsity (mean over seeds):")
    sps = [t["sparsity"] for t in results["per_seed"][0]["truth"]]
    out.append("| " + " | ".join(f"{100 * s:g}%" for s in sps) + " |")
    out.append("|" + "---|" * len(sps))
    out.append("| " + " | ".join(f"{np.mean([r['truth'][i]['balanced_accuracy'] for r in results['per_seed']]):.3f}"
                                 for i in range(len(sps))) + " |")
    out.append("")
    out.append(signal_table(results["per_seed"]))
    tasks = {"fashion": results["per_seed"]}
    if results.get("demo_task"):
        tasks["multi-domain demo task"] = results["demo_task"]
        out += ["", "Multi-domain demo task (rtl prune, K = 3, timm test_resnet), monitor default:", ""]
        out += seed_table(evaluate(results["demo_task"])["rows"])
    out += ["", "Each signal under the same step rule (and the default monitor), fired-at sparsity per seed:", "",
            detector_table(tasks)]
    return "\n".join(out)


def merge_results(paths: list[str], out: str) -> dict:
    """One result file from runs of the same settings on different seeds: per-seed records in seed order,
    evaluation and tables recomputed, each run's command, commit and machine kept under ``merged_from``."""
    runs, per_seed = read_mergeable(paths, per_run_settings=("progress",))
    merged = {"benchmark": "collapse_sweep", "settings": runs[0]["settings"],
              "merged_from": [{"file": str(p), "command": r.get("command"), "commit": r.get("commit"),
                               "machine": r.get("machine"), "seeds": [s["seed"] for s in r["per_seed"]]}
                              for p, r in zip(paths, runs)],
              "per_seed": per_seed}
    merged["evaluation"] = recorded_evaluation(per_seed)
    merged["markdown"] = markdown(merged)
    atomic_write_json(Path(out), merged)
    return merged


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--model", default="cnn")
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--sparsities", default="0.25,0.5,0.75,0.85,0.9,0.925,0.95,0.965,0.975,0.985,0.99")
    p.add_argument("--prune-fraction", type=float, default=0.5)
    p.add_argument("--epochs-per-round", type=int, default=3)
    p.add_argument("--retrain-epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--probe", type=int, default=500, help="unlabeled probe images for the output signals")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny setting (< 1 min): checks the pipeline, not quality")
    p.add_argument("--analyse", default=None, help="re-score the monitor on a saved result file (no training)")
    p.add_argument("--demo-runs", default="", help="with --analyse: comma-separated `rtl prune --collapse warn` run "
                   "folders of a second task, stored into the result file and scored too")
    p.add_argument("--merge", nargs="+", default=None, metavar="FILE",
                   help="merge result files of one protocol run on different seeds into --out (no training)")
    p.add_argument("--out", default="benchmarks/results/collapse_sweep.json")
    a = p.parse_args(argv)
    if a.merge:
        merged = merge_results(a.merge, a.out)
        print(merged["markdown"])
        return merged
    if a.analyse:
        results = json.loads(Path(a.analyse).read_text())
        if a.demo_runs:
            results["demo_task"] = demo_task([d for d in a.demo_runs.split(",") if d])
        results["evaluation"] = recorded_evaluation(results["per_seed"])
        results["markdown"] = markdown(results)
        atomic_write_json(a.analyse, results)
        print(results["markdown"])
        return results
    if a.quick:
        a.train_per_class, a.test_per_class, a.sparsities, a.retrain_epochs, a.batch_size, a.probe = \
            12, 10, "0.5,0.9", 1, 24, 50
    torch.set_num_threads(a.threads)
    cfg = {"model": a.model, "train_per_class": a.train_per_class, "test_per_class": a.test_per_class,
           "sparsities": [float(s) for s in a.sparsities.split(",")], "prune_fraction": a.prune_fraction,
           "epochs_per_round": a.epochs_per_round, "retrain_epochs": a.retrain_epochs, "batch_size": a.batch_size,
           "lr": a.lr, "probe": a.probe, "progress": a.progress, "threads": a.threads}
    results = {"benchmark": "collapse_sweep", "command": "python " + " ".join(sys.argv if argv is None else
                                                                            ["benchmarks/collapse_sweep.py", *argv]),
               "commit": code_commit(), "settings": cfg, "machine": machine_info(), "per_seed": []}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in [int(s) for s in a.seeds.split(",") if s.strip()]:
        results["per_seed"].append(run_seed(cfg, seed))
        results["evaluation"] = recorded_evaluation(results["per_seed"])
        results["markdown"] = markdown(results)
        atomic_write_json(out, results)
    print(results["markdown"])
    return results


if __name__ == "__main__":
    main()
