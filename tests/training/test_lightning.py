"""RTLCallback: the RTL pipeline (ticket search, joint retraining, masked updates, collapse monitor) inside a real
``lightning.Trainer`` on CPU, with tiny sizes."""
import importlib
import re
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch.utils.data import DataLoader, TensorDataset

import rtl_plugin as rtl
from rtl_plugin.diagnostics import CollapseMonitor
from rtl_plugin.errors import DataError, MissingDependencyError, OptimizerError, RTLError, TicketError
from rtl_plugin.training import joint_retrain
from rtl_plugin.training.lightning import RTLCallback
from rtl_plugin.training.masked import ticket_param_masks
from conftest import TINY_INPUT


def _adam(params):
    return torch.optim.Adam(params, lr=1e-2)


class LitRouted(L.LightningModule):
    """What a user writes: hold the routed model, train it with the batch's route."""

    def __init__(self, routed, make_optimizer=_adam):
        super().__init__()
        self.routed = routed
        self.make_optimizer = make_optimizer

    def training_step(self, batch, batch_idx):
        x, y, route = batch
        return F.cross_entropy(self.routed(x, route=route), y)

    def configure_optimizers(self):
        return self.make_optimizer(self.routed.parameters())


def _trainer(*callbacks, **kw):
    opts = dict(accelerator="cpu", max_epochs=-1, reload_dataloaders_every_n_epochs=1, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(callbacks=list(callbacks), **{**opts, **kw})


def _pruner(make_tiny, **kw):
    model = make_tiny()
    return rtl.RTLPruner(model, torch.randn(*TINY_INPUT), num_tickets=2, ignored_layers=[model.head], progress=False,
                         **kw)


def _fit(cb, routed, trainer=None, module=None):
    trainer = trainer or _trainer(cb)
    trainer.fit(module or LitRouted(routed), train_dataloaders=cb.train_dataloader())
    return trainer


CONFIGS = {
    # weight mode, the paper's IMP schedule in round order with the collapse monitor and rewinding to θ_2
    "weight-imp-round": dict(pruner=dict(granularity="weight", sparsities=[0.3, 0.6], prune_fraction=0.3,
                                         order="round", rewind=2), monitor=True, epochs_per_round=1, epochs=1 + 6 + 2),
    # channel mode, torch-pruning's ratio schedule (tp's group selection) with a gradient importance estimated on
    # ticket k's data after its round, ticket order, 2 epochs per round
    "channel-tp-ticket": dict(pruner=dict(granularity="channel", pruning_ratio=0.5, iterative_steps=2,
                                          importance=tp.importance.GroupTaylorImportance()),
                              monitor=False, epochs_per_round=2, epochs=2 * 2 * 2 + 2),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lightning_run_equals_the_plain_api(make_tiny, make_loader, name):
    """A Lightning run (search + 2 retraining epochs) gives find_tickets' masks at every target and, after
    retraining, joint_retrain(per_ticket_state=False)'s weights, bit for bit; the monitor sees every sweep."""
    cfg = CONFIGS[name]
    subsets = {k: make_loader(3, seed=10 + k) for k in range(2)}
    monitors = [CollapseMonitor(action="warn") for _ in range(2)] if cfg["monitor"] else [None, None]
    torch.manual_seed(0)
    a = _pruner(make_tiny, callbacks=[monitors[0]] if monitors[0] else [], **cfg["pruner"])
    res = a.find_tickets(subsets, optimizer=_adam(a.routed.parameters()), epochs_per_round=cfg["epochs_per_round"])
    hist = joint_retrain(a.routed, subsets, optimizer=_adam(a.routed.parameters()), epochs=2, per_ticket_state=False,
                         progress=False)
    torch.manual_seed(0)
    b = _pruner(make_tiny, **cfg["pruner"])
    cb = RTLCallback(b, subsets, epochs_per_round=cfg["epochs_per_round"], retrain_epochs=2, monitor=monitors[1])
    trainer = _fit(cb, b.routed)

    assert cb.phase == "done" and trainer.current_epoch == cfg["epochs"]
    assert cb.result.sparsities() == res.sparsities()
    for t in res.sparsities():
        for n, m in res.tickets_at[t].masks.items():
            assert torch.equal(m, cb.result.tickets_at[t].masks[n]), (t, n)
    assert [(r.ticket, r.round, r.sparsity) for r in cb.result.history] == \
        [(r.ticket, r.round, r.sparsity) for r in res.history]
    assert [r.loss for r in cb.result.history] == pytest.approx([r.loss for r in res.history])
    last = cb.result.tickets_at[res.sparsities()[-1]]
    assert any(not torch.equal(m[0], m[1]) for m in last.masks.values()), "different subsets gave the same ticket"
    assert all(torch.equal(m, last.masks[n]) for n, m in b.tickets.masks.items())
    for k, v in a.routed.model.state_dict().items():
        assert torch.equal(v, b.routed.model.state_dict()[k]), k
    assert cb.retrain_losses == pytest.approx([sum(row) / len(row) for row in hist["loss"]])
    if cfg["monitor"]:
        rounds = max(r.round for r in res.history)
        assert len(monitors[1].sweep.points) == 1 + rounds  # the dense start + one point per sweep
        assert [p.sparsity for p in monitors[1].sweep.points] == [p.sparsity for p in monitors[0].sweep.points]


class StepProbe(L.Callback):
    """Listed after RTLCallback, so its optimizer hooks run after RTLCallback's: compares every parameter entry
    outside the tickets of the step's batches before and after ``optimizer.step()``."""

    def __init__(self, rtl_callback):
        self.cb, self.routed = rtl_callback, rtl_callback.pruner.routed
        self.tickets, self.stepped = set(), False
        self.steps = {"search": 0, "retrain": 0}
        self.outside_changed, self.owned_changed = 0, 0

    def on_fit_start(self, trainer, pl_module):
        for opt in trainer.optimizers:
            opt.register_step_pre_hook(self.before)
            opt.register_step_post_hook(self.after)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.stepped:
            self.tickets, self.stepped = set(), False
        self.tickets |= set(batch[-1].tolist())

    def before(self, opt, args, kwargs):
        self.saved = {id(p): p.detach().clone() for p in self.routed.parameters()}

    def after(self, opt, args, kwargs):
        owned = {}
        for k in self.tickets:
            for p, m in ticket_param_masks(self.routed, k):
                m = m.expand_as(p)
                owned[id(p)] = (p, m | owned[id(p)][1] if id(p) in owned else m)
        for p, m in owned.values():
            changed = p.detach() != self.saved[id(p)]
            self.outside_changed += int((changed & ~m).sum())
            self.owned_changed += int((changed & m).sum())
        self.steps[self.cb.phase] += 1
        self.stepped = True


class ManualLit(LitRouted):
    """Manual optimization: the user steps the optimizer."""

    def __init__(self, routed, make_optimizer=_adam):
        super().__init__(routed, make_optimizer)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        x, y, route = batch
        loss = F.cross_entropy(self.routed(x, route=route), y)
        self.manual_backward(loss)
        opt.step()
        return loss.detach()


def _mixed_loader(n_batches, K=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    n = 4 * n_batches
    ds = TensorDataset(torch.randn(n, *TINY_INPUT[1:], generator=g), torch.randint(0, 5, (n,), generator=g),
                       torch.randint(0, K, (n,), generator=g))
    return DataLoader(ds, batch_size=4)


@pytest.mark.parametrize("granularity,mixed,accumulate,module", [("weight", False, 1, LitRouted),
                                                                 ("channel", True, 2, LitRouted),
                                                                 ("channel", False, 1, ManualLit)])
def test_masked_update_guarantee_with_adam_weight_decay(make_tiny, make_loader, granularity, mixed, accumulate,
                                                        module):
    """During every optimizer step of the search and of retraining (one ticket per batch, or mixed-route batches,
    with gradient accumulation, or manual optimization) no entry outside the batches' tickets changes, with Adam +
    weight decay."""
    subsets = {k: make_loader(2, seed=20 + k) for k in range(2)}
    p = _pruner(make_tiny, granularity=granularity, sparsities=[0.5], prune_fraction=0.5)
    decay = lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=0.1)  # noqa: E731
    cb = RTLCallback(p, subsets, retrain_epochs=2, retrain_loader=_mixed_loader(4) if mixed else None)
    probe = StepProbe(cb)
    trainer = _trainer(cb, probe, **({"accumulate_grad_batches": accumulate} if accumulate > 1 else {}))
    _fit(cb, p.routed, trainer, module(p.routed, decay))
    assert probe.steps["search"] >= 2 and probe.steps["retrain"] >= 2
    assert probe.owned_changed > 0, "the probe saw no training"
    assert probe.outside_changed == 0
    assert all(not bool(m[k].all()) for m in p.tickets.masks.values() for k in range(2)), "tickets left dense"

    # without the write-back the same optimizer moves entries outside the ticket: the probe can fail
    routed = _pruner(make_tiny, granularity=granularity, sparsities=[0.5]).routed
    routed.set_tickets(p.tickets)
    opt = decay(routed.parameters())
    before = {id(q): q.detach().clone() for q in routed.parameters()}
    x, y = next(iter(subsets[0]))
    F.cross_entropy(routed(x, route=0), y).backward()
    opt.step()
    moved = sum(int(((q.detach() != before[id(q)]) & ~m.expand_as(q)).sum()) for q, m in ticket_param_masks(routed, 0))
    assert moved > 0


def test_stopping_before_the_search_ends_restores_the_model(make_tiny, make_loader):
    subsets = {k: make_loader(2, seed=k) for k in range(2)}
    p = _pruner(make_tiny, granularity="weight", sparsities=[0.3, 0.6], prune_fraction=0.3)
    weights = {k: v.clone() for k, v in p.routed.model.state_dict().items()}
    masks = p.tickets.copy()
    cb = RTLCallback(p, subsets)
    with pytest.raises(RTLError, match="max_epochs=-1"):
        _fit(cb, p.routed, _trainer(cb, max_epochs=2))
    assert all(torch.equal(v, weights[k]) for k, v in p.routed.model.state_dict().items())
    assert all(torch.equal(m, masks.masks[n]) for n, m in p.tickets.masks.items())
    assert p.state is None


def test_stopping_during_retraining_warns(make_tiny, make_loader):
    subsets = {k: make_loader(1, seed=k) for k in range(2)}
    p = _pruner(make_tiny, granularity="weight", sparsities=[0.5], prune_fraction=0.5)
    cb = RTLCallback(p, subsets, retrain_epochs=3)
    with pytest.warns(RuntimeWarning, match="1 of 3 retraining epochs"):
        _fit(cb, p.routed, _trainer(cb, max_epochs=3))  # 2 search rounds + 1 retraining epoch
    assert cb.result is not None and cb.retrain_losses and cb.phase == "retrain"


class _OtherModule(LitRouted):
    def __init__(self, routed):
        super().__init__(routed)
        self.other = torch.nn.Linear(2, 2)
        del self.routed
        self._routed = [routed]

    def training_step(self, batch, batch_idx):
        x, y, route = batch
        return F.cross_entropy(self._routed[0](x, route=route), y)

    def configure_optimizers(self):
        return _adam(self.parameters())


TRAINER_CASES = [
    ("no_reload", dict(trainer=dict(reload_dataloaders_every_n_epochs=0)), DataError,
     "reload_dataloaders_every_n_epochs=1"),
    ("module_without_routed", dict(module=_OtherModule), RTLError, "self.routed = pruner.routed"),
    ("optimizer_misses_routed", dict(optimizer=lambda params: _adam([torch.nn.Parameter(torch.zeros(1))])),
     OptimizerError, "self.routed.parameters()"),
    ("own_loader", dict(loader=True), DataError, "train_dataloaders=callback.train_dataloader()"),
]


@pytest.mark.parametrize("case,how,exc,hint", TRAINER_CASES, ids=[c[0] for c in TRAINER_CASES])
def test_bad_trainer_setups(make_tiny, make_loader, case, how, exc, hint):
    subsets = {k: make_loader(1, seed=k) for k in range(2)}
    p = _pruner(make_tiny, granularity="weight", sparsities=[0.5])
    masks = p.tickets.copy()
    cb = RTLCallback(p, subsets)
    module = how["module"](p.routed) if "module" in how else LitRouted(p.routed, how.get("optimizer", _adam))
    trainer = _trainer(cb, **how.get("trainer", {}))
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long),
                                      torch.zeros(4, dtype=torch.long)), batch_size=4) if how.get("loader") else None
    with pytest.raises(exc, match=hint):
        trainer.fit(module, train_dataloaders=loader or cb.train_dataloader())
    assert p.state is None and all(torch.equal(m, masks.masks[n]) for n, m in p.tickets.masks.items())


