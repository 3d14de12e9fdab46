"""The one reader, writer and validator of the JSON manifests rtl-plugin writes next to its safetensors files.

Three kinds of manifest exist, each declared once below as a :class:`ManifestKind` (format name, version, the
required keys and their types, how to repair a damaged one):

* :data:`MODEL`      ``manifest.json`` of a saved RoutedModel (``routed.save`` / ``rtl.load``);
* :data:`CHECKPOINT` ``<name>.json`` of a resumable search / retrain checkpoint;
* :data:`PACKAGE`    ``manifest.json`` of a deployable package (``export_package`` / ``load_package``).

Every manifest carries ``format``, ``format_version`` and ``rtl_plugin_version``; the files it names are verified
by sha256 before they are parsed. Tensors are stored as safetensors: nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from rtl_plugin._version import __version__
from rtl_plugin.errors import ArchitectureMismatchError, CorruptFileError, FormatVersionError
from rtl_plugin.persist.atomic import atomic_write_json
from rtl_plugin.space import architecture_fingerprint


@dataclass(frozen=True)
class ManifestKind:
    """The declared schema of one kind of manifest.

    Attributes:
        format: the ``format`` string the manifest must carry.
        version: the newest ``format_version`` this rtl-plugin writes and reads (older ones are read too).
        what: what a folder with this manifest is, for messages ("saved rtl-plugin model").
        fix: how to repair a damaged one, appended to every CorruptFileError.
        opened_with: how to open one, named when a manifest of this kind is handed to another reader.
        required: key -> type every manifest of this kind holds (bools never count as ints).
        positive: required int keys that must be >= 1.
    """

    format: str
    version: int
    what: str
    fix: str
    opened_with: str
    required: Mapping[str, type] = field(default_factory=dict)
    positive: tuple[str, ...] = ()


MODEL = ManifestKind(
    "rtl-plugin", 1, "saved rtl-plugin model", "re-save the model (routed.save) or restore the folder from a backup",
    "load it with rtl.load",
    {"fingerprint": str, "space": dict, "num_tickets": int, "files": dict, "granularity": str}, ("num_tickets",))
CHECKPOINT = ManifestKind(
    "rtl-plugin-checkpoint", 1, "rtl-plugin checkpoint", "delete the checkpoint folder to start over",
    "it resumes through checkpoint_dir=",
    {"kind": str, "config": dict, "config_sha256": str, "meta": dict, "meta_sha256": str, "tensors": dict})
PACKAGE = ManifestKind(
    "rtl-plugin-package", 1, "rtl-plugin package", "re-export the package (rtl export / export_package)",
    "load it with rtl.load_package",
    {"granularity": str, "num_tickets": int, "fingerprint": str, "space": dict, "tickets": list, "files": dict},
    ("num_tickets",))
KINDS = (MODEL, CHECKPOINT, PACKAGE)


def _a(what: str) -> str:
    """``what`` with its indefinite article ("an rtl-plugin package", "a saved rtl-plugin model")."""
    return ("an " if what[0] in "aeiour" else "a ") + what


def sha256(data: bytes) -> str:
    """Hex sha256 of ``data`` (the checksum manifests store per file)."""
    return hashlib.sha256(data).hexdigest()


def write_manifest(path, kind: ManifestKind, body: Mapping) -> dict:
    """Atomically write ``body`` stamped with ``kind``'s format, version and the rtl-plugin version; returns it.

    Write the manifest last: a folder whose manifest exists is complete.
    """
    clash = {"format", "format_version", "rtl_plugin_version"} & set(body)
    if clash:
        raise CorruptFileError(f"refusing to write {path}: the body sets {sorted(clash)}, which write_manifest() "
                               "stamps itself; leave them out of the body.")
    manifest = {"format": kind.format, "format_version": kind.version, "rtl_plugin_version": __version__, **body}
    problem = _schema_problem(manifest, kind)
    if problem is not None:
        raise CorruptFileError(f"refusing to write {path}: it {problem}, so no reader would accept it; pass every "
                               f"key the {kind.format} schema requires ({', '.join(kind.required)}).")
    atomic_write_json(path, manifest)
    return manifest


def _parse(path: Path, kind: ManifestKind) -> object:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}); the {kind.what} is damaged: {kind.fix}.") from e


def _check_format(path: Path, manifest: object, kind: ManifestKind, expect: Mapping) -> None:
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != kind.format:
        other = next((k for k in KINDS if k.format == fmt), None)
        hint = f" (it is {_a(other.what)}: {other.opened_with})" if other is not None else ""
        raise CorruptFileError(f"{path} is not an rtl-plugin manifest of {_a(kind.what)} (format={fmt!r}){hint}.")
    for key, want in expect.items():
        if manifest.get(key) != want:
            raise CorruptFileError(f"{path} is not the {kind.what} manifest expected here ({key}="
                                   f"{manifest.get(key)!r}, not {want!r}); {kind.fix}.")


def _check_version(path: Path, manifest: dict, kind: ManifestKind) -> None:
    ver = manifest.get("format_version")
    if not isinstance(ver, int) or isinstance(ver, bool) or ver < 1:
        raise CorruptFileError(f"{path} has no valid format_version (got {ver!r}); {kind.fix}.")
    if ver > kind.version:
        raise FormatVersionError(f"{path.parent} was written with {kind.what} format version {ver}, this "
                                 f"rtl-plugin reads up to {kind.version}; upgrade rtl-plugin (pip install -U "
                                 "rtl-plugin).")


def _schema_problem(manifest: Mapping, kind: ManifestKind) -> str | None:
    """What in ``manifest`` breaks ``kind``'s declared keys and types, or None."""
    for key, typ in kind.required.items():
        value = manifest.get(key)
        if not isinstance(value, typ) or isinstance(value, bool):
            return f"lacks a valid {key!r} entry ({typ.__name__}, got {type(value).__name__})"
    for key in kind.positive:
        if manifest[key] < 1:
            return f"has {key}={manifest[key]} (at least 1 needed)"
    return None


