"""Learned tickets: scores, exact binarisation, the annealing schedule, the straight-through estimator, and
learn_tickets' guarantees (frozen backbone bit-identical, determinism, ordinary TicketSet masks)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import rtl_plugin as rtl
from rtl_plugin.errors import DataError, RouteError, SparsityError, TicketError
from rtl_plugin.pruning import StraightThrough, TicketScores, sparsity_schedule
from rtl_plugin.pruning.ranking import channel_weight_sparsity
from rtl_plugin.routing import Gate
from rtl_plugin.training import learn_tickets, recalibrate_norms
from conftest import GroupedCNN, TINY_INPUT


def _wrap(model, gran, K=2):
    return rtl.wrap(model, K, example_inputs=torch.randn(*TINY_INPUT), granularity=gran, adapter="generic",
                    output_layers=["head"])


def _loader(n=32, K=2, seed=0, groups=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    d = torch.arange(n) % K
    ds = TensorDataset(x, y, d) if groups else TensorDataset(x, y)
    return DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- straight-through estimator


def test_ste_weight_gradient_is_w_times_effective_weight_gradient(make_tiny):
    """dL/ds = W * dL/dW_eff at every entry, including the weights ticket k's mask drops (checked against a plain
    copy whose effective weights are leaves)."""
    routed = _wrap(make_tiny(), "weight")
    scores = TicketScores.from_magnitude(routed)
    routed.set_tickets(scores.binarize(0.5))
    routed.eval()
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    with StraightThrough(routed, scores) as ste:
        F.cross_entropy(ste(x, route=1), y).backward()
    plain = routed.plain_copy(1).eval()
    leaves = {}
    for n in routed.space.layers:
        mod = plain.get_submodule(n)
        leaves[n] = (routed.prunable_weights()[n].detach() * routed.tickets.masks[n][1]).requires_grad_()
        del mod.weight
        mod.weight = leaves[n]
    F.cross_entropy(plain(x), y).backward()
    for n in routed.space.layers:
        expected = routed.prunable_weights()[n].detach() * leaves[n].grad
        got = scores.ticket(1)[n].grad
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
        dropped = ~routed.tickets.masks[n][1]
        assert float(got[dropped].abs().sum()) > 0, f"{n}: no gradient reaches the scores of dropped weights"
        assert scores.ticket(0)[n].grad is None, "ticket 0 did not run and must get no gradient"


def test_ste_channel_gradient_matches_float_mask_reference(make_tiny):
    """Channel mode: the score gradient equals the gradient w.r.t. float channel masks applied where the routed
    model applies them (conv out, bn out, next layer's input); it reaches the kept channels' scores."""
    routed = _wrap(make_tiny(), "channel")
    scores = TicketScores.from_magnitude(routed)
    routed.set_tickets(scores.binarize(0.4))
    routed.eval()
    x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 5, (5,))
    with StraightThrough(routed, scores) as ste:
        F.cross_entropy(ste(x, route=0), y).backward()
    plain = routed.plain_copy(0).eval()
    m1 = routed.tickets.masks["conv1"][0].float().requires_grad_()
    m2 = routed.tickets.masks["conv2"][0].float().requires_grad_()
    v = lambda m: m.view(1, -1, 1, 1)  # noqa: E731
    h = torch.relu(plain.bn1(plain.conv1(x) * v(m1)) * v(m1))
    h = torch.relu(plain.bn2(plain.conv2(h * v(m1)) * v(m2)) * v(m2))
    F.cross_entropy(plain.head(h.mean((2, 3)) * m2), y).backward()
    torch.testing.assert_close(scores.ticket(0)["conv1"].grad, m1.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scores.ticket(0)["conv2"].grad, m2.grad, rtol=1e-5, atol=1e-7)
    kept = routed.tickets.masks["conv1"][0]
    assert float(m1.grad[kept].abs().sum()) > 0
    # a dropped channel is masked at every layer it touches, so no site sees it alive: its gradient is zero
    assert float(scores.ticket(0)["conv1"].grad[~kept].abs().sum()) == 0.0


@pytest.mark.parametrize("gran", ["weight", "channel"])
def test_ste_forward_equals_routed_forward_and_hooks_go(make_tiny, gran):
    routed = _wrap(make_tiny(), gran, K=3)
    scores = TicketScores.random(routed.space, 3, seed=1)
    routed.set_tickets(scores.binarize(0.5))
    routed.eval()
    x, route = torch.randn(6, 3, 8, 8), torch.tensor([2, 0, 1, 1, 0, 2])
    with torch.no_grad():
        ref = routed(x, route=route)
    with StraightThrough(routed, scores) as ste:
        assert torch.equal(ste(x, route=route), ref)
        with pytest.raises(RouteError, match="per-pixel"):
            ste(x, route=torch.zeros(6, 8, 8, dtype=torch.long))
    with torch.no_grad():
        assert torch.equal(routed(x, route=route), ref), "hooks left behind"
    with pytest.raises(TicketError, match="not installed"):
        StraightThrough(routed, scores)(x, route=0)


def test_ste_refuses_foreign_scores(make_tiny):
    a, b = _wrap(make_tiny(), "weight"), _wrap(make_tiny(), "channel")
    with pytest.raises(TicketError, match="another ticket space"):
        StraightThrough(a, TicketScores.from_magnitude(b))
    with pytest.raises(TicketError, match="RoutedModel"):
        StraightThrough(make_tiny(), TicketScores.from_magnitude(a))


# --------------------------------------------------------------------------- binarisation and schedule


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("target", [0.0, 0.37, 0.9, 0.99])
def test_weight_binarisation_is_exact(make_tiny, scope, target):
    routed = _wrap(make_tiny(), "weight", K=3)
    scores = TicketScores.random(routed.space, 3, seed=4)
    ts = scores.binarize(target, scope=scope)
    assert isinstance(ts, rtl.TicketSet) and ts.num_tickets == 3
    n = routed.space.num_weights
    assert ts.kept().tolist() == [n - round(target * n)] * 3
    for m in ts.masks.values():
        assert bool(m.reshape(3, -1).any(1).all()), "a layer lost every weight"
    if scope == "layer" and target > 0:
        for name, m in ts.masks.items():
            layer_sp = 1 - m[0].float().mean().item()
            assert abs(layer_sp - target) < 2.0 / m[0].numel() + 1e-9, name
    top = scores.ticket(0)
    flat = torch.cat([top[k].detach().flatten() for k in scores.keys])
    kept = torch.cat([ts.masks[k][0].flatten() for k in scores.keys])
    if scope == "global" and 0 < target < 0.99:
        assert float(flat[kept].min()) >= float(flat[~kept].max()), "kept scores must be the highest"


def test_magnitude_scores_start_at_global_magnitude_pruning(make_tiny):
    routed = _wrap(make_tiny(), "weight")
    ts = TicketScores.from_magnitude(routed).binarize(0.7)
    mags = torch.cat([w.detach().abs().flatten() for w in routed.prunable_weights().values()])
    kept = torch.cat([ts.masks[n][1].flatten() for n in routed.space.layers])
    assert float(mags[kept].min()) >= float(mags[~kept].max())
    assert all(torch.equal(m[0], m[1]) for m in ts.masks.values()), "every ticket starts from the same scores"
    by_layer = TicketScores.from_magnitude(routed, normalize="layer").binarize(0.7)
    shares = [float(m[0].float().mean()) for m in by_layer.masks.values()]
    assert max(shares) - min(shares) < 0.15  # layer-normalised scores spread the budget evenly
    with pytest.raises(TicketError, match="normalize"):
        TicketScores.from_magnitude(routed, normalize="max")


def test_per_ticket_targets_and_validation(make_tiny):
    routed = _wrap(make_tiny(), "weight", K=2)
    scores = TicketScores.from_magnitude(routed)
    ts = scores.binarize([0.2, 0.8])
    n = routed.space.num_weights
    assert ts.kept().tolist() == [n - round(0.2 * n), n - round(0.8 * n)]
    for bad in (1.0, -0.1, [0.5], "x"):
        with pytest.raises(SparsityError):
            scores.binarize(bad)
    with pytest.raises(SparsityError, match="scope"):
        scores.binarize(0.5, scope="row")


@pytest.mark.parametrize("target", [0.3, 0.6, 0.8])
def test_channel_binarisation_reaches_target_with_fewest_channels(make_grouped, target):
    routed = _wrap(make_grouped(), "channel", K=2)
    scores = TicketScores.random(routed.space, 2, seed=3)
    ts = scores.binarize(target)
    space = routed.space
    for k in range(2):
        sp = float(ts.sparsity()[k])
        assert sp >= target - 1e-12
        masks = {n: m[k] for n, m in ts.masks.items()}
        for g in space.groups:  # grouped layers keep the same positions in each channel group
            v = masks[g.root].view(g.ch_groups, g.period)
            assert bool((v == v[:1]).all())
        # putting back the highest-scoring dropped channel falls below the target (fewest channels)
        best = max(((float(scores.ticket(k)[g.root][p].detach()), g, p) for g in space.groups for p in range(g.period)
                    if not bool(masks[g.root][p])), key=lambda t: t[0])
        _, g, p = best
        back = {n: m.clone() for n, m in masks.items()}
        back[g.root].view(g.ch_groups, g.period)[:, p] = True
        assert channel_weight_sparsity(space, back) < target


def test_sparsity_schedule_anneals_cubically_to_final():
    s = sparsity_schedule(0.9, 11, initial=0.0, anneal_fraction=0.5)
    assert s[0] == 0.0 and s[5:] == [0.9] * 6 and s[-1] == 0.9
    assert all(b >= a for a, b in zip(s, s[1:]))
    assert s[1] == pytest.approx(0.9 * (1 - 0.8 ** 3))
    assert sparsity_schedule(0.5, 1) == [0.5]
    assert sparsity_schedule(0.5, 4, anneal_fraction=0.0) == [0.5] * 4
    with pytest.raises(SparsityError, match="exceeds"):
        sparsity_schedule(0.5, 3, initial=0.6)
    with pytest.raises(SparsityError):
        sparsity_schedule(0.5, 0)


# --------------------------------------------------------------------------- learn_tickets


def test_every_binarisation_is_exact_and_follows_the_schedule(make_tiny):
    routed = _wrap(make_tiny(), "weight")
    res = learn_tickets(routed, _loader(), sparsity=0.8, epochs=3, binarize_every=2, anneal_fraction=0.6)
    n = routed.space.num_weights
    steps = [b.step for b in res.history]
    assert steps == list(range(0, 12, 2)) + [12]
    targets = [b.target for b in res.history]
    assert targets == sparsity_schedule(0.8, len(steps), anneal_fraction=0.6)
    assert targets[0] == 0.0 and targets[-1] == 0.8 and targets[1] > 0
    for b in res.history:
        for sp in b.sparsity:
            assert round((1 - sp) * n) == n - round(b.target * n), b
    assert res.tickets is routed.tickets and res.steps == 12 and len(res.losses) == 12


@pytest.mark.parametrize("gran", ["weight", "channel"])
def test_frozen_backbone_is_bit_identical(make_grouped, gran):
    routed = _wrap(make_grouped(), gran)
    before = {k: v.clone() for k, v in routed.model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in routed.named_parameters()}
    res = learn_tickets(routed, _loader(), sparsity=0.5, epochs=2, binarize_every=2, norm_stats="frozen",
                        gate=Gate(2))
    after = routed.model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{k} changed with a frozen backbone"
    assert {n: p.requires_grad for n, p in routed.named_parameters()} == flags, "requires_grad not restored"
    assert all(p.grad is None for p in routed.parameters())
    assert any(not torch.equal(m[0], torch.ones_like(m[0])) for m in res.tickets.masks.values())
    # the default per-ticket norm statistics change buffers only, never a weight
    learn_tickets(routed, _loader(), sparsity=0.5, epochs=1, binarize_every=2)
    for n, p in routed.model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_cotrained_backbone_and_trainable_head_change(make_tiny):
    routed = _wrap(make_tiny(), "weight")
    w0 = routed.model.conv1.weight.detach().clone()
    h0 = routed.model.head.weight.detach().clone()
    learn_tickets(routed, _loader(), sparsity=0.5, epochs=1, trainable=["head"], backbone_lr=1e-2)
    assert torch.equal(routed.model.conv1.weight, w0) and not torch.equal(routed.model.head.weight, h0)
    learn_tickets(routed, _loader(), sparsity=0.5, epochs=1, backbone="train", backbone_lr=1e-2)
    assert not torch.equal(routed.model.conv1.weight, w0)


@pytest.mark.parametrize("gran", ["weight", "channel"])
def test_same_seed_same_masks(make_tiny, gran):
    def run(seed):
        routed = _wrap(make_tiny(), gran)
        return learn_tickets(routed, _loader(), sparsity=0.6, epochs=2, binarize_every=3, init="random",
                             routing="gate", gate=Gate(2), gumbel=True, seed=seed).tickets
    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert any(not torch.equal(a.masks[n], c.masks[n]) for n in a.masks)


@pytest.mark.parametrize("gran", ["weight", "channel"])
def test_learned_masks_export_save_load_and_diagnose(make_tiny, gran, tmp_path):
    routed = _wrap(make_tiny(), gran)
    learn_tickets(routed, _loader(), sparsity=0.5, epochs=2, binarize_every=2)
    routed.eval()
    x = torch.randn(3, 3, 8, 8)
    for k in range(2):
        slim = rtl.export_ticket(routed, k).eval()
        torch.testing.assert_close(slim(x), routed(x, route=k), rtol=1e-5, atol=1e-6)
    routed.save(tmp_path / "run")
    loaded = rtl.load(tmp_path / "run", make_tiny()).eval()
    for n, m in routed.tickets.masks.items():
        assert torch.equal(loaded.tickets.masks[n], m)
    torch.testing.assert_close(loaded(x, route=1), routed(x, route=1))
    d = rtl.diagnose(routed)
    assert d.params["total"] == routed.space.num_weights


def test_learn_tickets_validation(make_tiny):
    routed = _wrap(make_tiny(), "weight")
    with pytest.raises(DataError, match="routing='gate'"):
        learn_tickets(routed, _loader(groups=False), sparsity=0.5)
    with pytest.raises(RouteError, match="needs gate"):
        learn_tickets(routed, _loader(groups=False), sparsity=0.5, routing="gate")
    with pytest.raises(RouteError, match="routes 3 tickets"):
        learn_tickets(routed, _loader(), sparsity=0.5, gate=Gate(3))
    with pytest.raises(SparsityError):
        learn_tickets(routed, _loader(), sparsity=1.2)
    with pytest.raises(DataError, match="backbone"):
        learn_tickets(routed, _loader(), sparsity=0.5, backbone="half")
    with pytest.raises(DataError, match="not a module"):
        learn_tickets(routed, _loader(), sparsity=0.5, trainable=["nope"])
    with pytest.raises(TicketError, match="RoutedModel"):
        learn_tickets(make_tiny(), _loader(), sparsity=0.5)
    with pytest.raises(SparsityError, match="binarize_every"):
        learn_tickets(routed, _loader(), sparsity=0.5, binarize_every=0)


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.head = torch.nn.Linear(12, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x))))


def test_recalibrate_norms_per_ticket_and_singletons():
    """Per-ticket statistics are the average over each ticket's samples; a ticket with no sample keeps its own;
    1-D norms never see a lone sample (in recalibration, or in training where a lone sample sits out)."""
    torch.manual_seed(0)
    routed = rtl.wrap(_MLP(), 3, example_inputs=torch.randn(2, 12), adapter="generic", output_layers=["head"])
    before = routed.model.bn.running_mean.clone()
    x = torch.randn(9, 12) + 3.0
    route = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1])  # ticket 1: a lone sample; ticket 2: none
    seen = recalibrate_norms(routed, [(x, route)], lambda b: b)
    assert seen == [8, 0, 0]
    expected = routed.model.fc(x[:8]).detach().mean(0)
    torch.testing.assert_close(routed.model.bn.running_mean[0], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(routed.model.bn.running_mean[1:], before[1:])
    data = [(torch.randn(5, 12), torch.randint(0, 3, (5,)), torch.tensor([0, 0, 1, 1, 2]))]
    res = learn_tickets(routed, data, sparsity=0.5, epochs=2, binarize_every=1)  # ticket 2 alone: no crash
    assert len(res.losses) == 2
