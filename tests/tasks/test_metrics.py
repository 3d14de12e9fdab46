"""Metrics against scikit-learn references on random data."""
import math
import sys

import numpy as np
import pytest
import torch

from rtl_plugin.errors import DataError, MissingDependencyError
from rtl_plugin.tasks.metrics import classification_metrics, detector_metrics, miou, psnr

import sklearn.metrics as skm


def _random(n, c, seed, shift=1.5):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    logits = 2 * torch.randn(n, c, generator=g)
    logits[torch.arange(n), y] += shift
    return logits, y


def _sk_reference(probs: np.ndarray, y: np.ndarray, c: int) -> dict:
    pred = probs.argmax(1)
    if c == 2:
        auc = skm.roc_auc_score(y, probs[:, 1])
    else:
        auc = np.mean([skm.roc_auc_score(y == k, probs[:, k]) for k in range(c) if 0 < (y == k).sum() < len(y)])
    return {
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "precision": skm.precision_score(y, pred, average="macro", zero_division=0),
        "recall": skm.recall_score(y, pred, average="macro", zero_division=0),
        "accuracy": skm.accuracy_score(y, pred),
        "auc": auc,
    }


@pytest.mark.parametrize("c", [2, 3, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_classification_metrics_match_sklearn(c, seed):
    logits, y = _random(300, c, seed)
    probs = torch.softmax(logits.double(), 1)
    ref = _sk_reference(probs.numpy(), y.numpy(), c)
    got = classification_metrics(logits, y, num_classes=c)
    assert set(got) == set(ref)
    for k in ref:
        assert isinstance(got[k], float)
        assert got[k] == pytest.approx(ref[k], abs=1e-6), k
    # probabilities are used as is and give the same numbers
    got_p = classification_metrics(probs.float(), y, num_classes=c)
    for k in ref:
        assert got_p[k] == pytest.approx(ref[k], abs=1e-5), k
    if c == 2:                                          # [N] positive-class logits
        got_b = classification_metrics(logits[:, 1] - logits[:, 0], y, num_classes=2)
        for k in ref:
            assert got_b[k] == pytest.approx(ref[k], abs=1e-5), k
    if c == 3:
        assert skm.roc_auc_score(y.numpy(), probs.numpy(), multi_class="ovr") == pytest.approx(got["auc"], abs=1e-6)


def test_classification_metrics_absent_classes():
    logits, y = _random(200, 5, 3)
    y = torch.where(y == 4, torch.zeros_like(y), y)     # class 4 absent from y (but can be predicted)
    logits[:10, 4] += 10                                 # make sure it is predicted
    probs = torch.softmax(logits.double(), 1).numpy()
    pred = probs.argmax(1)
    got = classification_metrics(logits, y, num_classes=5)
    with pytest.warns(UserWarning):
        ref_bacc = skm.balanced_accuracy_score(y.numpy(), pred)
    assert got["balanced_accuracy"] == pytest.approx(ref_bacc, abs=1e-6)
    assert got["recall"] == pytest.approx(skm.recall_score(y.numpy(), pred, average="macro", zero_division=0), abs=1e-6)
    assert got["precision"] == pytest.approx(
        skm.precision_score(y.numpy(), pred, average="macro", zero_division=0), abs=1e-6)
    ref_auc = np.mean([skm.roc_auc_score(y.numpy() == k, probs[:, k]) for k in range(4)])
    assert got["auc"] == pytest.approx(ref_auc, abs=1e-6)
    one = classification_metrics(logits[:5], torch.zeros(5, dtype=torch.long), num_classes=5)
    assert math.isnan(one["auc"])                       # a single class in y: AUC undefined


def test_classification_metrics_errors(monkeypatch):
    logits, y = _random(20, 3, 0)
    with pytest.raises(DataError, match=r"\[N, 4\]"):
        classification_metrics(logits, y, num_classes=4)
    with pytest.raises(DataError, match="outside"):
        classification_metrics(logits, torch.full((20,), 3), num_classes=3)
    with pytest.raises(DataError, match="one label per sample"):
        classification_metrics(logits, y[:-1], num_classes=3)
    with pytest.raises(DataError, match="integer"):
        classification_metrics(logits, y.float(), num_classes=3)
    with pytest.raises(DataError, match="NaN"):
        classification_metrics(torch.full((20, 3), float("nan")), y, num_classes=3)
    with pytest.raises(DataError, match="num_classes"):
        classification_metrics(logits, y, num_classes=1)
    monkeypatch.setitem(sys.modules, "torchmetrics.functional.classification", None)
    with pytest.raises(MissingDependencyError, match="pip install"):
        classification_metrics(logits, y, num_classes=3)


@pytest.mark.parametrize("seed", [0, 1])
def test_detector_metrics_match_sklearn(seed):
    k = 4
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (400,), generator=g)
    scores = torch.randn(400, k, generator=g) - 1.0
    scores[torch.arange(400), y] += 1.5
    got = detector_metrics(scores, y)
    s, yy = scores.numpy(), y.numpy()
    ba, pr, rc, auc = [], [], [], []
    for c in range(k):
        t, p = yy == c, s[:, c] > 0
        ba.append(skm.balanced_accuracy_score(t, p))
        pr.append(skm.precision_score(t, p, zero_division=0))
        rc.append(skm.recall_score(t, p))
        auc.append(skm.roc_auc_score(t, s[:, c]))
    assert got["balanced_accuracy"] == pytest.approx(np.mean(ba), abs=1e-6)
    assert got["precision"] == pytest.approx(np.mean(pr), abs=1e-6)
    assert got["recall"] == pytest.approx(np.mean(rc), abs=1e-6)
    assert got["auc"] == pytest.approx(np.mean(auc), abs=1e-6)
    assert got["argmax_accuracy"] == pytest.approx(float((s.argmax(1) == yy).mean()))
    assert all(isinstance(v, float) for v in got.values())
    # scores that happen to lie in [0, 1] are still thresholded at 0, not at 0.5
    small = detector_metrics(torch.sigmoid(scores), y)
    assert small["recall"] == 1.0


def test_detector_metrics_errors():
    with pytest.raises(DataError, match=r"\[N, K\]"):
        detector_metrics(torch.randn(10), torch.zeros(10, dtype=torch.long))
    with pytest.raises(DataError, match="outside"):
        detector_metrics(torch.randn(10, 2), torch.full((10,), 2))


def test_psnr():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(3, 1, 16, 16, generator=g)
    p = (t + 0.05 * torch.randn(3, 1, 16, 16, generator=g)).clamp(0, 1)
    mse = ((p - t) ** 2).mean().double()
    assert psnr(p, t) == pytest.approx(float(10 * torch.log10(1.0 / mse)), rel=1e-5)
    assert psnr(2 * p, 2 * t, data_range=2.0) == pytest.approx(psnr(p, t), rel=1e-5)
    per = [float(10 * torch.log10(1.0 / ((p[i] - t[i]) ** 2).mean().double())) for i in range(3)]
    assert psnr(p, t, per_image=True) == pytest.approx(np.mean(per), rel=1e-5)
    assert psnr(t, t) == float("inf")
    with pytest.raises(DataError, match="same shape"):
        psnr(p, t[:2])
    with pytest.raises(DataError, match="data_range"):
        psnr(p, t, data_range=0)


def test_miou_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (3, 16, 16), generator=g)
    pred = torch.where(torch.rand(3, 16, 16, generator=g) < 0.6, target, torch.randint(0, 4, (3, 16, 16), generator=g))
    ref = skm.jaccard_score(target.flatten().numpy(), pred.flatten().numpy(), average="macro")
    assert miou(pred, target, 4) == pytest.approx(ref, abs=1e-6)
    # scores [N, C, H, W] are argmaxed; a class absent from both is skipped
    scores = torch.nn.functional.one_hot(pred, 6).permute(0, 3, 1, 2).float()
    assert miou(scores, target, 6) == pytest.approx(ref, abs=1e-6)
    t2 = target.clone()
    t2[0] = 255
    keep = t2.flatten() != 255
    ref2 = skm.jaccard_score(t2.flatten()[keep].numpy(), pred.flatten()[keep].numpy(), average="macro")
    assert miou(pred, t2, 4, ignore_index=255) == pytest.approx(ref2, abs=1e-6)
    with pytest.raises(DataError, match="outside"):
        miou(pred, t2, 4)
    with pytest.raises(DataError, match="same shape"):
        miou(pred[:1], target, 4)
    with pytest.raises(DataError, match="integer"):
        miou(pred.float(), target, 4)
