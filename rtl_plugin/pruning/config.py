"""How RTLPruner prunes, validated in one place.

Two schedules:

``ratio``     torch-pruning's: ``pruning_ratio`` reached in ``iterative_steps`` steps by tp's scheduler (linear
              by default). Channel mode: the ratio of channels removed per layer (or globally), exactly as
              ``tp.pruner.BasePruner`` computes it. Weight mode: the same ratio of weights removed.
``fraction``  the paper's IMP: remove ``prune_fraction`` of the surviving weights per round, recording the
              masks at each of the weight ``sparsities``; ``count`` removes ``prune_count`` weights per round.

Options that name layers (``ignored_layers``, ``pruning_ratio_dict``, ``num_heads``) are stored by module name,
so they apply to the routed model, its plain copies and every ticket's torch-pruning state alike.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch.nn as nn

from rtl_plugin import _tp
from rtl_plugin.errors import SparsityError

# torch-pruning options passed through unchanged to every ticket's tp pruner (channel mode)
TP_PASSTHROUGH = ("isomorphic", "prune_num_heads", "prune_head_dims", "head_pruning_ratio", "customized_pruners",
                  "forward_fn", "output_transform", "root_module_types")
_RATIO_ARGS = ("pruning_ratio", "pruning_ratio_dict", "iterative_steps")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_sparsities(targets) -> list[float]:
    """Increasing sparsities in (0, 1)."""
    if isinstance(targets, (int, float)):
        targets = [targets]
    try:
        ts = [float(t) for t in targets]
    except (TypeError, ValueError) as e:
        raise SparsityError(f"target sparsities must be numbers in [0, 1), got {targets!r}.") from e
    if not ts:
        raise SparsityError("give at least one target sparsity, e.g. [0.5, 0.75, 0.9].")
    for t in ts:
        if not (0.0 <= t < 1.0) or math.isnan(t):
            raise SparsityError(f"sparsity {t} is outside [0, 1); 0.9 means 90% of prunable weights removed.")
    if any(b <= a for a, b in zip(ts, ts[1:])):
        raise SparsityError(f"target sparsities must be strictly increasing, got {ts}.")
    return ts


def _ratio(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0 or math.isnan(v):
        raise SparsityError(f"{name} must be a number in [0, 1) (the fraction of channels, or of weights in weight "
                            f"granularity, that a layer loses), got {v!r}.")
    return float(v)


@dataclass(frozen=True)
class PruningConfig:
    """A validated pruning configuration (see the module docstring). Layer options are keyed by module name."""
    schedule: str                                    # "ratio" | "fraction" | "count"
    targets: list[float]                             # ratio: tp's ratio after each step; else weight sparsities
    prune_fraction: float = 0.2
    prune_count: int | None = None
    rewind: str | int = "init"
    scope: str = "global"                            # fraction/count, weight mode: "global" | "layer"
    order: str = "ticket"
    max_relaxations: int = 2
    pruning_ratio: float = 0.5
    iterative_steps: int = 1
    scheduler: Callable = _tp.linear_scheduler
    global_pruning: bool = False
    max_pruning_ratio: float = 1.0
    round_to: int | None = None
    pruning_ratio_dict: dict = field(default_factory=dict)   # {name or tuple of names: ratio}
    num_heads: dict = field(default_factory=dict)            # {qkv module name: heads}
    ignored_layers: tuple = ()                               # module names
    tp_options: dict = field(default_factory=dict)

    @property
    def uses_ratio(self) -> bool:
        return self.schedule == "ratio"

    def layer_ratio_schedule(self, name: str) -> list[float] | None:
        """The per-step ratio of layer ``name`` from ``pruning_ratio_dict`` (None: the default schedule)."""
        for key, r in self.pruning_ratio_dict.items():
            if name == key or (isinstance(key, tuple) and name in key):
                return [min(x, self.max_pruning_ratio) for x in self.scheduler(r, self.iterative_steps)]
        return None


def module_names(model: nn.Module, layers, what: str) -> list[str]:
    """Names (in ``model``) of ``layers``: modules of ``model`` or their names."""
    names = {id(m): n for n, m in model.named_modules()}
    known = set(names.values())
    out = []
    for layer in layers:
        if isinstance(layer, str):
            if layer not in known:
                raise SparsityError(f"{what}: {layer!r} is not a module name of the model; pass modules of the model "
                                    "you give to RTLPruner or their names (model.named_modules()).")
            out.append(layer)
        elif isinstance(layer, nn.Module) and id(layer) in names:
            out.append(names[id(layer)])
        else:
            raise SparsityError(f"{what}: {type(layer).__name__} is not a module of the model passed to RTLPruner; "
                                "pass that model's own modules (e.g. model.fc) or their names.")
    return out


def _name_keyed(model: nn.Module, mapping, what: str, check) -> dict:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise SparsityError(f"{what} must be a dict {{module: value}}, got {type(mapping).__name__}.")
    out = {}
    for key, v in mapping.items():
        names = module_names(model, key if isinstance(key, tuple) else [key], what)
        out[tuple(names) if isinstance(key, tuple) else names[0]] = check(v)
    return out


def _check_imp_options(a: dict, granularity: str) -> None:
    if a["schedule"] not in ("fraction", "count"):
        raise SparsityError(f"schedule must be 'ratio' (torch-pruning's pruning_ratio per iterative step), "
                            f"'fraction' or 'count' (the paper's IMP rounds), got {a['schedule']!r}.")
    if a["schedule"] == "fraction" and not (0.0 < float(a["prune_fraction"]) < 1.0):
        raise SparsityError(f"prune_fraction must be in (0, 1), got {a['prune_fraction']}.")
    if a["schedule"] == "count":
        if not _is_int(a["prune_count"]) or a["prune_count"] < 1:
            raise SparsityError("schedule='count' needs prune_count, a positive int (the paper used 4096), got "
                                f"{a['prune_count']!r}.")
        if granularity == "channel":
            raise SparsityError("schedule='count' is for weight granularity; use schedule='fraction' with channels.")
    if a["scope"] not in ("global", "layer"):
        raise SparsityError(f"scope must be 'global' (one magnitude ranking, the paper) or 'layer' (every layer "
                            f"loses the same fraction), got {a['scope']!r}.")


def _check_common(a: dict) -> None:
    rw = a["rewind"]
    if not (rw == "init" or (_is_int(rw) and rw >= 0)):
        raise SparsityError(f"rewind must be 'init' or a number of dense steps >= 0, got {rw!r}.")
    if a["order"] not in ("ticket", "round"):
        raise SparsityError(f"order must be 'ticket' (each ticket's whole search in turn, the paper) or 'round' "
                            f"(all tickets advance one pruning round at a time; needed by round-end callbacks "
                            f"such as CollapseMonitor), got {a['order']!r}.")
    if not _is_int(a["max_relaxations"]) or a["max_relaxations"] < 0:
        raise SparsityError(f"max_relaxations must be an int >= 0, got {a['max_relaxations']!r}.")


def _ratio_targets(a: dict, granularity: str) -> list[float]:
    steps = a["iterative_steps"]
    if not _is_int(steps) or steps < 1:
        raise SparsityError(f"iterative_steps must be a positive int (as in torch-pruning), got {steps!r}.")
    if a["round_to"] is not None:
        if not _is_int(a["round_to"]) or a["round_to"] < 1:
            raise SparsityError(f"round_to must be a positive int or None, got {a['round_to']!r}.")
        if granularity == "weight":
            raise SparsityError("round_to rounds channel counts; weight granularity prunes single weights. Use "
                                "granularity='channel' or drop round_to.")
    if not callable(a["scheduler"]):
        raise SparsityError("iterative_pruning_ratio_scheduler must be callable (ratio, steps) -> list of ratios.")
    sched = [float(x) for x in a["scheduler"](a["pruning_ratio"], steps)]
    if len(sched) != steps + 1:
        raise SparsityError(f"the pruning-ratio scheduler returned {len(sched)} ratios for {steps} steps; it must "
                            "return iterative_steps + 1 (the first is 0), like torch_pruning's linear_scheduler.")
    targets = [min(r, a["max_pruning_ratio"]) for r in sched[1:]]
    if any(b < a_ for a_, b in zip(targets, targets[1:])):
        raise SparsityError(f"the pruning-ratio schedule {targets} decreases; ratios must not decrease.")
    return targets


def choose_schedule(schedule: str, given: dict) -> str:
    """``auto``: ``ratio`` when any of pruning_ratio / pruning_ratio_dict / iterative_steps is given, else the
    paper's ``fraction``."""
    tp_given = [n for n in _RATIO_ARGS if given.get(n) is not None]
    if schedule == "auto":
        return "ratio" if tp_given else "fraction"
    if schedule != "ratio" and tp_given:
        raise SparsityError(f"{', '.join(tp_given)} belong to schedule='ratio' (torch-pruning's); schedule="
                            f"{schedule!r} uses sparsities= and prune_fraction=. Drop one of them.")
    return schedule


