"""Budget-aware routing: a ladder of tickets per group at several sparsities, and a router that picks, per input,
the best ticket whose cost fits a FLOPs budget.

* :func:`ladder_tickets` turns one search's nested masks (``SearchResult.tickets_at``: every group's IMP
  trajectory, recorded at each sparsity) into one TicketSet of ``K x L`` tickets, group-major: ticket
  ``g * L + l`` is group g at its l-th sparsity. The masks of a group are nested (its sparser rungs are subsets).
* :func:`ticket_costs` measures each ticket's cost in MACs per input: channel tickets with torch-pruning's
  counter on the exported (physically smaller) ticket; weight tickets as the dense MACs minus the MACs of the
  masked-out weights (each weight of a layer is multiplied once per output position).
* :class:`BudgetRouter` wraps a group router (any router over the K groups, e.g. a fitted CentroidRouter) and
  each ticket's validation quality: ``router(x, budget=b)`` gives per input the ticket of the predicted group
  with the best quality among those costing at most ``b`` (another group's fitting ticket when none of its
  own fits), so no input's ticket ever costs more than ``b``; ``budget`` is a number, a tensor [B] of
  per-input budgets or the name of a device mode (``modes={"low-power": 2e6}``); ``router(x, mean_budget=b)``
  spends the budget on average over the batch instead (greedy: the best quality gain per MAC first).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn

from rtl_plugin import _tp
from rtl_plugin.errors import DataError, RouteError, SparsityError
from rtl_plugin.tickets import TicketSet

__all__ = ["ladder_tickets", "ladder_groups", "ticket_costs", "BudgetRouter"]


def ladder_tickets(tickets_at: Mapping[float, TicketSet], sparsities: Sequence[float] | None = None) -> TicketSet:
    """``K x L`` tickets, group-major (ticket ``g * L + l`` = group g at ``sparsities[l]``, ascending), from the
    nested masks of one search (``SearchResult.tickets_at``). Default: every recorded sparsity."""
    if not isinstance(tickets_at, Mapping) or not tickets_at:
        raise SparsityError("ladder_tickets needs SearchResult.tickets_at, a non-empty {sparsity: TicketSet}.")
    levels = sorted(tickets_at) if sparsities is None else sorted(float(s) for s in sparsities)
    missing = [s for s in levels if s not in tickets_at]
    if missing or not levels:
        raise SparsityError(f"sparsities {missing or levels} were not recorded by the search (recorded: "
                            f"{sorted(tickets_at)}); pick recorded ones.")
    sets = [tickets_at[s] for s in levels]
    K = sets[0].num_tickets
    if any(t.num_tickets != K or t.space is not sets[0].space and t.space.to_dict() != sets[0].space.to_dict()
           for t in sets):
        raise SparsityError("the TicketSets of tickets_at differ in K or space; pass one search's tickets_at.")
    masks = {n: torch.stack([t.masks[n][g] for g in range(K) for t in sets]) for n in sets[0].masks}
    return TicketSet(sets[0].space, masks)


def ladder_groups(num_groups: int, levels: int) -> torch.Tensor:
    """The group of each ladder ticket, LongTensor [K x L] (``g`` repeated ``levels`` times)."""
    if not isinstance(num_groups, int) or not isinstance(levels, int) or num_groups < 1 or levels < 1:
        raise RouteError(f"num_groups and levels must be positive ints, got {num_groups!r}, {levels!r}.")
    return torch.arange(num_groups).repeat_interleave(levels)


def _positions_per_weight(routed, example_inputs) -> dict[str, int]:
    """How many times each prunable layer's weights are used per input (its output positions)."""
    plain = routed.plain_copy(0).eval()
    mods = dict(plain.named_modules())
    seen: dict[str, int] = {}
    hooks = []
    for name in routed.space.layers:
        m = mods[name]
        ch_dim = -1 if _tp.is_linear(m) else 1

        def hook(mod, args, out, name=name, ch_dim=ch_dim):
            seen[name] = out.numel() // (out.shape[0] * out.shape[ch_dim])
        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            plain(example_inputs[:1])
    finally:
        for h in hooks:
            h.remove()
    return seen


def ticket_costs(routed, example_inputs) -> torch.Tensor:
    """MACs per input of every ticket, LongTensor [K] (see the module doc). ``example_inputs``: one batch of
    the model's input (the first sample is counted)."""
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() < 2:
        raise DataError("example_inputs must be a batched input tensor [B, ...] of the whole model.")
    example_inputs = example_inputs[:1]
    K = routed.num_tickets
    if routed.granularity == "channel":
        return torch.tensor([routed.count_ops_and_params(k, example_inputs)[0] for k in range(K)], dtype=torch.long)
    dense = _tp.count_ops_and_params(routed.plain_copy(0), example_inputs)[0]
    positions = _positions_per_weight(routed, example_inputs)
    dropped = torch.zeros(K, dtype=torch.long)
    for n, m in routed.tickets.masks.items():
        if n not in positions:
            raise DataError(f"layer {n!r} did not run on example_inputs; pass an input that runs every layer.")
        dropped += (~m).reshape(K, -1).sum(1).long() * positions[n]
    return dense - dropped


