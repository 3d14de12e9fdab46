"""Joint retraining (stage 2): masked updates, per-ticket norm statistics, balanced cyclic batching,
validation, history and determinism."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import rtl_plugin as rtl
from _helpers import half_tickets
from rtl_plugin.training import retrain as training
from rtl_plugin.training import ticket_optimizer  # where joint_retrain's steps build their MaskedUpdate
from rtl_plugin.training.retrain import (MaskedUpdate, balanced_cyclic_batches, clone_optimizer, default_train_step,
                                 joint_retrain)

EX = torch.randn(1, 3, 8, 8)

class CloneableAdamW(torch.optim.AdamW):
    """AdamW that accepts the ``decoupled_weight_decay`` entry torch puts in its defaults (works around
    ADAMW_CLONE_BUG so the per-ticket-state guarantee can still be checked with decoupled weight decay)."""

    def __init__(self, params, decoupled_weight_decay=True, **kw):
        assert decoupled_weight_decay
        super().__init__(params, **kw)


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adamw_cloneable": lambda ps: CloneableAdamW(ps, lr=1e-2, weight_decay=0.1),
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
}


# ----------------------------------------------------------------------------- helpers



def wrap(model, granularity, K=3, keep=0.5, seed=1):
    """Routed model with K random tickets (channel mode: exactly half of each group, so every ticket drops
    channels everywhere)."""
    routed = rtl.wrap(model, K, example_inputs=EX, granularity=granularity, adapter="generic",
                      output_layers=["head"])
    if granularity == "weight":
        routed.set_tickets(rtl.TicketSet.random(routed.space, K, keep=keep, seed=seed))
    else:
        routed.set_tickets(half_tickets(routed.space, K, seed=seed))
    return routed


def owned_entries(routed, k):
    """``{parameter name: bool mask broadcastable to it}``: what ticket k owns, computed from the ticket masks
    independently of ``training.ticket_param_masks``.

    Weight mode: the element masks of the prunable weights. Channel mode (GroupedCNN only): a conv weight
    entry (o, i) is owned when the ticket keeps output channel o and the input channel it reads; conv biases
    and BN affine parameters are owned per output channel.
    """
    masks = routed.tickets.masks
    if routed.granularity == "weight":
        return {f"{n}.weight": masks[n][k] for n in routed.space.layers}
    assert sorted(g.root for g in routed.space.groups) == ["conv1", "conv2", "conv3"]
    c1, c2, c3 = (masks[n][k] for n in ("conv1", "conv2", "conv3"))
    own = {
        "conv1.weight": c1[:, None, None, None].expand(8, 3, 3, 3),
        # grouped conv (groups=2): out channel o reads input channels (o // 4) * 4 + [0..3]
        "conv2.weight": torch.stack([c2[o] & c1[(o // 4) * 4:(o // 4) * 4 + 4] for o in range(8)])[:, :, None, None]
        .expand(8, 4, 3, 3),
        "conv3.weight": (c3[:, None] & c2[None, :])[:, :, None, None],
    }
    for name, keep in (("conv1", c1), ("bn1", c1), ("conv2", c2), ("bn2", c2), ("conv3", c3), ("bn3", c3)):
        own[f"{name}.bias"] = keep
        if name.startswith("bn"):
            own[f"{name}.weight"] = keep
    return own


def snapshot(routed):
    return {n: p.detach().clone() for n, p in routed.model.named_parameters()}


class StepLog:
    """Replaces ``MaskedUpdate`` inside ``joint_retrain``'s TicketOptimizer: records the parameters right before and
    right after every ticket step (after the masked write-back, i.e. what the next step sees)."""

    def __init__(self):
        self.records = []
        log = self

        class Recording(MaskedUpdate):
            def __enter__(self):
                self._rec_before = snapshot(self.routed)
                return super().__enter__()

            def __exit__(self, *exc):
                out = super().__exit__(*exc)
                log.records.append((self.ticket, self._rec_before, snapshot(self.routed)))
                return out

        self.cls = Recording


def check_masked_steps(routed, records, min_steps):
    """Every recorded step of ticket k left all entries k does not own bit-identical and changed many it owns."""
    assert len(records) >= min_steps
    assert len({k for k, _, _ in records}) == routed.num_tickets
    for k, before, after in records:
        own = owned_entries(routed, k)
        changed_inside = total_inside = 0
        for name, m in own.items():
            m = m.expand_as(before[name])
            assert (~m).any(), f"{name}: ticket {k} owns every entry, the check would be vacuous"
            n_moved = int((before[name][~m] != after[name][~m]).sum())
            assert torch.equal(before[name][~m], after[name][~m]), \
                f"ticket {k}'s step changed {n_moved} entries of {name} it does not own"
            if name.endswith("weight") and before[name].dim() > 1:
                changed_inside += int((before[name][m] != after[name][m]).sum())
                total_inside += int(m.sum())
        # not vacuous: the step did train the ticket's own weights
        assert changed_inside > 0.5 * total_inside, (k, changed_inside, total_inside)


def model_for(granularity, make_tiny, make_grouped):
    return make_tiny() if granularity == "weight" else make_grouped()


# ----------------------------------------------------------------------------- 1. masked-update guarantee


ADAMW_CLONE_BUG = ("bug: clone_optimizer (training.py:109) passes **optimizer.defaults to the constructor; torch "
                   ">= 2.x AdamW stores 'decoupled_weight_decay' in defaults but AdamW.__init__ does not accept it, "
                   "so joint_retrain(per_ticket_state=True) with AdamW raises TypeError")


def _opt_state_params():
    for name in OPTIMIZERS:
        for per_ticket in (True, False):
            marks = []
            yield pytest.param(name, per_ticket, marks=marks,
                               id=f"{name}-{'per_ticket_state' if per_ticket else 'shared_optimizer'}")


@pytest.mark.parametrize("opt_name,per_ticket_state", list(_opt_state_params()))
@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_joint_retrain_masked_update_guarantee(granularity, opt_name, per_ticket_state, make_tiny, make_grouped,
                                               make_loader, monkeypatch):
    routed = wrap(model_for(granularity, make_tiny, make_grouped), granularity)
    log = StepLog()
    monkeypatch.setattr(ticket_optimizer, "MaskedUpdate", log.cls)
    subsets = {k: make_loader(2, seed=k) for k in range(3)}
    opt = OPTIMIZERS[opt_name](routed.parameters())
    hist = joint_retrain(routed, subsets, optimizer=opt, epochs=2, per_ticket_state=per_ticket_state, progress=False)
    assert hist["steps"] == 2 * 2 * 3 == len(log.records)
    assert [k for k, _, _ in log.records] == [0, 1, 2] * 4
    check_masked_steps(routed, log.records, min_steps=12)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_masked_update_manual_loop_shared_optimizer(granularity, opt_name, make_tiny, make_grouped, make_loader):
    """MaskedUpdate(routed, k) around default_train_step on ticket k's view, one optimizer for all tickets,
    so the momentum / Adam moments / decay of the other tickets act on ticket k's step."""
    routed = wrap(model_for(granularity, make_tiny, make_grouped), granularity)
    opt = OPTIMIZERS[opt_name](routed.parameters())
    step = default_train_step()
    batches = list(make_loader(3, seed=7))
    records = []
    routed.train()
    for i, k in enumerate([0, 1, 2, 1, 0, 2, 2, 0, 1]):
        before = snapshot(routed)
        with MaskedUpdate(routed, k):
            loss = step(routed.ticket_module(k), batches[i % 3], opt)
        assert math.isfinite(loss)
        records.append((k, before, snapshot(routed)))
    check_masked_steps(routed, records, min_steps=9)


