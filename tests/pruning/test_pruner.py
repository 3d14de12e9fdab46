"""RTLPruner (stage 1: per-subset IMP with rewinding) and TicketImportance (interop with stock tp pruners)."""

import math

import numpy as np
import pytest
import torch
import torch_pruning as tp

import rtl_plugin as rtl
from rtl_plugin.training.retrain import default_train_step
from _helpers import half_tickets
from rtl_plugin.errors import TicketError
from rtl_plugin.pruning.pruner import RTLPruner, TicketImportance, validate_sparsities

EX = torch.randn(1, 3, 8, 8)


# ----------------------------------------------------------------------------- helpers


def wrap(model, granularity="weight", K=3):
    """Fresh routed model with K all-ones tickets."""
    return rtl.wrap(model, K, example_inputs=EX, granularity=granularity, adapter="generic", output_layers=["head"])


def adam(lr=1e-2):
    return lambda params: torch.optim.Adam(params, lr=lr)


def no_train(view, batch, opt):
    """A train step that trains nothing."""
    return 0.0


class Guard:
    """Wraps a train step; raises after ``limit`` calls (turns a search that never ends into a failure)."""

    def __init__(self, limit, step=no_train):
        self.n, self.limit, self.step = 0, limit, step

    def __call__(self, view, batch, opt):
        self.n += 1
        if self.n > self.limit:
            raise RuntimeError(f"the search did not end within {self.limit} train steps")
        return self.step(view, batch, opt)


def trained(limit=500):
    """The default cross-entropy step, bounded (a search that never ends fails instead of hanging)."""
    return Guard(limit, default_train_step())


def state(routed):
    return {k: v.detach().clone() for k, v in routed.model.state_dict().items()}


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def ticket_masks(ts, k):
    return {n: m[k].clone() for n, m in ts.masks.items()}



def warm_norm_stats(routed, x):
    """Give every ticket's BN rows non-trivial running statistics."""
    routed.train()
    with torch.no_grad():
        for k in range(routed.num_tickets):
            for _ in range(2):
                routed(x + k, route=k)
    routed.eval()


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("targets,expected", [(0.5, [0.5]), ([0.5, 0.75, 0.9], [0.5, 0.75, 0.9]),
                                              ((0.0, 0.3), [0.0, 0.3]), (np.array([0.1, 0.2]), [0.1, 0.2])])
def test_validate_sparsities_accepts(targets, expected):
    assert validate_sparsities(targets) == pytest.approx(expected)


@pytest.mark.parametrize("targets", [[], [0.5, 0.5], [0.75, 0.5], [0.5, 0.9, 0.8], [1.0], [-0.1], [float("nan")],
                                     [0.5, float("inf")], "abc", [None], [0.5, "x"]])
def test_validate_sparsities_rejects(targets):
    with pytest.raises(rtl.SparsityError):
        validate_sparsities(targets)


@pytest.mark.parametrize("kwargs", [
    dict(sparsities=[0.75, 0.5]),
    dict(sparsities=[0.5, 0.5]),
    dict(schedule="linear"),
    dict(prune_fraction=0.0), dict(prune_fraction=1.0), dict(prune_fraction=-0.2), dict(prune_fraction=1.5),
    dict(prune_fraction=float("nan")),
    dict(schedule="count"), dict(schedule="count", prune_count=0), dict(schedule="count", prune_count=-5),
    dict(schedule="count", prune_count=2.5), dict(schedule="count", prune_count="100"),
    dict(rewind="start"), dict(rewind=-1), dict(rewind=2.5), dict(rewind=True), dict(rewind=None),
], ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()))
def test_pruner_rejects_bad_configuration(kwargs, make_tiny):
    routed = wrap(make_tiny())
    with pytest.raises(rtl.SparsityError):
        RTLPruner(routed, progress=False, **kwargs)


def test_pruner_rejects_bool_prune_count(make_tiny):
    with pytest.raises(rtl.SparsityError):
        RTLPruner(wrap(make_tiny()), schedule="count", prune_count=True, progress=False)


def test_count_schedule_rejected_in_channel_mode(make_tiny):
    with pytest.raises(rtl.SparsityError, match="weight granularity"):
        RTLPruner(wrap(make_tiny(), "channel"), schedule="count", prune_count=10, progress=False)


def test_pruner_needs_a_model_and_k(make_tiny):
    with pytest.raises(TypeError, match="RoutedModel"):
        RTLPruner(object())
    with pytest.raises(TicketError, match="num_tickets"):
        RTLPruner(make_tiny())  # a plain model: K is needed to wrap it


