"""Training loops: the default train step, balanced cyclic batching and joint retraining with masked updates.

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

from rtl_plugin.errors import CorruptFileError, DataError, OptimizerError, RTLError, TicketError
from rtl_plugin.persist.checkpoint import (CheckpointMismatchError, capture_rng, decode, encode, load_bundle,
                                           loaders_config, masks_sha256, restore_rng, save_bundle)
from rtl_plugin.routed import RoutedModel
from rtl_plugin.training import distributed
from rtl_plugin.training.loop import (TrainStep, apply_loss, balanced_cyclic_batches, default_train_step,
                                      normalize_subsets, progress_bar, to_device)
from rtl_plugin.training.masked import (MaskedUpdate, ticket_param_masks, union_param_masks,
                                        write_back_needed)
from rtl_plugin.training.optim import check_optimizer, clone_optimizer

# names this module exported before the training loop pieces got their own modules
__all__ = ["joint_retrain", "mixed_route_retrain", "retrain_tickets", "RETRAIN_MODES", "TrainStep", "apply_loss",
           "balanced_cyclic_batches", "default_train_step", "normalize_subsets", "MaskedUpdate",
           "ticket_param_masks", "union_param_masks", "write_back_needed", "clone_optimizer"]

RETRAIN_MODES = ("sequential", "mixed")


def _prepared_loaders(routed, subsets, optimizer, epochs) -> dict:
    """joint_retrain's checked ``{ticket: loader}`` (torchrun: rank 0's state everywhere, this rank's shards)."""
    if not isinstance(routed, RoutedModel):
        raise TypeError(f"joint_retrain() needs a RoutedModel, got {type(routed).__name__}.")
    if not isinstance(epochs, int) or epochs < 0:
        raise DataError(f"epochs must be an int >= 0, got {epochs!r}.")
    loaders = normalize_subsets(subsets)
    bad = [k for k in loaders if k >= routed.num_tickets]
    if bad:
        raise TicketError(f"subsets name tickets {bad} but the model routes {routed.num_tickets} tickets (0..{routed.num_tickets - 1}).")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise OptimizerError(f"optimizer must be a torch.optim.Optimizer over routed.parameters() (e.g. "
                             f"torch.optim.Adam(routed.parameters(), lr=1e-3)), got {type(optimizer).__name__}.")
    return distributed.prepare(routed, loaders)


def _write_back_setting(routed, opts: dict, per_ticket_state: bool, write_back, custom_step: bool) -> bool:
    """The write-back decision, made before a checkpoint fills the optimizer states (None: automatic)."""
    if write_back is None:
        return custom_step or write_back_needed(routed, list(opts.values()), per_ticket_state)
    if not isinstance(write_back, bool):
        raise TypeError(f"write_back must be True, False or None (auto), got {write_back!r}.")
    if not write_back and write_back_needed(routed, list(opts.values()), per_ticket_state):
        warnings.warn("joint_retrain(write_back=False) with an optimizer setup that can move weights outside the "
                      "stepping ticket (shared state, weight decay, channel mode or a non-listed optimizer): the "
                      "masked-update guarantee does not hold; use write_back=None.", UserWarning, stacklevel=3)
    return write_back


class _TicketUpdates:
    """One MaskedUpdate per ticket sharing one snapshot buffer per parameter; rebuilt when the masks change
    (with the automatic write-back it is then switched on: the states hold moments on entries the tickets no
    longer own)."""

    def __init__(self, routed, write_back: bool, auto: bool):
        self.routed, self.write_back, self.auto = routed, write_back, auto
        self.updates: dict[int, MaskedUpdate] = {}
        self.buffers: dict = {}
        self.version = (id(routed.tickets), routed.tickets.version)

    def get(self, k: int) -> MaskedUpdate:
        version = (id(self.routed.tickets), self.routed.tickets.version)
        if version != self.version:
            self.updates, self.version = {}, version
            if self.auto:
                self.write_back = True
        if k not in self.updates:
            self.updates[k] = MaskedUpdate(self.routed, k, buffers=self.buffers, write_back=self.write_back)
        return self.updates[k]