@pytest.mark.parametrize("opt_name", ["adamw", "sgd_momentum_wd"])
@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_guarantee_check_is_sensitive(granularity, opt_name, make_tiny, make_grouped, make_loader):
    """Without MaskedUpdate a shared optimizer with decay / momentum does move entries outside the ticket, so
    the bit-identity checks above can fail."""
    routed = wrap(model_for(granularity, make_tiny, make_grouped), granularity)
    opt = OPTIMIZERS[opt_name](routed.parameters())
    step = default_train_step()
    batches = list(make_loader(2, seed=3))
    routed.train()
    step(routed.ticket_module(0), batches[0], opt)
    before = snapshot(routed)
    step(routed.ticket_module(1), batches[1], opt)
    after = snapshot(routed)
    moved = sum(int((before[n][~m.expand_as(before[n])] != after[n][~m.expand_as(before[n])]).sum())
                for n, m in owned_entries(routed, 1).items())
    assert moved > 0


def test_masked_update_restores_when_step_raises(make_tiny, make_loader):
    routed = wrap(make_tiny(), "weight")
    opt = torch.optim.AdamW(routed.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = next(iter(make_loader(1)))
    before = snapshot(routed)

    with pytest.raises(RuntimeError, match="boom"):
        with MaskedUpdate(routed, 2):
            nn.functional.cross_entropy(routed(x, route=2), y).backward()
            opt.step()
            raise RuntimeError("boom")
    after = snapshot(routed)
    for n, m in owned_entries(routed, 2).items():
        assert torch.equal(before[n][~m], after[n][~m])
        assert not torch.equal(before[n][m], after[n][m])


def test_ticket_param_masks_match_independent_ownership(make_grouped):
    routed = wrap(make_grouped(), "channel")
    names = {id(p): n for n, p in routed.model.named_parameters()}
    for k in range(3):
        pairs = {names[id(p)]: m for p, m in training.ticket_param_masks(routed, k)}
        own = owned_entries(routed, k)
        assert set(pairs) == set(own)
        for n, m in own.items():
            shape = dict(routed.model.named_parameters())[n].shape
            assert torch.equal(pairs[n].expand(shape), m.expand(shape)), n


def test_clone_optimizer_adamw():
    p = nn.Parameter(torch.ones(2))
    c = clone_optimizer(torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1))
    assert type(c) is torch.optim.AdamW and c.defaults["weight_decay"] == 0.1 and len(c.state) == 0