def test_find_tickets_validates_subsets(make_tiny, make_loader):
    routed = wrap(make_tiny())
    before = state(routed)
    p = RTLPruner(routed, sparsities=[0.5], progress=False)
    with pytest.raises(rtl.TicketError, match="outside"):
        p.find_tickets({3: make_loader(1)}, train_step=Guard(500))
    with pytest.raises(rtl.TicketError):
        p.find_tickets({0: make_loader(1)}, tickets=[-1], train_step=Guard(500))
    with pytest.raises(rtl.DataError, match="no subset given for ticket 2"):
        p.find_tickets({0: make_loader(1)}, tickets=[0, 2], train_step=Guard(500))
    with pytest.raises(rtl.DataError, match="epochs_per_round"):
        p.find_tickets({0: make_loader(1)}, epochs_per_round=0, train_step=Guard(500))
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 3, 8, 8)), batch_size=2)
    with pytest.raises(rtl.DataError, match="empty"):
        p.find_tickets({0: empty}, train_step=Guard(500))
    with pytest.raises(rtl.DataError):
        p.find_tickets({}, train_step=Guard(500))
    assert_state_equal(state(routed), before)
    assert bool((routed.tickets.sparsity() == 0).all())


# ----------------------------------------------------------------------------- 1. weight mode: exact sparsities


@pytest.mark.parametrize("schedule", ["fraction", "count"])
def test_weight_search_records_exact_sparsities_nested_and_rewinds(schedule, make_tiny, make_loader):
    routed = wrap(make_tiny())
    N = routed.space.num_weights
    theta0 = state(routed)
    targets = [0.5, 0.75]
    p = RTLPruner(routed, sparsities=targets, schedule=schedule, prune_fraction=0.2, prune_count=150,
                  progress=False)
    res = p.find_tickets({k: make_loader(2, seed=k) for k in range(3)}, optimizer_factory=adam(),
                         train_step=trained())
    assert res is p.result and res.sparsities() == targets
    for t in targets:
        sp = res.tickets_at[t].sparsity()
        for k in range(3):
            assert abs(float(sp[k]) - t) <= 1.0 / N, (t, k, float(sp[k]))
    # nested along the trajectory: what survives at 0.75 survived at 0.5
    lo, hi = res.tickets_at[0.5], res.tickets_at[0.75]
    for n in lo.masks:
        assert not bool((hi.masks[n] & ~lo.masks[n]).any()), n
    # the model is rewound to θ0 (weights and norm statistics) and routes the last target's tickets
    assert_state_equal(state(routed), theta0)
    for n, m in res.tickets_at[0.75].masks.items():
        assert torch.equal(routed.tickets.masks[n], m)
    # per-round trajectory: each round removes its quota (ceil(0.2 * kept) or prune_count) unless that would
    # overshoot the next target, in which case it stops exactly at the target
    for k in range(3):
        recs = [r for r in res.history if r.ticket == k]
        assert [r.round for r in recs] == list(range(1, len(recs) + 1))
        kept = N
        for r in recs:
            new_kept = round((1 - r.sparsity) * N)
            quota = math.ceil(0.2 * kept) if schedule == "fraction" else 150
            nxt = next(t for t in targets if math.floor((1 - t) * N + 1e-9) < kept)
            assert new_kept == max(kept - quota, math.floor((1 - nxt) * N + 1e-9)), (k, r)
            kept = new_kept
        assert kept == math.floor(0.25 * N + 1e-9)
    assert [r.ticket for r in res.history] == sorted(r.ticket for r in res.history)


@pytest.mark.parametrize("schedule", ["fraction", "count"])
def test_weight_search_ends_when_target_not_a_whole_weight_count(schedule, make_tiny, make_loader):
    routed = wrap(make_tiny())
    assert routed.space.num_weights == 1368
    p = RTLPruner(routed, sparsities=[0.9], schedule=schedule, prune_count=200, progress=False)
    res = p.find_tickets({0: make_loader(1)}, tickets=[0], train_step=Guard(200))
    assert abs(float(res.tickets_at[0.9].sparsity()[0]) - 0.9) <= 1 / 1368


class _Boom(Exception):
    pass


def _failing_search(routed, make_loader):
    calls = []

    def step(view, batch, opt):
        calls.append(view.k)
        if len(calls) == 4:
            raise _Boom()
        return default_train_step()(view, batch, opt)

    with pytest.raises(_Boom):
        RTLPruner(routed, sparsities=[0.5], progress=False).find_tickets(
            {0: make_loader(1), 1: make_loader(1)}, tickets=[0, 1], train_step=step, optimizer_factory=adam())
    assert calls == [0, 0, 0, 0]  # failed in ticket 0's 4th round, after 3 pruning rounds


def test_failed_search_restores_weights(make_tiny, make_loader):
    routed = wrap(make_tiny())
    theta0 = state(routed)
    _failing_search(routed, make_loader)
    assert_state_equal(state(routed), theta0)


def test_failed_search_restores_tickets(make_tiny, make_loader):
    routed = wrap(make_tiny())
    start = rtl.TicketSet.random(routed.space, 3, keep=0.7, seed=0)
    routed.set_tickets(start.copy())
    _failing_search(routed, make_loader)
    for n, m in start.masks.items():
        assert torch.equal(routed.tickets.masks[n], m), n


