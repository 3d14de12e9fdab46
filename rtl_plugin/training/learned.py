"""Learned tickets trained jointly with a gate (an extension described in secondary write-ups, not the paper's
method, which finds tickets by iterative magnitude pruning and fits a router afterwards).

:func:`learn_tickets` starts from a (pretrained) RoutedModel and learns one real-valued score per mask entry and
ticket (:class:`~rtl_plugin.pruning.learned.TicketScores`). Every step runs forward -> routing -> the selected
ticket -> loss; the straight-through estimator (:class:`~rtl_plugin.pruning.straight_through.StraightThrough`)
carries the loss gradient to the active tickets' scores, and the optimizer updates the scores and the gate. Every
``binarize_every`` steps the scores are binarised into the routed model's masks, each ticket exactly at the
scheduled sparsity, which anneals (cubically) from ``initial_sparsity`` to ``sparsity``; a last binarisation at the
final sparsity ends training. The backbone is frozen (default: bit-identical weights) or co-trained.

Routing while training:

* ``routing="groups"``: batches are ``(x, y, group)``; sample i trains ticket ``group[i]`` (groups from classes or
  known contexts) and the gate, if given, learns the groups with cross-entropy (weight ``gate_weight``) beside the
  task loss. ``groups="kmeans"`` (batches ``(x, y)``) takes the groups from K k-means clusters of the pretrained
  backbone's features instead (:class:`~rtl_plugin.routing.feature_clusters.FeatureClusters`, fitted on all of
  ``data`` before training; a fitted ``FeatureClusters`` may be passed too): every input joins its nearest cluster.
* ``routing="gate"`` (label-free): batches are ``(x, y)`` (a third element, if present, is used only to report
  the matched routing accuracy); the gate routes every sample (hard argmax, straight-through factor; ``gumbel=True``
  adds Gumbel noise, which routed less reliably on the tests' toy task), the task loss reaches the gate through
  the chosen ticket, plus ``balance_weight`` x the load-balancing term and
  ``entropy_weight`` x the routing entropy.

The result's masks are an ordinary :class:`~rtl_plugin.tickets.TicketSet` set on the routed model: diagnostics,
``export_ticket``, packages and ``save`` / ``load`` work on them unchanged.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from rtl_plugin.errors import DataError, RouteError, SparsityError, TicketError
from rtl_plugin.pruning.learned import INITS, SCOPES, TicketScores, sparsity_schedule
from rtl_plugin.pruning.straight_through import StraightThrough
from rtl_plugin.routed import RoutedModel
from rtl_plugin.routing.feature_clusters import FeatureClusters
from rtl_plugin.routing.gate import Gate, load_balance_loss, matched_accuracy, routing_entropy, straight_through_route
from rtl_plugin.tickets import TicketSet

__all__ = ["learn_tickets", "LearnedTickets", "Binarisation", "recalibrate_norms", "ROUTINGS", "BACKBONES",
           "NORM_STATS"]

ROUTINGS = ("groups", "gate")
BACKBONES = ("frozen", "train")
NORM_STATS = ("ticket", "frozen")


@dataclass
class Binarisation:
    """One binarisation: the step before which it ran, its target and each ticket's resulting sparsity."""
    step: int
    target: float
    sparsity: list[float]


@dataclass
class LearnedTickets:
    """What :func:`learn_tickets` returns (the masks are also set on the routed model).

    ``gate_accuracy``: routing accuracy over the last epoch of training batches (``routing="groups"``: against the
    groups; ``"gate"``: matched accuracy against the batches' third element, None without it).
    ``route_counts``: samples routed to each ticket over that epoch.
    """
    tickets: TicketSet
    scores: TicketScores
    gate: Gate | None
    history: list[Binarisation]
    losses: list[float]
    gate_accuracy: float | None
    route_counts: list[int]
    steps: int
    wall_time_s: float
    config: dict = field(default_factory=dict)
    groups: FeatureClusters | None = None  # the k-means groups used (groups="kmeans" or a FeatureClusters)

    def to_dict(self) -> dict:
        """JSON-ready summary (no tensors)."""
        return {"history": [asdict(b) for b in self.history], "losses": list(self.losses),
                "gate_accuracy": self.gate_accuracy, "route_counts": list(self.route_counts), "steps": self.steps,
                "wall_time_s": self.wall_time_s, "sparsity": [float(s) for s in self.tickets.sparsity()],
                "config": dict(self.config),
                "group_sizes": None if self.groups is None else self.groups.partition.sizes()}