def _joint_epoch(loaders, views, opts, step, device, updates: _TicketUpdates, bar) -> tuple[list[float], int]:
    """One epoch of balanced cyclic batching; ``([mean loss per ticket], steps)``."""
    sums = {k: 0.0 for k in loaders}
    counts = {k: 0 for k in loaders}
    for _, k, batch in balanced_cyclic_batches(loaders):
        batch = to_device(batch, device)
        with updates.get(k):
            loss = step(views[k], batch, opts[k])
        if loss is not None and not math.isfinite(float(loss)):
            raise RTLError(f"non-finite loss in ticket {k}; lower the learning rate or check the data.")
        sums[k] += float(loss or 0.0) * getattr(views[k], "loss_weight", 1.0)  # torchrun: shard share
        counts[k] += 1
        bar.update(1)
    return [sums[k] / max(counts[k], 1) for k in sorted(loaders)], sum(counts.values())


def joint_retrain(routed, subsets, *, optimizer: torch.optim.Optimizer, epochs: int = 1,
                  train_step: TrainStep | None = None, loss_fn: Callable | None = None,
                  per_ticket_state: bool = True, device=None, progress: bool = True,
                  callbacks: Sequence[Callable[[dict], object]] = (), checkpoint_dir=None,
                  write_back: bool | None = None) -> dict:
    """Stage 2: retrain all tickets jointly over the shared weights (masks frozen).

    Args:
        routed: the RoutedModel (its current tickets are used).
        subsets: ``{ticket: DataLoader}`` (or a list); ticket ids must be in [0, K).
        optimizer: an optimizer instance over ``routed.parameters()``; with ``per_ticket_state`` it is cloned
            K times (same class and hyper-parameters, separate state).
        epochs: passes of balanced cyclic batching (M batch indices x K tickets per epoch).
        train_step: ``step(model, batch, optimizer) -> loss`` (default: cross-entropy on (x, y)).
        callbacks: called after each epoch with ``{"epoch", "loss"}``; returning "stop" ends training.
        checkpoint_dir: opt-in crash safety: after every epoch the model state (shared weights, per-ticket
            norm statistics), every optimizer's state, the RNG states (torch/numpy/python global, every
            loader's ``generator``), the history and the epoch count are written atomically to this folder;
            if it holds a checkpoint of the same configuration (model, masks, tickets, loader sizes,
            optimizer class) training resumes after the last completed epoch (bit-identical to an
            uninterrupted run on a deterministic device). ``epochs`` may grow between runs.
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
    step = train_step or default_train_step(loss_fn)
    opts = {k: clone_optimizer(optimizer) for k in loaders} if per_ticket_state else {k: optimizer for k in loaders}
    write_back_now = _write_back_setting(routed, opts, per_ticket_state, write_back,
                                         custom_step=train_step is not None or loss_fn is not None)
    views = distributed.ticket_views(routed, loaders)  # torchrun: DDP (gradients averaged over ranks, synced norms)
    history: dict = {"loss": [], "steps": 0}
    first, finished = 0, False
    ck = None if checkpoint_dir is None else (checkpoint_dir, _retrain_config(routed, loaders, optimizer, per_ticket_state))
    got = None if ck is None else _load_retrain(ck, routed, loaders, opts)
    if got is not None:
        first, finished, history = got
        if write_back is None:  # restored optimizer state/settings are not known to be safe: keep the guarantee
            write_back_now = True
    updates = _TicketUpdates(routed, write_back_now, auto=write_back is None)
    M = max(len(dl) for dl in loaders.values())
    bar = progress_bar(total=max(epochs - first, 0) * M * len(loaders), desc="joint retrain", enabled=progress)
    was = routed.training
    routed.train()
    try:
        for epoch in range(first, 0 if finished else epochs):
            losses, steps = _joint_epoch(loaders, views, opts, step, device, updates, bar)
            history["steps"] += steps
            history["loss"].append(distributed.all_mean(losses))
            bar.set_postfix(loss=f"{sum(history['loss'][-1]) / len(loaders):.4f}")
            stop = distributed.any_rank(any(cb({"epoch": epoch, "loss": history["loss"][-1]}) == "stop"
                                            for cb in callbacks))
            if ck is not None:
                _save_retrain(ck, routed, loaders, opts, history, epoch + 1, stop)
            if stop:
                break
    finally:
        bar.close()
        routed.train(was)
    return history


def _mixed_batch(batch, device, K: int):
    """``(x, y, route)`` of one mixed-route batch, checked, on ``device``, route as int64."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 3:
        raise DataError("mixed_route_retrain needs (x, y, route) batches; add each sample's ticket id "
                        "as a third tensor (e.g. TensorDataset(x, y, context)).")
    x, y, route = to_device(tuple(batch), device)
    if not isinstance(route, torch.Tensor) or route.dim() != 1 or route.shape[0] != x.shape[0] \
            or route.dtype not in (torch.int64, torch.int32):
        raise DataError(f"route must be an integer tensor [B] with one ticket id per sample, got "
                        f"{getattr(route, 'shape', type(route))} for a batch of {x.shape[0]}.")
    if bool((route < 0).any()) or bool((route >= K).any()):
        raise DataError(f"route holds ticket ids outside [0, {K}); the model has {K} tickets.")
    return x, y, route.long()


