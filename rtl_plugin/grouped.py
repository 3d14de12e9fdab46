"""Grouped execution: the T tickets present in a batch run through every ticket-dependent layer in ONE call.

The batch is padded to ``Bmax`` samples per ticket (``Bmax`` = the largest bucket; padded rows are zeros) and
laid out sample-major, ticket-minor: padded row ``b * T + j`` holds the ``b``-th sample of the ``j``-th ticket
present. Activations ``[Bmax * T, C, ...]`` are then a free view of ``[Bmax, T * C, ...]``, so

* a plain conv (1d/2d/3d, transposed too) becomes ONE grouped conv over the T stacked weights (groups x T);
* a plain linear becomes ONE batched matmul over ``[T, rows, in] x [T, in, out]``;
* a per-ticket norm becomes one affine op (see ``norms.grouped_batch_norm``);
* every other layer (activations, pooling, residual adds, resizing, flatten) is per sample and runs unchanged.

Outputs are un-padded and returned in the input order. Layers only see the layout while their ``forward`` is
patched (``patched_forwards``), so the model is left exactly as it was after the call, also after an exception.
Activations must keep the batch as their leading dimension (or fold other dims into it batch-major, e.g.
``[B * N, in]``); the padded rows cost compute: ``T * Bmax / B`` of the dense batch.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from rtl_plugin.errors import ExecutionError, RouteError
from rtl_plugin.norms import split_by_route

_CONV = {nn.Conv1d.forward: (F.conv1d, False), nn.Conv2d.forward: (F.conv2d, False),
         nn.Conv3d.forward: (F.conv3d, False), nn.ConvTranspose1d.forward: (F.conv_transpose1d, True),
         nn.ConvTranspose2d.forward: (F.conv_transpose2d, True), nn.ConvTranspose3d.forward: (F.conv_transpose3d, True)}


def map_tensors(obj, fn):
    """``obj`` (a tensor or nested tuples / namedtuples / lists / dicts of tensors) with ``fn`` applied to every
    tensor; anything else is returned as it is."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return type(obj)(*(map_tensors(o, fn) for o in obj)) if hasattr(obj, "_fields") else \
            tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return type(obj)({k: map_tensors(v, fn) for k, v in obj.items()})
    return obj


def layer_kind(m: nn.Module) -> str | None:
    """"conv", "conv_transpose" or "linear" for a module running the stock torch forward of that layer (a
    subclass that only adds attributes counts, one that overrides ``forward`` does not); None otherwise."""
    fwd = type(m).forward
    if fwd is nn.Linear.forward:
        return "linear"
    if fwd in _CONV:
        return "conv_transpose" if _CONV[fwd][1] else "conv"
    return None


