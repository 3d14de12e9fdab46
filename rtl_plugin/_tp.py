"""The one module that talks to torch-pruning (pinned to 1.6.1; a v2 rewrite is in progress upstream).

Everything else in rtl-plugin goes through these helpers, so a torch-pruning upgrade touches one file.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
import threading
import types
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from rtl_plugin._classes import merge_classes

CONV_TYPES = tp.ops.TORCH_CONV
LINEAR_TYPES = tp.ops.TORCH_LINEAR


def is_conv(m: nn.Module) -> bool:
    return isinstance(m, CONV_TYPES)


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, LINEAR_TYPES)


def is_prunable_weight_layer(m: nn.Module) -> bool:
    """Conv (incl. transposed) and Linear layers with a weight tensor."""
    return (is_conv(m) or is_linear(m)) and isinstance(getattr(m, "weight", None), torch.Tensor)


@contextlib.contextmanager
def _tracing_state(model: nn.Module):
    """tp's tracing puts the model in eval mode and drops params with requires_grad=False:
    restore the training flags and force requires_grad while tracing."""
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, g in grads.items():
            p.requires_grad_(g)
        for m, t in modes.items():
            m.training = t


def build_graph(model: nn.Module, example_inputs, *, customized_pruners=None,
                unwrapped_parameters=None) -> tp.DependencyGraph:
    """Trace ``model`` with torch-pruning, keeping its training flags and requires_grad flags."""
    with _tracing_state(model):
        dg = tp.DependencyGraph().build_dependency(
            model, example_inputs=example_inputs, customized_pruners=customized_pruners,
            unwrapped_parameters=unwrapped_parameters, verbose=False)
    repair_splits(dg)
    return dg


def graph_modules(dg: tp.DependencyGraph) -> list[nn.Module]:
    return [m for m in dg.module2node.keys() if isinstance(m, nn.Module)]


def all_groups(dg: tp.DependencyGraph, ignored: Sequence[nn.Module]):
    """All coupled channel groups rooted at conv/linear layers (full index lists)."""
    return list(dg.get_all_groups(ignored_layers=list(ignored),
                                  root_module_types=(CONV_TYPES, LINEAR_TYPES)))


def group_items(dg: tp.DependencyGraph, group) -> Iterable[tuple[object, bool, list[int], list[int]]]:
    """Yield ``(target, is_out_channel, idxs, root_idxs)`` for every item of a group."""
    for item in group.items:
        dep = item.dep
        yield (dep.target.module, bool(dg.is_out_channel_pruning_fn(dep.handler)),
               [int(i) for i in item.idxs], [int(i) for i in item.root_idxs])


def out_channels(dg: tp.DependencyGraph, m: nn.Module):
    pruner = dg.get_pruner_of_module(m)
    return None if pruner is None else pruner.get_out_channels(m)


def in_channels(dg: tp.DependencyGraph, m: nn.Module):
    pruner = dg.get_pruner_of_module(m)
    return None if pruner is None else pruner.get_in_channels(m)


def replay_history(dg: tp.DependencyGraph, history: list) -> None:
    """Physically prune by replaying ``[[root_name, is_out_channel, idxs], ...]``.

    tp 1.6.1's split pruner updates a split's sizes but stores the new offsets on itself instead of the split,
    so later groups would map channels through stale offsets: they are refreshed before every step."""
    for entry in history:
        refresh_split_offsets(dg)
        dg.load_pruning_history([entry])


def default_importance():
    """torch-pruning's group L1 magnitude importance, the default channel criterion."""
    return tp.importance.GroupMagnitudeImportance(p=1)


def out_channel_group(dg: tp.DependencyGraph, module: nn.Module, idxs: Sequence[int]):
    """The tp group that pruning ``module``'s output channels ``idxs`` would touch (for importance estimation)."""
    pruner = dg.get_pruner_of_module(module)
    return dg.get_pruning_group(module, pruner.prune_out_channels, list(idxs))


def group_graph(group) -> tp.DependencyGraph | None:
    """The DependencyGraph a tp group was built by (None for a hand-made group).

    tp 1.6.1 keeps it in the group's private ``_DG`` and has no public accessor; this adapter is the one
    place that relies on it."""
    return getattr(group, "_DG", None)


