"""segmentation_models_pytorch adapter: any smp model (Unet with any encoder); heads are never pruned.

Works with a frozen encoder (``model.encoder.requires_grad_(False)``): tracing forces requires_grad.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from rtl_plugin.adapters import Adapter, register_adapter

import segmentation_models_pytorch as smp  # noqa: E402  (ImportError => adapter unavailable)


@register_adapter("smp")
class SmpAdapter(Adapter):
    priority = 20  # smp models may wrap timm encoders: prefer this adapter

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, smp.base.SegmentationModel)

    def output_layers(self, model: nn.Module) -> list[str]:
        return [n for n in ("segmentation_head", "classification_head") if getattr(model, n, None) is not None]

    def example_inputs(self, model: nn.Module) -> torch.Tensor:
        c = getattr(model.encoder, "_in_channels", 3)
        return torch.randn(1, c, 64, 64)

    def attention_heads(self, model: nn.Module) -> dict[str, int]:
        from rtl_plugin.integrations.timm import timm_attention_heads
        return timm_attention_heads(model)  # timm ("tu-") encoders with multi-head attention
