"""Names of version 0.1 kept for one version with a DeprecationWarning: module paths, config fields, CLI flags.

Module paths (0.1 was a flat package):
``import rtl_plugin.routers`` still works and returns ``rtl_plugin.routing.routers`` itself (the same module
object, so monkeypatching and ``isinstance`` keep working). Nothing is imported until an old path is asked for.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from rtl_plugin.errors import DataError

# old module path -> new module path (removed in version 0.3)
MOVED_MODULES = {
    "rtl_plugin.api": "rtl_plugin.wrapping",
    "rtl_plugin.pruner": "rtl_plugin.pruning.pruner",
    "rtl_plugin.distributed": "rtl_plugin.training.distributed",
    "rtl_plugin.routers": "rtl_plugin.routing.routers",
    "rtl_plugin.partition": "rtl_plugin.routing.partition",
    "rtl_plugin.sweep": "rtl_plugin.diagnostics.sweep",
    "rtl_plugin.collapse": "rtl_plugin.diagnostics.collapse",
    "rtl_plugin.semantic": "rtl_plugin.diagnostics.semantic",
    "rtl_plugin.report": "rtl_plugin.diagnostics.report",
    "rtl_plugin.plots": "rtl_plugin.diagnostics.plots",
    "rtl_plugin.io": "rtl_plugin.persist.io",
    "rtl_plugin.checkpoint": "rtl_plugin.persist.checkpoint",
    "rtl_plugin.export": "rtl_plugin.persist.export",
    "rtl_plugin.deploy": "rtl_plugin.persist.package",
    "rtl_plugin.baselines": "rtl_plugin.comparison.baselines",
    "rtl_plugin.datasets": "rtl_plugin.tasks.classification.data",
    "rtl_plugin.experiment": "rtl_plugin.tasks.classification.runner",
    "rtl_plugin.detectors": "rtl_plugin.tasks.classification.detectors",
    "rtl_plugin.metrics": "rtl_plugin.tasks.metrics",
    "rtl_plugin.images": "rtl_plugin.tasks.images",
    "rtl_plugin.inr": "rtl_plugin.tasks.inr",
    "rtl_plugin.segmentation": "rtl_plugin.tasks.segmentation",
    "rtl_plugin.speech": "rtl_plugin.tasks.speech.data",
    "rtl_plugin.speech_experiment": "rtl_plugin.tasks.speech.runner",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new_name: str):
        self.new_name = new_name

    def create_module(self, spec):
        return importlib.import_module(self.new_name)

    def exec_module(self, module):
        pass  # the real module is already executed


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves a 0.1 module path to its new home, warning once per import."""

    def find_spec(self, fullname, path=None, target=None):
        new_name = MOVED_MODULES.get(fullname)
        if new_name is None:
            return None
        warnings.warn(f"`{fullname}` moved to `{new_name}`; import it from there (the old path goes in 0.3).",
                      DeprecationWarning, stacklevel=2)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new_name))


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())


# ---------------------------------------------------------------- renamed config fields and CLI flags
# ``renamed_fields({"search_epochs": "epochs_per_round"})`` decorates a config dataclass: the old keyword still
# constructs it and the old attribute still reads it; ``add_deprecated_flag(parser, "--search-epochs",
# "--epochs-per-round")`` keeps an argparse flag as an alias. Each warns with the new name.
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

