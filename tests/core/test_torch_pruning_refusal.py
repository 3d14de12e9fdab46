"""Stock torch-pruning refuses the live routed model (issue #17, foot-guns closed).

A stock pruner (every pruner traces the model in its constructor) or ``tp.DependencyGraph().build_dependency``
given a RoutedModel, its ``.model`` or a ``ticket_module(k)`` view raises LiveRoutedModelError naming
``plain_copy(k)``, and the routed model is left exactly as it was.
"""
import pytest
import torch
import torch_pruning as tp

import rtl_plugin as rtl
from rtl_plugin import _tp
from _helpers import TinyCNN

K = 3
EX = torch.randn(1, 3, 8, 8)
ROUTE = torch.tensor([0, 1, 2, 1])


def _routed(granularity: str, *, shared_norm: bool = False, name: str = "tiny") -> rtl.RoutedModel:
    torch.manual_seed(0)
    if name == "tiny":
        r = rtl.wrap(TinyCNN(), K, example_inputs=EX, granularity=granularity, adapter="generic",
                     output_layers=["head"], shared_norm=shared_norm)
    else:
        import timm
        r = rtl.wrap(timm.create_model("test_efficientnet", num_classes=4), K, example_inputs=EX,
                     granularity=granularity, shared_norm=shared_norm)
    r.set_tickets(rtl.TicketSet.random(r.space, K, keep=0.5, seed=1))
    return r.eval()


def _target(r: rtl.RoutedModel, which: str) -> torch.nn.Module:
    return {"routed": r, "model": r.model, "view": r.ticket_module(1)}[which]


def _snapshot(r: rtl.RoutedModel, x: torch.Tensor):
    with torch.no_grad():
        out = r(x, route=ROUTE)
    return out, {n: t.clone() for n, t in r.state_dict().items()}


def _assert_unchanged(r: rtl.RoutedModel, x: torch.Tensor, snap) -> None:
    out, state = snap
    now = r.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[n], t) for n, t in state.items())
    assert not any(getattr(fn, "__code__", None) is _tp._RECORD_HOOK_CODE
                   for m in r.modules() for fn in m._forward_hooks.values())  # no tp hook left behind
    with torch.no_grad():
        assert torch.equal(r(x, route=ROUTE), out)


@pytest.mark.parametrize("which", ["routed", "model", "view"])
@pytest.mark.parametrize("granularity,shared_norm,name", [("weight", False, "tiny"), ("weight", True, "tiny"),
                                                          ("channel", False, "tiny"),
                                                          ("channel", False, "efficientnet")])
def test_stock_pruner_refuses_the_live_routed_model(which, granularity, shared_norm, name):
    r = _routed(granularity, shared_norm=shared_norm, name=name)
    x = torch.randn(4, *EX.shape[1:])
    snap = _snapshot(r, x)
    head = r.model.get_submodule(r.space.output_layers[0]) if r.space.output_layers else None
    with pytest.raises(rtl.LiveRoutedModelError, match=r"routed\.plain_copy\(k\)") as ei:
        pruner = tp.pruner.BasePruner(_target(r, which), EX, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                      pruning_ratio=0.5, ignored_layers=[head] if head is not None else None)
        pruner.step()
    assert "rtl.export_ticket(routed, k)" in str(ei.value)
    _assert_unchanged(r, x, snap)


@pytest.mark.parametrize("which", ["routed", "model", "view"])
@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_dependency_graph_refuses_the_live_routed_model(which, granularity):
    r = _routed(granularity)
    x = torch.randn(4, *EX.shape[1:])
    snap = _snapshot(r, x)
    target = _target(r, which)
    with pytest.raises(rtl.LiveRoutedModelError, match=r"plain_copy\(k\)"):
        tp.DependencyGraph().build_dependency(target, example_inputs=EX)
    with pytest.raises(rtl.LiveRoutedModelError, match=r"plain_copy\(k\)"):  # a forward_fn that routes: refused too
        tp.DependencyGraph().build_dependency(target, example_inputs=EX, forward_fn=lambda m, e: r(e, route=0))
    _assert_unchanged(r, x, snap)


def test_a_model_holding_the_routed_model_is_refused_too():
    r = _routed("channel")
    outer = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), r.ticket_module(0))
    with pytest.raises(rtl.LiveRoutedModelError):
        tp.pruner.BasePruner(outer, EX, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.5)


def test_stock_pruner_on_plain_copy_still_prunes_and_leaves_the_routed_model_alone():
    r = _routed("channel")
    x = torch.randn(4, *EX.shape[1:])
    snap = _snapshot(r, x)
    plain = r.plain_copy(1)
    pruner = tp.pruner.BasePruner(plain, EX, importance=rtl.TicketImportance(r, 1), pruning_ratio=0.5,
                                  ignored_layers=[plain.head])
    pruner.step()
    assert plain.conv2.out_channels == 8 and r.model.conv2.out_channels == 16
    _assert_unchanged(r, x, snap)


def test_training_after_a_refused_trace_works():
    r = _routed("weight")
    with pytest.raises(rtl.LiveRoutedModelError):
        tp.pruner.BasePruner(r.ticket_module(0), EX, importance=tp.importance.GroupMagnitudeImportance())
    r.train()
    loss = r(torch.randn(4, *EX.shape[1:]), route=ROUTE).pow(2).mean()
    loss.backward()
    assert r.model.conv1.weight.grad is not None


def test_allow_routed_trace_lets_rtl_trace_the_live_model():
    """rtl-plugin's own code may read tp's graph of the live model (nothing is pruned by building a graph)."""
    r = _routed("channel")
    x = torch.randn(4, *EX.shape[1:])
    snap = _snapshot(r, x)
    with _tp.allow_routed_trace():
        dg = tp.DependencyGraph().build_dependency(r.model, example_inputs=EX, forward_fn=lambda m, e: r(e, route=0))
    assert r.model.conv1 in dg.module2node
    _assert_unchanged(r, x, snap)
    with pytest.raises(rtl.LiveRoutedModelError):  # the allowance ends with the block
        tp.DependencyGraph().build_dependency(r, example_inputs=EX, forward_fn=lambda m, e: m(e, route=0))
