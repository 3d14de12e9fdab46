"""Straight-through estimator (STE) for learned tickets, on an unmodified :class:`RoutedModel`.

A RoutedModel applies ticket k's *hard* masks: weight granularity multiplies ``W * M_k`` inside
``torch.func.functional_call``; channel granularity multiplies activations by ``m_k`` in forward hooks. No
gradient can reach real-valued scores through a boolean mask, so while a :class:`StraightThrough` is installed
every masked layer adds a term whose *value is exactly zero* and whose gradient with respect to the active
ticket's scores ``s`` is the straight-through one (the mask's derivative taken as 1):

* weight: ``y + f(x.detach(); W.detach() * (s - s.detach()))`` with ``f`` the layer's own forward (bias zero),
  so ``dL/ds = W * dL/dW_eff`` (edge-popup, Piggyback), also for weights the current mask drops;
* channel: at every masked activation ``a`` (before the mask), ``+ a.detach() * (m - m.detach())`` where ``m`` is
  the layer's mask rebuilt from ``hard + s - s.detach()`` of the groups that touch it (a product: an AND).
  Masked LayerNorms mask inside their forward and add no term (their groups still get the other layers').
  The routed model masks a channel at *every* layer it touches, so once a channel is dropped no layer sees it
  alive and its score gets no gradient (the exact derivative of the product of masks): in channel granularity the
  scores of kept channels learn, and a dropped channel comes back only when kept ones score below it. The
  annealing schedule starts dense, so every channel's score learns at first.

Forward values, routing and per-ticket norm statistics are the RoutedModel's own. The extra cost is one more
layer call per masked layer (weight mode) and its weight gradient.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.func import functional_call

from rtl_plugin import _tp
from rtl_plugin.errors import RouteError, TicketError
from rtl_plugin.norms import MaskedLayerNorm
from rtl_plugin.pruning.learned import TicketScores
from rtl_plugin.routed import RoutedModel, check_route, run_bucketed

__all__ = ["StraightThrough"]


def _broadcast(delta: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * like.dim()
    shape[dim] = delta.shape[0]
    return delta.to(like.dtype).view(shape)


class StraightThrough:
    """Install the zero-valued gradient terms on ``routed`` for ``scores`` (a context manager).

    ``ste(x, route=ids)`` runs ``routed(x, route=...)`` with the terms of each routed ticket active (a per-sample
    route is bucketed by ticket, as the RoutedModel does); outside ``with``/:meth:`install` it raises.
    """

    def __init__(self, routed: RoutedModel, scores: TicketScores):
        if not isinstance(routed, RoutedModel):
            raise TicketError(f"StraightThrough needs a RoutedModel (rtl.wrap), got {type(routed).__name__}.")
        if not isinstance(scores, TicketScores):
            raise TicketError(f"scores must be TicketScores, got {type(scores).__name__}.")
        if scores.space.to_dict() != routed.space.to_dict() or scores.num_tickets != routed.num_tickets:
            raise TicketError("the scores belong to another ticket space or K; build them from this routed model "
                              "(TicketScores.from_magnitude(routed)).")
        self.routed = routed
        self.scores = scores
        self._handles: list = []
        self._active: int | None = None
        self._busy = False
        self._stash: dict[tuple[str, str], torch.Tensor] = {}
        self._deltas: dict[tuple[str, str], torch.Tensor] = {}
        self._weights = routed.prunable_weights()
        self._index = {key: i for i, key in enumerate(scores.keys)}

    # ------------------------------------------------------------------ install / remove
    def install(self) -> "StraightThrough":
        if self._handles:
            return self
        model = self.routed.model
        if self.routed.granularity == "weight":
            for n in self.routed.space.layers:
                self._handles.append(model.get_submodule(n).register_forward_hook(self._weight_hook(n)))
            return self
        for name, side in self._channel_slots():
            m = model.get_submodule(name)
            dim = -1 if _tp.is_linear(m) else 1
            if side == "out":
                self._handles.append(m.register_forward_hook(self._stash_out(name), prepend=True))
                self._handles.append(m.register_forward_hook(self._add_out(name, dim)))
            else:
                self._handles.append(m.register_forward_pre_hook(self._stash_in(name), prepend=True))
                self._handles.append(m.register_forward_pre_hook(self._add_in(name, dim)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._stash.clear()
        self._active = None

    def __enter__(self) -> "StraightThrough":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _channel_slots(self) -> list[tuple[str, str]]:
        slots = []
        for g in self.routed.space.groups:
            for it in g.items:
                slot = (it.module, "out" if it.out else "in")
                if slot not in slots and not isinstance(self.routed.model.get_submodule(it.module), MaskedLayerNorm):
                    slots.append(slot)
        return slots

    # ------------------------------------------------------------------ forward
    @contextlib.contextmanager
    def active(self, k: int):
        """Within the block, routed forwards are ticket ``k``'s and carry the gradient terms of its scores."""
        if not self._handles:
            raise TicketError("the straight-through terms are not installed; use `with StraightThrough(...) as ste:`.")
        self.routed.tickets.check_index(k)
        self._active = int(k)
        if self.routed.granularity == "channel":
            self._deltas = self._channel_deltas(int(k))
        try:
            yield
        finally:
            self._active = None
            self._deltas = {}
            self._stash.clear()

    def __call__(self, *args, route, **kwargs):
        if not args or not isinstance(args[0], torch.Tensor):
            raise RouteError("StraightThrough expects the input tensor as its first positional argument.")
        route = check_route(route, args[0], self.routed.num_tickets)
        if isinstance(route, int):
            return self._run_ticket(args, kwargs, route)
        if route.dim() != 1:
            raise RouteError("learned tickets are trained with one ticket per sample (route [B]); per-pixel routes "
                             "are for inference.")
        return run_bucketed(self._run_ticket, args, kwargs, route)

    def _run_ticket(self, args, kwargs, k: int):
        with self.active(k):
            return self.routed(*args, route=k, **kwargs)

    # ------------------------------------------------------------------ weight granularity
    def _weight_hook(self, name: str):
        idx = self._index[name]

        def hook(module: nn.Module, args, output):
            k = self._active
            if k is None or self._busy or not args:
                return None
            s = self.scores.tickets[k][idx]
            params = {"weight": self._weights[name].detach() * (s - s.detach())}
            if isinstance(getattr(module, "bias", None), torch.Tensor):
                params["bias"] = torch.zeros_like(module.bias)
            self._busy = True  # the layer call below must not re-enter this hook
            try:
                term = functional_call(module, params, (args[0].detach(),) + tuple(args[1:]))
            finally:
                self._busy = False
            return output + term
        return hook

    # ------------------------------------------------------------------ channel granularity
    def _channel_deltas(self, k: int) -> dict[tuple[str, str], torch.Tensor]:
        hard = self.routed.tickets.masks
        soft = {}
        for root, s in self.scores.expanded(k).items():
            soft[root] = hard[root][k].to(s.dtype) + (s - s.detach())
        layer: dict[tuple[str, str], torch.Tensor] = {}
        for g in self.routed.space.groups:
            kv = soft[g.root]
            for it in g.items:
                slot = (it.module, "out" if it.out else "in")
                idxs, root_idxs = it.index_pairs()
                dev = kv.device
                vals = torch.ones(it.size, dtype=kv.dtype, device=dev).index_copy(
                    0, torch.as_tensor(idxs, dtype=torch.long, device=dev),
                    kv[torch.as_tensor(root_idxs, dtype=torch.long, device=dev)])
                layer[slot] = vals if slot not in layer else layer[slot] * vals
        return {slot: m - m.detach() for slot, m in layer.items()}

    def _stash_out(self, name: str):
        def hook(module, args, output):
            if self._active is not None and isinstance(output, torch.Tensor):
                self._stash[(name, "out")] = output.detach()
        return hook

    def _add_out(self, name: str, dim: int):
        def hook(module, args, output):
            raw = self._stash.pop((name, "out"), None)
            delta = self._deltas.get((name, "out"))
            if raw is None or delta is None:
                return None
            return output + raw * _broadcast(delta, raw, dim)
        return hook

    def _stash_in(self, name: str):
        def pre_hook(module, args):
            if self._active is not None and args and isinstance(args[0], torch.Tensor):
                self._stash[(name, "in")] = args[0].detach()
        return pre_hook

    def _add_in(self, name: str, dim: int):
        def pre_hook(module, args):
            raw = self._stash.pop((name, "in"), None)
            delta = self._deltas.get((name, "in"))
            if raw is None or delta is None:
                return None
            return (args[0] + raw * _broadcast(delta, raw, dim),) + tuple(args[1:])
        return pre_hook
