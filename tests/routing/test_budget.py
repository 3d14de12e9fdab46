"""Budget-aware routing: ladders of nested tickets, per-ticket costs, a router that never exceeds its budget."""
import pytest
import torch
from torch import nn

import rtl_plugin as rtl
from rtl_plugin import _tp
from rtl_plugin.errors import DataError, RouteError, SparsityError
from rtl_plugin.pruning.pruner import RTLPruner
from rtl_plugin.routing.budget import BudgetRouter, ladder_groups, ladder_tickets, ticket_costs

EX = torch.randn(2, 3, 8, 8)


@pytest.fixture(scope="module")
def search(make_tiny, make_loader):
    torch.manual_seed(0)
    routed = rtl.wrap(make_tiny(), 2, example_inputs=EX[:1], granularity="weight", adapter="generic",
                      output_layers=["head"])
    pruner = RTLPruner(routed, sparsities=[0.3, 0.6], prune_fraction=0.3, progress=False)
    return routed, pruner.find_tickets({k: make_loader(2, seed=k) for k in range(2)})


def test_ladder_is_group_major_and_nested(search):
    routed, res = search
    ladder = ladder_tickets(res.tickets_at)
    assert ladder.num_tickets == 4 and ladder_groups(2, 2).tolist() == [0, 0, 1, 1]
    for g in range(2):
        for n, m in ladder.masks.items():
            assert torch.equal(m[2 * g], res.tickets_at[0.3].masks[n][g])
            assert torch.equal(m[2 * g + 1], res.tickets_at[0.6].masks[n][g])
            assert not bool((m[2 * g + 1] & ~m[2 * g]).any())  # the sparser rung is inside the denser one
    assert ladder_tickets(res.tickets_at, [0.6]).num_tickets == 2
    with pytest.raises(SparsityError, match="not recorded"):
        ladder_tickets(res.tickets_at, [0.5])


def test_weight_ticket_costs_count_kept_macs(search, make_tiny):
    routed, res = search
    grown = rtl.wrap(make_tiny(), 4, example_inputs=EX[:1], granularity="weight", adapter="generic",
                     output_layers=["head"])
    ladder = ladder_tickets(res.tickets_at)
    full = rtl.TicketSet.full(grown.space, 1)
    masks = {n: torch.cat([m[:3], full.masks[n]]) for n, m in ladder.masks.items()}  # ticket 3 dense
    grown.set_tickets(rtl.TicketSet(grown.space, masks))
    costs = ticket_costs(grown, EX)
    dense = _tp.count_ops_and_params(grown.plain_copy(0), EX[:1])[0]
    assert int(costs[3]) == dense
    for t in range(3):  # TinyCNN: both convs keep 8x8 output positions; each kept weight runs 64 times
        dropped = sum(int((~grown.tickets.masks[n][t]).sum()) for n in ("conv1", "conv2"))
        assert int(costs[t]) == dense - 64 * dropped
    assert costs[1] < costs[0]  # the sparser rung costs less
    with pytest.raises(DataError, match="batched"):
        ticket_costs(grown, torch.randn(3))


def test_channel_ticket_costs_are_exported_counts(make_routed):
    routed = make_routed("channel", num_tickets=2)
    costs = ticket_costs(routed, EX)
    assert costs.tolist() == [routed.count_ops_and_params(k, EX[:1])[0] for k in range(2)]


class GroupOf(nn.Module):
    """A group router stub: the group is the sign of the first pixel."""

    def forward(self, x):
        return (x[:, 0, 0, 0] > 0).long()


def test_budget_router_never_exceeds_its_budget():
    g = torch.Generator().manual_seed(0)
    groups = ladder_groups(2, 3)
    costs = torch.tensor([9.0, 5.0, 2.0, 8.0, 6.0, 3.0])
    quality = torch.tensor([0.9, 0.8, 0.5, 0.95, 0.7, 0.6])
    router = BudgetRouter(GroupOf(), costs, groups, quality, modes={"low-power": 3.0})
    x = torch.randn(500, 3, 4, 4, generator=g)
    grp = GroupOf()(x)
    for b in (2.0, 3.0, 5.5, 8.0, 100.0):
        ids = router(x, budget=b)
        assert bool((costs[ids] <= b).all())
        for i in range(0, 500, 7):  # the best own-group ticket that fits, when one fits
            fits = (groups == grp[i]) & (costs <= b)
            if bool(fits.any()):
                assert int(groups[ids[i]]) == int(grp[i]) and float(quality[ids[i]]) == float(quality[fits].max())
    assert router(x, budget=2.0).unique().tolist() == [2]  # group 1 has nothing within 2: group 0's cheapest
    assert torch.equal(router(x, budget=100.0), torch.where(grp == 0, 0, 3))
    assert bool((costs[router(x, budget="low-power")] <= 3.0).all())
    per_input = torch.rand(500, generator=g, dtype=torch.float64) * 8 + 2
    assert bool((costs[router(x, budget=per_input)] <= per_input).all())
    last = -1.0
    for mb in (3.0, 4.0, 6.0, 8.5, 20.0):
        ids = router(x, mean_budget=mb)
        assert float(costs[ids].double().mean()) <= mb + 1e-9
        q = float(quality[ids].double().mean())
        assert q >= last - 1e-12
        last = q


def test_budget_router_errors():
    router = BudgetRouter(GroupOf(), [3.0, 1.0], [0, 0], [0.9, 0.5])
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(RouteError, match="cheapest ticket"):
        router(x, budget=0.5)
    with pytest.raises(RouteError, match="exactly one"):
        router(x)
    with pytest.raises(RouteError, match="unknown device mode"):
        router(x, budget="eco")
    with pytest.raises(RouteError, match="one entry per ticket"):
        BudgetRouter(GroupOf(), [1.0, 2.0], [0], [0.5, 0.6])
    with pytest.raises(RouteError, match="group 1 has no ticket"):
        router(torch.ones(4, 3, 2, 2), mean_budget=5.0)
