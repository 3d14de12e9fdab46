"""Module paths of version 0.1 (a flat package), kept importable for one version with a DeprecationWarning.

``import rtl_plugin.routers`` still works and returns ``rtl_plugin.routing.routers`` itself (the same module
object, so monkeypatching and ``isinstance`` keep working). Nothing is imported until an old path is asked for.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

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
