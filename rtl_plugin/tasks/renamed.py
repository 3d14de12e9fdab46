"""Old names of task config fields and benchmark flags, kept for one version with a DeprecationWarning.

``renamed_fields({"search_epochs": "epochs_per_round"})`` decorates a config dataclass: the old keyword still
constructs it and the old attribute still reads it, each with a warning naming the new name.
``add_deprecated_flag(parser, "--search-epochs", "--epochs-per-round")`` keeps an argparse flag as an alias.
"""
from __future__ import annotations

import argparse
import functools
import warnings

from rtl_plugin.errors import DataError


def _warn(old: str, new: str, where: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{where}: {old} is deprecated and will be removed in the next version; use {new}.",
                  DeprecationWarning, stacklevel=stacklevel)


def renamed_fields(renames: dict[str, str]):
    """Class decorator: accept and read each old field name of ``renames`` (old -> new) with a warning."""
    def decorate(cls):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kw):
            for old, new in renames.items():
                if old in kw:
                    if new in kw:
                        raise DataError(f"{cls.__name__} got both {old}= and {new}=; give {new}= only "
                                        f"({old} is its deprecated name).")
                    _warn(f"{old}=", f"{new}=", cls.__name__)
                    kw[new] = kw.pop(old)
            init(self, *args, **kw)

        cls.__init__ = __init__
        for old, new in renames.items():
            setattr(cls, old, property(functools.partial(_read_renamed, old=old, new=new),
                                       doc=f"Deprecated name of ``{new}``."))
        return cls
    return decorate


def _read_renamed(self, *, old: str, new: str):
    _warn(f".{old}", f".{new}", type(self).__name__)
    return getattr(self, new)


class _DeprecatedFlag(argparse.Action):
    def __init__(self, option_strings, dest, new: str = "", **kw):
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        _warn(option_string, self.new, parser.prog, stacklevel=2)
        setattr(namespace, self.dest, values)


def add_deprecated_flag(parser: argparse.ArgumentParser, old: str, new: str, **kw) -> None:
    """``old`` sets the same destination as the already added flag ``new``, with a DeprecationWarning."""
    dest = new.lstrip("-").replace("-", "_")
    parser.add_argument(old, dest=dest, action=_DeprecatedFlag, new=new, default=argparse.SUPPRESS,
                        help=f"deprecated name of {new}", **kw)


__all__ = ["renamed_fields", "add_deprecated_flag"]
