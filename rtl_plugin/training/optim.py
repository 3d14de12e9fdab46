"""The one optimizer convention: ``optimizer=`` is an optimizer INSTANCE over ``routed.parameters()``; where fresh
state is needed (per ticket, per pruning round) its configuration (class + param-group hyper-parameters) is cloned.
Factories (``params -> optimizer``) are accepted for one version with a DeprecationWarning."""
from __future__ import annotations

import inspect
import warnings
from typing import Callable

import torch

from rtl_plugin.errors import OptimizerError


def clone_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A fresh optimizer of the same class and hyper-parameters over the same parameters (empty state); for a
    TicketOptimizer, a clone of the torch optimizer it wraps.

    Hyper-parameters travel in the param groups; only constructor arguments the class accepts are passed
    (e.g. AdamW's ``defaults`` hold keys its constructor rejects).
    """
    from rtl_plugin.training.ticket_optimizer import TicketOptimizer  # here: that module imports this one
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise OptimizerError(f"clone_optimizer needs a torch.optim.Optimizer instance, got {type(optimizer).__name__}.")
    if isinstance(optimizer, TicketOptimizer):
        optimizer = optimizer.base  # a clone of the configuration it wraps
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"])}
              for g in optimizer.param_groups]
    try:
        accepted = set(inspect.signature(type(optimizer).__init__).parameters)
    except (TypeError, ValueError):
        accepted = set()
    kw = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return type(optimizer)(groups, **kw)


def check_optimizer(routed, optimizer, *, what: str = "optimizer") -> torch.optim.Optimizer:
    """``optimizer`` if it is a ``torch.optim.Optimizer`` whose parameters all belong to ``routed``."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise OptimizerError(f"{what} must be a torch.optim.Optimizer built over routed.parameters() (e.g. "
                             f"torch.optim.Adam(routed.parameters(), lr=1e-3)), got {type(optimizer).__name__}.")
    own = {id(p) for p in routed.parameters()}
    if any(id(p) not in own for g in optimizer.param_groups for p in g["params"]):
        raise OptimizerError(f"{what} holds parameters that are not the routed model's, so training would not "
                             "change the model; build it over routed.parameters().")
    return optimizer


def fresh_optimizers(routed, optimizer=None, optimizer_factory: Callable | None = None, *,
                     default_lr: float = 1e-3) -> Callable[[], torch.optim.Optimizer]:
    """A zero-argument callable giving a fresh optimizer each call.

    ``optimizer``: an instance over ``routed.parameters()``, cloned at every call (its own state is never
    used); ``optimizer_factory``: the deprecated ``params -> optimizer`` (called on the trainable parameters);
    neither: Adam(``default_lr``) over the trainable parameters. The caller warns about the factory.
    """
    if optimizer is not None and optimizer_factory is not None:
        raise OptimizerError("pass optimizer= (an optimizer instance, cloned per round) or the deprecated "
                             "optimizer_factory=, not both.")
    if optimizer is not None:
        template = check_optimizer(routed, optimizer)
        return lambda: clone_optimizer(template)
    if optimizer_factory is not None:
        if not callable(optimizer_factory):
            raise OptimizerError(f"optimizer_factory must be callable (params -> optimizer), got "
                                 f"{type(optimizer_factory).__name__}; better pass optimizer=<an optimizer instance>.")
        return lambda: optimizer_factory([p for p in routed.parameters() if p.requires_grad])
    return lambda: torch.optim.Adam([p for p in routed.parameters() if p.requires_grad], lr=default_lr)


def warn_factory_deprecated(stacklevel: int = 3) -> None:
    warnings.warn("optimizer_factory= is deprecated; pass optimizer=<an optimizer instance over "
                  "routed.parameters()> instead (its configuration is cloned per ticket and round).",
                  DeprecationWarning, stacklevel=stacklevel)