def module_name(group, module) -> str | None:
    """The name under which ``group``'s graph traced ``module`` (relative to the traced model), or None."""
    dg = group_graph(group)
    if dg is None or not isinstance(module, nn.Module):
        return None
    return dg._module2name.get(module)  # tp 1.6.1: the graph's module -> name map has no public accessor


def is_out_channel_item(group, item) -> bool:
    """True when ``item`` of ``group`` prunes its target's output channels (False: input channels)."""
    dg = group_graph(group)
    return dg is not None and bool(dg.is_out_channel_pruning_fn(item.dep.handler))


def count_macs(model: nn.Module, example_inputs):
    """torch-pruning's MAC count of ``model`` on ``example_inputs`` (bias adds and element-wise ops included)."""
    macs, _ = tp.utils.count_ops_and_params(model, example_inputs)
    return macs


def item_module(item):
    """The module (or tp virtual op) a group item prunes."""
    return item.dep.target.module


def group_root(group) -> tuple[object, int]:
    """``(root module, number of channels)`` of a tp group: its first item's target and index count."""
    first = group.items[0]
    return item_module(first), len(first.idxs)


# --------------------------------------------------------------------------- importances and pruners (RTLPruner)
BasePruner = tp.pruner.BasePruner
linear_scheduler = tp.pruner.algorithms.scheduler.linear_scheduler


def importance_kind(importance) -> str:
    """What an importance criterion needs: "magnitude" (|w|^p, element-level too), "taylor" (|w·∂L/∂w|, needs
    gradients), "hessian" (needs accumulated gradients), "random", "group" (a channel-group criterion with no
    element-level meaning: BN scale, LAMP, FPGM), "activation"/"obdc" (need hooks on the pruned model itself) or
    "custom" (any other callable)."""
    imp = tp.importance
    if isinstance(importance, imp.GroupHessianImportance):
        return "hessian"
    if isinstance(importance, imp.GroupTaylorImportance):
        return "taylor"
    if isinstance(importance, imp.OBDCImportance):
        return "obdc"
    if isinstance(importance, imp.ActivationImportance):
        return "activation"
    if isinstance(importance, (imp.BNScaleImportance, imp.LAMPImportance, imp.FPGMImportance)):
        return "group"
    if isinstance(importance, imp.GroupMagnitudeImportance):
        return "magnitude"
    if isinstance(importance, imp.RandomImportance):
        return "random"
    return "custom"


def magnitude_power(importance) -> float:
    """The norm order p of a magnitude importance (tp keeps it as ``p``)."""
    return float(getattr(importance, "p", 2))


def fill_hessian_gradients(importance) -> None:
    """Move a GroupHessianImportance's accumulated squared gradients into ``param.grad`` (averaged), as tp does on
    its first call, and clear them. tp 1.6.1 keeps them in private ``_accu_grad`` / ``_counter``; RTLPruner must
    do this before it copies the gradients onto a ticket's plain model."""
    accu = getattr(importance, "_accu_grad", None)
    if not accu:
        return
    counter = getattr(importance, "_counter", {})
    for p, g in accu.items():
        p.grad = g / counter.get(p, 1)
    importance.zero_grad()


def pruning_groups(pruner, *, interactive: bool = True):
    """``pruner.step(interactive=True)``: the groups tp's own ranking, ratios, ``round_to``, isomorphic and head
    logic select for this step (each must be ``.prune()``-d while iterating)."""
    return pruner.step(interactive=interactive)


def group_item_pruning(group):
    """``[(module, is_out_channel, idxs)]`` for every item of a tp group (module may be a tp virtual op)."""
    dg = group_graph(group)
    out = []
    for item in group:
        out.append((item_module(item), bool(dg.is_out_channel_pruning_fn(item.dep.handler)), list(item.idxs)))
    return out


