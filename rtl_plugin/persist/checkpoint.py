"""Crash-safe checkpoints for long runs ("state bundles"): tensors in safetensors, the rest in JSON. No pickle.

A bundle ``name`` in a checkpoint folder is two files::

    <name>.json                        manifest: format, format_version, config (+ sha256), meta (+ sha256),
                                       the tensor file's name and sha256
    <name>.<sha256[:16]>.safetensors   the tensors (content-addressed name)

Write order: the tensor file first (a new name, atomic: temp file + fsync + rename), the manifest last
(atomic replace), then the bundle's older tensor files are deleted. A kill at any point leaves either the
previous complete checkpoint or the new one: a manifest only ever names a tensor file that was fully
written, with its exact checksum. Files the manifest does not name (stale temp files, a ``*.pkl`` someone
dropped in the folder) are never read. One writer per folder.

``config`` identifies the run configuration (architecture, targets, schedule, ...): loading a bundle whose
config differs raises :class:`CheckpointMismatchError`; a damaged bundle raises ``CorruptFileError``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from rtl_plugin.errors import ArchitectureMismatchError, CorruptFileError, FormatVersionError
from rtl_plugin.persist.io import _sha256, _st_bytes, _st_load, atomic_write_bytes, atomic_write_json

FORMAT = "rtl-plugin-checkpoint"
FORMAT_VERSION = 1


class CheckpointMismatchError(ArchitectureMismatchError):
    """A checkpoint folder holds a checkpoint of another run configuration (model, targets, schedule, data)."""


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def config_sha256(config: dict) -> str:
    return hashlib.sha256(_canon(config).encode()).hexdigest()


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_bundle(directory, name: str, tensors: dict[str, torch.Tensor], meta: dict, *, config: dict) -> Path:
    """Atomically write bundle ``name`` (tensors + JSON ``meta``) for run ``config``; returns the manifest path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    data = _st_bytes(tensors)
    digest = _sha256(data)
    fname = f"{name}.{digest[:16]}.safetensors"
    atomic_write_bytes(d / fname, data)
    _fsync_dir(d)
    from rtl_plugin._version import __version__
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": name, "rtl_plugin_version": __version__,
                "config": config, "config_sha256": config_sha256(config),
                "meta": meta, "meta_sha256": hashlib.sha256(_canon(meta).encode()).hexdigest(),
                "tensors": {"file": fname, "sha256": digest}}
    atomic_write_json(d / f"{name}.json", manifest)  # last: the manifest commits the checkpoint
    _fsync_dir(d)
    for f in d.iterdir():  # older tensor files and temp files of killed writes
        stale = (f.name.startswith(f"{name}.") and f.name.endswith(".safetensors") and f.name != fname) or \
                (f.name.startswith(f".{name}.") and f.name.endswith(".tmp"))
        if stale and f.is_file():
            try:
                f.unlink()
            except OSError:
                pass
    return d / f"{name}.json"


def load_bundle(directory, name: str, *, config: dict) -> tuple[dict[str, torch.Tensor], dict] | None:
    """``(tensors, meta)`` of bundle ``name``, or None when the folder holds no such checkpoint yet.

    Raises:
        CorruptFileError: the manifest or tensor file is damaged, truncated or missing.
        CheckpointMismatchError: the checkpoint belongs to another run configuration.
        FormatVersionError: written by a newer rtl-plugin.
    """
    d = Path(directory)
    mf = d / f"{name}.json"
    if not mf.exists():
        return None
    try:
        manifest = json.loads(mf.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as e:
        raise CorruptFileError(f"checkpoint manifest {mf} is unreadable ({e}); delete the folder {d} to start over.") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("kind") != name:
        raise CorruptFileError(f"{mf} is not an rtl-plugin {name!r} checkpoint manifest; delete it to start over.")
    ver = manifest.get("format_version")
    if not isinstance(ver, int) or isinstance(ver, bool) or ver < 1:
        raise CorruptFileError(f"{mf} has no valid format_version; the checkpoint is damaged.")
    if ver > FORMAT_VERSION:
        raise FormatVersionError(f"{mf} was written with checkpoint format {ver}, this rtl-plugin reads up to "
                                 f"{FORMAT_VERSION}; upgrade rtl-plugin or delete the checkpoint.")
    cfg, meta, tf = manifest.get("config"), manifest.get("meta"), manifest.get("tensors")
    if not isinstance(cfg, dict) or manifest.get("config_sha256") != config_sha256(cfg) or not isinstance(meta, dict) \
            or manifest.get("meta_sha256") != hashlib.sha256(_canon(meta).encode()).hexdigest() \
            or not isinstance(tf, dict):
        raise CorruptFileError(f"{mf} does not match its own checksums (modified or damaged); delete the folder "
                               f"{d} to start over.")
    if cfg != json.loads(_canon(config)):
        diff = sorted(k for k in set(cfg) | set(config) if cfg.get(k) != json.loads(_canon(config)).get(k))
        raise CheckpointMismatchError(
            f"{d} holds a {name!r} checkpoint of another run configuration (differs in: {', '.join(diff)}); "
            "pass the same model, targets, schedule and data to resume, or use another checkpoint_dir.")
    fname = tf.get("file")
    if not isinstance(fname, str) or not re.fullmatch(re.escape(name) + r"\.[0-9a-f]{16}\.safetensors", fname):
        raise CorruptFileError(f"{mf} names an invalid tensor file {fname!r}; the checkpoint is damaged.")
    f = d / fname
    if not f.is_file():
        raise CorruptFileError(f"{f} (named by {mf}) is missing; the checkpoint is incomplete.")
    data = f.read_bytes()
    if _sha256(data) != tf.get("sha256"):
        raise CorruptFileError(f"{f} does not match its checksum in {mf} (truncated or modified); delete the "
                               f"folder {d} to start over.")
    return _st_load(data, str(f)), meta


# ----------------------------------------------------------------------------- JSON <-> tensors, no pickle
def encode(obj, tensors: dict[str, torch.Tensor], prefix: str):
    """JSON-able form of nested dicts/lists/tuples/scalars/tensors; tensors go to ``tensors`` under ``prefix/...``.

    Dicts keep non-string keys (an optimizer's ``state`` maps int param indices to dicts)."""
    if isinstance(obj, torch.Tensor):
        if prefix in tensors:
            raise ValueError(f"duplicate tensor path {prefix!r} while checkpointing")
        tensors[prefix] = obj.detach()
        return {"__tensor__": prefix}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        for k in obj:
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"cannot checkpoint a dict key of type {type(k).__name__} without pickle")
        return {"__dict__": [[k, encode(v, tensors, f"{prefix}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix!r} without pickle")


def decode(obj, tensors: dict[str, torch.Tensor]):
    """Inverse of :func:`encode`."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            if obj["__tensor__"] not in tensors:
                raise CorruptFileError(f"checkpoint tensor {obj['__tensor__']!r} is missing; the checkpoint is damaged.")
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: decode(v, tensors) for k, v in obj["__dict__"]}
        raise CorruptFileError(f"unexpected JSON object in checkpoint: keys {sorted(obj)[:3]}")
    return obj


# ----------------------------------------------------------------------------- RNG and loader state
def loader_generators(loader) -> list[torch.Generator]:
    """The distinct torch.Generators that drive a DataLoader's shuffling (loader, sampler, batch sampler)."""
    cands = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None),
             getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None)]
    out: list[torch.Generator] = []
    for g in cands:
        if isinstance(g, torch.Generator) and all(g is not o for o in out):
            out.append(g)
    return out


