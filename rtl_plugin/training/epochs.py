"""The resumable epoch loop that ``joint_retrain`` and ``mixed_route_retrain`` share: argument checks
(epochs, callbacks, LR scheduler), the per-epoch callbacks (a "stop" on any rank stops every rank), the LR
scheduler (per epoch or per optimizer step), the progress bar, and opt-in checkpoints (rank 0 writes after
every epoch: model state, optimizer states, scheduler state, RNG states, history; a rerun resumes)."""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from rtl_plugin.errors import CallbackError, CorruptFileError, DataError, OptimizerError
from rtl_plugin.persist.checkpoint import (CheckpointMismatchError, capture_rng, decode, encode, load_bundle,
                                           loaders_config, masks_sha256, restore_rng, save_bundle)
from rtl_plugin.training import distributed
from rtl_plugin.training.loop import progress_bar

__all__ = ["check_epochs", "as_callbacks", "check_scheduler", "Checkpoint", "run_epochs", "SCHEDULER_INTERVALS"]

SCHEDULER_INTERVALS = ("epoch", "step")


def check_epochs(epochs, *, where: str) -> int:
    """``epochs`` if it is an int >= 0 (a bool is refused: ``epochs=True`` is a typo, not one epoch)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise DataError(f"{where}: epochs must be an int >= 0, got {epochs!r}.")
    return epochs


def as_callbacks(callbacks, *, where: str) -> list[Callable[[dict], object]]:
    """``callbacks`` as a list: None, one callable, or a sequence of callables ``cb({"epoch", "loss"})``."""
    if callbacks is None:
        return []
    cbs = [callbacks] if callable(callbacks) else callbacks
    if isinstance(cbs, (str, bytes)) or not isinstance(cbs, Sequence):
        raise CallbackError(f"{where}: callbacks must be a callable cb(event) or a list of them, got "
                            f"{type(callbacks).__name__}.")
    bad = [type(cb).__name__ for cb in cbs if not callable(cb)]
    if bad:
        raise CallbackError(f"{where}: every callback must be callable as cb(event: dict) -> 'stop' | None; got "
                            f"{', '.join(bad)}.")
    for cb in cbs:
        if hasattr(cb, "on_round_end"):
            warnings.warn(f"{where} got {type(cb).__name__}, a pruning-round callback (it has on_round_end): "
                          "retraining keeps the masks frozen and only calls cb({'epoch', 'loss'}) after each epoch, "
                          "so it watches nothing here; pass it to the ticket search (callbacks= of the pruner).",
                          UserWarning, stacklevel=3)
    return list(cbs)


def check_scheduler(scheduler, optimizer, interval: str, *, where: str):
    """``scheduler`` (None or a torch LR scheduler built on ``optimizer``) after checking ``interval``."""
    if interval not in SCHEDULER_INTERVALS:
        raise DataError(f"{where}: scheduler_interval must be 'epoch' or 'step', got {interval!r}.")
    if scheduler is None:
        return None
    if not isinstance(scheduler, (LRScheduler, ReduceLROnPlateau)):
        raise OptimizerError(f"{where}: scheduler must be a torch.optim.lr_scheduler scheduler built on the optimizer "
                             f"you pass (e.g. StepLR(optimizer, step_size=10)), got {type(scheduler).__name__}.")
    groups = getattr(getattr(scheduler, "optimizer", None), "param_groups", None)
    if groups is not optimizer.param_groups:
        raise OptimizerError(f"{where}: the scheduler is built on another optimizer, so it would not change this "
                             "training's learning rate; build it on the optimizer you pass as optimizer=.")
    if isinstance(scheduler, ReduceLROnPlateau) and interval != "epoch":
        raise DataError(f"{where}: ReduceLROnPlateau steps on the epoch's mean loss; use scheduler_interval='epoch'.")
    return scheduler


class Checkpoint:
    """One retraining's checkpoint folder: bundle ``name`` for the run ``config``."""

    def __init__(self, directory, name: str, config: dict):
        self.directory, self.name, self.config = directory, name, config

    @staticmethod
    def config_of(kind: str, routed, loaders: dict, optimizer, scheduler, **extra) -> dict:
        cfg = {"kind": kind, "fingerprint": routed.space.fingerprint, "granularity": routed.granularity,
               "num_tickets": routed.num_tickets, "masks_sha256": masks_sha256(routed.tickets),
               "tickets": sorted(loaders), "loaders": loaders_config(loaders),
               "optimizer": type(optimizer).__qualname__, **extra}
        if scheduler is not None:  # only then: checkpoints written without a scheduler keep their config
            cfg["scheduler"] = type(scheduler).__qualname__
        return cfg

    def save(self, routed, loaders, optimizers: dict, scheduler, history, epochs_done: int, stopped: bool) -> None:
        tensors = {f"model/{k}": v for k, v in routed.model.state_dict().items()}
        optim = {name: encode(sd, tensors, f"optim/{name}") for name, sd in optimizers.items()}
        meta = {"epochs_done": epochs_done, "stopped": stopped, "history": history, "optimizers": optim,
                "rng": capture_rng(loaders, tensors)}
        if scheduler is not None:
            try:
                meta["scheduler"] = encode(scheduler.state_dict(), tensors, "scheduler")
            except TypeError as e:
                raise OptimizerError(f"the LR scheduler's state cannot be checkpointed without pickle ({e}); use a "
                                    "scheduler whose state is numbers and lists, or no checkpoint_dir.") from e
        distributed.on_main_process(save_bundle, self.directory, self.name, tensors, meta, config=self.config)

    def load(self, routed, loaders, scheduler):
        """``(optimizer state dicts by name, epochs_done, stopped, history)`` after restoring the model, the
        scheduler and the RNG states; None when the folder holds no checkpoint yet."""
        got = load_bundle(self.directory, self.name, config=self.config)
        if got is None:
            return None
        tensors, meta = got
        try:
            state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
            optim = {name: decode(sd, tensors) for name, sd in meta["optimizers"].items()}
            sched = decode(meta["scheduler"], tensors) if scheduler is not None else None
            loss = meta["history"]["loss"]
            history = {"loss": [list(map(float, row)) if isinstance(row, list) else float(row) for row in loss],
                       "steps": int(meta["history"]["steps"])}
            epochs_done, stopped = int(meta["epochs_done"]), bool(meta["stopped"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"the retraining checkpoint in {self.directory} is damaged ({e!r}); delete it to "
                                   "start over.") from e
        try:
            with torch.no_grad():
                routed.model.load_state_dict(state, strict=True)
            if scheduler is not None:
                scheduler.load_state_dict(sched)
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointMismatchError(f"the retraining checkpoint in {self.directory} does not fit this model "
                                          f"({e}); use another checkpoint_dir.") from e
        restore_rng(loaders, tensors, meta["rng"])
        return optim, epochs_done, stopped, history


def _step_scheduler(scheduler, loss) -> None:
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step(loss)
    else:
        scheduler.step()


def run_epochs(routed, epoch_fn, *, epochs: int, first: int, finished: bool, history: dict, callbacks: list,
               scheduler, scheduler_interval: str, progress_total: int, desc: str, progress: bool,
               save: Callable[[dict, int, bool], None] | None, mean_loss: Callable[[object], float]) -> dict:
    """Epochs ``first .. epochs - 1`` of ``epoch_fn(bar, after_step) -> (loss, steps)`` in training mode.

    ``after_step`` (None unless the scheduler steps per optimizer step) is called after every step. After each
    epoch: the loss (mean over ranks) is recorded, the callbacks run (a "stop" from any on any rank ends every
    rank), the per-epoch scheduler steps on ``mean_loss(loss)``, and ``save(history, epochs_done, stopped)``
    writes the checkpoint."""
    after_step = scheduler.step if scheduler is not None and scheduler_interval == "step" else None
    bar = progress_bar(total=progress_total, desc=desc, enabled=progress)
    was = routed.training
    routed.train()
    try:
        for epoch in range(first, 0 if finished else epochs):
            loss, steps = epoch_fn(bar, after_step)
            history["steps"] += steps
            history["loss"].append(distributed.all_mean(loss))
            bar.set_postfix(loss=f"{mean_loss(history['loss'][-1]):.4f}")
            answers = [cb({"epoch": epoch, "loss": history["loss"][-1]}) for cb in callbacks]  # every one runs
            stop = distributed.any_rank(any(a == "stop" for a in answers))
            if scheduler is not None and scheduler_interval == "epoch":
                _step_scheduler(scheduler, mean_loss(history["loss"][-1]))
            if save is not None:
                save(history, epoch + 1, stop)
            if stop:
                break
    finally:
        bar.close()
        routed.train(was)
    return history
