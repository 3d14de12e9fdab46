"""Save / load a RoutedModel: safetensors for tensors + a JSON manifest. No pickle, atomic writes, versioned.

Folder layout::

    manifest.json        format, format_version, fingerprint, granularity, K, space, sha256 of each file
    weights.safetensors  the wrapped model's state dict (routed norms hold [K, C] statistics)
    masks.safetensors    bit-packed masks, one uint8 tensor per mask key

The manifest is read, written and validated by :mod:`rtl_plugin.persist.manifest` (kind ``MODEL``).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from rtl_plugin.errors import ArchitectureMismatchError, CorruptFileError, TicketError
from rtl_plugin.persist.atomic import atomic_write_bytes, atomic_write_json, atomic_write_npz
from rtl_plugin.persist.cache import default_cache_dir, write_cache_npz
from rtl_plugin.persist.manifest import (MODEL, check_fingerprint, read_verified, sha256, tensors_from_bytes,
                                         tensors_to_bytes, write_manifest)
from rtl_plugin.persist.manifest import read_manifest as read_manifest_file
from rtl_plugin.routed import RoutedModel
from rtl_plugin.space import TicketSpace
from rtl_plugin.tickets import TicketSet

FORMAT = MODEL.format
FORMAT_VERSION = MODEL.version
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
MASKS = "masks.safetensors"


def save(routed: RoutedModel, path, *, extra: dict | None = None) -> Path:
    """Save ``routed`` (a RoutedModel) to the folder ``path``; returns the folder."""
    if not isinstance(routed, RoutedModel):
        raise TypeError(f"save() needs a RoutedModel, got {type(routed).__name__}.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    w_bytes = tensors_to_bytes(routed.model.state_dict())
    m_bytes = tensors_to_bytes({k: torch.from_numpy(v) for k, v in routed.tickets.packed().items()})
    body = {
        "fingerprint": routed.space.fingerprint,
        "granularity": routed.granularity,
        "num_tickets": routed.num_tickets,
        "shared_norm": routed.shared_norm,
        "space": routed.space.to_dict(),
        "mask_shapes": {k: list(s) for k, s in routed.space.mask_shapes().items()},
        "files": {WEIGHTS: sha256(w_bytes), MASKS: sha256(m_bytes)},
        "sparsity": [round(float(s), 6) for s in routed.tickets.sparsity()],
        "extra": extra or {},
    }
    atomic_write_bytes(path / WEIGHTS, w_bytes)
    atomic_write_bytes(path / MASKS, m_bytes)
    write_manifest(path / MANIFEST, MODEL, body)  # last: a folder with a manifest is complete
    return path


def read_manifest(path) -> dict:
    """Read and validate the manifest of the saved-model folder ``path`` (format, version, required keys)."""
    return read_manifest_file(Path(path) / MANIFEST, MODEL)


def _read_tensors(path: Path, name: str, manifest: dict) -> dict[str, torch.Tensor]:
    data = read_verified(path / name, manifest["files"].get(name), MODEL)
    return tensors_from_bytes(data, path / name, MODEL)


def _tickets_from(path: Path, manifest: dict) -> TicketSet:
    space = TicketSpace.from_dict(manifest["space"])
    packed = _read_tensors(path, MASKS, manifest)
    try:
        return TicketSet.from_packed(space, int(manifest["num_tickets"]), {k: v.numpy() for k, v in packed.items()})
    except TicketError as e:
        raise CorruptFileError(f"{path / MASKS} does not match its manifest ({e}); the run folder is damaged: "
                               f"{MODEL.fix}.") from e


def load_tickets(path) -> TicketSet:
    """Only the masks of a saved run (no model needed)."""
    path = Path(path)
    return _tickets_from(path, read_manifest(path))


def load(path, model: nn.Module, *, map_location=None) -> RoutedModel:
    """Rebuild the saved RoutedModel on a fresh ``model`` of the same architecture.

    Raises:
        ArchitectureMismatchError: ``model`` is not the architecture that was saved.
        CorruptFileError: a file is missing, truncated or modified.
        FormatVersionError: the folder was written by a newer rtl-plugin.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if not isinstance(model, nn.Module):
        raise TypeError(f"load() needs a fresh model instance (nn.Module), got {type(model).__name__}.")
    check_fingerprint(model, manifest, path, MODEL)
    tickets = _tickets_from(path, manifest)
    state = _read_tensors(path, WEIGHTS, manifest)
    routed = RoutedModel(model, tickets.space, tickets=tickets, shared_norm=bool(manifest.get("shared_norm", False)))
    try:
        routed.model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArchitectureMismatchError(f"saved weights do not fit this model: {e}; create the same model "
                                        "(name, num_classes, encoder) before loading.") from e
    if map_location is not None:
        routed.to(map_location)
    return routed


# atomic_write_*, default_cache_dir and write_cache_npz live in persist.atomic / persist.cache; importable
# from here too for the modules that import them from io.
__all__ = ["save", "load", "load_tickets", "read_manifest", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_npz", "default_cache_dir", "write_cache_npz", "FORMAT_VERSION"]
