"""Evaluation metrics (python floats), computed with torchmetrics.

* :func:`classification_metrics`: multiclass balanced accuracy, macro precision / recall, accuracy, macro OvR AUC;
* :func:`detector_metrics`: one-vs-rest detector tickets (the paper's protocol);
* :func:`psnr`, :func:`miou`: image restoration / segmentation.

torchmetrics is imported lazily and raises :class:`~rtl_plugin.errors.MissingDependencyError` when absent.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from rtl_plugin.errors import DataError, MissingDependencyError

__all__ = ["classification_metrics", "detector_metrics", "psnr", "miou"]

_INSTALL = 'pip install "torchmetrics>=1.0" (or pip install "rtl-plugin[audio]")'


def _tm_classification():
    try:
        import torchmetrics.functional.classification as tmc
    except ImportError as exc:
        raise MissingDependencyError(f"rtl_plugin.tasks.metrics needs torchmetrics: {_INSTALL}") from exc
    return tmc


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _tensor(a, what: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(a))
    except (TypeError, ValueError, RuntimeError):
        raise DataError(f"{what} must be a tensor or array, got {type(a).__name__}") from None


def _int_labels(y, what: str, n: int | None, num_classes: int | None) -> torch.Tensor:
    y = _tensor(y, what)
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise DataError(f"{what} must hold integer class ids, got {y.dtype}; use .long() (or argmax first)")
    if y.dim() != 1:
        raise DataError(f"{what} must be 1-D [N], got shape {tuple(y.shape)}")
    if n is not None and y.numel() != n:
        raise DataError(f"{what} has {y.numel()} labels for {n} predictions; give one label per sample")
    if y.numel() == 0:
        raise DataError(f"{what} is empty; metrics need at least one sample")
    y = y.long()
    if num_classes is not None and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise DataError(f"{what} contains class {bad}, outside [0, {num_classes}); fix the labels or num_classes")
    return y


def _scores(s, what: str) -> torch.Tensor:
    s = _tensor(s, what)
    if not s.is_floating_point():
        raise DataError(f"{what} must be a float tensor of logits / probabilities, got {s.dtype}")
    if not torch.isfinite(s).all():
        raise DataError(f"{what} contains NaN or inf; check the model outputs")
    return s.double()


def _probabilities(s: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[N, C] logits or probabilities (or [N] positive-class scores for C = 2) -> probabilities [N, C]."""
    if s.dim() == 1 or (s.dim() == 2 and s.shape[1] == 1 and num_classes == 2):
        if num_classes != 2:
            raise DataError(f"1-D scores are binary positive-class scores, but num_classes={num_classes}; "
                            "pass [N, num_classes] logits")
        s = s.reshape(-1)
        p = s if bool(((s >= 0) & (s <= 1)).all()) else torch.sigmoid(s)
        return torch.stack([1 - p, p], 1)
    if s.dim() != 2 or s.shape[1] != num_classes:
        raise DataError(f"scores must be [N, {num_classes}] (logits or probabilities), got shape {tuple(s.shape)}")
    is_prob = bool(((s >= 0) & (s <= 1)).all()) and torch.allclose(s.sum(1), torch.ones(s.shape[0], dtype=s.dtype),
                                                                   atol=1e-4)
    return s if is_prob else torch.softmax(s, 1)


def _mean(v: torch.Tensor, keep: torch.Tensor) -> float:
    return float(v[keep].double().mean()) if bool(keep.any()) else float("nan")


def classification_metrics(logits_or_probs, y, *, num_classes: int) -> dict[str, float]:
    """Multiclass metrics of scores [N, C] (logits are softmaxed; rows summing to 1 are used as is) vs y [N].

    Returns floats ``balanced_accuracy`` (mean recall over classes present in y, as sklearn's
    ``balanced_accuracy_score``), ``precision`` / ``recall`` (macro over classes present in y or the
    predictions, as sklearn's ``average="macro"``; no predictions -> 0), ``accuracy`` and ``auc``
    (macro one-vs-rest ROC AUC on the probabilities, skipping classes absent from y or covering all of
    it; NaN if none is left). ``num_classes=2`` also accepts [N] positive-class logits / probabilities.
    """
    if not _is_int(num_classes) or num_classes < 2:
        raise DataError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    s = _scores(logits_or_probs, "logits_or_probs")
    if s.dim() == 0 or s.shape[0] == 0:
        raise DataError("logits_or_probs is empty; metrics need at least one sample")
    probs = _probabilities(s, int(num_classes))
    y = _int_labels(y, "y", probs.shape[0], num_classes)
    tmc = _tm_classification()
    c = int(num_classes)
    pred = probs.argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recall = tmc.multiclass_recall(pred, y, num_classes=c, average="none")
        precision = tmc.multiclass_precision(pred, y, num_classes=c, average="none")
        accuracy = tmc.multiclass_accuracy(pred, y, num_classes=c, average="micro")
        auc = tmc.multiclass_auroc(probs.float(), y, num_classes=c, average="none")
    support = torch.bincount(y, minlength=c)
    in_true = support > 0
    used = in_true | (torch.bincount(pred, minlength=c) > 0)
    auc_ok = in_true & (support < y.numel())
    return {
        "balanced_accuracy": _mean(recall, in_true),
        "precision": _mean(precision, used),
        "recall": _mean(recall, used),
        "accuracy": float(accuracy),
        "auc": _mean(auc, auc_ok),
    }


