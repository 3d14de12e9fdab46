"""Stage-2 retraining conveniences (``joint_retrain``, ``mixed_route_retrain``, ``retrain_tickets``) built on the
public pieces: :class:`~rtl_plugin.training.TicketOptimizer` (masked steps), balanced cyclic batching and the
resumable epoch loop of :mod:`rtl_plugin.training.epochs`.

Masked-update guarantee: during ticket k's optimizer step, every prunable weight outside ticket k (and,
in channel mode, the biases and norm affine parameters of channels ticket k drops) is bit-identical
before and after the step, whatever the optimizer (Adam, SGD with momentum, weight decay). Two
mechanisms make this hold:

1. per-ticket optimizer state (default): K clones of the user's optimizer configuration, each seeing
   only its ticket's gradient history, so momentum from ticket j never pushes ticket k's weights;
2. a masked write-back after each step: ``w = where(mask_k, w_after, w_before)``, which also cancels
   decoupled weight decay and momentum on weights the ticket does not own.

The write-back costs two passes over all prunable weights per step (~45 ms for resnet18's 11M weights on
one CPU thread). ``joint_retrain`` skips it when it is provably a no-op (see
:func:`write_back_needed`): the default train step (a custom step could add a loss on raw weights, e.g.
an L2 term, or write weights itself), weight granularity (the masked forward ``W * m_k`` gives exactly
zero gradient outside m_k), per-ticket state that starts empty and is not resumed from a checkpoint,
frozen masks, and an optimizer whose update of an entry with an all-zero gradient history is exactly
zero (SGD, Adam, AdamW, Adamax, RMSprop without weight decay). Pass ``write_back=False`` to skip it for a
custom step you know is safe.

Weights shared by several tickets are updated by every ticket that owns them (K sequential steps per
batch index, as in the paper). Parameters outside the ticket space (classifier, norm affine in weight
mode) are shared by all tickets and updated at every step.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Callable, Sequence

import torch

from rtl_plugin.errors import DataError, OptimizerError, RTLError, TicketError
from rtl_plugin.persist.checkpoint import CheckpointMismatchError
from rtl_plugin.routed import RoutedModel
from rtl_plugin.training import distributed
from rtl_plugin.training.epochs import Checkpoint, as_callbacks, check_epochs, check_scheduler, run_epochs
from rtl_plugin.training.loop import (TrainStep, apply_loss, balanced_cyclic_batches, default_train_step,
                                      normalize_subsets, to_device)
from rtl_plugin.training.masked import (MaskedUpdate, ticket_param_masks, union_param_masks,
                                        write_back_needed)
from rtl_plugin.training.optim import check_optimizer, clone_optimizer
from rtl_plugin.training.ticket_optimizer import TicketOptimizer

# names this module exported before the training loop pieces got their own modules
__all__ = ["joint_retrain", "mixed_route_retrain", "retrain_tickets", "RETRAIN_MODES", "TrainStep", "apply_loss",
           "balanced_cyclic_batches", "default_train_step", "normalize_subsets", "MaskedUpdate",
           "ticket_param_masks", "union_param_masks", "write_back_needed", "clone_optimizer"]

RETRAIN_MODES = ("sequential", "mixed")


def _prepared_loaders(routed, subsets, optimizer, epochs) -> dict:
    """joint_retrain's checked ``{ticket: loader}`` (torchrun: rank 0's state everywhere, this rank's shards)."""
    if not isinstance(routed, RoutedModel):
        raise TypeError(f"joint_retrain() needs a RoutedModel, got {type(routed).__name__}.")
    check_epochs(epochs, where="joint_retrain")
    check_optimizer(routed, optimizer)
    loaders = normalize_subsets(subsets)
    bad = [k for k in loaders if k >= routed.num_tickets]
    if bad:
        raise TicketError(f"subsets name tickets {bad} but the model routes {routed.num_tickets} tickets (0..{routed.num_tickets - 1}).")
    return distributed.prepare(routed, loaders)


