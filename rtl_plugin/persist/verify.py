"""Check an exported ticket against the routed ticket it came from, and localise where they diverge."""
from __future__ import annotations

import torch
import torch.nn as nn

from rtl_plugin.errors import ExportError, ExportMismatchError, SpaceError
from rtl_plugin.routed import RoutedModel

DEFAULT_TOL = 1e-4        # float32 / float64: relative to max |output|
HALF_TOL = 2e-2           # float16 / bfloat16 models


def default_check_inputs(routed: RoutedModel) -> torch.Tensor:
    """A seeded random model-level input: the space's example shape, or the adapter's example input when the
    space traced a submodule (its example shape is then not the model's input)."""
    p = next(routed.model.parameters())
    g = torch.Generator().manual_seed(0)
    if routed.space.trace_root or routed.space.example_input_shape is None:
        from rtl_plugin.adapters import detect_adapter
        try:
            x = detect_adapter(routed.model).example_inputs(routed.model)
        except SpaceError as e:
            raise SpaceError(f"cannot guess an input to verify the export ({e}); pass check_inputs=.") from e
        return x.to(p.device)
    x = torch.randn(routed.space.example_input_shape, generator=g)
    return x.to(p.device, p.dtype if p.is_floating_point() else torch.float32)


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flat(out[k])]
    return []


def rel_error(got, want) -> float:
    """max |got - want| / max |want| over all output tensors (inf when the structures differ)."""
    g, w = _flat(got), _flat(want)
    if len(g) != len(w) or any(a.shape != b.shape for a, b in zip(g, w)):
        return float("inf")
    err, scale = 0.0, 0.0
    for a, b in zip(g, w):
        if b.numel():
            err = max(err, float((a.double() - b.double()).abs().max()))
            scale = max(scale, float(b.double().abs().max()))
    return err / max(scale, 1e-12)


def _record(model: nn.Module, names: dict[nn.Module, str], store: dict, order: list):
    def hook(mod, inputs, output):
        n = names[mod]
        if n not in store and isinstance(output, torch.Tensor):
            store[n] = output.detach()
            order.append(n)
    return [m.register_forward_hook(hook) for m in names]


def _aligned(full: torch.Tensor, slim: torch.Tensor, keep: torch.Tensor | None,
             by_size: dict[tuple[int, int], torch.Tensor | None]) -> torch.Tensor | None:
    """``full`` restricted to the channels ``slim`` kept: one differing dim, whose size is the layer's own out
    mask, or else the one channel mask of the ticket with those sizes (parameter-free layers have no mask)."""
    if full.shape == slim.shape:
        return full
    if full.dim() != slim.dim():
        return None
    diff = [d for d in range(full.dim()) if full.shape[d] != slim.shape[d]]
    if len(diff) != 1:
        return None
    sizes = (full.shape[diff[0]], slim.shape[diff[0]])
    if keep is None or (keep.numel(), int(keep.sum())) != sizes:
        keep = by_size.get(sizes)
    return None if keep is None else full.index_select(diff[0], keep.nonzero().flatten().to(full.device))


def _masks_by_size(masks: list[torch.Tensor]) -> dict[tuple[int, int], torch.Tensor | None]:
    """``{(channels, kept): mask}`` for sizes with one distinct mask (None where masks of those sizes differ)."""
    out: dict[tuple[int, int], torch.Tensor | None] = {}
    for m in masks:
        key = (m.numel(), int(m.sum()))
        if key not in out:
            out[key] = m
        elif out[key] is not None and not torch.equal(out[key], m):
            out[key] = None
    return out


