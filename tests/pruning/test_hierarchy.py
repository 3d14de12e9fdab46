"""Coarse-to-fine tickets: sub-tickets searched from their parent's masks are subsets of it; two-level routing."""
import pytest
import torch
from torch import nn

import rtl_plugin as rtl
from rtl_plugin.errors import RouteError, RTLError, TicketError
from rtl_plugin.pruning.hierarchy import check_nested, search_sub_tickets
from rtl_plugin.pruning.pruner import RTLPruner
from rtl_plugin.routing.hierarchy import TwoLevelRouter

EX = torch.randn(1, 3, 8, 8)
PARENTS = {2: 0, 3: 0, 4: 1, 5: 1}


@pytest.mark.parametrize("granularity,targets", [("weight", [0.5, 0.7]), ("channel", [0.6, 0.8])])
def test_sub_tickets_are_subsets_of_their_parents(granularity, targets, make_tiny, make_loader):
    torch.manual_seed(0)
    routed = rtl.wrap(make_tiny(), 6, example_inputs=EX, granularity=granularity, adapter="generic",
                      output_layers=["head"])
    RTLPruner(routed, sparsities=[0.3], prune_fraction=0.3, progress=False).find_tickets(
        {k: make_loader(2, seed=k) for k in (0, 1)}, tickets=[0, 1])
    parents_before = {n: m[:2].clone() for n, m in routed.tickets.masks.items()}
    theta = {k: v.clone() for k, v in routed.model.state_dict().items()}
    pruner = RTLPruner(routed, sparsities=targets, prune_fraction=0.3, progress=False)
    res = search_sub_tickets(pruner, PARENTS, {s: make_loader(2, seed=10 + s) for s in PARENTS},
                             optimizer=torch.optim.Adam(routed.parameters(), lr=1e-2))
    for t in targets:
        check_nested(res.tickets_at[t], PARENTS)
        elem = res.tickets_at[t].element_masks()
        for sub, parent in PARENTS.items():
            assert all(not bool((m[sub] & ~m[parent]).any()) for m in elem.values())
    sp = routed.tickets.sparsity()
    assert all(float(sp[s]) >= targets[-1] - 0.05 for s in PARENTS)
    for n, m in parents_before.items():
        assert torch.equal(routed.tickets.masks[n][:2], m)
    for k, v in routed.model.state_dict().items():  # rewound to the weights at the start
        assert torch.equal(v, theta[k]), k


def test_check_nested_and_bad_parents(make_routed, make_loader):
    routed = make_routed("weight", num_tickets=3)
    with pytest.raises(RTLError, match="drops"):
        check_nested(routed.tickets, {2: 0})  # random tickets are not nested
    pruner = RTLPruner(routed, sparsities=[0.6], progress=False)
    with pytest.raises(TicketError, match="both a sub-ticket and a parent"):
        search_sub_tickets(pruner, {1: 0, 2: 1}, {1: make_loader(1), 2: make_loader(1)})
    with pytest.raises(TicketError, match="no loader"):
        search_sub_tickets(pruner, {2: 0}, {1: make_loader(1)})


class Fixed(nn.Module):
    def __init__(self, fn, k):
        super().__init__()
        self.fn, self.num_tickets = fn, k

    def forward(self, x):
        return self.fn(x)

    def flops_per_sample(self, shape):
        return 10 * self.num_tickets


def test_two_level_router_maps_to_children():
    top = Fixed(lambda x: (x[:, 0] > 0).long(), 2)
    sub0 = Fixed(lambda x: (x[:, 1] > 0).long(), 2)
    router = TwoLevelRouter(top, [sub0, None], [[2, 3], [4]])
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert router(x).tolist() == [4, 4, 3, 2]
    assert router.flops_per_sample((2,)) == {"mean": 30.0, "max": 40}
    with pytest.raises(RouteError, match="no router"):
        TwoLevelRouter(top, [sub0, None], [[2, 3], [4, 5]])
    with pytest.raises(RouteError, match="one sub-router"):
        TwoLevelRouter(top, [sub0], [[2, 3], [4]])
    with pytest.raises(RouteError, match="routes 2 tickets for 3"):
        TwoLevelRouter(top, [sub0, None], [[2, 3, 5], [4]])