# ----------------------------------------------------------------------------- 2. global magnitude


@pytest.mark.parametrize("schedule", ["fraction", "count"])
def test_untrained_search_prunes_globally_smallest_magnitudes(schedule, make_tiny, make_loader):
    routed = wrap(make_tiny())
    names = list(routed.space.layers)
    w = np.concatenate([routed.model.get_submodule(n).weight.detach().abs().numpy().ravel() for n in names])
    N = w.size
    assert N == routed.space.num_weights and np.unique(w).size == N  # no ties: the smallest set is unique
    order = np.argsort(w, kind="stable")
    targets = [0.25, 0.5, 0.75]
    p = RTLPruner(routed, sparsities=targets, schedule=schedule, prune_count=100, progress=False)
    res = p.find_tickets({k: make_loader(1) for k in range(3)}, train_step=Guard(500))
    for t in targets:
        n_drop = N - round((1 - t) * N)
        expected = np.ones(N, dtype=bool)
        expected[order[:n_drop]] = False
        for k in range(3):
            got = np.concatenate([res.tickets_at[t].masks[n][k].numpy().ravel() for n in names])
            assert np.array_equal(got, expected), (t, k)


# ----------------------------------------------------------------------------- 3. determinism


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_same_seed_same_masks(granularity, make_tiny, make_grouped, make_loader):
    def run():
        torch.manual_seed(123)
        routed = wrap(make_tiny() if granularity == "weight" else make_grouped(), granularity)
        p = RTLPruner(routed, sparsities=[0.25, 0.5], prune_fraction=0.5 if granularity == "channel" else 0.2,
                      progress=False)
        return p.find_tickets({k: make_loader(2, seed=k, shuffle=True) for k in range(3)}, optimizer_factory=adam(),
                              train_step=trained())

    a, b = run(), run()
    for t in a.tickets_at:
        for n in a.tickets_at[t].masks:
            assert torch.equal(a.tickets_at[t].masks[n], b.tickets_at[t].masks[n]), (t, n)
    assert [(r.ticket, r.round, r.sparsity, r.loss) for r in a.history] == \
        [(r.ticket, r.round, r.sparsity, r.loss) for r in b.history]


# ----------------------------------------------------------------------------- 4. tickets are per subset


def test_different_subsets_give_different_tickets(make_tiny, make_loader):
    routed = wrap(make_tiny())
    p = RTLPruner(routed, sparsities=[0.5], progress=False)
    res = p.find_tickets({k: make_loader(2, seed=10 * k) for k in range(3)}, optimizer_factory=adam(3e-2),
                         train_step=trained())
    j = res.tickets_at[0.5].jaccard()
    off = j[~torch.eye(3, dtype=torch.bool)]
    assert bool((off < 1).all()), j
    assert bool((off > 0).all())  # but they do overlap (same θ0)


def test_search_of_one_ticket_leaves_the_others_and_matches_the_full_search(make_tiny, make_loader):
    subsets = {k: make_loader(2, seed=10 * k) for k in range(3)}
    full = RTLPruner(wrap(make_tiny()), sparsities=[0.5], progress=False).find_tickets(
        subsets, optimizer_factory=adam(3e-2), train_step=trained())
    routed = wrap(make_tiny())
    res = RTLPruner(routed, sparsities=[0.5], progress=False).find_tickets(
        subsets, tickets=[1], optimizer_factory=adam(3e-2), train_step=trained())
    ts = res.tickets_at[0.5]
    assert ts.sparsity()[0] == 0 and ts.sparsity()[2] == 0
    for n, m in ts.masks.items():
        assert bool(m[0].all()) and bool(m[2].all())
        # ticket 1 depends on subset 1 only: same mask as when all tickets are searched
        assert torch.equal(m[1], full.tickets_at[0.5].masks[n][1]), n
    assert {r.ticket for r in res.history} == {1}


def test_search_keeps_unsearched_tickets_existing_masks(make_tiny, make_loader):
    routed = wrap(make_tiny())
    start = rtl.TicketSet.random(routed.space, 3, keep=0.6, seed=4)
    routed.set_tickets(start.copy())
    res = RTLPruner(routed, sparsities=[0.5], progress=False).find_tickets(
        {0: make_loader(1)}, tickets=[0], train_step=Guard(500))
    for n, m in res.tickets_at[0.5].masks.items():
        assert torch.equal(m[1:], start.masks[n][1:])
    # ticket 0 is searched from all-ones, not from its previous mask
    assert abs(float(res.tickets_at[0.5].sparsity()[0]) - 0.5) <= 1 / routed.space.num_weights


# ----------------------------------------------------------------------------- 5. channel mode