def _joint_optimizer(routed, optimizer, loaders, per_ticket_state, write_back, custom_step: bool) -> TicketOptimizer:
    """The TicketOptimizer joint_retrain steps with (``optimizer`` itself when it already is one).

    ``write_back=None`` is automatic: always for a custom step (it could add a loss on raw weights, e.g. an L2
    term, or write weights itself), else TicketOptimizer's automatic mode (skipped while provably a no-op)."""
    if isinstance(optimizer, TicketOptimizer):
        if optimizer.routed is not routed:
            raise OptimizerError("the TicketOptimizer was built for another RoutedModel; build it over this one.")
        if optimizer.per_ticket_state != per_ticket_state or write_back is not None:
            raise OptimizerError(f"a TicketOptimizer brings its own state layout (per_ticket_state="
                                 f"{optimizer.per_ticket_state}) and write-back setting; pass per_ticket_state="
                                 f"{optimizer.per_ticket_state} and leave write_back unset, or pass its base optimizer.")
        return optimizer
    if write_back is not None and not isinstance(write_back, bool):
        raise OptimizerError(f"write_back must be True, False or None (auto), got {write_back!r}.")
    topt = TicketOptimizer(routed, optimizer, per_ticket_state=per_ticket_state,
                           write_back=write_back if write_back is not None else (True if custom_step else None))
    inner = [topt.optimizer_for(k) for k in loaders]
    if write_back is False and write_back_needed(routed, inner, per_ticket_state):
        warnings.warn("joint_retrain(write_back=False) with an optimizer setup that can move weights outside the "
                      "stepping ticket (shared state, weight decay, channel mode or a non-listed optimizer): the "
                      "masked-update guarantee does not hold; use write_back=None.", UserWarning, stacklevel=3)
    return topt


def _saved_optimizers(topt: TicketOptimizer, loaders) -> dict:
    """``{name: state dict}`` as checkpoints store them: per ticket ``"0", "1", ...``; one shared optimizer is
    ``"shared"`` (with a single ticket: that ticket's id)."""
    if topt.per_ticket_state:
        return {str(k): topt.optimizer_for(k).state_dict() for k in sorted(loaders)}
    name = "shared" if len(loaders) > 1 else str(next(iter(loaders)))
    return {name: topt.base.state_dict()}


def _load_optimizers(topt: TicketOptimizer, saved: dict, loaders, directory) -> None:
    want = _saved_optimizers(topt, loaders)
    if set(saved) != set(want):
        raise CheckpointMismatchError(f"the retraining checkpoint in {directory} holds optimizers {sorted(saved)}, "
                                      f"this run has {sorted(want)}.")
    states = saved if topt.per_ticket_state else {"shared": next(iter(saved.values()))}
    try:
        topt.load_state_dict({"per_ticket_state": topt.per_ticket_state, "optimizers": states})
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointMismatchError(f"the retraining checkpoint in {directory} does not fit this model/optimizer "
                                      f"({e}); use another checkpoint_dir.") from e


def _joint_epoch(loaders, views, topt: TicketOptimizer, step, device, bar, after_step) -> tuple[list[float], int]:
    """One epoch of balanced cyclic batching; ``([mean loss per ticket], steps)``."""
    sums = {k: 0.0 for k in loaders}
    counts = {k: 0 for k in loaders}
    for _, k, batch in balanced_cyclic_batches(loaders):
        batch = to_device(batch, device)
        with topt.select(k):  # the whole train step is ticket k's masked update
            loss = step(views[k], batch, topt)
        if after_step is not None:
            after_step()
        if loss is not None and not math.isfinite(float(loss)):
            raise RTLError(f"non-finite loss in ticket {k}; lower the learning rate or check the data.")
        sums[k] += float(loss or 0.0) * getattr(views[k], "loss_weight", 1.0)  # torchrun: shard share
        counts[k] += 1
        bar.update(1)
    return [sums[k] / max(counts[k], 1) for k in sorted(loaders)], sum(counts.values())


