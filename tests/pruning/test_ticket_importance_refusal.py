"""TicketImportance refuses the live routed model: it takes the RoutedModel as its ticket source and ranks the
groups of a plain copy only (issue #17, foot-guns closed)."""
import pytest
import torch
import torch_pruning as tp

import rtl_plugin as rtl
from rtl_plugin import _tp
from _helpers import TinyCNN, half_tickets

K = 3
EX = torch.randn(1, 3, 8, 8)


@pytest.fixture(params=["weight", "channel"])
def routed(request):
    torch.manual_seed(0)
    r = rtl.wrap(TinyCNN(), K, example_inputs=EX, granularity=request.param, adapter="generic", output_layers=["head"])
    r.set_tickets(half_tickets(r.space, K, seed=2) if request.param == "channel"
                  else rtl.TicketSet.random(r.space, K, keep=0.5, seed=2))
    return r.eval()


def _conv1_group(dg, model):
    return dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, list(range(model.conv1.out_channels)))


@pytest.mark.parametrize("source", ["view", "model"])
def test_ticket_importance_takes_the_routed_model_not_a_view(routed, source):
    wrong = routed.ticket_module(0) if source == "view" else routed.model
    with pytest.raises(rtl.LiveRoutedModelError, match=r"routed\.plain_copy\(k\)") as ei:
        rtl.TicketImportance(wrong, 0)
    assert type(wrong).__name__ in str(ei.value)


def test_ticket_importance_refuses_a_group_of_the_live_model(routed):
    with _tp.allow_routed_trace():  # the only way to get such a group: stock tp refuses to trace the live model
        live = tp.DependencyGraph().build_dependency(routed.model, example_inputs=EX,
                                                     forward_fn=lambda m, e: routed(e, route=0))
    imp = rtl.TicketImportance(routed, 1)
    with pytest.raises(rtl.LiveRoutedModelError, match=r"routed\.plain_copy\(k\)"):
        imp(_conv1_group(live, routed.model))
    plain = routed.plain_copy(1)
    scores = imp(_conv1_group(tp.DependencyGraph().build_dependency(plain, example_inputs=EX), plain))
    assert scores.shape == (plain.conv1.out_channels,)
    assert torch.isfinite(scores).any()
