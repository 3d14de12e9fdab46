"""Save / load a RoutedModel: safetensors for tensors + a JSON manifest. No pickle, atomic writes, versioned.

Folder layout::

    manifest.json        format, format_version, fingerprint, granularity, K, space, sha256 of each file
    weights.safetensors  the wrapped model's state dict (routed norms hold [K, C] statistics)
    masks.safetensors    bit-packed masks, one uint8 tensor per mask key
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from rtl_plugin.errors import ArchitectureMismatchError, CorruptFileError, FormatVersionError, TicketError
from rtl_plugin.space import TicketSpace, architecture_fingerprint
from rtl_plugin.tickets import TicketSet

FORMAT = "rtl-plugin"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
MASKS = "masks.safetensors"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the result is as readable as any other file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def atomic_write_npz(path, arrays: dict) -> None:
    """``np.savez`` of ``arrays`` (no object arrays, no pickle), written atomically."""
    import io as _io

    import numpy as np
    buf = _io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def write_cache_npz(path, arrays: dict, *, what: str = "cache") -> None:
    """Best-effort atomic cache write: a failure (read-only folder, full disk) warns and is otherwise ignored."""
    try:
        atomic_write_npz(path, arrays)
    except OSError as exc:
        import warnings
        warnings.warn(f"could not write {what} {path} ({exc}); continuing without it", RuntimeWarning, stacklevel=3)


def default_cache_dir(path=None) -> Path:
    """Cache folder for built data sets: ``path``, else ``$RTL_CACHE``, else ``~/.cache/rtl-plugin``."""
    if path is not None:
        return Path(path)
    env = os.environ.get("RTL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rtl-plugin"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _st_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save
    return save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()})


def _st_load(data: bytes, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load
    try:
        return load(data)
    except Exception as e:
        raise CorruptFileError(f"{what} is not a valid safetensors file ({e}); the run folder is damaged: "
                               "re-save it or restore it from a backup.") from e


def save(routed, path, *, extra: dict | None = None) -> Path:
    """Save ``routed`` (a RoutedModel) to the folder ``path``; returns the folder."""
    from rtl_plugin.routed import RoutedModel
    if not isinstance(routed, RoutedModel):
        raise TypeError(f"save() needs a RoutedModel, got {type(routed).__name__}.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = routed.model.state_dict()
    w_bytes = _st_bytes(state)
    packed = routed.tickets.packed()
    m_bytes = _st_bytes({k: torch.from_numpy(v) for k, v in packed.items()})
    from rtl_plugin._version import __version__
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rtl_plugin_version": __version__,
        "fingerprint": routed.space.fingerprint,
        "granularity": routed.granularity,
        "num_tickets": routed.num_tickets,
        "shared_norm": routed.shared_norm,
        "space": routed.space.to_dict(),
        "mask_shapes": {k: list(s) for k, s in routed.space.mask_shapes().items()},
        "files": {WEIGHTS: _sha256(w_bytes), MASKS: _sha256(m_bytes)},
        "sparsity": [round(float(s), 6) for s in routed.tickets.sparsity()],
        "extra": extra or {},
    }
    atomic_write_bytes(path / WEIGHTS, w_bytes)
    atomic_write_bytes(path / MASKS, m_bytes)
    atomic_write_json(path / MANIFEST, manifest)  # last: a folder with a manifest is complete
    return path


def read_manifest(path) -> dict:
    """Read and validate a run folder's manifest (format, version)."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise CorruptFileError(f"{mf} does not exist; {path} is not a saved rtl-plugin model (save with routed.save()).")
    try:
        manifest = json.loads(mf.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{mf} is not valid JSON ({e}); the run folder is damaged.") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptFileError(f"{mf} is not an rtl-plugin manifest (format={manifest.get('format') if isinstance(manifest, dict) else None!r}).")
    ver = manifest.get("format_version")
    if not isinstance(ver, int):
        raise CorruptFileError(f"{mf} has no integer format_version.")
    if ver < 1:
        raise CorruptFileError(f"{mf} has an invalid format_version {ver}.")
    if ver > FORMAT_VERSION:
        raise FormatVersionError(f"{path} was written with format version {ver}, this rtl-plugin reads up to "
                                 f"{FORMAT_VERSION}; upgrade rtl-plugin (pip install -U rtl-plugin).")
    need = {"fingerprint": str, "space": dict, "num_tickets": int, "files": dict, "granularity": str}
    for key, typ in need.items():
        if not isinstance(manifest.get(key), typ) or isinstance(manifest.get(key), bool):
            raise CorruptFileError(f"{mf} lacks a valid {key!r} entry; the manifest is damaged or hand-edited: "
                                   "re-save the model.")
    if manifest["num_tickets"] < 1:
        raise CorruptFileError(f"{mf} has num_tickets={manifest['num_tickets']}; the manifest is damaged.")
    return manifest


def _read_checked(path: Path, name: str, manifest: dict) -> bytes:
    f = path / name
    if not f.is_file():
        raise CorruptFileError(f"{f} is missing; the run folder is incomplete.")
    data = f.read_bytes()
    want = manifest.get("files", {}).get(name)
    if want != _sha256(data):
        raise CorruptFileError(f"{f} does not match its checksum in the manifest (truncated or modified); "
                               "restore the file or re-save the model.")
    return data


def load_tickets(path) -> TicketSet:
    """Only the masks of a saved run (no model needed)."""
    path = Path(path)
    manifest = read_manifest(path)
    space = TicketSpace.from_dict(manifest["space"])
    packed = _st_load(_read_checked(path, MASKS, manifest), str(path / MASKS))
    try:
        return TicketSet.from_packed(space, int(manifest["num_tickets"]), {k: v.numpy() for k, v in packed.items()})
    except TicketError as e:
        raise CorruptFileError(f"{path / MASKS} does not match its manifest ({e}); the run folder is damaged.") from e


def load(path, model: nn.Module, *, map_location=None):
    """Rebuild the saved RoutedModel on a fresh ``model`` of the same architecture.

    Raises:
        ArchitectureMismatchError: ``model`` is not the architecture that was saved.
        CorruptFileError: a file is missing, truncated or modified.
        FormatVersionError: the folder was written by a newer rtl-plugin.
    """
    from rtl_plugin.routed import RoutedModel
    path = Path(path)
    manifest = read_manifest(path)
    if not isinstance(model, nn.Module):
        raise TypeError(f"load() needs a fresh model instance (nn.Module), got {type(model).__name__}.")
    fp = architecture_fingerprint(model)
    if fp != manifest.get("fingerprint"):
        raise ArchitectureMismatchError(
            f"{path} was saved from another architecture (fingerprint {manifest.get('fingerprint')} vs this model's "
            f"{fp}); create the same model (name, num_classes, encoder) before loading.")
    space = TicketSpace.from_dict(manifest["space"])
    tickets = load_tickets(path)
    state = _st_load(_read_checked(path, WEIGHTS, manifest), str(path / WEIGHTS))
    routed = RoutedModel(model, space, tickets=tickets, shared_norm=bool(manifest.get("shared_norm", False)))
    try:
        routed.model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArchitectureMismatchError(f"saved weights do not fit this model: {e}") from e
    if map_location is not None:
        routed.to(map_location)
    return routed


__all__ = ["save", "load", "load_tickets", "read_manifest", "atomic_write_bytes", "atomic_write_json",
           "FORMAT_VERSION"]