class GroupLayout:
    """Where each sample of a batch routed by ``route`` (LongTensor [B], B > 0) sits in the padded batch.

    Attributes: ``ticket_ids`` LongTensor [T] (the tickets present, ascending), ``tickets`` (the same as ints),
    ``counts`` (samples per ticket), ``bmax``, ``rows`` LongTensor [B] (padded row of every input sample, in
    input order), ``valid`` BoolTensor [Bmax, T] (False on padding), ``padded_batch`` = ``Bmax * T``.
    """

    def __init__(self, route: torch.Tensor):
        if not isinstance(route, torch.Tensor) or route.dim() != 1 or route.numel() == 0:
            raise RouteError("a grouped layout needs a non-empty LongTensor route [B] (one ticket per sample).")
        perm, tickets, counts, _ = split_by_route(route)
        dev, B, T = route.device, route.shape[0], len(tickets)
        self.tickets, self.counts, self.batch = tickets, counts, B
        self.num_groups, self.bmax = T, max(counts)
        self.padded_batch = self.bmax * T
        self.ticket_ids = torch.tensor(tickets, device=dev, dtype=torch.long)
        self.counts_t = torch.tensor(counts, device=dev, dtype=torch.long)
        starts = torch.cumsum(self.counts_t, 0) - self.counts_t
        slot = torch.arange(B, device=dev) - torch.repeat_interleave(starts, self.counts_t, output_size=B)
        col = torch.repeat_interleave(torch.arange(T, device=dev), self.counts_t, output_size=B)
        self.rows = torch.empty_like(perm)
        self.rows[perm] = slot * T + col
        self.valid = torch.zeros(self.padded_batch, dtype=torch.bool, device=dev)
        self.valid[self.rows] = True
        self.valid = self.valid.view(self.bmax, T)

    def pad(self, a: torch.Tensor) -> torch.Tensor:
        """``a`` [B, ...] -> [Bmax * T, ...] in the grouped layout, zeros on the padded rows (differentiable)."""
        return a.new_zeros((self.padded_batch,) + tuple(a.shape[1:])).index_copy(0, self.rows, a)

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` [Bmax * T, ...] -> [B, ...] in the input order."""
        if y.dim() == 0 or y.shape[0] != self.padded_batch:
            raise RouteError(f"a model output of shape {tuple(y.shape)} has no batch dimension of the grouped batch "
                             f"({self.padded_batch} rows); run this model with execution='bucketed'.")
        return y.index_select(0, self.rows)

    def all_of(self, num_tickets: int) -> bool:
        """True when every one of ``num_tickets`` tickets is present (the stacked weights need no selection)."""
        return self.num_groups == num_tickets


def _check_rows(x: torch.Tensor, T: int, what: str) -> int:
    if x.dim() < 2 or x.shape[0] % T:
        raise RouteError(f"{what} got an input of shape {tuple(x.shape)} whose leading dimension is not the grouped "
                         f"batch ({T} tickets): the model moves the batch dimension; use execution='bucketed'.")
    return x.shape[0] // T


def grouped_conv(m: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 output_size=None, *, groups: int | None = None) -> torch.Tensor:
    """Plain conv / transposed conv ``m`` for T tickets at once: ``weight`` [T, *m.weight.shape] (stacked per
    ticket), ``bias`` None, [O] (shared) or [T, O]; ``x`` [N * T, C, ...] in the grouped layout; ``groups``
    per ticket (default ``m.groups``)."""
    T = weight.shape[0]
    conv, transposed = _CONV[type(m).forward]
    n = _check_rows(x, T, f"{type(m).__name__}")
    xg = x.reshape(n, T * x.shape[1], *x.shape[2:])
    w = weight.reshape(T * weight.shape[1], *weight.shape[2:])
    b = None if bias is None else (bias.repeat(T) if bias.dim() == 1 else bias.reshape(-1))
    groups = (m.groups if groups is None else groups) * T
    if transposed:
        if output_size is not None:
            raise ExecutionError("grouped execution does not take output_size= for transposed convolutions; "
                                 "use execution='bucketed'.")
        y = conv(xg, w, b, m.stride, m.padding, m.output_padding, groups, m.dilation)
    elif m.padding_mode != "zeros":
        xg = F.pad(xg, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        y = conv(xg, w, b, m.stride, 0, m.dilation, groups)
    else:
        y = conv(xg, w, b, m.stride, m.padding, m.dilation, groups)
    return y.reshape(n * T, y.shape[1] // T, *y.shape[2:])


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Linear layer for T tickets at once: ``weight`` [T, out, in], ``bias`` None, [out] or [T, out]; ``x``
    [N * T, ..., in] in the grouped layout (one batched matmul)."""
    T, out_f, in_f = weight.shape
    n = _check_rows(x, T, "Linear")
    mid = tuple(x.shape[1:-1])
    xt = x.reshape(n, T, -1, in_f).transpose(0, 1).reshape(T, -1, in_f)
    wt = weight.transpose(1, 2)
    if bias is None:
        y = torch.bmm(xt, wt)
    else:
        b = bias.view(1, 1, out_f).expand(T, 1, out_f) if bias.dim() == 1 else bias.view(T, 1, out_f)
        y = torch.baddbmm(b, xt, wt)
    return y.reshape(T, n, -1, out_f).transpose(0, 1).reshape(n * T, *mid, out_f)


def layer_forward(m: nn.Module, weight_fn: Callable[[], torch.Tensor],
                  bias_fn: Callable[[], torch.Tensor | None] | None = None, *, groups: int | None = None) -> Callable:
    """A grouped ``forward`` for the plain conv / linear ``m`` whose stacked weights [T, ...] ``weight_fn()``
    returns (and stacked biases ``bias_fn()``, default: the module's shared bias; ``groups`` per ticket, default
    ``m.groups``)."""
    kind = layer_kind(m)
    if kind is None:
        raise ExecutionError(f"{type(m).__name__} is not a plain conv or linear layer; grouped execution cannot "
                             "run it: use execution='bucketed'.")

    def forward(x, *rest, **kw):
        bias = m.bias if bias_fn is None else bias_fn()
        if kind == "linear":
            return grouped_linear(x, weight_fn(), bias)
        return grouped_conv(m, x, weight_fn(), bias, *rest, groups=groups, **kw)
    return forward


@contextlib.contextmanager
def patched_forwards(forwards: dict[nn.Module, Callable]):
    """Within the block, each module's ``forward`` is the given function (an instance attribute, removed on exit,
    also after an exception)."""
    done = []
    try:
        for m, fn in forwards.items():
            if "forward" in m.__dict__:
                raise ExecutionError(f"{type(m).__name__} already has an instance-level forward; grouped execution "
                                     "cannot patch it: use execution='bucketed'.")
            m.__dict__["forward"] = fn
            done.append(m)
        yield
    finally:
        for m in done:
            m.__dict__.pop("forward", None)


def run_grouped(call: Callable, args: tuple, kwargs: dict, layout: GroupLayout, forwards: dict[nn.Module, Callable]):
    """``call(padded_args, kwargs)`` with ``forwards`` patched in; tensor args with batch dim B are padded to the
    grouped layout, every output tensor is un-padded to the input order."""
    B = layout.batch
    padded = tuple(layout.pad(a) if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == B else a for a in args)
    with patched_forwards(forwards):
        out = call(padded, kwargs)
    return map_tensors(out, layout.unpad)
