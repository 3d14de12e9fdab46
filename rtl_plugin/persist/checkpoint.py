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
import random
import re
from pathlib import Path

import numpy as np
import torch

from rtl_plugin.errors import ArchitectureMismatchError, CorruptFileError
from rtl_plugin.persist.atomic import atomic_write_bytes, fsync_dir
from rtl_plugin.persist.manifest import (CHECKPOINT, read_manifest, read_verified, sha256, tensors_from_bytes,
                                         tensors_to_bytes, write_manifest)

FORMAT = CHECKPOINT.format
FORMAT_VERSION = CHECKPOINT.version


class CheckpointMismatchError(ArchitectureMismatchError):
    """A checkpoint folder holds a checkpoint of another run configuration (model, targets, schedule, data)."""


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def config_sha256(config: dict) -> str:
    """sha256 of the canonical JSON of a run configuration (or of a bundle's meta)."""
    return sha256(_canon(config).encode())


def _remove_stale(d: Path, name: str, keep: str) -> None:
    """Delete bundle ``name``'s older tensor files and the temp files of killed writes."""
    for f in d.iterdir():
        stale = (f.name.startswith(f"{name}.") and f.name.endswith(".safetensors") and f.name != keep) or \
                (f.name.startswith(f".{name}.") and f.name.endswith(".tmp"))
        if stale and f.is_file():
            try:
                f.unlink()
            except OSError:
                pass


def save_bundle(directory, name: str, tensors: dict[str, torch.Tensor], meta: dict, *, config: dict) -> Path:
    """Atomically write bundle ``name`` (tensors + JSON ``meta``) for run ``config``; returns the manifest path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    data = tensors_to_bytes(tensors)
    digest = sha256(data)
    fname = f"{name}.{digest[:16]}.safetensors"
    atomic_write_bytes(d / fname, data)
    fsync_dir(d)
    body = {"kind": name, "config": config, "config_sha256": config_sha256(config),
            "meta": meta, "meta_sha256": config_sha256(meta), "tensors": {"file": fname, "sha256": digest}}
    write_manifest(d / f"{name}.json", CHECKPOINT, body)  # last: the manifest commits the checkpoint
    fsync_dir(d)
    _remove_stale(d, name, fname)
    return d / f"{name}.json"


def _check_config(d: Path, name: str, manifest: dict, config: dict) -> None:
    mf = d / f"{name}.json"
    cfg, meta = manifest["config"], manifest["meta"]
    if manifest["config_sha256"] != config_sha256(cfg) or manifest["meta_sha256"] != config_sha256(meta):
        raise CorruptFileError(f"{mf} does not match its own checksums (modified or damaged); delete the folder "
                               f"{d} to start over.")
    want = json.loads(_canon(config))
    if cfg != want:
        diff = sorted(k for k in set(cfg) | set(want) if cfg.get(k) != want.get(k))
        raise CheckpointMismatchError(
            f"{d} holds a {name!r} checkpoint of another run configuration (differs in: {', '.join(diff)}); "
            "pass the same model, targets, schedule and data to resume, or use another checkpoint_dir.")


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
    manifest = read_manifest(mf, CHECKPOINT, expect={"kind": name})
    _check_config(d, name, manifest, config)
    fname = manifest["tensors"].get("file")
    if not isinstance(fname, str) or not re.fullmatch(re.escape(name) + r"\.[0-9a-f]{16}\.safetensors", fname):
        raise CorruptFileError(f"{mf} names an invalid tensor file {fname!r}; the checkpoint is damaged: "
                               f"{CHECKPOINT.fix}.")
    data = read_verified(d / fname, manifest["tensors"].get("sha256"), CHECKPOINT)
    return tensors_from_bytes(data, d / fname, CHECKPOINT), manifest["meta"]


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
    """The distinct torch.Generators that drive a DataLoader's shuffling (loader, sampler, batch sampler's sampler,
    batch sampler)."""
    cands = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None),
             getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None),
             getattr(getattr(loader, "batch_sampler", None), "generator", None)]  # e.g. RouteBalancedSampler
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