def test_clone_optimizer_same_config_fresh_state(make_tiny, make_loader):
    model = make_tiny()
    opt = torch.optim.SGD([{"params": [model.conv1.weight], "lr": 0.5},
                           {"params": [p for n, p in model.named_parameters() if n != "conv1.weight"]}],
                          lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    x, y = next(iter(make_loader(1)))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert len(opt.state) > 0
    c = clone_optimizer(opt)
    assert type(c) is torch.optim.SGD and len(c.state) == 0
    assert len(c.param_groups) == 2
    for g0, g1 in zip(opt.param_groups, c.param_groups):
        assert [id(p) for p in g0["params"]] == [id(p) for p in g1["params"]]
        assert {k: v for k, v in g0.items() if k != "params"} == {k: v for k, v in g1.items() if k != "params"}


# ----------------------------------------------------------------------------- 2. per-ticket BN statistics


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_training_one_ticket_updates_only_its_norm_statistics(granularity, make_tiny, make_grouped, make_loader):
    routed = wrap(model_for(granularity, make_tiny, make_grouped), granularity)
    bns = {n: m for n, m in routed.model.named_modules() if isinstance(m, rtl.RoutedBatchNorm)}
    assert bns
    before = {n: {b: m._buffers[b].clone() for b in ("running_mean", "running_var", "num_batches_tracked")}
              for n, m in bns.items()}
    for m in bns.values():
        assert m.running_mean.shape == (3, m.num_features)
    opt = torch.optim.SGD(routed.parameters(), lr=0.05)
    hist = joint_retrain(routed, {1: make_loader(3)}, optimizer=opt, epochs=1, progress=False)
    assert hist["steps"] == 3
    for n, m in bns.items():
        for b in ("running_mean", "running_var"):
            assert torch.equal(m._buffers[b][0], before[n][b][0]), (n, b)
            assert torch.equal(m._buffers[b][2], before[n][b][2]), (n, b)
            assert not torch.equal(m._buffers[b][1], before[n][b][1]), (n, b)
        assert m.num_batches_tracked.tolist() == [0, 3, 0]


# ----------------------------------------------------------------------------- 3. balanced cyclic batching


def tagged_loader(ticket, n):
    """A loader of n batches; batch j of this loader is the tensor [[ticket, j]]."""
    return DataLoader(TensorDataset(torch.tensor([[ticket, j] for j in range(n)])), batch_size=1)


def test_balanced_cyclic_batches_order_and_cycling():
    loaders = {2: tagged_loader(2, 1), 0: tagged_loader(0, 5), 1: tagged_loader(1, 2)}
    got = [(i, k, tuple(batch[0][0].tolist())) for i, k, batch in balanced_cyclic_batches(loaders)]
    expected = [(i, k, (k, i % n)) for i in range(5) for k, n in ((0, 5), (1, 2), (2, 1))]
    assert got == expected
    assert len(got) == 15


def test_joint_retrain_follows_balanced_cyclic_batching(make_tiny):
    routed = wrap(make_tiny(), "weight")
    seen = []

    def step(view, batch, opt):
        seen.append((view.k, tuple(batch[0][0].tolist())))
        return 0.0

    opt = torch.optim.SGD(routed.parameters(), lr=0.1)
    hist = joint_retrain(routed, [tagged_loader(0, 5), tagged_loader(1, 2), tagged_loader(2, 1)], optimizer=opt,
                         epochs=2, train_step=step, progress=False)
    epoch = [(k, (k, i % n)) for i in range(5) for k, n in ((0, 5), (1, 2), (2, 1))]
    assert seen == epoch * 2
    assert hist["steps"] == 30


# ----------------------------------------------------------------------------- 4. validation and history


def test_joint_retrain_history_shape_and_values(make_tiny):
    routed = wrap(make_tiny(), "weight")

    def step(view, batch, opt):  # loss = 10 * ticket + batch index within its loader
        t, j = batch[0][0].tolist()
        assert t == view.k
        return float(10 * t + j)

    opt = torch.optim.SGD(routed.parameters(), lr=0.1)
    hist = joint_retrain(routed, {0: tagged_loader(0, 2), 1: tagged_loader(1, 3), 2: tagged_loader(2, 1)},
                         optimizer=opt, epochs=2, train_step=step, progress=False)
    assert set(hist) == {"loss", "steps"}
    assert hist["steps"] == 2 * 3 * 3
    assert len(hist["loss"]) == 2 and all(len(e) == 3 for e in hist["loss"])
    # M = 3 batch indices: ticket 0 sees batches 0, 1, 0; ticket 1: 0, 1, 2; ticket 2: 0, 0, 0
    for epoch in hist["loss"]:
        assert epoch == pytest.approx([1 / 3, 10 + 1, 20])


def test_joint_retrain_subset_of_tickets_history_and_callback_stop(make_tiny):
    routed = wrap(make_tiny(), "weight")
    events = []

    def cb(ev):
        events.append(ev)
        return "stop" if ev["epoch"] == 1 else None

    opt = torch.optim.SGD(routed.parameters(), lr=0.1)
    hist = joint_retrain(routed, {2: tagged_loader(2, 2), 0: tagged_loader(0, 1)}, optimizer=opt, epochs=5,
                         train_step=lambda v, b, o: 1.0, callbacks=[cb], progress=False)
    assert hist["steps"] == 2 * 2 * 2
    assert hist["loss"] == [[1.0, 1.0], [1.0, 1.0]]
    assert [e["epoch"] for e in events] == [0, 1]


def test_joint_retrain_zero_epochs_is_a_no_op(make_tiny, make_loader):
    routed = wrap(make_tiny(), "weight")
    before = {k: v.clone() for k, v in routed.state_dict().items()}
    hist = joint_retrain(routed, [make_loader(1)] * 3, optimizer=torch.optim.Adam(routed.parameters()), epochs=0,
                         progress=False)
    assert hist == {"loss": [], "steps": 0}
    assert all(torch.equal(before[k], v) for k, v in routed.state_dict().items())


@pytest.mark.parametrize("bad", [{3: 0}, {0: 0, 5: 0}], ids=["ticket_3_of_3", "ticket_5"])
def test_joint_retrain_rejects_ticket_outside_K(bad, make_tiny, make_loader):
    routed = wrap(make_tiny(), "weight")
    subsets = {k: make_loader(1) for k in bad}
    with pytest.raises(rtl.TicketError, match="routes 3 tickets"):
        joint_retrain(routed, subsets, optimizer=torch.optim.SGD(routed.parameters(), lr=0.1), progress=False)


def test_joint_retrain_rejects_empty_loader(make_tiny, make_loader):
    routed = wrap(make_tiny(), "weight")
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=2)
    before = {k: v.clone() for k, v in routed.state_dict().items()}
    with pytest.raises(rtl.DataError, match="empty"):
        joint_retrain(routed, {0: make_loader(1), 1: empty}, optimizer=torch.optim.SGD(routed.parameters(), lr=0.1),
                      progress=False)
    with pytest.raises(rtl.DataError):
        joint_retrain(routed, {}, optimizer=torch.optim.SGD(routed.parameters(), lr=0.1), progress=False)
    assert all(torch.equal(before[k], v) for k, v in routed.state_dict().items())


