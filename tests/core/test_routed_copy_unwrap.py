"""copy.deepcopy, unwrap(), merge(k) and count_ops_and_params(k) of a RoutedModel (issue #17, foot-guns closed)."""
import copy

import pytest
import torch
import torch_pruning as tp

import rtl_plugin as rtl
from rtl_plugin.norms import MaskedLayerNorm, RoutedBatchNorm
from _helpers import TinyCNN, half_tickets

K = 3
ROUTE = torch.tensor([0, 1, 2, 1, 0, 2])
MODELS = ["tiny", "efficientnet", "convnext"]  # plain BatchNorm2d, timm BatchNormAct2d, timm LayerNorm(2d)
TOL = {"tiny": 1e-5, "efficientnet": 1e-5, "convnext": 1e-4}  # mask-aware LayerNorm sums in another order


def _make_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "tiny":
        return TinyCNN()
    import timm
    return timm.create_model(f"test_{name}", num_classes=4)


def _input_shape(name: str) -> tuple:
    return {"tiny": (1, 3, 8, 8), "efficientnet": (1, 3, 16, 16), "convnext": (1, 3, 32, 32)}[name]


def _wrap(model, name: str, granularity: str) -> rtl.RoutedModel:
    kw = {"adapter": "generic", "output_layers": ["head"]} if name == "tiny" else {}
    return rtl.wrap(model, K, example_inputs=torch.randn(_input_shape(name)), granularity=granularity, **kw)


def _routed(name: str, granularity: str, seed: int = 0) -> tuple[rtl.RoutedModel, torch.Tensor]:
    """A routed model with distinct tickets and distinct per-ticket norm statistics, in eval mode, and a batch."""
    r = _wrap(_make_model(name, seed), name, granularity)
    tickets = (half_tickets(r.space, K, seed=seed + 1) if granularity == "channel"
               else rtl.TicketSet.random(r.space, K, keep=0.5, seed=seed + 1))
    r.set_tickets(tickets)
    x = torch.randn(len(ROUTE), *_input_shape(name)[1:])
    r.train()
    with torch.no_grad():
        for k in range(K):
            r(x + k, route=k)
    return r.eval(), x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _our_hooks(model: torch.nn.Module) -> list:
    """The routing hook objects (and routed norms) of ``model``: everything that holds a RouteState."""
    found = []
    for m in model.modules():
        for fn in list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values()):
            if hasattr(fn, "state"):
                found.append(fn)
        if isinstance(m, (RoutedBatchNorm, MaskedLayerNorm)):
            found.append(m)
    return found


# ----------------------------------------------------------------------------- copy.deepcopy
@pytest.mark.parametrize("granularity", ["weight", "channel"])
@pytest.mark.parametrize("name", MODELS)
def test_deepcopy_equals_the_original_and_routes_with_its_own_state(name, granularity):
    r, x = _routed(name, granularity)
    c = copy.deepcopy(r)
    with torch.no_grad():
        ref = r(x, route=ROUTE)
        assert torch.equal(c(x, route=ROUTE), ref)
    holders = _our_hooks(c)
    assert holders and all(h._state is c._state if isinstance(h, torch.nn.Module) else h.state is c._state
                           for h in holders)
    assert not {id(p) for p in c.parameters()} & {id(p) for p in r.parameters()}
    assert set(c.prunable_weights()) == set(r.prunable_weights())
    assert all(c.prunable_weights()[n] is c.model.get_submodule(n).weight for n in c.space.layers)


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_deepcopy_tickets_weights_and_statistics_are_independent(granularity):
    r, x = _routed("efficientnet", granularity)
    c = copy.deepcopy(r)
    with torch.no_grad():
        ref = r(x, route=ROUTE)
        other = (half_tickets(r.space, K, seed=9) if granularity == "channel"
                 else rtl.TicketSet.random(r.space, K, keep=0.3, seed=9))
        c.set_tickets(other)  # new tickets on the copy ...
        assert not torch.equal(c(x, route=ROUTE), ref)
        assert torch.equal(r(x, route=ROUTE), ref)  # ... leave the original alone
        c.train()
        c(x * 3, route=ROUTE)  # the copy's norm statistics move ...
        c.eval()
        assert torch.equal(r(x, route=ROUTE), ref)  # ... not the original's
        before_copy = c(x, route=ROUTE)
        for p in r.parameters():  # and the original's weights do not reach the copy
            p.mul_(0.5)
        assert torch.equal(c(x, route=ROUTE), before_copy)
        r.set_ticket(0, {n: ~m[0] for n, m in r.tickets.masks.items()} if granularity == "weight"
                     else {n: m[1] for n, m in r.tickets.masks.items()})
        assert torch.equal(c(x, route=ROUTE), before_copy)
        after = r(x, route=ROUTE)
    hooks = _our_hooks(r)
    c.unwrap()  # unwrapping the copy removes the copy's hooks, not the original's
    assert _our_hooks(r) == hooks and len(hooks) > 0
    with torch.no_grad():
        assert torch.equal(r(x, route=ROUTE), after)