def read_manifest(path, kind: ManifestKind, *, expect: Mapping | None = None) -> dict:
    """Read the manifest file ``path`` and validate it against ``kind``.

    Args:
        expect: key -> value the manifest must hold (e.g. a checkpoint's bundle name).
    Raises:
        CorruptFileError: missing, not JSON, another format, no valid version, a required key missing or mistyped.
        FormatVersionError: written by a newer rtl-plugin.
    """
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"{path} does not exist; {path.parent} is not {_a(kind.what)} (or it is incomplete: "
                               f"{kind.fix}).")
    manifest = _parse(path, kind)
    _check_format(path, manifest, kind, expect or {})
    _check_version(path, manifest, kind)
    problem = _schema_problem(manifest, kind)
    if problem is not None:
        raise CorruptFileError(f"{path} {problem}; the manifest is damaged or hand-edited: {kind.fix}.")
    return manifest


def read_verified(path, checksum, kind: ManifestKind) -> bytes:
    """The bytes of the file ``path`` after checking them against the sha256 ``checksum`` its manifest stores."""
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"{path} is missing; the {kind.what} is incomplete: {kind.fix}.")
    data = path.read_bytes()
    if sha256(data) != checksum:
        raise CorruptFileError(f"{path} does not match its checksum in the manifest (truncated or modified); "
                               f"{kind.fix}.")
    return data


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """A safetensors file of ``tensors`` (detached, on the CPU, contiguous)."""
    return safetensors_save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()})


def tensors_from_bytes(data: bytes, where, kind: ManifestKind) -> dict[str, torch.Tensor]:
    """Parse the safetensors bytes read from ``where``; anything else (a pickle too) is a CorruptFileError."""
    try:
        return safetensors_load(data)
    except Exception as e:
        raise CorruptFileError(f"{where} is not a valid safetensors file ({e}); the {kind.what} is damaged: "
                               f"{kind.fix}.") from e


def check_fingerprint(model: nn.Module, manifest: Mapping, where, kind: ManifestKind) -> None:
    """Raise ArchitectureMismatchError unless ``model`` is the architecture the manifest's fingerprint names."""
    fp = architecture_fingerprint(model)
    if fp != manifest.get("fingerprint"):
        raise ArchitectureMismatchError(
            f"{where} holds a {kind.what} of another architecture (fingerprint {manifest.get('fingerprint')} vs "
            f"this model's {fp}); create the same model (name, num_classes, encoder) before loading.")


__all__ = ["CHECKPOINT", "KINDS", "MODEL", "ManifestKind", "PACKAGE", "check_fingerprint", "read_manifest",
           "read_verified", "sha256", "tensors_from_bytes", "tensors_to_bytes", "write_manifest"]