# --------------------------------------------------------------------------- validation


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive(v, what: str, *, zero: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) and not math.isinf(v)
    if not ok or v < 0 or (v == 0 and not zero):
        raise DataError(f"{what} must be a {'non-negative' if zero else 'positive'} number, got {v!r}.")
    return float(v)


def _choice(v, options: tuple, what: str, meaning: str) -> str:
    if v not in options:
        raise DataError(f"{what} must be one of {options} ({meaning}), got {v!r}.")
    return v


def _total_steps(data, steps, epochs) -> int:
    if steps is not None:
        if not _is_int(steps) or steps < 1:
            raise DataError(f"steps must be a positive int, got {steps!r}.")
        return steps
    if not _is_int(epochs) or epochs < 1:
        raise DataError(f"epochs must be a positive int, got {epochs!r}.")
    try:
        n = len(data)
    except TypeError:
        raise DataError("data has no len(); pass steps=N (optimizer steps) instead of epochs.") from None
    if n < 1:
        raise DataError("data is empty; pass an iterable of (x, y[, group]) batches.")
    return epochs * n


def _unpack(batch, routing: str, device, groups: FeatureClusters | None = None):
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3) or not isinstance(batch[0], torch.Tensor):
        raise DataError("each batch must be (x, y) or (x, y, group) with x a tensor [B, ...]; got "
                        f"{type(batch).__name__} of length {len(batch) if isinstance(batch, (tuple, list)) else '?'}.")
    x, y = batch[0].to(device), batch[1]
    y = y.to(device) if isinstance(y, torch.Tensor) else y
    g = groups(x) if groups is not None else batch[2] if len(batch) == 3 else None
    if g is not None:
        g = torch.as_tensor(g)
        if g.is_floating_point() or g.dim() != 1 or g.shape[0] != x.shape[0]:
            raise DataError(f"the batch's group ids must be an integer tensor [{x.shape[0]}], got "
                            f"{g.dtype} {tuple(g.shape)}.")
        g = g.long().to(device)
    elif routing == "groups":
        raise DataError("routing='groups' needs batches (x, y, group) with each sample's ticket id, or "
                        "groups='kmeans'; use routing='gate' for label-free training.")
    return x, y, g


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _frozen(routed: RoutedModel, backbone: str, trainable: list[nn.Parameter]):
    """Frozen backbone: every routed parameter except ``trainable`` stops requiring gradients (restored after)."""
    saved = [(p, p.requires_grad) for p in routed.parameters()]
    keep = {id(p) for p in trainable}
    try:
        if backbone == "frozen":
            for p, _ in saved:
                if id(p) not in keep:
                    p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _trainable_params(routed: RoutedModel, names: Sequence[str]) -> list[nn.Parameter]:
    if isinstance(names, str):
        names = [names]
    out = []
    for n in names:
        try:
            out.extend(routed.model.get_submodule(n).parameters())
        except AttributeError:
            raise DataError(f"trainable: {n!r} is not a module of the wrapped model; pass names from "
                            "routed.model.named_modules() (e.g. the classifier head).") from None
    return out


def _scale_output(out, factor: torch.Tensor):
    if not isinstance(out, torch.Tensor):
        raise RouteError("routing='gate' scales the routed output by the gate's straight-through factor and needs "
                         "a model returning one tensor; wrap the model to return the tensor the loss uses.")
    return out * factor.view((-1,) + (1,) * (out.dim() - 1)).to(out.dtype)


