"""rtl-plugin: Routing the Lottery for Torch-Pruning.

K sparse tickets over one shared set of weights, each input (or pixel) routed to its ticket. The top level holds
what a plugin user imports; subpackages hold one concept each (pruning, training, routing, diagnostics, persist,
comparison); task pipelines live in ``rtl_plugin.tasks`` and are never imported from here.
"""
from rtl_plugin._version import __version__
from rtl_plugin import _deprecated
from rtl_plugin.adapters import Adapter, create_adapter, detect_adapter, list_adapters, register_adapter
from rtl_plugin.diagnostics import (CollapseMonitor, CollapseWarning, Diagnosis, Sweep, SweepPoint, SweepRecorder,
                                    diagnose, semantic_alignment, wordnet_similarity)
from rtl_plugin.diagnostics.report import diagnose_run
from rtl_plugin.errors import (ArchitectureMismatchError, CallbackError, CorruptFileError, DataError, DistributedError,
                               FormatVersionError, ImportanceError, LiveRoutedModelError, MissingDependencyError,
                               OptimizerError, RouteError, RTLError, SpaceError, SparsityError, TaskHookError, TicketError,
                               UnsupportedLayerError, UnwrappedModelError)
from rtl_plugin.errors import ExecutionError, ExportError, ExportMismatchError, GraphTimeoutError, SearchExecutionError
from rtl_plugin.norms import MaskedLayerNorm, RoutedBatchNorm
from rtl_plugin.persist import (SlimRoutedModel, export_onnx, export_package, export_ticket, load, load_package,
                                pruning_history)
from rtl_plugin.pruning import RTLPruner, SearchResult, TicketImportance
from rtl_plugin.routed import RoutedModel
from rtl_plugin.space import TicketSpace, build_space
from rtl_plugin.tickets import TicketSet
from rtl_plugin.training import (LearnedTickets, RouteBalancedSampler, RoutedDataset, TicketOptimizer, joint_retrain,
                                 learn_tickets, mixed_route_retrain)
from rtl_plugin.wrapping import wrap

_deprecated.install()

__all__ = [
    "Adapter", "ArchitectureMismatchError", "CallbackError", "CollapseMonitor", "CollapseWarning", "CorruptFileError", "DataError",
    "Diagnosis", "DistributedError", "LearnedTickets", "FormatVersionError", "ImportanceError", "LiveRoutedModelError", "MaskedLayerNorm", "MissingDependencyError", "OptimizerError", "RTLError",
    "RTLPruner", "RouteBalancedSampler", "RouteError", "RoutedDataset", "RoutedBatchNorm", "RoutedModel", "SearchResult", "SlimRoutedModel", "SpaceError",
    "SparsityError", "Sweep", "SweepPoint", "SweepRecorder", "TaskHookError", "TicketError", "TicketImportance", "TicketOptimizer", "TicketSet",
    "TicketSpace", "UnsupportedLayerError", "UnwrappedModelError", "build_space", "create_adapter", "detect_adapter", "diagnose",
    "diagnose_run", "export_onnx", "export_package", "export_ticket", "joint_retrain", "learn_tickets", "list_adapters", "load",
    "load_package", "mixed_route_retrain", "pruning_history", "register_adapter", "semantic_alignment", "wrap",
    "wordnet_similarity", "ExecutionError", "SearchExecutionError", "ExportError", "ExportMismatchError", "GraphTimeoutError",
]
