"""TicketSet mask operations: packing, counting, Jaccard, routing buckets, construction and validation."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import rtl_plugin as rtl
from rtl_plugin.norms import split_by_route
from rtl_plugin.space import TicketSpace

PROPS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- helpers / strategies


def weight_space(shapes: list[tuple[int, ...]]) -> TicketSpace:
    """A weight-granularity space over synthetic layers ``l0, l1, ...`` (no model needed)."""
    layers = {f"l{i}": list(s) for i, s in enumerate(shapes)}
    return TicketSpace(granularity="weight", layers=layers, output_layers=[], ignored_layers=[], groups=[],
                       layer_kinds={n: "conv" if len(s) > 2 else "linear" for n, s in layers.items()},
                       conv_groups={}, example_input_shape=None, trace_root="", fingerprint="synthetic")


shape_st = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


@st.composite
def weight_ticketsets(draw, max_k: int = 4):
    """(TicketSet, {key: np.bool_[K, *shape]}) with arbitrary masks of arbitrary shapes."""
    k = draw(st.integers(1, max_k))
    shapes = draw(st.lists(shape_st, min_size=1, max_size=3))
    masks = {f"l{i}": draw(hnp.arrays(np.bool_, (k, *s))) for i, s in enumerate(shapes)}
    ts = rtl.TicketSet(weight_space(shapes), {n: torch.from_numpy(m.copy()) for n, m in masks.items()})
    return ts, masks


def flat_np(masks: dict[str, np.ndarray]) -> np.ndarray:
    """All prunable elements of every ticket as one bool matrix [K, N]."""
    return np.concatenate([m.reshape(m.shape[0], -1) for m in masks.values()], axis=1)


def brute_jaccard(a: np.ndarray) -> np.ndarray:
    k = a.shape[0]
    out = np.ones((k, k))
    for i in range(k):
        for j in range(k):
            union = np.logical_or(a[i], a[j]).sum()
            out[i, j] = np.logical_and(a[i], a[j]).sum() / union if union else 1.0
    return out


def np_element_masks(ts: rtl.TicketSet) -> dict[str, np.ndarray]:
    return {n: m.cpu().numpy() for n, m in ts.element_masks().items()}


# ----------------------------------------------------------------------------- packing


@PROPS
@given(weight_ticketsets())
def test_pack_round_trip_any_shape(case):
    ts, masks = case
    packed = ts.packed()
    assert set(packed) == set(masks)
    for n, m in masks.items():
        assert packed[n].dtype == np.uint8
        assert packed[n].shape == (math.ceil(m.size / 8),)
    back = rtl.TicketSet.from_packed(ts.space, ts.num_tickets, packed)
    assert set(back.masks) == set(masks)
    for n, m in masks.items():
        assert back.masks[n].dtype == torch.bool
        assert np.array_equal(back.masks[n].numpy(), m)


@PROPS
@given(weight_ticketsets())
def test_from_packed_rejects_wrong_size_or_missing_key(case):
    ts, _ = case
    packed = ts.packed()
    key = next(iter(packed))
    with pytest.raises(rtl.TicketError, match="bytes, expected"):
        rtl.TicketSet.from_packed(ts.space, ts.num_tickets, {**packed, key: np.append(packed[key], np.uint8(0))})
    with pytest.raises(rtl.TicketError, match="lack key"):
        rtl.TicketSet.from_packed(ts.space, ts.num_tickets, {k: v for k, v in packed.items() if k != key})


# ----------------------------------------------------------------------------- counting


@PROPS
@given(weight_ticketsets())
def test_kept_sparsity_union_intersection_match_numpy(case):
    ts, masks = case
    a = flat_np(masks)
    assert ts.kept().tolist() == a.sum(1).tolist()
    assert torch.allclose(ts.sparsity(), torch.from_numpy(1.0 - a.sum(1) / a.shape[1]).to(ts.sparsity().dtype))
    assert ts.space.num_weights == a.shape[1]
    assert ts.union_count() == int(a.any(0).sum())
    assert ts.intersection_count() == int(a.all(0).sum())
    assert ts.intersection_count() <= int(a.sum(1).min()) <= int(a.sum(1).max()) <= ts.union_count()


@PROPS
@given(weight_ticketsets())
def test_jaccard_properties(case):
    ts, masks = case
    j = ts.jaccard().numpy()
    k = ts.num_tickets
    assert j.shape == (k, k)
    assert np.allclose(j, j.T)
    assert np.allclose(np.diag(j), 1.0)
    assert (j >= 0).all() and (j <= 1 + 1e-12).all()
    assert np.allclose(j, brute_jaccard(flat_np(masks)))
    inter, union = ts.pairwise_counts()
    a = flat_np(masks).astype(np.int64)
    assert np.array_equal(inter.numpy(), a @ a.T)
    assert np.array_equal(torch.diagonal(inter).numpy(), ts.kept().numpy())
    assert np.array_equal(union.numpy(), (a[:, None, :] | a[None, :, :]).sum(-1))


@PROPS
@given(weight_ticketsets(max_k=1))
def test_jaccard_identical_tickets_is_one(case):
    ts, masks = case
    twice = rtl.TicketSet(ts.space, {n: torch.from_numpy(np.concatenate([m, m])) for n, m in masks.items()})
    assert torch.allclose(twice.jaccard(), torch.ones(2, 2, dtype=twice.jaccard().dtype))


@PROPS
@given(st.lists(shape_st, min_size=1, max_size=3), st.data())
def test_jaccard_disjoint_tickets_is_zero(shapes, data):
    # a random assignment of every element to ticket 0, ticket 1 or neither: the two tickets are disjoint
    space = weight_space(shapes)
    masks = {}
    for n, s in space.mask_shapes().items():
        owner = data.draw(hnp.arrays(np.int8, s, elements=st.integers(-1, 1)))
        masks[n] = torch.from_numpy(np.stack([owner == 0, owner == 1]))
    ts = rtl.TicketSet(space, masks)
    kept = ts.kept()
    j = ts.jaccard()
    assert ts.intersection_count() == 0
    if kept[0] + kept[1] > 0:
        assert j[0, 1] == 0 and j[1, 0] == 0
    else:
        assert j[0, 1] == 1  # both empty: defined as identical
    assert ts.union_count() == int(kept.sum())


def test_pairwise_counts_exact_for_large_layer():
    n = 4097  # one 4097x4097 layer: 16,785,409 weights > 2**24
    space = weight_space([(n, n)])
    m = torch.ones(2, n, n, dtype=torch.bool)
    m[1, 0, 0] = False
    ts = rtl.TicketSet(space, {"l0": m})
    inter, union = ts.pairwise_counts()
    assert inter.tolist() == [[n * n, n * n - 1], [n * n - 1, n * n - 1]]
    assert union.tolist() == [[n * n, n * n], [n * n, n * n - 1]]
    j = ts.jaccard()
    assert torch.equal(j, j.T) and float(j.max()) <= 1.0


# ----------------------------------------------------------------------------- routing buckets


@PROPS
@given(st.integers(1, 5).flatmap(lambda k: st.lists(st.integers(0, k - 1), min_size=0, max_size=24)))
def test_split_by_route_preserves_order(ids):
    route = torch.tensor(ids, dtype=torch.long)
    b = len(ids)
    perm, tickets, counts, inverse = split_by_route(route)
    x = torch.arange(b) * 10 + 3
    assert sorted(perm.tolist()) == list(range(b))
    assert torch.equal(x[perm][inverse], x)
    assert torch.equal(inverse[perm], torch.arange(b))
    assert tickets == sorted(set(ids))  # ascending, each present ticket once
    assert counts == [ids.count(t) for t in tickets]
    assert sum(counts) == b
    # buckets are contiguous and stable (original order kept inside a bucket)
    grouped = route[perm].tolist()
    assert grouped == sorted(ids)
    start = 0
    for t, c in zip(tickets, counts):
        idx = perm[start:start + c].tolist()
        assert idx == [i for i, r in enumerate(ids) if r == t]
        start += c


# ----------------------------------------------------------------------------- channel granularity


@pytest.fixture(scope="module")
def tiny_channel(make_routed):
    return make_routed("channel", num_tickets=3)


@pytest.fixture(scope="module")
def regnet_channel():
    import timm
    torch.manual_seed(0)
    model = timm.create_model("regnety_002", num_classes=4)
    return rtl.wrap(model, 3, example_inputs=torch.randn(1, 3, 32, 32), granularity="channel")


@PROPS
@given(st.data())
def test_channel_counts_match_brute_force(tiny_channel, data):
    """TinyCNN: conv1 [w, 3, 3, 3] keeps keep1 rows; conv2 [2w, w, 3, 3] keeps keep2 x keep1; head not counted."""
    space = tiny_channel.space
    k = data.draw(st.integers(1, 4))
    masks = {n: torch.from_numpy(data.draw(hnp.arrays(np.bool_, (k, *s)))) for n, s in space.mask_shapes().items()}
    ts = rtl.TicketSet(space, masks)
    k1 = masks["conv1"].numpy()
    k2 = masks["conv2"].numpy()
    elem = {"conv1": np.broadcast_to(k1[:, :, None, None, None], (k, 8, 3, 3, 3)),
            "conv2": np.broadcast_to(k2[:, :, None, None, None] & k1[:, None, :, None, None], (k, 16, 8, 3, 3))}
    assert {n: tuple(m.shape) for n, m in np_element_masks(ts).items()} == {n: e.shape for n, e in elem.items()}
    for n, e in elem.items():
        assert np.array_equal(np_element_masks(ts)[n], e)
    a = flat_np(elem)
    assert ts.kept().tolist() == a.sum(1).tolist()
    assert ts.kept().tolist() == (27 * k1.sum(1) + 9 * k2.sum(1) * k1.sum(1)).tolist()
    assert torch.allclose(ts.sparsity(), torch.from_numpy(1 - a.sum(1) / space.num_weights).to(ts.sparsity().dtype))
    assert ts.union_count() == int(a.any(0).sum())
    assert ts.intersection_count() == int(a.all(0).sum())
    assert np.allclose(ts.jaccard().numpy(), brute_jaccard(a))
    back = rtl.TicketSet.from_packed(space, k, ts.packed())
    for n in masks:
        assert torch.equal(back.masks[n], masks[n])


def test_full_ticketset(tiny_channel, make_routed):
    for space in (tiny_channel.space, make_routed("weight").space):
        ts = rtl.TicketSet.full(space, 4)
        assert ts.num_tickets == 4
        assert all(bool(m.all()) for m in ts.masks.values())
        assert {n: tuple(m.shape[1:]) for n, m in ts.masks.items()} == space.mask_shapes()
        assert ts.kept().tolist() == [space.num_weights] * 4
        assert ts.sparsity().tolist() == [0.0] * 4
        assert ts.union_count() == ts.intersection_count() == space.num_weights
        assert torch.equal(ts.jaccard(), torch.ones(4, 4, dtype=ts.jaccard().dtype))
        for bad in (0, -1, True, 2.0):
            with pytest.raises(rtl.TicketError, match="positive int"):
                rtl.TicketSet.full(space, bad)


def test_random_keep_validation_and_determinism(tiny_channel, make_routed):
    for space in (tiny_channel.space, make_routed("weight").space):
        for keep in (0.0, -0.1, 1.5):
            with pytest.raises(rtl.TicketError, match="keep must be in"):
                rtl.TicketSet.random(space, 2, keep=keep)
        full = rtl.TicketSet.random(space, 2, keep=1.0)
        assert all(bool(m.all()) for m in full.masks.values())
        a = rtl.TicketSet.random(space, 3, keep=0.5, seed=7)
        b = rtl.TicketSet.random(space, 3, keep=0.5, seed=7)
        assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)


@pytest.mark.parametrize("bad", [-1, True])
def test_random_rejects_bad_num_tickets(make_routed, bad):
    with pytest.raises(rtl.TicketError, match="positive int"):
        rtl.TicketSet.random(make_routed("weight").space, bad)


def test_random_channel_keeps_one_channel_per_group(tiny_channel):
    space = tiny_channel.space
    for seed in range(10):
        ts = rtl.TicketSet.random(space, 4, keep=0.01, seed=seed)
        for g in space.groups:
            assert ts.masks[g.root].any(1).all(), (seed, g.root)
        assert (ts.kept() > 0).all()


def test_random_channel_tiles_grouped_convs(regnet_channel):
    space = regnet_channel.space
    grouped = [g for g in space.groups if g.ch_groups > 1]
    assert grouped, "regnety_002 has grouped convs"
    for seed in range(3):
        ts = rtl.TicketSet.random(space, 3, keep=0.3, seed=seed)
        for g in space.groups:
            v = ts.masks[g.root].view(3, g.ch_groups, g.period)
            assert torch.equal(v, v[:, :1].expand_as(v)), g.root
            assert v.any(-1).all(), g.root  # >=1 kept channel in every channel group
        # and a grouped conv's weight mask follows the same pattern in every conv group
        for g in grouped:
            assert ts.masks[g.root].any(1).all()


def test_untiled_channel_masks_rejected(regnet_channel):
    space = regnet_channel.space
    g = next(g for g in space.groups if g.ch_groups > 1)
    masks = {n: m.clone() for n, m in rtl.TicketSet.full(space, 2).masks.items()}
    masks[g.root][0, 0] = False  # dropped in the first channel group only
    with pytest.raises(rtl.TicketError, match="same positions in every channel group"):
        rtl.TicketSet(space, masks)
    ts = rtl.TicketSet.full(space, 2)
    with pytest.raises(rtl.TicketError, match="same positions in every channel group"):
        ts.set_ticket(1, {g.root: masks[g.root][0]})
    assert bool(ts.masks[g.root].all())  # failed update leaves the set untouched


# ----------------------------------------------------------------------------- set_ticket


def test_set_ticket_replaces_one_ticket(make_routed):
    for gran in ("weight", "channel"):
        ts = rtl.TicketSet.random(make_routed(gran).space, 3, keep=0.5, seed=3)
        before = {n: m.clone() for n, m in ts.masks.items()}
        v = ts.version
        key = next(iter(ts.masks))
        new = ~before[key][1]
        ts.set_ticket(1, {key: new})
        assert ts.version > v
        assert torch.equal(ts.masks[key][1], new)
        for n in ts.masks:
            assert torch.equal(ts.masks[n][0], before[n][0])
            assert torch.equal(ts.masks[n][2], before[n][2])
            if n != key:
                assert torch.equal(ts.masks[n][1], before[n][1])
        assert ts.kept()[1] == rtl.TicketSet(ts.space, ts.masks).kept()[1]  # caches refreshed
        got = ts.ticket(1)
        assert set(got) == set(ts.masks) and torch.equal(got[key], new)


@pytest.mark.parametrize("idx", [3, -1, True, 1.0, "0"])
def test_set_ticket_bad_index(make_routed, idx):
    ts = make_routed("weight").tickets
    with pytest.raises(rtl.TicketError, match=r"ticket index must be an int in \[0, 3\)"):
        ts.set_ticket(idx, {})
    with pytest.raises(rtl.TicketError, match="ticket index"):
        ts.ticket(idx)


def test_set_ticket_unknown_key(make_routed):
    ts = make_routed("weight").tickets
    with pytest.raises(rtl.TicketError, match="unknown mask key 'nope'"):
        ts.set_ticket(0, {"nope": torch.ones(3, dtype=torch.bool)})


def test_set_ticket_wrong_shape(make_routed):
    ts = make_routed("weight").tickets
    with pytest.raises(rtl.TicketError, match="shape"):
        ts.set_ticket(0, {"conv1": torch.ones(5, dtype=torch.bool)})


# ----------------------------------------------------------------------------- layer channel masks


def _channels(m: torch.nn.Module) -> tuple[int, int]:
    if isinstance(m, torch.nn.Linear):
        return m.out_features, m.in_features
    if isinstance(m, torch.nn.modules.conv._ConvNd):
        return m.out_channels, m.in_channels
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or hasattr(m, "num_features"):
        return m.num_features, m.num_features
    raise AssertionError(f"unexpected masked module {type(m).__name__}")


@pytest.mark.parametrize("which", ["tiny", "regnet"])
def test_layer_channel_masks_shapes(request, which):
    routed = request.getfixturevalue("tiny_channel" if which == "tiny" else "regnet_channel")
    ts = rtl.TicketSet.random(routed.space, 3, keep=0.5, seed=5)
    lm = ts.layer_channel_masks()
    mods = dict(routed.model.named_modules())
    assert lm, "channel mode masks some layers"
    for name, sides in lm.items():
        assert name in mods, name
        assert set(sides) <= {"out", "in"} and sides
        c_out, c_in = _channels(mods[name])
        if "out" in sides:
            assert sides["out"].dtype == torch.bool and tuple(sides["out"].shape) == (3, c_out), name
        if "in" in sides:
            assert sides["in"].dtype == torch.bool and tuple(sides["in"].shape) == (3, c_in), name
    # every prunable layer's output side is masked by its own group (its root)
    for g in routed.space.groups:
        if g.root in lm:
            assert "out" in lm[g.root]
    assert ts.layer_channel_masks() is lm  # cached
    ts.set_ticket(0, ts.ticket(1))
    assert ts.layer_channel_masks() is not lm  # invalidated by a change


def test_layer_channel_masks_tiny_wiring(tiny_channel):
    ts = rtl.TicketSet.random(tiny_channel.space, 3, keep=0.5, seed=2)
    lm = ts.layer_channel_masks()
    k1, k2 = ts.masks["conv1"], ts.masks["conv2"]
    assert torch.equal(lm["conv1"]["out"], k1) and "in" not in lm["conv1"]
    assert torch.equal(lm["conv2"]["in"], k1) and torch.equal(lm["conv2"]["out"], k2)
    assert torch.equal(lm["head"]["in"], k2) and "out" not in lm["head"]
    bn1 = lm["bn1"].get("out", lm["bn1"].get("in"))
    assert torch.equal(bn1, k1)


def test_layer_channel_masks_needs_channel_space(make_routed):
    ts = make_routed("weight").tickets
    with pytest.raises(rtl.SpaceError, match="granularity='channel'"):
        ts.layer_channel_masks()


# ----------------------------------------------------------------------------- counts vs export


def _exported_prunable_weights(routed, k: int) -> dict[str, int]:
    mods = dict(rtl.export_ticket(routed, k).named_modules())
    return {n: mods[n].weight.numel() for n in routed.space.layers}


def test_element_masks_match_export_tiny(tiny_channel):
    ts = rtl.TicketSet.random(tiny_channel.space, 3, keep=0.5, seed=11)
    tiny_channel.set_tickets(ts)
    em = ts.element_masks()
    for k in range(3):
        exported = _exported_prunable_weights(tiny_channel, k)
        assert {n: int(em[n][k].sum()) for n in tiny_channel.space.layers} == exported
        assert int(ts.kept()[k]) == sum(exported.values())


def test_element_masks_match_export_grouped(regnet_channel):
    ts = rtl.TicketSet.random(regnet_channel.space, 2, keep=0.5, seed=4)
    routed = regnet_channel
    routed.tickets.set_ticket(1, ts.ticket(1))  # keep K=3; only ticket 1 is exported (export is the slow part)
    em = routed.tickets.element_masks()
    exported = _exported_prunable_weights(routed, 1)
    counted = {n: int(em[n][1].sum()) for n in routed.space.layers}
    assert counted == exported
    assert int(routed.tickets.kept()[1]) == sum(exported.values()) < routed.space.num_weights