def joint_retrain(routed, subsets, *, optimizer: torch.optim.Optimizer, epochs: int = 1,
                  train_step: TrainStep | None = None, loss_fn: Callable | None = None,
                  per_ticket_state: bool = True, device=None, progress: bool = True,
                  callbacks: Sequence[Callable[[dict], object]] | Callable[[dict], object] | None = (),
                  checkpoint_dir=None, write_back: bool | None = None, scheduler=None,
                  scheduler_interval: str = "epoch") -> dict:
    """Stage 2: retrain all tickets jointly over the shared weights (masks frozen).

    A convenience over the public pieces: a :class:`~rtl_plugin.training.TicketOptimizer` over ``optimizer``
    takes ticket k's masked steps on balanced cyclic batches of the subsets.

    Args:
        routed: the RoutedModel (its current tickets are used).
        subsets: ``{ticket: DataLoader}`` (or a list); ticket ids must be in [0, K).
        optimizer: an optimizer instance over ``routed.parameters()``; with ``per_ticket_state`` each ticket
            steps a fresh clone of it (same class and hyper-parameters, separate state) whose param groups
            are the optimizer's own, so learning-rate changes (``scheduler``, or any LR scheduler built on
            it) reach every ticket. A TicketOptimizer is used as it is.
        epochs: passes of balanced cyclic batching (M batch indices x K tickets per epoch).
        train_step: ``step(model, batch, optimizer) -> loss`` (default: cross-entropy on (x, y)); it gets
            the TicketOptimizer, whose ``step()`` is the ticket's masked step.
        callbacks: one callable or a list, called after each epoch with ``{"epoch", "loss"}``; returning
            "stop" ends training.
        scheduler: a torch LR scheduler built on ``optimizer``, stepped after every epoch
            (``scheduler_interval="epoch"``; ReduceLROnPlateau gets the epoch's mean loss) or after every
            optimizer step, i.e. every ticket's step (``"step"``: M x K steps per epoch).
        checkpoint_dir: opt-in crash safety: after every epoch the model state (shared weights, per-ticket
            norm statistics), every optimizer's state, the scheduler's state, the RNG states
            (torch/numpy/python global, every loader's ``generator``), the history and the epoch count are
            written atomically to this folder; if it holds a checkpoint of the same configuration (model,
            masks, tickets, loader sizes, optimizer class) training resumes after the last completed epoch
            (bit-identical to an uninterrupted run on a deterministic device). ``epochs`` may grow between runs.
        write_back: snapshot the entries outside ticket k before its step and restore them after.
            None (default): only when needed: skipped when ``train_step`` and ``loss_fn`` are the defaults
            and :func:`write_back_needed` is False (e.g. per-ticket Adam without weight decay in weight
            mode, where it is a no-op costing two passes over the weights); done again after a resumed
            checkpoint or a mask change. False skips it for any step (a warning says when the optimizer
            setup could move entries outside the ticket).

    Under ``torchrun`` (an initialised process group with several ranks) the training is
    ticket-synchronous data-parallel (see :mod:`rtl_plugin.training.distributed`): every rank trains the same
    ticket on its shard of each global batch through DDP, batch-norm statistics are synchronised, rank 0
    writes the checkpoints; the result equals one process with the same global batch.
    Returns:
        ``{"loss": [[mean loss per ticket] per epoch], "steps": int}``
    """
    loaders = _prepared_loaders(routed, subsets, optimizer, epochs)
    cbs = as_callbacks(callbacks, where="joint_retrain")
    scheduler = check_scheduler(scheduler, optimizer, scheduler_interval, where="joint_retrain")
    step = train_step or default_train_step(loss_fn)
    topt = _joint_optimizer(routed, optimizer, loaders, per_ticket_state, write_back,
                            custom_step=train_step is not None or loss_fn is not None)
    views = distributed.ticket_views(routed, loaders)  # torchrun: DDP (gradients averaged over ranks, synced norms)
    history: dict = {"loss": [], "steps": 0}
    first, finished, ck = 0, False, None
    if checkpoint_dir is not None:
        ck = Checkpoint(checkpoint_dir, "retrain", Checkpoint.config_of(
            "joint_retrain", routed, loaders, topt.base, scheduler, per_ticket_state=bool(topt.per_ticket_state)))
        got = ck.load(routed, loaders, scheduler)
        if got is not None:
            saved, first, finished, history = got
            _load_optimizers(topt, saved, loaders, checkpoint_dir)
    M = max(len(dl) for dl in loaders.values())
    save = None if ck is None else \
        (lambda h, done, stop: ck.save(routed, loaders, _saved_optimizers(topt, loaders), scheduler, h, done, stop))
    return run_epochs(routed, lambda bar, after: _joint_epoch(loaders, views, topt, step, device, bar, after),
                      epochs=epochs, first=first, finished=finished, history=history, callbacks=cbs,
                      scheduler=scheduler, scheduler_interval=scheduler_interval,
                      progress_total=max(epochs - first, 0) * M * len(loaders), desc="joint retrain",
                      progress=progress, save=save, mean_loss=lambda losses: sum(losses) / len(losses))


