"""Adding a ticket later (grow_ticket): the earlier tickets' outputs stay bit-identical, the newcomer trains only
entries no earlier ticket owns, and the report counts what it reuses and adds."""

import pytest
import torch

import rtl_plugin as rtl
from rtl_plugin.errors import DataError, TicketError
from rtl_plugin.norms import RoutedBatchNorm
from rtl_plugin.persist.io import load, read_manifest
from rtl_plugin.pruning.grow import free_entries, grow_ticket, growth_report, newcomer_train_step
from rtl_plugin.pruning.pruner import RTLPruner

EX = torch.randn(1, 3, 8, 8)


def searched(make_tiny, make_loader, granularity, K=2):
    """K tickets searched and trained on their own data (a deployed model before a domain arrives)."""
    torch.manual_seed(3)
    routed = rtl.wrap(make_tiny(), K, example_inputs=EX, granularity=granularity, adapter="generic",
                      output_layers=["head"])
    pruner = RTLPruner(routed, sparsities=[0.5], prune_fraction=0.5, progress=False)
    pruner.find_tickets({k: make_loader(2, seed=10 * k, shuffle=True) for k in range(K)},
                        optimizer=torch.optim.Adam(routed.parameters(), lr=1e-2))
    for k in range(K):  # trained weights, trained per-ticket statistics
        pruner.train_ticket(k, make_loader(2, seed=10 * k), optimizer=torch.optim.Adam(routed.parameters(), lr=1e-2))
    return routed


def outputs(routed, x, tickets):
    routed.eval()
    with torch.no_grad():
        return [routed(x, route=k).clone() for k in tickets]


def norm_rows(routed, tickets):
    return {n: [(m.running_mean[k].clone(), m.running_var[k].clone(), m.num_batches_tracked[k].clone())
                for k in tickets]
            for n, m in routed.model.named_modules() if isinstance(m, RoutedBatchNorm)}


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_growing_keeps_earlier_tickets_bit_identical(granularity, make_tiny, make_loader):
    routed = searched(make_tiny, make_loader, granularity)
    x = torch.randn(6, 3, 8, 8)
    before, stats = outputs(routed, x, [0, 1]), norm_rows(routed, [0, 1])
    masks = {n: m.clone() for n, m in routed.tickets.masks.items()}
    grown = grow_ticket(routed, make_loader(3, seed=99, shuffle=True), sparsities=[0.5, 0.75], prune_fraction=0.5,
                        optimizer=torch.optim.Adam(routed.parameters(), lr=1e-2), retrain_epochs=2)
    assert grown.ticket == 2 and routed.num_tickets == 3
    after = outputs(routed, x, [0, 1])
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    for n, rows in norm_rows(routed, [0, 1]).items():
        for r0, r1 in zip(stats[n], rows):
            assert all(torch.equal(u, v) for u, v in zip(r0, r1)), n
    for n, m in masks.items():
        assert torch.equal(routed.tickets.masks[n][:2], m)
    # the newcomer was searched and trained: its own sparsity, its own statistics, another output
    assert float(routed.tickets.sparsity()[2]) >= 0.75 - 1e-9
    assert grown.search is not None and len(grown.retrain_losses) == 2
    new = outputs(routed, x, [2])[0]
    assert not torch.equal(new, after[0])
    mixed = routed(x, route=torch.tensor([0, 2, 1, 2, 0, 1]))  # a mixed batch routes the old and the new
    assert torch.equal(mixed[0], after[0][0]) and torch.equal(mixed[2], after[1][2])
    r = grown.report
    assert r.kept == r.reused + r.added and r.added > 0 and r.reused > 0
    assert r.kept == int(routed.tickets.kept()[2])


