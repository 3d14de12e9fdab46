"""Gradients for importance criteria that need them (Taylor, Hessian): estimated on ticket k's own data through
the routed model, then carried onto the plain models torch-pruning ranks."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from rtl_plugin import _tp
from rtl_plugin.errors import DataError, ImportanceError

GRADIENT_KINDS = ("taylor", "hessian")


def needs_gradients(importance) -> bool:
    return importance is not None and _tp.importance_kind(importance) in GRADIENT_KINDS


def check_channel_importance(importance) -> None:
    """Refuse criteria that must hook the pruned model itself (tp's ActivationImportance, OBDCImportance)."""
    if importance is None:
        return
    if not callable(importance):
        raise ImportanceError(f"importance must be a torch-pruning importance (a callable per group), got "
                              f"{type(importance).__name__}.")
    kind = _tp.importance_kind(importance)
    if kind in ("activation", "obdc"):
        raise ImportanceError(
            f"{type(importance).__name__} records activations with hooks on the model it prunes, but RTL ranks "
            "each ticket on a plain copy; use GroupMagnitudeImportance, GroupTaylorImportance, "
            "GroupHessianImportance, BNScaleImportance, LAMPImportance, FPGMImportance or RandomImportance.")


def estimate_gradients(routed, k: int, loader, *, importance, loss_fn: Callable | None = None, batches: int = 4,
                       device=None) -> int:
    """Accumulate ``∂loss/∂w`` of ticket k on up to ``batches`` ``(x, y)`` batches of its loader into the shared
    weights' ``.grad`` (Hessian: squared, per batch, through ``importance.accumulate_grad``). Returns the
    number of batches used."""
    if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
        raise DataError(f"importance_batches must be a positive int, got {batches!r}.")
    loss_fn = loss_fn or F.cross_entropy
    hessian = _tp.importance_kind(importance) == "hessian"
    was = routed.training
    routed.eval()  # the statistics of ticket k's norms are not updated by the estimate
    routed.zero_grad(set_to_none=True)
    used = 0
    try:
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise DataError("gradient importances (Taylor, Hessian) estimate gradients on (x, y) batches with "
                                "loss_fn; give loaders of (x, y) batches or use a magnitude importance.")
            x, y = batch[0], batch[1]
            if device is not None:
                x, y = x.to(device), y.to(device)
            if hessian:
                routed.zero_grad(set_to_none=True)
            loss_fn(routed(x, route=k), y).backward()
            if hessian:
                importance.accumulate_grad(routed)
            used += 1
            if used >= batches:
                break
    finally:
        routed.train(was)
    if used == 0:
        raise DataError(f"subset {k} yielded no batch for the importance gradients; every ticket needs data.")
    return used


def copy_gradients(routed, plain: nn.Module) -> None:
    """Give ``plain`` (a plain copy of ``routed.model``) the shared weights' gradients, parameter by name."""
    own = dict(plain.named_parameters())
    for name, p in routed.model.named_parameters():
        q = own.get(name)
        if q is not None and p.grad is not None and q.shape == p.shape:
            q.grad = p.grad.detach().clone()


def require_gradients(routed, importance) -> None:
    """ImportanceError when a gradient criterion is about to rank weights that carry no gradient."""
    if needs_gradients(importance) and all(p.grad is None for p in routed.model.parameters()):
        raise ImportanceError(
            f"{type(importance).__name__} needs gradients of ticket k's loss; run loss.backward() on its data "
            "(routed(x, route=k)) before pruner.step() (Hessian: importance.accumulate_grad(routed) per batch), or "
            "let find_tickets estimate them (importance_batches=).")