def detector_metrics(scores, y, *, threshold: float = 0.0) -> dict[str, float]:
    """One-vs-rest detector tickets: scores [N, K] (ticket k's positive logit for class k) vs y [N] in [0, K).

    The paper's protocol: for every class k, a binary detection over the whole set (positive
    ``scores[:, k] > threshold``, default 0 on logits, vs ``y == k``); ``balanced_accuracy``,
    ``precision`` (no detections -> 0), ``recall`` and ``auc`` are macro-averaged over the classes that
    have positives (balanced accuracy and AUC also need negatives). ``argmax_accuracy`` is the
    accuracy of routing each sample to its highest-scoring ticket (the RunAllRouter decision).
    """
    s = _scores(scores, "scores")
    if s.dim() != 2 or s.shape[0] == 0 or s.shape[1] < 1:
        raise DataError(f"scores must be [N, K] positive-class logits, one column per ticket, got {tuple(s.shape)}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise DataError(f"threshold must be a number, got {threshold!r}")
    n, k = s.shape
    y = _int_labels(y, "y", n, k)
    tmc = _tm_classification()
    ba, prec, rec, auc = (torch.full((k,), float("nan"), dtype=torch.float64) for _ in range(4))
    has_pos = torch.zeros(k, dtype=torch.bool)
    has_both = torch.zeros(k, dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in range(k):
            target = (y == c).long()
            pred = (s[:, c] > threshold).long()
            npos = int(target.sum())
            has_pos[c] = npos > 0
            has_both[c] = 0 < npos < n
            rec[c] = float(tmc.binary_recall(pred, target))
            prec[c] = float(tmc.binary_precision(pred, target))
            if has_both[c]:
                ba[c] = 0.5 * (rec[c] + float(tmc.binary_specificity(pred, target)))
                auc[c] = float(tmc.binary_auroc(s[:, c].float(), target))
    return {
        "balanced_accuracy": _mean(ba, has_both),
        "precision": _mean(prec, has_pos),
        "recall": _mean(rec, has_pos),
        "auc": _mean(auc, has_both),
        "argmax_accuracy": float((s.argmax(1) == y).double().mean()),
    }


def psnr(pred, target, data_range: float = 1.0, *, per_image: bool = False) -> float:
    """Peak signal-to-noise ratio in dB of pred vs target (same shape, e.g. [N, C, H, W]).

    One PSNR from the MSE over all elements, or with ``per_image`` the mean of per-sample PSNRs
    (dim 0 is the sample). Identical inputs give ``inf``.
    """
    p, t = _scores(pred, "pred"), _scores(target, "target")
    if p.shape != t.shape:
        raise DataError(f"pred {tuple(p.shape)} and target {tuple(t.shape)} must have the same shape")
    if p.numel() == 0:
        raise DataError("pred is empty; PSNR needs at least one element")
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or not data_range > 0:
        raise DataError(f"data_range must be a positive number (max - min of the signal), got {data_range!r}")
    if per_image and p.dim() < 2:
        raise DataError(f"per_image needs batched inputs [N, ...], got shape {tuple(p.shape)}")
    try:
        from torchmetrics.functional.image import peak_signal_noise_ratio
    except ImportError as exc:
        raise MissingDependencyError(f"psnr needs torchmetrics: {_INSTALL}") from exc
    dim = tuple(range(1, p.dim())) if per_image else None
    return float(peak_signal_noise_ratio(p, t, data_range=float(data_range), dim=dim))


def miou(pred_labels, target, num_classes: int, *, ignore_index: int | None = None) -> float:
    """Mean IoU over the whole set (one confusion matrix): pred / target int [N, H, W] (or any equal shape).

    ``pred_labels`` may also be scores [N, C, H, W] (argmax over dim 1 is taken). Classes absent from
    both pred and target are skipped; pixels equal to ``ignore_index`` in target are left out.
    """
    if not _is_int(num_classes) or num_classes < 2:
        raise DataError(f"num_classes must be an integer >= 2 (binary masks: 2), got {num_classes!r}")
    p, t = _tensor(pred_labels, "pred_labels"), _tensor(target, "target")
    if p.is_floating_point() and p.dim() == t.dim() + 1 and p.shape[1] == num_classes:
        p = p.argmax(1)
    for a, what in ((p, "pred_labels"), (t, "target")):
        if a.is_floating_point() or a.dtype == torch.bool or a.is_complex():
            raise DataError(f"{what} must hold integer class ids, got {a.dtype}; use .long() or argmax(1) first")
    if p.shape != t.shape:
        raise DataError(f"pred_labels {tuple(p.shape)} and target {tuple(t.shape)} must have the same shape")
    if p.numel() == 0:
        raise DataError("pred_labels is empty; mIoU needs at least one pixel")
    p, t = p.long().flatten(), t.long().flatten()
    if ignore_index is not None:
        if not _is_int(ignore_index):
            raise DataError(f"ignore_index must be an int or None, got {ignore_index!r}")
        keep = t != ignore_index
        p, t = p[keep], t[keep]
        if t.numel() == 0:
            raise DataError(f"every target pixel equals ignore_index={ignore_index}; nothing to score")
    for a, what in ((p, "pred_labels"), (t, "target")):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(f"{what} contains class {lo if lo < 0 else hi}, outside [0, {num_classes}); "
                            "fix the labels, num_classes or ignore_index")
    tmc = _tm_classification()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(tmc.multiclass_jaccard_index(p, t, num_classes=int(num_classes), average="macro"))