def first_divergence(routed: RoutedModel, ticket: int, exported: nn.Module, x, tol: float) -> str | None:
    """``"layer (Type): relative error"`` of the first leaf module (in the exported model's execution order)
    whose output differs from the routed ticket's, or None when no layer output can be compared."""
    leaf = lambda m: next(iter(m.children()), None) is None  # noqa: E731
    r_names = {m: n for n, m in routed.model.named_modules() if n and leaf(m)}
    e_names = {m: n for n, m in exported.named_modules() if n and leaf(m)}
    r_out, e_out, r_order, e_order = {}, {}, [], []
    handles = _record(routed.model, r_names, r_out, r_order) + _record(exported, e_names, e_out, e_order)
    try:
        with torch.no_grad():
            routed(x, route=ticket)
            exported(x)
    except Exception:  # localisation is best effort; the caller already has the error to report
        return None
    finally:
        for h in handles:
            h.remove()
    out_masks, by_size = {}, {}
    if routed.granularity == "channel":
        layer_masks = routed.tickets.layer_channel_masks()
        out_masks = {n: s["out"][ticket] for n, s in layer_masks.items() if "out" in s}
        by_size = _masks_by_size([m[ticket] for s in layer_masks.values() for m in s.values()])
    for n in e_order:
        if n not in r_out:
            continue
        want = _aligned(r_out[n], e_out[n], out_masks.get(n), by_size)
        if want is None:
            continue
        err = rel_error(e_out[n], want)
        if err > tol:
            kind = type(dict(exported.named_modules())[n]).__name__
            return f"{n!r} ({kind}): relative error {err:.3g}"
    return None


def failing_layer(model: nn.Module, x) -> str | None:
    """``"'name' (Type)"`` of the innermost module whose forward raises on ``x`` (``<Type>`` for the model's own
    forward), or None."""
    names = {m: repr(n) if n else f"<{type(m).__name__}>" for n, m in model.named_modules()}
    stack: list[nn.Module] = []
    failed: list[nn.Module] = []

    def pre(mod, args):
        stack.append(mod)

    def post(mod, args, out):
        stack.pop()

    handles = [h for m in names for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with torch.no_grad():
            model(x)
    except Exception:  # the failure is the point: remember where it happened
        failed = stack[-1:]
    finally:
        for h in handles:
            h.remove()
    if not failed:
        return None
    return names[failed[0]] + ("" if failed[0] is model else f" ({type(failed[0]).__name__})")


def _tolerance(model: nn.Module, tol: float | None) -> float:
    if tol is not None:
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
            raise SpaceError(f"tol must be a positive number, got {tol!r}.")
        return float(tol)
    p = next(model.parameters(), None)
    return HALF_TOL if p is not None and p.dtype in (torch.float16, torch.bfloat16) else DEFAULT_TOL


def verify_export(routed: RoutedModel, ticket: int, exported: nn.Module, check_inputs=None, *,
                  tol: float | None = None) -> float:
    """Run ``exported`` and ``routed(x, route=ticket)`` in eval mode on ``check_inputs``; returns the relative
    error. Raises ExportError when the exported module fails to run, ExportMismatchError beyond ``tol``."""
    tol = _tolerance(routed.model, tol)
    x = default_check_inputs(routed) if check_inputs is None else check_inputs
    was_r, was_e = routed.training, exported.training
    routed.eval()
    exported.eval()
    try:
        with torch.no_grad():
            want = routed(x, route=ticket)
            try:
                got = exported(x)
            except Exception as e:  # any failure of the exported module is an export failure
                where = failing_layer(exported, x) or "not localised"
                raise ExportError(f"the exported ticket {ticket} cannot run: layer {where} raises {type(e).__name__}: "
                                  f"{e}. Pruning left it inconsistent with its neighbours (a coupling torch-pruning "
                                  "does not see, e.g. a split whose chunk sizes are Python attributes). Use "
                                  "granularity='weight', put that layer or its block in ignored_layers, or register a "
                                  "customized pruner for it.") from e
        err = rel_error(got, want)
        if err > tol:
            where = first_divergence(routed, ticket, exported, x, tol)
            raise ExportMismatchError(
                f"the exported ticket {ticket} differs from routed(x, route={ticket}) by {err:.3g} (relative, "
                f"tolerance {tol:g}); first diverging layer: {where or 'not localised'}. The physical pruning does "
                "not reproduce the ticket's masks there: use granularity='weight', put that layer in ignored_layers, "
                "or register a customized pruner for it.")
        return err
    finally:
        routed.train(was_r)
        exported.train(was_e)