# ----------------------------------------------------------------------------- unwrap
@pytest.mark.parametrize("granularity", ["weight", "channel"])
@pytest.mark.parametrize("name", MODELS)
def test_unwrap_gives_back_the_original_model(name, granularity):
    model = _make_model(name).eval()
    x = torch.randn(4, *_input_shape(name)[1:])
    modules = dict(model.named_modules())
    kinds = {n: type(m) for n, m in modules.items()}
    params = dict(model.named_parameters())
    shapes = {n: t.shape for n, t in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
    r = _wrap(model, name, granularity).eval()  # all-ones tickets: every ticket is the dense model
    with torch.no_grad():
        assert _rel(r(x, route=torch.tensor([0, 2, 1, 0])), ref) < TOL[name]
    plain = r.unwrap()
    assert plain is model
    assert dict(plain.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] and type(m) is kinds[n] for n, m in plain.named_modules())
    assert all(p is params[n] for n, p in plain.named_parameters()) and len(params) == len(list(plain.parameters()))
    assert {n: t.shape for n, t in plain.state_dict().items()} == shapes
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(plain(x), ref)
    assert list(r.parameters()) == []  # the RoutedModel let go of the model


def test_unwrap_keeps_the_chosen_tickets_norm_statistics():
    r, x = _routed("tiny", "weight")
    stats = r.model.bn1.running_mean.clone()
    assert not torch.equal(stats[1], stats[2])
    with torch.no_grad():
        want = r.plain_copy(2).eval()(x)
    plain = r.unwrap(norm_ticket=2).eval()
    assert type(plain.bn1) is torch.nn.BatchNorm2d and torch.equal(plain.bn1.running_mean, stats[2])
    assert plain.bn1.num_batches_tracked.shape == ()
    with torch.no_grad():
        assert torch.equal(plain(x), want)


@pytest.mark.parametrize("release", ["unwrap", "merge"])
def test_routed_model_is_unusable_after_handing_its_model_back(release):
    r, x = _routed("tiny", "channel")
    view = r.ticket_module(0)
    r.unwrap(norm_ticket=0) if release == "unwrap" else r.merge(0)
    calls = [lambda: r(x, route=0), lambda: view(x), lambda: r.model, lambda: r.plain_copy(0), lambda: r.unwrap(),
             lambda: r.merge(0), lambda: r.ticket_module(0), lambda: r.count_ops_and_params(0, x[:1]),
             lambda: r.set_ticket(0, {n: m[0] for n, m in r.tickets.masks.items()}), lambda: r.prunable_weights(),
             lambda: rtl.export_ticket(r, 0)]
    for call in calls:
        with pytest.raises(rtl.UnwrappedModelError, match=rf"{release}\(\).*rtl.wrap\(model, K"):
            call()


# ----------------------------------------------------------------------------- merge
@pytest.mark.parametrize("granularity", ["weight", "channel"])
@pytest.mark.parametrize("name", MODELS)
def test_merge_gives_back_the_model_computing_one_ticket(name, granularity):
    r, x = _routed(name, granularity)
    k = 1
    model = r.model
    with torch.no_grad():
        want = r(x, route=k)
    exported = rtl.export_ticket(r, k).eval()
    masks = {n: r.tickets.masks[n][k].clone() for n in r.space.layers} if granularity == "weight" else {}
    merged = r.merge(k)
    assert merged is model
    assert not any(isinstance(m, (RoutedBatchNorm, MaskedLayerNorm)) for m in merged.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in merged.modules())
    with torch.no_grad():
        assert _rel(merged.eval()(x), want) < TOL[name]
    got, ref = dict(merged.named_parameters()), dict(exported.named_parameters())
    assert got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in got)  # = export_ticket
    for n, b in exported.named_buffers():
        assert torch.equal(merged.get_buffer(n), b), n
    if granularity == "weight":
        assert all(bool((merged.get_submodule(n).weight[~m] == 0).all()) for n, m in masks.items())
    else:
        assert sum(p.numel() for p in merged.parameters()) < sum(p.numel() for p in _make_model(name).parameters())


