"""The pieces every training loop of the plugin shares: the train-step contract, the default step, moving a
batch to a device, the ``{ticket: DataLoader}`` check, balanced cyclic batching and the progress bar."""
from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from rtl_plugin.errors import DataError, RTLError
from rtl_plugin.training.distributed import is_main_process

TrainStep = Callable[[nn.Module, object, torch.optim.Optimizer], float]


def to_device(batch, device):
    """``batch`` (a tensor, or lists / tuples / dicts of them) moved to ``device``; unchanged for None."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
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


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar, shown only when ``enabled`` and on the main process (torchrun: rank 0)."""
    return tqdm(total=total, desc=desc, disable=not enabled or not is_main_process(), leave=False, dynamic_ncols=True)
