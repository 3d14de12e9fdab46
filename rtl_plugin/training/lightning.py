"""PyTorch Lightning: :class:`RTLCallback` runs the RTL pipeline inside a ``lightning.Trainer``.

In the spirit of Lightning's ``ModelPruning(use_lottery_ticket_hypothesis=True)``, the callback drives the phases
from epoch boundaries while the user's LightningModule only trains:

1. dense warm-up, only for ``RTLPruner(rewind=t)``: one epoch of ``t`` balanced cyclic batches on dense masks;
2. ticket search, the pruner's schedule and order: one IMP round of ticket k = rewind the shared weights to θ and
   clear the optimizer state, train ``epochs_per_round`` epochs on subset k only, prune (``pruner.prune_round``);
   the pruner's callbacks and the collapse ``monitor`` are called as in ``find_tickets``;
3. joint retraining from θ with the last target's masks, ``retrain_epochs`` epochs: balanced cyclic batches, one
   ticket per batch (``joint_retrain``'s schedule), or the mixed-route batches of ``retrain_loader``.

How the route reaches the model: the callback owns the data. Pass ``callback.train_dataloader()`` to
``trainer.fit``; each epoch it yields the current phase's batches with the route appended, ``(x, y, route)``,
``route`` a LongTensor [B] of ticket ids, and ``training_step`` calls ``self.routed(x, route=route)``
(``self.routed = pruner.routed``). The Trainer needs ``reload_dataloaders_every_n_epochs=1`` (the batch count
changes between phases) and ``max_epochs=-1``: the callback stops the Trainer when retraining ends.

Masked updates: a step pre-hook and post-hook on every optimizer of the Trainer (torch's
``Optimizer.register_step_pre_hook`` / ``register_step_post_hook``, so they wrap the real ``step()`` in automatic
and manual optimization) snapshot the entries that the tickets of the batch do not own and write them back after
the step. During ticket k's update every weight outside ticket k (in channel mode also the biases and norm affine
of its dropped channels) stays bit-identical, whatever the optimizer (momentum, weight decay). With gradient
accumulation the tickets of all accumulated batches own the step. The optimizer state is cleared at every round
and at the start of retraining, and shared by the tickets in retraining (``joint_retrain(per_ticket_state=False)``).

Not supported: several devices (use ``find_tickets`` / ``joint_retrain`` under torchrun) and resuming a Lightning
checkpoint (the search state is not in it; ``find_tickets(checkpoint_dir=)`` is crash-safe).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch

from rtl_plugin.errors import DataError, DistributedError, MissingDependencyError, OptimizerError, RTLError, \
    SearchExecutionError, TicketError
from rtl_plugin.pruning.gradients import estimate_gradients, needs_gradients
from rtl_plugin.pruning.pruner import RTLPruner
from rtl_plugin.tickets import TicketSet
from rtl_plugin.training.loop import balanced_cyclic_batches, normalize_subsets
from rtl_plugin.training.masked import MaskedUpdate, ticket_param_masks

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # the optional extra
    raise MissingDependencyError('rtl_plugin.training.lightning needs PyTorch Lightning: pip install '
                                 '"rtl-plugin[lightning]" (or pip install "lightning>=2.2").') from exc

__all__ = ["RTLCallback"]

_TRAINER_HINT = "L.Trainer(max_epochs=-1, reload_dataloaders_every_n_epochs=1, callbacks=[callback])"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _with_route(batch, k: int):
    """``(*batch, route)`` with ``route`` = ticket k for every sample."""
    if not isinstance(batch, (tuple, list)) or not batch or not isinstance(batch[0], torch.Tensor) \
            or batch[0].dim() == 0:
        raise DataError("RTLCallback's subsets must yield (x, y, ...) tuples with the input tensor [B, ...] first; "
                        "the route is appended to them.")
    return (*batch, torch.full((batch[0].shape[0],), k, dtype=torch.long))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _loss_value(outputs) -> float | None:
    """The training_step's loss (a tensor or a dict with "loss") as a float; None when there is none."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    return float(outputs.detach()) if isinstance(outputs, torch.Tensor) else None


