"""RTLPruner speaks torch-pruning: a BasePruner, begin(k)/step(), tp's schedule and group selection, a plain
K-ticket loop equal to find_tickets, and every importance (works or refuses)."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp

import rtl_plugin as rtl
from rtl_plugin.errors import ImportanceError, RTLError, SparsityError
from conftest import GroupedCNN, TINY_INPUT


def _ex():
    return torch.randn(*TINY_INPUT)


def _pruner(model, **kw):
    kw.setdefault("num_tickets", 2)
    return rtl.RTLPruner(model, _ex(), ignored_layers=[model.head], progress=False, **kw)


def test_is_a_torch_pruning_base_pruner(make_tiny):
    p = _pruner(make_tiny(), pruning_ratio=0.5)
    assert isinstance(p, tp.pruner.BasePruner)
    assert isinstance(p.routed, rtl.RoutedModel) and p.routed.granularity == "channel"
    assert p.tickets is p.routed.tickets and p.tickets.num_tickets == 2
    assert p.per_step_pruning_ratio == [0.0, 0.5]  # tp's own schedule attributes exist


@pytest.mark.parametrize("round_to,steps,global_pruning", [(None, 1, False), (4, 2, False), (None, 3, True)])
def test_step_equals_stock_tp_pruner(make_tiny, round_to, steps, global_pruning):
    """Ticket k after `steps` step()s exports exactly the model a stock tp BasePruner builds with the same options."""
    stock_model = GroupedCNN().eval()
    model = copy.deepcopy(stock_model)
    x = torch.randn(3, 3, 8, 8)
    opts = dict(importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5, iterative_steps=steps,
                round_to=round_to, global_pruning=global_pruning)
    stock = tp.pruner.BasePruner(stock_model, _ex(), ignored_layers=[stock_model.head], **opts)
    for _ in range(steps):
        stock.step()
    p = rtl.RTLPruner(model, _ex(), num_tickets=3, ignored_layers=[model.head], progress=False, **opts)
    p.begin(1)
    for _ in range(steps):
        assert not p.ticket_done()
        p.step()
    assert p.ticket_done() and p.current_step == steps
    slim = rtl.export_ticket(p.routed, 1).eval()
    p.routed.eval()
    n_stock = sum(q.numel() for q in stock_model.parameters())
    assert sum(q.numel() for q in slim.parameters()) == n_stock
    assert torch.equal(slim(x), stock_model(x))
    torch.testing.assert_close(p.routed(x, route=1), slim(x), rtol=1e-5, atol=1e-6)
    assert 0.0 < p.ticket_sparsity(1) < 1.0  # the weight sparsity reported beside tp's channel ratio
    assert bool(p.tickets.masks["conv1"][0].all()), "ticket 0 was not stepped and stays dense"


def _train(routed, k, loader, lr=1e-2):
    opt = torch.optim.Adam(routed.parameters(), lr=lr)
    routed.train()
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(routed(x, route=k), y).backward()
        opt.step()


@pytest.mark.parametrize("granularity,kw", [("weight", dict(sparsities=[0.3, 0.6], prune_fraction=0.3)),
                                            ("channel", dict(pruning_ratio=0.5, iterative_steps=2)),
                                            ("weight", dict(pruning_ratio=0.6, iterative_steps=3))])
def test_plain_loop_equals_find_tickets(make_tiny, make_loader, granularity, kw):
    """A K-ticket search written with begin / rewind / step in a plain loop gives find_tickets' masks bit for bit."""
    subsets = {k: make_loader(3, seed=10 + k) for k in range(2)}
    torch.manual_seed(0)
    a = _pruner(make_tiny(), granularity=granularity, **kw)
    res = a.find_tickets(subsets, optimizer=torch.optim.Adam(a.routed.parameters(), lr=1e-2))
    torch.manual_seed(0)
    b = _pruner(make_tiny(), granularity=granularity, **kw)
    for k in range(2):
        b.begin(k)
        while not b.ticket_done():
            b.rewind()
            _train(b.routed, k, subsets[k])
            b.step()
    res_b = b.finish_search()
    assert res.sparsities() == res_b.sparsities()
    for t in res.sparsities():
        for n, m in res.tickets_at[t].masks.items():
            assert torch.equal(m, res_b.tickets_at[t].masks[n]), (t, n)
    last = res.tickets_at[res.sparsities()[-1]]
    assert all(any(not bool(m[k].all()) for m in last.masks.values()) for k in range(2)), "nothing was pruned"


