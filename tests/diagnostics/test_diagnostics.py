"""Label-free similarity diagnostics."""
import pytest
import torch

import rtl_plugin as rtl
from rtl_plugin.diagnostics.similarity import (chance_jaccard, depth_bands, jaccard_per_band, jaccard_per_layer, sharing_counts,
                                    ticket_scores)


@pytest.fixture()
def routed(make_tiny):
    return rtl.wrap(make_tiny(), 3, example_inputs=torch.randn(1, 3, 8, 8), output_layers=["head"])


def test_random_masks_sit_at_chance(routed):
    ts = rtl.TicketSet.random(routed.space, 3, keep=0.4, seed=3)
    d = rtl.diagnose(ts)
    assert abs(d.mean_jaccard - d.chance) < 0.05
    assert abs(d.chance - chance_jaccard(0.4, 0.4)) < 0.05
    assert chance_jaccard(1.0, 1.0) == 1.0 and chance_jaccard(0.0, 0.0) == 0.0


def test_identical_and_disjoint_tickets(routed):
    full = rtl.TicketSet.full(routed.space, 3)
    d = rtl.diagnose(full)
    assert d.mean_jaccard == 1.0 and all(s == 1.0 for s in d.scores)
    assert d.params["shared_by_all"] == routed.space.num_weights and d.params["private"] == 0
    masks = {}
    for n, m in full.masks.items():
        flat = torch.arange(m[0].numel()).reshape(m.shape[1:])
        masks[n] = torch.stack([(flat % 3) == k for k in range(3)])
    disj = rtl.TicketSet(routed.space, masks)
    d = rtl.diagnose(disj)
    assert d.mean_jaccard == 0.0
    assert d.params["private"] == d.params["union"] == routed.space.num_weights
    assert d.params["multi_model"] == d.params["union"]


def test_counts_agree_with_ticketset(routed):
    ts = rtl.TicketSet.random(routed.space, 3, keep=0.6, seed=1)
    c = sharing_counts(ts)
    assert c["union"] == ts.union_count() and c["shared_by_all"] == ts.intersection_count()
    assert c["union"] + c["unused"] == routed.space.num_weights
    j = ts.jaccard()
    s = ticket_scores(j)
    assert torch.allclose(s, torch.tensor([(j[k].sum() - 1) / 2 for k in range(3)], dtype=s.dtype))


def test_per_layer_and_bands(routed):
    ts = rtl.TicketSet.random(routed.space, 3, keep=0.5, seed=2)
    per_layer = jaccard_per_layer(ts)
    assert set(per_layer) == set(routed.space.layers)
    for m in per_layer.values():
        assert m.shape == (3, 3) and torch.allclose(m, m.T) and torch.all(m.diagonal() == 1)
    bands = depth_bands(list(routed.space.layers), 3)
    assert sum(len(v) for v in bands.values()) == len(routed.space.layers)
    jb = jaccard_per_band(ts)
    assert set(jb) <= {"shallow", "middle", "deep"}
    with pytest.raises(rtl.TicketError):
        depth_bands(["a"], 0)
    with pytest.raises(rtl.TicketError):
        rtl.diagnose("not tickets")


def test_flags_bottleneck_and_identical(make_tiny):
    routed = rtl.wrap(make_tiny(), 3, example_inputs=torch.randn(1, 3, 8, 8), output_layers=["head"],
                      granularity="weight")
    full = rtl.TicketSet.full(routed.space, 3)
    d = rtl.diagnose(full)
    assert any("nearly identical" in f for f in d.flags) and "flag:" in d.summary()
    masks = {n: m.clone() for n, m in full.masks.items()}
    layer = list(routed.space.layers)[0]
    masks[layer][1].view(-1)[1:] = False  # ticket 1 keeps one weight of the first layer
    d = rtl.diagnose(rtl.TicketSet(routed.space, masks))
    assert any(f.startswith(f"bottleneck: layer {layer}") and "ticket 1" in f for f in d.flags)
    assert not any("bottleneck" in f for f in rtl.diagnose(rtl.TicketSet.random(routed.space, 3, keep=0.5)).flags)
