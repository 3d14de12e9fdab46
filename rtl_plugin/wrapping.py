"""``rtl.wrap``: one call from any supported model to a RoutedModel."""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from rtl_plugin.adapters import Adapter, GenericAdapter, create_adapter, detect_adapter
from rtl_plugin.errors import TicketError
from rtl_plugin.routed import RoutedModel
from rtl_plugin.persist.export import probe_channel_export
from rtl_plugin.space import build_space, model_label
from rtl_plugin.training.distributed import check_not_sharded


def resolve_adapter(model: nn.Module, adapter: str | Adapter = "auto") -> Adapter:
    if isinstance(adapter, Adapter):
        return adapter
    if adapter == "auto":
        return detect_adapter(model)
    return create_adapter(adapter)


def wrap(model: nn.Module, num_tickets: int, *, example_inputs=None, granularity: str = "weight",
         adapter: str | Adapter = "auto", output_layers: Sequence[str] | None = None,
         ignored_layers: Sequence[str | nn.Module] = (), shared_norm: bool = False,
         customized_pruners: dict | None = None, cache_masked_weights: bool | int = True, num_heads: dict | None = None,
         graph_timeout: float = 120.0, check_export: bool = True, execution: str = "auto") -> RoutedModel:
    """Wrap ``model`` into a RoutedModel with ``num_tickets`` all-ones tickets.

    Args:
        model: a timm classifier, an smp model, the audio U-Net, or any model torch-pruning can trace.
        num_tickets: K >= 1.
        example_inputs: tracing input, e.g. ``torch.randn(1, 3, 32, 32)`` (default: the adapter's guess).
        granularity: "weight" (element masks, the paper) or "channel" (exportable as smaller models).
        adapter: "auto" (detect), a registered name ("timm", "smp", "audio", "generic") or an Adapter.
        output_layers: override the adapter's output layers (never pruned).
        ignored_layers: further layers never pruned.
        shared_norm: one set of norm statistics for all tickets (the paper); default per-ticket.
        cache_masked_weights: weight mode, True / False / an int bound in ticket copies (``RoutedModel``).
        execution: weight mode, "auto" / "grouped" / "bucketed" (``RoutedModel.execution``).
        num_heads: channel mode, ``{q/k/v or fused qkv layer: heads}`` added to the adapter's (timm attention
            is found by itself); tickets keep or drop whole heads.
        graph_timeout: channel mode, seconds allowed for torch-pruning's graph and group building; past it
            GraphTimeoutError names the model and granularity="weight".
        check_export: channel mode, export one random ticket and compare it with the routed ticket, so a model
            whose physical pruning cannot reproduce its masks is refused here (UnsupportedLayerError naming
            the first diverging layer) rather than at export time.

    Raises DistributedError for a model wrapped in DDP/DataParallel/FSDP: pass the plain model (under
    torchrun, find_tickets and joint_retrain run data-parallel by themselves).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    check_not_sharded(model)  # DDP/FSDP-wrapped models: DistributedError naming the fix
    if not isinstance(num_tickets, int) or isinstance(num_tickets, bool) or num_tickets < 1:
        raise TicketError(f"num_tickets must be a positive int, got {num_tickets!r}.")
    ad = resolve_adapter(model, adapter)
    ad.prepare(model)
    if example_inputs is None:
        example_inputs = ad.example_inputs(model)
    try:
        dev = next(model.parameters()).device
        example_inputs = example_inputs.to(dev) if hasattr(example_inputs, "to") else example_inputs
    except StopIteration:
        pass
    if output_layers is None:
        output_layers = (ad.output_layers_for(model, example_inputs) if isinstance(ad, GenericAdapter)
                         else ad.output_layers(model))
    heads = {**ad.attention_heads(model), **(num_heads or {})} if granularity == "channel" else num_heads
    space = build_space(model, ad.trace_inputs(model, example_inputs), granularity=granularity,
                        output_layers=output_layers, ignored_layers=ignored_layers,
                        customized_pruners=customized_pruners, trace_root=ad.trace_root(model),
                        num_heads=_unignored_heads(heads, model, ignored_layers, output_layers),
                        graph_timeout=graph_timeout)
    routed = RoutedModel(model, space, num_tickets=num_tickets, shared_norm=shared_norm,
                         cache_masked_weights=cache_masked_weights, execution=execution)
    if granularity == "channel" and check_export:
        probe_channel_export(routed, check_inputs=example_inputs, label=model_label(model))
    return routed


def _unignored_heads(heads: dict | None, model: nn.Module, ignored_layers, output_layers) -> dict | None:
    """Drop adapter-found attention layers the user excluded (their heads are then not pruned at all)."""
    if not heads:
        return heads
    names = {m: n for n, m in model.named_modules()}
    excluded = [names.get(x, x) if isinstance(x, nn.Module) else x for x in (*ignored_layers, *(output_layers or ()))]
    keep = {}
    for k, h in heads.items():
        name = names.get(k, k) if isinstance(k, nn.Module) else k
        if not any(name == e or name.startswith(e + ".") for e in excluded):
            keep[k] = h
    return keep