@torch.no_grad()
def recalibrate_norms(routed: RoutedModel, batches: Iterable, route_fn: Callable) -> list[int]:
    """Recompute every ticket's batch-norm running statistics as the average over ``batches`` (train-mode forwards
    without gradients, weights untouched). ``route_fn(batch) -> (x, route [B])``. Each ticket's samples are
    gathered and run in batches of the largest input batch (a single trailing sample joins the previous chunk, so
    1-D norms always see two); a ticket with fewer than two samples keeps its previous statistics. Returns the
    samples used per ticket."""
    if not isinstance(routed, RoutedModel):
        raise TicketError(f"recalibrate_norms needs a RoutedModel, got {type(routed).__name__}.")
    per_ticket: dict[int, list[torch.Tensor]] = {}
    size = 1
    for batch in batches:
        x, route = route_fn(batch)
        route = torch.as_tensor(route).reshape(-1).to(x.device)
        size = max(size, x.shape[0])
        for t in route.unique().tolist():
            per_ticket.setdefault(int(t), []).append(x[route == t])
    bns = [m for m in routed.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    was = routed.training
    seen = [0] * routed.num_tickets
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        routed.train()
        for t, parts in sorted(per_ticket.items()):
            xs = torch.cat(parts)
            if xs.shape[0] < 2:
                continue
            bounds = list(range(0, xs.shape[0], size)) + [xs.shape[0]]
            if bounds[-1] - bounds[-2] == 1:
                bounds.pop(-2)
            for a, b in zip(bounds, bounds[1:]):
                routed(xs[a:b], route=t)
            seen[t] = int(xs.shape[0])
    finally:
        for m, (mom, mean, var, count) in zip(bns, saved):
            m.momentum = mom
            if m.running_mean.dim() == 2:  # per-ticket statistics: restore the tickets that saw nothing
                for t in [t for t in range(routed.num_tickets) if seen[t] == 0]:
                    m.running_mean[t], m.running_var[t], m.num_batches_tracked[t] = mean[t], var[t], count[t]
            elif sum(seen) == 0:
                m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(count)
        routed.train(was)
    return seen


# --------------------------------------------------------------------------- the loop


@dataclass
class _Config:
    sparsity: float
    steps: int
    routing: str
    binarize_every: int
    initial_sparsity: float
    anneal_fraction: float
    scope: str
    backbone: str
    lr: float
    gate_lr: float
    backbone_lr: float
    gate_weight: float
    balance_weight: float
    entropy_weight: float
    tau: float
    gumbel: bool
    norm_stats: str
    recalibrate_batches: int
    seed: int


class _Trainer:
    """One learned-ticket run: the scores, the gate, the optimizer and the binarisation schedule."""

    def __init__(self, routed: RoutedModel, data, cfg: _Config, scores: TicketScores, gate: Gate | None,
                 trainable: list[nn.Parameter], loss_fn: Callable, device, groups: FeatureClusters | None = None):
        self.routed, self.data, self.cfg, self.scores, self.gate = routed, data, cfg, scores, gate
        self.groups = groups
        self.loss_fn, self.device = loss_fn, device
        points = list(range(0, cfg.steps, cfg.binarize_every))
        self.schedule = dict(zip(points + [cfg.steps],
                                 sparsity_schedule(cfg.sparsity, len(points) + 1, initial=cfg.initial_sparsity,
                                                   anneal_fraction=cfg.anneal_fraction)))
        groups = [{"params": list(scores.parameters()), "lr": cfg.lr}]
        if gate is not None:
            groups.append({"params": list(gate.parameters()), "lr": cfg.gate_lr})
        extra = list(routed.parameters()) if cfg.backbone == "train" else trainable
        if extra:
            groups.append({"params": extra, "lr": cfg.backbone_lr})
        self.opt = torch.optim.Adam(groups)
        self.trainable = trainable
        # a batch norm in train mode needs two values per channel: 1-D norms always, 2-D ones on 1 x 1 maps
        # (a ResNet's last stage at a small input size)
        self.needs_pairs = cfg.norm_stats == "ticket" and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in routed.model.modules())
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.history: list[Binarisation] = []
        self.losses: list[float] = []
        self.window: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        try:
            self.window_len = max(1, len(data))
        except TypeError:
            self.window_len = min(cfg.steps, 50)

    def binarise(self, step: int) -> None:
        target = self.schedule[step]
        tickets = self.scores.binarize(target, scope=self.cfg.scope)
        self.routed.set_tickets(tickets)
        self.history.append(Binarisation(step=step, target=target, sparsity=[float(s) for s in tickets.sparsity()]))

    def _route(self, x: torch.Tensor, g: torch.Tensor | None):
        """(ids, factor or None, extra loss) for one batch."""
        cfg = self.cfg
        if cfg.routing == "groups":
            if self.gate is None:
                return g, None, 0.0
            logits = self.gate.logits(x)
            return g, None, cfg.gate_weight * F.cross_entropy(logits, g)
        logits = self.gate.logits(x)
        ids, factor = straight_through_route(logits, tau=cfg.tau, gumbel=cfg.gumbel, generator=self.generator)
        probs = logits.softmax(1)
        extra = cfg.balance_weight * load_balance_loss(probs, ids) + cfg.entropy_weight * routing_entropy(probs)
        return ids, factor, extra

    def step(self, ste: StraightThrough, batch) -> None:
        x, y, g = _unpack(batch, self.cfg.routing, self.device, self.groups)
        ids, factor, extra = self._route(x, g)
        keep = self._trainable_samples(ids)
        if keep is not None and not bool(keep.any()):
            self.losses.append(float("nan"))  # every sample alone on its ticket: nothing a norm can train on
            return
        sel = (lambda v: v) if keep is None else (lambda v: v[keep] if isinstance(v, torch.Tensor) else v)
        out = ste(sel(x), route=sel(ids))
        if factor is not None:
            out = _scale_output(out, sel(factor))
        task = self.loss_fn(out, sel(y))
        if not isinstance(task, torch.Tensor) or task.dim() != 0:
            raise DataError("loss_fn(output, y) must return a scalar tensor.")
        self.opt.zero_grad(set_to_none=True)
        (task + extra).backward()
        self.opt.step()
        self.losses.append(float(task.detach()))
        pred = ids if self.gate is None else self.gate_pred(x)
        self.window.append((pred.detach().cpu(), None if g is None else g.cpu()))
        self.window = self.window[-self.window_len:]

    def _trainable_samples(self, ids: torch.Tensor) -> torch.Tensor | None:
        """With batch norms in train mode a ticket's bucket needs two samples: samples alone on their ticket
        in this batch are left out of the task loss (None: keep all)."""
        if not self.needs_pairs:
            return None
        counts = torch.bincount(ids, minlength=self.routed.num_tickets)
        keep = counts[ids] > 1
        return None if bool(keep.all()) else keep

    @torch.no_grad()
    def gate_pred(self, x: torch.Tensor) -> torch.Tensor:
        was = self.gate.training
        self.gate.eval()
        try:
            return self.gate(x)
        finally:
            self.gate.train(was)

    def run(self) -> None:
        cfg = self.cfg
        self.routed.train(cfg.norm_stats == "ticket")
        if self.gate is not None:
            self.gate.train()
        batches = itertools.chain.from_iterable(itertools.repeat(self.data))
        with StraightThrough(self.routed, self.scores) as ste:
            for step in range(cfg.steps):
                if step in self.schedule:
                    self.binarise(step)
                self.step(ste, next(batches))
        self.binarise(cfg.steps)
        if self.gate is not None:
            self.gate.eval()
        if cfg.norm_stats == "ticket" and cfg.recalibrate_batches:
            recalibrate_norms(self.routed, itertools.islice(itertools.cycle(self.data), cfg.recalibrate_batches),
                              self._recalibration_route)

    def _recalibration_route(self, batch):
        x, _, g = _unpack(batch, self.cfg.routing, self.device, self.groups)
        return x, (g if self.cfg.routing == "groups" else self.gate(x))

    def routing_report(self) -> tuple[float | None, list[int]]:
        K = self.routed.num_tickets
        pred = torch.cat([p for p, _ in self.window])
        counts = torch.bincount(pred, minlength=K).tolist()
        if any(g is None for _, g in self.window) or (self.gate is None and self.cfg.routing == "groups"):
            return None, counts
        true = torch.cat([g for _, g in self.window])
        if self.cfg.routing == "groups":
            return float((pred == true).double().mean()), counts
        return matched_accuracy(pred, true, K)[0], counts