def _check_channel_search(routed, res, targets, tol):
    for t in targets:
        ts = res.tickets_at[t]
        sp = ts.sparsity()
        for k in range(routed.num_tickets):
            assert t - 1e-9 <= float(sp[k]) <= t + tol, (t, k, float(sp[k]))
        for g in routed.space.groups:
            v = ts.masks[g.root].view(routed.num_tickets, g.ch_groups, g.period)
            assert bool((v == v[:, :1]).all()), g.root  # tiled over channel groups
            assert bool(v.any(-1).all()), g.root  # >= 1 channel kept per group
    for lo, hi in zip(targets, targets[1:]):
        for n in res.tickets_at[lo].masks:
            assert not bool((res.tickets_at[hi].masks[n] & ~res.tickets_at[lo].masks[n]).any())
    for n, m in res.tickets_at[targets[-1]].masks.items():
        assert torch.equal(routed.tickets.masks[n], m)
    # every found ticket exports to a smaller plain model computing the routed ticket
    x = torch.randn(4, 3, 8, 8)
    warm_norm_stats(routed, x)
    for k in range(routed.num_tickets):
        plain = rtl.export_ticket(routed, k).eval()
        assert sum(q.numel() for q in plain.parameters()) < sum(q.numel() for q in routed.model.parameters())
        with torch.no_grad():
            assert rel_err(plain(x), routed(x, route=k)) < 1e-5


def test_channel_search_sparsity_close_to_target_and_export(make_tiny, make_loader):
    # width 32: 19,296 prunable weights, one channel is 0.2-3% of them. The last round before a target bisects
    # ONE fraction applied to every group, so both groups' counts step together (0.3: 5/11 channels -> 0.295,
    # 6/12 -> 0.333): the search lands at most a few % above the target
    routed = wrap(make_tiny(width=32), "channel")
    theta0 = state(routed)
    targets = [0.3, 0.5]
    p = RTLPruner(routed, sparsities=targets, progress=False)
    res = p.find_tickets({k: make_loader(2, seed=k) for k in range(3)}, optimizer_factory=adam(),
                         train_step=trained())
    assert_state_equal(state(routed), theta0)
    _check_channel_search(routed, res, targets, tol=0.05)


def test_channel_search_grouped_conv_masks_tile(make_grouped, make_loader):
    routed = wrap(make_grouped(), "channel")
    assert {g.root: g.ch_groups for g in routed.space.groups} == {"conv1": 2, "conv2": 2, "conv3": 1}
    theta0 = state(routed)
    targets = [0.3, 0.6]
    # channel groups of period 4 move in coarse steps (one tiled position of conv1 is 2 channels, ~15% of the
    # 632 weights), hence prune_fraction=0.5 (0.2 would stall, see the xfail below) and a loose upper bound
    p = RTLPruner(routed, sparsities=targets, prune_fraction=0.5, progress=False)
    res = p.find_tickets({k: make_loader(2, seed=k) for k in range(3)}, optimizer_factory=adam(),
                         train_step=trained())
    assert_state_equal(state(routed), theta0)
    _check_channel_search(routed, res, targets, tol=0.15)


def test_channel_search_ends_for_reachable_target_default_fraction(make_tiny, make_loader):
    routed = wrap(make_tiny(), "channel")
    # keeping 1 channel per group reaches sparsity 1 - (27 + 9) / 1368 = 0.974: 0.9 is reachable
    p = RTLPruner(routed, sparsities=[0.9], progress=False)
    res = p.find_tickets({0: make_loader(1)}, tickets=[0], train_step=Guard(200))
    assert float(res.tickets_at[0.9].sparsity()[0]) >= 0.9


# ----------------------------------------------------------------------------- 6. rewinding to θ_t


def test_rewind_to_early_checkpoint(make_tiny, make_loader):
    routed = wrap(make_tiny())
    theta0 = state(routed)
    calls, snaps = [], []
    step = default_train_step()

    def recording(view, batch, opt):
        calls.append(view.k)
        snaps.append(state(routed))
        return step(view, batch, opt)

    p = RTLPruner(routed, sparsities=[0.25], rewind=4, progress=False)
    res = p.find_tickets({k: make_loader(2, seed=k) for k in range(3)}, train_step=Guard(500, recording),
                         optimizer_factory=adam())
    # 4 dense warm-up steps in balanced cyclic order (batch index 0: tickets 0, 1, 2; index 1: ticket 0)
    assert calls[:4] == [0, 1, 2, 0]
    theta_t = snaps[4]  # the first search round starts from the rewind point
    assert any(not torch.equal(theta_t[n], theta0[n]) for n in theta0)
    # every round starts from θ_t, and the search ends rewound to θ_t (not θ0)
    rounds = [r for r in res.history]
    starts = [4]
    for r in rounds[:-1]:
        starts.append(starts[-1] + 2)  # 2 batches per round
    for i in starts:
        assert_state_equal(snaps[i], theta_t)
    assert_state_equal(state(routed), theta_t)


