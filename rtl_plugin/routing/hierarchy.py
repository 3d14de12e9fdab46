"""Two-level (coarse-to-fine) routing: a router over super-groups, then one router per super-group over its
sub-tickets.

``TwoLevelRouter(top, subs)``: ``top(x)`` gives each input's super-group p in [0, P); ``subs[p]`` is a router
over that group's sub-tickets (its outputs index ``children[p]``, the routed model's ticket ids of the group's
sub-tickets), or None for a group routed to one ticket. ``router(x)`` returns routed-model ticket ids [B].
Per input, routing costs the top router plus the chosen group's router (:meth:`flops_per_sample` gives the
mean over groups and the max).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from rtl_plugin.errors import RouteError

__all__ = ["TwoLevelRouter"]


class TwoLevelRouter(nn.Module):
    """Coarse-to-fine routing (see the module doc).

    Args:
        top: a fitted router over the P super-groups.
        subs: P routers (or None where a group has one sub-ticket), router p over ``len(children[p])`` tickets.
        children: P lists of routed-model ticket ids: group p's sub-tickets, in the order router p predicts them.
    """

    def __init__(self, top: nn.Module, subs: Sequence[nn.Module | None], children: Sequence[Sequence[int]]):
        super().__init__()
        if not callable(top):
            raise RouteError(f"top must be a router over the super-groups, got {type(top).__name__}.")
        if len(subs) != len(children) or not len(children):
            raise RouteError(f"give one sub-router (or None) and one list of ticket ids per super-group; got "
                             f"{len(subs)} routers for {len(children)} groups.")
        for p, (r, ids) in enumerate(zip(subs, children)):
            ids = list(ids)
            if not ids or any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in ids):
                raise RouteError(f"group {p}: children must be a non-empty list of ticket ids >= 0, got {ids!r}.")
            if r is None and len(ids) != 1:
                raise RouteError(f"group {p} has {len(ids)} sub-tickets but no router; give it one.")
            if r is not None and getattr(r, "num_tickets", len(ids)) != len(ids):
                raise RouteError(f"group {p}'s router routes {r.num_tickets} tickets for {len(ids)} children.")
        self.top = top
        self.subs = nn.ModuleList([r if r is not None else nn.Identity() for r in subs])
        self._has_router = [r is not None for r in subs]
        self.children_ids = [torch.as_tensor(list(ids), dtype=torch.long) for ids in children]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.top(x).long()
        if p.dim() != 1 or p.shape[0] != x.shape[0]:
            raise RouteError("the top router must return one super-group id per input, LongTensor [B].")
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= len(self.children_ids)):
            raise RouteError(f"the top router returned a group outside [0, {len(self.children_ids)}).")
        out = torch.empty_like(p)
        for g in p.unique().tolist():
            sel = (p == g).nonzero().flatten()
            ids = self.children_ids[g].to(p.device)
            local = self.subs[g](x.index_select(0, sel)).long() if self._has_router[g] else torch.zeros_like(sel)
            out[sel] = ids[local]
        return out

    def flops_per_sample(self, input_shape) -> dict:
        """``{"mean": ..., "max": ...}`` over super-groups: top router + that group's router FLOPs per input."""
        top = self.top.flops_per_sample(input_shape)
        per = [top + (r.flops_per_sample(input_shape) if has else 0) for r, has in zip(self.subs, self._has_router)]
        return {"mean": sum(per) / len(per), "max": max(per)}
