"""Routers: context, learned gate, nearest centroid, run-all detectors; FLOPs, registry, errors."""
import pytest
import torch
from torch import nn

import rtl_plugin as rtl
from rtl_plugin.errors import DataError, RouteError
from rtl_plugin.routing.routers import (CentroidRouter, ContextRouter, LearnedRouter, RouterReport, RunAllRouter,
                                create_router, flops_share, list_routers, model_flops, pooled_features,
                                positive_score, register_router, route_accuracy, router_report)


def three_domains(n: int, seed: int = 0):
    """Easy 3-domain images [n, 3, 32, 32]: plain noise / brighter noise / horizontal stripes."""
    g = torch.Generator().manual_seed(seed)
    d = torch.arange(n) % 3
    x = 0.5 * torch.randn(n, 3, 32, 32, generator=g)
    x[d == 1] += 1.0
    x[d == 2] += torch.sin(6 * torch.linspace(-1, 1, 32)).view(1, 1, 32, 1)
    return x, d


@pytest.fixture(scope="module")
def data():
    return three_domains(600, 0), three_domains(300, 1)


# --------------------------------------------------------------------------- learned / centroid


@pytest.mark.parametrize("name", ["learned", "centroid"])
def test_cheap_routers_learn_easy_domains(data, name):
    (x, d), (xt, dt) = data
    router = create_router(name, num_tickets=3).fit(x, d, seed=0)
    assert not router.training
    pred = router(xt)
    assert pred.dtype == torch.int64 and pred.shape == (300,)
    assert router.accuracy(xt, dt) > 0.9
    assert route_accuracy(pred, dt) == router.accuracy(xt, dt)