def prime_initial_channels(pruner) -> None:
    """Let ``pruner`` record its scopes' initial channel counts on the still-dense model without pruning anything.

    tp 1.6.1 records them (private ``_scope_initial_channels``) during the first step; a pruner that resumes on a
    model already pruned by an earlier run must record them from the dense model first. One dry step with a
    magnitude importance; the step counter and the head bookkeeping it touches are restored."""
    saved = (pruner.current_step, pruner.importance, dict(pruner.num_heads), dict(pruner.out_channel_groups))
    pruner.importance = default_importance()
    try:
        for _ in pruner.step(interactive=True):
            pass
    finally:
        pruner.current_step, pruner.importance = saved[0], saved[1]
        pruner.num_heads.clear()
        pruner.num_heads.update(saved[2])
        pruner.out_channel_groups.clear()
        pruner.out_channel_groups.update(saved[3])


# ---------------------------------------------------------------- refusing the live routed model
# torch-pruning has no hook to refuse a model: a routed model detects tp on the call stack instead. tp 1.6.1 traces
# in DependencyGraph.build_dependency -> _trace (every pruner's constructor calls it) and counts in
# utils.count_ops_and_params (a deep copy run under forward hooks).
_WATCHED_CODES = (tp.DependencyGraph.build_dependency.__code__, tp.DependencyGraph._trace.__code__,
                  inspect.unwrap(tp.utils.count_ops_and_params).__code__)
_RECORD_HOOK_CODE = next(c for c in tp.DependencyGraph._trace.__code__.co_consts
                         if isinstance(c, types.CodeType) and c.co_name == "_record_grad_fn")
_allowance = threading.local()


@contextlib.contextmanager
def allow_routed_trace():
    """rtl-plugin's own code may trace a live routed model inside this block (e.g. to read tp's groups);
    routed models refuse every other torch-pruning trace (see ``active_tool``)."""
    _allowance.depth = getattr(_allowance, "depth", 0) + 1
    try:
        yield
    finally:
        _allowance.depth -= 1


def active_tool() -> str | None:
    """``"trace"`` while torch-pruning builds a dependency graph (outside ``allow_routed_trace``), ``"count"``
    while ``tp.utils.count_ops_and_params`` runs, else None: read from the caller's stack."""
    build, trace, count = _WATCHED_CODES  # identity tests: hashing a code object hashes its bytecode
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code is trace or code is build:
            return None if getattr(_allowance, "depth", 0) else "trace"
        if code is count:
            return "count"
        frame = frame.f_back
    return None


def remove_trace_hooks(modules: Iterable[nn.Module]) -> None:
    """Drop the forward hooks an aborted torch-pruning trace left on ``modules`` (tp removes them only when the
    traced forward succeeds, so a refused trace would otherwise leave them behind)."""
    for m in modules:
        for hid, fn in list(m._forward_hooks.items()):
            if getattr(fn, "__code__", None) is _RECORD_HOOK_CODE:
                del m._forward_hooks[hid]
                m._forward_hooks_with_kwargs.pop(hid, None)
                m._forward_hooks_always_called.pop(hid, None)


def count_ops_and_params(model: nn.Module, example_inputs) -> tuple[int, int]:
    """torch-pruning's ``(MACs, parameter count)`` of a plain ``model`` on ``example_inputs``."""
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def tracing(model: nn.Module):
    """Context for building a tp pruner over ``model``: autograd on (tp traces with it, even inside a caller's
    ``torch.no_grad()``), training and requires_grad flags restored afterwards."""
    return _tracing_state(model)


# --------------------------------------------------------------------------- guarded group building, tied channels
class GroupingStopped(Exception):
    """Group building was stopped: ``reason`` is "timeout", "explosion" or "error" (tp raised, see
    ``__cause__``); ``module`` is the root being grouped."""

    def __init__(self, reason: str, module, items: int):
        super().__init__(reason)
        self.reason, self.module, self.items = reason, module, items


_GROUP_PATCH_LOCK = __import__("threading").Lock()


