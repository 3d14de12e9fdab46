"""Bad inputs raise a specific rtl exception (a subclass of RTLError) whose message says how to fix it."""

from types import SimpleNamespace

import pytest
import torch
import torch_pruning as tp
from torch import nn

import rtl_plugin as rtl
from rtl_plugin.errors import CallbackError, OptimizerError
from rtl_plugin.training import RoutedDataset, RouteBalancedSampler, TicketOptimizer, clone_optimizer

K = 3
EX = torch.randn(1, 3, 8, 8)


@pytest.fixture(scope="module")
def ctx(make_tiny, make_tiny_seg, make_routed):
    """Routed tiny models (K=3, random tickets) in eval mode, plus factories."""
    c = SimpleNamespace(make_tiny=make_tiny, make_seg=make_tiny_seg, make_routed=make_routed,
                        x=torch.randn(4, 3, 8, 8))
    c.w = make_routed("weight", num_tickets=K).eval()
    c.c = make_routed("channel", num_tickets=K).eval()
    for g in ("weight", "channel"):
        seg = rtl.wrap(make_tiny_seg(), K, example_inputs=EX, granularity=g, adapter="generic", output_layers=["head"])
        seg.set_tickets(rtl.TicketSet.random(seg.space, K, keep=0.5, seed=0))
        setattr(c, f"seg_{g[0]}", seg.eval())
    return c


def _begun(pruner):
    pruner.begin(0)
    return pruner


def _long(*shape, fill=0, device="cpu"):
    return torch.full(shape, fill, dtype=torch.long, device=device)


def _wrap_tiny(c, num_tickets=K, **kw):
    kw.setdefault("example_inputs", EX)
    kw.setdefault("adapter", "generic")
    return rtl.wrap(c.make_tiny(), num_tickets, **kw)


def _sgd(c):
    return torch.optim.SGD(c.w.parameters(), lr=0.1)


def _xy(c):
    """A one-batch loader of (x, y) for the weight-mode model."""
    return [(c.x, _long(4))]


def _xyr(c):
    """A one-batch loader of (x, y, route)."""
    return (c.x, _long(4), torch.tensor([0, 1, 2, 0]))


def _masks(c, **change):
    """The weight-mode tiny model's masks with some entries replaced (None drops a key)."""
    m = {k: v.clone() for k, v in c.w.tickets.masks.items()}
    for k, v in change.items():
        if v is None:
            m.pop(k)
        else:
            m[k] = v
    return m


class _NoWeights(nn.Module):
    def forward(self, x):
        return torch.relu(x).mean((2, 3))


def _timm_resnet18_wrong_channels(c):
    import timm
    return rtl.wrap(timm.create_model("resnet18", num_classes=4), K, example_inputs=torch.randn(1, 4, 32, 32))


def _stock_pruner(model):
    """A stock torch-pruning pruner built and stepped on ``model`` (tp traces with autograd on)."""
    with torch.enable_grad():
        tp.pruner.BasePruner(model, EX, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.5).step()


def _dependency_graph(model):
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=EX)


def _released(c, how: str) -> rtl.RoutedModel:
    """A fresh routed model that has handed its model back with ``unwrap()`` or ``merge(0)``."""
    routed = c.make_routed("channel")
    routed.unwrap() if how == "unwrap" else routed.merge(0)
    return routed


def _drop_group(c) -> rtl.RoutedModel:
    routed = c.make_routed("channel")
    routed.set_ticket(1, {n: m[1] & (n != "conv1") for n, m in routed.tickets.masks.items()})
    return routed