def _mixed_batch(batch, device, K: int):
    """``(x, y, route)`` of one mixed-route batch, checked, on ``device``, route as int64."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 3:
        raise DataError("mixed_route_retrain needs (x, y, route) batches; add each sample's ticket id "
                        "as a third tensor (e.g. TensorDataset(x, y, context) or rtl.training.RoutedDataset).")
    x, y, route = to_device(tuple(batch), device)
    if not isinstance(route, torch.Tensor) or route.dim() != 1 or route.shape[0] != x.shape[0] \
            or route.dtype not in (torch.int64, torch.int32):
        raise DataError(f"route must be an integer tensor [B] with one ticket id per sample, got "
                        f"{getattr(route, 'shape', type(route))} for a batch of {x.shape[0]}.")
    if bool((route < 0).any()) or bool((route >= K).any()):
        raise DataError(f"route holds ticket ids outside [0, {K}); the model has {K} tickets.")
    return x, y, route.long()


def _mixed_optimizer(routed, optimizer) -> TicketOptimizer:
    if isinstance(optimizer, TicketOptimizer):
        if optimizer.routed is not routed or optimizer.per_ticket_state:
            raise OptimizerError("mixed_route_retrain steps every ticket at once with ONE optimizer state; pass a "
                                 "torch optimizer (or a TicketOptimizer over this model with per_ticket_state=False).")
        return optimizer
    # every step may change what any ticket owns; entries no ticket owns are restored after it
    return TicketOptimizer(routed, optimizer, per_ticket_state=False, write_back=True)


def _mixed_epoch(loader, view, topt: TicketOptimizer, step, device, bar, after_step) -> tuple[float, int]:
    """One pass over the (x, y, route) batches; ``(mean loss, steps)``."""
    K = topt.routed.num_tickets
    every = range(K)
    total, n = 0.0, 0
    for batch in loader:
        x, y, route = _mixed_batch(batch, device, K)
        with topt.select(every):
            loss = step(lambda inp, route=route: view(inp, route=route), (x, y), topt)
        if after_step is not None:
            after_step()
        if loss is not None and not math.isfinite(float(loss)):
            raise RTLError("non-finite loss in mixed-route retraining; lower the learning rate or check the data.")
        total += float(loss or 0.0) * getattr(view, "loss_weight", 1.0)  # torchrun: shard share
        n += 1
        bar.update(1)
    return total / max(n, 1), n


def _mixed_loader(routed, loader) -> object:
    """The checked loader (torchrun: rank 0's state everywhere, this rank's shards)."""
    try:
        n = len(loader)
    except TypeError:
        raise DataError(f"mixed_route_retrain needs a loader with a length (a DataLoader over a map-style dataset "
                        f"or a list of batches), got {type(loader).__name__}.") from None
    if n == 0:
        raise DataError("mixed_route_retrain got an empty loader; it needs at least one (x, y, route) batch.")
    return distributed.prepare(routed, {0: loader})[0]


def mixed_route_retrain(routed, loader, *, optimizer: torch.optim.Optimizer, epochs: int = 1,
                        train_step: TrainStep | None = None, loss_fn: Callable | None = None, device=None,
                        progress: bool = True,
                        callbacks: Sequence[Callable[[dict], object]] | Callable[[dict], object] | None = (),
                        checkpoint_dir=None, scheduler=None, scheduler_interval: str = "epoch") -> dict:
    """Stage 2 on mixed-route batches: every sample trains its own ticket, one optimizer step per batch.

    ``loader`` yields ``(x, y, route)`` with ``route`` a LongTensor ``[B]`` of ticket ids in [0, K) (e.g. a
    shuffled loader over the union of the tickets' data with each sample's context label, or
    ``DataLoader(RoutedDataset(...), batch_sampler=RouteBalancedSampler(..., mixed=True))``). Per batch:
    ``train_step(view, (x, y), optimizer)`` where ``view(x)`` is ``routed(x, route=route)`` (each ticket runs
    once on its own samples), one backward, one ``optimizer.step()``: a weight shared by several tickets gets
    the sum of its owners' gradients and ONE optimizer state (there is no per-ticket state here). So the
    tickets see exactly the batches, order and step count of a single model trained on the shuffled union,
    which makes the comparison with single-mask IMP differ only in the masks. ``joint_retrain`` is the
    paper's schedule instead (K sequential single-ticket steps per batch index).

    Guarantee: entries that no ticket owns (pruned everywhere, and in channel mode the biases / norm affine
    of channels every ticket drops) are restored after every step, so they never change with any optimizer.

    ``callbacks``, ``scheduler`` / ``scheduler_interval`` ("step": after every batch) and ``checkpoint_dir``
    work as in :func:`joint_retrain` (the checkpoint also saves the loader's generators, e.g. the
    sampler's). Under ``torchrun`` every rank trains on its shard of each global batch through DDP
    (gradients averaged over ranks); batch-norm statistics are those of the global batch (every rank runs
    the tickets present anywhere in the batch one after another, on its own samples of each), rank 0
    writes the checkpoints, and the result equals one process up to floating-point rounding.
    Returns ``{"loss": [mean loss per epoch], "steps": int}``.
    """
    if not isinstance(routed, RoutedModel):
        raise TypeError(f"mixed_route_retrain() needs a RoutedModel, got {type(routed).__name__}.")
    check_optimizer(routed, optimizer)
    check_epochs(epochs, where="mixed_route_retrain")
    cbs = as_callbacks(callbacks, where="mixed_route_retrain")
    scheduler = check_scheduler(scheduler, optimizer, scheduler_interval, where="mixed_route_retrain")
    loader = _mixed_loader(routed, loader)
    step = train_step or default_train_step(loss_fn)
    topt = _mixed_optimizer(routed, optimizer)
    view = distributed.mixed_route_view(routed)  # torchrun: DDP over the per-ticket forwards, synced norms
    history: dict = {"loss": [], "steps": 0}
    first, finished, ck = 0, False, None
    if checkpoint_dir is not None:
        ck = Checkpoint(checkpoint_dir, "mixed_retrain",
                        Checkpoint.config_of("mixed_route_retrain", routed, {0: loader}, topt.base, scheduler))
        got = ck.load(routed, {0: loader}, scheduler)
        if got is not None:
            saved, first, finished, history = got
            _load_optimizers(topt, saved, {0: loader}, checkpoint_dir)
    save = None if ck is None else \
        (lambda h, done, stop: ck.save(routed, {0: loader}, _saved_optimizers(topt, {0: loader}), scheduler, h,
                                       done, stop))
    return run_epochs(routed, lambda bar, after: _mixed_epoch(loader, view, topt, step, device, bar, after),
                      epochs=epochs, first=first, finished=finished, history=history, callbacks=cbs,
                      scheduler=scheduler, scheduler_interval=scheduler_interval,
                      progress_total=max(epochs - first, 0) * len(loader), desc="mixed-route retrain",
                      progress=progress, save=save, mean_loss=float)


def _retrain_mode(retrain_mode: str | None, schedule: str | None) -> str:
    """The stage-2 schedule from ``retrain_mode`` or the deprecated ``schedule`` alias."""
    if schedule is not None:
        warnings.warn("retrain_tickets(schedule=...) is deprecated; use retrain_mode='sequential' or 'mixed' "
                      "(schedule names the pruning schedule only).", DeprecationWarning, stacklevel=3)
        if retrain_mode is not None and retrain_mode != schedule:
            raise DataError(f"retrain_mode={retrain_mode!r} and the deprecated schedule={schedule!r} disagree; "
                            "pass retrain_mode only.")
        retrain_mode = schedule
    retrain_mode = "sequential" if retrain_mode is None else retrain_mode
    if retrain_mode not in RETRAIN_MODES:
        name = "retrain_mode" if schedule is None else "schedule (deprecated name of retrain_mode)"
        raise DataError(f"{name} must be 'sequential' or 'mixed', got {retrain_mode!r}.")
    return retrain_mode


def retrain_tickets(routed, theta: dict, tickets, data, *, epochs: int, optimizer: torch.optim.Optimizer | None = None,
                    lr: float | None = None, retrain_mode: str | None = None, schedule: str | None = None,
                    **kw) -> float:
    """Rewind ``routed`` to the weights ``theta``, set ``tickets``, jointly retrain them for ``epochs`` with a
    fresh clone of ``optimizer`` (an instance over ``routed.parameters()``; ``lr=x`` is short for
    ``torch.optim.Adam(routed.parameters(), lr=x)``) and leave the model in eval mode; returns the retraining
    wall time in seconds. ``retrain_mode="sequential"``: :func:`joint_retrain` on ``data`` =
    ``{ticket: DataLoader}``; ``"mixed"``: :func:`mixed_route_retrain` on ``data`` = a loader of
    ``(x, y, route)``. ``schedule=`` is the deprecated name of ``retrain_mode``. ``kw`` goes to that function
    (train_step, device, progress, ...)."""
    mode = _retrain_mode(retrain_mode, schedule)
    if (optimizer is None) == (lr is None):
        raise OptimizerError("retrain_tickets needs exactly one of optimizer= (an optimizer instance over "
                             "routed.parameters(), cloned here) or lr= (Adam with that learning rate).")
    if optimizer is not None:
        check_optimizer(routed, optimizer)
        if isinstance(optimizer, TicketOptimizer):
            optimizer = optimizer.base  # its configuration is what gets cloned
    retrain = joint_retrain if mode == "sequential" else mixed_route_retrain
    routed.model.load_state_dict(theta)
    routed.set_tickets(tickets)
    t = time.perf_counter()
    if optimizer is None:
        opt = torch.optim.Adam(routed.parameters(), lr=lr)
    else:  # fresh state; the same param groups, so a scheduler= built on ``optimizer`` drives the clone
        opt = clone_optimizer(optimizer)
        opt.param_groups = optimizer.param_groups
    retrain(routed, data, optimizer=opt, epochs=epochs, **kw)
    seconds = time.perf_counter() - t
    routed.eval()
    return seconds
