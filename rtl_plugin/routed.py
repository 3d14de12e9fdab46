"""RoutedModel: K tickets over one shared set of weights, each input (or pixel) routed to its ticket.

``routed(x, route=ids)`` with ``ids``
  * an int: every sample uses that ticket;
  * LongTensor [B]: one ticket per sample (a mixed batch is fine);
  * LongTensor [B, H, W]: one ticket per output pixel (dense prediction): every ticket present in a
    sample runs on that sample once and each pixel takes its region's ticket output
    (forward passes per batch = number of distinct (sample, ticket) pairs, batched).

Weight granularity runs each ticket's sub-batch with masked weights (``torch.func.functional_call``;
masked weights are cached per ticket when autograd is off). Channel granularity runs one pass with
per-sample activation masks ``mask[route]`` on every coupled layer's outputs and inputs.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from rtl_plugin import _tp
from rtl_plugin.errors import (ArchitectureMismatchError, ExecutionError, LiveRoutedModelError, RouteError, SpaceError,
                               TicketError, UnwrappedModelError)
from rtl_plugin.grouped import GroupLayout, layer_forward, layer_kind, map_tensors, run_grouped
from rtl_plugin.norms import (MaskedLayerNorm, RoutedBatchNorm, RouteState, grouped_batch_norm, require_route,
                              layer_norm_channel_dim, split_by_route)
from rtl_plugin.space import TicketSpace, architecture_fingerprint
from rtl_plugin.tickets import TicketSet


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _cat_outputs(outs: list):
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outs, 0)
    if isinstance(first, (tuple, list)):
        items = [_cat_outputs([o[i] for o in outs]) for i in range(len(first))]
        if isinstance(first, list):
            return items
        return type(first)(*items) if hasattr(first, "_fields") else tuple(items)
    if isinstance(first, dict):
        return type(first)({k: _cat_outputs([o[k] for o in outs]) for k in first})
    raise RouteError(f"cannot merge model outputs of type {type(first).__name__} across tickets; "
                     "return tensors, tuples, lists or dicts of tensors.")


EXECUTIONS = ("auto", "grouped", "bucketed")
_PLAIN_FORWARDS = {c.forward for c in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                        nn.ConvTranspose2d, nn.ConvTranspose3d)}


def _channel_dim(m: nn.Module) -> int:
    return -1 if _tp.is_linear(m) else 1


def check_route(route, x: torch.Tensor, num_tickets: int):
    """Validate ``route`` for input ``x`` [B, ...]: returns an int ticket or a LongTensor [B] / [B, H, W].

    Raises RouteError naming the problem (None, bool, float dtype, wrong device or shape, id outside [0, K)).
    """
    K = num_tickets
    if route is None:
        raise RouteError("route is required: pass route=<int ticket>, a LongTensor [B] (per sample) or "
                         "[B, H, W] (per pixel), or a router's output.")
    if isinstance(route, bool):
        raise RouteError("route must be an int or an integer tensor, got a bool.")
    if isinstance(route, np.integer):
        route = int(route)
    if isinstance(route, torch.Tensor) and route.dim() == 0:
        if route.is_floating_point() or route.dtype == torch.bool or route.is_complex():
            raise RouteError(f"route must have an integer dtype, got {route.dtype}; use route.long().")
        route = int(route)
    if isinstance(route, int):
        if not 0 <= route < K:
            raise RouteError(f"ticket id {route} is out of range [0, {K}); valid tickets are 0..{K - 1}.")
        return route
    if not isinstance(route, torch.Tensor):
        raise RouteError(f"route must be an int or a LongTensor, got {type(route).__name__}.")
    if route.is_floating_point() or route.dtype == torch.bool or route.is_complex():
        raise RouteError(f"route must have an integer dtype, got {route.dtype}; use route.long().")
    if route.device != x.device:
        raise RouteError(f"route is on {route.device} but the input is on {x.device}; move it with route.to(x.device).")
    if route.dim() not in (1, 3):
        raise RouteError(f"route must be [B] (per sample) or [B, H, W] (per pixel), got shape {tuple(route.shape)}.")
    if route.shape[0] != x.shape[0]:
        raise RouteError(f"route has {route.shape[0]} entries for a batch of {x.shape[0]}; give one ticket id per sample.")
    if route.numel():
        lo, hi = (int(v) for v in torch.aminmax(route))  # one device sync
        if lo < 0 or hi >= K:
            raise RouteError(f"route contains ticket id {lo if lo < 0 else hi}, outside [0, {K}); valid tickets are 0..{K - 1}.")
    return route.long()


def run_bucketed(run_ticket, args, kwargs, route: torch.Tensor):
    """Bucket a batch by ticket and run ``run_ticket(args, kwargs, t)`` once per ticket present.

    ``route`` LongTensor [B]; tensor args with batch dim B are sorted by ticket (argsort, no per-sample
    Python loop), split into contiguous buckets, and the outputs are restored to the input order.
    """
    B = route.shape[0]
    perm, tickets, counts, inverse = split_by_route(route)
    if len(tickets) == 1:
        return run_ticket(args, kwargs, tickets[0])
    sorted_args = [a.index_select(0, perm) if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == B else a
                   for a in args]
    chunks = [a.split(counts) if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == B else None
              for a in sorted_args]
    outs = []
    for i, t in enumerate(tickets):
        sub = tuple(c[i] if c is not None else a for c, a in zip(chunks, sorted_args))
        outs.append(run_ticket(sub, kwargs, t))
    return map_tensors(_cat_outputs(outs), lambda o: o.index_select(0, inverse))


def run_per_pixel(run_per_sample, args, kwargs, route: torch.Tensor, num_tickets: int):
    """Per-pixel routing ``route`` [B, H, W]: every ticket present in a sample runs on that sample once
    (``run_per_sample(args, kwargs, ids [P])`` on the expanded batch of distinct (sample, ticket) pairs) and
    each output pixel takes its region's ticket output. The model must return [B, C, H, W] or [B, H, W]."""
    B, H, W = route.shape
    K = num_tickets
    present = torch.zeros(B, K, dtype=torch.bool, device=route.device)
    present.scatter_(1, route.reshape(B, -1), True)
    pairs = present.nonzero()  # [P, 2] rows (sample, ticket), sorted
    b_idx, t_idx = pairs[:, 0], pairs[:, 1]
    exp_args = tuple(a.index_select(0, b_idx) if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == B else a
                     for a in args)
    out = run_per_sample(exp_args, kwargs, t_idx)
    if not isinstance(out, torch.Tensor) or out.dim() not in (3, 4):
        raise RouteError("per-pixel routes need a model that returns one tensor [B, C, H, W] or [B, H, W].")
    if tuple(out.shape[-2:]) != (H, W):
        raise RouteError(f"pixel route has size {H}x{W} but the model output is {out.shape[-2]}x{out.shape[-1]}; "
                         "give one ticket id per output pixel.")
    sel = route.index_select(0, b_idx) == t_idx.view(-1, 1, 1)
    if out.dim() == 4:
        sel = sel.unsqueeze(1)
    contrib = torch.where(sel, out, torch.zeros((), dtype=out.dtype, device=out.device))
    res = torch.zeros((B,) + tuple(out.shape[1:]), dtype=out.dtype, device=out.device)
    return res.index_add(0, b_idx, contrib)