class _EmptyStream(IterableDataset):
    def __iter__(self):
        return iter(())


class _Stream(IterableDataset):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        return iter([(torch.randn(3, 8, 8, generator=g), torch.tensor(i % 5)) for i in range(self.n)])


@pytest.mark.parametrize("stream", [_EmptyStream(), _Stream(8)], ids=["empty_stream", "stream"])
def test_joint_retrain_unsized_loader(stream, make_tiny, make_loader):
    routed = wrap(make_tiny(), "weight")
    loader = DataLoader(stream, batch_size=4)
    opt = torch.optim.SGD(routed.parameters(), lr=0.1)
    # balanced cyclic batching needs the batch count of every subset: unsized loaders are rejected clearly
    with pytest.raises(rtl.DataError, match="no length"):
        joint_retrain(routed, {0: make_loader(1), 1: loader}, optimizer=opt, progress=False)


@pytest.mark.parametrize("epochs", [-1, 1.5, "2", None])
def test_joint_retrain_rejects_bad_epochs(epochs, make_tiny, make_loader):
    routed = wrap(make_tiny(), "weight")
    with pytest.raises(rtl.DataError, match="epochs"):
        joint_retrain(routed, [make_loader(1)], optimizer=torch.optim.SGD(routed.parameters(), lr=0.1),
                      epochs=epochs, progress=False)


