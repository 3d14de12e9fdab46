"""The public pieces for a plain PyTorch loop: TicketOptimizer (masked steps, per-ticket or shared state, LR
schedulers reach every state), RouteBalancedSampler / RoutedDataset, and their equality with joint_retrain /
mixed_route_retrain."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

import rtl_plugin as rtl
from rtl_plugin.training import (RouteBalancedSampler, RoutedDataset, TicketOptimizer, joint_retrain,
                                 mixed_route_retrain)
from test_training import OPTIMIZERS, check_masked_steps, model_for, owned_entries, snapshot, wrap

PLAIN_OPTIMIZERS = {
    "sgd_momentum_wd": OPTIMIZERS["sgd_momentum_wd"],
    "adam": OPTIMIZERS["adam"],
    "adamw": OPTIMIZERS["adamw"],
    "rmsprop_wd": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5, weight_decay=0.01),
}


def batches(n, seed=0, bs=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, 8, 8, generator=g), torch.randint(0, 5, (bs,), generator=g)) for _ in range(n)]


def train_round(routed, topt, data, tickets=(0, 1, 2)):
    """One step per ticket per batch, the plain-loop way: zero_grad, routed forward, backward, step(ticket=k)."""
    routed.train()
    for x, y in data:
        for k in tickets:
            topt.zero_grad()
            F.cross_entropy(routed(x, route=k), y).backward()
            topt.step(ticket=k)


# ----------------------------------------------------------------------------- TicketOptimizer


def test_ticket_optimizer_is_a_torch_optimizer(make_routed):
    routed = make_routed("weight")
    opt = torch.optim.Adam(routed.parameters(), lr=1e-2)
    topt = TicketOptimizer(routed, opt)
    assert isinstance(topt, torch.optim.Optimizer)
    assert topt.param_groups is opt.param_groups
    assert all(topt.optimizer_for(k).param_groups is opt.param_groups for k in range(3))
    assert len({id(topt.optimizer_for(k)) for k in range(3)}) == 3 and topt.optimizer_for(0) is not opt
    shared = TicketOptimizer(routed, opt, per_ticket_state=False)
    assert all(shared.optimizer_for(k) is opt for k in range(3)) and shared.state is opt.state
    assert rtl.training.clone_optimizer(topt).param_groups[0]["lr"] == 1e-2  # clones the wrapped configuration


@pytest.mark.parametrize("per_ticket_state", [True, False], ids=["per_ticket", "shared"])
@pytest.mark.parametrize("opt_name", list(PLAIN_OPTIMIZERS))
@pytest.mark.parametrize("attach", ["StepLR_on_ticket_optimizer", "LambdaLR_on_user_optimizer"])
def test_scheduler_setting_lr_to_zero_freezes_every_ticket(attach, opt_name, per_ticket_state, make_routed):
    routed = make_routed("weight")
    opt = PLAIN_OPTIMIZERS[opt_name](routed.parameters())
    topt = TicketOptimizer(routed, opt, per_ticket_state=per_ticket_state)
    if attach == "StepLR_on_ticket_optimizer":
        sched = torch.optim.lr_scheduler.StepLR(topt, step_size=1, gamma=0.0)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 0.0)
    start = snapshot(routed)
    train_round(routed, topt, batches(2))
    moved = snapshot(routed)
    assert not torch.equal(moved["conv1.weight"], start["conv1.weight"])  # lr > 0: it trains
    with torch.no_grad():
        sched.step()
    assert all(topt.optimizer_for(k).param_groups[0]["lr"] == 0.0 for k in range(3))
    train_round(routed, topt, batches(2, seed=1))
    after = snapshot(routed)
    for n in moved:
        assert torch.equal(moved[n], after[n]), f"{n} moved with lr 0"


def test_no_scheduler_order_warning_with_per_ticket_state(make_routed, recwarn):
    routed = make_routed("weight")
    opt = torch.optim.SGD(routed.parameters(), lr=0.1)
    topt = TicketOptimizer(routed, opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    train_round(routed, topt, batches(1))
    sched.step()
    assert not [w for w in recwarn.list if "lr_scheduler" in str(w.message)]


def test_per_ticket_adam_states_differ_per_ticket(make_routed):
    routed = make_routed("weight")
    topt = TicketOptimizer(routed, torch.optim.Adam(routed.parameters(), lr=1e-2))
    train_round(routed, topt, batches(2))
    p = routed.model.conv2.weight
    avgs = [topt.optimizer_for(k).state[p]["exp_avg"] for k in range(3)]
    for a in range(3):
        m = routed.tickets.masks["conv2"][a]
        assert bool((avgs[a][~m] == 0).all())  # ticket a's moments saw only its own (masked) gradients
        assert bool((avgs[a][m] != 0).any())
        for b in range(a + 1, 3):
            assert not torch.equal(avgs[a], avgs[b])
    assert int(topt.optimizer_for(0).state[p]["step"]) == 2  # one step per batch, not per ticket step


@pytest.mark.parametrize("per_ticket_state", [True, False], ids=["per_ticket", "shared"])
@pytest.mark.parametrize("opt_name", list(PLAIN_OPTIMIZERS))
@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_plain_loop_masked_update_guarantee(granularity, opt_name, per_ticket_state, make_tiny, make_grouped):
    routed = wrap(model_for(granularity, make_tiny, make_grouped), granularity)
    topt = TicketOptimizer(routed, PLAIN_OPTIMIZERS[opt_name](routed.parameters()), per_ticket_state=per_ticket_state)
    routed.train()
    records = []
    for i, (x, y) in enumerate(batches(3, seed=2) * 2):
        for k in ((0, 1, 2) if i % 2 == 0 else (2, 0, 1)):
            before = snapshot(routed)
            topt.zero_grad()
            F.cross_entropy(routed(x, route=k), y).backward()
            topt.step(ticket=k)
            records.append((k, before, snapshot(routed)))
    check_masked_steps(routed, records, min_steps=18)


def test_select_block_masks_the_whole_step(make_routed):
    routed = make_routed("weight")
    topt = TicketOptimizer(routed, torch.optim.SGD(routed.parameters(), lr=0.1))
    x, y = batches(1)[0]
    routed.train()
    before = snapshot(routed)
    with topt.select(1):
        topt.zero_grad()
        F.cross_entropy(routed(x, route=1), y).backward()
        topt.step()
        with torch.no_grad():  # a train step writing weights itself: outside ticket 1 it is undone at exit
            routed.model.conv1.weight.add_(1.0)
        with pytest.raises(rtl.TicketError, match="inside the block"):
            topt.step(ticket=2)
    after = snapshot(routed)
    own = owned_entries(routed, 1)
    for n, m in own.items():
        assert torch.equal(before[n][~m], after[n][~m]), n
    assert topt.ticket == 1
    with pytest.raises(rtl.TicketError, match="no ticket selected"):
        TicketOptimizer(routed, torch.optim.SGD(routed.parameters(), lr=0.1)).step()


def test_several_tickets_in_one_step_need_shared_state(make_routed):
    routed = make_routed("weight")
    with pytest.raises(rtl.OptimizerError, match="per_ticket_state=False"):
        TicketOptimizer(routed, torch.optim.SGD(routed.parameters(), lr=0.1)).step(ticket=[0, 2])
    topt = TicketOptimizer(routed, torch.optim.AdamW(routed.parameters(), lr=1e-2, weight_decay=0.1),
                           per_ticket_state=False)
    x, y = batches(1)[0]
    route = torch.tensor([0, 2, 2, 0])
    routed.train()
    before = snapshot(routed)
    topt.zero_grad()
    F.cross_entropy(routed(x, route=route), y).backward()
    topt.step(ticket=route)  # the tickets of a mixed-route batch
    assert topt.ticket == (0, 2)
    after = snapshot(routed)
    own0, own2 = owned_entries(routed, 0), owned_entries(routed, 2)
    for n in own0:
        m = own0[n] | own2[n]
        assert torch.equal(before[n][~m], after[n][~m]), n  # ticket 1's own entries did not move
        assert not torch.equal(before[n][m], after[n][m]), n


def test_state_dict_roundtrip_keeps_param_groups_shared(make_routed):
    routed = make_routed("weight")
    topt = TicketOptimizer(routed, torch.optim.Adam(routed.parameters(), lr=1e-2))
    train_round(routed, topt, batches(1))
    sd = topt.state_dict()
    assert sd["per_ticket_state"] is True and sorted(sd["optimizers"]) == ["0", "1", "2"]
    other_opt = torch.optim.Adam(routed.parameters(), lr=5e-3)
    other = TicketOptimizer(routed, other_opt)
    other.load_state_dict(sd)
    assert other_opt.param_groups[0]["lr"] == 1e-2  # the saved hyper-parameters, in the shared groups
    assert all(other.optimizer_for(k).param_groups is other_opt.param_groups for k in range(3))
    p = routed.model.conv1.weight
    for k in range(3):
        assert torch.equal(other.optimizer_for(k).state[p]["exp_avg"], topt.optimizer_for(k).state[p]["exp_avg"])
    assert other.write_back  # restored states are never assumed safe to skip
    with pytest.raises(rtl.OptimizerError, match="per_ticket_state"):
        TicketOptimizer(routed, other_opt, per_ticket_state=False).load_state_dict(sd)


def test_automatic_write_back_follows_write_back_needed_and_mask_changes(make_routed):
    routed = make_routed("weight")
    auto = TicketOptimizer(routed, torch.optim.Adam(routed.parameters(), lr=1e-2), write_back=None)
    assert not auto.write_back  # per-ticket Adam in weight mode: provably a no-op
    assert TicketOptimizer(routed, torch.optim.AdamW(routed.parameters(), weight_decay=0.1), write_back=None).write_back
    assert TicketOptimizer(routed, torch.optim.SGD(routed.parameters(), lr=0.1)).write_back  # default: always
    train_round(routed, auto, batches(1))
    assert not auto.write_back
    routed.set_tickets(rtl.TicketSet.random(routed.space, 3, keep=0.5, seed=9))
    before = snapshot(routed)
    train_round(routed, auto, batches(1), tickets=(1,))
    assert auto.write_back  # moments on entries ticket 1 no longer owns: restored from now on
    after = snapshot(routed)
    for n, m in owned_entries(routed, 1).items():
        assert torch.equal(before[n][~m], after[n][~m]), n


# ----------------------------------------------------------------------------- sampler and dataset


def _routes(counts):
    return torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])


def test_sampler_balanced_cyclic_single_ticket_batches():
    routes = _routes([5, 2, 9])  # batches of 2: ticket 0 -> 3 batches, 1 -> 1, 2 -> 5
    s = RouteBalancedSampler(routes, 2, seed=0)
    epoch = list(s)
    assert len(epoch) == len(s) == 5 * 3
    tickets = [int(routes[b[0]]) for b in epoch]
    assert tickets == [0, 1, 2] * 5  # ascending ticket order per batch index
    for b in epoch:
        assert len({int(routes[i]) for i in b}) == 1
    for k, n in enumerate([5, 2, 9]):
        own = [b for b in epoch if int(routes[b[0]]) == k]
        first_pass = [i for b in own[:-(-n // 2)] for i in b]
        assert sorted(first_pass) == torch.nonzero(routes == k).flatten().tolist()  # every sample once first


def test_sampler_is_deterministic_by_seed_and_reshuffles_each_epoch():
    routes = _routes([6, 3, 7])
    a, b, c = (RouteBalancedSampler(routes, 2, seed=s) for s in (3, 3, 4))
    first = list(a)
    assert first == list(b) and first != list(c)
    second = list(a)
    assert second == list(b) and second != first  # a new permutation per epoch, the same for the same seed


def test_sampler_unshuffled_matches_per_ticket_loaders():
    routes = torch.tensor([2, 0, 1, 0, 2, 2, 0, 1, 0, 0])
    got = list(RouteBalancedSampler(routes, 2, shuffle=False))
    idx = {k: torch.nonzero(routes == k).flatten().tolist() for k in range(3)}
    per = {k: [idx[k][i:i + 2] for i in range(0, len(idx[k]), 2)] for k in range(3)}
    M = max(len(v) for v in per.values())
    assert got == [per[k][i % len(per[k])] for i in range(M) for k in range(3)]


def test_sampler_mixed_batches_are_balanced_over_tickets():
    routes = _routes([8, 2, 5])
    s = RouteBalancedSampler(routes, 4, seed=1, mixed=True)
    epoch = list(s)
    assert len(epoch) == len(s) == 6 and all(len(b) == 4 for b in epoch)
    counts = torch.bincount(routes[torch.tensor([i for b in epoch for i in b])], minlength=3)
    assert counts.tolist() == [8, 8, 8]
    assert any(len({int(routes[i]) for i in b}) > 1 for b in epoch)
    assert sorted(i for b in epoch for i in b if routes[i] == 0) == list(range(8))
    unshuffled = list(RouteBalancedSampler(routes, 3, shuffle=False, mixed=True))
    assert [int(routes[i]) for i in unshuffled[0]] == [0, 1, 2]
    assert len(list(RouteBalancedSampler(routes, 5, mixed=True, drop_last=True))) == 24 // 5


def test_sampler_drop_last_and_ticket_subset():
    routes = _routes([5, 4, 7])
    s = RouteBalancedSampler(routes, 2, drop_last=True, tickets=[0, 2], seed=0)
    epoch = list(s)
    assert s.tickets == [0, 2] and len(epoch) == len(s) == 3 * 2 and all(len(b) == 2 for b in epoch)
    assert {int(routes[b[0]]) for b in epoch} == {0, 2}


def test_sampler_and_routed_dataset_in_a_dataloader():
    x, y = torch.randn(10, 3, 8, 8), torch.randint(0, 5, (10,))
    routes = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    ds = RoutedDataset(TensorDataset(x, y), routes)
    dl = DataLoader(ds, batch_sampler=RouteBalancedSampler(ds.routes, 3, seed=0))
    seen = 0
    for bx, by, br in dl:
        assert br.dtype == torch.long and br.shape == (bx.shape[0],) and len(set(br.tolist())) == 1
        seen += bx.shape[0]
    assert len(dl) == 2 * 3 and seen == (3 + 1) + 2 * 3 + 2 * 3  # ticket 0: 4 samples in batches of 3 and 1
    cat = RoutedDataset.from_subsets({2: TensorDataset(x[:3], y[:3]), 0: TensorDataset(x[3:], y[3:])})
    assert len(cat) == 10 and cat.routes.tolist() == [0] * 7 + [2] * 3
    assert torch.equal(cat[0][0], x[3]) and int(cat[9][2]) == 2


# ----------------------------------------------------------------------------- the conveniences are these pieces


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_plain_loop_is_bit_identical_to_joint_retrain(granularity, make_tiny, make_grouped):
    """DataLoader(RoutedDataset, batch_sampler=RouteBalancedSampler(shuffle=False)) + TicketOptimizer in a plain
    loop gives exactly joint_retrain's weights on the per-ticket loaders of the same subsets."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(26, 3, 8, 8, generator=g), torch.randint(0, 5, (26,), generator=g)
    routes = torch.randint(0, 3, (26,), generator=g)
    data = TensorDataset(x, y)
    results = []
    for how in ("joint_retrain", "plain"):
        routed = wrap(model_for(granularity, make_tiny, make_grouped), granularity)
        opt = torch.optim.AdamW(routed.parameters(), lr=1e-2, weight_decay=0.05)
        if how == "joint_retrain":
            subsets = {k: DataLoader(Subset(data, torch.nonzero(routes == k).flatten().tolist()), batch_size=4)
                       for k in range(3)}
            joint_retrain(routed, subsets, optimizer=opt, epochs=2, progress=False)
        else:
            dl = DataLoader(RoutedDataset(data, routes), batch_sampler=RouteBalancedSampler(routes, 4, shuffle=False))
            topt = TicketOptimizer(routed, opt)
            routed.train()
            for _ in range(2):
                for bx, by, route in dl:
                    k = int(route[0])
                    topt.zero_grad(set_to_none=True)
                    F.cross_entropy(routed(bx, route=k), by).backward()
                    topt.step(ticket=k)
        results.append(snapshot(routed))
    for n in results[0]:
        assert torch.equal(results[0][n], results[1][n]), n


