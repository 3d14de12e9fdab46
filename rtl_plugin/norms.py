"""Routed normalisation layers.

``RoutedBatchNorm`` keeps K sets of running statistics (one per ticket) over shared affine parameters:
batch statistics are computed per route present in the batch, and in eval each sample is normalised
with its own ticket's running statistics. ``MaskedLayerNorm`` (channel mode) normalises over the kept
channels of the sample's ticket only, which is what a physically pruned LayerNorm computes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import RouteError


class RouteState:
    """Shared, mutable routing context that routed layers read during one forward pass.

    ``route`` is None (outside a routed forward), an int (every sample to that ticket) or a LongTensor [B].
    ``sample_mask(name, side)`` returns the per-sample channel mask BoolTensor [B, C] (channel mode).
    """

    def __init__(self):
        self.route = None
        self.layer_masks = None  # {module: {"out"/"in": BoolTensor[K, C]}}
        self._gathered: dict = {}

    def set(self, route, layer_masks=None) -> None:
        self.route = route
        self.layer_masks = layer_masks
        self._gathered = {}

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


def _require_route(state: RouteState, name: str):
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


class RoutedBatchNorm(nn.Module):
    """BatchNorm with per-ticket running statistics and shared affine parameters.

    Buffers: ``running_mean``/``running_var`` [K, C], ``num_batches_tracked`` [K]. The ``weight``/``bias``
    Parameters are the original BatchNorm's objects (optimizers built before wrapping stay valid).
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, num_tickets: int, state: RouteState, name: str = ""):
        super().__init__()
        self.num_features = bn.num_features
        self.eps = bn.eps
        self.momentum = bn.momentum
        self.affine = bn.affine
        self.track_running_stats = bn.track_running_stats
        self.num_tickets = num_tickets
        self.base_class = type(bn)
        self.weight = bn.weight
        self.bias = bn.bias
        self.training = bn.training
        if bn.track_running_stats:
            self.register_buffer("running_mean", bn.running_mean.detach().clone().unsqueeze(0).repeat(num_tickets, 1))
            self.register_buffer("running_var", bn.running_var.detach().clone().unsqueeze(0).repeat(num_tickets, 1))
            self.register_buffer("num_batches_tracked",
                                 bn.num_batches_tracked.detach().clone().reshape(1).repeat(num_tickets))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        object.__setattr__(self, "_state", state)  # not a submodule
        self._name = name

    def extra_repr(self) -> str:
        return f"{self.num_features}, tickets={self.num_tickets}, eps={self.eps}, momentum={self.momentum}"

    def _bn(self, x: torch.Tensor, t: int) -> torch.Tensor:
        use_batch = self.training or not self.track_running_stats
        factor = 0.0 if self.momentum is None else self.momentum
        rm = rv = None
        if self.track_running_stats:
            rm, rv = self.running_mean[t], self.running_var[t]
            if self.training:
                self.num_batches_tracked[t] += 1
                factor = 1.0 / float(self.num_batches_tracked[t]) if self.momentum is None else self.momentum
        return F.batch_norm(x, rm, rv, self.weight, self.bias, use_batch, factor, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = _require_route(self._state, self._name)
        if isinstance(route, int):
            return self._bn(x, route)
        if route.shape[0] != x.shape[0]:
            raise RouteError(f"routed norm {self._name!r} got a batch of {x.shape[0]} for {route.shape[0]} routes; "
                             "a layer that reshapes the batch dimension cannot be routed per sample.")
        perm, tickets, counts, inverse = split_by_route(route)
        if len(tickets) == 1:
            return self._bn(x, tickets[0])
        parts = torch.split(x.index_select(0, perm), counts)
        return torch.cat([self._bn(p, t) for p, t in zip(parts, tickets)]).index_select(0, inverse)

    def to_batchnorm(self, ticket: int) -> nn.modules.batchnorm._BatchNorm:
        """A plain BatchNorm of the original class carrying ticket ``ticket``'s statistics (shares no storage)."""
        bn = self.base_class(self.num_features, eps=self.eps, momentum=self.momentum, affine=self.affine,
                             track_running_stats=self.track_running_stats)
        bn = bn.to(device=self.weight.device if self.weight is not None else None)
        with torch.no_grad():
            if self.affine:
                bn.weight.copy_(self.weight)
                bn.bias.copy_(self.bias)
            if self.track_running_stats:
                bn.running_mean.copy_(self.running_mean[ticket])
                bn.running_var.copy_(self.running_var[ticket])
                bn.num_batches_tracked.copy_(self.num_batches_tracked[ticket])
        bn.train(self.training)
        return bn


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
        _require_route(self._state, self._name)
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
