"""The paper's CIFAR-10 detector table, reproduced on Fashion-MNIST (K = 10 class tickets).

Protocol (PAPER.md §2, §4): every class ticket k is a one-vs-rest detector (output k of a 10-output
model) trained on balanced positive/negative batches. Methods, all from the same θ0 and with the same
number of sample presentations:

* ``rtl``: per-class IMP ticket search (fraction-per-round pruning, exact targets, rewind to θ0),
  then joint retraining of the 10 tickets over one shared weight tensor (balanced cyclic batching,
  per-ticket Adam state and BatchNorm statistics), scored run-all (column k = ticket k's output k);
* ``single_imp``: the paper's "IMP single": one mask, one model with 10 sigmoid outputs trained
  multilabel (BCE against one-hot labels) on ordinary shuffled batches; each round / epoch sees as many
  samples as all 10 tickets together;
* ``multi_imp``: 10 independent binary detectors, each IMP'd on its own balanced subset (that search
  is exactly RTL's per-ticket search from the same θ0, so its masks are reused), each retrained alone;
* ``dense`` (reference): the unpruned multilabel model with the same retraining budget.

Metrics (``rtl_plugin.tasks.metrics.detector_metrics`` on the whole test set): the paper's macro detector
balanced accuracy / precision / recall at threshold 0 on logits, threshold-free macro ROC AUC, and the
label-free 10-way accuracy of the argmax over the 10 detector scores (run-all routing for RTL and
multi; the argmax of the single model's outputs). Parameters: prunable weights kept (RTL = union of
tickets, single = its mask, multi = sum over the 10 models). Similarity: mean pairwise Jaccard of the
tickets, globally and per layer, with the chance level of independent random masks.

Usage::

    python benchmarks/fashion_detectors.py --quick
    nice -n 10 python benchmarks/fashion_detectors.py --seeds 0,1,2 --model cnn \\
        --train-per-class 300 --test-per-class 100 --out benchmarks/results/fashion_detectors.json
    python benchmarks/fashion_detectors.py --model timm:test_resnet --seeds 0 ...
    python benchmarks/fashion_detectors.py --seeds 1 --methods rtl --no-dense --out rtl_seed1.json  # RTL only
    python benchmarks/fashion_detectors.py --merge seed0.json rtl_seed1.json --out merged.json     # no training

θ0 of the ``cnn`` model is the paper's Kaiming-normal init (fan_in, ReLU); defaults: 3 epochs per search round,
5 joint-retraining epochs (RESULTS.md §1).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import rtl_plugin as rtl
from rtl_plugin.comparison.baselines import CyclicLoader
from rtl_plugin.comparison.protocol import ComparisonConfig, ComparisonTask, Evaluation, SingleImpSetup, compare
from rtl_plugin.diagnostics.similarity import mean_offdiagonal
from rtl_plugin.tasks.classification.data import load_fashion_mnist
from rtl_plugin.tasks.classification.detectors import detector_scores, detector_train_step, multilabel_train_step, one_vs_rest_loaders
from rtl_plugin.persist.io import atomic_write_json
from rtl_plugin.tasks.metrics import detector_metrics
from rtl_plugin.tickets import TicketSet
from rtl_plugin.training.retrain import joint_retrain

K = 10
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
METRICS = ("balanced_accuracy", "precision", "recall", "auc", "argmax_accuracy")
METHODS = ("rtl", "single_imp", "multi_imp")  # in the order they run; dense (optional) last
INITS = ("kaiming", "torch")  # θ0 of the cnn: the paper's Kaiming-normal, or PyTorch's default (RESULTS §1e)


# --------------------------------------------------------------------------- models
class PlainCNN(nn.Module):
    """5 x (conv3x3-BN-ReLU), global average pool, linear head. 1->16->32->64->64->96 channels,
    strides 2,2,1,2,1 on 28x28 inputs: 115,344 prunable conv weights (the head is never pruned).

    θ0 is the paper's Kaiming init: conv weights ~ N(0, 2 / fan_in) (He, ReLU gain). PyTorch's default
    U(±1/√fan_in) has a third of that variance per layer and makes the global magnitude ranking empty the deep
    layers between 90% and 95% sparsity (RESULTS §1, 2026-11-23 run); the break there was the short retraining
    budget, the emptier layers cost accuracy at 97-99% (§1e)."""

    def __init__(self, num_classes: int = K, in_ch: int = 1, widths=(16, 32, 64, 64, 96), strides=(2, 2, 1, 2, 1),
                 init: str = "kaiming"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        layers, c = [], in_ch
        for w, s in zip(widths, strides):
            layers += [nn.Conv2d(c, w, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)
        for m in self.features:
            if isinstance(m, nn.Conv2d) and init == "kaiming":  # "torch" keeps nn.Conv2d's U(±1/√fan_in)
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def model_factory(spec: str, init: str = "kaiming"):
    """``"cnn"`` or ``"timm:NAME"`` -> ``make(seed)`` giving the same θ0 for the same seed. ``init`` applies to
    ``cnn`` only ("torch" = PyTorch's default conv init, for the init-vs-budget ablation of RESULTS §1e)."""
    if spec == "cnn":
        def make(seed: int) -> nn.Module:
            torch.manual_seed(seed)
            return PlainCNN(init=init)
        return make
    if spec.startswith("timm:"):
        import timm
        name = spec.split(":", 1)[1]

        def make(seed: int) -> nn.Module:
            torch.manual_seed(seed)
            return timm.create_model(name, num_classes=K, in_chans=1)
        return make
    raise SystemExit(f"--model must be 'cnn' or 'timm:NAME', got {spec!r}")


# --------------------------------------------------------------------------- data
def load_data(train_per_class: int, test_per_class: int, seed: int):
    """Stratified, seeded subsets of the Fashion-MNIST train and test splits, [N, 1, 28, 28] standardised."""
    out = []
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        images, labels = load_fashion_mnist(split=split)
        rng = np.random.default_rng(seed * 7919 + (0 if split == "train" else 1))
        idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), n, replace=False) for c in range(K)])
        idx = rng.permutation(idx)
        x = torch.from_numpy(images[idx].astype(np.float32) / 255.0).unsqueeze(1)
        out += [(x - FMNIST_MEAN) / FMNIST_STD, torch.from_numpy(labels[idx]).long()]
    return out


