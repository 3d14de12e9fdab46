"""A timm classifier started from the user's checkpoint file, the way timm loads local weights.

``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=FILE))`` reads a safetensors file
or a weights-only torch file (``torch.load(weights_only=True)``; ``state_dict`` / ``model`` / EMA entries and
``module.`` prefixes are unwrapped by timm), applies the model's own checkpoint filter and loads strictly. The
model is first built with the checkpoint's class count, so a mismatch of any other tensor means the file is for
another architecture; then, when the data has another number of classes, the classifier is reset to it
(``model.reset_classifier``, a fresh initialisation drawn from the seed).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from rtl_plugin.errors import ArchitectureMismatchError, CorruptFileError, DataError, MissingDependencyError

__all__ = ["CheckpointInfo", "inspect_checkpoint", "create_from_checkpoint"]


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint holds for ``model``: its file, the classifier key and its class count (None when the
    file has no classifier: a backbone-only checkpoint)."""
    file: str
    classifier: str
    num_classes: int | None
    num_tensors: int

    def head_message(self, data_classes: int) -> str:
        """One line for the user: the classifier is kept, reset, or new."""
        if self.num_classes is None:
            return (f"checkpoint {self.file}: backbone weights loaded; it has no classifier, so a new "
                    f"{data_classes}-class classifier is initialised")
        if self.num_classes != data_classes:
            return (f"checkpoint {self.file}: classifier reset from {self.num_classes} to the data's {data_classes} "
                    "classes (fresh initialisation); every other tensor is loaded")
        return f"checkpoint {self.file}: all weights loaded, including its {data_classes}-class classifier"

    def to_dict(self) -> dict:
        return {"file": self.file, "classifier": self.classifier, "num_classes": self.num_classes,
                "num_tensors": self.num_tensors}


def _timm():
    try:
        import timm
    except ImportError as e:
        raise MissingDependencyError('timm is required: pip install "rtl-plugin[timm]"') from e
    return timm


def _classifier_key(name: str) -> str:
    cfg = _timm().models.get_pretrained_cfg(name)
    head = getattr(cfg, "classifier", None) if cfg is not None else None
    if isinstance(head, (tuple, list)):
        head = head[0]
    return head or "fc"


def inspect_checkpoint(name: str, file) -> CheckpointInfo:
    """Read ``file`` (safetensors or weights-only torch) for timm model ``name`` and report its classifier."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist; pass a .safetensors or .pth/.pt weights file.")
    from timm.models import load_state_dict
    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is one answer: this file cannot be read as weights
        raise CorruptFileError(f"cannot read checkpoint {path} as weights ({type(e).__name__}: {str(e)[:200]}); "
                               "save it with safetensors.torch.save_file(model.state_dict(), FILE) or "
                               "torch.save(model.state_dict(), FILE) (tensors only, no pickled objects).") from e
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptFileError(f"checkpoint {path} holds no state dict of tensors; save model.state_dict().")
    key = _classifier_key(name)
    w = state.get(f"{key}.weight")
    classes = int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() >= 1 else None
    return CheckpointInfo(str(path.resolve()), key, classes, len(state))


def create_from_checkpoint(name: str, info: CheckpointInfo, *, num_classes: int, in_chans: int = 3,
                           seed: int = 0) -> nn.Module:
    """timm model ``name`` with ``info.file``'s weights and a ``num_classes`` classifier (reset when the
    checkpoint's differs); ``in_chans != 3`` adapts the first convolution as timm does for pretrained weights."""
    timm = _timm()
    head = info.num_classes if info.num_classes is not None else num_classes
    overlay = {"file": info.file, "num_classes": info.num_classes if info.num_classes is not None else -1}
    torch.manual_seed(seed)
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=head,
                                  in_chans=in_chans)
    except RuntimeError as e:
        raise ArchitectureMismatchError(
            f"checkpoint {info.file} does not fit timm:{name} ({_first_lines(e)}); it was saved from another "
            f"architecture: pass the --model it was trained as (timm:NAME) or the matching checkpoint.") from e
    if info.num_classes is None:
        _check_backbone(model, info, name)
    elif head != num_classes:
        torch.manual_seed(seed)
        model.reset_classifier(num_classes)
    return model


def _check_backbone(model: nn.Module, info: CheckpointInfo, name: str) -> None:
    """A classifier-less checkpoint is loaded non-strictly by timm: every other tensor must have been in it."""
    from timm.models import load_state_dict
    have = set(load_state_dict(info.file, weights_only=True))
    want = {k for k in model.state_dict() if not k.startswith(info.classifier + ".")
            and not k.endswith("num_batches_tracked")}
    missing = sorted(want - have)
    if missing:
        raise ArchitectureMismatchError(
            f"checkpoint {info.file} lacks {len(missing)} tensors of timm:{name} (e.g. {missing[:3]}); it was saved "
            "from another architecture: pass the --model it was trained as.")


def _first_lines(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")