CONSTRUCTOR_CASES = [
    ("not_a_pruner", lambda p, s: RTLCallback(p.routed, s), TicketError, "rtl.RTLPruner"),
    ("missing_subset", lambda p, s: RTLCallback(p, {0: s[0]}), DataError, "one DataLoader per ticket"),
    ("epochs_per_round_0", lambda p, s: RTLCallback(p, s, epochs_per_round=0), DataError, "epochs_per_round"),
    ("retrain_epochs_bool", lambda p, s: RTLCallback(p, s, retrain_epochs=True), DataError, "retrain_epochs"),
    ("retrain_loader_no_epochs", lambda p, s: RTLCallback(p, s, retrain_epochs=0, retrain_loader=s[0]), DataError,
     "retrain_epochs >= 1"),
    ("monitor_ticket_order", lambda p, s: RTLCallback(p, s, monitor=CollapseMonitor()), RTLError, "order='round'"),
    ("monitor_not_a_callback", lambda p, s: RTLCallback(p, s, monitor=3), RTLError, "on_round_end"),
    ("loss_fn_not_callable", lambda p, s: RTLCallback(p, s, loss_fn="ce"), DataError, "loss_fn"),
    ("loader_outside_fit", lambda p, s: len(RTLCallback(p, s).train_dataloader()), DataError,
     "callbacks=\\[callback\\]"),
    ("grouped_search", lambda p, s: RTLCallback(rtl.RTLPruner(p.routed, sparsities=[0.5], search_execution="grouped"),
                                                s), RTLError, "search_execution='sequential'"),
]


@pytest.mark.parametrize("case,call,exc,hint", CONSTRUCTOR_CASES, ids=[c[0] for c in CONSTRUCTOR_CASES])
def test_bad_callback_arguments(make_tiny, make_loader, case, call, exc, hint):
    p = _pruner(make_tiny, granularity="weight", sparsities=[0.5])
    with pytest.raises(exc, match=hint):
        call(p, {k: make_loader(1, seed=k) for k in range(2)})


def test_without_lightning_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning.pytorch.callbacks", None)  # as if lightning were not installed
    monkeypatch.delitem(sys.modules, "rtl_plugin.training.lightning")
    with pytest.raises(MissingDependencyError, match=re.escape('pip install "rtl-plugin[lightning]"')):
        importlib.import_module("rtl_plugin.training.lightning")
    assert issubclass(MissingDependencyError, ImportError)