def test_plain_mixed_loop_is_bit_identical_to_mixed_route_retrain(make_tiny):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 3, 8, 8, generator=g), torch.randint(0, 5, (20,), generator=g)
    routes = torch.randint(0, 3, (20,), generator=g)
    ds = RoutedDataset(TensorDataset(x, y), routes)
    loader = lambda: DataLoader(ds, batch_sampler=RouteBalancedSampler(routes, 6, seed=5, mixed=True))  # noqa: E731
    results = []
    for how in ("mixed_route_retrain", "plain"):
        routed = wrap(make_tiny(), "weight")
        opt = torch.optim.SGD(routed.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
        if how == "mixed_route_retrain":
            mixed_route_retrain(routed, loader(), optimizer=opt, epochs=2, progress=False)
        else:
            topt = TicketOptimizer(routed, opt, per_ticket_state=False)
            routed.train()
            dl = loader()
            for _ in range(2):
                for bx, by, route in dl:
                    topt.zero_grad(set_to_none=True)
                    F.cross_entropy(routed(bx, route=route), by).backward()
                    topt.step(ticket=range(3))  # entries no ticket owns never move
        results.append(snapshot(routed))
    for n in results[0]:
        assert torch.equal(results[0][n], results[1][n]), n


# ----------------------------------------------------------------------------- joint_retrain / mixed_route_retrain options


def _epoch_snapshots(routed):
    """A callback recording the weights after every epoch."""
    snaps = []
    return snaps, (lambda event: snaps.append(snapshot(routed)))


@pytest.mark.parametrize("per_ticket_state", [True, False], ids=["per_ticket", "shared"])
def test_joint_retrain_scheduler_per_epoch_reaches_every_ticket(per_ticket_state, make_routed, make_loader):
    routed = make_routed("weight")
    opt = torch.optim.AdamW(routed.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)  # lr 0 from the second epoch on
    snaps, record = _epoch_snapshots(routed)
    hist = joint_retrain(routed, {k: make_loader(2, seed=k) for k in range(3)}, optimizer=opt, epochs=3,
                         per_ticket_state=per_ticket_state, scheduler=sched, callbacks=record, progress=False)
    assert hist["steps"] == 18 and opt.param_groups[0]["lr"] == 0.0 and sched.last_epoch == 3
    start = snapshot(make_routed("weight"))
    assert not torch.equal(snaps[0]["conv1.weight"], start["conv1.weight"])
    for n in snaps[0]:
        assert torch.equal(snaps[0][n], snaps[1][n]) and torch.equal(snaps[1][n], snaps[2][n]), n


def test_joint_retrain_honours_lr_changes_made_in_a_callback(make_routed, make_loader):
    """The issue's case: a scheduler on the user's optimizer stepped by the user (here in a callback)."""
    routed = make_routed("weight")
    opt = torch.optim.SGD(routed.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 if e == 0 else 0.0)
    snaps, record = _epoch_snapshots(routed)
    joint_retrain(routed, {k: make_loader(2, seed=k) for k in range(3)}, optimizer=opt, epochs=2, progress=False,
                  callbacks=[lambda event: sched.step(), record])
    for n in snaps[0]:
        assert torch.equal(snaps[0][n], snaps[1][n]), n  # momentum alone would have moved them


def test_joint_retrain_scheduler_per_step(make_routed, make_loader):
    routed = make_routed("weight")
    opt = torch.optim.SGD(routed.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 3 else 0.0)  # 3 ticket steps, then lr 0
    moved = []

    def step(view, batch, o):
        before = view.routed.model.conv1.weight.detach().clone()
        loss = rtl.training.default_train_step()(view, batch, o)
        moved.append(not torch.equal(before, view.routed.model.conv1.weight))
        return loss

    joint_retrain(routed, {k: make_loader(2, seed=k) for k in range(3)}, optimizer=opt, epochs=1, train_step=step,
                  scheduler=sched, scheduler_interval="step", progress=False)
    assert moved == [True] * 3 + [False] * 3 and sched.last_epoch == 6


def test_reduce_lr_on_plateau_gets_the_epoch_loss(make_routed, make_loader):
    routed = make_routed("weight")
    opt = torch.optim.SGD(routed.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=0, factor=0.5)  # loss falls
    hist = joint_retrain(routed, {0: make_loader(2)}, optimizer=opt, epochs=3, scheduler=sched, progress=False)
    assert hist["loss"][2][0] < hist["loss"][0][0]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 2)  # "worse" after epochs 2 and 3
    with pytest.raises(rtl.DataError, match="scheduler_interval='epoch'"):
        joint_retrain(routed, {0: make_loader(1)}, optimizer=opt, scheduler=sched, scheduler_interval="step",
                      progress=False)