def test_joint_retrain_non_finite_loss_default_step(make_tiny, make_loader):
    routed = wrap(make_tiny(), "weight")
    x, y = next(iter(make_loader(1)))
    x[0, 0, 0, 0] = float("nan")
    bad = DataLoader(TensorDataset(x, y), batch_size=4)
    with pytest.raises(rtl.RTLError, match="non-finite loss"):
        joint_retrain(routed, {0: make_loader(1), 1: bad}, optimizer=torch.optim.SGD(routed.parameters(), lr=0.1),
                      progress=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_joint_retrain_non_finite_loss_custom_step(value, make_tiny, make_loader):
    routed = wrap(make_tiny(), "weight")
    calls = []

    def step(view, batch, opt):
        calls.append(view.k)
        return value if view.k == 1 else 0.5

    with pytest.raises(rtl.RTLError, match="non-finite loss in ticket 1"):
        joint_retrain(routed, [make_loader(2)] * 3, optimizer=torch.optim.SGD(routed.parameters(), lr=0.1),
                      train_step=step, progress=False)
    assert calls == [0, 1]  # stops at the first bad step


def test_joint_retrain_rejects_plain_module(make_tiny, make_loader):
    model = make_tiny()
    with pytest.raises(TypeError, match="RoutedModel"):
        joint_retrain(model, [make_loader(1)], optimizer=torch.optim.SGD(model.parameters(), lr=0.1), progress=False)


def test_default_train_step_rejects_non_pair_batches(make_tiny):
    routed = wrap(make_tiny(), "weight")
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 8, 8)), batch_size=2)
    with pytest.raises(rtl.DataError, match="train_step="):
        joint_retrain(routed, [loader], optimizer=torch.optim.SGD(routed.parameters(), lr=0.1), progress=False)


def test_joint_retrain_restores_training_flag(make_tiny, make_loader):
    routed = wrap(make_tiny(), "weight")
    routed.eval()
    modes = []
    joint_retrain(routed, [make_loader(1)], optimizer=torch.optim.SGD(routed.parameters(), lr=0.1),
                  train_step=lambda v, b, o: modes.append(v.routed.training) or 0.0, progress=False)
    assert modes == [True]
    assert not routed.training and not any(m.training for m in routed.modules())