def test_rewind_zero_is_init(make_tiny, make_loader):
    routed = wrap(make_tiny())
    theta0 = state(routed)
    calls = []
    RTLPruner(routed, sparsities=[0.25], rewind=0, progress=False).find_tickets(
        {0: make_loader(1)}, tickets=[0], train_step=Guard(500, lambda v, b, o: calls.append(state(routed)) or 0.0))
    assert_state_equal(calls[0], theta0)
    assert_state_equal(state(routed), theta0)


def test_rewind_warmup_is_dense_even_with_existing_tickets(make_tiny, make_loader):
    routed = wrap(make_tiny())
    routed.set_tickets(rtl.TicketSet.random(routed.space, 3, keep=0.3, seed=2))
    outside = {n: ~m[0] for n, m in routed.tickets.masks.items()}
    theta0 = state(routed)
    snaps = []
    step = default_train_step()

    def recording(view, batch, opt):
        snaps.append(state(routed))
        return step(view, batch, opt)

    RTLPruner(routed, sparsities=[0.25], rewind=1, progress=False).find_tickets(
        {0: make_loader(1)}, tickets=[0], train_step=Guard(500, recording), optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=0.1))
    theta_t = snaps[1]
    for n, out in outside.items():
        w0, wt = theta0[f"{n}.weight"][out], theta_t[f"{n}.weight"][out]
        # a dense SGD step moves (almost) every weight, including those outside the old ticket 0
        assert float((w0 != wt).float().mean()) > 0.5, n


# ----------------------------------------------------------------------------- 7. callbacks


def test_callback_events(make_tiny, make_loader):
    routed = wrap(make_tiny())
    events = []

    def cb(ev):
        events.append(ev)
        ev["masks"]["conv1"].fill_(False)  # events carry copies: mutating them does not touch the search

    res = RTLPruner(routed, sparsities=[0.25, 0.5], callbacks=[cb], progress=False).find_tickets(
        {k: make_loader(1) for k in range(2)}, tickets=[0, 1], train_step=Guard(500))
    assert len(events) == len(res.history)
    for ev, rec in zip(events, res.history):
        assert set(ev) >= {"ticket", "round", "sparsity", "masks", "loss"}
        assert (ev["ticket"], ev["round"], ev["sparsity"], ev["loss"]) == \
            (rec.ticket, rec.round, rec.sparsity, rec.loss)
        assert set(ev["masks"]) == set(routed.space.layers)
    assert [e["ticket"] for e in events] == sorted(e["ticket"] for e in events)
    assert {e["ticket"] for e in events} == {0, 1}
    for t in (0.25, 0.5):
        assert res.tickets_at[t].sparsity()[:2].tolist() == pytest.approx([t, t], abs=1 / routed.space.num_weights)
    # the last event of each ticket holds (a copy of) its final mask, before the callback mutated it
    last = [e for e in events if e["ticket"] == 1][-1]
    assert abs(last["sparsity"] - 0.5) <= 1 / routed.space.num_weights
    assert torch.equal(last["masks"]["conv2"], res.tickets_at[0.5].masks["conv2"][1])


def test_callback_stop_single_target(make_tiny, make_loader):
    routed = wrap(make_tiny())
    stop_0 = lambda ev: "stop" if ev["ticket"] == 0 and ev["round"] == 1 else None  # noqa: E731
    res = RTLPruner(routed, sparsities=[0.5], callbacks=[stop_0], progress=False).find_tickets(
        {0: make_loader(1), 1: make_loader(1)}, tickets=[0, 1], train_step=Guard(500))
    assert [r.round for r in res.history if r.ticket == 0] == [1]
    assert float(res.tickets_at[0.5].sparsity()[0]) == pytest.approx(0.2, abs=1e-3)  # one 20% round
    assert float(res.tickets_at[0.5].sparsity()[1]) == pytest.approx(0.5, abs=1e-3)  # ticket 1 unaffected


def test_callback_stop_ends_the_tickets_search(make_tiny, make_loader):
    routed = wrap(make_tiny())
    events = []

    def cb(ev):
        events.append((ev["ticket"], ev["round"]))
        return "stop" if ev["ticket"] == 0 and ev["round"] == 1 else None

    res = RTLPruner(routed, sparsities=[0.5, 0.75], callbacks=[cb], progress=False).find_tickets(
        {0: make_loader(1), 1: make_loader(1)}, tickets=[0, 1], train_step=Guard(500))
    assert [r for t, r in events if t == 0] == [1]
    assert float(res.tickets_at[0.75].sparsity()[1]) == pytest.approx(0.75, abs=1e-3)


# ----------------------------------------------------------------------------- 8. TicketImportance interop


