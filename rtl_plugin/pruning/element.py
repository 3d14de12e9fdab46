"""Weight granularity: element-level importance (magnitude, Taylor, random) and per-layer pruning counts."""
from __future__ import annotations

import torch

from rtl_plugin import _tp
from rtl_plugin.errors import ImportanceError

ELEMENT_KINDS = ("magnitude", "taylor", "random")


def check_element_importance(importance) -> str:
    """The kind of an importance usable per weight; ImportanceError for a channel-group-only criterion."""
    if importance is None:
        return "magnitude"
    kind = _tp.importance_kind(importance)
    if kind not in ELEMENT_KINDS:
        raise ImportanceError(
            f"{type(importance).__name__} ranks channel groups; weight granularity ranks single weights and accepts "
            "tp.importance.MagnitudeImportance / GroupMagnitudeImportance (|w|^p), TaylorImportance (|w * grad|) "
            "or RandomImportance. Use one of those, or granularity='channel' for this criterion.")
    return kind


def element_scores(weights: dict[str, torch.Tensor], importance, *, generator: torch.Generator | None = None
                   ) -> dict[str, torch.Tensor]:
    """Per-weight importance ``{layer: scores}`` (larger = keep); Taylor reads ``weight.grad``."""
    kind = check_element_importance(importance)
    out = {}
    for name, w in weights.items():
        w = w.detach()
        if kind == "magnitude":
            p = 1.0 if importance is None else _tp.magnitude_power(importance)
            out[name] = w.abs() if p == 1.0 else w.abs().pow(p)
        elif kind == "taylor":
            g = getattr(weights[name], "grad", None)
            if g is None:
                raise ImportanceError(f"TaylorImportance needs gradients but layer {name!r} has none; run "
                                      "loss.backward() on the current ticket's data (routed(x, route=k)) before "
                                      "pruner.step() (find_tickets does this with importance_batches).")
            out[name] = (w * g.detach()).abs()
        else:
            out[name] = torch.rand(w.shape, generator=generator).to(w.device)
    return out


def prune_weights_per_layer(masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
                            counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """Drop ``counts[layer]`` lowest-scoring surviving weights of each layer (in place; ties by position)."""
    for name, n in counts.items():
        if n <= 0:
            continue
        m = masks[name]
        idx = m.nonzero(as_tuple=True)
        drop = torch.argsort(scores[name][idx].float(), stable=True)[:n]
        m[tuple(i[drop] for i in idx)] = False
    return masks