def test_ratio_schedule_targets_and_weight_ratio(make_tiny, make_loader):
    p = _pruner(make_tiny(), granularity="weight", pruning_ratio=0.6, iterative_steps=3)
    assert p.targets == pytest.approx([0.2, 0.4, 0.6])
    p.begin(0)
    for expected in (0.2, 0.4, 0.6):
        p.step()
        assert p.ticket_sparsity(0) == pytest.approx(expected, abs=5e-3)  # weight mode: the ratio of weights
    assert p.ticket_done()
    with pytest.raises(SparsityError, match="done"):
        p.step()


CHANNEL_IMPORTANCES = {
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "l2_max": lambda: tp.importance.GroupMagnitudeImportance(p=2, group_reduction="max"),
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
    "hessian": lambda: tp.importance.GroupHessianImportance(),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),
    "lamp": lambda: tp.importance.LAMPImportance(),
    "fpgm": lambda: tp.importance.FPGMImportance(),
    "random": lambda: tp.importance.RandomImportance(),
}


def _differ(tickets) -> bool:
    return any(not torch.equal(m[0], m[1]) for m in tickets.masks.values())


@pytest.mark.parametrize("name", sorted(CHANNEL_IMPORTANCES))
@pytest.mark.parametrize("schedule_kw", [dict(pruning_ratio=0.5, iterative_steps=2),
                                         dict(sparsities=[0.5], prune_fraction=0.3)], ids=["ratio", "imp"])
def test_every_channel_importance_gives_subset_specific_tickets(make_tiny, make_loader, name, schedule_kw):
    """Each importance is computed on ticket k's own data (with gradients when it needs them): two subsets with
    different labels give different tickets, and the tickets export exactly."""
    torch.manual_seed(0)
    subsets = {0: make_loader(3, seed=1), 1: make_loader(3, seed=2)}
    p = _pruner(make_tiny(width=8), importance=CHANNEL_IMPORTANCES[name](), **schedule_kw)
    res = p.find_tickets(subsets, optimizer=torch.optim.Adam(p.routed.parameters(), lr=5e-2))
    last = res.tickets_at[res.sparsities()[-1]]
    assert _differ(last), f"{name}: identical tickets from different subsets"
    p.routed.eval()
    x = torch.randn(2, 3, 8, 8)
    for k in range(2):
        torch.testing.assert_close(p.routed(x, route=k), rtl.export_ticket(p.routed, k).eval()(x), rtol=1e-4, atol=1e-5)


def test_hessian_tickets_are_not_identical_regression(make_tiny, make_loader):
    """0.1 computed the Hessian under no_grad on a copy without gradients: Jaccard 1.000 between tickets."""
    torch.manual_seed(0)
    subsets = {0: make_loader(3, seed=1), 1: make_loader(3, seed=2)}
    p = _pruner(make_tiny(width=8), importance=tp.importance.GroupHessianImportance(), sparsities=[0.5])
    res = p.find_tickets(subsets, optimizer=torch.optim.Adam(p.routed.parameters(), lr=5e-2))
    assert float(res.tickets_at[0.5].jaccard()[0, 1]) < 1.0


@pytest.mark.parametrize("imp", [tp.importance.GroupTaylorImportance(), tp.importance.GroupHessianImportance()])
def test_gradient_importance_without_gradients_is_refused(make_tiny, imp):
    p = _pruner(make_tiny(), importance=imp, pruning_ratio=0.5)
    p.begin(0)
    with pytest.raises(ImportanceError, match="backward"):
        p.step()


def test_taylor_in_a_plain_loop_uses_the_users_backward(make_tiny, make_loader):
    imp = tp.importance.GroupTaylorImportance()
    masks = []
    for seed in (1, 2):
        torch.manual_seed(0)
        p = _pruner(make_tiny(), importance=imp, pruning_ratio=0.5)
        p.begin(0)
        p.routed.zero_grad()
        for x, y in make_loader(2, seed=seed):
            F.cross_entropy(p.routed(x, route=0), y).backward()
        p.step()
        masks.append(p.tickets.masks["conv2"][0].clone())
    assert not torch.equal(masks[0], masks[1]), "Taylor ignored the gradients of the user's data"


@pytest.mark.parametrize("imp", [tp.importance.GroupMagnitudeImportance(p=2), tp.importance.GroupTaylorImportance(),
                                 tp.importance.RandomImportance()])
