"""One-vs-rest detector tickets: the paper's vision protocol (CIFAR-10) as a library option.

Each class ticket k is a binary detector for class k: it is trained on balanced batches of positives
(class k) and negatives (other classes), and it reads output k of a model with ``num_classes`` outputs.
At test time every ticket scores every sample (run-all); column k of :func:`detector_scores` is ticket
k's logit for "this is class k", which :func:`rtl_plugin.tasks.metrics.detector_metrics` evaluates per class
(threshold 0 on logits) and by argmax (label-free K-way routing).

* :func:`one_vs_rest_loaders` -- ``{k: DataLoader}`` of balanced ``(x, target_float, class_idx)`` batches;
* :func:`detector_train_step` -- the train step for those batches (BCE-with-logits on output ``class_idx``);
* :func:`detector_scores` -- ``[N, K]`` run-all scores of a RoutedModel;
* :func:`multilabel_train_step` -- the "IMP single" baseline: one model, K sigmoid outputs, BCE
  against one-hot labels on ordinary ``(x, y)`` batches.

Example::

    loaders = one_vs_rest_loaders(x, y, num_classes=10, batch_size=64, seed=0)
    routed = rtl.wrap(model, 10, example_inputs=x[:1])
    RTLPruner(routed, sparsities=[0.5, 0.9]).find_tickets(loaders, train_step=detector_train_step())
    joint_retrain(routed, loaders, optimizer=torch.optim.Adam(routed.parameters(), 1e-3),
                  train_step=detector_train_step())
    scores = detector_scores(routed, x_test)          # [N, 10]
    detector_metrics(scores, y_test)                  # balanced accuracy, precision, recall, AUC, argmax accuracy
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from rtl_plugin.errors import DataError
from rtl_plugin.routed import RoutedModel
from rtl_plugin.training.retrain import apply_loss

__all__ = ["one_vs_rest_loaders", "OneVsRestBatchSampler", "detector_train_step", "detector_logits",
           "detector_scores", "multilabel_train_step"]


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _as_tensor(a, what: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    try:
        return torch.as_tensor(np.asarray(a))
    except (TypeError, ValueError, RuntimeError):
        raise DataError(f"{what} must be a tensor or array, got {type(a).__name__}") from None


def _check_labels(y: torch.Tensor, what: str, n: int | None = None) -> None:
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"{what} must hold integer class ids, got {y.dtype}; use .long()")
    if y.dim() != 1:
        raise DataError(f"{what} must be 1-D [N], got shape {tuple(y.shape)}")
    if n is not None and y.shape[0] != n:
        raise DataError(f"{what} has {y.shape[0]} entries for a batch of {n}; give one label per sample")


# --------------------------------------------------------------------------- loaders
class OneVsRestBatchSampler(Sampler):
    """Index batches of one detector ticket: all positives of class ``k`` + ``negatives_per_positive`` x as many negatives.

    Every epoch (every ``iter()``) draws a fresh set of negatives, uniformly without replacement from
    the samples of the other classes (cycling through fresh permutations when more are needed than
    exist), seeded by ``(seed, k, epoch)``. Positives and negatives are stratified over the epoch, so
    each batch holds (to within one sample) the same positive share as the epoch -- exactly half for
    ``negatives_per_positive=1`` and an even ``batch_size`` -- and the samples inside a batch are
    shuffled. ``set_epoch(e)`` replays epoch ``e``.
    """

    def __init__(self, labels: torch.Tensor, k: int, *, batch_size: int, seed: int = 0,
                 negatives_per_positive: float = 1):
        labels = _as_tensor(labels, "labels").detach().cpu()
        _check_labels(labels, "labels")
        labels = labels.long()
        if not _is_int(batch_size) or batch_size < 1:
            raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
        if not float(negatives_per_positive) > 0:
            raise DataError(f"negatives_per_positive must be > 0, got {negatives_per_positive!r}")
        self.k = int(k)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.pos = (labels == self.k).nonzero().flatten()
        self.neg = (labels != self.k).nonzero().flatten()
        self.num_pos = int(self.pos.numel())
        if self.num_pos == 0:
            raise DataError(f"class {self.k} has no sample, so detector ticket {self.k} has no positives; add data for it")
        if self.neg.numel() == 0:
            raise DataError(f"every sample is class {self.k}: a one-vs-rest detector needs negatives from other classes")
        self.num_neg = max(1, int(round(self.num_pos * float(negatives_per_positive))))
        self.num_samples = self.num_pos + self.num_neg
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _generator(self) -> torch.Generator:
        # distinct, reproducible streams per (seed, ticket, epoch)
        mixed = (self.seed * 1_000_003 + self.k * 10_007 + self.epoch * 101) % (2 ** 62)
        return torch.Generator().manual_seed(mixed)

    def _negatives(self, g: torch.Generator) -> torch.Tensor:
        need, pool = self.num_neg, self.neg.numel()
        reps = [self.neg[torch.randperm(pool, generator=g)] for _ in range(math.ceil(need / pool))]
        return torch.cat(reps)[:need]

    def epoch_indices(self) -> list[torch.Tensor]:
        """The index batches of the current epoch (does not advance the epoch)."""
        g = self._generator()
        pos = self.pos[torch.randperm(self.num_pos, generator=g)]
        neg = self._negatives(g)
        # stratify: position keys (i + 0.5) / count interleave the two streams evenly over the epoch
        keys = torch.cat([(torch.arange(self.num_pos, dtype=torch.float64) + 0.5) / self.num_pos,
                          (torch.arange(self.num_neg, dtype=torch.float64) + 0.5) / self.num_neg])
        order = torch.cat([pos, neg])[torch.argsort(keys, stable=True)]
        out = []
        for chunk in order.split(self.batch_size):
            out.append(chunk[torch.randperm(chunk.numel(), generator=g)])
        return out

    def __iter__(self):
        batches = self.epoch_indices()
        self.epoch += 1
        for b in batches:
            yield b.tolist()


class _DetectorDataset(Dataset):
    """``(x[idx], (y[idx] == k).float(), full(k))`` with batched indexing (``__getitems__``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, k: int):
        self.x, self.y, self.k = x, y, int(k)
        self.tdtype = x.dtype if x.is_floating_point() else torch.float32

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i):
        xb, t, c = self.__getitems__([i])
        return xb[0], t[0], c[0]

    def __getitems__(self, idx):
        ix = torch.as_tensor(idx, dtype=torch.long, device=self.x.device)
        yb = self.y.index_select(0, ix)
        return (self.x.index_select(0, ix), (yb == self.k).to(self.tdtype),
                torch.full_like(yb, self.k))


