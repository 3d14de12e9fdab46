"""Routed normalisation layers.

``RoutedBatchNorm`` keeps K sets of running statistics (one per ticket) over shared affine parameters:
batch statistics are computed per route present in the batch, and in eval each sample is normalised
with its own ticket's running statistics. ``MaskedLayerNorm`` (channel mode) normalises over the kept
channels of the sample's ticket only, which is what a physically pruned LayerNorm computes.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from rtl_plugin.errors import RouteError, TicketError


class RouteState:
    """Shared, mutable routing context that routed layers read during one forward pass.

    ``route`` is None (outside a routed forward), an int (every sample to that ticket) or a LongTensor [B].
    ``sample_mask(name, side)`` returns the per-sample channel mask BoolTensor [B, C] (channel mode).
    """

    def __init__(self):
        self.route = None
        self.layer_masks = None  # {module: {"out"/"in": BoolTensor[K, C]}}
        self.layout = None  # a grouped.GroupLayout while a grouped forward runs
        self._gathered: dict = {}
        self._split = None

    def set(self, route, layer_masks=None, layout=None) -> None:
        self.route = route
        self.layer_masks = layer_masks
        self.layout = layout
        self._gathered = {}
        self._split = None

    def split(self):
        """``split_by_route(route)``, computed once per forward (every routed norm layer needs it)."""
        if self._split is None:
            self._split = split_by_route(self.route)
        return self._split

    def clear(self) -> None:
        self.set(None, None)

    def sample_mask(self, name: str, side: str):
        """BoolTensor [B, C] or [1, C] (int route) for module ``name``; None when unmasked."""
        if self.layer_masks is None:
            return None
        key = (name, side)
        if key not in self._gathered:
            lm = self.layer_masks.get(name, {}).get(side)
            if lm is None:
                self._gathered[key] = None
            elif isinstance(self.route, int):
                self._gathered[key] = lm[self.route:self.route + 1]
            else:
                self._gathered[key] = lm.index_select(0, self.route)
        return self._gathered[key]


def require_route(state: RouteState, name: str):
    """The current route of ``state``; RouteError when a routed layer runs outside a routed forward."""
    if state.route is None:
        raise RouteError(f"routed layer {name or '?'} was called outside a routed forward; call the RoutedModel "
                         "with route=... (or use export_ticket() for a plain model).")
    return state.route


def split_by_route(route: torch.Tensor):
    """Stable bucketing without per-sample Python loops.

    Returns ``(perm, tickets, counts, inverse)``: ``x[perm]`` groups samples by ticket in ascending ticket
    order, ``counts[i]`` samples belong to ``tickets[i]``, and ``y[inverse]`` restores the original order.
    """
    perm = torch.argsort(route, stable=True)
    tickets, counts = torch.unique_consecutive(route[perm], return_counts=True)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return perm, tickets.tolist(), counts.tolist(), inverse


_ROUTED_CLASSES: dict[type, type] = {}


class RoutedBatchNorm(nn.Module):
    """Mixin turning a BatchNorm instance (any subclass, e.g. timm's ``BatchNormAct2d``) into a routed one.

    ``RoutedBatchNorm.convert(bn, K, state)`` changes the instance's class in place to a subclass of both
    this mixin and the original class, so names, parameters and the original forward (activation, drop)
    are kept. Buffers ``running_mean``/``running_var`` become [K, C] and ``num_batches_tracked`` [K];
    each forward swaps in ticket t's rows (views, updated in place) and runs the original forward on the
    samples routed to t. Batch statistics are therefore computed per route present in the batch.
    """

    @classmethod
    def convert(cls, bn: nn.modules.batchnorm._BatchNorm, num_tickets: int, state: "RouteState",
                name: str = "") -> "RoutedBatchNorm":
        if isinstance(bn, RoutedBatchNorm):
            return bn
        base = type(bn)
        routed_cls = _ROUTED_CLASSES.get(base)
        if routed_cls is None:
            routed_cls = type(f"Routed{base.__name__}", (cls, base), {"_rtl_base_class": base})
            _ROUTED_CLASSES[base] = routed_cls
        if bn.track_running_stats:
            bn.register_buffer("running_mean", bn.running_mean.detach().clone().unsqueeze(0).repeat(num_tickets, 1))
            bn.register_buffer("running_var", bn.running_var.detach().clone().unsqueeze(0).repeat(num_tickets, 1))
            bn.register_buffer("num_batches_tracked",
                               bn.num_batches_tracked.detach().clone().reshape(1).repeat(num_tickets))
        bn.__class__ = routed_cls
        object.__setattr__(bn, "_state", state)
        object.__setattr__(bn, "_rtl_name", name)
        object.__setattr__(bn, "num_tickets", num_tickets)
        return bn

    def _ticket_forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        base_forward = self._rtl_base_class.forward
        if not self.track_running_stats:
            return base_forward(self, x)
        bufs = self._buffers
        saved = (bufs["running_mean"], bufs["running_var"], bufs["num_batches_tracked"])
        try:
            bufs["running_mean"], bufs["running_var"], bufs["num_batches_tracked"] = (b[t] for b in saved)
            return base_forward(self, x)
        finally:
            bufs["running_mean"], bufs["running_var"], bufs["num_batches_tracked"] = saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = require_route(self._state, self._rtl_name)
        layout = self._state.layout
        if layout is not None:
            return grouped_batch_norm(self, x, layout, rows=layout.ticket_ids)
        if isinstance(route, int):
            return self._ticket_forward(x, route)
        if route.shape[0] != x.shape[0]:
            raise RouteError(f"routed norm {self._rtl_name!r} got a batch of {x.shape[0]} for {route.shape[0]} "
                             "routes; a layer that reshapes the batch dimension cannot be routed per sample.")
        perm, tickets, counts, inverse = self._state.split()
        if len(tickets) == 1:
            return self._ticket_forward(x, tickets[0])
        parts = torch.split(x.index_select(0, perm), counts)
        return torch.cat([self._ticket_forward(p, t) for p, t in zip(parts, tickets)]).index_select(0, inverse)

    def add_ticket(self, init="mean") -> None:
        """Grow the statistics by one ticket (row K), initialised from ``init``: "mean" (the average of the K
        tickets' running means and variances), an int ticket id (a copy of its statistics) or "fresh"
        (mean 0, variance 1, as a new BatchNorm). ``num_batches_tracked`` of the new row starts at 0."""
        K = self.num_tickets
        if self.track_running_stats:
            mean, var = self.running_mean, self.running_var
            if init == "mean":
                new_mean, new_var = mean.mean(0, keepdim=True), var.mean(0, keepdim=True)
            elif init == "fresh":
                new_mean, new_var = torch.zeros_like(mean[:1]), torch.ones_like(var[:1])
            elif isinstance(init, int) and not isinstance(init, bool) and 0 <= init < K:
                new_mean, new_var = mean[init:init + 1].clone(), var[init:init + 1].clone()
            else:
                raise TicketError(f"norm_init must be 'mean', 'fresh' or a ticket id in [0, {K}), got {init!r}.")
            self.register_buffer("running_mean", torch.cat([mean, new_mean], 0))
            self.register_buffer("running_var", torch.cat([var, new_var], 0))
            nbt = self.num_batches_tracked
            self.register_buffer("num_batches_tracked", torch.cat([nbt, torch.zeros_like(nbt[:1])], 0))
        object.__setattr__(self, "num_tickets", K + 1)

    def to_batchnorm(self, ticket: int) -> nn.modules.batchnorm._BatchNorm:
        """A plain copy of the original BatchNorm class carrying ticket ``ticket``'s statistics."""
        state = self.__dict__.pop("_state")
        try:
            bn = copy.deepcopy(self)
        finally:
            object.__setattr__(self, "_state", state)
        return bn.unroute(ticket)

    def unroute(self, ticket: int) -> nn.modules.batchnorm._BatchNorm:
        """In place: turn this module back into its original BatchNorm class holding ticket ``ticket``'s
        statistics (the same module and parameter objects; the buffers become that ticket's rows)."""
        if self.track_running_stats:
            for b in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(b, getattr(self, b)[ticket].clone())
        for k in ("_state", "_rtl_name", "num_tickets", "_rtl_grouped_affine"):
            self.__dict__.pop(k, None)
        self.__class__ = self._rtl_base_class
        return self

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tickets={self.num_tickets}"


_PLAIN_BN_FORWARD = nn.modules.batchnorm._BatchNorm.forward


def _valid_batch_stats(xv: torch.Tensor, layout, training: bool):
    """Per-ticket mean and biased variance [T, C] of ``xv`` [Bmax, T, C, L] over the valid (non-padded) rows,
    and the number of values per ticket [T]."""
    n = (layout.counts_t * xv.shape[3]).to(xv.dtype)
    if training and int(n.min()) <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {int(n.min())} for one ticket "
                         "of the batch (grouped BatchNorm).")
    v = layout.valid.to(xv.dtype).view(xv.shape[0], xv.shape[1], 1, 1)
    mean = (xv * v).sum((0, 3)) / n[:, None]
    d = (xv - mean.view(1, xv.shape[1], -1, 1)) * v
    return mean, (d * d).sum((0, 3)) / n[:, None], n


@torch.no_grad()
def _update_running_stats(bn, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor, rows) -> None:
    """What ``F.batch_norm`` does to the running statistics, once per ticket: rows ``rows`` of a routed norm
    ([K, C] buffers), or the one set of a shared norm updated ticket after ticket in ascending order."""
    rm, rv, nbt = bn.running_mean, bn.running_var, bn.num_batches_tracked
    mean, unbiased = mean.to(rm.dtype), (var * (n / (n - 1))[:, None]).to(rv.dtype)
    if rows is None:
        for j in range(mean.shape[0]):
            f = bn.momentum
            if nbt is not None:
                nbt.add_(1)
                f = 1.0 / float(nbt) if f is None else f
            rm.mul_(1 - f).add_(mean[j] * f)
            rv.mul_(1 - f).add_(unbiased[j] * f)
        return
    nbt.index_add_(0, rows, torch.ones_like(rows, dtype=nbt.dtype))
    if bn.momentum is None:
        f = (1.0 / nbt.index_select(0, rows).to(rm.dtype))[:, None]
    else:
        f = torch.full((rows.numel(), 1), float(bn.momentum), dtype=rm.dtype, device=rm.device)
    rm.index_copy_(0, rows, rm.index_select(0, rows) * (1 - f) + mean * f)
    rv.index_copy_(0, rows, rv.index_select(0, rows) * (1 - f) + unbiased * f)


def _identity_tail(bn, y: torch.Tensor) -> torch.Tensor:
    """Run the BatchNorm subclass's own forward (e.g. timm's BatchNormAct2d: drop + activation) on the already
    normalised ``y``, with its batch-norm step made the identity (mean 0, var 1, eps 0, no affine)."""
    base = getattr(bn, "_rtl_base_class", type(bn))
    bufs, params, C = bn._buffers, bn._parameters, y.shape[1]
    saved = (bufs.get("running_mean"), bufs.get("running_var"), params.get("weight"), params.get("bias"),
             bn.eps, bn.training)
    try:
        bufs["running_mean"] = torch.zeros(C, dtype=y.dtype, device=y.device)
        bufs["running_var"] = torch.ones(C, dtype=y.dtype, device=y.device)
        params["weight"], params["bias"] = None, None
        bn.eps, bn.training = 0.0, False
        return base.forward(bn, y)
    finally:
        bufs["running_mean"], bufs["running_var"], params["weight"], params["bias"], bn.eps, bn.training = saved


def _affine(bn, mean: torch.Tensor, var: torch.Tensor, weight=None, bias=None):
    """``(scale, shift)`` with ``normalised = x * scale + shift`` (statistics [T, C], affine [C] or [T, C])."""
    scale = torch.rsqrt(var + bn.eps)
    weight = bn.weight if weight is None else weight
    bias = bn.bias if bias is None else bias
    if weight is not None:
        scale = scale * weight
    return scale, (-mean * scale if bias is None else bias - mean * scale)


def _running_affine(bn):
    """``(scale, shift)`` [K or 1, C] from every running-statistics row; kept on the module while autograd is off
    and neither statistics nor affine parameters changed (eval: no per-call statistics ops)."""
    tensors = [t for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias) if t is not None]
    key = (bn.eps, tuple((t._version, t.data_ptr(), t.dtype) for t in tensors))
    hit = bn.__dict__.get("_rtl_grouped_affine")
    if hit is not None and hit[0] == key and not torch.is_grad_enabled():
        return hit[1]
    mean, var = bn.running_mean, bn.running_var
    if mean.dim() == 1:
        mean, var = mean.unsqueeze(0), var.unsqueeze(0)
    affine = _affine(bn, mean, var)
    if not torch.is_grad_enabled():
        bn.__dict__["_rtl_grouped_affine"] = (key, affine)
    return affine


