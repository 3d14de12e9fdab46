"""One comparison protocol: RTL against dense, single-mask IMP and multi-model IMP, for every task.

:func:`compare` owns the sequence every task shares; a :class:`ComparisonTask` supplies only its pieces
(model, data, train step, evaluation, optional extras such as routers):

1. θ0: ``task.build_routed(K)``; per-ticket IMP search with rewinding to θ0 (RTL's tickets);
2. ``rtl``: per target sparsity, rewind to θ0, joint retraining of the K tickets, evaluation (one row per
   routing the task offers), ticket similarity (mean Jaccard against the chance level of random masks);
3. ``dense``: the unpruned model with the same retraining budget (task-owned: its model may differ);
4. ``single_imp`` / ``single_imp_balanced`` / ``single_imp_context``: one mask found by IMP over all data,
   at RTL's sparsities (equal cost) and, for ``single_imp`` with ``equal_storage``, also at the sparsity
   of RTL's union of tickets (equal storage: both store the same number of weights);
5. ``multi_imp``: K independent one-ticket models; per-subset IMP from the same θ0 gives exactly the
   masks of RTL's search, so they are reused, and each model is retrained alone on its subset;
6. rows ``{method, routing, sparsity, params, matching, metrics}`` -> ``results.json`` and figures.

With ``tickets="learned"`` step 1 learns the tickets per sparsity with a jointly trained gate instead
(:mod:`rtl_plugin.comparison.learned`) and step 2 evaluates them as learned, with the gate's routing.

RTL's ticket search runs first; then the methods run in the order of ``ComparisonConfig.methods`` (with
``multi_imp_per_sparsity``, multi-model IMP runs at each sparsity right after RTL's, when both share data
streams). The order of random draws follows it, so a task keeps its numbers by keeping its order.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from rtl_plugin.comparison.baselines import CyclicLoader
from rtl_plugin.comparison.learned import TICKET_SOURCES, LearnedOptions, restore_learned, save_gate, search_learned
from rtl_plugin.diagnostics.plots import plot_classification_results
from rtl_plugin.diagnostics.similarity import chance_matrix, mean_offdiagonal
from rtl_plugin.errors import DataError, SparsityError, TaskHookError
from rtl_plugin.persist.io import atomic_write_json
from rtl_plugin.pruning.pruner import RTLPruner, validate_sparsities
from rtl_plugin.tickets import TicketSet
from rtl_plugin.training.retrain import joint_retrain, retrain_tickets

SINGLE_METHODS = ("single_imp", "single_imp_balanced", "single_imp_context")
METHODS = ("rtl", "dense", *SINGLE_METHODS, "multi_imp")


def check_lr_and_sparsities(lr, sparsities, *, why_above_zero: str) -> list[float]:
    """The sorted target sparsities, each in (0, 1); raises when ``lr`` is not a positive number or a sparsity is
    0 (``why_above_zero`` says why the task has no 0 target)."""
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise DataError(f"lr must be a positive number, got {lr!r}.")
    sps = validate_sparsities(sparsities)
    if sps[0] <= 0:
        raise SparsityError(f"sparsities must be > 0 ({why_above_zero}), got {sps}.")
    return sps


@dataclass(frozen=True)
class Evaluation:
    """One evaluated model: its routing, its metrics (higher is better) and extra row keys.

    ``more``: the same model scored on further test sets, ``{name: Evaluation}``; their rows go to
    ``results["rows_<name>"]`` (``rows`` holds the main test set)."""
    routing: str
    metrics: Mapping[str, float]
    extras: Mapping[str, object] = field(default_factory=dict)
    more: Mapping[str, "Evaluation"] = field(default_factory=dict)
    params: int | None = None            # weights the model stores, when not the protocol's count (e.g. dense)


@dataclass
class SingleImpSetup:
    """A single-mask baseline: its one-ticket model at θ0 and the data it sees.

    ``loader`` is cycled: ``search_batches`` batches per pruning round and ``retrain_batches`` per
    retraining epoch (equal sample presentations with RTL)."""
    routed: object
    loader: object
    search_batches: int
    retrain_batches: int
    train_step: Callable | None = None


@dataclass
class ComparisonConfig:
    """Settings the protocol itself reads; the task keeps everything else."""
    sparsities: tuple[float, ...]
    methods: tuple[str, ...] = METHODS
    schedule: str = "fraction"
    prune_fraction: float = 0.5
    prune_count: int | None = None
    scope: str = "global"
    epochs_per_round: int = 1
    retrain_epochs: int = 1
    lr: float = 1e-3
    per_ticket_state: bool = True
    retrain_mode: str = "sequential"     # RTL's retraining: K single-ticket steps per batch index, or "mixed"
    equal_storage: bool = True
    multi_imp_per_sparsity: bool = False  # multi-model IMP at each sparsity right after RTL's (shared data streams)
    device: str | torch.device | None = None
    progress: bool = False
    tickets: str = "imp"                  # RTL's tickets: "imp" (the paper) | "learned" (learn_tickets + gate)
    learned: LearnedOptions = field(default_factory=LearnedOptions)

    def validate(self) -> "ComparisonConfig":
        if self.tickets not in TICKET_SOURCES:
            raise DataError(f"tickets must be one of {TICKET_SOURCES} ('imp': the paper's IMP search; 'learned': "
                            f"learned masks with a jointly trained gate), got {self.tickets!r}.")
        if self.tickets == "learned":
            if not isinstance(self.learned, LearnedOptions):
                raise DataError("learned must be a rtl_plugin.comparison.learned.LearnedOptions, got "
                                f"{type(self.learned).__name__}.")
            self.learned.validate()
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise DataError(f"unknown comparison methods {unknown}; choose from {list(METHODS)}.")
        if "rtl" not in self.methods:
            raise DataError(f"methods must include 'rtl' (the baselines reuse its tickets), got {self.methods}.")
        if len(set(self.methods)) != len(self.methods):
            raise DataError(f"methods lists a method twice: {self.methods}; name each once.")
        if self.retrain_mode not in ("sequential", "mixed"):
            raise DataError(f"retrain_mode must be 'sequential' or 'mixed', got {self.retrain_mode!r}.")
        if not self.sparsities:
            raise DataError("sparsities is empty; give at least one target sparsity, e.g. (0.5,).")
        return self


class ComparisonTask:
    """What a task supplies to :func:`compare`. Subclass it and override the hooks its methods need.

    Required for every run: ``ticket_loaders``, ``build_routed``, ``evaluate_rtl``. Per method:
    ``dense`` -> ``train_dense``; ``single_imp*`` -> ``single_imp_setup`` + ``evaluate_single``;
    ``multi_imp`` -> ``multi_imp_output`` + ``evaluate_multi``. The rest have working defaults.
    """
    name = "task"
    train_step: Callable | None = None     # RTL's search and retraining step; None: cross-entropy on (x, y)

    # ---- required
    def ticket_loaders(self) -> dict[int, object]:
        """``{ticket: loader}``: the K subsets (RTL's search and retraining data)."""
        raise TaskHookError(self._missing("ticket_loaders"))

    def build_routed(self, num_tickets: int):
        """A RoutedModel with ``num_tickets`` tickets over the model at θ0 (the same θ0 every call)."""
        raise TaskHookError(self._missing("build_routed"))

    def evaluate_rtl(self, routed, tickets: TicketSet, sparsity: float) -> list[Evaluation]:
        """Evaluations of the retrained tickets, one per routing; the first is the primary routing."""
        raise TaskHookError(self._missing("evaluate_rtl"))

    # ---- per method
    def train_dense(self) -> Evaluation:
        """Train and evaluate the unpruned model with RTL's retraining budget."""
        raise TaskHookError(self._missing("train_dense"))

    def single_imp_setup(self, method: str) -> SingleImpSetup:
        raise TaskHookError(self._missing("single_imp_setup"))

    def evaluate_single(self, routed, method: str, tickets: TicketSet, sparsity: float) -> Evaluation:
        raise TaskHookError(self._missing("evaluate_single"))

    def multi_imp_output(self, model, k: int):
        """Output of independent model ``k`` (retrained on subset k), combined by ``evaluate_multi``."""
        raise TaskHookError(self._missing("multi_imp_output"))

    def evaluate_multi(self, outputs: list, sparsity: float) -> Evaluation | list[Evaluation]:
        raise TaskHookError(self._missing("evaluate_multi"))

    # ---- optional
    def evaluate_gate(self, routed, gate, sparsity: float) -> Evaluation:
        """``tickets="learned"``: the routed model with the jointly trained gate's routing."""
        raise TaskHookError(self._missing("evaluate_gate"))

    def classifier_names(self, routed) -> list[str]:
        """``tickets="learned"``: modules trained beside a frozen backbone's scores (e.g. a new classifier)."""
        return []

    def search_options(self, routed) -> dict:
        """Extra RTLPruner arguments for RTL's search (e.g. ``order``, ``callbacks``)."""
        return {}

    def after_search(self, routed, search) -> None:
        """Called once RTL's tickets are found (e.g. fit routers, save the collapse sweep)."""

    def after_single_search(self, method: str, result) -> None:
        """Called once a single-mask baseline's IMP search is done."""

    def mixed_retrain_loader(self):
        """``retrain_mode="mixed"``: a loader of ``(x, y, route)`` over all subsets (shuffled batches, each sample
        routed to its subset's ticket), as many batches per epoch as the task's budget gives RTL."""
        raise TaskHookError(self._missing("mixed_retrain_loader"))

    def retrain_loaders(self, sparsity: float) -> dict[int, object]:
        """``{ticket: loader}`` RTL's tickets (and multi-model IMP) retrain on at ``sparsity``; default: the
        search subsets."""
        return self.ticket_loaders()

    def multi_imp_loader(self, k: int):
        """Data of independent model ``k``; default: RTL's subset k."""
        return self.ticket_loaders()[k]

    def similarity_extras(self, tickets: TicketSet) -> dict:
        """Extra keys of the similarity entry of one sparsity."""
        return {}

    def ticket_metadata(self, sparsity: float) -> dict | None:
        """``extra`` saved with RTL's tickets at ``sparsity`` (when compare has an out_dir); None: do not save."""
        return None

    def describe(self, results: dict) -> dict:
        """Top-level results keys: task, dataset, model, granularity, seed, config, ... (extra keys allowed);
        ``results`` holds the protocol's keys (rows, similarity, ...), for keys derived from them. The task's keys
        win over the protocol's, except rows and similarity (``wall_time_s`` entries are merged)."""
        return {"task": self.name}

    def plot(self, results: dict, out_dir: Path) -> list[str] | None:
        """Figures of the run (file names under out_dir); None: no figures."""
        return plot_classification_results(results, out_dir)

    def log(self, message: str) -> None:
        """Progress messages."""

    def _missing(self, hook: str) -> str:
        return (f"{type(self).__name__} does not implement the comparison hook {hook}(); override it, "
                f"or leave out the methods that need it.")


_HOOKS = {"rtl": ("ticket_loaders", "build_routed", "evaluate_rtl"), "dense": ("train_dense",),
          "multi_imp": ("multi_imp_output", "evaluate_multi"),
          **{m: ("single_imp_setup", "evaluate_single") for m in SINGLE_METHODS}}


def check_hooks(task: ComparisonTask, methods, *, retrain_mode: str = "sequential", tickets: str = "imp") -> None:
    """Raise :class:`TaskHookError` naming every hook that ``methods`` (and a mixed ``retrain_mode``) need and
    ``task`` lacks."""
    if not isinstance(task, ComparisonTask):
        raise TaskHookError(f"compare() needs a ComparisonTask subclass instance, got {type(task).__name__}.")
    needed = {h for m in methods for h in _HOOKS[m]} | ({"mixed_retrain_loader"} if retrain_mode == "mixed" else set())
    needed |= {"evaluate_gate"} if tickets == "learned" else set()
    missing = sorted(h for h in needed if getattr(type(task), h) is getattr(ComparisonTask, h))
    if missing:
        raise TaskHookError(f"{type(task).__name__} does not implement {missing}, needed by methods "
                            f"{list(methods)}; override them or leave out the methods that need them.")


def _row(method: str, evaluation: Evaluation, sparsity: float, params: int, matching: str, extra: dict) -> dict:
    params = params if evaluation.params is None else evaluation.params
    row = {"method": method, "routing": evaluation.routing, "sparsity": sparsity, "params": int(params),
           "matching": matching, "metrics": {k: round(float(v), 6) for k, v in evaluation.metrics.items()}}
    row.update(extra)
    row.update(evaluation.extras)
    return row


class _Run:
    """State of one comparison: config, task, RTL's model and tickets, and the rows gathered so far."""

    def __init__(self, task: ComparisonTask, config: ComparisonConfig):
        self.task, self.config = task, config
        self.rows: list[dict] = []
        self.more_rows: dict[str, list[dict]] = {}
        self.similarity: list[dict] = []
        self.wall = dict.fromkeys(("ticket_search", "single_imp", "multi_imp", "joint_retrain"), 0.0)
        self.saved: dict[float, str] = {}
        self.loaders = task.ticket_loaders()
        self.num_tickets = len(self.loaders)
        # set by search_tickets: RTL's model, θ0, its search result, prunable weights, union sparsity per target
        self.routed, self.theta0, self.search, self.num_weights, self.union_sparsities = None, None, None, 0, {}

    def add_row(self, method: str, evaluation: Evaluation, sparsity: float, params: int,
                matching: str = "equal_cost", **extra) -> dict:
        for name, other in evaluation.more.items():
            self.more_rows.setdefault(name, []).append(_row(method, other, sparsity, params, matching, extra))
        row = _row(method, evaluation, sparsity, params, matching, extra)
        self.rows.append(row)
        return row

    def optimizer(self, routed) -> torch.optim.Optimizer:
        """The search optimizer's template (its configuration is cloned per ticket and round)."""
        return torch.optim.Adam([p for p in routed.parameters() if p.requires_grad], lr=self.config.lr)

    def pruner(self, routed, targets, **options) -> RTLPruner:
        c = self.config
        return RTLPruner(routed, sparsities=targets, schedule=c.schedule, prune_fraction=c.prune_fraction,
                         prune_count=c.prune_count, progress=c.progress, scope=c.scope, **options)

    def tick(self, key: str, since: float) -> None:
        self.wall[key] = self.wall.get(key, 0.0) + time.perf_counter() - since


def search_tickets(run: _Run) -> None:
    """θ0 and RTL's per-ticket IMP search."""
    c, task = run.config, run.task
    run.routed = task.build_routed(run.num_tickets)
    run.theta0 = copy.deepcopy(run.routed.model.state_dict())
    run.num_weights = run.routed.space.num_weights
    if c.tickets == "learned":
        return _search_learned(run)
    pruner = run.pruner(run.routed, c.sparsities, **task.search_options(run.routed))
    t = time.perf_counter()
    run.search = pruner.find_tickets(run.loaders, train_step=task.train_step, epochs_per_round=c.epochs_per_round,
                                     optimizer=run.optimizer(run.routed), device=c.device)
    run.tick("ticket_search", t)
    task.after_search(run.routed, run.search)
    run.union_sparsities = {s: round(1 - run.search.tickets_at[s].union_count() / run.num_weights, 6)
                            for s in c.sparsities}


def _search_learned(run: _Run) -> None:
    c, task = run.config, run.task
    t = time.perf_counter()
    run.search = search_learned(run.routed, run.theta0, run.loaders, c.sparsities, c.learned, lr=c.lr,
                                trainable=task.classifier_names(run.routed), device=c.device)
    run.tick("ticket_search", t)
    task.after_search(run.routed, run.search)
    run.union_sparsities = {s: round(1 - run.search.tickets_at[s].union_count() / run.num_weights, 6)
                            for s in c.sparsities}


def _rtl_evaluations(run: _Run, tickets: TicketSet, s: float) -> list[Evaluation]:
    """The task's RTL rows; learned tickets add the gate's row (label-free: only it, as the tickets are not the
    task's subsets)."""
    if run.config.tickets != "learned":
        return run.task.evaluate_rtl(run.routed, tickets, s)
    gate_row = run.task.evaluate_gate(run.routed, run.search.gates[s], s)
    if run.config.learned.routing == "gate":
        return [gate_row]
    return [*run.task.evaluate_rtl(run.routed, tickets, s), gate_row]


def ticket_similarity(tickets: TicketSet, sparsity: float) -> dict:
    """Mean pairwise Jaccard of the tickets and its chance level (independent random masks), with counts."""
    return {"sparsity": sparsity, "mean_jaccard": round(mean_offdiagonal(tickets.jaccard()), 6),
            "chance": round(mean_offdiagonal(chance_matrix(tickets)), 6), "union": tickets.union_count(),
            "intersection": tickets.intersection_count()}


def run_rtl(run: _Run, out_dir: Path | None) -> None:
    """Per target sparsity: rewind to θ0, retrain the K tickets jointly, evaluate, record similarity."""
    c, task, routed = run.config, run.task, run.routed
    for s in c.sparsities:
        tickets = run.search.tickets_at[s]
        if c.tickets == "learned":
            restore_learned(routed, run.search, s)  # evaluated as learned: no IMP-style joint retraining
        else:
            if c.retrain_mode == "mixed":
                data, extra = task.mixed_retrain_loader(), {}
            else:
                data, extra = task.retrain_loaders(s), {"per_ticket_state": c.per_ticket_state}
            run.wall["joint_retrain"] += retrain_tickets(
                routed, run.theta0, tickets, data, lr=c.lr, epochs=c.retrain_epochs, retrain_mode=c.retrain_mode,
                train_step=task.train_step, device=c.device, progress=c.progress, **extra)
        run.similarity.append({**ticket_similarity(tickets, s), **task.similarity_extras(tickets)})
        union = tickets.union_count()
        per_ticket = [int(v) for v in tickets.kept()]
        for evaluation in _rtl_evaluations(run, tickets, s):
            run.add_row("rtl", evaluation, s, union, per_ticket_params=per_ticket)
        metadata = task.ticket_metadata(s)
        if out_dir is not None and metadata is not None:
            folder = out_dir / "tickets" / f"sparsity_{int(round(s * 100)):02d}"
            routed.save(folder, extra=metadata)
            if c.tickets == "learned":
                save_gate(run.search.gates[s], folder)
            run.saved[s] = folder.relative_to(out_dir).as_posix()  # relative: the run folder can be moved
        routed.train()
        if c.multi_imp_per_sparsity and "multi_imp" in c.methods:
            run_multi_at(run, s)


def run_dense(run: _Run) -> None:
    t = time.perf_counter()
    run.add_row("dense", run.task.train_dense(), 0.0, run.num_weights)
    run.tick("dense", t)


def single_targets(run: _Run, method: str) -> list[float]:
    """RTL's sparsities, plus (``single_imp`` with equal_storage) the sparsities of RTL's unions."""
    targets = set(run.config.sparsities)
    if run.config.equal_storage and method == "single_imp":
        targets |= {u for u in run.union_sparsities.values() if 0 < u < 1}
    return sorted(targets)


def run_single(run: _Run, method: str) -> None:
    """One mask found by IMP over all data; rows at equal cost and (single_imp) at equal storage."""
    c, task = run.config, run.task
    t = time.perf_counter()
    setup = task.single_imp_setup(method)
    targets = single_targets(run, method)
    theta = copy.deepcopy(setup.routed.model.state_dict())
    result = run.pruner(setup.routed, targets).find_tickets(
        {0: CyclicLoader(setup.loader, setup.search_batches)}, train_step=setup.train_step,
        epochs_per_round=c.epochs_per_round, optimizer=run.optimizer(setup.routed), device=c.device)
    task.after_single_search(method, result)
    for s1 in targets:
        tickets = result.tickets_at[s1]
        retrain_tickets(setup.routed, theta, tickets, {0: CyclicLoader(setup.loader, setup.retrain_batches)},
                        lr=c.lr, epochs=c.retrain_epochs, train_step=setup.train_step, device=c.device,
                        progress=c.progress)
        evaluation = task.evaluate_single(setup.routed, method, tickets, s1)
        kept = int(tickets.kept()[0])
        if s1 in c.sparsities:
            run.add_row(method, evaluation, s1, kept)
        for s, union_sparsity in run.union_sparsities.items():
            if c.equal_storage and method == "single_imp" and abs(union_sparsity - s1) < 1e-9:
                run.add_row(method, evaluation, s, kept, matching="equal_storage", single_sparsity=s1)
        setup.routed.train()
    run.tick(method, t)
    task.log(f"{method}: done in {time.perf_counter() - t:.1f}s")


def single_ticket(space, tickets: TicketSet, k: int) -> TicketSet:
    """Ticket ``k`` of ``tickets`` as a one-ticket set over ``space``."""
    return TicketSet(space, {n: m[k:k + 1].clone() for n, m in tickets.masks.items()})


def run_multi_at(run: _Run, s: float) -> None:
    """K independent one-ticket models with RTL's masks at sparsity ``s``, each retrained alone on its subset."""
    c, task = run.config, run.task
    t = time.perf_counter()
    tickets = run.search.tickets_at[s]
    outputs = []
    for k in range(run.num_tickets):
        model = task.build_routed(1)
        model.set_tickets(single_ticket(model.space, tickets, k))
        joint_retrain(model, {0: task.multi_imp_loader(k)}, optimizer=torch.optim.Adam(model.parameters(), lr=c.lr),
                      epochs=c.retrain_epochs, train_step=task.train_step, device=c.device, progress=False)
        model.eval()
        outputs.append(task.multi_imp_output(model, k))
    evaluations = task.evaluate_multi(outputs, s)
    for evaluation in evaluations if isinstance(evaluations, (list, tuple)) else [evaluations]:
        run.add_row("multi_imp", evaluation, s, int(tickets.kept().sum()))
    run.tick("multi_imp", t)


def run_multi(run: _Run) -> None:
    """Multi-model IMP at every sparsity (its masks are RTL's search: the search time counts for it too)."""
    t = time.perf_counter()
    if not run.config.multi_imp_per_sparsity:
        for s in run.config.sparsities:
            run_multi_at(run, s)
    run.wall["multi_imp"] += run.wall["ticket_search"]
    run.task.log(f"multi_imp: done in {time.perf_counter() - t:.1f}s")


def compare(task: ComparisonTask, config: ComparisonConfig, out_dir: str | Path | None = None) -> dict:
    """Run RTL and the baselines of ``config.methods`` on ``task``; return (and with ``out_dir`` write) results.

    The results follow the stable schema: task, dataset, model, granularity, num_tickets, seed, device,
    prunable_weights, rows, similarity, wall_time_s, config (from ``task.describe()``), tickets."""
    config.validate()
    check_hooks(task, config.methods, retrain_mode=config.retrain_mode, tickets=config.tickets)
    run = _Run(task, config)
    search_tickets(run)
    for method in config.methods:
        if method == "rtl":
            run_rtl(run, None if out_dir is None else Path(out_dir))
        elif method == "dense":
            run_dense(run)
        elif method == "multi_imp":
            run_multi(run)
        else:
            run_single(run, method)
    results = {"num_tickets": run.num_tickets, "device": str(config.device or "cpu"),
               "prunable_weights": run.num_weights, "rows": run.rows, "similarity": run.similarity,
               **{f"rows_{name}": rows for name, rows in run.more_rows.items()},
               "wall_time_s": {k: round(v, 3) for k, v in run.wall.items()}}
    if run.saved:
        results["tickets"] = run.saved
    if config.tickets == "learned":
        results["learned_tickets"] = run.search.summary()
    described = task.describe(results)
    wall = {**described.get("wall_time_s", {}), **results["wall_time_s"]}
    results = {**results, **described, "rows": run.rows, "similarity": run.similarity, "wall_time_s": wall}
    if out_dir is not None:
        write_results(task, results, Path(out_dir))
    return results


def write_results(task: ComparisonTask, results: dict, out_dir: Path) -> None:
    """``out_dir/results.json`` and the task's figures (skipped, with a message, when matplotlib is missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", results)
    try:
        figures = task.plot(results, out_dir)
    except ImportError as e:  # matplotlib missing: results stay valid without figures
        task.log(f"figures skipped ({e}); pip install 'rtl-plugin[plots]'")
        return
    if figures is not None:
        results["figures"] = figures
        atomic_write_json(out_dir / "results.json", results)


__all__ = ["check_lr_and_sparsities", "ComparisonConfig", "ComparisonTask", "Evaluation", "SingleImpSetup", "TaskHookError", "compare",
           "single_ticket", "ticket_similarity", "METHODS", "SINGLE_METHODS"]