# --------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def layer_density(tickets: TicketSet) -> dict[str, float]:
    """Fraction of each prunable layer's weights kept, averaged over the tickets."""
    return {n: round(float(m.float().mean()), 6) for n, m in tickets.element_masks().items()}


def layer_density_per_ticket(tickets: TicketSet) -> dict[str, list[float]]:
    """Fraction of each prunable layer's weights kept by each ticket: ``{layer: [ticket 0, ..., ticket K-1]}``."""
    return {n: [round(float(v), 6) for v in m.reshape(m.shape[0], -1).float().mean(1)]
            for n, m in tickets.element_masks().items()}


def layer_jaccard(tickets: TicketSet) -> dict[str, float]:
    """Mean pairwise Jaccard per prunable layer (in forward order of the space)."""
    out = {}
    for name, m in tickets.element_masks().items():
        f = m.reshape(m.shape[0], -1).double()
        inter = f @ f.T
        kept = inter.diagonal()
        union = kept[:, None] + kept[None, :] - inter
        j = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
        out[name] = round(mean_offdiagonal(j), 6)
    return out


@torch.no_grad()
def single_scores(routed, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Outputs [N, K] of a one-ticket RoutedModel (each column a class detector)."""
    was = routed.training
    routed.eval()
    try:
        return torch.cat([routed(x[i:i + batch_size], route=0).float() for i in range(0, len(x), batch_size)])
    finally:
        routed.train(was)


# --------------------------------------------------------------------------- one seed
class FashionDetectorTask(ComparisonTask):
    """The detector table's pieces of the comparison protocol: one-vs-rest class subsets, detector and multilabel
    train steps, run-all detector scores and the paper's detector metrics."""
    name = "fashion_detectors"

    def __init__(self, cfg: dict, seed: int):
        self.cfg, self.seed = cfg, seed
        self.xtr, self.ytr, self.xte, self.yte = load_data(cfg["train_per_class"], cfg["test_per_class"], seed)
        self.make = model_factory(cfg["model"], cfg.get("init", "kaiming"))
        self.example = self.xtr[:1]
        B = cfg["batch_size"]
        self.loaders = one_vs_rest_loaders(self.xtr, self.ytr, num_classes=K, batch_size=B, seed=seed)
        self.batches_per_ticket = max(len(dl) for dl in self.loaders.values())
        g = torch.Generator().manual_seed(seed * 1000 + 999)
        self.all_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.xtr, self.ytr),
                                                      batch_size=B, shuffle=True, generator=g, drop_last=True)
        if len(self.all_loader) == 0:
            raise SystemExit(f"batch size {B} exceeds the {len(self.xtr)} training images")
        self.train_step = detector_train_step()
        self.multilabel_step = multilabel_train_step()
        self.rounds = {}

    def presentations(self) -> dict:
        """Equal sample presentations: per round / epoch the single model sees K*M batches of B, the 10 tickets
        together K x (2 n) samples in K*M batches."""
        per_ticket_epoch = sum(dl.batch_sampler.num_samples for dl in self.loaders.values())
        return {"tickets_per_round_or_epoch": per_ticket_epoch,
                "single_per_round_or_epoch": K * self.batches_per_ticket * self.cfg["batch_size"]}

    def ticket_loaders(self) -> dict:
        return self.loaders

    def build_routed(self, num_tickets: int):
        return rtl.wrap(self.make(self.seed), num_tickets, example_inputs=self.example)

    def after_search(self, routed, search) -> None:
        self.rounds["rtl_per_ticket"] = len(search.history) // K
        log(f"seed {self.seed}: ticket search {self.rounds['rtl_per_ticket']} rounds x {K} tickets "
            f"({routed.space.num_weights} prunable weights)")

    def _log_row(self, method: str, sparsity: float, metrics: dict, tail: str = "") -> None:
        log(f"seed {self.seed}: {method:<6s} s={sparsity:.2f} bal_acc={metrics['balanced_accuracy']:.4f} "
            f"auc={metrics['auc']:.4f} acc10={metrics['argmax_accuracy']:.4f}{tail}")

    def evaluate_rtl(self, routed, tickets, sparsity: float) -> list[Evaluation]:
        metrics = detector_metrics(detector_scores(routed, self.xte, batch_size=512), self.yte)
        self._log_row("rtl", sparsity, metrics, f" union={tickets.union_count()}")
        return [Evaluation("all", metrics)]

    def similarity_extras(self, tickets) -> dict:
        return {"union_fraction": round(tickets.union_count() / tickets.space.num_weights, 6),
                "per_layer": layer_jaccard(tickets), "per_layer_density": layer_density(tickets),
                "per_layer_density_per_ticket": layer_density_per_ticket(tickets)}

    def single_imp_setup(self, method: str) -> SingleImpSetup:
        """IMP single: one mask, one multilabel model, shuffled batches; each round / epoch sees as many samples
        as all 10 tickets together."""
        batches = K * self.batches_per_ticket
        return SingleImpSetup(self.build_routed(1), self.all_loader, batches, batches, self.multilabel_step)

    def after_single_search(self, method: str, result) -> None:
        self.rounds["single"] = len(result.history)
        log(f"seed {self.seed}: single IMP search {len(result.history)} rounds")

    def evaluate_single(self, routed, method: str, tickets, sparsity: float) -> Evaluation:
        metrics = detector_metrics(single_scores(routed, self.xte), self.yte)
        if sparsity in self.cfg["sparsities"]:
            self._log_row("single", sparsity, metrics)
        return Evaluation("none", metrics, {"layer_density": layer_density(tickets)})

    def multi_imp_output(self, model, k: int) -> torch.Tensor:
        return single_scores(model, self.xte)[:, k]

    def evaluate_multi(self, outputs: list, sparsity: float) -> Evaluation:
        metrics = detector_metrics(torch.stack(outputs, 1), self.yte)
        self._log_row("multi", sparsity, metrics)
        return Evaluation("all", metrics)

    def train_dense(self) -> Evaluation:
        """Dense reference: the unpruned multilabel model with the same retraining budget."""
        rd = self.build_routed(1)
        joint_retrain(rd, {0: CyclicLoader(self.all_loader, K * self.batches_per_ticket)},
                      optimizer=torch.optim.Adam(rd.parameters(), lr=self.cfg["lr"]), epochs=self.cfg["retrain_epochs"],
                      train_step=self.multilabel_step, progress=self.cfg["progress"])
        return Evaluation("none", detector_metrics(single_scores(rd, self.xte), self.yte))

    def describe(self, results: dict) -> dict:
        return {"task": self.name, "dataset": "fashion-mnist", "model": self.cfg["model"], "granularity": "weight",
                "seed": self.seed, "config": self.cfg}