def mixed_route_retrain(routed, loader, *, optimizer: torch.optim.Optimizer, epochs: int = 1,
                        train_step: TrainStep | None = None, loss_fn: Callable | None = None, device=None,
                        progress: bool = True) -> dict:
    """Stage 2 on mixed-route batches: every sample trains its own ticket, one optimizer step per batch.

    ``loader`` yields ``(x, y, route)`` with ``route`` a LongTensor ``[B]`` of ticket ids in [0, K) (e.g. a
    shuffled loader over the union of the tickets' data with each sample's context label). Per batch:
    ``train_step(view, (x, y), optimizer)`` where ``view(x)`` is ``routed(x, route=route)`` (each ticket runs
    once on its own samples), one backward, one ``optimizer.step()``: a weight shared by several tickets gets
    the sum of its owners' gradients and ONE optimizer state (there is no per-ticket state here). So the
    tickets see exactly the batches, order and step count of a single model trained on the shuffled union,
    which makes the comparison with single-mask IMP differ only in the masks. ``joint_retrain`` is the
    paper's schedule instead (K sequential single-ticket steps per batch index).

    Guarantee: entries that no ticket owns (pruned everywhere, and in channel mode the biases / norm affine
    of channels every ticket drops) are restored after every step, so they never change with any optimizer.
    Returns ``{"loss": [mean loss per epoch], "steps": int}``.
    """
    if not isinstance(routed, RoutedModel):
        raise TypeError(f"mixed_route_retrain() needs a RoutedModel, got {type(routed).__name__}.")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer over routed.parameters(), got {type(optimizer).__name__}.")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise DataError(f"epochs must be an int >= 0, got {epochs!r}.")
    if len(loader) == 0:
        raise DataError("mixed_route_retrain got an empty loader; it needs at least one (x, y, route) batch.")
    step = train_step or default_train_step(loss_fn)
    guard = MaskedUpdate(routed, None, owned=union_param_masks(routed))
    history: dict = {"loss": [], "steps": 0}
    bar = progress_bar(total=epochs * len(loader), desc="mixed-route retrain", enabled=progress)
    was = routed.training
    routed.train()
    try:
        for _ in range(epochs):
            total, n = 0.0, 0
            for batch in loader:
                x, y, route = _mixed_batch(batch, device, routed.num_tickets)
                with guard:
                    loss = step(lambda inp, route=route: routed(inp, route=route), (x, y), optimizer)
                if loss is not None and not math.isfinite(float(loss)):
                    raise RTLError("non-finite loss in mixed-route retraining; lower the learning rate or check the data.")
                total += float(loss or 0.0)
                n += 1
                history["steps"] += 1
                bar.update(1)
            history["loss"].append(total / max(n, 1))
    finally:
        bar.close()
        routed.train(was)
    return history