def _collate_identity(batch):
    return batch


def one_vs_rest_loaders(x, y, *, num_classes: int, batch_size: int, seed: int = 0,
                        negatives_per_positive: float = 1) -> dict[int, DataLoader]:
    """One balanced one-vs-rest DataLoader per class ticket: ``{k: DataLoader}`` for k in ``range(num_classes)``.

    Ticket k's epoch = every sample of class k (positives) + ``negatives_per_positive`` x as many
    negatives drawn (seeded, fresh every epoch) from the other classes, stratified so each batch has
    the epoch's positive share, shuffled within the batch. Batches are
    ``(x [B, ...], target float [B] (1 = class k), class_idx long [B] (all k))``; ``class_idx`` tells
    :func:`detector_train_step` which model output ticket k trains. The loaders index ``x`` and ``y``
    in place (same device), so they suit :class:`~rtl_plugin.pruning.pruner.RTLPruner`,
    :func:`~rtl_plugin.training.retrain.joint_retrain` and the baselines' ``CyclicLoader``.

    Args:
        x: inputs [N, ...] (tensor or array).
        y: integer labels [N] in ``[0, num_classes)``; every class needs at least one sample.
        num_classes: K >= 2 (one ticket per class).
        batch_size: samples per batch (even for exactly half positives per batch).
        seed: seeds the negative draws and shuffles (same seed -> same batches).
        negatives_per_positive: negatives per positive in an epoch (> 0; 1 = balanced, the paper).

    Raises:
        DataError: bad shapes or dtypes, labels outside ``[0, num_classes)``, a class without samples,
            a non-positive batch size or ratio.
    """
    if not _is_int(num_classes) or num_classes < 2:
        raise DataError(f"num_classes must be an int >= 2 (one detector ticket per class), got {num_classes!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
    if not _is_int(seed):
        raise DataError(f"seed must be an int, got {seed!r}")
    if (isinstance(negatives_per_positive, bool) or not isinstance(negatives_per_positive, (int, float, np.number))
            or not math.isfinite(float(negatives_per_positive)) or float(negatives_per_positive) <= 0):
        raise DataError(f"negatives_per_positive must be a positive number (1 = balanced batches), "
                        f"got {negatives_per_positive!r}")
    x = _as_tensor(x, "x")
    y = _as_tensor(y, "y")
    if x.dim() < 1 or x.shape[0] == 0:
        raise DataError(f"x is empty (shape {tuple(x.shape)}); the detectors need training samples")
    _check_labels(y, "y", x.shape[0])
    y = y.long()
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(f"y contains class {lo if lo < 0 else hi}, outside [0, {num_classes}); fix the labels or num_classes")
    counts = torch.bincount(y.cpu(), minlength=num_classes)
    empty = [k for k in range(num_classes) if int(counts[k]) == 0]
    if empty:
        raise DataError(f"classes {empty} have no training sample, so their detector tickets have no positives; "
                        "add data for them or lower num_classes")
    y_dev = y.to(x.device)
    out = {}
    for k in range(num_classes):
        sampler = OneVsRestBatchSampler(y, k, batch_size=int(batch_size), seed=int(seed),
                                        negatives_per_positive=float(negatives_per_positive))
        out[k] = DataLoader(_DetectorDataset(x, y_dev, k), batch_sampler=sampler, collate_fn=_collate_identity)
    return out


# --------------------------------------------------------------------------- train steps
def _unpack_detector_batch(batch):
    if not isinstance(batch, (tuple, list)) or len(batch) < 3:
        raise DataError("detector_train_step expects (x, target, class_idx) batches, as one_vs_rest_loaders yields; "
                        "use multilabel_train_step or the default step for (x, y) batches")
    x, target, cls = batch[0], batch[1], batch[2]
    if not isinstance(target, torch.Tensor) or not isinstance(cls, torch.Tensor):
        raise DataError("target and class_idx must be tensors")
    n = x.shape[0]
    if target.dim() != 1 or target.shape[0] != n:
        raise DataError(f"target must be [B] = [{n}] floats in {{0, 1}}, got shape {tuple(target.shape)}")
    _check_labels(cls, "class_idx", n)
    return x, target, cls


def detector_logits(out, class_idx: torch.Tensor) -> torch.Tensor:
    """Logit [B] of output ``class_idx[i]`` for every sample: ``out.gather(1, class_idx[:, None])``."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise DataError(f"a detector model must return logits [B, num_classes], got "
                        f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if class_idx.numel() and (int(class_idx.min()) < 0 or int(class_idx.max()) >= out.shape[1]):
        bad = int(class_idx.min()) if int(class_idx.min()) < 0 else int(class_idx.max())
        raise DataError(f"class_idx {bad} is outside the model's {out.shape[1]} outputs; build the model with "
                        "num_classes >= the number of detector tickets")
    return out.gather(1, class_idx.to(out.device).long()[:, None]).squeeze(1)


def detector_train_step(loss_fn: Callable | None = None):
    """Train step for ``(x, target, class_idx)`` batches: ``step(model, batch, optimizer) -> float``.

    ``logit = model(x).gather(1, class_idx[:, None]).squeeze(1)``; loss ``loss_fn(logit, target)``
    (default binary cross-entropy with logits); backward; ``optimizer.step()``.
    """
    loss_fn = loss_fn or F.binary_cross_entropy_with_logits
    if not callable(loss_fn):
        raise DataError(f"loss_fn must be callable (logit [B], target [B]) -> loss, got {type(loss_fn).__name__}")

    def step(model: nn.Module, batch, optimizer: torch.optim.Optimizer) -> float:
        x, target, cls = _unpack_detector_batch(batch)
        optimizer.zero_grad(set_to_none=True)
        logit = detector_logits(model(x), cls)
        return apply_loss(loss_fn(logit, target.to(device=logit.device, dtype=logit.dtype)), optimizer)
    return step


def multilabel_train_step(loss_fn: Callable | None = None):
    """Train step of the single-model baseline ("IMP single"): ``(x, y)`` batches, K sigmoid outputs.

    Loss ``loss_fn(model(x), one_hot(y, K).float())`` (default binary cross-entropy with logits),
    where K is the model's number of outputs; every output is a one-vs-rest detector of its class.
    """
    loss_fn = loss_fn or F.binary_cross_entropy_with_logits
    if not callable(loss_fn):
        raise DataError(f"loss_fn must be callable (logits [B, K], targets [B, K]) -> loss, got {type(loss_fn).__name__}")

    def step(model: nn.Module, batch, optimizer: torch.optim.Optimizer) -> float:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DataError("multilabel_train_step expects (x, y) batches with integer class ids y")
        x, y = batch[0], batch[1]
        if not isinstance(y, torch.Tensor):
            raise DataError(f"y must be a tensor of class ids, got {type(y).__name__}")
        _check_labels(y, "y", x.shape[0])
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise DataError(f"a multilabel model must return logits [B, K], got "
                            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        K = out.shape[1]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= K):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise DataError(f"label {bad} is outside the model's {K} outputs; build it with num_classes >= {bad + 1}")
        target = F.one_hot(y.to(out.device).long(), K).to(out.dtype)
        return apply_loss(loss_fn(out, target), optimizer)
    return step


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def detector_scores(routed, x, *, batch_size: int = 256) -> torch.Tensor:
    """Run-all scores of detector tickets: float32 CPU tensor [N, K], column k = ticket k's output k.

    Every ticket runs on every sample (eval mode, no grad; the train/eval flag is restored), so the
    cost is K forward passes. ``scores.argmax(1)`` is the label-free K-way prediction (the
    RunAllRouter decision); ``rtl_plugin.tasks.metrics.detector_metrics(scores, y)`` gives the paper's metrics.
    """
    if not isinstance(routed, RoutedModel):
        raise TypeError(f"detector_scores needs a RoutedModel (rtl.wrap(model, K)), got {type(routed).__name__}")
    if not _is_int(batch_size) or batch_size < 1:
        raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
    x = _as_tensor(x, "x")
    if x.dim() < 2 or x.shape[0] == 0:
        raise DataError(f"x must be a non-empty batch [N, ...], got shape {tuple(x.shape)}")
    K = routed.num_tickets
    p = next(routed.parameters(), None)
    dev = p.device if p is not None else x.device
    out = torch.empty(x.shape[0], K, dtype=torch.float32)
    was = routed.training
    routed.eval()
    try:
        for k in range(K):  # ticket-major: the masked weights of ticket k are built once (eval cache)
            for i in range(0, x.shape[0], batch_size):
                o = routed(x[i:i + batch_size].to(dev), route=k)
                if not isinstance(o, torch.Tensor) or o.dim() != 2 or o.shape[1] <= k:
                    raise DataError(f"ticket {k} must output logits [B, C] with C > {k} (output k is detector k), "
                                    f"got {tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__}")
                out[i:i + o.shape[0], k] = o[:, k].float().cpu()
    finally:
        routed.train(was)
    return out
