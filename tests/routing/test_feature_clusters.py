"""FeatureClusters (k-means groups of a frozen model's features, for any input) and learn_tickets(groups="kmeans")."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import rtl_plugin as rtl
from rtl_plugin.errors import DataError, RouteError
from rtl_plugin.pruning import TicketScores
from rtl_plugin.routing import FeatureClusters, Gate, matched_accuracy
from rtl_plugin.training import learn_tickets

CLASSES, DIM = 6, 24


def _blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    truth = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 4, generator=g) * 0.3
    x[:, 0] += torch.where(truth == 0, 3.0, -3.0)
    return x, truth


def test_fit_recovers_separated_clusters_and_assigns_new_inputs():
    x, truth = _blobs(200, 0)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3, 4)), model.bias.zero_()
    groups = FeatureClusters.fit(model, x, 2, seed=0)
    assert groups.num_groups == 2 and groups.centroids.shape == (2, 3)
    assert torch.equal(groups(x), groups.partition.assignment)  # the fitted samples keep their cluster
    assert matched_accuracy(groups(x), truth, 2)[0] == 1.0
    xn, tn = _blobs(50, 1)
    assert matched_accuracy(groups(xn), tn, 2)[0] == 1.0  # new inputs join the nearest centroid
    before = groups(xn)
    with torch.no_grad():
        model.weight.mul_(-1)  # training the original model does not move the groups (frozen copy)
    assert torch.equal(groups(xn), before)


def test_feature_clusters_validation():
    x, _ = _blobs(40, 0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    routed = rtl.wrap(copy.deepcopy(model), 2, example_inputs=x[:2], adapter="generic")
    with pytest.raises(DataError, match="plain_copy"):
        FeatureClusters.fit(routed, x, 2)
    with pytest.raises(DataError, match="num_clusters"):
        FeatureClusters.fit(model, x, 0)
    groups = FeatureClusters.fit(model, x, 2)
    with pytest.raises(DataError, match="float batch"):
        groups(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(DataError, match="embed to"):
        FeatureClusters(nn.Linear(5, 2), groups.centroids, groups.partition)(torch.randn(3, 5))


class MLP(nn.Module):
    """timm-style forward_features / forward_head, so embed() reads the hidden features."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(DIM, hidden), nn.BatchNorm1d(hidden)
        self.fc2, self.bn2 = nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, CLASSES)

    def forward_features(self, x):
        return F.relu(self.bn2(self.fc2(F.relu(self.bn1(self.fc1(x))))))

    def forward_head(self, f, pre_logits: bool = False):
        return f if pre_logits else self.head(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _toy(n, seed):
    """Two domains with different label maps (domain 1: label + 1); domain 1 also shifts 8 input features."""
    protos = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    c, d = torch.randint(0, CLASSES, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)
    x = protos[c] + 0.5 * torch.randn(n, DIM, generator=g)
    x[:, -8:] += 8.0 * d[:, None].float()  # large enough for k-means on the backbone's features to see
    return x, torch.where(d == 0, c, (c + 1) % CLASSES), d


@pytest.fixture(scope="module")
def pretrained():
    (x, y, d), test = _toy(768, 0), _toy(384, 1)
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(20):  # pretrained on domain 0 only
        for i in range(0, int((d == 0).sum()), 64):
            opt.zero_grad()
            F.cross_entropy(model(x[d == 0][i:i + 64]), y[d == 0][i:i + 64]).backward()
            opt.step()
    return model.eval(), (x, y, d), test


def _wrap(model, K):
    return rtl.wrap(copy.deepcopy(model), K, example_inputs=torch.randn(2, DIM), adapter="generic",
                    output_layers=["head"])


def _loader(*tensors):
    return DataLoader(TensorDataset(*tensors), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _acc(routed, x, y, route):
    return float((routed.eval()(x, route=route).argmax(1) == y).float().mean())


def test_learn_tickets_with_kmeans_groups_of_backbone_features(pretrained):
    model, (x, y, d), (xt, yt, dt) = pretrained
    routed, gate = _wrap(model, 2), Gate(2)
    res = learn_tickets(routed, _loader(x, y), groups="kmeans", gate=gate, seed=0, sparsity=0.8, epochs=10,
                        binarize_every=6, scores=TicketScores.from_magnitude(routed, normalize="layer"))
    assert isinstance(res.groups, FeatureClusters) and res.to_dict()["group_sizes"] == res.groups.partition.sizes()
    assert matched_accuracy(res.groups(x), d, 2)[0] > 0.85  # the clusters follow the domains (never given)
    assert res.gate_accuracy > 0.95  # the gate learned the clusters jointly
    assert all(abs(s - 0.8) < 1e-3 for s in routed.tickets.sparsity().tolist())
    routes = gate(xt)
    routed_acc, swapped_acc = _acc(routed, xt, yt, routes), _acc(routed, xt, yt, 1 - routes)
    assert routed_acc > 0.85, routed_acc  # the dense model gets about 0.55 (domain 1 fails)
    assert routed_acc > swapped_acc + 0.3, (routed_acc, swapped_acc)  # each ticket learned its own cluster


def test_learn_tickets_groups_validation(pretrained):
    model, (x, y, d), _ = pretrained
    routed = _wrap(model, 2)
    with pytest.raises(RouteError, match="routing='groups'"):
        learn_tickets(routed, _loader(x, y), sparsity=0.5, routing="gate", gate=Gate(2), groups="kmeans")
    with pytest.raises(DataError, match="'kmeans'"):
        learn_tickets(routed, _loader(x, y), sparsity=0.5, groups="spectral")
    with pytest.raises(RouteError, match="num_groups=2"):
        learn_tickets(routed, _loader(x, y), sparsity=0.5, groups=FeatureClusters.fit(model, x, 3))
    with pytest.raises(DataError, match="groups='kmeans'"):
        learn_tickets(routed, _loader(x, y), sparsity=0.5)
