"""Exception hierarchy: every error raised by rtl-plugin derives from :class:`RTLError`.

Each message names the problem and the fix.
"""


class RTLError(Exception):
    """Base class of all rtl-plugin errors."""


class RouteError(RTLError, ValueError):
    """A route tensor has the wrong dtype, shape, device or ticket ids."""


class SparsityError(RTLError, ValueError):
    """A sparsity value or schedule is outside [0, 1) or not increasing."""


class TicketError(RTLError, ValueError):
    """Ticket masks are inconsistent with the ticket space (shape, count, granularity)."""


class SpaceError(RTLError, ValueError):
    """The ticket space cannot be built for this model or does not match it."""


class UnsupportedLayerError(SpaceError):
    """A layer pattern cannot be handled in the requested granularity."""


class ArchitectureMismatchError(RTLError, ValueError):
    """Saved tickets or a run folder belong to another architecture."""


class CorruptFileError(RTLError, OSError):
    """A saved file is truncated, tampered with or unreadable."""


class FormatVersionError(RTLError, ValueError):
    """A saved file was written by a newer format version."""


class DataError(RTLError, ValueError):
    """A dataset or subset is empty, missing or malformed."""


class MissingDependencyError(RTLError, ImportError):
    """An optional dependency or system package is not installed."""


class DistributedError(RTLError, RuntimeError):
    """An unsupported multi-process setup (FSDP, a pre-wrapped DDP model) or ranks that disagree."""


class OptimizerError(RTLError, TypeError):
    """An ``optimizer=`` argument that is not an optimizer over the routed model's parameters."""


class TaskHookError(RTLError, TypeError):
    """A comparison task lacks a hook that one of its requested methods needs."""


class ImportanceError(RTLError, TypeError):
    """An importance criterion that cannot rank this granularity, or one that needs gradients it did not get."""


class LiveRoutedModelError(RTLError, TypeError):
    """torch-pruning (a pruner, a dependency graph, an op counter) or ``TicketImportance`` was given the live routed
    model, whose weights all K tickets share: work on ``routed.plain_copy(k)`` or ``rtl.export_ticket(routed, k)``."""


class UnwrappedModelError(RTLError, RuntimeError):
    """A RoutedModel was used after ``unwrap()`` or ``merge(k)`` handed its model back."""


class CallbackError(RTLError, TypeError):
    """A ``callbacks=`` argument that is not a callable or a list of callables."""


class GraphTimeoutError(UnsupportedLayerError):
    """Building torch-pruning's channel groups passed the time limit or does not converge for this model."""


class ExportError(RTLError, RuntimeError):
    """An exported ticket cannot be built or cannot run."""


class ExportMismatchError(ExportError):
    """An exported ticket computes something else than the routed ticket it was exported from."""


class ExecutionError(RTLError, ValueError):
    """An ``execution=`` path (auto / grouped / bucketed) that is unknown or that this model cannot run."""


class SearchExecutionError(ExecutionError):
    """``search_execution=`` asks the grouped (vectorised) ticket search for something it cannot run exactly."""