def grouped_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, layout, *, rows=None,
                       running=None, weight=None, bias=None, affine=None) -> torch.Tensor:
    """BatchNorm ``bn`` on a batch in the grouped layout (``grouped.GroupLayout``: rows ``b * T + j``).

    Batch statistics (training, or no running statistics) are computed per ticket over the valid rows only, so
    padding changes nothing, and the running statistics are updated exactly like one call per ticket bucket:
    rows ``rows`` (LongTensor [T]) of a routed norm, or the shared set (``rows=None``) once per ticket in
    ascending order. Eval uses rows ``rows`` of the running statistics, or ``running=(mean, var)`` [T, C]
    stacks; ``weight`` / ``bias`` [T, C] replace the shared affine (channel packages); ``affine=(scale, shift)``
    [T, C] gives the eval normalisation ``x * scale + shift`` ready-made.
    """
    T = layout.num_groups
    if x.dim() < 2 or x.shape[0] != layout.padded_batch:
        raise RouteError(f"batch norm {getattr(bn, '_rtl_name', '')!r} got a batch of {x.shape[0]} in a grouped "
                         f"forward of {layout.padded_batch} rows; a layer that reshapes the batch dimension needs "
                         "execution='bucketed'.")
    xv = x.reshape(layout.bmax, T, x.shape[1], -1)
    low = x.dtype in (torch.float16, torch.bfloat16)
    if bn.training or (running is None and bn.running_mean is None):
        mean, var, n = _valid_batch_stats(xv.float() if low else xv, layout, bn.training)
        if bn.training and bn.track_running_stats:
            _update_running_stats(bn, mean.detach(), var.detach(), n, rows)
        scale, shift = _affine(bn, mean, var, weight, bias)
    elif affine is not None:
        scale, shift = affine
    elif running is not None:
        scale, shift = _affine(bn, running[0], running[1], weight, bias)
    else:
        scale, shift = _running_affine(bn)
        if rows is not None and rows.numel() != scale.shape[0]:  # all K rows present: already in order
            scale, shift = scale.index_select(0, rows), shift.index_select(0, rows)
    if low:
        scale, shift = scale.to(x.dtype), shift.to(x.dtype)
    G = scale.shape[0]
    y = torch.addcmul(shift.view(1, G, -1, 1), xv, scale.view(1, G, -1, 1)).view(x.shape)
    base = getattr(bn, "_rtl_base_class", type(bn))
    return y if base.forward is _PLAIN_BN_FORWARD else _identity_tail(bn, y)


