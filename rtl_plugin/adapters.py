"""Model-family adapters: a decorator registry plus a string factory (like timm's register_model/create_model).

An adapter tells rtl-plugin, for one model family, which layers are outputs (never pruned), what a
tracing input looks like, and which submodule to trace. Families live in ``rtl_plugin.integrations``.
"""
from __future__ import annotations

import abc
import importlib
from typing import Callable

import torch
import torch.nn as nn

from rtl_plugin import _tp
from rtl_plugin.errors import SpaceError
from rtl_plugin.registry import Registry

_FAMILY_MODULES = ("timm", "smp", "audio")


class Adapter(abc.ABC):
    """Base adapter. Subclasses implement ``matches`` and override ``output_layers`` / ``example_inputs``."""
    name = "base"
    priority = 0  # higher wins when several adapters match

    @abc.abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """True when this adapter handles ``model``."""

    def output_layers(self, model: nn.Module) -> list[str]:
        return []

    def example_inputs(self, model: nn.Module) -> torch.Tensor:
        raise SpaceError(f"adapter {self.name!r} cannot guess an input for {type(model).__name__}; pass example_inputs=.")

    def trace_root(self, model: nn.Module) -> str:
        """Submodule to trace with torch-pruning ("" = the whole model)."""
        return ""

    def trace_inputs(self, model: nn.Module, example_inputs):
        """Tracing input for ``trace_root`` given the user's example input."""
        return example_inputs

    def prepare(self, model: nn.Module) -> None:
        """Hook to normalise a model before tracing (default: nothing)."""

    def attention_heads(self, model: nn.Module) -> dict[str, int]:
        """``{q/k/v or fused qkv layer name: number of heads}`` the family knows (channel tickets then keep whole
        heads); default none."""
        return {}


_ADAPTERS: Registry[type[Adapter]] = Registry("adapter", SpaceError, set_name=True)


def register_adapter(name: str) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator: ``@register_adapter("timm")``."""
    return _ADAPTERS.register(name)


def _load_families() -> None:
    for fam in _FAMILY_MODULES:
        try:
            importlib.import_module(f"rtl_plugin.integrations.{fam}")
        except ImportError:
            pass  # family library not installed: its adapter simply is not available


def list_adapters() -> list[str]:
    _load_families()
    return _ADAPTERS.names()


def create_adapter(name: str) -> Adapter:
    """Adapter instance by registered name (e.g. "timm", "smp", "audio", "generic")."""
    _load_families()
    return _ADAPTERS.get(name)()


def detect_adapter(model: nn.Module) -> Adapter:
    """The highest-priority registered adapter that matches ``model`` (falls back to "generic")."""
    _load_families()
    found = [a for a in (cls() for cls in _ADAPTERS.values() if cls is not GenericAdapter) if a.matches(model)]
    if not found:
        return GenericAdapter()
    return max(found, key=lambda a: a.priority)


@register_adapter("generic")
class GenericAdapter(Adapter):
    """Any traceable nn.Module: the last conv/linear executed on the example input is the output layer."""

    def matches(self, model: nn.Module) -> bool:
        return True

    def output_layers_for(self, model: nn.Module, example_inputs) -> list[str]:
        order: list[str] = []
        handles = []
        for n, m in model.named_modules():
            if _tp.is_prunable_weight_layer(m):
                handles.append(m.register_forward_hook(lambda mod, i, o, n=n: order.append(n)))
        was = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(*(example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)))
        except Exception as e:
            raise SpaceError(f"the model failed on example_inputs ({type(e).__name__}: {e}); pass an input that "
                             "matches its forward(), e.g. torch.randn(1, 3, 32, 32).") from e
        finally:
            model.train(was)
            for h in handles:
                h.remove()
        return order[-1:]