def mask_channels(x: torch.Tensor, m: torch.Tensor, dim: int, name: str) -> torch.Tensor:
    """``x`` times the per-sample channel mask ``m`` [B or 1, C] along ``dim`` (layer ``name`` for errors)."""
    if m.shape[0] not in (1, x.shape[0]) or x.shape[dim] != m.shape[1]:
        raise RouteError(f"layer {name!r}: cannot apply a [{m.shape[0]}, {m.shape[1]}] channel mask to a tensor of "
                         f"shape {tuple(x.shape)} (channel dim {dim}); layers that fold other dims into the batch "
                         "cannot be routed per sample in channel mode.")
    shape = [m.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = m.shape[1]
    return x * m.to(x.dtype).view(shape)


class _ChannelMaskHook:
    """Channel mode: masks a coupled layer's output (``side="out"``, a forward hook) or input (``side="in"``, a
    forward pre-hook) with the sample's ticket mask. A plain object rather than a closure, so that
    ``copy.deepcopy`` of the routed model rebinds it to the copy's RouteState."""

    def __init__(self, state: RouteState, name: str, dim: int, side: str):
        self.state, self.name, self.dim, self.side = state, name, dim, side

    def __call__(self, module, args, *output):
        require_route(self.state, self.name)
        m = self.state.sample_mask(self.name, self.side)
        if self.side == "out":
            return output[0] if m is None else mask_channels(output[0], m, self.dim, self.name)
        if m is None or not args:
            return None
        return (mask_channels(args[0], m, self.dim, self.name),) + tuple(args[1:])


def refuse_torch_pruning(root: nn.Module) -> None:
    """Raise LiveRoutedModelError when torch-pruning traces (a pruner, ``build_dependency``) or counts
    (``tp.utils.count_ops_and_params``) the live routed model ``root``; a refused trace's hooks are removed."""
    if torch.compiler.is_compiling():
        return  # torch.compile traces the routed forward itself; tp never runs under it
    tool = _tp.active_tool()
    if tool == "trace":
        _tp.remove_trace_hooks(root.modules())
        raise LiveRoutedModelError(
            "torch-pruning is tracing the live routed model (a RoutedModel, its .model or a ticket_module(k) view): "
            "all tickets share its weights and its norms hold per-ticket statistics, so pruning it would cut every "
            "ticket and break the model. Prune a plain copy instead: plain = routed.plain_copy(k) (rank its "
            "channels with TicketImportance(routed, k)), or take rtl.export_ticket(routed, k).")
    if tool == "count":
        raise LiveRoutedModelError(
            "tp.utils.count_ops_and_params cannot count the live routed model: every ticket has its own size. "
            "Use routed.count_ops_and_params(k, example_inputs), or count a plain model: "
            "tp.utils.count_ops_and_params(rtl.export_ticket(routed, k), example_inputs).")


class _ToolGuard:
    """Forward pre-hook on the wrapped model: when it runs outside a routed forward (called directly, e.g. by a
    torch-pruning trace of ``routed.model``), refuse torch-pruning. Holds only the RouteState (deepcopy-safe)."""

    def __init__(self, state: RouteState):
        self.state = state

    def __call__(self, module, args):
        if self.state.route is None:
            refuse_torch_pruning(module)
        return None


class RoutedModel(nn.Module):
    """Routed-mask wrapper (PEFT-style: the model is wrapped in place, extra state stays small).

    Args:
        model: the network; its BatchNorms become ``RoutedBatchNorm`` (unless ``shared_norm``) and, in
            channel mode, its coupled LayerNorms become ``MaskedLayerNorm``.
        space: the ``TicketSpace`` of ``model``.
        num_tickets: K (ignored when ``tickets`` is given).
        tickets: initial masks (default: all-ones).
        shared_norm: keep one set of norm statistics for all tickets (reproduces the paper exactly).
        cache_masked_weights: weight mode, keep masked weights while autograd is off (an LRU cache keyed on the
            weight and mask versions): True (no bound; at most K ticket copies per path and autocast dtype), False
            (none: every forward masks the weights again) or an int N (at most N ticket copies of the prunable
            weights, least recently used dropped first: memory <= N x the prunable weights). The grouped path
            caches the stack of all K tickets (K copies) or, with a smaller bound, masks one layer at a time.
        execution: weight mode, how a mixed batch runs (see ``execution``): "auto" (default), "grouped" or
            "bucketed".
    """

    def __init__(self, model: nn.Module, space: TicketSpace, *, num_tickets: int | None = None,
                 tickets: TicketSet | None = None, shared_norm: bool = False, cache_masked_weights: bool | int = True,
                 execution: str = "auto"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        if not isinstance(space, TicketSpace):
            raise TypeError(f"space must be a TicketSpace (build one with rtl.build_space), got {type(space).__name__}.")
        if architecture_fingerprint(model) != space.fingerprint:
            raise ArchitectureMismatchError("the ticket space was built for another architecture (parameter names "
                                            "or shapes differ); build the space from this model.")
        if tickets is None:
            if num_tickets is None:
                raise TicketError("pass num_tickets=K (or an initial TicketSet).")
            tickets = TicketSet.full(space, num_tickets)
        elif tickets.space.to_dict() != space.to_dict():
            raise TicketError("the TicketSet belongs to another ticket space; build it from this space.")
        self.model = model
        self.space = space
        self.shared_norm = bool(shared_norm)
        # (ticket, autocast dtype) or ("stack", autocast dtype) -> (versions key, masked weights, ticket copies)
        self._cache: OrderedDict[tuple, tuple[Any, dict, int]] = OrderedDict()
        self.cache_masked_weights = cache_masked_weights
        object.__setattr__(self, "tickets", tickets)
        object.__setattr__(self, "_state", RouteState())
        self._hook_ids: set[int] = set()
        self._handles: list = []
        self._install()
        self._grouped_blocker = self._find_grouped_blocker()
        self.execution = execution
        try:
            dev = next(model.parameters()).device
            tickets.to(dev)
        except StopIteration:
            pass

    # ------------------------------------------------------------------ setup
    @property
    def num_tickets(self) -> int:
        return self.tickets.num_tickets

    @property
    def granularity(self) -> str:
        return self.space.granularity

    def _install(self) -> None:
        K = self.num_tickets
        mods = dict(self.model.named_modules())
        if not self.shared_norm:
            for name, m in list(mods.items()):
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    RoutedBatchNorm.convert(m, K, self._state, name)
        if self.granularity == "channel":
            touched = {}
            for g in self.space.groups:
                for it in g.items:
                    touched.setdefault(it.module, set()).add("out" if it.out else "in")
            mods = dict(self.model.named_modules())
            for name, sides in touched.items():
                m = mods[name]
                if isinstance(m, nn.LayerNorm):
                    _set_submodule(self.model, name, MaskedLayerNorm(m, self._state, name, layer_norm_channel_dim(m)))
                    continue
                dim = _channel_dim(m)
                if "out" in sides:
                    self._keep_handle(m.register_forward_hook(_ChannelMaskHook(self._state, name, dim, "out")))
                if "in" in sides:
                    self._keep_handle(m.register_forward_pre_hook(_ChannelMaskHook(self._state, name, dim, "in")))
        self._keep_handle(self.model.register_forward_pre_hook(_ToolGuard(self._state)))
        self._weight_params = {n: self.model.get_submodule(n).weight for n in self.space.layers}
        # layers whose forward is the stock conv / linear one: their weights may be pre-cast under autocast
        self._plain_layer = {n: type(self.model.get_submodule(n)).forward in _PLAIN_FORWARDS for n in self.space.layers}

    def _find_grouped_blocker(self) -> str | None:
        """Why the grouped path cannot run this model (None: it can): it needs every prunable layer to be a
        plain conv / linear applied through its own forward."""
        if self.granularity != "weight":
            return None
        for n in self.space.layers:
            m = self.model.get_submodule(n)
            if layer_kind(m) is None:
                return f"prunable layer {n!r} is a {type(m).__name__}, not a plain conv or linear layer"
            if parametrize.is_parametrized(m):
                return f"prunable layer {n!r} has a parametrization"
        for name, m in self.model.named_modules():
            if isinstance(m, nn.MultiheadAttention) and any(n.startswith(f"{name}.") for n in self.space.layers):
                return f"nn.MultiheadAttention {name!r} uses its projections' weights without their forward"
        return None

    @property
    def grouped_blocker(self) -> str | None:
        """Why ``execution="grouped"`` cannot run this model, or None when it can."""
        return self._grouped_blocker

    @property
    def execution(self) -> str:
        """How a mixed batch runs in weight mode.

        "bucketed": one masked forward per ticket present (K calls per layer). "grouped": one forward for all
        tickets present (each masked conv / linear a single grouped call over the stacked masked weights, buckets
        padded to the largest; see ``rtl_plugin.grouped``). "auto" (default): grouped on CUDA when the model
        allows it (``grouped_blocker`` is None), bucketed on the CPU, where K small calls already cost about one
        dense call and grouping adds padding. Both give the same result within float tolerance. Channel mode
        always runs one pass with per-sample channel masks.
        """
        return self._execution

    @execution.setter
    def execution(self, value: str) -> None:
        if not isinstance(value, str) or value not in EXECUTIONS:
            raise ExecutionError(f"execution must be one of {EXECUTIONS}, got {value!r}.")
        if value == "grouped" and self._grouped_blocker is not None:
            raise ExecutionError(f"execution='grouped' cannot run this model: {self._grouped_blocker}; use "
                                 "execution='auto' (falls back to the bucketed path) or 'bucketed'.")
        object.__setattr__(self, "_execution", value)

    @property
    def cache_masked_weights(self) -> bool | int:
        """True, False or an int bound (ticket copies); see the class docstring. Lowering it drops entries."""
        return self._cache_setting

    @cache_masked_weights.setter
    def cache_masked_weights(self, value: bool | int) -> None:
        if not isinstance(value, (bool, int)) or (not isinstance(value, bool) and value < 0):
            raise ExecutionError(f"cache_masked_weights must be True, False or an int >= 0 (ticket copies kept), "
                                 f"got {value!r}.")
        object.__setattr__(self, "_cache_setting", value)
        self._trim_cache()

    def _cache_budget(self) -> float:
        c = self._cache_setting
        return math.inf if c is True else (0 if c is False else int(c))

    def _trim_cache(self) -> None:
        budget = self._cache_budget()
        while self._cache and sum(e[2] for e in self._cache.values()) > budget:
            self._cache.popitem(last=False)

    def _cache_get(self, key: tuple, versions) -> dict | None:
        hit = self._cache.get(key)
        if hit is None or hit[0] != versions:
            return None
        self._cache.move_to_end(key)
        return hit[1]

    def _cache_put(self, key: tuple, versions, params: dict, copies: int) -> None:
        self._cache.pop(key, None)
        if copies <= self._cache_budget():
            self._cache[key] = (versions, params, copies)
            self._trim_cache()

    def _keep_handle(self, handle) -> None:
        self._handles.append(handle)
        self._hook_ids.add(handle.id)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        try:
            self.tickets.to(next(self.model.parameters()).device)
        except StopIteration:
            pass
        self._cache.clear()
        return self

    # ------------------------------------------------------------------ tickets
    def set_tickets(self, tickets: TicketSet) -> None:
        """Replace all masks (same space and K)."""
        if not isinstance(tickets, TicketSet):
            raise TicketError(f"expected a TicketSet, got {type(tickets).__name__}.")
        if tickets.space.to_dict() != self.space.to_dict():
            raise TicketError("the TicketSet belongs to another ticket space (architecture or granularity differ).")
        if tickets.num_tickets != self.num_tickets:
            raise TicketError(f"the TicketSet holds {tickets.num_tickets} tickets, this model routes {self.num_tickets}; "
                              "routed norm statistics are per ticket, so K cannot change through set_tickets; "
                              "grow it with routed.add_ticket(...).")
        try:
            tickets.to(next(self.model.parameters()).device)
        except StopIteration:
            pass
        object.__setattr__(self, "tickets", tickets)
        self._cache.clear()

    def set_ticket(self, k: int, masks: dict[str, torch.Tensor]) -> None:
        """Replace ticket ``k``'s masks (``{name: BoolTensor}`` of one ticket) and drop its cached weights."""
        self._check_live()
        self.tickets.set_ticket(k, masks)
        self._cache.clear()

    def add_ticket(self, masks: dict[str, torch.Tensor] | None = None, *, norm_init="mean") -> int:
        """Grow the model by one ticket, K -> K + 1, and return its id K; the earlier tickets are untouched.

        ``masks``: the new ticket's masks (one ticket's ``{key: BoolTensor}``), default dense. Every routed
        BatchNorm gets a K-th row of running statistics, initialised from ``norm_init``: "mean" (the average of
        the existing tickets' statistics: a neutral start that the new ticket's training overwrites; default),
        an int ticket id (a copy of that ticket's statistics, e.g. the ticket whose domain is closest) or
        "fresh" (mean 0, variance 1). Norm affine parameters and LayerNorms stay shared. Search and train the
        newcomer without touching the other tickets with :func:`rtl_plugin.pruning.grow.grow_ticket`.
        """
        self._check_live()
        K = self.num_tickets
        valid = norm_init in ("mean", "fresh") if isinstance(norm_init, str) else False
        if isinstance(norm_init, (int, np.integer)) and not isinstance(norm_init, bool):
            valid, norm_init = 0 <= int(norm_init) < K, int(norm_init)
        if not valid:
            raise TicketError(f"norm_init must be 'mean', 'fresh' or a ticket id in [0, {K}), got {norm_init!r}.")
        grown = self.tickets.appended(masks)  # validates the masks before anything changes
        for m in self.model.modules():
            if isinstance(m, RoutedBatchNorm):
                m.add_ticket(norm_init)
        try:
            grown.to(next(self.model.parameters()).device)
        except StopIteration:
            pass
        object.__setattr__(self, "tickets", grown)
        self._cache.clear()
        return K

    def masks_changed(self) -> None:
        """Tell the model that its ticket masks were edited in place (drops cached masked weights)."""
        self.tickets.mark_modified()
        self._cache.clear()

    def prunable_weights(self) -> dict[str, nn.Parameter]:
        """The shared prunable weights by module name, in ticket-space order (the real parameters, not copies)."""
        self._check_live()
        return dict(self._weight_params)

    def ticket_module(self, k: int) -> nn.Module:
        """An ``nn.Module`` view whose forward runs ticket ``k``, for training loops and evaluation.

        It shares every weight with this model, so it is not something to prune: torch-pruning pruners and
        ``TicketImportance`` refuse it (LiveRoutedModelError). Prune ``plain_copy(k)`` or use
        ``rtl.export_ticket(routed, k)``; count it with ``count_ops_and_params(k, example_inputs)``.
        """
        self._check_live()
        self.tickets.check_index(k)
        return _TicketView(self, int(k))

    # ------------------------------------------------------------------ forward
    def _check_route(self, route, x: torch.Tensor):
        return check_route(route, x, self.num_tickets)

    def forward(self, *args, route=None, **kwargs):
        self._check_live()
        refuse_torch_pruning(self)
        if not args or not isinstance(args[0], torch.Tensor):
            raise RouteError("RoutedModel expects the input tensor as its first positional argument.")
        x = args[0]
        p = next(self.model.parameters(), None)
        if p is not None and p.device != x.device:
            raise RouteError(f"the input is on {x.device} but the model is on {p.device}; move one of them.")
        route = self._check_route(route, x)
        if isinstance(route, torch.Tensor) and route.shape[0] == 0:
            return self._run_ticket(args, kwargs, 0)  # empty batch: any ticket gives the empty output
        if isinstance(route, int):
            return self._run_ticket(args, kwargs, route)
        if route.dim() == 1:
            return self._run_per_sample(args, kwargs, route)
        return self._run_per_pixel(args, kwargs, route)

    def _cache_context(self):
        """(autocast dtype or None, versions key) when masked weights may be cached now, else None: autograd off
        and a non-zero bound. The key changes with an optimizer step, a mask change or moved weights."""
        if self._cache_setting is False or self._cache_budget() == 0 or torch.is_grad_enabled():
            return None
        cast = None
        dev = next(iter(self._weight_params.values())).device.type
        if dev in ("cuda", "cpu", "xpu", "mps") and torch.is_autocast_enabled(dev):
            cast = torch.get_autocast_dtype(dev)
        versions = (self.tickets.version, tuple(p._version for p in self._weight_params.values()),
                    tuple(p.data_ptr() for p in self._weight_params.values()))
        return cast, versions

    def _masked_params(self, t: int) -> dict[str, torch.Tensor]:
        """``{"<layer>.weight": W * mask_t}``; cached per ticket while autograd is off (keyed on mask and
        weight versions, so optimizer steps and mask changes invalidate it). Under autocast (CUDA fp16/bf16,
        CPU bf16) the cached weights of plain conv/linear layers are stored already cast to the autocast
        dtype, so neither masking nor casting is repeated on every call."""
        ctx = self._cache_context()
        if ctx is not None:
            hit = self._cache_get((t, ctx[0]), ctx[1])
            if hit is not None:
                return hit
        masks = self.tickets.masks
        params = {}
        for n, w in self._weight_params.items():
            mw = w * masks[n][t].to(w.dtype)
            if ctx is not None and ctx[0] is not None and w.is_floating_point() and self._plain_layer[n]:
                mw = mw.to(ctx[0])
            params[f"{n}.weight"] = mw
        if ctx is not None:
            self._cache_put((t, ctx[0]), ctx[1], params, 1)
        return params

    def _stacked_weights(self) -> dict[str, torch.Tensor] | None:
        """``{layer: W * masks [K, ...]}`` for all K tickets, from the cache (filled when the bound allows K
        copies and autograd is off); None when it cannot be cached (the grouped layers then mask on the fly)."""
        ctx = self._cache_context()
        if ctx is None or self._cache_budget() < self.num_tickets:
            return None
        key = ("stack", ctx[0])
        hit = self._cache_get(key, ctx[1])
        if hit is None:
            hit = {}
            for n, w in self._weight_params.items():
                mw = torch.where(self.tickets.masks[n], w.unsqueeze(0), w.new_zeros(()))
                hit[n] = mw.to(ctx[0]) if ctx[0] is not None and w.is_floating_point() else mw
            self._cache_put(key, ctx[1], hit, self.num_tickets)
        return hit

    def _grouped_layer_forwards(self, layout: GroupLayout) -> dict[nn.Module, Any]:
        """The patched forwards of one grouped call: every prunable layer over the present tickets' stacked masked
        weights, and (shared norms using batch statistics) each plain BatchNorm per ticket."""
        stacked, ids, every = self._stacked_weights(), layout.ticket_ids, layout.all_of(self.num_tickets)
        forwards = {}
        for n, w in self._weight_params.items():
            if stacked is not None:
                full = stacked[n]
                fn = (lambda full=full: full) if every else (lambda full=full: full.index_select(0, ids))
            else:
                masks = self.tickets.masks[n]  # where(): no float copy of the masks (one [T, ...] tensor per layer)
                fn = (lambda w=w, masks=masks: torch.where(masks if every else masks.index_select(0, ids),
                                                           w.unsqueeze(0), w.new_zeros(())))
            forwards[self.model.get_submodule(n)] = layer_forward(self.model.get_submodule(n), fn)
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, RoutedBatchNorm) and \
                    (m.training or m.running_mean is None):
                forwards[m] = lambda x, m=m: grouped_batch_norm(m, x, layout)
        return forwards

    def _run_grouped(self, args, kwargs, route: torch.Tensor):
        layout = GroupLayout(route)
        forwards = self._grouped_layer_forwards(layout)
        try:
            self._state.set(route, layout=layout)
            return run_grouped(lambda a, kw: self.model(*a, **kw), args, kwargs, layout, forwards)
        finally:
            self._state.clear()

    def execution_on(self, device) -> str:
        """The path a mixed batch on ``device`` takes now ("auto" resolved): "grouped" or "bucketed" (weight
        mode); "single-pass" in channel mode."""
        if self.granularity != "weight":
            return "single-pass"
        return "grouped" if self._grouped_now(torch.device(device)) else "bucketed"

    def _grouped_now(self, device: torch.device) -> bool:
        if self.granularity != "weight" or self._execution == "bucketed":
            return False
        if self._execution == "grouped":
            return True
        return self._grouped_blocker is None and device.type == "cuda" and not torch.compiler.is_compiling()

    def _run_ticket(self, args, kwargs, t: int):
        try:
            if self.granularity == "weight":
                self._state.set(t)
                return functional_call(self.model, self._masked_params(t), args, kwargs, strict=False)
            self._state.set(t, self.tickets.layer_channel_masks())
            return self.model(*args, **kwargs)
        finally:
            self._state.clear()

    def _run_per_sample(self, args, kwargs, route: torch.Tensor):
        if self.granularity == "channel":
            try:
                self._state.set(route, self.tickets.layer_channel_masks())
                return self.model(*args, **kwargs)
            finally:
                self._state.clear()
        if self._grouped_now(route.device):
            return self._run_grouped(args, kwargs, route)
        return run_bucketed(self._run_ticket, args, kwargs, route)

    def _run_per_pixel(self, args, kwargs, route: torch.Tensor):
        return run_per_pixel(self._run_per_sample, args, kwargs, route, self.num_tickets)

    # ------------------------------------------------------------------ plain copies
    def plain_copy(self, ticket: int) -> nn.Module:
        """Deep copy of the wrapped model without routing hooks, norms holding ticket ``ticket``'s statistics.

        A dense model with the shared weights (no mask applied): what a stock torch-pruning pruner may prune.
        """
        self._check_live()
        self.tickets.check_index(ticket)
        # deepcopy without our hooks: detach them temporarily
        saved = []
        for m in self.model.modules():
            for d in (m._forward_hooks, m._forward_pre_hooks):
                for hid in list(d):
                    if hid in self._hook_ids:
                        saved.append((d, hid, d.pop(hid)))
        try:
            base = copy.deepcopy(self.model)
        finally:
            for d, hid, fn in saved:
                d[hid] = fn
        for name, m in list(base.named_modules()):
            if isinstance(m, RoutedBatchNorm):
                _set_submodule(base, name, m.to_batchnorm(ticket))
            elif isinstance(m, MaskedLayerNorm):
                _set_submodule(base, name, m.base)
        return base

    # ------------------------------------------------------------------ counting, unwrap, merge
    def count_ops_and_params(self, k: int, example_inputs=None) -> tuple[int, int]:
        """``tp.utils.count_ops_and_params`` of ticket ``k``: ``(MACs, parameters)`` on ``example_inputs``.

        Channel mode: the counts of ``rtl.export_ticket(routed, k)``, the physically smaller model. Weight mode:
        the dense MACs (a masked dense layer still multiplies every weight) and the parameters ticket ``k`` keeps
        (all parameters minus its masked-out prunable weights). ``example_inputs`` defaults to zeros of the
        ticket space's tracing shape (only when the space was traced from the whole model).
        """
        self._check_live()
        self.tickets.check_index(k)
        if example_inputs is None:
            if self.space.trace_root:
                raise SpaceError(f"the ticket space was traced from submodule {self.space.trace_root!r}, so its example "
                                 "shape is not the model's input; pass example_inputs= (an input of the whole model).")
            example_inputs = self._zeros_example(self.model)
        if self.granularity == "channel":
            from rtl_plugin.persist.export import export_ticket  # persist imports this module (see save)
            return _tp.count_ops_and_params(export_ticket(self, k, check_inputs=example_inputs), example_inputs)
        macs, params = _tp.count_ops_and_params(self.plain_copy(k), example_inputs)
        dropped = sum(int((~self.tickets.masks[n][k]).sum()) for n in self.space.layers)
        return macs, params - dropped

    def _zeros_example(self, root: nn.Module) -> torch.Tensor:
        """Zeros of the space's tracing shape on ``root``'s device and dtype (``root`` is the traced module)."""
        if self.space.example_input_shape is None:
            raise SpaceError("the ticket space has no example input shape; pass example_inputs=.")
        p = next(root.parameters())
        return torch.zeros(self.space.example_input_shape, device=p.device, dtype=p.dtype)

    def unwrap(self, *, norm_ticket: int = 0) -> nn.Module:
        """Hand back the plain model (PEFT's ``unload()``); this RoutedModel is unusable afterwards.

        The routing hooks are removed and the routed norms become the original modules again: each
        RoutedBatchNorm turns back into its original class, in place, holding ticket ``norm_ticket``'s running
        statistics (default ticket 0; K per-ticket sets cannot fold into one); each MaskedLayerNorm is replaced by
        the original LayerNorm. Modules and parameters are the very objects of the model that was wrapped; the
        weights are the shared dense ones (no mask applied; see ``merge(k)``).
        """
        self._check_live()
        self.tickets.check_index(norm_ticket)
        return self._release(int(norm_ticket), "unwrap")

    def merge(self, k: int, *, example_inputs=None) -> nn.Module:
        """Hand back the wrapped model computing ticket ``k`` alone (PEFT's ``merge_and_unload()``), in place.

        ``unwrap(norm_ticket=k)`` and then, weight mode: the shared weights are multiplied by ticket ``k``'s masks
        in place; channel mode: the model is physically pruned in place to ticket ``k`` (torch-pruning replays
        ``rtl.pruning_history(routed, k)``; ``example_inputs`` is the tracing input of the traced root, default
        zeros of the space's shape), the same model as ``rtl.export_ticket(routed, k)``. The other tickets are
        gone and this RoutedModel is unusable afterwards; ``rtl.export_ticket`` gives a copy instead.
        """
        self._check_live()
        self.tickets.check_index(k)
        k = int(k)
        if self.granularity == "weight":
            masked = {n: (w, self.tickets.masks[n][k]) for n, w in self._weight_params.items()}
            model = self._release(k, "merge")
            with torch.no_grad():
                for w, m in masked.values():
                    w.mul_(m.to(w.dtype))
            return model
        from rtl_plugin.persist.export import pruning_history  # persist imports this module (see save)
        history = pruning_history(self, k)  # checked before anything changes (a ticket may drop a whole group)
        root_name = self.space.trace_root
        if example_inputs is None:
            example_inputs = self._zeros_example(self.model.get_submodule(root_name) if root_name else self.model)
        model = self._release(k, "merge")
        root = model.get_submodule(root_name) if root_name else model
        _tp.replay_history(_tp.build_graph(root, example_inputs), history)
        return model

    def _release(self, norm_ticket: int, how: str) -> nn.Module:
        """Remove every routing hook, turn routed norms back into plain ones and let go of the model."""
        model = self.model
        for handle in self._handles:
            handle.remove()
        for name, m in list(model.named_modules()):
            if isinstance(m, RoutedBatchNorm):
                m.unroute(norm_ticket)
            elif isinstance(m, MaskedLayerNorm):
                _set_submodule(model, name, m.base)
        del self._modules["model"]
        self._handles, self._hook_ids, self._weight_params, self._plain_layer = [], set(), {}, {}
        self._cache.clear()
        self.__dict__["_released_by"] = how
        return model

    def _check_live(self) -> None:
        how = self.__dict__.get("_released_by")
        if how is not None:
            raise UnwrappedModelError(f"this RoutedModel handed its model back with {how}() and no longer routes; "
                                      "use the model that call returned, or wrap it again with rtl.wrap(model, K, ...) "
                                      "and routed.set_tickets(...).")

    def __getattr__(self, name: str):
        if name == "model" and "_released_by" in self.__dict__:
            self._check_live()
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        return (f"num_tickets={self.num_tickets}, granularity={self.granularity}, shared_norm={self.shared_norm}, "
                f"prunable_weights={self.space.num_weights}")

    # ------------------------------------------------------------------ persistence (see io.py)
    def save(self, path, **kw):
        """``rtl.save(self, path, **kw)``: the tickets as safetensors + a JSON manifest (see persist.io)."""
        # persist's package __init__ imports persist.export, which imports this module: a top-level import here
        # would close the cycle routed -> persist -> export -> routed (see the architecture note).
        from rtl_plugin.persist.io import save
        return save(self, path, **kw)


class _TicketView(nn.Module):
    """Forward of one fixed ticket (for training loops and evaluation; torch-pruning refuses it, see
    ``RoutedModel.ticket_module``)."""

    def __init__(self, routed: RoutedModel, k: int):
        super().__init__()
        self.routed = routed
        self.k = k

    def forward(self, *args, **kwargs):
        return self.routed(*args, route=self.k, **kwargs)