# ----------------------------------------------------------------------------- 5. determinism


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_joint_retrain_same_seed_same_weights(granularity, make_tiny, make_grouped, make_loader):
    def run(loader_seed):
        routed = wrap(model_for(granularity, make_tiny, make_grouped), granularity)
        subsets = {k: make_loader(3, seed=k + loader_seed, shuffle=True) for k in range(3)}
        # SGD with momentum and decay: AdamW cannot be cloned per ticket (see ADAMW_CLONE_BUG)
        opt = torch.optim.SGD(routed.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
        joint_retrain(routed, subsets, optimizer=opt, epochs=2, progress=False)
        return routed.state_dict()

    a, b, c = run(0), run(0), run(10)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert any(not torch.equal(a[n], c[n]) for n in a)  # a different data order gives different weights


# ----------------------------------------------------------------------------- write-back skipping


@pytest.mark.parametrize("granularity,opt_name,per_ticket,needed", [
    ("weight", "adam", True, False), ("weight", "sgd_nesterov", True, False),
    ("weight", "adam", False, True),                   # shared state: momentum of ticket j moves ticket k
    ("weight", "adamw", True, True), ("weight", "sgd_momentum_wd", True, True),   # weight decay
    ("weight", "adamw_cloneable", True, True),         # subclass: update rule unknown
    ("channel", "adam", True, True),                   # norm affine of dropped channels may get gradient
])
def test_write_back_needed(granularity, opt_name, per_ticket, needed, make_tiny, make_grouped):
    routed = wrap(model_for(granularity, make_tiny, make_grouped), granularity)
    opt = OPTIMIZERS[opt_name](routed.parameters())
    assert training.write_back_needed(routed, [opt], per_ticket) is needed


def test_write_back_needed_when_state_not_empty(make_tiny, make_loader):
    routed = wrap(make_tiny(), "weight")
    opt = torch.optim.Adam(routed.parameters(), lr=1e-2)
    assert not training.write_back_needed(routed, [opt], True)
    default_train_step()(routed.ticket_module(0), next(iter(make_loader(1))), opt)
    assert training.write_back_needed(routed, [opt], True)  # moments from an unmasked history


@pytest.mark.parametrize("opt_name", ["adam", "sgd_nesterov"])
def test_skipped_write_back_is_bit_identical(opt_name, make_tiny, make_loader, monkeypatch):
    """The auto path (no write-back) gives exactly the same weights as the forced snapshot/write-back, and
    still leaves entries outside the ticket untouched at every step."""
    results = {}
    for wb in (None, True):
        torch.manual_seed(0)
        routed = wrap(make_tiny(), "weight")
        log, flags = StepLog(), []

        class Flagged(log.cls):
            def __enter__(self):
                flags.append(self.write_back)
                return super().__enter__()

        monkeypatch.setattr(ticket_optimizer, "MaskedUpdate", Flagged)
        subsets = {k: make_loader(2, seed=k) for k in range(3)}
        joint_retrain(routed, subsets, optimizer=OPTIMIZERS[opt_name](routed.parameters()), epochs=2,
                      progress=False, write_back=wb)
        assert set(flags) == {wb is True}  # auto skipped the write-back at every step
        check_masked_steps(routed, log.records, min_steps=12)
        results[wb] = snapshot(routed)
    for n in results[True]:
        assert torch.equal(results[None][n], results[True][n]), n


def test_write_back_rejects_non_bool(make_tiny, make_loader):
    routed = wrap(make_tiny(), "weight")
    with pytest.raises(TypeError, match="write_back"):
        joint_retrain(routed, {0: make_loader(1)}, optimizer=torch.optim.Adam(routed.parameters()),
                      progress=False, write_back="yes")


def _flags_of(monkeypatch):
    flags = []

    class Flagged(training.MaskedUpdate):
        def __enter__(self):
            flags.append(self.write_back)
            return super().__enter__()

    monkeypatch.setattr(ticket_optimizer, "MaskedUpdate", Flagged)
    return flags


def test_auto_write_back_kept_for_custom_steps_resume_and_mask_changes(make_tiny, make_loader, monkeypatch, tmp_path):
    routed = wrap(make_tiny(), "weight")
    subsets = {k: make_loader(1, seed=k) for k in range(3)}
    adam = lambda: torch.optim.Adam(routed.parameters(), lr=1e-2)  # noqa: E731
    flags = _flags_of(monkeypatch)
    # a custom step may add a loss on raw weights (e.g. L2 over parameters()): not provably safe
    joint_retrain(routed, subsets, optimizer=adam(), train_step=default_train_step(), progress=False)
    assert flags and all(flags)
    # resumed from a checkpoint: the restored optimizer settings/state are not checked, so write back
    flags.clear()
    joint_retrain(routed, subsets, optimizer=adam(), epochs=1, progress=False, checkpoint_dir=tmp_path)
    assert flags and not any(flags)
    flags.clear()
    joint_retrain(routed, subsets, optimizer=adam(), epochs=2, progress=False, checkpoint_dir=tmp_path)
    assert flags and all(flags)
    # masks changed mid-training (a callback sets new tickets): write back from then on
    flags.clear()
    new = rtl.TicketSet.random(routed.space, 3, keep=0.5, seed=9)
    joint_retrain(routed, subsets, optimizer=adam(), epochs=2, progress=False,
                  callbacks=[lambda info: routed.set_tickets(new)])
    per_epoch = len(flags) // 2
    assert not any(flags[:per_epoch]) and all(flags[per_epoch:])


def test_explicit_no_write_back_warns_when_unsafe(make_tiny, make_loader):
    routed = wrap(make_tiny(), "weight")
    with pytest.warns(UserWarning, match="masked-update guarantee"):
        joint_retrain(routed, {0: make_loader(1)}, optimizer=torch.optim.AdamW(routed.parameters(), weight_decay=0.1),
                      progress=False, write_back=False)


# ----------------------------------------------------------------------------- mixed-route retraining


def routed_loader(n_batches, K, batch_size=6, seed=0, route=None):
    """``(x, y, route)`` batches; ``route`` fixed to one ticket id, or random ids in [0, K)."""
    g = torch.Generator().manual_seed(seed)
    n = n_batches * batch_size
    r = torch.full((n,), route) if route is not None else torch.randint(0, K, (n,), generator=g)
    return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g), r),
                      batch_size=batch_size)