@contextlib.contextmanager
def _watched_grouping(deadline: float | None, max_items: int | None, watch: dict):
    """While active, every dependency tp adds to a group checks the deadline and the group size, and every
    item merged into a final group is recorded (before tp's merge drops duplicate channel indices)."""
    import time

    from torch_pruning.dependency.group import Group
    orig_add, orig_merge = Group.add_dep, Group.add_and_merge

    def add_dep(self, dep, idxs):
        if deadline is not None and time.monotonic() > deadline:
            raise GroupingStopped("timeout", watch.get("root"), len(self._group))
        if max_items is not None and len(self._group) >= max_items:
            raise GroupingStopped("explosion", watch.get("root"), len(self._group))
        return orig_add(self, dep, idxs)

    def add_and_merge(self, dep, idxs):
        watch.setdefault(id(self), []).append((dep.target, dep.handler, list(idxs)))
        return orig_merge(self, dep, idxs)

    with _GROUP_PATCH_LOCK:
        Group.add_dep, Group.add_and_merge = add_dep, add_and_merge
        try:
            yield
        finally:
            Group.add_dep, Group.add_and_merge = orig_add, orig_merge


def _equal_chunk_size(node) -> int | None:
    """The chunk size of a channel split by a Python int (``torch.split(x, size, 1)``, ``x.chunk(n, 1)``): the
    model re-splits a pruned tensor with one size, so all chunks must keep the same count."""
    grad_fn = getattr(node, "grad_fn", None)
    if getattr(node, "type", None) != tp.ops.OPTYPE.SPLIT or grad_fn is None:
        return None
    size = getattr(grad_fn, "_saved_split_size", None)
    return int(size) if size and getattr(grad_fn, "_saved_dim", None) == 1 else None


def _tied_root_classes(records: list) -> list[list[int]]:
    """Root channels that tp maps onto one channel of one layer (tp's merge keeps only the first of them):
    pruning either prunes that channel, so they must be kept or dropped together. Likewise the same position
    of every chunk of a split by a fixed size."""
    first: dict[tuple, int] = {}
    pairs: list[tuple[int, int]] = []
    for target, handler, idxs in records:
        chunk = _equal_chunk_size(target)
        for hi in idxs:
            r = int(hi.root_idx)
            keys = [(id(target), id(handler), int(hi.idx))]
            if chunk:  # torch.split(x, size) / chunk(): every chunk must keep the same positions
                keys.append((id(target), "chunk-position", int(hi.idx) % chunk))
            for key in keys:
                if key in first:
                    pairs.append((first[key], r))
                else:
                    first[key] = r
    return merge_classes(pairs)


def all_groups_tied(dg: tp.DependencyGraph, ignored: Sequence[nn.Module], *, deadline: float | None = None,
                    max_items: int | None = None) -> list[tuple[object, list[list[int]]]]:
    """``[(group, tied root-channel classes)]`` for all groups rooted at conv/linear layers.

    Raises GroupingStopped when ``time.monotonic()`` passes ``deadline`` or one group's propagation adds more
    than ``max_items`` dependencies (tp's index propagation loops on some slice/concat patterns)."""
    watch: dict = {}
    out = []
    cls_get = type(dg).get_pruning_group

    def get_pruning_group(module, pruning_fn, idxs):  # remember which root is being grouped, for messages
        watch["root"] = module
        return cls_get(dg, module, pruning_fn, idxs)

    dg.get_pruning_group = get_pruning_group
    try:
        with _watched_grouping(deadline, max_items, watch):
            for grp in dg.get_all_groups(ignored_layers=list(ignored), root_module_types=(CONV_TYPES, LINEAR_TYPES)):
                out.append((grp, _tied_root_classes(watch.pop(id(grp), []))))
    except (IndexError, RuntimeError, ValueError, KeyError) as e:  # tp's index mapping fails on some patterns
        raise GroupingStopped("error", watch.get("root"), 0) from e
    finally:
        del dg.get_pruning_group
    return out


def node_count(dg: tp.DependencyGraph) -> int:
    """Number of nodes (modules and tp virtual ops) in the traced graph."""
    return len(dg.module2node)


_VIRTUAL_KINDS = {tp.ops.OPTYPE.CONCAT: "concat", tp.ops.OPTYPE.SPLIT: "split", tp.ops.OPTYPE.SLICE: "slice",
                  tp.ops.OPTYPE.UNBIND: "unbind", tp.ops.OPTYPE.RESHAPE: "reshape", tp.ops.OPTYPE.EXPAND: "expand",
                  tp.ops.OPTYPE.ELEMENTWISE: "elementwise"}