def test_learned_router_deterministic_and_leaves_global_rng(data):
    (x, d), (xt, _) = data
    state = torch.get_rng_state()
    a = LearnedRouter(3).fit(x, d, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = LearnedRouter(3).fit(x, d, seed=3)
    c = LearnedRouter(3).fit(x, d, seed=4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert torch.equal(a(xt), b(xt))
    assert not torch.equal(a.net[0].weight, c.net[0].weight)
    # full-batch path (N <= batch_size) is deterministic too
    e = LearnedRouter(3, epochs=5).fit(x[:90], d[:90], seed=1)
    f = LearnedRouter(3, epochs=5).fit(x[:90], d[:90], seed=1)
    assert torch.equal(e.net[2].weight, f.net[2].weight)


def test_state_dict_round_trip(data):
    (x, d), (xt, _) = data
    for cls in (LearnedRouter, CentroidRouter):
        r = cls(3).fit(x, d, epochs=20) if cls is LearnedRouter else cls(3).fit(x, d)
        fresh = cls(3, input_shape=(3, 32, 32))
        fresh.load_state_dict(r.state_dict())
        assert torch.equal(fresh(xt), r(xt))


def _wave_domains(n, seed):
    g = torch.Generator().manual_seed(seed)
    d = torch.arange(n) % 3
    t = torch.linspace(0, 1, 800)
    x = 0.3 * torch.randn(n, 800, generator=g)
    x[d == 1] += 1.0                                                    # DC offset
    x[d == 2] += torch.where(t < 0.5, 1.0, -1.0)                        # step
    return x, d


@pytest.mark.parametrize("layout", ["wave", "wave_ch", "spec"])
def test_audio_layouts(layout):
    x, d = _wave_domains(300, 0)
    xt, dt = _wave_domains(150, 1)
    if layout == "wave_ch":                                             # [B, C, L]
        x, xt = x.unsqueeze(1).repeat(1, 2, 1), xt.unsqueeze(1).repeat(1, 2, 1)
    elif layout == "spec":                                              # [B, C, T, F]
        x, xt = x.view(300, 1, 40, 20), xt.view(150, 1, 40, 20)
    for name in ("learned", "centroid"):
        r = create_router(name, num_tickets=3).fit(x, d)
        assert r.accuracy(xt, dt) > 0.9, (layout, name)
    dim = pooled_features(x[:2]).shape[1]
    assert dim == {"wave": 64, "wave_ch": 128, "spec": 16}[layout]


def test_pooled_features_shapes():
    assert pooled_features(torch.randn(2, 3, 32, 32)).shape == (2, 48)
    assert pooled_features(torch.randn(2, 3, 32, 32), pool=2).shape == (2, 12)
    assert pooled_features(torch.randn(2, 1000), bins=10).shape == (2, 10)
    assert pooled_features(torch.randn(2, 2, 3, 16, 16)).shape == (2, 96)


# --------------------------------------------------------------------------- FLOPs


def test_flops_per_sample_formula_and_share_vs_resnet18(data):
    import timm
    import torch_pruning as tp
    (x, d), _ = data
    r = LearnedRouter(3, hidden=32).fit(x, d, epochs=2)
    D, H, K = 48, 32, 3
    expected = 3 * 32 * 32 + D + 2 * D + 2 * (D * H + H * K) + (H + K) + H + K
    assert r.flops_per_sample((3, 32, 32)) == expected
    resnet = timm.create_model("resnet18", num_classes=10)
    ex = torch.randn(2, 3, 32, 32)
    macs, _ = tp.utils.count_ops_and_params(resnet, ex[:1])
    assert model_flops(resnet, ex) == int(2 * macs)                     # FLOPs = 2 x tp's MACs
    share = flops_share(r, resnet, ex)
    assert 0 < share < 0.01
    assert share == pytest.approx(expected / (2 * macs))
    c = CentroidRouter(3).fit(x, d)
    assert 0 < flops_share(c, resnet, ex) < 0.01
    # example_input= is the deprecated name of example_inputs (the name rtl.wrap and torch-pruning use)
    with pytest.warns(DeprecationWarning, match="example_inputs"):
        assert model_flops(resnet, example_input=ex) == model_flops(resnet, example_inputs=ex)
    with pytest.warns(DeprecationWarning, match="example_inputs"):
        assert flops_share(r, resnet, example_input=ex) == share
    with pytest.raises(RouteError, match="not both"), pytest.warns(DeprecationWarning):
        model_flops(resnet, ex, example_input=ex)
    assert ContextRouter(3).flops_per_sample((3, 32, 32)) == 0
    with pytest.raises(DataError, match="without the batch dim"):
        r.flops_per_sample((0, 32))


# --------------------------------------------------------------------------- context


def test_context_router():
    r = create_router("context", num_tickets=3)
    x = torch.randn(4, 3, 8, 8)
    ids = torch.tensor([0, 2, 1, 2])
    assert torch.equal(r(x, context=ids), ids)
    assert r(x, context=1).tolist() == [1, 1, 1, 1]
    assert r.accuracy(x, ids) == 1.0
    assert r.accuracy(x, ids, context=torch.tensor([0, 2, 1, 0])) == 0.75
    named = ContextRouter(2, names=["digits", "faces"])
    assert named(x[:3], context=["faces", "digits", "faces"]).tolist() == [1, 0, 1]
    with pytest.raises(RouteError, match="known context"):
        r(x)
    with pytest.raises(RouteError, match="outside"):
        r(x, context=torch.tensor([0, 1, 3, 0]))
    with pytest.raises(RouteError, match="outside"):
        r(x, context=5)
    with pytest.raises(DataError, match="one ticket id per sample"):
        r(x, context=torch.tensor([0, 1]))
    with pytest.raises(RouteError, match="integer dtype"):
        r(x, context=torch.tensor([0.0, 1.0, 1.0, 0.0]))
    with pytest.raises(RouteError, match="unknown contexts"):
        named(x[:1], context=["cats"])
    assert r.fit(x, ids) is r


# --------------------------------------------------------------------------- run all detector tickets


class FakeDetectors(nn.Module):
    """Ticket k scores sample b as -(mean(x_b) - k)^2: the best ticket is round(mean(x_b))."""
    num_tickets = 4

    def forward(self, x, route=None):
        return -(x.flatten(1).mean(1, keepdim=True) - route) ** 2     # [B, 1]


def test_run_all_router_argmax_semantics():
    model = FakeDetectors()
    r = create_router("all", num_tickets=4, model=model)
    x = torch.stack([torch.full((2, 3), float(v)) for v in (0, 3, 1, 2, 3)])
    assert r(x).tolist() == [0, 3, 1, 2, 3]
    assert r.scores(x).shape == (5, 4)
    assert r.accuracy(x, torch.tensor([0, 3, 1, 2, 3])) == 1.0
    assert list(r.parameters()) == [] and r.state_dict() == {}
    with pytest.raises(RouteError, match="num_tickets"):
        RunAllRouter(3, model=model)
    with pytest.raises(RouteError, match="RoutedModel"):
        RunAllRouter(3, model=nn.Linear(2, 2))
    bad = RunAllRouter(4, model=model, score_fn=lambda out: out)       # [B, 1] not [B]
    with pytest.raises(RouteError, match="one score per sample"):
        bad(x)


def test_run_all_router_on_routed_model(make_tiny):
    torch.manual_seed(0)
    tiny = make_tiny(num_classes=2)
    routed = rtl.wrap(tiny, 3, example_inputs=torch.randn(1, 3, 8, 8), output_layers=["head"])
    routed.set_tickets(rtl.TicketSet.random(routed.space, 3, keep=0.5, seed=0))
    routed.train()
    r = RunAllRouter(3, model=routed)
    x = torch.randn(16, 3, 8, 8)
    pred = r(x)
    assert routed.training                                              # flag restored
    routed.eval()
    with torch.no_grad():
        manual = torch.stack([routed(x, route=k)[:, 1] - routed(x, route=k)[:, 0] for k in range(3)], 1)
    torch.testing.assert_close(r.scores(x), manual)
    assert torch.equal(pred, manual.argmax(1))
    one = model_flops(routed, x)
    assert r.flops_per_sample((3, 8, 8)) == 3 * one + 3
    assert flops_share(r, routed, x) == pytest.approx(3.0, rel=1e-3)   # K x the model
    custom = RunAllRouter(3, model=routed, score_fn=lambda out: out[:, 0])
    with torch.no_grad():
        neg = torch.stack([routed(x, route=k)[:, 0] for k in range(3)], 1)
    assert torch.equal(custom(x), neg.argmax(1))


def test_positive_score():
    assert positive_score(torch.tensor([1.0, -2.0])).tolist() == [1.0, -2.0]
    assert positive_score(torch.tensor([[1.0], [-2.0]])).tolist() == [1.0, -2.0]
    assert positive_score(torch.tensor([[1.0, 3.0], [0.0, -2.0]])).tolist() == [2.0, -2.0]
    with pytest.raises(RouteError, match="score_fn"):
        positive_score(torch.zeros(2, 3))


# --------------------------------------------------------------------------- registry, errors, reports


def test_registry():
    assert list_routers() == ["all", "centroid", "context", "gate", "learned"]
    r = create_router("learned", num_tickets=2, hidden=8, pool=2)
    assert isinstance(r, LearnedRouter) and r.hidden == 8 and r.pool == 2 and r.name == "learned"
    with pytest.raises(RouteError, match="unknown router"):
        create_router("oracle", num_tickets=2)
    with pytest.raises(RouteError, match="already registered"):
        register_router("learned")(CentroidRouter)
    with pytest.raises(RouteError, match="num_tickets"):
        create_router("learned", num_tickets=0)
    with pytest.raises(RouteError, match="hidden"):
        LearnedRouter(2, hidden=0)


def test_errors(data):
    (x, d), _ = data
    with pytest.raises(RouteError, match="not fitted"):
        LearnedRouter(3)(x)
    with pytest.raises(RouteError, match="not fitted"):
        CentroidRouter(3)(x)
    with pytest.raises(RouteError, match="outside"):
        LearnedRouter(2).fit(x, d)                                      # ids up to 2 with K=2
    with pytest.raises(DataError, match="one ticket id per sample"):
        LearnedRouter(3).fit(x, d[:-1])
    with pytest.raises(RouteError, match="integer dtype"):
        CentroidRouter(3).fit(x, d.float())
    with pytest.raises(DataError, match="float tensor"):
        LearnedRouter(3).fit(x.long(), d)
    with pytest.raises(DataError, match="empty batch"):
        LearnedRouter(3).fit(x[:0], d[:0])
    with pytest.raises(DataError, match="no training samples"):
        CentroidRouter(4).fit(x, d)
    r = CentroidRouter(3).fit(x, d)
    with pytest.raises(DataError, match="pooled features"):
        r(torch.randn(2, 1, 32, 32))


def test_route_accuracy_and_report(data):
    (x, d), (xt, dt) = data
    assert route_accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])) == 0.75
    with pytest.raises(DataError, match="both be"):
        route_accuracy(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(RouteError, match="integer"):
        route_accuracy(torch.tensor([0.0]), torch.tensor([0]))
    with pytest.raises(DataError, match="no samples"):
        route_accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    c = CentroidRouter(3).fit(x, d)
    rep = router_report(c, xt, dt)
    assert isinstance(rep, RouterReport) and rep.name == "centroid" and rep.accuracy > 0.9
    d_ = rep.to_dict()
    assert set(d_) == {"name", "accuracy", "flops_share"} and d_["flops_share"] != d_["flops_share"]  # NaN
    assert RouterReport("x", 0.5, 0.01).to_dict() == {"name": "x", "accuracy": 0.5, "flops_share": 0.01}


def test_learned_router_on_another_device_than_input_raises(data):
    (x, ids), _ = data
    router = LearnedRouter(int(ids.max()) + 1, epochs=2).fit(x, ids)
    router.to("meta")
    with pytest.raises(RouteError, match="router.to"):
        router(x)
