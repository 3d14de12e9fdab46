"""timm adapter: any timm classifier; the classifier from ``get_classifier()`` is never pruned."""
from __future__ import annotations

import torch
import torch.nn as nn

from rtl_plugin.adapters import Adapter, register_adapter


def is_timm_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and hasattr(model, "get_classifier")


@register_adapter("timm")
class TimmAdapter(Adapter):
    priority = 10

    def matches(self, model: nn.Module) -> bool:
        return is_timm_model(model)

    def output_layers(self, model: nn.Module) -> list[str]:
        head = model.get_classifier()
        names = {m: n for n, m in model.named_modules()}
        if isinstance(head, nn.Module) and head in names and any(True for _ in head.parameters()):
            return [names[head]]
        return []

    def example_inputs(self, model: nn.Module) -> torch.Tensor:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        c, h, w = cfg.get("input_size", (3, 224, 224))
        h, w = min(h, 64), min(w, 64)  # small trace input: channel structure does not depend on resolution
        return torch.randn(1, c, h, w)