# (id, callable(ctx), expected exception class, substring of the message)
CASES = [
    # ---- routes (weight granularity)
    ("route_float", lambda c: c.w(c.x, route=torch.zeros(4)), rtl.RouteError, "integer dtype"),
    ("route_float_scalar", lambda c: c.w(c.x, route=torch.tensor(1.0)), rtl.RouteError, "integer dtype"),
    ("route_bool", lambda c: c.w(c.x, route=torch.zeros(4, dtype=torch.bool)), rtl.RouteError, "integer dtype"),
    ("route_python_bool", lambda c: c.w(c.x, route=True), rtl.RouteError, "bool"),
    ("route_2d", lambda c: c.w(c.x, route=_long(4, 1)), rtl.RouteError, "[B] (per sample) or [B, H, W]"),
    ("route_4d", lambda c: c.w(c.x, route=_long(4, 8, 8, 1)), rtl.RouteError, "[B] (per sample) or [B, H, W]"),
    ("route_wrong_batch", lambda c: c.w(c.x, route=_long(3)), rtl.RouteError, "entries for a batch of 4"),
    ("route_id_eq_K", lambda c: c.w(c.x, route=torch.tensor([0, 1, K, 2])), rtl.RouteError, "outside [0, 3)"),
    ("route_id_negative", lambda c: c.w(c.x, route=torch.tensor([0, -1, 2, 1])), rtl.RouteError, "outside [0, 3)"),
    ("route_int_eq_K", lambda c: c.w(c.x, route=K), rtl.RouteError, "out of range [0, 3)"),
    ("route_int_negative", lambda c: c.w(c.x, route=-1), rtl.RouteError, "out of range [0, 3)"),
    ("route_int_tensor_out_of_range", lambda c: c.w(c.x, route=torch.tensor(7)), rtl.RouteError, "out of range"),
    ("route_none", lambda c: c.w(c.x), rtl.RouteError, "route is required"),
    ("route_list", lambda c: c.w(c.x, route=[0, 1, 2, 0]), rtl.RouteError, "int or a LongTensor"),
    ("route_meta_device", lambda c: c.w(c.x, route=_long(4, device="meta")), rtl.RouteError, "route.to(x.device)"),
    ("no_input_tensor", lambda c: c.w(route=0), rtl.RouteError, "first positional argument"),
    # ---- routes (channel granularity: one masked pass, same checks)
    ("channel_route_float", lambda c: c.c(c.x, route=torch.zeros(4)), rtl.RouteError, "integer dtype"),
    ("channel_route_id_eq_K", lambda c: c.c(c.x, route=_long(4, fill=K)), rtl.RouteError, "outside [0, 3)"),
    ("channel_route_wrong_batch", lambda c: c.c(c.x, route=_long(5)), rtl.RouteError, "entries for a batch of 4"),
    ("channel_route_meta_device", lambda c: c.c(c.x, route=_long(4, device="meta")), rtl.RouteError, "route.to("),
    # ---- per-pixel routes
    ("pixel_route_wrong_hw", lambda c: c.seg_w(c.x, route=_long(4, 4, 8)), rtl.RouteError, "one ticket id per output pixel"),
    ("pixel_route_wrong_w_channel", lambda c: c.seg_c(c.x, route=_long(4, 8, 9)), rtl.RouteError,
     "one ticket id per output pixel"),
    ("pixel_route_wrong_batch", lambda c: c.seg_w(c.x, route=_long(2, 8, 8)), rtl.RouteError, "batch of 4"),
    ("pixel_route_id_eq_K", lambda c: c.seg_w(c.x, route=_long(4, 8, 8, fill=K)), rtl.RouteError, "outside [0, 3)"),
    ("pixel_route_on_classifier", lambda c: c.w(c.x, route=_long(4, 8, 8)), rtl.RouteError, "[B, C, H, W]"),
    # ---- wrap()
    ("num_tickets_0", lambda c: _wrap_tiny(c, 0), rtl.TicketError, "positive int"),
    ("num_tickets_negative", lambda c: _wrap_tiny(c, -2), rtl.TicketError, "positive int"),
    ("num_tickets_bool", lambda c: _wrap_tiny(c, True), rtl.TicketError, "positive int"),
    ("num_tickets_float", lambda c: _wrap_tiny(c, 2.0), rtl.TicketError, "positive int"),
    ("granularity_foo", lambda c: _wrap_tiny(c, granularity="foo"), rtl.SpaceError, "granularity must be one of"),
    ("unknown_adapter", lambda c: _wrap_tiny(c, adapter="nope"), rtl.SpaceError, "registered adapters"),
    ("ignored_layer_missing", lambda c: _wrap_tiny(c, ignored_layers=["conv9"]), rtl.SpaceError,
     "no module named 'conv9'"),
    ("output_layer_missing", lambda c: _wrap_tiny(c, output_layers=["fc"]), rtl.SpaceError, "no module named 'fc'"),
    ("ignored_module_foreign", lambda c: _wrap_tiny(c, ignored_layers=[nn.Conv2d(3, 3, 1)]), rtl.SpaceError,
     "not part of the model"),
    ("no_weights_at_all", lambda c: rtl.wrap(_NoWeights(), K, example_inputs=EX), rtl.SpaceError, "no prunable"),
    ("only_output_layer", lambda c: rtl.wrap(nn.Sequential(nn.Conv2d(3, 4, 3)), K, example_inputs=EX), rtl.SpaceError,
     "no prunable"),
    ("everything_ignored", lambda c: _wrap_tiny(c, ignored_layers=["conv1", "conv2"], output_layers=["head"]),
     rtl.SpaceError, "no prunable"),
    ("untraceable_input", lambda c: _wrap_tiny(c, example_inputs=torch.randn(1, 4, 8, 8), output_layers=["head"]),
     rtl.SpaceError, "example_inputs"),
    ("untraceable_input_timm", _timm_resnet18_wrong_channels, rtl.SpaceError, "example_inputs"),
    # ---- TicketSet construction
    ("ticketset_missing_key", lambda c: rtl.TicketSet(c.w.space, _masks(c, conv2=None)), rtl.TicketError,
     "mask keys do not match"),
    ("ticketset_extra_key", lambda c: rtl.TicketSet(c.w.space, _masks(c, fc=torch.ones(K, 2, dtype=torch.bool))),
     rtl.TicketError, "unexpected ['fc']"),
    ("ticketset_wrong_shape", lambda c: rtl.TicketSet(c.w.space, _masks(c, conv1=torch.ones(K, 8, 3, 3, dtype=torch.bool))),
     rtl.TicketError, "expected [K, 8, 3, 3, 3]"),
    ("ticketset_float_dtype", lambda c: rtl.TicketSet(c.w.space, _masks(c, conv1=torch.ones(K, 8, 3, 3, 3))),
     rtl.TicketError, "must be torch.bool"),
    ("ticketset_uint8_dtype", lambda c: rtl.TicketSet(c.w.space, _masks(c, conv1=torch.ones(K, 8, 3, 3, 3, dtype=torch.uint8))),
     rtl.TicketError, "must be torch.bool"),
    ("ticketset_different_K", lambda c: rtl.TicketSet(c.w.space, _masks(c, conv2=torch.ones(K + 1, 16, 8, 3, 3, dtype=torch.bool))),
     rtl.TicketError, "holds 4 tickets, others hold 3"),
    ("ticketset_zero_tickets", lambda c: rtl.TicketSet(c.w.space, {k: v[:0] for k, v in c.w.tickets.masks.items()}),
     rtl.TicketError, "at least one ticket"),
    ("ticketset_channel_masks_for_weight_space", lambda c: rtl.TicketSet(c.w.space, c.c.tickets.masks),
     rtl.TicketError, "expected [K,"),
    # ---- set_tickets / export_ticket
    ("set_tickets_other_K", lambda c: c.w.set_tickets(rtl.TicketSet.full(c.w.space, K + 1)), rtl.TicketError,
     "K cannot change"),
    ("set_tickets_other_granularity", lambda c: c.w.set_tickets(rtl.TicketSet.full(c.c.space, K)), rtl.TicketError,
     "another ticket space"),
    ("set_tickets_not_a_ticketset", lambda c: c.w.set_tickets(c.w.tickets.masks), rtl.TicketError, "expected a TicketSet"),
    ("export_ticket_eq_K", lambda c: rtl.export_ticket(c.w, K), rtl.TicketError, "ticket index must be an int in [0, 3)"),
    ("export_ticket_negative", lambda c: rtl.export_ticket(c.c, -1), rtl.TicketError, "ticket index must be an int"),
    ("export_ticket_bool", lambda c: rtl.export_ticket(c.w, True), rtl.TicketError, "ticket index must be an int"),
    ("ticket_module_out_of_range", lambda c: c.w.ticket_module(K), rtl.TicketError, "ticket index"),
    ("pruning_history_weight_mode", lambda c: rtl.pruning_history(c.w, 0), rtl.SpaceError, "channel-granularity"),
    # ---- pruner steps and the optimizer convention
    ("pruner_step_before_begin_search", lambda c: rtl.RTLPruner(c.make_routed("weight"), progress=False).rewind(0),
     rtl.RTLError, "begin_search"),
    ("pruner_begin_search_ticket_eq_K",
     lambda c: rtl.RTLPruner(c.make_routed("weight"), progress=False).begin_search([K]), rtl.TicketError, "outside [0, 3)"),
    ("pruner_sparsities_and_deprecated_alias",
     lambda c: rtl.RTLPruner(c.make_routed("weight"), sparsities=[0.5], target_sparsity=[0.5]), rtl.SparsityError,
     "not both"),
    ("pruner_plain_model_without_K", lambda c: rtl.RTLPruner(c.make_tiny(), EX, pruning_ratio=0.5), rtl.TicketError,
     "num_tickets=K"),
    ("pruner_weight_mode_group_importance", lambda c: rtl.RTLPruner(c.make_routed("weight"), pruning_ratio=0.5,
     importance=tp.importance.BNScaleImportance()), rtl.ImportanceError, "granularity='channel'"),
    ("pruner_channel_mode_activation_importance", lambda c: rtl.RTLPruner(c.make_routed("channel"), pruning_ratio=0.5,
     importance=tp.importance.ActivationImportance()), rtl.ImportanceError, "hooks"),
    ("pruner_taylor_without_gradients", lambda c: _begun(rtl.RTLPruner(c.make_routed("channel"), pruning_ratio=0.5,
     importance=tp.importance.GroupTaylorImportance(), progress=False)).step(), rtl.ImportanceError, "loss.backward()"),
    ("pruner_step_without_begin", lambda c: rtl.RTLPruner(c.make_routed("weight"), pruning_ratio=0.5).step(),
     rtl.RTLError, "pruner.begin(k)"),
    ("pruner_ratio_and_sparsities", lambda c: rtl.RTLPruner(c.make_routed("weight"), pruning_ratio=0.5,
     sparsities=[0.5]), rtl.SparsityError, "drop it"),
    ("pruner_round_to_in_weight_mode", lambda c: rtl.RTLPruner(c.make_routed("weight"), pruning_ratio=0.5, round_to=8),
     rtl.SparsityError, "granularity='channel'"),
    ("pruner_unknown_tp_option", lambda c: rtl.RTLPruner(c.make_routed("channel"), pruning_ratio=0.5, ch_sparsity=0.5),
     rtl.SparsityError, "unknown torch-pruning option"),
    ("pruner_callbacks_not_callable", lambda c: rtl.RTLPruner(c.make_routed("weight"), callbacks=3), CallbackError,
     "list of them"),
    ("pruner_granularity_differs_from_routed", lambda c: rtl.RTLPruner(c.make_routed("weight"), granularity="channel"),
     rtl.SparsityError, "fixed at wrap"),
    ("joint_retrain_optimizer_none",
     lambda c: rtl.joint_retrain(c.make_routed("weight"), {0: [(c.x, _long(4))]}, optimizer=None, progress=False),
     OptimizerError, "torch.optim.Adam(routed.parameters()"),
    # ---- retraining and the plain-loop pieces (rtl.training)
    ("joint_retrain_foreign_optimizer", lambda c: rtl.joint_retrain(c.w, {0: _xy(c)}, progress=False,
     optimizer=torch.optim.SGD(c.make_tiny().parameters(), lr=0.1)), OptimizerError, "build it over routed.parameters()"),
    ("joint_retrain_epochs_bool", lambda c: rtl.joint_retrain(c.w, {0: _xy(c)}, optimizer=_sgd(c), epochs=True,
     progress=False), rtl.DataError, "epochs must be an int >= 0"),
    ("joint_retrain_callbacks_not_callable", lambda c: rtl.joint_retrain(c.w, {0: _xy(c)}, optimizer=_sgd(c),
     callbacks=3, progress=False), CallbackError, "a callable cb(event) or a list of them"),
    ("joint_retrain_callbacks_entry_not_callable", lambda c: rtl.joint_retrain(c.w, {0: _xy(c)}, optimizer=_sgd(c),
     callbacks=[print, "stop"], progress=False), CallbackError, "must be callable"),
    ("joint_retrain_scheduler_other_optimizer", lambda c: rtl.joint_retrain(c.w, {0: _xy(c)}, optimizer=_sgd(c),
     scheduler=torch.optim.lr_scheduler.StepLR(_sgd(c), 1), progress=False), OptimizerError,
     "build it on the optimizer you pass"),
    ("joint_retrain_scheduler_not_a_scheduler", lambda c: rtl.joint_retrain(c.w, {0: _xy(c)}, optimizer=_sgd(c),
     scheduler="cosine", progress=False), OptimizerError, "torch.optim.lr_scheduler"),
    ("joint_retrain_scheduler_interval", lambda c: rtl.joint_retrain(c.w, {0: _xy(c)}, optimizer=_sgd(c),
     scheduler_interval="batch", progress=False), rtl.DataError, "'epoch' or 'step'"),
    ("mixed_route_retrain_foreign_optimizer", lambda c: rtl.mixed_route_retrain(c.w, [_xyr(c)], progress=False,
     optimizer=torch.optim.SGD(c.make_tiny().parameters(), lr=0.1)), OptimizerError, "build it over routed.parameters()"),
    ("mixed_route_retrain_epochs_bool", lambda c: rtl.mixed_route_retrain(c.w, [_xyr(c)], optimizer=_sgd(c),
     epochs=True, progress=False), rtl.DataError, "epochs must be an int >= 0"),
    ("mixed_route_retrain_unsized_loader", lambda c: rtl.mixed_route_retrain(c.w, iter([_xyr(c)]), optimizer=_sgd(c),
     progress=False), rtl.DataError, "a loader with a length"),
    ("ticket_optimizer_foreign_optimizer", lambda c: TicketOptimizer(c.w, torch.optim.SGD(c.make_tiny().parameters(),
     lr=0.1)), OptimizerError, "build it over routed.parameters()"),
    ("ticket_optimizer_wraps_itself", lambda c: TicketOptimizer(c.w, TicketOptimizer(c.w, _sgd(c))), OptimizerError,
     "ticket_optimizer.base"),
    ("ticket_optimizer_per_ticket_state_str", lambda c: TicketOptimizer(c.w, _sgd(c), per_ticket_state="yes"),
     OptimizerError, "True or False"),
    ("ticket_optimizer_no_ticket", lambda c: TicketOptimizer(c.w, _sgd(c)).step(), rtl.TicketError,
     "step(ticket=k) or select(k)"),
    ("ticket_optimizer_ticket_eq_K", lambda c: TicketOptimizer(c.w, _sgd(c)).step(ticket=K), rtl.TicketError,
     "ints in [0, 3)"),
    ("ticket_optimizer_ticket_float_tensor", lambda c: TicketOptimizer(c.w, _sgd(c)).select(torch.zeros(2)),
     rtl.TicketError, "integer tensor of ticket ids"),
    ("ticket_optimizer_several_tickets_per_ticket_state", lambda c: TicketOptimizer(c.w, _sgd(c)).select([0, 1]),
     OptimizerError, "per_ticket_state=False"),
    ("sampler_float_routes", lambda c: RouteBalancedSampler(torch.zeros(4), 2), rtl.DataError, "1-D integer tensor"),
    ("sampler_batch_size_0", lambda c: RouteBalancedSampler([0, 1], 0), rtl.DataError, "batch_size must be an int >= 1"),
    ("sampler_drop_last_leaves_no_batch", lambda c: RouteBalancedSampler([0, 0, 0, 1], 2, drop_last=True),
     rtl.DataError, "use drop_last=False or a smaller batch_size"),
    ("sampler_ticket_without_samples", lambda c: RouteBalancedSampler([0, 0, 1], 2, tickets=[0, 2]), rtl.DataError,
     "no sample in routes"),
    ("routed_dataset_wrong_length", lambda c: RoutedDataset(torch.utils.data.TensorDataset(c.x), [0, 1]),
     rtl.DataError, "give one per sample"),
    ("clone_optimizer_not_an_optimizer", lambda c: clone_optimizer("adam"), OptimizerError, "Optimizer instance"),
    # ---- torch-pruning on the live routed model, unwrap / merge / count_ops_and_params
    ("stock_pruner_on_routed_model", lambda c: _stock_pruner(c.w), rtl.LiveRoutedModelError, "routed.plain_copy(k)"),
    ("stock_pruner_on_ticket_module", lambda c: _stock_pruner(c.c.ticket_module(1)), rtl.LiveRoutedModelError,
     "routed.plain_copy(k)"),
    ("stock_pruner_on_wrapped_model", lambda c: _stock_pruner(c.c.model), rtl.LiveRoutedModelError,
     "routed.plain_copy(k)"),
    ("dependency_graph_on_ticket_module", lambda c: _dependency_graph(c.w.ticket_module(0)), rtl.LiveRoutedModelError,
     "rtl.export_ticket(routed, k)"),
    ("tp_count_ops_on_routed_model", lambda c: tp.utils.count_ops_and_params(c.c, EX), rtl.LiveRoutedModelError,
     "routed.count_ops_and_params(k, example_inputs)"),
    ("tp_count_ops_on_ticket_module", lambda c: tp.utils.count_ops_and_params(c.w.ticket_module(2), EX),
     rtl.LiveRoutedModelError, "routed.count_ops_and_params(k, example_inputs)"),
    ("ticket_importance_on_ticket_module", lambda c: rtl.TicketImportance(c.c.ticket_module(0), 0),
     rtl.LiveRoutedModelError, "routed.plain_copy(k)"),
    ("count_ops_ticket_eq_K", lambda c: c.w.count_ops_and_params(K, EX), rtl.TicketError, "ticket index"),
    ("unwrap_norm_ticket_eq_K", lambda c: c.make_routed("weight").unwrap(norm_ticket=K), rtl.TicketError,
     "ticket index"),
    ("merge_ticket_eq_K", lambda c: c.make_routed("weight").merge(K), rtl.TicketError, "ticket index"),
    ("merge_ticket_drops_a_whole_group", lambda c: _drop_group(c).merge(1), rtl.TicketError, "Keep >=1 channel"),
    ("forward_after_unwrap", lambda c: _released(c, "unwrap")(c.x, route=0), rtl.UnwrappedModelError,
     "rtl.wrap(model, K"),
    ("set_ticket_after_merge", lambda c: _released(c, "merge").set_ticket(0, {}), rtl.UnwrappedModelError,
     "with merge()"),
    ("plain_copy_after_unwrap", lambda c: _released(c, "unwrap").plain_copy(0), rtl.UnwrappedModelError,
     "with unwrap()"),
]


