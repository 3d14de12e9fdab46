"""``rtl.wrap``: one call from any supported model to a RoutedModel."""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from rtl_plugin.adapters import Adapter, GenericAdapter, create_adapter, detect_adapter
from rtl_plugin.errors import TicketError
from rtl_plugin.routed import RoutedModel
from rtl_plugin.space import build_space
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
         customized_pruners: dict | None = None, cache_masked_weights: bool = True) -> RoutedModel:
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
    space = build_space(model, ad.trace_inputs(model, example_inputs), granularity=granularity,
                        output_layers=output_layers, ignored_layers=ignored_layers,
                        customized_pruners=customized_pruners, trace_root=ad.trace_root(model))
    return RoutedModel(model, space, num_tickets=num_tickets, shared_norm=shared_norm,
                       cache_masked_weights=cache_masked_weights)