def group_op_kinds(group) -> set[str]:
    """Kinds of tp virtual ops ("concat", "split", "slice", "unbind", "reshape", "expand", "elementwise")
    a group's channels pass through."""
    kinds = set()
    for item in group.items:
        for node in (item.dep.source, item.dep.target):
            kind = _VIRTUAL_KINDS.get(node.type)
            if kind is not None:
                kinds.add(kind)
    return kinds


def _split_chunk_sizes(grad_fn) -> list[int] | None:
    """Chunk sizes of a channel (dim 1) split from its autograd node, or None for another dim / unknown."""
    dim = getattr(grad_fn, "_saved_dim", None)
    shape = getattr(grad_fn, "_saved_self_sym_sizes", None)
    if dim is None or shape is None or not 0 <= dim < len(shape) or dim != 1:
        return None
    sizes = getattr(grad_fn, "_saved_split_sizes", None)
    if sizes is not None:
        return [int(c) for c in sizes]
    size, total = getattr(grad_fn, "_saved_split_size", None), int(shape[dim])
    if not size:
        return None
    n = -(-total // int(size))
    return [int(size)] * (n - 1) + [total - int(size) * (n - 1)]


def _chunk_of_outputs(node) -> list[int] | None:
    """For each consumer of a split node, the chunk it reads (the ``output_nr`` of its autograd edge)."""
    chunks = []
    for out in node.outputs:
        nrs = [nr for fn, nr in getattr(out.grad_fn, "next_functions", ()) if fn is node.grad_fn]
        if len(nrs) != 1:
            return None
        chunks.append(nrs[0])
    return chunks


def repair_splits(dg: tp.DependencyGraph) -> int:
    """Fix tp 1.6.1's view of channel splits; returns how many split nodes changed.

    tp lists a split's consumers in the order its graph walk meets them, but maps chunk ``i`` to
    ``outputs[i]``; and for ``torch.split(x, int)`` it infers chunk sizes from the consumers (a concat
    consumer reports the concat's full width). In Res2Net, CSP and MixNet blocks the chunks then reach the
    wrong layers. The sizes are read from the autograd node, the consumers put in chunk order (the
    ``output_nr`` of their edge to the split). Splits whose chunks do not have one consumer each keep tp's
    order (the export check refuses what they break); index mappings are then rebuilt."""
    from torch_pruning.dependency import index_mapping
    changed = 0
    for node in dg.module2node.values():
        if node.type != tp.ops.OPTYPE.SPLIT or node.grad_fn is None:
            continue
        sizes, chunks = _split_chunk_sizes(node.grad_fn), _chunk_of_outputs(node)
        if sizes is None or chunks is None or sorted(chunks) != list(range(len(sizes))):
            continue
        ordered = [o for _, o in sorted(zip(chunks, node.outputs), key=lambda t: t[0])]
        if ordered != node.outputs or node.module.split_sizes != sizes:
            node.outputs[:] = ordered
            node.module.split_sizes = sizes
            changed += 1
    if changed:
        refresh_split_offsets(dg)
        for node in dg.module2node.values():
            if node.type == tp.ops.OPTYPE.CONCAT:
                node.module.concat_sizes = None  # inferred from the wrong split sizes: infer again
        index_mapping.update_index_mapping(dg)
    return changed


def refresh_split_offsets(dg: tp.DependencyGraph) -> None:
    """Recompute every split node's chunk offsets from its (pruned) chunk sizes."""
    for node in dg.module2node.values():
        sizes = getattr(node.module, "split_sizes", None) if node.type == tp.ops.OPTYPE.SPLIT else None
        if sizes and all(isinstance(c, int) for c in sizes):
            offsets = [0]
            for c in sizes:
                offsets.append(offsets[-1] + c)
            node.module.offsets = offsets


def failing_step(exc: BaseException) -> str | None:
    """The innermost torch-pruning function in ``exc``'s traceback (e.g. "update_reshape_index_mapping")."""
    import traceback
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "torch_pruning" in f.filename.replace("\\", "/")]
    return frames[-1].name if frames else None
