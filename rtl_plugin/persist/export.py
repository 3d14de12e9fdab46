"""Export one ticket as a plain ``nn.Module``, checked against the routed ticket it comes from.

Channel granularity: a physically smaller model (torch-pruning pruning-history replay on a deep copy),
carrying that ticket's norm statistics. Weight granularity: a dense copy with the mask applied.

Every export is verified: the exported module and ``routed(x, route=k)`` run on the same inputs (eval mode)
and must agree within ``tol`` relative to the largest output magnitude (default 1e-4 in float32; physically
smaller layers only sum in another order, which stays below 1e-5 on every model of the coverage sweep, while
a wrongly pruned channel shows up at 1e-3 or more). An export that cannot run, or that differs, raises
:class:`~rtl_plugin.errors.ExportError` / :class:`~rtl_plugin.errors.ExportMismatchError` naming the first
layer whose outputs diverge.

Families register two kinds of export hooks (``register_export_hooks``): ``replace`` turns a module whose
forward re-derives its weight (timm's weight-standardised convs) into a plain layer carrying the weight it
computes, before pruning; ``fixup`` updates Python attributes that pruning cannot see (split sizes, head
counts) after pruning. ``load_package`` rebuilds slim tickets through the same path (``prune_copy``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from rtl_plugin import _tp
from rtl_plugin.errors import ExportError, RouteError, SpaceError, TicketError, UnsupportedLayerError
from rtl_plugin.persist.verify import default_check_inputs, rel_error, verify_export
from rtl_plugin.routed import RoutedModel
from rtl_plugin.tickets import TicketSet

_REPLACERS: list[Callable[[nn.Module], nn.Module | None]] = []
_FIXUPS: list[Callable[[nn.Module], None]] = []


def register_export_hooks(*, replace: Callable[[nn.Module], nn.Module | None] | None = None,
                          fixup: Callable[[nn.Module], None] | None = None) -> None:
    """Register ``replace(module) -> plain module | None`` (applied before channel pruning) and/or
    ``fixup(module)`` (applied to every module after pruning)."""
    for fn, what in ((replace, "replace"), (fixup, "fixup")):
        if fn is not None and not callable(fn):
            raise TypeError(f"{what} must be callable, got {type(fn).__name__}.")
    if replace is not None and replace not in _REPLACERS:
        _REPLACERS.append(replace)
    if fixup is not None and fixup not in _FIXUPS:
        _FIXUPS.append(fixup)


def _load_family_hooks() -> None:
    from rtl_plugin.adapters import list_adapters
    list_adapters()  # imports the installed families, which register their export hooks


def _replace_modules(model: nn.Module) -> None:
    for name, m in list(model.named_modules()):
        for fn in _REPLACERS:
            new = fn(m)
            if new is not None:
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, new)
                break


def prune_copy(base: nn.Module, trace_root: str, history: list, trace_inputs) -> nn.Module:
    """Physically prune ``base`` in place by replaying ``history`` (module replacements and fixups included)."""
    _load_family_hooks()
    _replace_modules(base)
    root = base.get_submodule(trace_root) if trace_root else base
    try:
        _tp.replay_history(_tp.build_graph(root, trace_inputs), history)
    except Exception as e:  # tp raises assorted errors on a history that does not fit the graph
        raise ExportError(f"replaying the ticket's pruning history failed ({type(e).__name__}: {e}): torch-pruning "
                          "cannot prune this pattern consistently (or, when loading, the model is not the "
                          "architecture the ticket space was built from). Use granularity='weight', put the block "
                          "in ignored_layers, or register a customized pruner.") from e
    for m in base.modules():
        for fn in _FIXUPS:
            fn(m)
    return base


def ticket_keep(routed: RoutedModel, ticket: int) -> dict[str, torch.Tensor]:
    """``{group root: BoolTensor[C_root]}``: the channels ticket ``ticket`` keeps once couplings are applied."""
    routed.tickets.check_index(ticket)
    return {g.root: g.effective_keep(routed.tickets.masks[g.root][ticket:ticket + 1])[0] for g in routed.space.groups}


def _check_no_empty_layer(routed: RoutedModel, ticket: int) -> None:
    for name, sides in routed.tickets.layer_channel_masks().items():
        for side, m in sides.items():
            if not bool(m[ticket].any()):
                raise TicketError(f"ticket {ticket} drops every {side}put channel of layer {name!r}; a physically "
                                  "pruned layer needs at least one channel. Keep >=1 channel of it in that ticket.")


def pruning_history(routed: RoutedModel, ticket: int) -> list:
    """``[[root_name, True, dropped_channel_idxs], ...]`` for ticket ``ticket`` (names relative to the traced root)."""
    if routed.granularity != "channel":
        raise SpaceError("pruning_history() needs a channel-granularity model; weight tickets are unstructured.")
    prefix = routed.space.trace_root + "." if routed.space.trace_root else ""
    hist = []
    for root, keep in ticket_keep(routed, ticket).items():
        dropped = (~keep).nonzero().flatten().tolist()
        if len(dropped) == keep.numel():
            raise TicketError(f"ticket {ticket} drops every channel of group {root!r}; a physically pruned layer "
                              "needs at least one channel. Keep >=1 channel per group.")
        if dropped:
            hist.append([root[len(prefix):] if prefix else root, True, dropped])
    _check_no_empty_layer(routed, ticket)
    return hist


def _zeros_like_space(routed: RoutedModel, root: nn.Module) -> torch.Tensor:
    if routed.space.example_input_shape is None:
        raise SpaceError("the ticket space has no example input shape; pass example_inputs= to export_ticket().")
    p = next(root.parameters())
    return torch.zeros(routed.space.example_input_shape, device=p.device, dtype=p.dtype)


def export_ticket(routed: RoutedModel, ticket: int, *, example_inputs=None, check_inputs=None, verify: bool = True,
                  tol: float | None = None) -> nn.Module:
    """A standalone model computing ticket ``ticket`` (same outputs as ``routed(x, route=ticket)``).

    Args:
        routed: the routed model.
        ticket: ticket id in [0, K).
        example_inputs: tracing input of the traced root for channel mode (default: zeros of the space's
            example shape).
        check_inputs: model-level input the export is verified on (default: a seeded random tensor of the
            space's example shape, or the adapter's example input when only a submodule was traced).
        verify: run the exported module against the routed ticket (cheap: one forward each). Turn it off only
            for inputs the model cannot take in eval mode.
        tol: allowed difference relative to max |output| (default 1e-4; 2e-2 for 16-bit models).
    Raises:
        ExportError (the export cannot be built or run), ExportMismatchError (it computes something else,
        naming the first diverging layer), TicketError (the ticket empties a layer).
    """
    if not isinstance(routed, RoutedModel):
        raise TypeError(f"export_ticket() needs a RoutedModel, got {type(routed).__name__}.")
    routed.tickets.check_index(ticket)
    if routed.granularity == "channel":
        hist = pruning_history(routed, ticket)  # validates the ticket before copying the model
    base = routed.plain_copy(ticket)
    if routed.granularity == "weight":
        masks = routed.tickets.masks
        with torch.no_grad():
            for name in routed.space.layers:
                w = base.get_submodule(name).weight
                w.mul_(masks[name][ticket].to(w.dtype))
    else:
        root = base.get_submodule(routed.space.trace_root) if routed.space.trace_root else base
        trace = _zeros_like_space(routed, root) if example_inputs is None else example_inputs
        prune_copy(base, routed.space.trace_root, hist, trace)
    if verify:
        verify_export(routed, ticket, base, check_inputs, tol=tol)
    return base


def _probe_mixed_routes(routed: RoutedModel, x: torch.Tensor, label: str) -> None:
    """A 2-sample batch routed to tickets 0 and 1 must equal each sample run alone with its ticket."""
    xb = torch.cat([x[:1], x[:1]])
    was = routed.training
    routed.eval()
    try:
        with torch.no_grad():
            y = routed(xb, route=torch.tensor([0, 1], device=xb.device))
            alone = [routed(xb[i:i + 1], route=i) for i in range(2)]
    except RouteError as e:
        raise UnsupportedLayerError(
            f"channel granularity cannot route {label} per sample: {e} Channel masks are applied per sample, and "
            "a layer that folds other dimensions (patches, tokens) into the batch breaks that. Use "
            "granularity='weight' (routes per sample by bucketing), or pass check_export=False and route one "
            "ticket per call.") from e
    finally:
        routed.train(was)
    err = max(rel_error(y[i:i + 1], alone[i]) for i in range(2))
    if err > 1e-4:
        raise UnsupportedLayerError(
            f"channel granularity routes {label} per sample incorrectly: a mixed batch differs from each sample "
            f"run alone by {err:.3g} (a layer mixes samples). Use granularity='weight', or pass "
            "check_export=False and route one ticket per call.")


def probe_channel_export(routed: RoutedModel, *, check_inputs=None, label: str = "the model", seeds=range(4)) -> None:
    """Export one random coupled ticket (keep 0.7) of a freshly wrapped channel model and verify it, and route
    a mixed two-ticket batch, so a model whose physical pruning cannot reproduce its masks, or that cannot be
    routed per sample, is refused at wrap time. The routed model's tickets are restored. Draws that would
    empty a layer are redrawn (up to ``len(seeds)`` draws)."""
    x = default_check_inputs(routed) if check_inputs is None else check_inputs
    original = routed.tickets
    try:
        for seed in seeds:
            routed.set_tickets(TicketSet.random(routed.space, routed.num_tickets, keep=0.7, seed=seed))
            try:
                pruning_history(routed, 0)
            except TicketError:
                continue  # this draw empties a small layer: draw again
            try:
                export_ticket(routed, 0, check_inputs=x)
            except ExportError as e:
                hint = (" For multi-head attention, pass wrap(..., num_heads={'<qkv layer>': heads}) so tickets "
                        "keep whole heads." if "attention" in str(e).lower() else "")
                raise UnsupportedLayerError(f"channel granularity cannot export {label} exactly: {e}{hint}") from e
            if routed.num_tickets > 1 and isinstance(x, torch.Tensor) and x.dim() > 0:
                _probe_mixed_routes(routed, x, label)
            return
    finally:
        routed.set_tickets(original)
