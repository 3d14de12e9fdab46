"""Masked updates: during ticket k's optimizer step nothing outside ticket k changes.

Two mechanisms (see :mod:`rtl_plugin.training.retrain`): per-ticket optimizer state, and a masked write-back
``w = where(mask_k, w_after, w_before)`` after each step, skipped when :func:`write_back_needed` proves it a no-op.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from rtl_plugin.errors import TicketError


# Optimizers whose step leaves an entry unchanged when that entry's gradient has been zero since the state was
# created (zero moments / accumulators give a zero update) and no weight decay is configured. Exact classes
# only: a subclass may change the update rule.
_ZERO_GRAD_FROZEN = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax,
                     torch.optim.RMSprop)


def write_back_needed(routed, optimizers: Sequence[torch.optim.Optimizer], per_ticket_state: bool) -> bool:
    """Whether ``joint_retrain`` must snapshot and write back the entries a ticket does not own.

    False only when the optimizer step alone already leaves them bit-identical: weight granularity, one
    optimizer per ticket with empty state, every optimizer one of ``SGD, Adam, AdamW, Adamax, RMSprop``
    (exact class) with ``weight_decay == 0`` in every param group. (``joint_retrain`` also requires the
    default train step, no resumed checkpoint and frozen masks before it skips the write-back.)
    """
    if routed.granularity != "weight" or not per_ticket_state:
        return True
    for o in optimizers:
        if type(o) not in _ZERO_GRAD_FROZEN or len(o.state) > 0:
            return True
        if any(float(g.get("weight_decay", 0.0) or 0.0) != 0.0 for g in o.param_groups):
            return True
    return False


class MaskedUpdate:
    """Context for one ticket's step: snapshots what ticket k does not own and writes it back after the step."""

    def __init__(self, routed, ticket: int | None, buffers: dict | None = None, *, write_back: bool = True,
                 owned: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        """``buffers``: a dict shared by several MaskedUpdates (one per ticket) to reuse one snapshot buffer per
        parameter instead of allocating a copy of every weight at every step. ``write_back=False`` makes the
        context a no-op, for steps :func:`write_back_needed` proved cannot touch entries outside the ticket.
        ``owned``: the ``[(parameter, mask)]`` entries the step may change, instead of ticket ``ticket``'s
        (e.g. :func:`union_param_masks` for a step that trains every ticket)."""
        self.routed = routed
        self.ticket = ticket
        self.write_back = bool(write_back)
        if owned is None and ticket is None:
            raise TicketError("MaskedUpdate needs a ticket id or the owned=[(parameter, mask)] entries.")
        self._pairs = (owned if owned is not None else ticket_param_masks(routed, ticket)) if self.write_back else []
        self._buffers = {} if buffers is None else buffers
        self._saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __enter__(self):
        self._saved = []
        with torch.no_grad():
            for p, m in self._pairs:
                buf = self._buffers.get(id(p))
                if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                    buf = self._buffers[id(p)] = torch.empty_like(p.detach())
                buf.copy_(p.detach())
                self._saved.append((p, m, buf))
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for p, m, before in self._saved:
                w = p.detach()
                torch.where(m, w, before, out=w)  # in place: entries ticket k does not own get their old values
        self._saved = []
        return False


def ticket_param_masks(routed, ticket: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(parameter, bool mask broadcastable to it)]``: which entries ticket ``ticket`` owns."""
    masks, weights = routed.tickets.element_masks(), routed.prunable_weights()
    pairs = [(weights[n], masks[n][ticket]) for n in routed.space.layers]
    if routed.granularity == "channel":
        lm = routed.tickets.layer_channel_masks()
        mods = dict(routed.model.named_modules())
        seen = {id(p) for p, _ in pairs}
        for name, sides in lm.items():
            out = sides.get("out")
            if out is None:
                continue
            m = mods[name]
            for pname in ("bias", "weight"):
                p = getattr(m, pname, None)
                if isinstance(p, nn.Parameter) and id(p) not in seen and p.dim() == 1 and p.shape[0] == out.shape[1]:
                    pairs.append((p, out[ticket]))
                    seen.add(id(p))
    return pairs


def union_param_masks(routed, tickets=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(parameter, bool mask)]``: the entries at least one of ``tickets`` (default: every ticket) owns, for
    parameters some entries of which none of them owns (the OR over tickets of :func:`ticket_param_masks`)."""
    owned: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for k in (range(routed.num_tickets) if tickets is None else tickets):
        for p, m in ticket_param_masks(routed, k):
            prev = owned.get(id(p))
            owned[id(p)] = (p, m if prev is None else prev[1] | m)
    return [(p, m) for p, m in owned.values() if not bool(m.all())]