class _PhaseBatches:
    """The train dataloader of an RTLCallback: each epoch, the batches of the phase the callback is in."""

    def __init__(self, callback: "RTLCallback"):
        self._callback = callback

    def __len__(self) -> int:
        return self._callback.epoch_length()

    def __iter__(self):
        return self._callback.epoch_batches()


def _cyclic(loaders, steps: int):
    """The first ``steps`` batches of repeated balanced cyclic epochs, with their routes."""
    done = 0
    while done < steps:
        for _, k, batch in balanced_cyclic_batches(loaders):
            yield _with_route(batch, k)
            done += 1
            if done >= steps:
                return


def _ticket_batches(loader, k: int):
    for batch in loader:
        yield _with_route(batch, k)


def _balanced_batches(loaders):
    for _, k, batch in balanced_cyclic_batches(loaders):
        yield _with_route(batch, k)


class RTLCallback(Callback):
    """Ticket search (per-ticket IMP rounds with rewinding), joint retraining and masked updates in Lightning.

    Args:
        pruner: the :class:`~rtl_plugin.RTLPruner` whose schedule (``sparsities`` / ``pruning_ratio``,
            ``iterative_steps``, ``order``, ``rewind``, ``importance``, ``callbacks``) the search follows; the
            LightningModule must hold ``pruner.routed`` and train it with the batch's route.
        subsets: ``{ticket: DataLoader}`` (or a list), one per ticket, of ``(x, y, ...)`` batches.
        epochs_per_round: epochs on ticket k's subset between two pruning rounds (T in the paper).
        retrain_epochs: epochs of joint retraining after the search (0: none).
        retrain_loader: batches ``(x, y, ..., route)`` with their own routes for retraining (e.g. mixed-route
            batches); default: balanced cyclic batches of ``subsets``, one ticket per batch.
        monitor: a collapse monitor (:class:`~rtl_plugin.diagnostics.CollapseMonitor`, any pruner callback with
            ``on_round_end``), called with the pruner's callbacks; needs ``RTLPruner(order="round")``.
        loss_fn: ``loss_fn(output, y)`` for the gradients of Taylor / Hessian importances, estimated on ticket
            k's data after its round (default cross-entropy).

    After ``trainer.fit``: ``result`` (the :class:`~rtl_plugin.pruning.SearchResult`), ``retrain_losses`` (mean
    training loss per retraining epoch) and ``pruner.routed`` holding the last target's masks.
    """

    def __init__(self, pruner: RTLPruner, subsets, *, epochs_per_round: int = 1, retrain_epochs: int = 1,
                 retrain_loader=None, monitor=None, loss_fn=None):
        if not isinstance(pruner, RTLPruner):
            raise TicketError(f"RTLCallback needs an rtl.RTLPruner, got {type(pruner).__name__}; build one with "
                              "rtl.RTLPruner(model, example_inputs, num_tickets=K, ...).")
        if pruner.search_execution != "sequential":
            raise SearchExecutionError("RTLCallback trains one ticket at a time through the Trainer; the grouped search "
                                       "is RTLPruner.find_tickets only: build the pruner with "
                                       "search_execution='sequential' (the default).")
        loaders = normalize_subsets(subsets)
        K = pruner.routed.num_tickets
        if sorted(loaders) != list(range(K)):
            raise DataError(f"the model routes K={K} tickets but subsets were given for {sorted(loaders)}; pass one "
                            "DataLoader per ticket 0..K-1.")
        for name, value, low in (("epochs_per_round", epochs_per_round, 1), ("retrain_epochs", retrain_epochs, 0)):
            if not _is_int(value) or value < low:
                raise DataError(f"{name} must be an int >= {low}, got {value!r}.")
        sized = hasattr(retrain_loader, "__iter__") and hasattr(retrain_loader, "__len__")
        if retrain_loader is not None and (not sized or len(retrain_loader) == 0 or retrain_epochs == 0):
            raise DataError("retrain_loader must be a non-empty loader of (x, y, ..., route) batches with a length, "
                            "used with retrain_epochs >= 1; or leave it None for balanced cyclic batches of subsets.")
        if loss_fn is not None and not callable(loss_fn):
            raise DataError(f"loss_fn must be callable (output, y) -> loss, got {type(loss_fn).__name__}.")
        self.callbacks = list(pruner.callbacks)
        if monitor is not None:
            if not hasattr(monitor, "on_round_end") or not callable(monitor):
                raise RTLError(f"monitor must be a pruner callback with on_round_end (e.g. rtl.CollapseMonitor()), "
                               f"got {type(monitor).__name__}.")
            if pruner.order != "round":
                raise RTLError("a collapse monitor watches all tickets round by round; build the pruner with "
                               "RTLPruner(..., order='round').")
            if monitor not in self.callbacks:
                self.callbacks.append(monitor)
        self.pruner, self.subsets, self.loss_fn = pruner, loaders, loss_fn
        self.epochs_per_round, self.retrain_epochs = epochs_per_round, retrain_epochs
        self.retrain_loader = retrain_loader
        self.warmup_steps = 0 if pruner.rewind_to == "init" else int(pruner.rewind_to)
        self.result = None
        self.retrain_losses: list[float] = []
        self._batches = _PhaseBatches(self)
        self._phase: str | None = None
        self._hooks: list = []
        self._owned_cache: dict = {}
        self._buffers: dict = {}
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._ticket, self._pos, self._moved, self._epoch_in_round = 0, 0, [], 0
        self._target, self._before, self._snapshot = None, 0.0, None
        self._pending, self._stepped, self._guard, self._losses = set(), False, None, []
        self._saved_masks = None

    def train_dataloader(self) -> _PhaseBatches:
        """The loader to pass to ``trainer.fit(module, train_dataloaders=...)``: each epoch the current phase's
        batches, each ``(x, y, ..., route)``."""
        return self._batches

    @property
    def phase(self) -> str | None:
        """The current phase: "warmup", "search", "retrain", "done", or "stopped" after a failed fit (None
        before ``trainer.fit``)."""
        return self._phase

    # ------------------------------------------------------------------ data of the current epoch
    def epoch_length(self) -> int:
        """Batches in the current phase's epoch."""
        if self._phase is None:
            raise DataError(f"RTLCallback.train_dataloader() is read outside a fit with this callback; pass the "
                            f"callback to the Trainer: {_TRAINER_HINT}.")
        if self._phase == "warmup":
            return self.warmup_steps
        if self._phase == "search":
            return len(self.subsets[self._ticket])
        if self._phase == "retrain":
            if self.retrain_loader is not None:
                return len(self.retrain_loader)
            return max(len(dl) for dl in self.subsets.values()) * len(self.subsets)
        return 0

    def epoch_batches(self):
        """An iterator over the current phase's epoch, fixed now (Lightning prefetches a batch ahead)."""
        self.epoch_length()  # the phase check
        if self._phase == "warmup":
            return _cyclic(self.subsets, self.warmup_steps)
        if self._phase == "search":
            return _ticket_batches(self.subsets[self._ticket], self._ticket)
        if self._phase == "retrain":
            return iter(self.retrain_loader) if self.retrain_loader is not None else _balanced_batches(self.subsets)
        return iter(())

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise DataError("RTLCallback changes the batches between phases; build the Trainer with "
                            f"reload_dataloaders_every_n_epochs=1: {_TRAINER_HINT}.")
        if trainer.world_size > 1:
            raise DistributedError("RTLCallback runs on one device (devices=1); for several GPUs use "
                                   "pruner.find_tickets and rtl.training.joint_retrain under torchrun.")
        if trainer.ckpt_path is not None:
            raise RTLError("RTLCallback cannot resume a Lightning checkpoint (the search state is not in it); start "
                           "a new fit, or use pruner.find_tickets(checkpoint_dir=...) for a resumable search.")
        if not any(m is self.pruner.routed for m in pl_module.modules()):
            raise RTLError("the LightningModule does not hold pruner.routed; assign it (self.routed = "
                           "pruner.routed) and call self.routed(x, route=route) in training_step.")
        self._reset_run_state()
        self.result, self.retrain_losses = None, []
        self._phase = "warmup" if self.warmup_steps > 0 else "search"

    def on_fit_start(self, trainer, pl_module) -> None:
        routed = self.pruner.routed
        owned = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        missing = [n for n, w in routed.prunable_weights().items() if id(w) not in owned]
        if missing:
            raise OptimizerError(f"the Trainer's optimizers do not train the routed weights {missing[:3]}; return an "
                                 "optimizer over self.routed.parameters() from configure_optimizers.")
        for opt in trainer.optimizers:
            self._hooks += [opt.register_step_pre_hook(self._before_step),
                            opt.register_step_post_hook(self._after_step)]
        self._reset_optimizers(trainer)
        if self._phase == "warmup":
            self._saved_masks = routed.tickets
            routed.set_tickets(TicketSet.full(routed.space, routed.num_tickets, device=routed.tickets.device))
        else:
            self._begin_search(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.train_dataloader is not self._batches:
            raise DataError("RTLCallback feeds each phase's data itself; call trainer.fit(module, "
                            "train_dataloaders=callback.train_dataloader()).")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        route = batch[-1] if isinstance(batch, (tuple, list)) and batch else None
        K = self.pruner.routed.num_tickets
        if not isinstance(route, torch.Tensor) or route.dim() != 1 or route.dtype not in (torch.int64, torch.int32):
            raise DataError("RTLCallback batches end with the route, a LongTensor [B] of ticket ids; a retrain_loader "
                            "must yield (x, y, ..., route) tuples.")
        present = torch.unique(route).tolist()
        if present and (present[0] < 0 or present[-1] >= K):
            raise DataError(f"the batch's route holds ticket ids outside [0, {K}); the model routes {K} tickets.")
        if self._stepped:  # a new accumulation window: the last one's optimizer step is done
            self._pending, self._stepped = set(), False
        self._pending.update(present)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = _loss_value(outputs)
        if loss is not None:
            self._losses.append(loss)  # this round's (search) or this epoch's (retraining)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._phase == "warmup":
            self.pruner.routed.set_tickets(self._saved_masks)
            self._saved_masks = None
            self._begin_search(trainer)
        elif self._phase == "search":
            self._epoch_in_round += 1
            if self._epoch_in_round == self.epochs_per_round:
                self._end_round(trainer, pl_module)
        elif self._phase == "retrain":
            self.retrain_losses.append(_mean(self._losses))
            self._losses = []
            if len(self.retrain_losses) == self.retrain_epochs:
                self._phase = "done"
                trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._release()
        if self._phase in ("warmup", "search"):
            self._abandon()
            raise RTLError(f"the Trainer stopped after {trainer.current_epoch} epochs, before the ticket search "
                           f"finished; the model is back to its weights and masks from before. Let the callback "
                           f"stop it: {_TRAINER_HINT}.")
        if self._phase == "retrain":
            warnings.warn(f"the Trainer stopped after {len(self.retrain_losses)} of {self.retrain_epochs} retraining "
                          f"epochs; the tickets are found but not fully retrained. Use {_TRAINER_HINT}.",
                          RuntimeWarning, stacklevel=2)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._release()
        self._abandon()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._release()

    # ------------------------------------------------------------------ masked optimizer steps
    def _owned(self, tickets: frozenset) -> list:
        """``[(parameter, mask)]``: the entries some ticket of ``tickets`` owns (all-owned parameters left out)."""
        routed = self.pruner.routed
        version = (id(routed.tickets), routed.tickets.version)
        if self._owned_cache.get("version") != version:  # the masks changed: a new round or retraining
            self._owned_cache = {"version": version}
        if tickets not in self._owned_cache:
            pairs: dict[int, tuple] = {}
            for k in sorted(tickets):
                for p, m in ticket_param_masks(routed, k):
                    prev = pairs.get(id(p))
                    pairs[id(p)] = (p, m if prev is None else prev[1] | m)
            self._owned_cache[tickets] = [(p, m) for p, m in pairs.values() if not bool(m.all())]
        return self._owned_cache[tickets]

    def _before_step(self, optimizer, args, kwargs) -> None:
        if self._phase == "warmup":
            return  # dense masks: every ticket owns every weight
        if not self._pending:
            raise RTLError("an optimizer step outside a training batch: RTLCallback cannot tell which ticket owns "
                           "it; step the optimizers only in training_step (or let Lightning do it).")
        self._guard = MaskedUpdate(self.pruner.routed, None, buffers=self._buffers,
                                   owned=self._owned(frozenset(self._pending)))
        self._guard.__enter__()

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._guard is not None:
            self._guard.__exit__(None, None, None)
            self._guard = None
        self._stepped = True

    def _release(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @staticmethod
    def _reset_optimizers(trainer) -> None:
        """Fresh optimizer state (as find_tickets' clone per round and joint_retrain's fresh optimizer)."""
        for opt in trainer.optimizers:
            opt.state.clear()

    def _abandon(self) -> None:
        """The model as it was before the fit: masks (and θ, once the search has begun)."""
        if self._saved_masks is not None:
            self.pruner.routed.set_tickets(self._saved_masks)
            self._saved_masks = None
        if self.pruner.state is not None:
            self.pruner.abandon_search()
        self._phase = "stopped"

    # ------------------------------------------------------------------ the search, round by round
    def _begin_search(self, trainer) -> None:
        self._phase = "search"
        self.pruner.begin_search(sorted(self.subsets))
        self._snapshot = self.pruner.routed.tickets.copy()  # round order: the masks at the last healthy sweep end
        self._pos, self._moved = 0, []
        self._advance(trainer)

    def _next_round(self) -> int | None:
        """The ticket of the next round (the pruner's order); None when every ticket's search is done."""
        which, pruner = sorted(self.subsets), self.pruner
        if pruner.order == "ticket":
            while self._pos < len(which):
                if pruner.record_targets(which[self._pos]) is not None:
                    return which[self._pos]
                self._pos += 1
            return None
        while True:
            while self._pos < len(which):
                k = which[self._pos]
                self._pos += 1
                if pruner.record_targets(k) is not None:
                    return k
            if not self._moved:
                return None
            self._end_sweep()
            self._pos, self._moved = 0, []

    def _advance(self, trainer) -> None:
        """Start the next round (rewind, fresh optimizer state) or finish the search and start retraining."""
        k = self._next_round()
        self._losses = []
        self._reset_optimizers(trainer)
        if k is None:
            self.result = self.pruner.finish_search()  # θ back, the last target's masks
            self._phase = "retrain" if self.retrain_epochs > 0 else "done"
            if self._phase == "done":
                trainer.should_stop = True
            return
        self._ticket, self._epoch_in_round = k, 0
        self._target, self._before = self.pruner.record_targets(k), self.pruner.ticket_sparsity(k)
        self.pruner.rewind(k)

    def _end_round(self, trainer, pl_module) -> None:
        """Ticket k's round end, as find_tickets: gradient importances, callbacks, one pruning round."""
        pruner, routed, k = self.pruner, self.pruner.routed, self._ticket
        loss = _mean(self._losses)
        if needs_gradients(pruner.importance):
            estimate_gradients(routed, k, self.subsets[k], importance=pruner.importance, loss_fn=self.loss_fn,
                               batches=pruner.importance_batches, device=pl_module.device)
        pruner.close_round(k, loss=loss, target=self._target, before=self._before, callbacks=self.callbacks)
        self._moved.append(k)
        self._advance(trainer)

    def _end_sweep(self) -> None:
        """Round order: the round-end callbacks after every ticket moved once; "stop" / "relax" give the moved
        tickets back their masks of the last healthy sweep end (as find_tickets)."""
        self._snapshot = self.pruner.end_sweep(self._moved, sorted(self.subsets), self._snapshot,
                                               callbacks=self.callbacks)
