"""The grouped (vectorised) ticket search: the same masks as the sequential search, and its refusals."""
import pytest
import timm
import torch
import torch.nn as nn
import torch_pruning as tp
from torch.utils.data import DataLoader, TensorDataset

import rtl_plugin as rtl
from _helpers import TinyCNN
from rtl_plugin.errors import RTLError, SearchExecutionError
from rtl_plugin.pruning import grouped_search
from rtl_plugin.pruning.pruner import RTLPruner

D = torch.float64


def loaders(K, *, sizes=None, batch=6, shuffle=True, generators=True, seed=1, shape=(3, 8, 8), classes=5):
    """One (x, y) loader per ticket; subset k has ``sizes[k]`` samples (default: unequal sizes, so the tickets'
    last batches differ in shape and the grouped search must split its group)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in range(K):
        n = sizes[k] if sizes else 14 + 5 * k
        x = torch.randn(n, *shape, generator=g, dtype=D) + 0.3 * k
        y = torch.randint(0, classes, (n,), generator=g)
        gen = torch.Generator().manual_seed(seed + 10 + k) if generators else None
        out[k] = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=shuffle, generator=gen)
    return out


def optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.Adam(params, lr=1e-2)


def search(execution, K, *, opt="adam", order="round", model=None, data=None, epochs=2, pruner_kw=None, device=None,
           **kw):
    torch.manual_seed(0)
    model = (model or (lambda: TinyCNN()))().to(D)
    r = rtl.wrap(model, K, example_inputs=torch.randn(1, 3, 8, 8, dtype=D), granularity="weight", adapter="generic",
                 output_layers=["head"]).to(device or "cpu")
    pruner_kw = pruner_kw or dict(sparsities=[0.4, 0.7], prune_fraction=0.3)
    p = RTLPruner(r, progress=False, order=order, search_execution=execution, **pruner_kw)
    res = p.find_tickets(data if data is not None else loaders(K), optimizer=optimizer(opt, r.parameters()),
                         epochs_per_round=epochs, device=device, **kw)
    return res, r


def assert_same_search(a, b):
    (ra, ma), (rb, mb) = a, b
    assert ra.tickets_at.keys() == rb.tickets_at.keys()
    for s in ra.tickets_at:
        for n, m in ra.tickets_at[s].masks.items():
            assert torch.equal(m, rb.tickets_at[s].masks[n]), (s, n, int((m != rb.tickets_at[s].masks[n]).sum()))
    ha_, hb_ = (sorted(r.history, key=lambda h: (h.ticket, h.round)) for r in (ra, rb))  # ticket order: interleaved
    assert [(h.ticket, h.round, h.sparsity) for h in ha_] == [(h.ticket, h.round, h.sparsity) for h in hb_]
    for ha, hb in zip(ha_, hb_):  # the same training up to float64 summation order
        assert ha.loss == pytest.approx(hb.loss, rel=1e-12)
    sa, sb = ma.state_dict(), mb.state_dict()  # rewound to θ (norm statistics included)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_grouped_masks_equal_sequential_float64(K, opt):
    assert_same_search(search("sequential", K, opt=opt), search("grouped", K, opt=opt))


def test_grouped_equals_sequential_ticket_order_and_global_rng_shuffle():
    # ticket order (the default): per-loader generators make each ticket's data order independent of the order
    assert_same_search(search("sequential", 3, order="ticket"), search("grouped", 3, order="ticket"))
    # loaders shuffling with the global RNG: the iterators draw their seeds in ticket order, as in round order
    a = search("sequential", 3, data=loaders(3, generators=False), epochs=1)
    b = search("grouped", 3, data=loaders(3, generators=False), epochs=1)
    assert_same_search(a, b)
    # rewind to θ_t: the dense warm-up is the sequential one, the rounds after it grouped
    kw = dict(pruner_kw=dict(sparsities=[0.5], prune_fraction=0.5, rewind=3), epochs=1)
    assert_same_search(search("sequential", 3, **kw), search("grouped", 3, **kw))


def test_grouped_searches_some_tickets_and_resumes_from_a_checkpoint(tmp_path):
    kw = dict(pruner_kw=dict(sparsities=[0.4, 0.7], prune_fraction=0.3), tickets=[0, 2])
    assert_same_search(search("sequential", 3, **kw), search("grouped", 3, **kw))

    class DieOnce:
        def __init__(self, at):
            self.n, self.at = 0, at

        def on_trained(self, event):
            self.n += 1
            if self.n == self.at:
                raise RuntimeError("simulated crash")
    ref = search("grouped", 3)
    die = DieOnce(at=4)  # the first ticket of the second sweep: one sweep was checkpointed
    ck = dict(checkpoint_dir=tmp_path / "ck", pruner_kw=dict(sparsities=[0.4, 0.7], prune_fraction=0.3, callbacks=[die]))
    with pytest.raises(RuntimeError, match="simulated"):
        search("grouped", 3, **ck)
    die.at = None
    got = search("grouped", 3, **ck)
    assert die.n == 4 + len(ref[0].history) - 3  # resumed after the checkpointed sweep, not started over
    assert_same_search(ref, got)


def test_grouped_equals_sequential_ratio_schedule_and_timm_model():
    kw = dict(pruner_kw=dict(pruning_ratio=0.6, iterative_steps=2), opt="sgd")
    assert_same_search(search("sequential", 2, **kw), search("grouped", 2, **kw))
    mk = lambda: timm.create_model("test_resnet", num_classes=5)  # noqa: E731
    runs = []
    for ex in ("sequential", "grouped"):
        torch.manual_seed(0)
        r = rtl.wrap(mk().to(D), 2, example_inputs=torch.randn(1, 3, 16, 16, dtype=D), granularity="weight")
        p = RTLPruner(r, sparsities=[0.3], prune_fraction=0.3, progress=False, search_execution=ex)
        data = loaders(2, sizes=[8, 8], batch=4, shape=(3, 16, 16))  # fresh: same generator seeds in both runs
        runs.append((p.find_tickets(data, optimizer=optimizer("sgd", r.parameters())), r))
    assert_same_search(*runs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grouped_masks_equal_sequential_on_cuda_float64():
    assert_same_search(search("sequential", 3, device="cuda"), search("grouped", 3, device="cuda"))


def test_grouped_runs_all_tickets_in_one_call_per_step(monkeypatch):
    calls = []
    step = grouped_search._Group.step

    def counting(self, model, loss_fn, x, y):
        calls.append(x.shape[0])
        return step(self, model, loss_fn, x, y)
    monkeypatch.setattr(grouped_search._Group, "step", counting)
    res, _ = search("grouped", 4, data=loaders(4, sizes=[12] * 4), epochs=2)
    rounds = len(res.history) // 4
    assert calls == [4] * (rounds * 2 * 2)  # every step: one call for the 4 tickets (2 batches x 2 epochs a round)
    calls.clear()
    search("grouped", 3, data=loaders(3, sizes=[12, 12, 9]), epochs=1)  # 2 + 2 + 2 batches, last of ticket 2: 3
    assert calls[:3] == [3, 2, 1]  # the first round: both steps together until the last batches differ in shape


KERNELS = ("aten::_convolution", "aten::convolution_backward", "aten::native_batch_norm_backward")


def test_grouped_search_makes_one_convolution_call_per_layer_for_all_tickets():
    counts = {}
    for ex in ("sequential", "grouped"):
        r = routed_tiny(K=3)
        p = RTLPruner(r, sparsities=[0.5], prune_fraction=0.5, progress=False, search_execution=ex)
        data = {k: DataLoader(TensorDataset(torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))), batch_size=6)
                for k in range(3)}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            p.find_tickets(data)
        counts[ex] = {e.key: e.count for e in prof.key_averages()
                      if e.key in KERNELS}
    # TinyCNN: 2 convolutions + 2 batch norms (kernel-level ops: vmap's outer aten::convolution dispatches to one
    # aten::_convolution for all tickets); one round of one batch per ticket
    assert counts["sequential"] == {k: 2 * 3 for k in KERNELS}
    assert counts["grouped"] == {k: 2 for k in KERNELS}


def test_grouped_round_end_sees_each_tickets_trained_weights():
    seen = {}

    class Record:
        def __init__(self, tag):
            self.tag = tag

        def on_trained(self, event):
            r = event["model"]
            seen.setdefault(self.tag, []).append({k: v.clone() for k, v in r.model.state_dict().items()})

    for ex in ("sequential", "grouped"):
        search(ex, 3, pruner_kw=dict(sparsities=[0.4], prune_fraction=0.4, callbacks=[Record(ex)]))
    assert len(seen["sequential"]) == len(seen["grouped"]) == 3
    for a, b in zip(seen["sequential"], seen["grouped"]):  # weights and every ticket's norm-statistics row
        for k in a:
            assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-10, atol=1e-12), k


def test_grouped_taylor_importance_equals_sequential():
    kw = dict(pruner_kw=dict(sparsities=[0.5], prune_fraction=0.5, importance=tp.importance.TaylorImportance()),
              epochs=1)
    assert_same_search(search("sequential", 2, **kw), search("grouped", 2, **kw))


def test_grouped_with_dropout_runs_to_the_target():
    def net():
        m = TinyCNN()
        m.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(16, 5))
        return m
    torch.manual_seed(0)
    r = rtl.wrap(net().to(D), 2, example_inputs=torch.randn(1, 3, 8, 8, dtype=D), granularity="weight",
                 adapter="generic", output_layers=["head.1"])
    p = RTLPruner(r, sparsities=[0.5], prune_fraction=0.5, progress=False, search_execution="grouped")
    res = p.find_tickets(loaders(2), optimizer=optimizer("adam", r.parameters()))
    sp = [float(s) for s in res.tickets_at[0.5].sparsity()]
    assert all(0.5 - 1e-9 <= s < 0.55 for s in sp), sp
    m = res.tickets_at[0.5].masks["conv2"]
    assert not torch.equal(m[0], m[1])  # each ticket trained on its own data (and dropout draws)
    assert sorted(h.ticket for h in res.history) == [0, 1]  # one round of 50% each


def routed_tiny(granularity="weight", K=2, model=None):
    return rtl.wrap((model or TinyCNN()), K, example_inputs=torch.randn(1, 3, 8, 8), granularity=granularity,
                    adapter="generic", output_layers=["head"])


def test_grouped_refusals_name_the_fix():
    with pytest.raises(SearchExecutionError, match="'sequential'"):
        RTLPruner(routed_tiny(), sparsities=[0.5], search_execution="vectorised")
    with pytest.raises(SearchExecutionError, match="weight granularity only"):
        RTLPruner(routed_tiny("channel"), sparsities=[0.5], search_execution="grouped")
    r = routed_tiny()
    p = RTLPruner(r, sparsities=[0.5], progress=False, search_execution="grouped")
    data = {k: DataLoader(TensorDataset(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))), batch_size=2)
            for k in range(2)}
    with pytest.raises(SearchExecutionError, match="loss_fn="):
        p.find_tickets(data, train_step=lambda m, b, o: 0.0)
    with pytest.raises(SearchExecutionError, match="Adagrad"):
        p.find_tickets(data, optimizer=torch.optim.Adagrad(r.parameters()))
    bn = TinyCNN()
    bn.bn1.momentum = None
    p2 = RTLPruner(routed_tiny(model=bn), sparsities=[0.5], progress=False, search_execution="grouped")
    with pytest.raises(SearchExecutionError, match="momentum=None"):
        p2.find_tickets(data)
    before = {k: v.clone() for k, v in r.state_dict().items()}

    def bad_loss(out, y):  # .item() inside the loss cannot run under vmap
        return out.sum() * float(y.sum().item() > -1)
    with pytest.raises(SearchExecutionError, match="vmap"):
        p.find_tickets(data, loss_fn=bad_loss)
    assert all(torch.equal(v, r.state_dict()[k]) for k, v in before.items())  # abandoned: the model is unchanged
    assert issubclass(SearchExecutionError, RTLError)
