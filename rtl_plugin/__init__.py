"""rtl-plugin: Routing the Lottery for Torch-Pruning.

K sparse tickets over one shared set of weights, each input (or pixel) routed to its ticket.
"""
__version__ = "0.1.0"

from .adapters import Adapter, create_adapter, detect_adapter, list_adapters, register_adapter
from .api import wrap
from .errors import (ArchitectureMismatchError, CorruptFileError, DataError, DistributedError, FormatVersionError,
                     MissingDependencyError, RouteError, RTLError, SpaceError, SparsityError, TicketError,
                     UnsupportedLayerError)
from .diagnostics import Diagnosis, diagnose
from .collapse import CollapseMonitor, CollapseWarning
from .sweep import Sweep, SweepPoint, SweepRecorder
from .semantic import semantic_alignment, wordnet_similarity
from .export import export_ticket, pruning_history
from .deploy import SlimRoutedModel, export_onnx, export_package, load_package
from .pruner import RTLPruner, SearchResult, TicketImportance
from .training import joint_retrain, mixed_route_retrain
from .norms import MaskedLayerNorm, RoutedBatchNorm
from .routed import RoutedModel
from .space import TicketSpace, build_space
from .tickets import TicketSet


def diagnose_run(run_dir, **kw):
    """Collapse diagnostics of a run folder: figures, report.md / report.html (see ``rtl_plugin.report``)."""
    from .report import diagnose_run as _diagnose_run
    return _diagnose_run(run_dir, **kw)


def load(path, model, **kw):
    """Load a saved RoutedModel into a fresh ``model`` of the same architecture (see ``rtl_plugin.io``)."""
    from .io import load as _load
    return _load(path, model, **kw)


__all__ = [
    "Adapter", "CollapseMonitor", "CollapseWarning", "Sweep", "SweepPoint", "SweepRecorder", "semantic_alignment",
    "wordnet_similarity", "diagnose_run", "Diagnosis", "RTLPruner", "SearchResult", "TicketImportance", "diagnose", "joint_retrain", "mixed_route_retrain",
    "ArchitectureMismatchError", "CorruptFileError", "DataError", "DistributedError", "FormatVersionError",
    "MaskedLayerNorm", "MissingDependencyError", "RTLError", "RouteError", "RoutedBatchNorm", "RoutedModel",
    "SpaceError", "SparsityError", "TicketError", "TicketSet", "TicketSpace", "UnsupportedLayerError",
    "build_space", "create_adapter", "detect_adapter", "export_ticket", "list_adapters", "load",
    "pruning_history", "register_adapter", "wrap", "SlimRoutedModel", "export_onnx", "export_package",
    "load_package",
]