def build_config(model: nn.Module, granularity: str, a: dict) -> PruningConfig:
    """A PruningConfig from RTLPruner's keyword arguments ``a`` (modules resolved to names in ``model``)."""
    schedule = choose_schedule(a["schedule"], a)
    _check_common(a)
    ratio_dict = _name_keyed(model, a["pruning_ratio_dict"], "pruning_ratio_dict", lambda v: _ratio("a ratio", v))
    heads = _name_keyed(model, a["num_heads"], "num_heads", _positive_heads)
    ignored = tuple(module_names(model, a["ignored_layers"] or (), "ignored_layers"))
    unknown = sorted(set(a["tp_options"]) - set(TP_PASSTHROUGH))
    if unknown:
        raise SparsityError(f"unknown torch-pruning option(s) {unknown}; RTLPruner passes through "
                            f"{list(TP_PASSTHROUGH)} (and its named arguments).")
    common = dict(rewind=a["rewind"], order=a["order"], max_relaxations=a["max_relaxations"],
                  pruning_ratio_dict=ratio_dict, num_heads=heads, ignored_layers=ignored,
                  tp_options=dict(a["tp_options"]))
    if schedule == "ratio":
        if a["sparsities"] is not None:
            raise SparsityError("sparsities= is the IMP schedule's; with pruning_ratio / iterative_steps "
                                "(torch-pruning's schedule) drop it: the ratios are pruning_ratio's steps.")
        pr = 0.5 if a["pruning_ratio"] is None else a["pruning_ratio"]
        a = {**a, "pruning_ratio": _ratio("pruning_ratio", pr),
             "iterative_steps": 1 if a["iterative_steps"] is None else a["iterative_steps"],
             "max_pruning_ratio": _max_ratio(a["max_pruning_ratio"])}
        targets = _ratio_targets(a, granularity)
        return PruningConfig(schedule="ratio", targets=targets, pruning_ratio=a["pruning_ratio"],
                             iterative_steps=a["iterative_steps"], scheduler=a["scheduler"],
                             global_pruning=bool(a["global_pruning"]), max_pruning_ratio=a["max_pruning_ratio"],
                             round_to=a["round_to"], **common)
    a = {**a, "schedule": schedule}
    _check_imp_options(a, granularity)
    if a["round_to"] is not None:
        raise SparsityError("round_to belongs to torch-pruning's schedule; pass pruning_ratio= (schedule='ratio').")
    scope = a["scope"] if a["global_pruning"] is None else ("global" if a["global_pruning"] else "layer")
    return PruningConfig(schedule=a["schedule"], targets=validate_sparsities(_sparsities(a)),
                         prune_fraction=float(a["prune_fraction"]), prune_count=a["prune_count"], scope=scope,
                         global_pruning=scope == "global", **common)


def _positive_heads(v) -> int:
    if not _is_int(v) or v < 1:
        raise SparsityError(f"num_heads values must be positive ints (heads of that qkv layer), got {v!r}.")
    return v


def _max_ratio(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
        raise SparsityError(f"max_pruning_ratio must be in (0, 1], got {v!r}.")
    return float(v)


def _sparsities(a: dict) -> Sequence[float]:
    sparsities, legacy = a["sparsities"], a["target_sparsity"]
    if legacy is None:
        return (0.5, 0.75, 0.9) if sparsities is None else sparsities
    warnings.warn("RTLPruner(target_sparsity=...) is deprecated; use sparsities=[...] (the same list).",
                  DeprecationWarning, stacklevel=5)
    if sparsities is not None:
        raise SparsityError("pass sparsities= only (target_sparsity= is its deprecated name), not both.")
    return legacy
