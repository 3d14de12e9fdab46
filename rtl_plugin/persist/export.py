"""Export one ticket as a plain ``nn.Module``.

Channel granularity: a physically smaller model (torch-pruning pruning-history replay on a deep copy),
carrying that ticket's norm statistics. Weight granularity: a dense copy with the mask applied.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from rtl_plugin import _tp
from rtl_plugin.errors import SpaceError, TicketError
from rtl_plugin.routed import RoutedModel


def pruning_history(routed: RoutedModel, ticket: int) -> list:
    """``[[root_name, True, dropped_channel_idxs], ...]`` for ticket ``ticket`` (names relative to the traced root)."""
    if routed.granularity != "channel":
        raise SpaceError("pruning_history() needs a channel-granularity model; weight tickets are unstructured.")
    routed.tickets.check_index(ticket)
    prefix = routed.space.trace_root + "." if routed.space.trace_root else ""
    hist = []
    for g in routed.space.groups:
        keep = routed.tickets.masks[g.root][ticket]
        dropped = (~keep).nonzero().flatten().tolist()
        if len(dropped) == g.size:
            raise TicketError(f"ticket {ticket} drops every channel of group {g.root!r}; a physically pruned layer "
                              "needs at least one channel. Keep >=1 channel per group.")
        if dropped:
            hist.append([g.root[len(prefix):] if prefix else g.root, True, dropped])
    return hist


def export_ticket(routed: RoutedModel, ticket: int, *, example_inputs=None) -> nn.Module:
    """A standalone model computing ticket ``ticket`` (same outputs as ``routed(x, route=ticket)``).

    Args:
        routed: the routed model.
        ticket: ticket id in [0, K).
        example_inputs: tracing input for channel mode (default: zeros of the space's example shape).
    """
    if not isinstance(routed, RoutedModel):
        raise TypeError(f"export_ticket() needs a RoutedModel, got {type(routed).__name__}.")
    routed.tickets.check_index(ticket)
    base = routed.plain_copy(ticket)
    if routed.granularity == "weight":
        masks = routed.tickets.masks
        with torch.no_grad():
            for name in routed.space.layers:
                w = base.get_submodule(name).weight
                w.mul_(masks[name][ticket].to(w.dtype))
        return base
    hist = pruning_history(routed, ticket)
    root = base.get_submodule(routed.space.trace_root) if routed.space.trace_root else base
    if example_inputs is None:
        if routed.space.example_input_shape is None:
            raise SpaceError("the ticket space has no example input shape; pass example_inputs= to export_ticket().")
        p = next(root.parameters())
        example_inputs = torch.zeros(routed.space.example_input_shape, device=p.device, dtype=p.dtype)
    dg = _tp.build_graph(root, example_inputs)
    _tp.replay_history(dg, hist)
    return base

