"""Learned tickets (an extension, not the paper's method): per-ticket real-valued scores over a ticket space,
binarised to a sparsity budget, and the schedule that anneals the budget toward its final value.

Scores live where the masks live: ``[*weight_shape]`` per prunable layer (weight granularity) or one score per
channel position ``[period]`` per channel group (channel granularity; a grouped layer keeps the same positions in
every channel group, so its scores are tiled). Binarising ticket k keeps its highest scores:

* weight granularity: exactly ``N - round(sparsity * N)`` of the N prunable weights (ties broken by position),
  ranked over all layers (``scope="global"``, every layer keeps at least one weight) or with every layer at the
  same sparsity (``scope="layer"``, largest remainders, the total still exact);
* channel granularity: the fewest lowest-scoring channel positions whose removal reaches the target weight
  sparsity (never a group's last position). Whole channels cannot hit every weight count, so the sparsity is
  the smallest reachable value >= the target (one channel fewer stays below it).

The masks are ordinary :class:`~rtl_plugin.tickets.TicketSet` masks.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from rtl_plugin.errors import SparsityError, TicketError
from rtl_plugin.pruning.ranking import channel_weight_sparsity, drop_channels, kth_smallest
from rtl_plugin.space import TicketSpace
from rtl_plugin.tickets import TicketSet

__all__ = ["TicketScores", "sparsity_schedule", "SCOPES", "INITS"]

SCOPES = ("global", "layer")
INITS = ("magnitude", "random")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_sparsity(v, what: str = "sparsity") -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or not 0.0 <= float(v) < 1.0:
        raise SparsityError(f"{what} must be a number in [0, 1) (0.9 removes 90% of the prunable weights), "
                            f"got {v!r}.")
    return float(v)


def sparsity_schedule(final: float, num_binarisations: int, *, initial: float = 0.0,
                      anneal_fraction: float = 0.5) -> list[float]:
    """Target sparsity of every binarisation: cubic from ``initial`` to ``final`` (Zhu & Gupta 2017) over the
    first ``anneal_fraction`` of the binarisations, then ``final``; the last entry is always ``final``.

    >>> sparsity_schedule(0.9, 5, anneal_fraction=0.5)
    [0.0, 0.7875, 0.9, 0.9, 0.9]
    """
    final = _check_sparsity(final, "final sparsity")
    initial = _check_sparsity(initial, "initial sparsity")
    if initial > final:
        raise SparsityError(f"initial sparsity {initial} exceeds the final {final}; the schedule anneals upward: "
                            "lower initial_sparsity.")
    if not _is_int(num_binarisations) or num_binarisations < 1:
        raise SparsityError(f"num_binarisations must be a positive int, got {num_binarisations!r}.")
    if isinstance(anneal_fraction, bool) or not isinstance(anneal_fraction, (int, float)) or \
            not 0.0 <= float(anneal_fraction) <= 1.0:
        raise SparsityError(f"anneal_fraction must be in [0, 1] (the share of training spent reaching the final "
                            f"sparsity), got {anneal_fraction!r}.")
    n_anneal = round(float(anneal_fraction) * (num_binarisations - 1))
    out = []
    for i in range(num_binarisations):
        if i >= n_anneal:
            out.append(final)
        else:
            out.append(final + (initial - final) * (1.0 - i / n_anneal) ** 3)
    return out


def _targets(sparsity, num_tickets: int) -> list[float]:
    if isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool):
        return [_check_sparsity(sparsity)] * num_tickets
    try:
        vals = [_check_sparsity(s) for s in sparsity]
    except TypeError:
        raise SparsityError(f"sparsity must be a number in [0, 1) or one per ticket, got {sparsity!r}.") from None
    if len(vals) != num_tickets:
        raise SparsityError(f"got {len(vals)} sparsities for {num_tickets} tickets; give one number or one per ticket.")
    return vals


def _top_n(flat: torch.Tensor, n_keep: int) -> torch.Tensor:
    """BoolTensor marking the ``n_keep`` largest entries of 1-D ``flat``; ties go to the lower position."""
    n = flat.numel()
    if n_keep >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    if n_keep <= 0:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    thr = kth_smallest(flat, n - n_keep)  # the largest dropped value
    keep = flat > thr
    need = n_keep - int(keep.sum())
    if need > 0:
        ties = (flat == thr).nonzero().flatten()
        keep[ties[:need]] = True
    return keep


def _layer_quotas(sizes: list[int], n_keep: int) -> list[int]:
    """Kept weights per layer: the same fraction everywhere (largest remainders), at least one, summing to n_keep."""
    total = sum(sizes)
    exact = [n_keep * s / total for s in sizes]
    quota = [min(s, max(1, math.floor(e))) for s, e in zip(sizes, exact)]
    left = n_keep - sum(quota)
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
    while left != 0:
        moved = False
        for i in order if left > 0 else reversed(order):
            if left > 0 and quota[i] < sizes[i]:
                quota[i] += 1
                left -= 1
                moved = True
            elif left < 0 and quota[i] > 1:
                quota[i] -= 1
                left += 1
                moved = True
            if left == 0:
                break
        if not moved:
            break
    return quota


def _revive_empty_layers(keep: torch.Tensor, flat: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
    """Global ranking: give every emptied layer its best weight back, dropping the lowest kept weights of layers
    that keep more than one (the count is unchanged)."""
    empty = [(a, b) for a, b in bounds if not bool(keep[a:b].any())]
    if not empty:
        return keep
    donors = torch.zeros_like(keep)
    for a, b in bounds:
        if int(keep[a:b].sum()) > 1:
            donors[a:b] = keep[a:b]
    for a, b in empty:
        keep[a + int(flat[a:b].argmax())] = True
    cand = donors.nonzero().flatten()
    order = torch.argsort(flat[cand], stable=True)
    dropped = 0
    for i in cand[order].tolist():
        if dropped == len(empty):
            break
        a, b = next(x for x in bounds if x[0] <= i < x[1])
        if int(keep[a:b].sum()) > 1:
            keep[i] = False
            dropped += 1
    return keep


class TicketScores(nn.Module):
    """Per-ticket real-valued scores over a :class:`TicketSpace` (one ``nn.Parameter`` per ticket and mask key,
    so a ticket absent from a batch gets no gradient and no optimizer update).

    Build with :meth:`from_magnitude` (scores = |W| / mean |W|: the first binarisation is global magnitude
    pruning) or :meth:`random`. ``scores[k][key]`` is ticket k's score tensor for one mask key.
    """

    def __init__(self, space: TicketSpace, values: Sequence[dict[str, torch.Tensor]]):
        super().__init__()
        if not isinstance(space, TicketSpace):
            raise TicketError(f"space must be a TicketSpace (routed.space), got {type(space).__name__}.")
        if not isinstance(values, Sequence) or not values:
            raise TicketError("values must be a non-empty list with one {mask key: scores} dict per ticket.")
        object.__setattr__(self, "space", space)
        self.keys = list(space.mask_shapes())
        shapes = self.score_shapes(space)
        per_ticket = []
        for k, vals in enumerate(values):
            if not isinstance(vals, dict) or set(vals) != set(self.keys):
                raise TicketError(f"ticket {k}'s scores must be a dict over the space's {len(self.keys)} mask keys.")
            params = []
            for key in self.keys:
                v = torch.as_tensor(vals[key])
                if tuple(v.shape) != shapes[key] or not v.is_floating_point():
                    raise TicketError(f"ticket {k}'s scores for {key!r} must be a float tensor of shape {shapes[key]}, "
                                      f"got {getattr(v, 'dtype', '?')} {tuple(v.shape)}.")
                params.append(nn.Parameter(v.detach().clone().float()))
            per_ticket.append(nn.ParameterList(params))
        self.tickets = nn.ModuleList(per_ticket)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def score_shapes(space: TicketSpace) -> dict[str, tuple[int, ...]]:
        """Shape of one ticket's scores per mask key: the weight shape, or ``(period,)`` per channel group."""
        if space.granularity == "weight":
            return {k: tuple(v) for k, v in space.layers.items()}
        return {g.root: (g.period,) for g in space.groups}

    @classmethod
    def from_magnitude(cls, routed, *, normalize: str = "global", num_tickets: int | None = None) -> "TicketScores":
        """Every ticket starts at |W| (channel mode: the root layer's per-channel L2 norm, averaged over channel
        groups) divided by its mean over all layers (``normalize="global"``: the first binarisation is global
        magnitude pruning) or over its own layer (``"layer"``: layers compete on relative magnitude, so every
        layer keeps about the same share; worse for small first layers)."""
        if normalize not in ("global", "layer"):
            raise TicketError(f"normalize must be 'global' or 'layer', got {normalize!r}.")
        space = routed.space
        K = routed.num_tickets if num_tickets is None else num_tickets
        if not _is_int(K) or K < 1:
            raise TicketError(f"num_tickets must be a positive int, got {K!r}.")
        base = {}
        if space.granularity == "weight":
            for n, w in routed.prunable_weights().items():
                base[n] = w.detach().abs().float()
        else:
            for g in space.groups:
                w = routed.model.get_submodule(g.root).weight.detach().float()
                dim = 1 if space.layer_kinds.get(g.root) == "convT" else 0
                norms = w.transpose(0, dim).reshape(w.shape[dim], -1).norm(dim=1)[:g.size]
                base[g.root] = norms.view(g.ch_groups, g.period).mean(0)
        if normalize == "layer":
            base = {n: v / v.mean().clamp_min(1e-12) for n, v in base.items()}
        else:
            scale = torch.cat([v.flatten() for v in base.values()]).mean().clamp_min(1e-12)
            base = {n: v / scale for n, v in base.items()}
        return cls(space, [dict(base) for _ in range(K)])

    @classmethod
    def random(cls, space: TicketSpace, num_tickets: int, *, seed: int = 0) -> "TicketScores":
        """Independent uniform [0, 1) scores per ticket (a random first binarisation), deterministic in ``seed``."""
        if not _is_int(num_tickets) or num_tickets < 1:
            raise TicketError(f"num_tickets must be a positive int, got {num_tickets!r}.")
        g = torch.Generator().manual_seed(int(seed))
        shapes = cls.score_shapes(space)
        return cls(space, [{k: torch.rand(s, generator=g) for k, s in shapes.items()} for _ in range(num_tickets)])

    # ------------------------------------------------------------------ access
    @property
    def num_tickets(self) -> int:
        return len(self.tickets)

    def ticket(self, k: int) -> dict[str, nn.Parameter]:
        """Ticket k's score parameters ``{mask key: Parameter}``."""
        if not _is_int(k) or not 0 <= k < self.num_tickets:
            raise TicketError(f"ticket index must be an int in [0, {self.num_tickets}), got {k!r}.")
        return dict(zip(self.keys, self.tickets[k]))

    def expanded(self, k: int) -> dict[str, torch.Tensor]:
        """Ticket k's scores in mask shape (channel mode: tiled over each group's channel groups)."""
        t = self.ticket(k)
        if self.space.granularity == "weight":
            return t
        return {g.root: t[g.root].repeat(g.ch_groups) for g in self.space.groups}

    # ------------------------------------------------------------------ binarisation
    @torch.no_grad()
    def binarize(self, sparsity, *, scope: str = "global") -> TicketSet:
        """Masks keeping each ticket's highest scores at ``sparsity`` (one number, or one per ticket); see the
        module docstring for exactness. ``scope`` ("global" | "layer") applies to weight granularity."""
        if scope not in SCOPES:
            raise SparsityError(f"scope must be one of {SCOPES} ('global': one ranking over all layers; 'layer': "
                                f"every layer at the same sparsity), got {scope!r}.")
        targets = _targets(sparsity, self.num_tickets)
        per_ticket = [self._binarize_ticket(k, t, scope) for k, t in enumerate(targets)]
        masks = {key: torch.stack([m[key] for m in per_ticket]) for key in self.keys}
        return TicketSet(self.space, masks)

    def _binarize_ticket(self, k: int, target: float, scope: str) -> dict[str, torch.Tensor]:
        if self.space.granularity == "channel":
            return self._binarize_channels(k, target)
        scores = self.ticket(k)
        sizes = [scores[n].numel() for n in self.keys]
        total = sum(sizes)
        n_keep = total - round(target * total)
        if scope == "layer":
            quotas = _layer_quotas(sizes, n_keep)
            return {n: _top_n(scores[n].detach().flatten(), q).view_as(scores[n]) for n, q in zip(self.keys, quotas)}
        flat = torch.cat([scores[n].detach().flatten() for n in self.keys])
        keep = _top_n(flat, n_keep)
        bounds, off = [], 0
        for s in sizes:
            bounds.append((off, off + s))
            off += s
        if n_keep >= len(sizes):
            keep = _revive_empty_layers(keep, flat, bounds)
        return {n: keep[a:b].view_as(scores[n]) for n, (a, b) in zip(self.keys, bounds)}

    def _binarize_channels(self, k: int, target: float) -> dict[str, torch.Tensor]:
        groups = self.space.groups
        scores = self.ticket(k)
        dev = scores[groups[0].root].device
        full = {g.root: torch.ones(g.size, dtype=torch.bool, device=dev) for g in groups}
        cands = []
        for gi, g in enumerate(groups):
            if g.period < 2:
                continue
            for pos, v in enumerate(scores[g.root].detach().cpu().tolist()):
                cands.append((v, gi * 1_000_000 + pos, g.root, pos))
        cands.sort()
        alive = {g.root: g.period for g in groups}

        def dropped(n: int) -> dict[str, torch.Tensor]:
            return drop_channels(groups, full, cands, alive, n)

        if target <= 0.0 or not cands:
            return full
        if channel_weight_sparsity(self.space, dropped(len(cands))) < target - 1e-12:
            reach = channel_weight_sparsity(self.space, dropped(len(cands)))
            raise SparsityError(f"channel tickets of this space reach at most {reach:.4f} weight sparsity (one channel "
                                f"kept per group), below the target {target}; lower the sparsity or use "
                                "granularity='weight'.")
        lo, hi = 0, len(cands)  # sparsity(lo) < target <= sparsity(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if channel_weight_sparsity(self.space, dropped(mid)) >= target - 1e-12:
                hi = mid
            else:
                lo = mid
        return dropped(hi)

    def extra_repr(self) -> str:
        return f"num_tickets={self.num_tickets}, granularity={self.space.granularity}, keys={len(self.keys)}"