def _check_gate(routed: RoutedModel, gate, routing: str) -> Gate | None:
    if gate is None:
        if routing == "gate":
            raise RouteError("routing='gate' (label-free) needs gate=Gate(K); the gate picks every sample's ticket.")
        return None
    if not isinstance(gate, Gate):
        raise RouteError(f"gate must be a rtl_plugin.routing.Gate (one linear layer + softmax), got "
                         f"{type(gate).__name__}.")
    if gate.num_tickets != routed.num_tickets:
        raise RouteError(f"the gate routes {gate.num_tickets} tickets, the model {routed.num_tickets}; build "
                         f"Gate({routed.num_tickets}).")
    return gate


def _check_groups(routed: RoutedModel, groups, routing: str, data, seed: int) -> FeatureClusters | None:
    """None, or the FeatureClusters giving every input its group (``"kmeans"``: fitted here on all of ``data``
    with a dense copy of the routed model's current weights)."""
    if groups is None:
        return None
    if routing != "groups":
        raise RouteError("groups= gives the tickets' training groups and needs routing='groups'; label-free "
                         "routing='gate' lets the gate choose.")
    if isinstance(groups, str):
        if groups != "kmeans":
            raise DataError(f"groups must be None, 'kmeans' or a FeatureClusters, got {groups!r}.")
        x = torch.cat([_unpack(b, "gate", torch.device("cpu"))[0] for b in data])
        return FeatureClusters.fit(routed.plain_copy(0), x, routed.num_tickets, seed=seed)
    if not isinstance(groups, FeatureClusters):
        raise DataError(f"groups must be None, 'kmeans' or a rtl_plugin.routing.FeatureClusters, got "
                        f"{type(groups).__name__}.")
    if groups.num_groups != routed.num_tickets:
        raise RouteError(f"the FeatureClusters have {groups.num_groups} groups, the model {routed.num_tickets} "
                         f"tickets; fit FeatureClusters with num_groups={routed.num_tickets}.")
    return groups