def _retrain_config(routed, loaders, optimizer, per_ticket_state) -> dict:
    return {"kind": "joint_retrain", "fingerprint": routed.space.fingerprint, "granularity": routed.granularity,
            "num_tickets": routed.num_tickets, "masks_sha256": masks_sha256(routed.tickets),
            "tickets": sorted(loaders), "loaders": loaders_config(loaders),
            "optimizer": type(optimizer).__qualname__, "per_ticket_state": bool(per_ticket_state)}


def _distinct_opts(opts: dict) -> dict[str, torch.optim.Optimizer]:
    """``{"0": opt, "1": opt, ...}`` per ticket, or ``{"shared": opt}`` without per-ticket state."""
    if len({id(o) for o in opts.values()}) == 1 and len(opts) > 1:
        return {"shared": next(iter(opts.values()))}
    return {str(k): o for k, o in opts.items()}


def _save_retrain(ck, routed, loaders, opts, history, epochs_done: int, stopped: bool) -> None:
    tensors = {f"model/{k}": v for k, v in routed.model.state_dict().items()}
    optim = {name: encode(o.state_dict(), tensors, f"optim/{name}") for name, o in _distinct_opts(opts).items()}
    meta = {"epochs_done": epochs_done, "stopped": stopped, "history": history, "optimizers": optim,
            "rng": capture_rng(loaders, tensors)}
    distributed.on_main_process(save_bundle, ck[0], "retrain", tensors, meta, config=ck[1])  # rank 0 writes, all wait


def _load_retrain(ck, routed, loaders, opts):
    """Restore model, optimizers and RNG states from ``ck``'s folder; ``(epochs_done, stopped, history)`` or None."""
    got = load_bundle(ck[0], "retrain", config=ck[1])
    if got is None:
        return None
    tensors, meta = got
    try:
        state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        optim = {name: decode(sd, tensors) for name, sd in meta["optimizers"].items()}
        history = {"loss": [list(map(float, row)) for row in meta["history"]["loss"]],
                   "steps": int(meta["history"]["steps"])}
        epochs_done, stopped = int(meta["epochs_done"]), bool(meta["stopped"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptFileError(f"the retraining checkpoint in {ck[0]} is damaged ({e!r}); delete it to start over.") from e
    targets = _distinct_opts(opts)
    if set(optim) != set(targets):
        raise CheckpointMismatchError(f"the retraining checkpoint in {ck[0]} holds optimizers {sorted(optim)}, "
                                      f"this run has {sorted(targets)}.")
    try:
        with torch.no_grad():
            routed.model.load_state_dict(state, strict=True)
        for name, o in targets.items():
            o.load_state_dict(optim[name])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointMismatchError(f"the retraining checkpoint in {ck[0]} does not fit this model/optimizer "
                                      f"({e}); use another checkpoint_dir.") from e
    restore_rng(loaders, tensors, meta["rng"])
    return epochs_done, stopped, history


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
    retrain = joint_retrain if mode == "sequential" else mixed_route_retrain
    routed.model.load_state_dict(theta)
    routed.set_tickets(tickets)
    t = time.perf_counter()
    opt = torch.optim.Adam(routed.parameters(), lr=lr) if optimizer is None else clone_optimizer(optimizer)
    retrain(routed, data, optimizer=opt, epochs=epochs, **kw)
    seconds = time.perf_counter() - t
    routed.eval()
    return seconds
