"""The on-disk cache of built data sets: where it lives and a best-effort write."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from rtl_plugin.persist.atomic import atomic_write_npz


def default_cache_dir(path=None) -> Path:
    """Cache folder for built data sets: ``path``, else ``$RTL_CACHE``, else ``~/.cache/rtl-plugin``."""
    if path is not None:
        return Path(path)
    env = os.environ.get("RTL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rtl-plugin"


def write_cache_npz(path, arrays: dict, *, what: str = "cache") -> None:
    """Best-effort atomic cache write: a failure (read-only folder, full disk) warns and is otherwise ignored."""
    try:
        atomic_write_npz(path, arrays)
    except OSError as exc:
        warnings.warn(f"could not write {what} {path} ({exc}); continuing without it", RuntimeWarning, stacklevel=3)


__all__ = ["default_cache_dir", "write_cache_npz"]