@pytest.mark.parametrize("call, exc, hint", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(ctx, call, exc, hint):
    assert issubclass(exc, rtl.RTLError)
    with torch.no_grad(), pytest.raises(exc) as ei:
        call(ctx)
    assert isinstance(ei.value, rtl.RTLError)
    assert hint in str(ei.value), f"message lacks hint {hint!r}: {ei.value}"


def test_case_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


def test_good_calls_still_work_after_errors(ctx):
    """Failed routed forwards must not leave routing state behind."""
    for name in ("w", "c", "seg_w", "seg_c"):
        m = getattr(ctx, name)
        with torch.no_grad():
            ok = m(ctx.x, route=torch.tensor([0, 2, 1, 0]))
            with pytest.raises(rtl.RouteError):
                m(ctx.x, route=torch.tensor([0, 2, 1, K]))
            if name.startswith("seg"):
                with pytest.raises(rtl.RouteError):
                    m(ctx.x, route=_long(4, 4, 4))  # fails after running the model
            with pytest.raises(rtl.RouteError, match="outside a routed forward"):
                m.model(ctx.x)
            assert torch.equal(m(ctx.x, route=torch.tensor([0, 2, 1, 0])), ok)


@pytest.mark.parametrize("gran", ["weight", "channel"])
@pytest.mark.parametrize("model", ["classifier", "segmentation"])
def test_internal_norm_outside_routed_forward(ctx, gran, model):
    routed = getattr(ctx, gran[0] if model == "classifier" else f"seg_{gran[0]}")
    with pytest.raises(rtl.RouteError, match="outside a routed forward") as ei:
        routed.model(ctx.x)
    assert "route=" in str(ei.value)
    routed.train()
    try:
        with pytest.raises(rtl.RouteError, match="outside a routed forward"):
            routed.model(ctx.x)
    finally:
        routed.eval()


def test_routed_batchnorm_alone_raises(ctx):
    bn = next(m for m in ctx.w.model.modules() if isinstance(m, rtl.RoutedBatchNorm))
    with pytest.raises(rtl.RouteError, match="outside a routed forward"):
        bn(torch.randn(2, bn.num_features, 4, 4))


@pytest.mark.parametrize("adapter", ["generic", "auto"])
def test_untraceable_input_generic_adapter(ctx, adapter):
    with pytest.raises(rtl.SpaceError, match="example_inputs"):
        rtl.wrap(ctx.make_tiny(), K, example_inputs=torch.randn(1, 4, 8, 8), adapter=adapter)


@pytest.mark.parametrize("gran", ["weight", "channel"])
def test_empty_batch_tensor_route(ctx, gran):
    routed = getattr(ctx, gran[0])
    x = torch.randn(0, 3, 8, 8)
    with torch.no_grad():
        ref = routed(x, route=0)
        out = routed(x, route=torch.zeros(0, dtype=torch.long))
    assert out.shape == ref.shape == (0, 5)


def test_classification_config_per_ticket_state_must_be_bool(tmp_path):
    from rtl_plugin.tasks.classification.runner import ClassificationConfig, run_classification
    with pytest.raises(rtl.DataError, match="per_ticket_state"):
        run_classification(ClassificationConfig(per_ticket_state="shared"), tmp_path)
    assert not any(tmp_path.iterdir())  # rejected before anything is written