def comparison_config(cfg: dict) -> ComparisonConfig:
    methods = tuple(cfg.get("methods", METHODS)) + (("dense",) if cfg["dense"] else ())
    return ComparisonConfig(sparsities=tuple(cfg["sparsities"]), methods=methods, schedule="fraction",
                            prune_fraction=cfg["prune_fraction"], scope=cfg.get("scope", "global"),
                            epochs_per_round=cfg["epochs_per_round"], retrain_epochs=cfg["retrain_epochs"],
                            lr=cfg["lr"], equal_storage=cfg["equal_storage"], progress=cfg["progress"])


def run_seed(cfg: dict, seed: int) -> dict:
    t_all = time.perf_counter()
    task = FashionDetectorTask(cfg, seed)
    res = compare(task, comparison_config(cfg))
    wall = {**res["wall_time_s"], "total": time.perf_counter() - t_all}
    return {"seed": seed, "prunable_weights": res["prunable_weights"], "rows": res["rows"],
            "similarity": res["similarity"], "rounds": task.rounds, "presentations": task.presentations(),
            "batches_per_ticket_epoch": task.batches_per_ticket,
            "wall_time_s": {k: round(v, 2) for k, v in wall.items()}}


# --------------------------------------------------------------------------- aggregation and report
def _ms(vals) -> dict:
    if not len(vals):
        return {"mean": float("nan"), "std": 0.0, "n": 0}
    a = np.asarray(vals, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": int(len(a))}


def _natural(name: str) -> tuple:
    """Sort key reading digit runs as numbers, so ``features.3`` < ``features.12`` (forward order of the CNN)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def summarise(per_seed: list[dict]) -> dict:
    keys = []
    for res in per_seed:
        for r in res["rows"]:
            key = (r["method"], r["sparsity"], r["matching"])
            if key not in keys:
                keys.append(key)
    rows = []
    for key in keys:
        hits = [r for res in per_seed for r in res["rows"] if (r["method"], r["sparsity"], r["matching"]) == key]
        rows.append({"method": key[0], "sparsity": key[1], "matching": key[2], "routing": hits[0]["routing"],
                     "params": _ms([h["params"] for h in hits]),
                     "metrics": {m: _ms([h["metrics"][m] for h in hits]) for m in METRICS}})
    diffs = []
    sps = sorted({r["sparsity"] for res in per_seed for r in res["rows"] if r["method"] == "rtl"})
    for s in sps:
        d = {"sparsity": s}
        for other in ("single_imp", "multi_imp"):
            for m in METRICS:
                vals = []
                for res in per_seed:
                    a = [r for r in res["rows"] if r["method"] == "rtl" and r["sparsity"] == s]
                    b = [r for r in res["rows"] if r["method"] == other and r["sparsity"] == s
                         and r["matching"] == "equal_cost"]
                    if a and b:
                        vals.append(a[0]["metrics"][m] - b[0]["metrics"][m])
                if vals:
                    d[f"rtl_minus_{other}:{m}"] = _ms(vals)
        diffs.append(d)
    sim = []
    for s in sps:
        hits = [x for res in per_seed for x in res["similarity"] if x["sparsity"] == s]
        layers = sorted(hits[0]["per_layer"], key=_natural)  # JSON files store keys sorted: features.12 < features.3
        sim.append({"sparsity": s, "mean_jaccard": _ms([h["mean_jaccard"] for h in hits]),
                    "chance": _ms([h["chance"] for h in hits]),
                    "union_fraction": _ms([h["union_fraction"] for h in hits]),
                    "per_layer": {ln: _ms([h["per_layer"][ln] for h in hits]) for ln in layers}})
        if all("per_layer_density" in h for h in hits):
            sim[-1]["per_layer_density"] = {ln: _ms([h["per_layer_density"][ln] for h in hits]) for ln in layers}
    stages = list(dict.fromkeys(k for res in per_seed for k in res["wall_time_s"]))  # runs of fewer methods lack some
    wall = {k: _ms([res["wall_time_s"][k] for res in per_seed if res["wall_time_s"].get(k)]) for k in stages}  # 0: not run
    wall = {k: v for k, v in wall.items() if v["n"]}
    return {"rows": rows, "differences": diffs, "similarity": sim, "wall_time_s": wall}


def _f(ms: dict, digits: int = 3) -> str:
    if ms["n"] > 1:
        return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"
    return f"{ms['mean']:.{digits}f}"


def _k(n: float) -> str:
    return f"{n / 1e3:.1f}K" if n < 1e6 else f"{n / 1e6:.2f}M"


def markdown(summary: dict, settings: dict, n_total: int) -> str:
    out = []
    out.append("| sparsity | method | #params | bal. acc | precision | recall | AUC | 10-way acc (argmax) |")
    out.append("|---|---|---|---|---|---|---|---|")
    order = {m: i for i, m in enumerate(("rtl", "single_imp", "multi_imp", "dense"))}
    rows = sorted(summary["rows"], key=lambda r: (r["sparsity"], r["matching"] != "equal_cost",
                                                   order.get(r["method"], 9)))
    most = max(r["metrics"]["balanced_accuracy"]["n"] for r in rows)
    for r in rows:
        name = r["method"] + (" (equal storage)" if r["matching"] == "equal_storage" else "")
        n = r["metrics"]["balanced_accuracy"]["n"]
        name += f" ({n} seed{'s' if n > 1 else ''})" if n < most else ""
        mm = r["metrics"]
        out.append(f"| {int(round(r['sparsity'] * 100))}% | {name} | {_k(r['params']['mean'])} | "
                   f"{_f(mm['balanced_accuracy'])} | {_f(mm['precision'])} | {_f(mm['recall'])} | "
                   f"{_f(mm['auc'])} | {_f(mm['argmax_accuracy'])} |")
    out.append("")
    out.append("Paired differences (same seed, same θ0), mean ± std over seeds:")
    out.append("")
    out.append("| sparsity | RTL − single: bal. acc | AUC | 10-way acc | RTL − multi: bal. acc | AUC | 10-way acc |")
    out.append("|---|---|---|---|---|---|---|")
    for d in summary["differences"]:
        cells = []
        for other in ("single_imp", "multi_imp"):
            for m in ("balanced_accuracy", "auc", "argmax_accuracy"):
                v = d.get(f"rtl_minus_{other}:{m}")
                cells.append(("+" if v and v["mean"] >= 0 else "") + _f(v) if v else "-")
        out.append(f"| {int(round(d['sparsity'] * 100))}% | " + " | ".join(cells) + " |")
    out.append("")
    out.append(f"Ticket similarity (prunable weights: {n_total}); per-layer = mean pairwise Jaccard of each conv layer "
               "in forward order:")
    out.append("")
    out.append("| sparsity | union / all | mean Jaccard | chance | per-layer Jaccard (first → last) | "
               "per-layer kept fraction, mean over tickets |")
    out.append("|---|---|---|---|---|---|")
    for s in summary["similarity"]:
        pl = " / ".join(f"{v['mean']:.2f}" for v in s["per_layer"].values())
        dens = s.get("per_layer_density")
        pd = " / ".join(f"{v['mean']:.3f}" for v in dens.values()) if dens else "-"
        out.append(f"| {int(round(s['sparsity'] * 100))}% | {_f(s['union_fraction'])} | {_f(s['mean_jaccard'])} | "
                   f"{_f(s['chance'])} | {pl} | {pd} |")
    out.append("")
    w = summary["wall_time_s"]
    out.append("Wall time per seed (s): " + ", ".join(f"{k} {_f(v, 1)}" for k, v in w.items()))
    return "\n".join(out)


# --------------------------------------------------------------------------- main
def code_commit() -> str:
    """HEAD of the checkout this script runs from, marked when tracked files differ from it."""
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    return (head or "unknown") + ("+uncommitted-changes" if dirty else "")


def machine_info() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}
    try:
        import torch_pruning
        info["torch_pruning"] = torch_pruning.__version__
    except Exception:  # pragma: no cover
        pass
    try:
        import timm
        info["timm"] = timm.__version__
    except Exception:  # pragma: no cover
        pass
    try:
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    return info


SEED_INDEPENDENT = ("command", "commit", "machine", "per_seed", "summary", "markdown", "total_wall_time_s", "merged_from")


def read_mergeable(paths: list[str], *, per_run_settings: tuple[str, ...]) -> tuple[list[dict], list[dict]]:
    """The result files of ``--merge`` and their per-seed records in seed order, after checking that they are runs
    of one protocol (settings equal apart from ``per_run_settings``) on distinct seeds (``SystemExit`` if not)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    if len(runs) < 2:
        raise SystemExit("--merge needs at least two result files")
    ref = runs[0]["settings"]
    for path, r in zip(paths, runs):
        diff = sorted(k for k in set(ref) | set(r["settings"])
                      if k not in per_run_settings and r["settings"].get(k) != ref.get(k))
        if diff:
            raise SystemExit(f"--merge: {path} differs from {paths[0]} in settings {diff}; merge only runs of one "
                             "protocol (same command apart from --seeds and --out)")
    per_seed = sorted((s for r in runs for s in r["per_seed"]), key=lambda s: s["seed"])
    seeds = [s["seed"] for s in per_seed]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--merge: seed repeated across files ({seeds}); each seed must come from one run only")
    return runs, per_seed


def merge_results(paths: list[str], out: str) -> dict:
    """One result file from runs of the same settings on different seeds (e.g. seeds run as parallel processes):
    per-seed records concatenated in seed order, summary and table recomputed; each run's command, commit and
    machine kept under ``merged_from``."""
    # a run of fewer methods adds seeds to those methods' rows only
    runs, per_seed = read_mergeable(paths, per_run_settings=("seeds", "methods", "dense"))
    seeds = [s["seed"] for s in per_seed]
    merged = {k: v for k, v in runs[0].items() if k not in SEED_INDEPENDENT}
    merged["settings"] = {**runs[0]["settings"], "seeds": seeds,
                          "methods": [m for m in METHODS if any(m in r["settings"].get("methods", METHODS) for r in runs)],
                          "dense": any(r["settings"].get("dense", True) for r in runs)}
    merged["merged_from"] = [{"file": str(p), "command": r["command"], "commit": r.get("commit"),
                              "methods": r["settings"].get("methods", list(METHODS)), "dense": r["settings"].get("dense"),
                              "machine": r["machine"], "seeds": [s["seed"] for s in r["per_seed"]],
                              "total_wall_time_s": r.get("total_wall_time_s")} for p, r in zip(paths, runs)]
    merged["per_seed"] = per_seed
    merged["summary"] = summarise(per_seed)
    merged["markdown"] = markdown(merged["summary"], merged["settings"], per_seed[0]["prunable_weights"])
    atomic_write_json(Path(out), merged)
    return merged


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny setting (< 1 min): checks the pipeline, not quality")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--model", default="cnn", help="cnn (plain 5-layer CNN, 115K prunable weights) or timm:NAME")
    p.add_argument("--init", default="kaiming", choices=INITS,
                   help="θ0 of the cnn model: kaiming (the paper's, default) or torch (PyTorch's default conv init)")
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--sparsities", default="0.25,0.5,0.75,0.9,0.95,0.97,0.99")
    p.add_argument("--epochs-per-round", type=int, default=3, help="T: passes over subset k per pruning round")
    p.add_argument("--retrain-epochs", type=int, default=5, help="joint retraining epochs from θ0")
    p.add_argument("--prune-fraction", type=float, default=0.5)
    p.add_argument("--scope", default="global", choices=["global", "layer"],
                   help="magnitude ranking over all layers (paper) or per layer")
    p.add_argument("--batch-size", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1 is fastest for these small nets on a shared CPU)")
    p.add_argument("--equal-storage", action="store_true",
                   help="also run single IMP at RTL's union sparsity (equal storage matching)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense reference")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of rtl,single_imp,multi_imp (rtl is required: the others reuse its search)")
    p.add_argument("--progress", action="store_true", help="tqdm progress bars")
    p.add_argument("--merge", nargs="+", default=None, metavar="FILE",
                   help="no training: merge result files of the same settings on different seeds into --out")
    p.add_argument("--out", default="benchmarks/results/fashion_detectors.json")
    a = p.parse_args(argv)
    if a.quick:
        a.train_per_class, a.test_per_class = 12, 10
        a.sparsities, a.retrain_epochs, a.batch_size = "0.5,0.9", 1, 24
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.merge:
        merged = merge_results(a.merge, a.out)
        print(merged["markdown"])
        return merged
    torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    if a.init != "kaiming" and a.model != "cnn":
        raise SystemExit("--init applies to --model cnn only; timm models keep timm's init")
    settings = {"model": a.model, "init": a.init if a.model == "cnn" else "timm", "seeds": seeds,
                "train_per_class": a.train_per_class,
                "test_per_class": a.test_per_class, "image_size": 28, "num_tickets": K,
                "sparsities": [float(s) for s in a.sparsities.split(",")], "schedule": "fraction",
                "prune_fraction": a.prune_fraction, "epochs_per_round": a.epochs_per_round, "scope": a.scope,
                "retrain_epochs": a.retrain_epochs, "batch_size": a.batch_size, "optimizer": "Adam", "lr": a.lr,
                "rewind": "init (θ0)", "norms": "per-ticket BatchNorm statistics, per-ticket Adam state",
                "threshold": 0.0, "equal_storage": a.equal_storage, "dense": not a.no_dense,
                "quick": a.quick, "progress": a.progress,
                "methods": [m for m in METHODS if m in a.methods.split(",")]}
    if (2 * a.train_per_class) % a.batch_size:
        log(f"note: 2 x train-per-class = {2 * a.train_per_class} is not a multiple of the batch size "
            f"{a.batch_size}; single IMP then sees slightly more samples per epoch than the tickets")
    results = {"benchmark": "fashion_detectors", "dataset": "fashion-mnist (Debian dataset-fashion-mnist)",
               "command": "python " + " ".join([sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv))),
               "commit": code_commit(), "settings": settings, "machine": machine_info(), "per_seed": []}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for seed in seeds:
        log(f"seed {seed}: start ({a.model})")
        res = run_seed(settings, seed)
        results["per_seed"].append(res)
        results["summary"] = summarise(results["per_seed"])
        results["markdown"] = markdown(results["summary"], settings, res["prunable_weights"])
        results["total_wall_time_s"] = round(time.perf_counter() - t0, 1)
        atomic_write_json(out, results)  # saved after every seed: an interrupted run keeps its finished seeds
        log(f"seed {seed}: done in {res['wall_time_s']['total']:.1f}s -> {out}")
    print()
    print(results["markdown"])
    print(f"\ntotal wall time {results['total_wall_time_s']:.1f}s; results in {out}")
    return results


if __name__ == "__main__":
    main()
