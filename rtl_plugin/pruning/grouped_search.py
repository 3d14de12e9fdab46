"""Grouped (vectorised) ticket search: one search round of every ticket trained as ONE network.

In a round of the IMP search every ticket starts from the rewind weights θ, trains on its own subset with its
own optimizer state and its own norm statistics, and is then pruned. The tickets are independent, so
``RTLPruner(..., search_execution="grouped")`` trains them together: the trainable parameters are stacked K
times (``[K, *shape]``), one ``torch.func.vmap`` of a ``functional_call`` over a plain copy of the model runs
every ticket on its own batch with its own masked weights ``W_k * m_k`` and its own norm statistics, one
backward gives every copy its own gradient (the sum of the K losses: each copy only sees its own), and ONE
optimizer over the stacked tensors updates them. The optimizers allowed (SGD, Adam, AdamW, Adamax, RMSprop) update
entry by entry, so the stacked state is exactly the K per-ticket states side by side. After the round each ticket's
trained weights are loaded into the shared model and pruned by the sequential pruning step
(:meth:`RTLPruner.close_round`: same importance, schedule, callbacks).

Exactness. The data order per ticket is the sequential one: each ticket's loader is iterated once per epoch, the
iterators are started (and their first batch drawn) in ascending ticket order, as the sequential round order does
(a loader shuffling with the global RNG therefore matches the round order when ``epochs_per_round == 1``; with a
loader ``generator=`` or no shuffling every order matches). The arithmetic is the same except for the summation
order inside the batched kernels (vmap turns K convolutions into one grouped convolution and K matrix products
into one batched product; batch-norm statistics are reduced in another order), so the trained weights differ from
the sequential ones by rounding, which Adam amplifies for entries whose gradient is itself at rounding level (it
normalises the gradient). A mask entry differs only where such a difference reorders two weights at the pruning
threshold. Measured: float64 on CPU, masks equal (``torch.equal``) to the sequential search in every test
(``tests/pruning/test_grouped_search.py``: K = 2..4, SGD with momentum and Adam, a BatchNorm CNN and timm's
test_resnet) and on resnet18 (11.2M weights, K = 10); float32 on CPU, resnet18, K = 10, one round to 50%:
about 1 mask entry in 10^5 differs (``benchmarks/RESULTS.md`` section 10b, ``benchmarks/search_grouped.py``).
On a GPU float32 (and TF32 convolutions, PyTorch's cuDNN default) rounds differently in the two paths as well;
``benchmarks/search_grouped.py --device cuda`` counts the differing entries.

Speed. One kernel call per layer serves all K tickets, which is what a GPU needs (one ticket's batch leaves it
launch-bound). On a CPU the grouped search is slower than the sequential one (resnet18: ~2.5x; oneDNN runs the
grouped convolutions, mostly their weight gradient, slower than K plain ones), so the default stays sequential.

Scope: weight granularity (any schedule: fraction, count, tp's ratio) with the default train step (``loss_fn``
on ``(x, y)`` batches), a single process. Channel granularity, a custom ``train_step``, other optimizers and
torchrun are refused (:class:`~rtl_plugin.errors.SearchExecutionError`); use the sequential search for them.
Dropout runs with independent randomness per ticket (``vmap(randomness="different")``): such a search is a
valid search but not the sequential one's random draws. Tickets whose batches differ in shape (subsets of
different sizes) are split into separate groups when it happens, each group with its own rows of the optimizer
state, so the search stays exact, only less vectorised.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from rtl_plugin.errors import DataError, RTLError, SearchExecutionError
from rtl_plugin.norms import RoutedBatchNorm
from rtl_plugin.pruning.gradients import estimate_gradients, needs_gradients
from rtl_plugin.pruning.search_state import save_search
from rtl_plugin.training import distributed

__all__ = ["SEARCH_EXECUTIONS", "GROUPED_OPTIMIZERS", "TrainedTicket", "check_search_execution", "check_grouped_run",
           "train_round_grouped", "load_trained",
           "run_grouped_search"]

SEARCH_EXECUTIONS = ("sequential", "grouped")
# exact classes whose update is elementwise per entry: stacking K parameters stacks K independent states
GROUPED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.RMSprop)
_FIX = "use search_execution='sequential' (the default) for it"


def check_search_execution(value, granularity: str) -> str:
    """``value`` if it names a search execution this granularity supports."""
    if value not in SEARCH_EXECUTIONS:
        raise SearchExecutionError(f"search_execution must be 'sequential' (one ticket after the other) or 'grouped' "
                                   f"(all tickets of a round as one vectorised network), got {value!r}.")
    if value == "grouped" and granularity != "weight":
        raise SearchExecutionError(f"search_execution='grouped' supports weight granularity only: channel tickets "
                                   f"mask activations through routing hooks that torch.func.vmap cannot batch per "
                                   f"ticket; {_FIX}, or wrap with granularity='weight'.")
    return value


def check_grouped_run(routed, *, train_step, make_optimizer: Callable[[], torch.optim.Optimizer]) -> None:
    """Refuse a find_tickets call the grouped search cannot run (custom step, optimizer, torchrun, norms)."""
    if train_step is not None:
        raise SearchExecutionError("search_execution='grouped' runs the default train step (forward, loss_fn(out, y), "
                                   "backward, step) vectorised over tickets and cannot vectorise a custom train_step; "
                                   f"pass loss_fn= instead of train_step=, or {_FIX}.")
    if distributed.is_distributed():
        raise SearchExecutionError(f"search_execution='grouped' runs in one process; under torchrun {_FIX}.")
    opt = make_optimizer()
    if type(opt) not in GROUPED_OPTIMIZERS:
        names = ", ".join(c.__name__ for c in GROUPED_OPTIMIZERS)
        raise SearchExecutionError(f"search_execution='grouped' stacks the optimizer state of all tickets, which is "
                                   f"exact only for optimizers that update entry by entry ({names}; exact classes), "
                                   f"got {type(opt).__name__}; pass one of those or {_FIX}.")
    for name, m in routed.model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None and m.track_running_stats:
            raise SearchExecutionError(f"norm {name!r} has momentum=None (a cumulative average that reads its batch "
                                       f"count as a Python number, which vmap cannot batch); set a momentum or {_FIX}.")


@dataclass
class TrainedTicket:
    """One ticket after its grouped round: trained parameters and norm statistics (plain-model names and shapes,
    views into the group's stacked tensors) and its mean training loss."""
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    loss: float


def _routed_rows(routed) -> set[str]:
    """Names of buffers that hold one row per ticket (routed batch-norm statistics)."""
    out = set()
    for mname, m in routed.model.named_modules():
        if isinstance(m, RoutedBatchNorm) and m.track_running_stats:
            out.update(f"{mname}.{b}" if mname else b for b in ("running_mean", "running_var", "num_batches_tracked"))
    return out


def _optimizer_like(template: torch.optim.Optimizer, params_of: Callable[[dict], list]) -> torch.optim.Optimizer:
    """An optimizer of ``template``'s class and param-group hyper-parameters over ``params_of(group)``."""
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": params_of(g)} for g in template.param_groups]
    groups = [g for g in groups if g["params"]]
    try:
        accepted = set(inspect.signature(type(template).__init__).parameters)
    except (TypeError, ValueError):
        accepted = set()
    return type(template)(groups, **{k: v for k, v in template.defaults.items() if k in accepted})


class _Group:
    """Tickets trained as one vectorised network: stacked parameters ``[n, *shape]`` (autograd leaves), stacked
    norm statistics, stacked float masks and one optimizer over the stacked parameters."""

    def __init__(self, tickets: list[int], params: dict, buffers: dict, masks: dict, optimizer):
        self.tickets, self.params, self.buffers, self.masks, self.optimizer = tickets, params, buffers, masks, optimizer

    @classmethod
    def start(cls, routed, tickets: list[int], template_optimizer: torch.optim.Optimizer) -> "_Group":
        """Every ticket at the shared model's current weights (θ), with its own row of norm statistics."""
        n = len(tickets)
        idx = torch.as_tensor(tickets, dtype=torch.long)
        params, by_id = {}, {}
        for name, p in routed.model.named_parameters():
            if p.requires_grad:
                params[name] = p.detach().unsqueeze(0).repeat(n, *[1] * p.dim()).requires_grad_()
                by_id[id(p)] = params[name]
        rows = _routed_rows(routed)
        buffers = {name: (b.index_select(0, idx.to(b.device)) if name in rows else
                          b.detach().unsqueeze(0).repeat(n, *[1] * b.dim()))
                   for name, b in routed.model.named_buffers()}
        weights = routed.prunable_weights()
        masks = {f"{layer}.weight": m.index_select(0, idx.to(m.device)).to(weights[layer].dtype)
                 for layer, m in routed.tickets.masks.items()}
        opt = _optimizer_like(template_optimizer, lambda g: [by_id[id(p)] for p in g["params"] if id(p) in by_id])
        return cls(list(tickets), params, buffers, masks, opt)

    def split(self, rows: list[int]) -> "_Group":
        """A group of the tickets at ``rows`` carrying their parameters, statistics and optimizer state."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=next(iter(self.params.values())).device)
        new = {n: p.detach().index_select(0, idx).requires_grad_() for n, p in self.params.items()}
        old_to_new = {id(p): new[n] for n, p in self.params.items()}
        opt = _optimizer_like(self.optimizer, lambda g: [old_to_new[id(p)] for p in g["params"]])
        for n, p in self.params.items():
            st = self.optimizer.state.get(p)
            if st:
                opt.state[new[n]] = {k: (v.index_select(0, idx) if torch.is_tensor(v) and v.shape == p.shape
                                         else v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
        return _Group([self.tickets[r] for r in rows], new,
                      {n: b.index_select(0, idx.to(b.device)) for n, b in self.buffers.items()},
                      {n: m.index_select(0, idx.to(m.device)) for n, m in self.masks.items()}, opt)

    def step(self, model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> list[float]:
        """One training step of every ticket of the group on its batch ``x[i], y[i]``; their losses."""
        masks = self.masks

        def ticket_loss(params, buffers, mask, xi, yi):
            weights = dict(params)
            for name, m in mask.items():
                weights[name] = params[name] * m
            return loss_fn(functional_call(model, (weights, buffers), (xi,)), yi)

        self.optimizer.zero_grad(set_to_none=True)
        losses = vmap(ticket_loss, randomness="different")(self.params, self.buffers, masks, x, y)
        values = losses.detach().tolist()
        for k, v in zip(self.tickets, values):
            if not math.isfinite(v):
                raise RTLError(f"ticket {k}: non-finite loss ({v}); lower the learning rate or check the data for "
                               "NaN/inf.")
        losses.sum().backward()  # d(sum)/d(loss_k) = 1: every stacked copy gets exactly its own ticket's gradient
        self.optimizer.step()
        return values

    def trained(self, losses: dict[int, list[float]]) -> dict[int, TrainedTicket]:
        return {k: TrainedTicket(params={n: p.detach()[i] for n, p in self.params.items()},
                                 buffers={n: b[i] for n, b in self.buffers.items()},
                                 loss=sum(losses[k]) / len(losses[k])) for i, k in enumerate(self.tickets)}


def _xy(batch, k: int):
    if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not all(torch.is_tensor(b) for b in batch[:2]):
        raise DataError(f"subset {k}: the grouped search expects (x, y) tensor batches; pass loaders of (x, y) "
                        "batches, or use search_execution='sequential' with a train_step= for other formats.")
    return batch[0], batch[1]


def _signature(batch) -> tuple | None:
    if batch is None:
        return None
    x, y = batch
    return tuple(x.shape), x.dtype, x.device, tuple(y.shape), y.dtype, y.device


class _EpochBatches:
    """One pass over a ticket's loader; the iterator is started and its first batch drawn at construction, so that
    the tickets' loaders consume the global RNG (a shuffling loader without generator) in ticket order, as in the
    sequential search."""

    def __init__(self, loader, k: int):
        self.k, self.it = k, iter(loader)
        self.pending = self._draw()

    def _draw(self):
        try:
            return _xy(next(self.it), self.k)
        except StopIteration:
            return None

    def advance(self) -> None:
        self.pending = self._draw()


def _regroup(groups: list[_Group], batches: dict[int, tuple | None]) -> list[_Group]:
    """Split every group whose tickets' batches differ in shape (or some are exhausted): same-shape subgroups."""
    out = []
    for g in groups:
        sigs = [_signature(batches[k]) for k in g.tickets]
        kinds = list(dict.fromkeys(sigs))
        if len(kinds) == 1:
            out.append(g)
            continue
        out.extend(g.split([i for i, s in enumerate(sigs) if s == kind]) for kind in kinds)
    return out


def train_round_grouped(routed, template: nn.Module, tickets: list[int], loaders: dict, *, loss_fn: Callable | None,
                        make_optimizer: Callable[[], torch.optim.Optimizer], epochs: int, device=None
                        ) -> dict[int, TrainedTicket]:
    """Train every ticket of ``tickets`` for ``epochs`` passes over its loader, all as one vectorised network,
    from the shared model's current weights (the caller rewinds to θ first). ``template``: a plain copy of the
    model (``routed.plain_copy(k)``) whose forward is run functionally. The shared model is not changed."""
    loss_fn = loss_fn or F.cross_entropy
    groups = [_Group.start(routed, tickets, make_optimizer())]
    losses = {k: [] for k in tickets}
    template.train()
    first = True
    for _ in range(epochs):
        streams = {k: _EpochBatches(loaders[k], k) for k in tickets}
        while True:
            batches = {k: streams[k].pending for k in tickets}
            if all(b is None for b in batches.values()):
                break
            groups = _regroup(groups, batches)
            for g in groups:
                if batches[g.tickets[0]] is None:
                    continue
                x = torch.stack([batches[k][0] for k in g.tickets])
                y = torch.stack([batches[k][1] for k in g.tickets])
                if device is not None:
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                values = _first_step(g, template, loss_fn, x, y) if first else g.step(template, loss_fn, x, y)
                first = False
                for k, v in zip(g.tickets, values):
                    losses[k].append(v)
            for k in tickets:
                if batches[k] is not None:
                    streams[k].advance()
    for k in tickets:
        if not losses[k]:
            raise DataError(f"subset {k} yielded no batch; every ticket needs data.")
    out = {}
    for g in groups:
        out.update(g.trained(losses))
    return out


def _first_step(group: _Group, model, loss_fn, x, y) -> list[float]:
    """The first step, whose failure inside torch.func (a model or loss that vmap cannot batch: ``.item()``,
    data-dependent control flow, in-place writes to inputs) is reported with the fix."""
    try:
        return group.step(model, loss_fn, x, y)
    except RTLError:
        raise
    except RuntimeError as e:
        raise SearchExecutionError(f"search_execution='grouped' could not run the model and loss under "
                                   f"torch.func.vmap ({e}); {_FIX}.") from e


def load_trained(routed, k: int, trained: TrainedTicket) -> None:
    """Put ticket k's trained parameters and norm statistics (its row) into the shared model."""
    rows = _routed_rows(routed)
    with torch.no_grad():
        for name, p in routed.model.named_parameters():
            if name in trained.params:
                p.copy_(trained.params[name])
        for name, b in routed.model.named_buffers():
            if name in trained.buffers:
                (b[k] if name in rows else b).copy_(trained.buffers[name])


def run_grouped_search(pruner, which: list[int], loaders: dict, *, loss_fn: Callable | None,
                       make_optimizer: Callable[[], torch.optim.Optimizer], epochs: int, device, bar,
                       checkpoint=None, checkpoint_every: int = 1) -> None:
    """``pruner.find_tickets``'s loop with ``search_execution="grouped"``: sweeps in which every unfinished ticket
    trains one round (all together, :func:`train_round_grouped`) and is then pruned ticket by ticket through the
    pruner's own round end (:meth:`~RTLPruner.close_round`; in round order also :meth:`~RTLPruner.end_sweep`).
    ``checkpoint``: ``(folder, config)`` as find_tickets builds it, saved every ``checkpoint_every`` rounds."""
    routed, state = pruner.routed, pruner.state
    pruner.rewind(which[0])
    template = routed.plain_copy(which[0])  # the forward that vmap runs; every tensor of it is passed in
    snapshot = routed.tickets.copy()
    while True:
        targets = {k: t for k in which if (t := pruner.record_targets(k)) is not None}
        if not targets:
            break
        active = list(targets)
        before = {k: pruner.ticket_sparsity(k) for k in active}
        pruner.rewind(active[0])  # θ: every ticket's round starts there
        trained = train_round_grouped(routed, template, active, loaders, loss_fn=loss_fn,
                                      make_optimizer=make_optimizer, epochs=epochs, device=device)
        for k in active:
            pruner.rewind(k)
            done = trained.pop(k)
            load_trained(routed, k, done)
            if needs_gradients(pruner.importance):
                estimate_gradients(routed, k, loaders[k], importance=pruner.importance, loss_fn=loss_fn,
                                   batches=pruner.importance_batches, device=device)
            sp = pruner.close_round(k, loss=done.loss, target=targets[k], before=before[k])
            bar.update(1)
            bar.set_postfix(ticket=k, sparsity=f"{sp:.3f}")
        if pruner.order == "round":
            snapshot = pruner.end_sweep(active, which, snapshot)
        if checkpoint and state.rounds_done % checkpoint_every == 0:
            save_search(checkpoint, loaders, state, routed.tickets, pruner.sparsities)