@pytest.mark.parametrize("granularity", ["weight", "channel"])
@pytest.mark.parametrize("opt_name", ["adamw", "sgd_momentum_wd"])
def test_mixed_route_retrain_never_moves_entries_no_ticket_owns(granularity, opt_name, make_tiny, make_grouped):
    K = 2
    routed = wrap(model_for(granularity, make_tiny, make_grouped), granularity, K=K)
    before = snapshot(routed)
    hist = training.mixed_route_retrain(routed, routed_loader(4, K), optimizer=OPTIMIZERS[opt_name](routed.parameters()),
                                        epochs=2, progress=False)
    assert hist["steps"] == 8 and len(hist["loss"]) == 2 and all(math.isfinite(v) for v in hist["loss"])
    after = snapshot(routed)
    owned = [owned_entries(routed, k) for k in range(K)]
    n_unowned = moved_owned = n_owned = 0
    for name in owned[0]:
        m = (owned[0][name] | owned[1][name]).expand_as(before[name])
        n_unowned += int((~m).sum())
        assert torch.equal(before[name][~m], after[name][~m]), f"{name}: entries no ticket owns moved"
        if before[name].dim() > 1:
            moved_owned += int((before[name][m] != after[name][m]).sum())
            n_owned += int(m.sum())
    assert n_unowned > 0  # the check is not vacuous
    assert moved_owned > 0.5 * n_owned


def test_mixed_route_retrain_batch_of_one_route_trains_only_that_ticket(make_tiny):
    routed = wrap(make_tiny(), "weight", K=3)
    before = snapshot(routed)
    training.mixed_route_retrain(routed, routed_loader(1, 3, route=1), epochs=1, progress=False,
                                 optimizer=torch.optim.SGD(routed.parameters(), lr=0.1))
    after = snapshot(routed)
    own = owned_entries(routed, 1)
    for name, m in own.items():
        assert torch.equal(before[name][~m], after[name][~m]), f"{name}: a ticket-1 batch moved entries ticket 1 does not own"
        assert int((before[name][m] != after[name][m]).sum()) > 0.5 * int(m.sum())


class NoNormCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def test_mixed_route_retrain_with_identical_tickets_equals_single_model_training():
    """Same masks for every ticket: the mixed-route steps are exactly a single masked model's steps on the same
    batches (no normalisation layer, whose per-route statistics would legitimately differ)."""
    def make():
        torch.manual_seed(0)
        return NoNormCNN()
    K = 3
    routed = rtl.wrap(make(), K, example_inputs=EX, adapter="generic", output_layers=["head"])
    one = rtl.TicketSet.random(routed.space, 1, keep=0.5, seed=3)
    routed.set_tickets(rtl.TicketSet(routed.space, {n: m.expand(K, *m.shape[1:]).clone() for n, m in one.masks.items()}))
    single = rtl.wrap(make(), 1, example_inputs=EX, adapter="generic", output_layers=["head"])
    single.set_tickets(one)
    loader = routed_loader(5, K, seed=4)
    training.mixed_route_retrain(routed, loader, epochs=1, progress=False,
                                 optimizer=torch.optim.SGD(routed.parameters(), lr=0.05, momentum=0.9))
    opt = torch.optim.SGD(single.parameters(), lr=0.05, momentum=0.9)
    step = default_train_step()
    for x, y, _ in loader:
        step(lambda inp: single(inp, route=0), (x, y), opt)
    a, b = snapshot(routed), snapshot(single)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
    assert not torch.equal(a["conv1.weight"], make().conv1.weight.detach())  # it trained


