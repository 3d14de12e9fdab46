"""RTLPruner's public steps (begin_search, record_targets, rewind, train_ticket, prune_round, stop_ticket,
finish_search): a hand-written loop over them gives find_tickets' masks bit for bit; each step checks its input."""

import warnings

import pytest
import torch

import rtl_plugin as rtl
from rtl_plugin.errors import OptimizerError
from rtl_plugin.pruning.pruner import RTLPruner
from rtl_plugin.training.optim import clone_optimizer

EX = torch.randn(1, 3, 8, 8)


def wrap(model, granularity="weight", K=3):
    return rtl.wrap(model, K, example_inputs=EX, granularity=granularity, adapter="generic", output_layers=["head"])


def loaders(make_loader, K=3):
    return {k: make_loader(2, seed=10 * k, shuffle=True) for k in range(K)}


def search_by_hand(pruner, subsets, optimizer, epochs=1):
    """find_tickets written out with the public steps (ticket order, no callbacks, no checkpoint)."""
    pruner.begin_search(sorted(subsets))
    for k in sorted(subsets):
        while pruner.record_targets(k) is not None:
            pruner.rewind(k)
            loss = pruner.train_ticket(k, subsets[k], optimizer=clone_optimizer(optimizer), epochs=epochs)
            pruner.prune_round(k, loss=loss)
    return pruner.finish_search()


def assert_same_result(a, b):
    assert sorted(a.tickets_at) == sorted(b.tickets_at)
    for t in a.tickets_at:
        for n, m in a.tickets_at[t].masks.items():
            assert torch.equal(m, b.tickets_at[t].masks[n]), (t, n)
    assert [(r.ticket, r.round, r.sparsity, r.loss) for r in a.history] == \
        [(r.ticket, r.round, r.sparsity, r.loss) for r in b.history]


@pytest.mark.parametrize("granularity,fraction", [("weight", 0.3), ("channel", 0.5)])
def test_hand_written_step_loop_equals_find_tickets(granularity, fraction, make_tiny, make_loader):
    runs = []
    for by_hand in (False, True):
        torch.manual_seed(7)
        routed = wrap(make_tiny(), granularity)
        pruner = RTLPruner(routed, sparsities=[0.3, 0.6], prune_fraction=fraction, progress=False)
        opt = torch.optim.Adam(routed.parameters(), lr=1e-2)
        subsets = loaders(make_loader)
        res = search_by_hand(pruner, subsets, opt) if by_hand else pruner.find_tickets(subsets, optimizer=opt)
        runs.append((res, {k: v.clone() for k, v in routed.model.state_dict().items()}, routed.tickets.copy()))
    (a, wa, ta), (b, wb, tb) = runs
    assert_same_result(a, b)
    assert len(a.history) > 2 and a.tickets_at[0.6].sparsity().min() >= 0.6 - 1e-9
    for n in wa:  # both end rewound to θ0, with the last target's masks set
        assert torch.equal(wa[n], wb[n]), n
    for n in ta.masks:
        assert torch.equal(ta.masks[n], tb.masks[n]), n


