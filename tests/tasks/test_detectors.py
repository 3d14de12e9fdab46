"""One-vs-rest detector tickets (the paper's vision protocol): loaders, train steps, run-all scores."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import rtl_plugin as rtl
from rtl_plugin.tasks.classification.detectors import (OneVsRestBatchSampler, detector_logits, detector_scores, detector_train_step,
                                  multilabel_train_step, one_vs_rest_loaders)
from rtl_plugin.errors import DataError
from rtl_plugin.tasks.metrics import detector_metrics
from rtl_plugin.pruning.pruner import RTLPruner
from rtl_plugin.training.retrain import joint_retrain


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster, and avoids oversubscribing a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(n_per_class=(12, 7, 20, 9), shape=(3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(n_per_class)])
    y = y[torch.randperm(len(y), generator=g)]
    x = torch.randn(len(y), *shape, generator=g)
    return x, y


def _epoch(loader):
    return [tuple(t.clone() for t in b) for b in loader]


# --------------------------------------------------------------------------- loaders
def test_loader_balance_exactly_half_positives_and_batch_format():
    x, y = _data()
    loaders = one_vs_rest_loaders(x, y, num_classes=4, batch_size=6, seed=3)
    assert sorted(loaders) == [0, 1, 2, 3]
    for k, dl in loaders.items():
        n_pos = int((y == k).sum())
        batches = _epoch(dl)
        assert len(batches) == len(dl) == -(-2 * n_pos // 6)
        targets = torch.cat([b[1] for b in batches])
        assert targets.dtype == torch.float32
        assert targets.numel() == 2 * n_pos and int(targets.sum()) == n_pos  # exactly 50% positives
        for xb, t, c in batches:
            assert xb.shape[1:] == x.shape[1:] and t.shape == c.shape == (xb.shape[0],)
            assert c.dtype == torch.long and bool((c == k).all())
            assert xb.shape[0] <= 6
            if xb.shape[0] == 6:
                assert int(t.sum()) == 3  # even batch: exactly half positives in every full batch
        # targets match the samples' true labels, every positive appears exactly once per epoch
        idx = torch.cat([torch.as_tensor(b) for b in dl.batch_sampler.epoch_indices()])
        assert torch.equal(torch.sort(idx[y[idx] == k]).values, (y == k).nonzero().flatten())
        assert bool((y[idx[y[idx] != k]] != k).all())
        assert len(set(idx.tolist())) == idx.numel()  # negatives drawn without replacement


def test_loader_targets_agree_with_labels():
    x, y = _data()
    x = x + y.view(-1, 1, 1, 1).float() * 100  # class is readable from the input
    loaders = one_vs_rest_loaders(x, y, num_classes=4, batch_size=5, seed=1)
    for k, dl in loaders.items():
        for xb, t, _ in dl:
            cls = torch.round(xb.mean((1, 2, 3)) / 100).long()
            assert torch.equal(t, (cls == k).float())


def test_loader_determinism_and_resampling():
    x, y = _data()
    a = one_vs_rest_loaders(x, y, num_classes=4, batch_size=8, seed=7)
    b = one_vs_rest_loaders(x, y, num_classes=4, batch_size=8, seed=7)
    c = one_vs_rest_loaders(x, y, num_classes=4, batch_size=8, seed=8)
    e1a, e1b, e1c = _epoch(a[1]), _epoch(b[1]), _epoch(c[1])
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(e1a, e1b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(e1a, e1c))
    e2a = _epoch(a[1])  # next epoch: negatives resampled, still balanced
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(e1a, e2a))
    assert int(torch.cat([t for _, t, _ in e2a]).sum()) == int((y == 1).sum())
    # set_epoch replays an epoch
    a[1].batch_sampler.set_epoch(0)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(_epoch(a[1]), e1a))


def test_loader_negative_ratio_and_small_negative_pool():
    y = torch.tensor([0] * 10 + [1] * 3)
    s = OneVsRestBatchSampler(y, 0, batch_size=4, negatives_per_positive=1)
    idx = torch.cat([torch.as_tensor(b) for b in s])
    assert int((y[idx] == 0).sum()) == 10 and int((y[idx] == 1).sum()) == 10  # 3 negatives cycled
    s2 = OneVsRestBatchSampler(y, 1, batch_size=4, negatives_per_positive=2)
    idx2 = torch.cat([torch.as_tensor(b) for b in s2])
    assert int((y[idx2] == 1).sum()) == 3 and int((y[idx2] == 0).sum()) == 6


def test_loader_accepts_numpy():
    x, y = _data()
    loaders = one_vs_rest_loaders(x.numpy(), y.numpy(), num_classes=4, batch_size=4)
    xb, t, c = next(iter(loaders[2]))
    assert isinstance(xb, torch.Tensor) and c.dtype == torch.long


@pytest.mark.parametrize("kw, match", [
    (dict(num_classes=1), "num_classes"),
    (dict(num_classes=4, batch_size=0), "batch_size"),
    (dict(num_classes=4, negatives_per_positive=0), "negatives_per_positive"),
    (dict(num_classes=4, negatives_per_positive=float("nan")), "negatives_per_positive"),
    (dict(num_classes=3), "outside"),
    (dict(num_classes=6), r"classes \[4, 5\] have no training sample"),
])
def test_loader_validation(kw, match):
    x, y = _data()
    kw = {"batch_size": 4, **kw}
    with pytest.raises(DataError, match=match):
        one_vs_rest_loaders(x, y, **kw)


def test_loader_validation_labels():
    x, y = _data()
    with pytest.raises(DataError, match="integer class ids"):
        one_vs_rest_loaders(x, y.float(), num_classes=4, batch_size=4)
    with pytest.raises(DataError, match="one label per sample"):
        one_vs_rest_loaders(x, y[:-1], num_classes=4, batch_size=4)
    with pytest.raises(DataError, match="empty"):
        one_vs_rest_loaders(x[:0], y[:0], num_classes=4, batch_size=4)


# --------------------------------------------------------------------------- train steps
class _Lin(nn.Module):
    def __init__(self, d=6, k=3):
        super().__init__()
        self.fc = nn.Linear(d, k)

    def forward(self, x):
        return self.fc(x)


def _toy(n=60, k=3, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    centers = torch.randn(k, d, generator=g) * 3
    return centers[y] + 0.3 * torch.randn(n, d, generator=g), y


def test_detector_step_reduces_loss_and_trains_only_its_output():
    torch.manual_seed(0)
    x, y = _toy()
    model = _Lin()
    head0 = model.fc.weight.detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    step = detector_train_step()
    dl = one_vs_rest_loaders(x, y, num_classes=3, batch_size=10, seed=0)[1]
    first = [step(model, b, opt) for b in dl]
    for _ in range(15):
        last = [step(model, b, opt) for b in dl]
    assert np.mean(last) < 0.5 * np.mean(first)
    # only output 1 received gradient: rows 0 and 2 of the head are untouched (Adam with zero grads)
    assert torch.equal(model.fc.weight[0], head0[0]) and torch.equal(model.fc.weight[2], head0[2])
    assert not torch.equal(model.fc.weight[1], head0[1])


def test_detector_step_custom_loss_and_errors():
    model = _Lin()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 6)
    calls = []

    def loss_fn(logit, target):
        calls.append(logit.shape)
        return ((logit - target) ** 2).mean()
    detector_train_step(loss_fn)(model, (x, torch.ones(4), torch.zeros(4, dtype=torch.long)), opt)
    assert calls == [torch.Size([4])]
    step = detector_train_step()
    with pytest.raises(DataError, match=r"\(x, target, class_idx\) batches"):
        step(model, (x, torch.zeros(4, dtype=torch.long)), opt)
    with pytest.raises(DataError, match="outside the model's 3 outputs"):
        step(model, (x, torch.ones(4), torch.full((4,), 3)), opt)
    with pytest.raises(DataError, match="target must be"):
        step(model, (x, torch.ones(3), torch.zeros(4, dtype=torch.long)), opt)
    with pytest.raises(DataError, match="integer"):
        step(model, (x, torch.ones(4), torch.zeros(4)), opt)
    with pytest.raises(DataError, match="callable"):
        detector_train_step(3)


def test_detector_logits_gathers():
    out = torch.arange(12.).view(4, 3)
    assert torch.equal(detector_logits(out, torch.tensor([0, 2, 1, 2])), torch.tensor([0., 5., 7., 11.]))
    with pytest.raises(DataError, match=r"logits \[B, num_classes\]"):
        detector_logits(torch.zeros(4), torch.zeros(4, dtype=torch.long))


def test_multilabel_step_reduces_loss_and_matches_one_hot_bce():
    torch.manual_seed(0)
    x, y = _toy()
    model = _Lin()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    step = multilabel_train_step()
    m0 = copy.deepcopy(model)
    l0 = step(m0, (x, y), torch.optim.SGD(m0.parameters(), lr=0.0))
    with torch.no_grad():
        ref = nn.functional.binary_cross_entropy_with_logits(model(x), nn.functional.one_hot(y, 3).float())
    assert abs(l0 - float(ref)) < 1e-6
    losses = [step(model, (x, y), opt) for _ in range(40)]
    assert losses[-1] < 0.3 * losses[0]
    with pytest.raises(DataError, match="outside the model's 3 outputs"):
        step(model, (x, torch.full_like(y, 3)), opt)
    with pytest.raises(DataError, match="integer class ids"):
        step(model, (x, y.float()), opt)
    with pytest.raises(DataError, match=r"\(x, y\) batches"):
        step(model, x, opt)


# --------------------------------------------------------------------------- run-all scores
def test_detector_scores_shape_and_equal_to_each_ticket_alone(make_tiny):
    K = 4
    routed = rtl.wrap(make_tiny(num_classes=K, seed=1), K, example_inputs=torch.randn(1, 3, 8, 8))
    routed.set_tickets(rtl.TicketSet.random(routed.space, K, keep=0.5, seed=2))
    x, y = _data(n_per_class=(5, 6, 7, 8))
    loaders = one_vs_rest_loaders(x, y, num_classes=K, batch_size=8)
    joint_retrain(routed, loaders, optimizer=torch.optim.Adam(routed.parameters(), 1e-2), epochs=1,
                  train_step=detector_train_step(), progress=False)  # per-ticket BN statistics differ
    routed.train()
    s = detector_scores(routed, x, batch_size=7)
    assert s.shape == (len(x), K) and s.dtype == torch.float32
    assert routed.training  # mode restored
    routed.eval()
    with torch.no_grad():
        for k in range(K):
            plain = routed.plain_copy(k).eval()
            masked = {n: w * routed.tickets.masks[n][k] for n, w in routed.prunable_weights().items()}
            with torch.no_grad():
                for n, w in masked.items():
                    plain.get_submodule(n).weight.copy_(w)
            assert torch.allclose(s[:, k], plain(x)[:, k], atol=1e-5)
            assert torch.allclose(s[:, k], routed(x, route=k)[:, k], atol=1e-6)
    # metrics accept the scores directly
    m = detector_metrics(s, y)
    assert set(m) >= {"balanced_accuracy", "auc", "argmax_accuracy"}


def test_detector_scores_validation(make_tiny):
    routed = rtl.wrap(make_tiny(num_classes=2), 3, example_inputs=torch.randn(1, 3, 8, 8))
    x = torch.randn(5, 3, 8, 8)
    with pytest.raises(DataError, match="C > 2"):
        detector_scores(routed, x)  # 3 tickets, 2 outputs: ticket 2 has no output of its own
    with pytest.raises(DataError, match="batch_size"):
        detector_scores(routed, x, batch_size=0)
    with pytest.raises(DataError, match="non-empty"):
        detector_scores(routed, x[:0])
    with pytest.raises(TypeError, match="RoutedModel"):
        detector_scores(make_tiny(), x)


def test_detector_tickets_learn_end_to_end(make_tiny):
    """Search + joint retraining with the detector step on separable data gives good detectors."""
    K = 3
    g = torch.Generator().manual_seed(0)
    y = torch.arange(90) % K
    x = torch.randn(90, 3, 8, 8, generator=g) * 0.5
    x[:, :, :, :] += (y.view(-1, 1, 1, 1).float() - 1) * 1.5  # class = brightness
    routed = rtl.wrap(make_tiny(num_classes=K, seed=0), K, example_inputs=torch.randn(1, 3, 8, 8))
    loaders = one_vs_rest_loaders(x, y, num_classes=K, batch_size=10, seed=0)
    RTLPruner(routed, sparsities=[0.5], prune_fraction=0.5, progress=False).find_tickets(
        loaders, train_step=detector_train_step(), optimizer_factory=lambda p: torch.optim.Adam(p, 1e-2))
    assert abs(float(routed.tickets.sparsity().mean()) - 0.5) < 1e-3
    joint_retrain(routed, loaders, optimizer=torch.optim.Adam(routed.parameters(), 1e-2), epochs=8,
                  train_step=detector_train_step(), progress=False)
    m = detector_metrics(detector_scores(routed, x), y)
    assert m["auc"] > 0.9 and m["argmax_accuracy"] > 0.7


def test_sampler_validation():
    with pytest.raises(DataError, match="no sample"):
        OneVsRestBatchSampler(torch.tensor([1, 1, 2]), 0, batch_size=2)
    with pytest.raises(DataError, match="needs negatives"):
        OneVsRestBatchSampler(torch.tensor([0, 0]), 0, batch_size=2)
    with pytest.raises(DataError, match="batch_size"):
        OneVsRestBatchSampler(torch.tensor([0, 1]), 0, batch_size=0)