def test_mixed_route_retrain_rejects_bad_batches(make_tiny, make_loader):
    routed = wrap(make_tiny(), "weight", K=3)
    opt = torch.optim.SGD(routed.parameters(), lr=0.1)
    with pytest.raises(rtl.DataError, match="third tensor"):
        training.mixed_route_retrain(routed, make_loader(2), optimizer=opt, progress=False)
    bad_ids = routed_loader(1, 3, route=3)
    with pytest.raises(rtl.DataError, match="outside"):
        training.mixed_route_retrain(routed, bad_ids, optimizer=opt, progress=False)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    with pytest.raises(rtl.DataError, match="one ticket id per sample"):
        training.mixed_route_retrain(routed, [(x, y, torch.zeros(3, dtype=torch.long))], optimizer=opt, progress=False)
    with pytest.raises(rtl.DataError, match="one ticket id per sample"):
        training.mixed_route_retrain(routed, [(x, y, torch.zeros(4))], optimizer=opt, progress=False)
    with pytest.raises(rtl.DataError, match="epochs"):
        training.mixed_route_retrain(routed, routed_loader(1, 3), optimizer=opt, epochs=-1, progress=False)
    with pytest.raises(rtl.DataError, match="empty"):
        training.mixed_route_retrain(routed, [], optimizer=opt, progress=False)
    with pytest.raises(TypeError, match="RoutedModel"):
        training.mixed_route_retrain(make_tiny(), routed_loader(1, 3), optimizer=opt, progress=False)
    with pytest.raises(TypeError, match="optimizer"):
        training.mixed_route_retrain(routed, routed_loader(1, 3), optimizer=None, progress=False)


def test_retrain_tickets_mixed_schedule_and_bad_names(make_tiny):
    routed = wrap(make_tiny(), "weight", K=3)
    theta = {k: v.clone() for k, v in routed.model.state_dict().items()}
    tickets = routed.tickets
    training.retrain_tickets(routed, theta, tickets, routed_loader(2, 3), lr=1e-2, epochs=1, schedule="mixed",
                             progress=False)
    assert not routed.training  # left in eval mode
    moved = routed.model.state_dict()["conv1.weight"]
    assert not torch.equal(moved, theta["conv1.weight"])
    with pytest.raises(rtl.DataError, match="schedule"):
        training.retrain_tickets(routed, theta, tickets, routed_loader(1, 3), lr=1e-2, epochs=1, schedule="summed")
    with pytest.raises(rtl.TicketError, match="ticket id or the owned"):
        MaskedUpdate(routed, None)


def test_retrain_tickets_retrain_mode_optimizer_and_deprecated_schedule(make_tiny):
    """retrain_mode= is the stage-2 schedule's name (schedule= warns and still works); optimizer= (an instance,
    cloned) gives what lr= (Adam) gives."""
    results = []
    for how in ("lr", "optimizer", "schedule"):
        torch.manual_seed(0)
        routed = wrap(make_tiny(), "weight", K=3)
        theta = {k: v.clone() for k, v in routed.model.state_dict().items()}
        kw = dict(epochs=1, progress=False)
        if how == "lr":
            training.retrain_tickets(routed, theta, routed.tickets, routed_loader(2, 3), lr=1e-2,
                                     retrain_mode="mixed", **kw)
        elif how == "optimizer":
            opt = torch.optim.Adam(routed.parameters(), lr=1e-2)
            training.retrain_tickets(routed, theta, routed.tickets, routed_loader(2, 3), optimizer=opt,
                                     retrain_mode="mixed", **kw)
            assert len(opt.state) == 0  # cloned, not stepped
        else:
            with pytest.warns(DeprecationWarning, match="retrain_mode"):
                training.retrain_tickets(routed, theta, routed.tickets, routed_loader(2, 3), lr=1e-2,
                                         schedule="mixed", **kw)
        results.append(routed.model.state_dict())
    for other in results[1:]:
        for n in results[0]:
            assert torch.equal(results[0][n], other[n]), n
    routed = wrap(make_tiny(), "weight", K=3)
    theta = routed.model.state_dict()
    with pytest.raises(rtl.RTLError, match="exactly one"):
        training.retrain_tickets(routed, theta, routed.tickets, routed_loader(1, 3), epochs=1)
    with pytest.raises(rtl.DataError, match="retrain_mode"):
        training.retrain_tickets(routed, theta, routed.tickets, routed_loader(1, 3), lr=1e-2, epochs=1,
                                 retrain_mode="summed")
    with pytest.raises(rtl.DataError, match="disagree"), pytest.warns(DeprecationWarning):
        training.retrain_tickets(routed, theta, routed.tickets, routed_loader(1, 3), lr=1e-2, epochs=1,
                                 retrain_mode="sequential", schedule="mixed")


def test_joint_retrain_refuses_a_missing_optimizer(make_tiny, make_loader):
    routed = wrap(make_tiny(), "weight", K=2)
    with pytest.raises(rtl.RTLError, match="torch.optim.Optimizer"):
        training.joint_retrain(routed, {0: make_loader(1), 1: make_loader(1)}, optimizer=None, progress=False)