@pytest.mark.parametrize("model", ["tiny", "grouped", "test_resnet"])
def test_ticket_importance_drives_stock_tp_pruner_to_the_exported_ticket(model, make_tiny, make_grouped):
    if model == "test_resnet":
        import timm
        torch.manual_seed(0)
        ex = torch.randn(1, 3, 16, 16)
        routed = rtl.wrap(timm.create_model("test_resnet", num_classes=4), 3, example_inputs=ex, granularity="channel")
        head_name = "fc"
    else:
        ex = EX
        routed = wrap(make_tiny() if model == "tiny" else make_grouped(), "channel")
        head_name = "head"
    routed.set_tickets(half_tickets(routed.space, 3, seed=5))
    x = torch.randn(4, *ex.shape[1:])
    warm_norm_stats(routed, x)
    k = 1
    plain = routed.plain_copy(k).eval()
    # every group keeps exactly half its channels, so a uniform local ratio of 0.5 is exactly what ticket k drops
    pruner = tp.pruner.BasePruner(plain, ex, importance=TicketImportance(routed, k), pruning_ratio=0.5,
                                  ignored_layers=[plain.get_submodule(head_name)], global_pruning=False)
    pruner.step()
    exported = rtl.export_ticket(routed, k).eval()
    for name, m in exported.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            got = plain.get_submodule(name)
            assert (got.in_channels, got.out_channels) == (m.in_channels, m.out_channels), name
    # same channels (not just the same counts): the kept weights are identical ...
    pw, ew = dict(plain.named_parameters()), dict(exported.named_parameters())
    assert pw.keys() == ew.keys()
    for n in pw:
        assert torch.equal(pw[n], ew[n]), n
    # ... and so is the function
    with torch.no_grad():
        assert rel_err(plain(x), exported(x)) < 1e-5
        assert rel_err(plain(x), routed(x, route=k)) < 1e-5


def test_ticket_importance_channel_scores(make_tiny):
    routed = wrap(make_tiny(), "channel")
    routed.set_tickets(half_tickets(routed.space, 3, seed=5))
    plain = routed.plain_copy(0)
    dg = tp.DependencyGraph().build_dependency(plain, example_inputs=EX)
    base = tp.importance.GroupMagnitudeImportance(p=1)
    for k in range(3):
        imp = TicketImportance(routed, k)
        for name in ("conv1", "conv2"):
            mod = plain.get_submodule(name)
            group = dg.get_pruning_group(mod, tp.prune_conv_out_channels, list(range(mod.out_channels)))
            s, b = imp(group), base(group)
            keep = routed.tickets.masks[name][k]
            assert bool(torch.isinf(s[~keep]).all()) and bool((s[~keep] < 0).all())
            assert torch.allclose(s[keep], b[keep])


def test_ticket_importance_weight_mode_zero_for_fully_dropped_channels(make_tiny):
    routed = wrap(make_tiny())
    ts = rtl.TicketSet.random(routed.space, 3, keep=0.5, seed=3)
    masks = {n: m.clone() for n, m in ts.masks.items()}
    masks["conv1"][1, [2, 5]] = False          # ticket 1 drops every weight of conv1's channels 2 and 5
    masks["conv1"][1, [0, 3], 0, 0, 0] = True  # and keeps at least one weight in these
    masks["conv2"][1, 7] = False
    routed.set_tickets(rtl.TicketSet(routed.space, masks))
    plain = routed.plain_copy(1)
    dg = tp.DependencyGraph().build_dependency(plain, example_inputs=EX)
    imp = TicketImportance(routed, 1)
    for name, dropped in (("conv1", [2, 5]), ("conv2", [7])):
        mod = plain.get_submodule(name)
        group = dg.get_pruning_group(mod, tp.prune_conv_out_channels, list(range(mod.out_channels)))
        s = imp(group)
        w = routed.model.get_submodule(name).weight.detach()
        expected = (w * masks[name][1]).abs().flatten(1).sum(1)
        assert torch.allclose(s, expected, rtol=1e-6, atol=0)
        assert bool((s[dropped] == 0).all())
        alive = torch.ones(mod.out_channels, dtype=torch.bool)
        alive[dropped] = False
        assert bool((s[alive] > 0).all())
    # another ticket's score does not see ticket 1's zeros
    s0 = TicketImportance(routed, 0)(dg.get_pruning_group(plain.conv1, tp.prune_conv_out_channels, list(range(8))))
    assert bool((s0[[2, 5]] > 0).all())


def test_ticket_importance_rejects_bad_ticket(make_tiny):
    routed = wrap(make_tiny())
    for bad in (3, -1, 1.0, True):
        with pytest.raises(rtl.TicketError):
            TicketImportance(routed, bad)