def loaders_config(loaders: dict) -> dict:
    """Part of a run config: per ticket, the loader's batch count and its number of generators."""
    return {str(k): [len(dl), len(loader_generators(dl))] for k, dl in sorted(loaders.items())}


def capture_rng(loaders: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """Store torch (CPU, CUDA when initialised), numpy and python global RNG states and every loader
    generator's state; returns the JSON part."""
    tensors["rng/torch"] = torch.get_rng_state()
    n_cuda = 0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
            n_cuda += 1
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    for k, dl in loaders.items():
        for j, g in enumerate(loader_generators(dl)):
            tensors[f"gen/{k}/{j}"] = g.get_state()
    return {"cuda": n_cuda, "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": encode(random.getstate(), {}, "python")}


def restore_rng(loaders: dict, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    try:
        torch.set_rng_state(tensors["rng/torch"])
        n_cuda = int(meta["cuda"])
        if n_cuda and torch.cuda.is_available() and torch.cuda.device_count() == n_cuda:
            torch.cuda.set_rng_state_all([tensors[f"rng/cuda/{i}"] for i in range(n_cuda)])
        kind, pos, has_gauss, gauss = meta["numpy"]
        np.random.set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(decode(meta["python"], {}))
        for k, dl in loaders.items():
            for j, g in enumerate(loader_generators(dl)):
                g.set_state(tensors[f"gen/{k}/{j}"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CorruptFileError(f"checkpoint RNG state is damaged ({e!r}); delete the checkpoint to start over.") from e


# ----------------------------------------------------------------------------- masks
def pack_masks(masks: dict[str, torch.Tensor], prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    """Bit-pack bool masks (1 bit per entry, like ``TicketSet.packed``) into ``tensors[prefix/key]``."""
    for n, m in masks.items():
        tensors[f"{prefix}/{n}"] = torch.from_numpy(np.packbits(m.detach().cpu().numpy().reshape(-1)))


def unpack_masks(tensors: dict[str, torch.Tensor], prefix: str, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    out = {}
    for n, s in shapes.items():
        t = tensors.get(f"{prefix}/{n}")
        cnt = int(np.prod(s, dtype=np.int64))
        if t is None or t.dtype != torch.uint8 or t.numel() != (cnt + 7) // 8:
            raise CorruptFileError(f"checkpoint mask {prefix}/{n} is missing or has the wrong size; "
                                   "the checkpoint is damaged.")
        out[n] = torch.from_numpy(np.unpackbits(t.numpy(), count=cnt).astype(bool).reshape(tuple(s)))
    return out


def masks_sha256(tickets) -> str:
    h = hashlib.sha256()
    for k, v in sorted(tickets.packed().items()):
        h.update(k.encode())
        h.update(v.tobytes())
    return h.hexdigest()


__all__ = ["CheckpointMismatchError", "save_bundle", "load_bundle", "encode", "decode", "capture_rng",
           "restore_rng", "loader_generators", "loaders_config", "pack_masks", "unpack_masks", "FORMAT_VERSION"]