def test_merge_refuses_a_ticket_that_drops_a_whole_group_and_leaves_the_model_routed():
    r, x = _routed("tiny", "channel")
    r.set_ticket(2, {n: m[2] & (n != "conv1") for n, m in r.tickets.masks.items()})
    with torch.no_grad():
        ref = r(x, route=ROUTE)
    with pytest.raises(rtl.TicketError, match="drops every channel"):
        r.merge(2)
    with torch.no_grad():
        assert torch.equal(r(x, route=ROUTE), ref)


# ----------------------------------------------------------------------------- count_ops_and_params
@pytest.mark.parametrize("name", ["tiny", "efficientnet"])
def test_count_ops_and_params_channel_mode_counts_the_exported_ticket(name):
    r, x = _routed(name, "channel")
    ex = torch.randn(_input_shape(name))
    dense = tp.utils.count_ops_and_params(r.plain_copy(0), ex)
    for k in range(K):
        got = r.count_ops_and_params(k, ex)
        want = tp.utils.count_ops_and_params(rtl.export_ticket(r, k), ex)
        assert got == (int(want[0]), int(want[1]))
        assert got[0] < dense[0] and got[1] < dense[1]
    assert r.count_ops_and_params(1) == r.count_ops_and_params(1, torch.zeros(_input_shape(name)))


def test_count_ops_and_params_weight_mode_counts_dense_macs_and_kept_parameters():
    r, x = _routed("tiny", "weight")
    ex = x[:1]
    macs, params = tp.utils.count_ops_and_params(r.plain_copy(0), ex)
    total = sum(p.numel() for p in r.parameters())
    assert params == total
    for k in range(K):
        kept = sum(int(r.tickets.masks[n][k].sum()) for n in r.space.layers)
        prunable = sum(r.model.get_submodule(n).weight.numel() for n in r.space.layers)
        assert r.count_ops_and_params(k, ex) == (int(macs), total - prunable + kept)


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_stock_count_ops_and_params_refuses_the_live_routed_model(granularity):
    r, x = _routed("tiny", granularity)
    with torch.no_grad():
        ref = r(x, route=ROUTE)
    for target in (r, r.ticket_module(1), r.model):
        with pytest.raises(rtl.LiveRoutedModelError, match=r"routed.count_ops_and_params\(k, example_inputs\)"):
            tp.utils.count_ops_and_params(target, x[:1])
    with torch.no_grad():
        assert torch.equal(r(x, route=ROUTE), ref)


class _Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = TinyCNN()

    def forward(self, x):
        return self.body(x) * 2


class _BodyAdapter(rtl.Adapter):
    """Traces the submodule ``body`` (like the audio adapter, whose traced root is not the whole model)."""
    name = "body_test"

    def matches(self, model):
        return False

    def output_layers(self, model):
        return ["body.head"]

    def trace_root(self, model):
        return "body"


def test_merge_and_count_with_a_traced_submodule():
    torch.manual_seed(0)
    r = rtl.wrap(_Outer(), K, example_inputs=torch.randn(1, 3, 8, 8), adapter=_BodyAdapter(), granularity="channel")
    r.set_tickets(half_tickets(r.space, K, seed=3))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(rtl.SpaceError, match="pass example_inputs="):
        r.count_ops_and_params(0)
    assert r.count_ops_and_params(2, x[:1]) == tuple(
        int(v) for v in tp.utils.count_ops_and_params(rtl.export_ticket(r, 2, check_inputs=x[:1]), x[:1]))
    with torch.no_grad():
        want = r.eval()(x, route=2)
        merged = r.merge(2).eval()
        assert merged.body.conv2.out_channels == 8
        assert _rel(merged(x), want) < 1e-5