def test_joint_retrain_with_scheduler_resumes_bit_identically(make_routed, make_loader, tmp_path):
    def run(epochs, ck):
        torch.manual_seed(0)
        routed = make_routed("weight")
        opt = torch.optim.Adam(routed.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        hist = joint_retrain(routed, {k: make_loader(2, seed=k, shuffle=True) for k in range(2)}, optimizer=opt,
                             epochs=epochs, scheduler=sched, checkpoint_dir=ck, progress=False)
        return snapshot(routed), hist, opt.param_groups[0]["lr"]

    ref, ref_hist, ref_lr = run(3, None)
    run(1, tmp_path)
    got, hist, lr = run(3, tmp_path)
    assert hist == ref_hist and lr == ref_lr == pytest.approx(1e-2 / 8)
    for n in ref:
        assert torch.equal(ref[n], got[n]), n


def _mixed_loader(seed=0, K=3):
    g = torch.Generator().manual_seed(seed)
    routes = torch.randint(0, K, (18,), generator=g)
    ds = RoutedDataset(TensorDataset(torch.randn(18, 3, 8, 8, generator=g), torch.randint(0, 5, (18,), generator=g)),
                       routes)
    return DataLoader(ds, batch_sampler=RouteBalancedSampler(routes, 6, seed=seed, mixed=True))


def test_mixed_route_retrain_resumes_bit_identically(make_routed, tmp_path):
    def run(epochs, ck):
        routed = make_routed("channel")
        opt = torch.optim.SGD(routed.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
        hist = mixed_route_retrain(routed, _mixed_loader(), optimizer=opt, epochs=epochs, scheduler=sched,
                                   checkpoint_dir=ck, progress=False)
        return snapshot(routed), hist

    ref, ref_hist = run(3, None)
    first, _ = run(2, tmp_path)
    got, hist = run(3, tmp_path)
    assert (tmp_path / "mixed_retrain.json").is_file()
    assert hist == ref_hist and len(hist["loss"]) == 3 and hist["steps"] == 3 * len(_mixed_loader())
    assert not torch.equal(first["conv1.weight"], got["conv1.weight"])  # the resumed epoch trained
    for n in ref:
        assert torch.equal(ref[n], got[n]), n  # including the sampler's generator and the optimizer state


def test_retraining_callbacks_single_callable_stop_and_pruning_callbacks(make_routed, make_loader):
    routed = make_routed("weight")
    opt = torch.optim.SGD(routed.parameters(), lr=0.1)
    events, later = [], []
    hist = mixed_route_retrain(routed, _mixed_loader(), optimizer=opt, epochs=5, progress=False,
                               callbacks=[lambda e: events.append(e) or ("stop" if e["epoch"] == 1 else None),
                                          later.append])
    assert [e["epoch"] for e in events] == [0, 1] and len(hist["loss"]) == 2
    assert len(later) == 2  # every callback runs in the stopping epoch too
    assert isinstance(events[0]["loss"], float)
    one = []
    joint_retrain(routed, {0: make_loader(1)}, optimizer=opt, epochs=2, callbacks=one.append, progress=False)
    assert [e["epoch"] for e in one] == [0, 1]
    with pytest.warns(UserWarning, match="pruning-round callback"):
        joint_retrain(routed, {0: make_loader(1)}, optimizer=opt, epochs=1, progress=False,
                      callbacks=rtl.CollapseMonitor())


def test_joint_retrain_accepts_a_ticket_optimizer(make_routed, make_loader):
    routed = make_routed("weight")
    topt = TicketOptimizer(routed, torch.optim.Adam(routed.parameters(), lr=1e-2))
    joint_retrain(routed, {k: make_loader(1, seed=k) for k in range(3)}, optimizer=topt, progress=False)
    p = routed.model.conv1.weight
    assert all(int(topt.optimizer_for(k).state[p]["step"]) == 1 for k in range(3))  # its own states stepped
    with pytest.raises(rtl.OptimizerError, match="per_ticket_state=True"):
        joint_retrain(routed, {0: make_loader(1)}, optimizer=topt, per_ticket_state=False, progress=False)
    with pytest.raises(rtl.OptimizerError, match="ONE optimizer state"):
        mixed_route_retrain(routed, _mixed_loader(), optimizer=topt, progress=False)