# ----------------------------------------------------------------------------- per-layer ranking (scope="layer")
def test_layer_scope_prunes_every_layer_equally_and_by_magnitude(make_tiny, make_loader):
    routed = wrap(make_tiny())
    N = routed.space.num_weights
    before = {n: w.detach().abs().clone() for n, w in routed.prunable_weights().items()}
    p = RTLPruner(routed, sparsities=[0.5, 0.9], prune_fraction=0.5, scope="layer", progress=False)
    res = p.find_tickets({0: make_loader(1)}, train_step=Guard(100), tickets=[0])
    for t in (0.5, 0.9):
        ts = res.tickets_at[t]
        assert abs(float(ts.sparsity()[0]) - t) <= 1 / N
        for name, m in ts.masks.items():
            layer_sp = 1 - float(m[0].float().mean())
            assert abs(layer_sp - t) < 0.05, (name, layer_sp)  # every layer close to the target, none emptied
            assert m[0].any()
            # no training: within a layer, every dropped weight is no larger than every kept one
            kept_min = before[name][m[0]].min()
            dropped = before[name][~m[0]]
            assert dropped.numel() == 0 or dropped.max() <= kept_min


def test_global_scope_can_empty_layers_that_layer_scope_keeps(make_tiny, make_loader):
    routed = wrap(make_tiny())
    with torch.no_grad():
        routed.prunable_weights()["conv1"].mul_(1e-3)  # a (small) layer with much smaller weights
    for scope, expect_empty in (("global", True), ("layer", False)):
        r = RTLPruner(routed, sparsities=[0.6], prune_fraction=0.5, scope=scope, progress=False)
        res = r.find_tickets({0: make_loader(1)}, train_step=Guard(100), tickets=[0])
        empty = not bool(res.tickets_at[0.6].masks["conv1"][0].any())
        assert empty == expect_empty, scope


def test_bad_scope_rejected(make_tiny):
    with pytest.raises(rtl.SparsityError, match="scope"):
        RTLPruner(wrap(make_tiny()), scope="channel")


def test_k_must_match_the_subsets(make_tiny, make_loader):
    routed = wrap(make_tiny(), K=3)
    with pytest.raises(rtl.DataError, match="K=3"):
        RTLPruner(routed, progress=False).find_tickets({0: make_loader(1), 1: make_loader(1)}, train_step=no_train)
    with pytest.raises(rtl.TicketError, match="outside"):
        RTLPruner(routed, progress=False).find_tickets({k: make_loader(1) for k in range(4)}, train_step=no_train)


def test_nan_weights_during_search_raise(make_tiny, make_loader):
    routed = wrap(make_tiny())
    before = state(routed)

    def poison(view, batch, opt):
        with torch.no_grad():
            routed.prunable_weights()["conv2"][0, 0, 0, 0] = float("nan")
        return 0.0

    with pytest.raises(rtl.RTLError, match="NaN/inf weights"):
        RTLPruner(routed, sparsities=[0.5], progress=False).find_tickets(
            {0: make_loader(1)}, train_step=poison, tickets=[0])
    assert_state_equal(state(routed), before)  # weights rewound, masks restored
    assert bool(routed.tickets.masks["conv2"].all())


# ----------------------------------------------------------------------------- 9. round order and round-end actions


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_round_order_gives_the_ticket_order_masks(granularity, make_tiny, make_loader):
    """With per-loader generators each ticket's search is independent of the interleaving."""
    def run(order):
        torch.manual_seed(7)
        routed = wrap(make_tiny(), granularity)
        p = RTLPruner(routed, sparsities=[0.3, 0.6], prune_fraction=0.3, order=order, progress=False)
        return p.find_tickets({k: make_loader(2, seed=k, shuffle=True) for k in range(3)}, optimizer_factory=adam(),
                              train_step=trained())

    a, b = run("ticket"), run("round")
    for t in a.tickets_at:
        for n in a.tickets_at[t].masks:
            assert torch.equal(a.tickets_at[t].masks[n], b.tickets_at[t].masks[n]), (t, n)
    key = lambda r: (r.ticket, r.round)  # noqa: E731
    assert sorted((r.ticket, r.round, r.sparsity, r.loss) for r in a.history) == \
        sorted((r.ticket, r.round, r.sparsity, r.loss) for r in b.history)
    assert [r.ticket for r in b.history][:3] == [0, 1, 2]  # interleaved
    assert [key(r) for r in a.history] == sorted(key(r) for r in a.history)


class _RoundSpy:
    def __init__(self, act_at=None, action="stop"):
        self.ends, self.trained, self.act_at, self.action = [], [], act_at, action

    def on_trained(self, ev):
        self.trained.append((ev["ticket"], ev["round"], ev["sparsity"]))
        assert ev["model"].training is False or ev["model"].training is True

    def on_round_end(self, ev):
        self.ends.append((ev["round"], list(ev["active"]), list(ev["sparsity"])))
        return self.action if ev["round"] == self.act_at else None

    def __call__(self, ev):
        return None