def test_optimizer_instance_equals_the_deprecated_factory(make_tiny, make_loader):
    results = []
    for use_factory in (False, True):
        torch.manual_seed(3)
        routed = wrap(make_tiny())
        pruner = RTLPruner(routed, sparsities=[0.5], progress=False)
        if use_factory:
            with pytest.warns(DeprecationWarning, match="optimizer="):
                res = pruner.find_tickets(loaders(make_loader),
                                          optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
        else:
            opt = torch.optim.SGD(routed.parameters(), lr=0.05, momentum=0.9)
            res = pruner.find_tickets(loaders(make_loader), optimizer=opt)
            assert len(opt.state) == 0  # the instance is a template: every round trains a fresh clone
        results.append(res)
    assert_same_result(*results)


def test_target_sparsity_is_a_deprecated_alias_of_sparsities(make_tiny):
    routed = wrap(make_tiny())
    with pytest.warns(DeprecationWarning, match="sparsities"):
        p = RTLPruner(routed, target_sparsity=[0.25, 0.5], progress=False)
    assert p.sparsities == [0.25, 0.5] == p.targets
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert RTLPruner(routed, sparsities=[0.4], progress=False).sparsities == [0.4]
    with pytest.raises(rtl.SparsityError, match="not both"), pytest.warns(DeprecationWarning):
        RTLPruner(routed, sparsities=[0.5], target_sparsity=[0.5])


def test_record_targets_and_stop_ticket(make_tiny, make_loader):
    routed = wrap(make_tiny())
    pruner = RTLPruner(routed, sparsities=[0.0, 0.5, 0.75], prune_fraction=0.5, progress=False)
    pruner.begin_search([1])
    assert all(bool(m[1].all()) for m in routed.tickets.masks.values())  # searched tickets start dense
    assert pruner.record_targets(1) == 0.5  # 0.0 is reached at once and recorded
    assert list(pruner.state.recorded[0.0]) == [1]
    sp = pruner.prune_round(1)  # untrained: prunes by magnitude
    assert 0.49 < sp <= 0.5 + 1e-9 and pruner.state.progress[1].rounds == 1
    pruner.stop_ticket(1)
    assert pruner.record_targets(1) is None  # a stopped ticket records its masks for every remaining target
    res = pruner.finish_search()
    assert res.stopped == {1: 1}
    for n, m in res.tickets_at[0.75].masks.items():
        assert torch.equal(m[1], res.tickets_at[0.5].masks[n][1])
        assert bool(m[0].all()) and bool(m[2].all())  # unsearched tickets keep their masks
    assert pruner.state is None


def test_steps_validate_their_inputs(make_tiny, make_loader):
    routed = wrap(make_tiny())
    pruner = RTLPruner(routed, sparsities=[0.5], progress=False)
    with pytest.raises(rtl.RTLError, match="begin_search"):
        pruner.rewind(0)
    with pytest.raises(rtl.RTLError, match="begin_search"):
        pruner.finish_search()
    with pytest.raises(rtl.TicketError, match="outside"):
        pruner.begin_search([0, 3])
    with pytest.raises(rtl.TicketError, match="twice"):
        pruner.begin_search([1, 1])
    with pytest.raises(rtl.TicketError, match="no tickets"):
        pruner.begin_search([])
    pruner.begin_search([0])
    with pytest.raises(rtl.TicketError, match="not being searched"):
        pruner.prune_round(2)
    with pytest.raises(rtl.DataError, match="epochs"):
        pruner.train_ticket(0, make_loader(1), epochs=0)
    with pytest.raises(rtl.DataError, match="train_step"):
        pruner.train_ticket(0, make_loader(1), train_step="sgd")
    with pytest.raises(OptimizerError, match="routed.parameters"):
        pruner.train_ticket(0, make_loader(1), optimizer=torch.optim.SGD(make_tiny().parameters(), lr=0.1))
    with pytest.raises(OptimizerError, match="torch.optim.Optimizer"):
        pruner.find_tickets(loaders(make_loader), optimizer="adam")
    while pruner.record_targets(0) is not None:
        pruner.prune_round(0)
    with pytest.raises(rtl.SparsityError, match="finish_search"):
        pruner.prune_round(0)
    with pytest.raises(rtl.DataError, match="steps"):
        pruner.dense_warmup(loaders(make_loader), steps=-1)


def test_train_ticket_changes_only_what_ticket_k_owns(make_tiny, make_loader):
    routed = wrap(make_tiny())
    pruner = RTLPruner(routed, sparsities=[0.5], progress=False)
    pruner.begin_search([0])
    pruner.prune_round(0)
    before = {n: w.detach().clone() for n, w in routed.prunable_weights().items()}
    loss = pruner.train_ticket(0, make_loader(2), optimizer=torch.optim.SGD(routed.parameters(), lr=0.1))
    assert loss > 0
    for n, w in routed.prunable_weights().items():
        m = routed.tickets.masks[n][0]
        assert torch.equal(w.detach()[~m], before[n][~m]), n  # masked forward: no gradient outside ticket 0
        assert not torch.equal(w.detach()[m], before[n][m]), n
    pruner.abandon_search()
    for n, w in routed.prunable_weights().items():  # back to θ and the masks from before the search
        assert bool(routed.tickets.masks[n].all())


def test_ranking_refuses_bad_counts(make_tiny):
    from rtl_plugin.pruning.ranking import prune_weights_global, prune_weights_layerwise
    masks = {"a": torch.ones(4, dtype=torch.bool)}
    scores = {"a": torch.tensor([3.0, 1.0, 2.0, 0.5])}
    with pytest.raises(rtl.RTLError, match=r"int in \[1, 4\]"):
        prune_weights_global({"a": masks["a"].clone()}, scores, 0)
    with pytest.raises(rtl.RTLError, match=r"int in \[1, 4\]"):
        prune_weights_layerwise({"a": masks["a"].clone()}, scores, 4, 5)
    kept = prune_weights_global({"a": masks["a"].clone()}, scores, 2)["a"]
    assert kept.tolist() == [True, False, True, False]  # the two smallest magnitudes go