def test_weight_mode_accepts_element_criteria(make_tiny, make_loader, imp):
    torch.manual_seed(0)
    p = _pruner(make_tiny(), granularity="weight", importance=imp, pruning_ratio=0.5)
    p.begin(0)
    for x, y in make_loader(1):
        F.cross_entropy(p.routed(x, route=0), y).backward()
    p.step()
    assert p.ticket_sparsity(0) == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("imp", [tp.importance.BNScaleImportance(), tp.importance.LAMPImportance(),
                                 tp.importance.FPGMImportance(), tp.importance.GroupHessianImportance()])
def test_weight_mode_refuses_group_criteria(make_tiny, imp):
    with pytest.raises(ImportanceError, match="granularity='channel'"):
        _pruner(make_tiny(), granularity="weight", importance=imp, pruning_ratio=0.5)


def test_weight_mode_importance_is_not_ignored(make_tiny, make_loader):
    """0.1 silently ignored importance= in weight mode: random and magnitude must give different masks."""
    out = []
    for imp in (None, tp.importance.RandomImportance()):
        torch.manual_seed(0)
        p = _pruner(make_tiny(), granularity="weight", importance=imp, sparsities=[0.5])
        p.begin(0)
        p.step()
        out.append(p.tickets.masks["conv2"][0].clone())
    assert not torch.equal(out[0], out[1])


def test_hook_based_importances_refused_in_channel_mode(make_tiny):
    with pytest.raises(ImportanceError, match="hooks"):
        _pruner(make_tiny(), importance=tp.importance.ActivationImportance(), pruning_ratio=0.5)


@pytest.mark.parametrize("kw,err,match", [
    (dict(pruning_ratio=1.5), SparsityError, "pruning_ratio"),
    (dict(pruning_ratio=0.5, iterative_steps=0), SparsityError, "iterative_steps"),
    (dict(pruning_ratio=0.5, sparsities=[0.5]), SparsityError, "sparsities"),
    (dict(pruning_ratio=0.5, granularity="weight", round_to=8), SparsityError, "round_to"),
    (dict(sparsities=[0.5], round_to=8), SparsityError, "round_to"),
    (dict(pruning_ratio=0.5, schedule="fraction"), SparsityError, "schedule"),
    (dict(pruning_ratio=0.5, bogus_option=1), SparsityError, "bogus_option"),
    (dict(pruning_ratio=0.5, pruning_ratio_dict={torch.nn.Conv2d(1, 1, 1): 0.2}), SparsityError, "not a module"),
    (dict(pruning_ratio=0.5, num_heads={"conv1": 0}), SparsityError, "num_heads"),
    (dict(pruning_ratio=0.5, importance="l1"), ImportanceError, "importance"),
])
def test_bad_constructor_arguments(make_tiny, kw, err, match):
    with pytest.raises(err, match=match):
        _pruner(make_tiny(), **kw)


def test_step_needs_a_ticket_and_refuses_interactive(make_tiny):
    p = _pruner(make_tiny(), pruning_ratio=0.5)
    with pytest.raises(RTLError, match="begin"):
        p.step()
    p.begin(0)
    with pytest.raises(RTLError, match="interactive"):
        p.step(interactive=True)


def test_pruning_ratio_dict_and_routed_input(make_tiny):
    model = make_tiny(width=8)
    routed = rtl.wrap(model, 2, example_inputs=_ex(), granularity="channel", adapter="generic", output_layers=["head"])
    p = rtl.RTLPruner(routed, pruning_ratio=0.25, pruning_ratio_dict={model.conv2: 0.75}, progress=False)
    p.begin(0)
    p.step()
    keep = p.tickets.masks
    assert int(keep["conv1"][0].sum()) == 6 and int(keep["conv2"][0].sum()) == 4  # 8*(1-.25), 16*(1-.75)
    with pytest.raises(SparsityError, match="granularity"):
        rtl.RTLPruner(routed, granularity="weight", pruning_ratio=0.5)


def test_ticket_sparsity_counts_like_the_element_masks(make_tiny):
    """The per-ticket count without element masks equals TicketSet.sparsity() (grouped convs included)."""
    for model in (make_tiny(), GroupedCNN()):
        routed = rtl.wrap(model, 3, example_inputs=_ex(), granularity="channel", adapter="generic",
                          output_layers=["head"])
        routed.set_tickets(rtl.TicketSet.random(routed.space, 3, keep=0.5, seed=3))
        p = rtl.RTLPruner(routed, pruning_ratio=0.5)
        expected = routed.tickets.sparsity()
        for k in range(3):
            assert p.ticket_sparsity(k) == pytest.approx(float(expected[k]), abs=1e-12)