def _initial_scores(routed: RoutedModel, scores, init: str, seed: int) -> TicketScores:
    if scores is None:
        _choice(init, INITS, "init", "'magnitude': the first masks are global magnitude pruning; 'random'")
        if init == "magnitude":
            return TicketScores.from_magnitude(routed)
        return TicketScores.random(routed.space, routed.num_tickets, seed=seed)
    if not isinstance(scores, TicketScores):
        raise TicketError(f"scores must be TicketScores (e.g. a previous run's result.scores), got "
                          f"{type(scores).__name__}.")
    if scores.space.to_dict() != routed.space.to_dict() or scores.num_tickets != routed.num_tickets:
        raise TicketError("the scores belong to another ticket space or K; build them from this routed model.")
    return scores


def learn_tickets(routed: RoutedModel, data, *, sparsity: float, steps: int | None = None, epochs: int = 1,
                  routing: str = "groups", groups=None, gate: Gate | None = None, scores: TicketScores | None = None,
                  init: str = "magnitude", binarize_every: int = 20, initial_sparsity: float = 0.0,
                  anneal_fraction: float = 0.5, scope: str = "global", backbone: str = "frozen",
                  trainable: Sequence[str] = (), lr: float = 1e-2, gate_lr: float = 1e-2, backbone_lr: float = 1e-4,
                  gate_weight: float = 1.0, balance_weight: float = 0.01, entropy_weight: float = 0.0,
                  tau: float = 1.0, gumbel: bool = False, loss_fn: Callable | None = None, norm_stats: str = "ticket",
                  recalibrate_batches: int = 20, seed: int = 0, device=None) -> LearnedTickets:
    """Learn K tickets' masks (and a gate) on a frozen or co-trained backbone; see the module docstring.

    Args:
        routed: the RoutedModel (``rtl.wrap(pretrained, K)``); its masks are replaced.
        data: re-iterable batches ``(x, y, group)`` (``routing="groups"``) or ``(x, y)`` (``"gate"``).
        sparsity: final weight sparsity of every ticket. steps / epochs: optimizer steps (default one epoch).
        groups: ``routing="groups"`` only: None (batches carry the group ids), "kmeans" (K clusters of the
            backbone's features) or a :class:`~rtl_plugin.routing.feature_clusters.FeatureClusters`.
        gate: a :class:`~rtl_plugin.routing.gate.Gate` trained jointly (required for ``routing="gate"``).
        scores / init: starting scores, or "magnitude" (default) / "random" ones.
        binarize_every, initial_sparsity, anneal_fraction: binarisation period (steps) and the cubic schedule.
        scope: "global" (one ranking over all layers) or "layer" (each layer at the sparsity); weight mode.
        backbone: "frozen" (only scores, gate and ``trainable`` modules learn) or "train" (co-trained, ``backbone_lr``).
        trainable: module names trained even with a frozen backbone (e.g. a new classifier head).
        lr, gate_lr, backbone_lr: Adam learning rates. gate_weight, balance_weight, entropy_weight, tau, gumbel:
            the gate's loss terms and straight-through Gumbel routing (see :mod:`rtl_plugin.routing.gate`).
        loss_fn: ``(output, y) -> scalar`` (default cross-entropy).
        norm_stats: "ticket" (train-mode norms: per-ticket statistics adapt, then ``recalibrate_batches`` batches
            re-estimate them exactly) or "frozen" (eval mode throughout: statistics untouched, no dropout).
        seed: Gumbel noise and every random op of the run (the global RNG is restored afterwards).
    Returns:
        :class:`LearnedTickets`; ``routed.tickets`` holds the final masks.
    """
    if not isinstance(routed, RoutedModel):
        raise TicketError(f"learn_tickets needs a RoutedModel (rtl.wrap(model, K)), got {type(routed).__name__}.")
    if not _is_int(seed) or seed < 0:
        raise DataError(f"seed must be a non-negative int, got {seed!r}.")
    if not _is_int(binarize_every) or binarize_every < 1:
        raise SparsityError(f"binarize_every must be a positive int (steps between binarisations), got {binarize_every!r}.")
    if not _is_int(recalibrate_batches) or recalibrate_batches < 0:
        raise DataError(f"recalibrate_batches must be an int >= 0, got {recalibrate_batches!r}.")
    cfg = _Config(
        sparsity=float(sparsity) if isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) else sparsity,
        steps=_total_steps(data, steps, epochs),
        routing=_choice(routing, ROUTINGS, "routing", "'groups': batches carry ticket ids; 'gate': label-free"),
        binarize_every=binarize_every, initial_sparsity=initial_sparsity, anneal_fraction=anneal_fraction,
        scope=_choice(scope, SCOPES, "scope", "one ranking over all layers, or every layer at the sparsity"),
        backbone=_choice(backbone, BACKBONES, "backbone", "'frozen' keeps the shared weights bit-identical"),
        lr=_positive(lr, "lr"), gate_lr=_positive(gate_lr, "gate_lr"), backbone_lr=_positive(backbone_lr, "backbone_lr"),
        gate_weight=_positive(gate_weight, "gate_weight", zero=True),
        balance_weight=_positive(balance_weight, "balance_weight", zero=True),
        entropy_weight=_positive(entropy_weight, "entropy_weight", zero=True), tau=_positive(tau, "tau"),
        gumbel=bool(gumbel), norm_stats=_choice(norm_stats, NORM_STATS, "norm_stats", "per-ticket or untouched"),
        recalibrate_batches=recalibrate_batches, seed=seed)
    sparsity_schedule(cfg.sparsity, 2, initial=cfg.initial_sparsity, anneal_fraction=cfg.anneal_fraction)  # validates
    gate = _check_gate(routed, gate, cfg.routing)
    device = next(routed.model.parameters()).device if device is None else torch.device(device)
    trainable_params = _trainable_params(routed, trainable)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        groups = _check_groups(routed, groups, cfg.routing, data, seed)
        scores = _initial_scores(routed, scores, init, seed).to(device)
        if gate is not None:
            first = next(iter(data))
            gate.build(tuple(first[0].shape[1:])).to(device)
        trainer = _Trainer(routed, data, cfg, scores, gate, trainable_params, loss_fn or F.cross_entropy, device,
                           groups)
        with _frozen(routed, cfg.backbone, trainable_params):
            trainer.run()
    acc, counts = trainer.routing_report()
    return LearnedTickets(tickets=routed.tickets, scores=scores, gate=gate, history=trainer.history,
                          losses=trainer.losses, gate_accuracy=acc, route_counts=counts, steps=cfg.steps,
                          wall_time_s=time.perf_counter() - start, config=asdict(cfg), groups=groups)
