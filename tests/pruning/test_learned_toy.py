"""End to end on a toy task where two groups need different weights: two input domains with different label maps
(domain 1's labels are domain 0's shifted by one). A dense MLP pretrained on domain 0 is frozen; K = 2 learned
tickets with a jointly trained gate must route the domains apart and beat one shared learned mask and random masks
at the same sparsity."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import rtl_plugin as rtl
from rtl_plugin.pruning import TicketScores
from rtl_plugin.routing import Gate, matched_accuracy
from rtl_plugin.training import learn_tickets

CLASSES, SPARSITY, EPOCHS, BATCH = 8, 0.9, 8, 64


class MLP(nn.Module):
    def __init__(self, hidden: int = 16):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(192, hidden), nn.BatchNorm1d(hidden)
        self.fc2, self.bn2 = nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        x = F.relu(self.bn1(self.fc1(x.flatten(1))))
        return self.head(F.relu(self.bn2(self.fc2(x))))


def _toy(n, seed):
    protos = torch.randn(CLASSES, 3, 8, 8, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    c, d = torch.randint(0, CLASSES, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)
    x = protos[c] + torch.randn(n, 3, 8, 8, generator=g)
    x[:, 0] += (d == 0)[:, None, None].float()  # the domain shows in the pooled input (the gate's features)
    x[:, 1] += (d == 1)[:, None, None].float()
    return x, torch.where(d == 0, c, (c + 1) % CLASSES), d


@pytest.fixture(scope="module")
def toy():
    return _pretrained_toy()


def _pretrained_toy():
    train, test = _toy(1024, 0), _toy(512, 1)
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    xa, ya = train[0][train[2] == 0], train[1][train[2] == 0]
    for _ in range(30):  # the "pretrained" backbone knows domain 0 only
        for i in range(0, len(xa), 64):
            opt.zero_grad()
            F.cross_entropy(model(xa[i:i + 64]), ya[i:i + 64]).backward()
            opt.step()
    return model, train, test


def _wrap(model, K):
    return rtl.wrap(copy.deepcopy(model), K, example_inputs=torch.randn(2, 3, 8, 8), adapter="generic",
                    output_layers=["head"])


def _scores(routed):
    # layer-normalised magnitudes: global magnitude pruning at 90% would strip the 192-input first layer of a
    # 16-unit MLP far more than the others
    return TicketScores.from_magnitude(routed, normalize="layer")


def _loader(*tensors):
    return DataLoader(TensorDataset(*tensors), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _acc(routed, x, y, route):
    return float((routed.eval()(x, route=route).argmax(1) == y).float().mean())


def test_joint_gate_and_tickets_route_domains_and_beat_a_shared_mask(toy):
    model, (x, y, d), (xt, yt, dt) = toy
    assert _acc(_wrap(model, 1), xt[dt == 1], yt[dt == 1], 0) < 0.2  # the dense model fails domain 1
    routed, gate = _wrap(model, 2), Gate(2)
    res = learn_tickets(routed, _loader(x, y, d), sparsity=SPARSITY, epochs=EPOCHS, gate=gate, binarize_every=8,
                        scores=_scores(routed))
    assert res.gate_accuracy > 0.95 and gate.accuracy(xt, dt) > 0.95
    routed_acc = _acc(routed, xt, yt, gate(xt))
    shared = _wrap(model, 1)
    learn_tickets(shared, _loader(x, y, torch.zeros_like(d)), sparsity=SPARSITY, epochs=EPOCHS, binarize_every=8,
                  scores=_scores(shared))
    shared_acc = _acc(shared, xt, yt, 0)
    rand = _wrap(model, 2)
    rand.set_tickets(rtl.TicketSet.random(rand.space, 2, keep=1 - SPARSITY, seed=0))
    random_acc = _acc(rand, xt, yt, dt)
    assert all(abs(s - SPARSITY) < 1e-3 for t in (routed, shared) for s in t.tickets.sparsity().tolist())
    assert routed_acc > shared_acc + 0.1, (routed_acc, shared_acc)
    assert routed_acc > random_acc + 0.5, (routed_acc, random_acc)
    assert routed_acc > 0.85


def test_label_free_gate_finds_the_domains(toy):
    model, (x, y, d), (xt, yt, dt) = toy
    routed, gate = _wrap(model, 2), Gate(2)
    res = learn_tickets(routed, _loader(x, y, d), sparsity=SPARSITY, epochs=EPOCHS, routing="gate", gate=gate,
                        binarize_every=8, scores=_scores(routed))
    assert min(res.route_counts) > 0.3 * sum(res.route_counts), "a ticket starved"
    assert res.gate_accuracy > 0.8  # matched to the domains the batches carry (reported, never trained on)
    routed_acc = _acc(routed, xt, yt, gate(xt))
    assert matched_accuracy(gate(xt), dt, 2)[0] > 0.8
    assert routed_acc > 0.75, routed_acc  # a shared learned mask reaches ~0.69 here (the test above)