class BudgetRouter(nn.Module):
    """Per-input ticket choice under a cost budget (see the module doc).

    Args:
        group_router: a fitted router over the K groups (``group_router(x) -> LongTensor [B]``).
        costs: cost of every ticket, [T] (e.g. :func:`ticket_costs`).
        groups: the group of every ticket, LongTensor [T] in [0, K) (e.g. :func:`ladder_groups`).
        quality: each ticket's validation quality on its group's data (higher is better), [T].
        modes: optional named budgets (device modes), ``{"low-power": 2e6, "full": 1e9}``.
    """

    def __init__(self, group_router: nn.Module, costs, groups, quality, *, modes: Mapping[str, float] | None = None):
        super().__init__()
        if not callable(group_router):
            raise RouteError(f"group_router must be a router (callable x -> group ids), got {type(group_router).__name__}.")
        costs, groups, quality = (torch.as_tensor(v) for v in (costs, groups, quality))
        T = costs.shape[0] if costs.dim() == 1 else -1
        if T < 1 or groups.shape != (T,) or quality.shape != (T,):
            raise RouteError(f"costs, groups and quality must be 1-D with one entry per ticket, got shapes "
                             f"{tuple(costs.shape)}, {tuple(groups.shape)}, {tuple(quality.shape)}.")
        if groups.is_floating_point() or int(groups.min()) < 0:
            raise RouteError("groups must hold integer group ids >= 0, one per ticket.")
        if bool((costs < 0).any()) or not bool(torch.isfinite(quality.double()).all()):
            raise RouteError("costs must be >= 0 and quality finite; measure them with ticket_costs and a validation set.")
        self.group_router = group_router
        self.register_buffer("costs", costs.double())
        self.register_buffer("groups", groups.long())
        self.register_buffer("quality", quality.double())
        self.num_tickets = T
        self.modes = {str(k): float(v) for k, v in (modes or {}).items()}

    def _budget(self, budget, B: int) -> torch.Tensor:
        if isinstance(budget, str):
            if budget not in self.modes:
                raise RouteError(f"unknown device mode {budget!r}; known modes: {sorted(self.modes)}.")
            budget = self.modes[budget]
        b = torch.as_tensor(budget, dtype=torch.float64)
        if b.dim() == 0:
            b = b.expand(B)
        if b.shape != (B,):
            raise RouteError(f"budget must be a number, a mode name or a tensor [B] = [{B}], got shape {tuple(b.shape)}.")
        cheapest = float(self.costs.min())
        if bool((b < cheapest).any()):
            raise RouteError(f"a budget of {float(b.min()):.4g} is below the cheapest ticket ({cheapest:.4g} MACs); "
                             "raise the budget or add a sparser ticket.")
        return b

    @torch.no_grad()
    def forward(self, x: torch.Tensor, *, budget=None, mean_budget=None) -> torch.Tensor:
        """Ticket ids [B]: ``budget=`` caps every input's ticket cost, ``mean_budget=`` the batch's mean cost."""
        if (budget is None) == (mean_budget is None):
            raise RouteError("pass exactly one of budget= (per input) or mean_budget= (batch average).")
        g = self.group_router(x).long().cpu()
        if g.dim() != 1 or g.shape[0] != x.shape[0]:
            raise RouteError("the group router must return one group id per input, LongTensor [B].")
        if budget is not None:
            return self._capped(g, self._budget(budget, g.shape[0])).to(x.device)
        return self._mean(g, float(self._budget(mean_budget, 1)[0])).to(x.device)

    def _capped(self, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        own = (self.groups[None, :] == g[:, None]).double()
        span = float(self.quality.max() - self.quality.min()) + 1.0  # own group always outranks the others
        score = self.quality[None, :] + own * span
        score = score.masked_fill(self.costs[None, :] > b[:, None], float("-inf"))
        return score.argmax(1)

    def _mean(self, g: torch.Tensor, budget: float) -> torch.Tensor:
        """Per group present: start at its cheapest ticket, then upgrade the group whose next better ticket
        gains the most quality per extra MAC (over its inputs) while the batch mean stays within budget."""
        B = g.shape[0]
        present, counts = torch.unique(g, return_counts=True)
        choice, spent = {}, 0.0
        for grp, n in zip(present.tolist(), counts.tolist()):
            idx = (self.groups == grp).nonzero().flatten()
            if idx.numel() == 0:
                raise RouteError(f"group {grp} has no ticket; give every group of the group router a ticket.")
            choice[grp] = int(idx[self.costs[idx].argmin()])
            spent += n * float(self.costs[choice[grp]])
        if spent > budget * B + 1e-6:
            raise RouteError(f"mean_budget={budget:.4g} is below the mean cost of the cheapest tickets of this batch "
                             f"({spent / B:.4g}); raise it.")
        n_of = dict(zip(present.tolist(), counts.tolist()))
        while True:
            best = None
            for grp, cur in choice.items():
                idx = (self.groups == grp).nonzero().flatten()
                for t in idx.tolist():
                    extra = n_of[grp] * float(self.costs[t] - self.costs[cur])
                    gain = n_of[grp] * float(self.quality[t] - self.quality[cur])
                    if gain > 0 and spent + max(extra, 0.0) <= budget * B + 1e-6:
                        rate = gain / max(extra, 1e-9)
                        if best is None or rate > best[0]:
                            best = (rate, grp, t, extra)
            if best is None:
                break
            _, grp, t, extra = best
            choice[grp], spent = t, spent + extra
        return torch.tensor([choice[int(v)] for v in g.tolist()], dtype=torch.long)

    def extra_repr(self) -> str:
        return f"tickets={self.num_tickets}, groups={int(self.groups.max()) + 1}, modes={sorted(self.modes)}"