def test_newcomer_changes_only_free_entries(make_tiny, make_loader):
    routed = searched(make_tiny, make_loader, "weight")
    k = routed.add_ticket()
    w0 = {n: p.detach().clone() for n, p in routed.named_parameters()}
    step = newcomer_train_step(routed, k)
    opt = torch.optim.Adam(routed.parameters(), lr=1e-1, weight_decay=0.1)  # decay would move every entry
    for batch in make_loader(2, seed=5):
        step(routed.ticket_module(k), batch, opt)
    free = {id(p): m for p, m in free_entries(routed, k)}
    moved_free = 0
    for n, p in routed.named_parameters():
        changed = p.detach() != w0[n]
        m = free[id(p)]
        assert not bool((changed & ~m).any()), n
        moved_free += int((changed & m).sum())
    assert moved_free > 0
    owned_by_old = routed.tickets.masks["conv1"][:k].any(0)
    assert not bool((free[id(routed.model.conv1.weight)] & owned_by_old).any())
    assert not bool(free[id(routed.model.head.weight)].any())  # outside the ticket space: read-only


def test_add_ticket_grows_masks_and_norms(make_routed):
    routed = make_routed("channel", num_tickets=2)
    bn = routed.model.bn1
    bn.running_mean[0].fill_(1.0)
    bn.running_mean[1].fill_(3.0)
    masks = {n: ~m[0] for n, m in routed.tickets.masks.items()}
    for n, m in masks.items():  # a channel ticket keeps at least one position per group
        m[0] = True
    assert routed.add_ticket(masks, norm_init=1) == 2
    assert bn.running_mean.shape[0] == 3 and bn.num_tickets == 3 and bn.num_batches_tracked[2] == 0
    assert torch.equal(bn.running_mean[2], bn.running_mean[1])
    assert all(torch.equal(routed.tickets.masks[n][2], m) for n, m in masks.items())
    routed.add_ticket(norm_init="mean")
    assert torch.allclose(bn.running_mean[3], bn.running_mean[:3].mean(0))
    routed.add_ticket(norm_init="fresh")
    assert bool((bn.running_mean[4] == 0).all()) and bool((bn.running_var[4] == 1).all())
    assert routed.num_tickets == 5 and routed.tickets.num_tickets == 5
    routed.eval()
    routed(torch.randn(5, 3, 8, 8), route=torch.arange(5))


def test_grown_model_saves_loads_and_packages(make_tiny, make_routed, tmp_path):
    routed = make_routed("channel", num_tickets=2)
    routed.add_ticket(norm_init=0)
    routed.model.bn1.running_mean[2].fill_(0.5)
    x = torch.randn(3, 3, 8, 8)
    routed.eval()
    want = routed(x, route=torch.tensor([0, 1, 2]))
    routed.save(tmp_path / "run")
    assert read_manifest(tmp_path / "run")["num_tickets"] == 3
    loaded = load(tmp_path / "run", make_tiny()).eval()
    assert loaded.num_tickets == 3
    assert torch.equal(loaded(x, route=torch.tensor([0, 1, 2])), want)
    from rtl_plugin.persist.package import export_package, load_package
    from rtl_plugin.routing.grow import grow_router
    from rtl_plugin.routing.routers import create_router
    xs, ids = torch.randn(12, 3, 8, 8), torch.arange(12) % 2
    router = grow_router(create_router("centroid", num_tickets=2).fit(xs, ids), xs[:4] + 2.0)
    export_package(routed, tmp_path / "pkg", example_inputs=EX, router=router)
    pkg = load_package(tmp_path / "pkg", make_tiny()).eval()
    assert pkg.num_tickets == 3 and pkg.router.num_tickets == 3
    assert torch.equal(pkg.router(x), router(x))
    torch.testing.assert_close(pkg(x, route=torch.tensor([0, 1, 2])), want, rtol=1e-5, atol=1e-5)


def test_growth_report_counts(make_routed):
    routed = make_routed("weight", num_tickets=2)
    routed.add_ticket(routed.tickets.ticket(0))  # a copy of ticket 0: reuses all, adds nothing
    r = growth_report(routed, 2)
    assert r.reused == r.kept == int(routed.tickets.kept()[0]) and r.added == 0
    assert r.reuse_fraction == 1.0 and r.to_dict()["earlier"] == [0, 1]
    union = routed.tickets.union_count()
    assert growth_report(routed, 2, earlier=[]).added == r.kept
    assert r.free_before == routed.space.num_weights - union