def test_round_end_events_and_on_trained(make_tiny, make_loader):
    routed = wrap(make_tiny())
    spy = _RoundSpy()
    res = RTLPruner(routed, sparsities=[0.5], prune_fraction=0.25, order="round", callbacks=[spy],
                    progress=False).find_tickets({k: make_loader(1) for k in range(3)}, train_step=Guard(500))
    rounds = max(r.round for r in res.history)
    assert [e[0] for e in spy.ends] == list(range(1, rounds + 1))
    assert all(e[1] == [0, 1, 2] for e in spy.ends)
    assert len(spy.trained) == len(res.history)
    # on_trained sees the sparsity of the masks it trained: 0 for round 1
    assert [s for k, r, s in spy.trained if r == 1] == [0.0, 0.0, 0.0]


def test_ticket_order_never_calls_round_end(make_tiny, make_loader):
    spy = _RoundSpy()
    RTLPruner(wrap(make_tiny()), sparsities=[0.5], callbacks=[spy], progress=False).find_tickets(
        {k: make_loader(1) for k in range(3)}, train_step=Guard(500))
    assert spy.ends == [] and len(spy.trained) > 0


def test_round_end_stop_restores_the_last_healthy_masks(make_tiny, make_loader):
    subsets = {k: make_loader(1, seed=k) for k in range(3)}
    ref = RTLPruner(wrap(make_tiny()), sparsities=[0.2, 0.36, 0.488], prune_fraction=0.2, order="round",
                    progress=False).find_tickets(subsets, optimizer_factory=adam(), train_step=trained())
    spy = _RoundSpy(act_at=2)  # "collapse" seen on the masks of round 2 -> back to round 1's masks
    routed = wrap(make_tiny())
    res = RTLPruner(routed, sparsities=[0.2, 0.36, 0.488], prune_fraction=0.2, order="round", callbacks=[spy],
                    progress=False).find_tickets(subsets, optimizer_factory=adam(), train_step=trained())
    assert len(spy.ends) == 2
    for t in (0.2, 0.36, 0.488):
        for n in routed.space.layers:
            assert torch.equal(res.tickets_at[t].masks[n], ref.tickets_at[0.2].masks[n]), (t, n)
    assert res.stopped == {0: 2, 1: 2, 2: 2}
    for n in routed.space.layers:
        assert torch.equal(routed.tickets.masks[n], ref.tickets_at[0.2].masks[n])


def test_round_end_relax_halves_the_step_and_goes_on(make_tiny, make_loader):
    routed = wrap(make_tiny())
    spy = _RoundSpy(act_at=2, action="relax")
    p = RTLPruner(routed, sparsities=[0.5], prune_fraction=0.4, order="round", callbacks=[spy], progress=False)
    res = p.find_tickets({k: make_loader(1) for k in range(2)}, tickets=[0, 1], train_step=Guard(500))
    sp = [e[2][0] for e in spy.ends]
    assert sp[0] == pytest.approx(0.4, abs=1e-3) and sp[1] == pytest.approx(0.5, abs=1e-3)  # round 2 is undone
    assert sp[2] == pytest.approx(0.5, abs=1e-3)  # 0.4 + 0.6 * 0.2 = 0.52 -> capped at the target
    assert float(res.tickets_at[0.5].sparsity()[0]) == pytest.approx(0.5, abs=1e-3)
    assert p.prune_fraction == 0.4 and not res.stopped  # restored after the search


def test_round_end_bad_action_and_bad_order(make_tiny, make_loader):
    with pytest.raises(rtl.SparsityError, match="order"):
        RTLPruner(wrap(make_tiny()), order="random")
    with pytest.raises(rtl.SparsityError, match="max_relaxations"):
        RTLPruner(wrap(make_tiny()), max_relaxations=-1)
    spy = _RoundSpy(act_at=1, action="explode")
    with pytest.raises(rtl.RTLError, match="on_round_end"):
        RTLPruner(wrap(make_tiny()), sparsities=[0.5], order="round", callbacks=[spy], progress=False).find_tickets(
            {k: make_loader(1) for k in range(3)}, train_step=Guard(500))


def test_kth_smallest_sort_and_selection_agree_with_ties():
    from rtl_plugin.pruning.pruner import kth_smallest
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (10_000,), generator=g).float()  # many ties
    x[::7] = float("inf")  # pruned entries score +inf
    for n in (1, 17, 5_000, 8_571, 10_000):
        want = torch.sort(x).values[n - 1]
        assert kth_smallest(x, n, method="sort") == want == kth_smallest(x, n, method="kthvalue") == kth_smallest(x, n)
    with pytest.raises(rtl.RTLError, match="n must be"):
        kth_smallest(x, 0)
    with pytest.raises(rtl.RTLError, match="1-D"):
        kth_smallest(x.view(100, 100), 3)
    with pytest.raises(rtl.RTLError, match="method"):
        kth_smallest(x, 3, method="median")
