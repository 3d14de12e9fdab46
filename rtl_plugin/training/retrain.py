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
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from rtl_plugin.errors import DataError, RTLError, TicketError

TrainStep = Callable[[nn.Module, object, torch.optim.Optimizer], float]


def _to_device(batch, device):
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def apply_loss(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
    """The tail of every train step: refuse a non-finite loss, backward, optimizer step; returns the loss."""
    if not torch.isfinite(loss):
        raise RTLError(f"non-finite loss ({float(loss.detach())}); lower the learning rate or check the data for NaN/inf.")
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def default_train_step(loss_fn: Callable | None = None) -> TrainStep:
    """A train step for ``(x, y)`` batches: forward, ``loss_fn(out, y)`` (default cross-entropy), backward, step."""
    loss_fn = loss_fn or F.cross_entropy

    def step(model: nn.Module, batch, optimizer: torch.optim.Optimizer) -> float:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DataError("the default train step expects (x, y) batches; pass train_step= for other batch formats.")
        x, y = batch[0], batch[1]
        optimizer.zero_grad(set_to_none=True)
        return apply_loss(loss_fn(model(x), y), optimizer)
    return step


def normalize_subsets(subsets) -> dict[int, object]:
    """``{ticket: DataLoader}`` from a dict or a sequence of loaders; validates non-emptiness."""
    if isinstance(subsets, Mapping):
        items = dict(subsets)
    elif isinstance(subsets, Sequence):
        items = dict(enumerate(subsets))
    else:
        raise DataError(f"subsets must be a dict {{ticket: DataLoader}} or a list of loaders, got {type(subsets).__name__}.")
    if not items:
        raise DataError("no subsets given; pass one DataLoader per ticket.")
    for k, dl in items.items():
        if not isinstance(k, int) or k < 0:
            raise DataError(f"subset keys must be ticket ids (ints >= 0), got {k!r}.")
        try:
            n = len(dl)
        except TypeError:
            raise DataError(f"subset {k}'s loader has no length (an IterableDataset?); balanced cyclic batching "
                            "needs map-style datasets or loaders with __len__.") from None
        if n == 0:
            raise DataError(f"subset {k} is empty; every ticket needs at least one batch (drop the ticket or add data).")
    return items


def balanced_cyclic_batches(loaders: Mapping[int, object]) -> Iterator[tuple[int, int, object]]:
    """One epoch of balanced cyclic batching: ``(batch_index, ticket, batch)``.

    M = the largest batch count; smaller subsets repeat their batches cyclically until every ticket has
    M batches; for each batch index the tickets come in ascending order.
    """
    lens = {k: len(dl) for k, dl in loaders.items()}
    M = max(lens.values())
    iters = {k: iter(dl) for k, dl in loaders.items()}
    for i in range(M):
        for k in sorted(loaders):
            try:
                batch = next(iters[k])
            except StopIteration:
                iters[k] = iter(loaders[k])
                try:
                    batch = next(iters[k])
                except StopIteration:
                    raise DataError(f"subset {k} yielded no batch; it is empty.") from None
            yield i, k, batch


def clone_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A fresh optimizer of the same class and hyper-parameters over the same parameters (empty state).

    Hyper-parameters travel in the param groups; only constructor arguments the class accepts are passed
    (e.g. AdamW's ``defaults`` hold keys its constructor rejects).
    """
    import inspect
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"])}
              for g in optimizer.param_groups]
    try:
        accepted = set(inspect.signature(type(optimizer).__init__).parameters)
    except (TypeError, ValueError):
        accepted = set()
    kw = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return type(optimizer)(groups, **kw)


# Optimizers whose step leaves an entry unchanged when that entry's gradient has been zero since the state was
# created (zero moments / accumulators give a zero update) and no weight decay is configured. Exact classes
# only: a subclass may change the update rule.
_ZERO_GRAD_FROZEN = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax,
                     torch.optim.RMSprop)


def write_back_needed(routed, optimizers: Sequence[torch.optim.Optimizer], per_ticket_state: bool) -> bool:
    """Whether ``joint_retrain`` must snapshot and write back the entries a ticket does not own.

    False only when the optimizer step alone already leaves them bit-identical: weight granularity, one
    optimizer per ticket with empty state, every optimizer one of ``SGD, Adam, AdamW, Adamax, RMSprop``
    (exact class) with ``weight_decay == 0`` in every param group. (``joint_retrain`` also requires the
    default train step, no resumed checkpoint and frozen masks before it skips the write-back.)
    """
    if routed.granularity != "weight" or not per_ticket_state:
        return True
    for o in optimizers:
        if type(o) not in _ZERO_GRAD_FROZEN or len(o.state) > 0:
            return True
        if any(float(g.get("weight_decay", 0.0) or 0.0) != 0.0 for g in o.param_groups):
            return True
    return False


class MaskedUpdate:
    """Context for one ticket's step: snapshots what ticket k does not own and writes it back after the step."""

    def __init__(self, routed, ticket: int | None, buffers: dict | None = None, *, write_back: bool = True,
                 owned: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        """``buffers``: a dict shared by several MaskedUpdates (one per ticket) to reuse one snapshot buffer per
        parameter instead of allocating a copy of every weight at every step. ``write_back=False`` makes the
        context a no-op, for steps :func:`write_back_needed` proved cannot touch entries outside the ticket.
        ``owned``: the ``[(parameter, mask)]`` entries the step may change, instead of ticket ``ticket``'s
        (e.g. :func:`union_param_masks` for a step that trains every ticket)."""
        self.routed = routed
        self.ticket = ticket
        self.write_back = bool(write_back)
        if owned is None and ticket is None:
            raise TicketError("MaskedUpdate needs a ticket id or the owned=[(parameter, mask)] entries.")
        self._pairs = (owned if owned is not None else ticket_param_masks(routed, ticket)) if self.write_back else []
        self._buffers = {} if buffers is None else buffers
        self._saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __enter__(self):
        self._saved = []
        with torch.no_grad():
            for p, m in self._pairs:
                buf = self._buffers.get(id(p))
                if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                    buf = self._buffers[id(p)] = torch.empty_like(p.detach())
                buf.copy_(p.detach())
                self._saved.append((p, m, buf))
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for p, m, before in self._saved:
                w = p.detach()
                torch.where(m, w, before, out=w)  # in place: entries ticket k does not own get their old values
        self._saved = []
        return False


def ticket_param_masks(routed, ticket: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(parameter, bool mask broadcastable to it)]``: which entries ticket ``ticket`` owns."""
    masks, weights = routed.tickets.element_masks(), routed.prunable_weights()
    pairs = [(weights[n], masks[n][ticket]) for n in routed.space.layers]
    if routed.granularity == "channel":
        lm = routed.tickets.layer_channel_masks()
        mods = dict(routed.model.named_modules())
        seen = {id(p) for p, _ in pairs}
        for name, sides in lm.items():
            out = sides.get("out")
            if out is None:
                continue
            m = mods[name]
            for pname in ("bias", "weight"):
                p = getattr(m, pname, None)
                if isinstance(p, nn.Parameter) and id(p) not in seen and p.dim() == 1 and p.shape[0] == out.shape[1]:
                    pairs.append((p, out[ticket]))
                    seen.add(id(p))
    return pairs


def union_param_masks(routed) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(parameter, bool mask)]``: the entries at least one ticket owns, for parameters some entries of
    which no ticket owns (the OR over tickets of :func:`ticket_param_masks`)."""
    owned: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for k in range(routed.num_tickets):
        for p, m in ticket_param_masks(routed, k):
            prev = owned.get(id(p))
            owned[id(p)] = (p, m if prev is None else prev[1] | m)
    return [(p, m) for p, m in owned.values() if not bool(m.all())]


def joint_retrain(routed, subsets, *, optimizer: torch.optim.Optimizer, epochs: int = 1,
                  train_step: TrainStep | None = None, loss_fn: Callable | None = None,
                  per_ticket_state: bool = True, device=None, progress: bool = True,
                  callbacks: Sequence[Callable[[dict], object]] = (), checkpoint_dir=None,
                  write_back: bool | None = None) -> dict:
    """Stage 2: retrain all tickets jointly over the shared weights (masks frozen).

    Args:
        routed: the RoutedModel (its current tickets are used).
        subsets: ``{ticket: DataLoader}`` (or a list); ticket ids must be in [0, K).
        optimizer: an optimizer over ``routed.parameters()``; with ``per_ticket_state`` it is cloned
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
    from rtl_plugin.routed import RoutedModel
    if not isinstance(routed, RoutedModel):
        raise TypeError(f"joint_retrain() needs a RoutedModel, got {type(routed).__name__}.")
    if not isinstance(epochs, int) or epochs < 0:
        raise DataError(f"epochs must be an int >= 0, got {epochs!r}.")
    loaders = normalize_subsets(subsets)
    bad = [k for k in loaders if k >= routed.num_tickets]
    if bad:
        raise TicketError(f"subsets name tickets {bad} but the model routes {routed.num_tickets} tickets (0..{routed.num_tickets - 1}).")
    from rtl_plugin.training import distributed as dist_
    loaders = dist_.prepare(routed, loaders)  # torchrun: rank 0's state everywhere, this rank's data shards
    step = train_step or default_train_step(loss_fn)
    opts = {k: clone_optimizer(optimizer) for k in loaders} if per_ticket_state else {k: optimizer for k in loaders}
    auto_write_back = write_back is None
    if auto_write_back:  # decided before a checkpoint fills the optimizer states
        write_back = train_step is not None or loss_fn is not None or \
            write_back_needed(routed, list(opts.values()), per_ticket_state)
    elif not isinstance(write_back, bool):
        raise TypeError(f"write_back must be True, False or None (auto), got {write_back!r}.")
    elif not write_back and write_back_needed(routed, list(opts.values()), per_ticket_state):
        import warnings
        warnings.warn("joint_retrain(write_back=False) with an optimizer setup that can move weights outside the "
                      "stepping ticket (shared state, weight decay, channel mode or a non-listed optimizer): the "
                      "masked-update guarantee does not hold; use write_back=None.", UserWarning, stacklevel=2)
    views = dist_.ticket_views(routed, loaders)  # torchrun: DDP (gradients averaged over ranks, synced norms)
    history: dict = {"loss": [], "steps": 0}
    first, finished = 0, False
    ck = None
    if checkpoint_dir is not None:
        ck = (checkpoint_dir, _retrain_config(routed, loaders, optimizer, per_ticket_state))
        got = _load_retrain(ck, routed, loaders, opts)
        if got is not None:
            if auto_write_back:  # restored optimizer state/settings are not known to be safe: keep the guarantee
                write_back = True
            first, finished, history = got
    M = max(len(dl) for dl in loaders.values())
    bar = _progress(total=max(epochs - first, 0) * M * len(loaders), desc="joint retrain", enabled=progress)
    was = routed.training
    routed.train()
    updates: dict[int, MaskedUpdate] = {}   # one per ticket (masks are fixed while retraining)
    updates_version = (id(routed.tickets), routed.tickets.version)
    snap_buffers: dict = {}                 # one snapshot buffer per parameter, shared by the tickets
    try:
        for epoch in range(first, 0 if finished else epochs):
            sums = {k: 0.0 for k in loaders}
            counts = {k: 0 for k in loaders}
            for _, k, batch in balanced_cyclic_batches(loaders):
                batch = _to_device(batch, device)
                if (id(routed.tickets), routed.tickets.version) != updates_version:  # masks changed: rebuild
                    updates, updates_version = {}, (id(routed.tickets), routed.tickets.version)
                    if auto_write_back:  # states hold moments on entries the tickets no longer own
                        write_back = True
                if k not in updates:
                    updates[k] = MaskedUpdate(routed, k, buffers=snap_buffers, write_back=write_back)
                with updates[k]:
                    loss = step(views[k], batch, opts[k])
                if loss is not None and not math.isfinite(float(loss)):
                    raise RTLError(f"non-finite loss in ticket {k}; lower the learning rate or check the data.")
                sums[k] += float(loss or 0.0) * getattr(views[k], "loss_weight", 1.0)  # torchrun: shard share
                counts[k] += 1
                history["steps"] += 1
                bar.update(1)
            history["loss"].append(dist_.all_mean([sums[k] / max(counts[k], 1) for k in sorted(loaders)]))
            bar.set_postfix(loss=f"{sum(history['loss'][-1]) / len(loaders):.4f}")
            stop = dist_.any_rank(any(cb({"epoch": epoch, "loss": history["loss"][-1]}) == "stop" for cb in callbacks))
            if ck is not None:
                _save_retrain(ck, routed, loaders, opts, history, epoch + 1, stop)
            if stop:
                break
    finally:
        bar.close()
        routed.train(was)
    return history


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
    from rtl_plugin.routed import RoutedModel
    if not isinstance(routed, RoutedModel):
        raise TypeError(f"mixed_route_retrain() needs a RoutedModel, got {type(routed).__name__}.")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer over routed.parameters(), got {type(optimizer).__name__}.")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise DataError(f"epochs must be an int >= 0, got {epochs!r}.")
    if len(loader) == 0:
        raise DataError("mixed_route_retrain got an empty loader; it needs at least one (x, y, route) batch.")
    step = train_step or default_train_step(loss_fn)
    K = routed.num_tickets
    guard = MaskedUpdate(routed, None, owned=union_param_masks(routed))
    history: dict = {"loss": [], "steps": 0}
    bar = _progress(total=epochs * len(loader), desc="mixed-route retrain", enabled=progress)
    was = routed.training
    routed.train()
    try:
        for _ in range(epochs):
            total, n = 0.0, 0
            for batch in loader:
                if not isinstance(batch, (tuple, list)) or len(batch) != 3:
                    raise DataError("mixed_route_retrain needs (x, y, route) batches; add each sample's ticket id "
                                    "as a third tensor (e.g. TensorDataset(x, y, context)).")
                x, y, route = _to_device(tuple(batch), device)
                if not isinstance(route, torch.Tensor) or route.dim() != 1 or route.shape[0] != x.shape[0] \
                        or route.dtype not in (torch.int64, torch.int32):
                    raise DataError(f"route must be an integer tensor [B] with one ticket id per sample, got "
                                    f"{getattr(route, 'shape', type(route))} for a batch of {x.shape[0]}.")
                if bool((route < 0).any()) or bool((route >= K).any()):
                    raise DataError(f"route holds ticket ids outside [0, {K}); the model has {K} tickets.")
                route = route.long()
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
    from rtl_plugin.persist.checkpoint import loaders_config, masks_sha256
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
    from rtl_plugin.persist.checkpoint import capture_rng, encode, save_bundle
    tensors = {f"model/{k}": v for k, v in routed.model.state_dict().items()}
    optim = {name: encode(o.state_dict(), tensors, f"optim/{name}") for name, o in _distinct_opts(opts).items()}
    meta = {"epochs_done": epochs_done, "stopped": stopped, "history": history, "optimizers": optim,
            "rng": capture_rng(loaders, tensors)}
    from rtl_plugin.training.distributed import on_main_process
    on_main_process(save_bundle, ck[0], "retrain", tensors, meta, config=ck[1])  # rank 0 writes, all wait


def _load_retrain(ck, routed, loaders, opts):
    """Restore model, optimizers and RNG states from ``ck``'s folder; ``(epochs_done, stopped, history)`` or None."""
    from rtl_plugin.persist.checkpoint import CheckpointMismatchError, decode, load_bundle, restore_rng
    from rtl_plugin.errors import CorruptFileError
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


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    from rtl_plugin.training.distributed import is_main_process
    return tqdm(total=total, desc=desc, disable=not enabled or not is_main_process(), leave=False, dynamic_ncols=True)


def retrain_tickets(routed, theta: dict, tickets, data, *, lr: float, epochs: int, schedule: str = "sequential",
                    **kw) -> float:
    """Rewind ``routed`` to the weights ``theta``, set ``tickets``, jointly retrain them with a fresh Adam(``lr``)
    for ``epochs`` and leave the model in eval mode; returns the retraining wall time in seconds.
    ``schedule="sequential"``: :func:`joint_retrain` on ``data`` = ``{ticket: DataLoader}``; ``"mixed"``:
    :func:`mixed_route_retrain` on ``data`` = a loader of ``(x, y, route)``. ``kw`` goes to that function
    (train_step, device, progress, ...)."""
    import time
    retrain = {"sequential": joint_retrain, "mixed": mixed_route_retrain}.get(schedule)
    if retrain is None:
        raise DataError(f"schedule must be 'sequential' or 'mixed', got {schedule!r}.")
    routed.model.load_state_dict(theta)
    routed.set_tickets(tickets)
    t = time.perf_counter()
    retrain(routed, data, optimizer=torch.optim.Adam(routed.parameters(), lr=lr), epochs=epochs, **kw)
    seconds = time.perf_counter() - t
    routed.eval()
    return seconds