def test_bad_growth_inputs(make_routed, make_loader):
    routed = make_routed("weight", num_tickets=2)
    with pytest.raises(TicketError, match="norm_init"):
        routed.add_ticket(norm_init=5)
    with pytest.raises(TicketError, match="lack key"):
        routed.add_ticket({"conv1": routed.tickets.masks["conv1"][0]})
    bad = {n: m[0].float() for n, m in routed.tickets.masks.items()}
    with pytest.raises(TicketError, match="torch.bool"):
        routed.add_ticket(bad)
    assert routed.num_tickets == 2 and routed.model.bn1.running_mean.shape[0] == 2  # nothing changed
    with pytest.raises(DataError, match="retrain_epochs"):
        grow_ticket(routed, make_loader(1), retrain_epochs=-1)
    with pytest.raises(TypeError, match="RoutedModel"):
        grow_ticket(routed.model, make_loader(1))
    with pytest.raises(TicketError, match="its own earlier"):
        growth_report(routed, 1, earlier=[1])
    with pytest.raises(TicketError, match="K cannot change"):
        routed.set_tickets(rtl.TicketSet.full(routed.space, 3))


def test_reuse_budget_keeps_old_tickets_and_caps_reuse(make_tiny, make_loader):
    routed = searched(make_tiny, make_loader, "weight")
    x = torch.randn(4, 3, 8, 8)
    before = outputs(routed, x, [0, 1])
    grown = grow_ticket(routed, make_loader(2, seed=7), sparsities=[0.5, 0.75], prune_fraction=0.5, max_reuse=0.25,
                        optimizer=torch.optim.Adam(routed.parameters(), lr=1e-2))
    r = grown.report
    assert r.reused <= 0.25 * r.kept + 1 and r.added >= 0.75 * r.kept - 1
    assert abs(r.sparsity - 0.75) < 1e-3
    at = grown.search.tickets_at
    for n in at[0.75].masks:  # the swaps keep the trajectory nested
        assert not bool((at[0.75].masks[n][2] & ~at[0.5].masks[n][2]).any())
    for a, b in zip(before, outputs(routed, x, [0, 1])):
        assert torch.equal(a, b)
    with pytest.raises(rtl.errors.SparsityError, match="max_reuse"):
        grow_ticket(routed, make_loader(1), max_reuse=1.5)
    with pytest.raises(rtl.errors.SparsityError, match="weight"):
        grow_ticket(rtl.wrap(make_tiny(), 1, example_inputs=EX, granularity="channel", adapter="generic",
                             output_layers=["head"]), make_loader(1), max_reuse=0.5)


def test_shared_norm_statistics_stay_unchanged(make_tiny, make_loader):
    routed = rtl.wrap(make_tiny(), 2, example_inputs=EX, granularity="weight", adapter="generic",
                      output_layers=["head"], shared_norm=True)
    routed.set_tickets(rtl.TicketSet.random(routed.space, 2, keep=0.5, seed=1))
    x = torch.randn(4, 3, 8, 8)
    before = outputs(routed, x, [0, 1])
    stats = routed.model.bn1.running_mean.clone()
    grow_ticket(routed, make_loader(2, seed=3), sparsities=[0.5], prune_fraction=0.5,
                optimizer=torch.optim.Adam(routed.parameters(), lr=1e-2))
    assert torch.equal(routed.model.bn1.running_mean, stats)
    for a, b in zip(before, outputs(routed, x, [0, 1])):
        assert torch.equal(a, b)


def test_search_starts_from_given_masks_and_bad_options_leave_k(make_routed, make_loader):
    routed = make_routed("weight", num_tickets=2)
    start = {n: m[0].clone() for n, m in routed.tickets.masks.items()}
    grow_ticket(routed, make_loader(2, seed=4), masks=start, sparsities=[0.7], prune_fraction=0.3)
    for n, m in start.items():
        assert not bool((routed.tickets.masks[n][2] & ~m).any())
    with pytest.raises(rtl.errors.SparsityError):
        grow_ticket(routed, make_loader(1), sparsities=[1.5])
    assert routed.num_tickets == 3