class MaskedLayerNorm(nn.Module):
    """LayerNorm over one channel dimension that ignores each sample's dropped channels (channel mode).

    ``channel_dim`` is 1 for channels-first norms (timm ``LayerNorm2d``) and -1 for channels-last ones.
    Output channels that the ticket drops are zero.
    """

    def __init__(self, ln: nn.LayerNorm, state: RouteState, name: str, channel_dim: int):
        super().__init__()
        self.normalized_shape = tuple(ln.normalized_shape)
        self.eps = ln.eps
        self.weight = ln.weight
        self.bias = ln.bias
        object.__setattr__(self, "base", ln)  # kept for export (shares the parameters); not a submodule
        self.channel_dim = channel_dim
        object.__setattr__(self, "_state", state)
        self._name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        require_route(self._state, self._name)
        m = self._state.sample_mask(self._name, "out")
        if m is None:
            return self.base(x)
        if m.shape[0] not in (1, x.shape[0]):
            raise RouteError(f"masked layer norm {self._name!r} got a batch of {x.shape[0]} for {m.shape[0]} routes.")
        xc = x.movedim(self.channel_dim, -1) if self.channel_dim != -1 else x
        shape = [m.shape[0]] + [1] * (xc.dim() - 2) + [m.shape[1]]
        mf = m.to(xc.dtype).view(shape)
        n = mf.sum(-1, keepdim=True).clamp_min(1.0)
        mean = (xc * mf).sum(-1, keepdim=True) / n
        var = (((xc - mean) * mf) ** 2).sum(-1, keepdim=True) / n
        y = (xc - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        y = y * mf
        return y.movedim(-1, self.channel_dim) if self.channel_dim != -1 else y


def layer_norm_channel_dim(ln: nn.LayerNorm) -> int:
    """1 for timm's channels-first LayerNorm2d, -1 otherwise."""
    return 1 if type(ln).__name__ in ("LayerNorm2d", "LayerNormAct2d") else -1
