"""Which entries one pruning round removes: magnitude ranking of weights (global or per layer) and the ranking of
channel positions by a torch-pruning importance normalised within each group."""
from __future__ import annotations

import math

import torch

from rtl_plugin.errors import RTLError


def magnitude_scores(routed) -> dict[str, torch.Tensor]:
    """|W| per prunable layer (the paper's criterion)."""
    return {n: w.detach().abs() for n, w in routed.prunable_weights().items()}


def kth_smallest(values: torch.Tensor, n: int, *, method: str = "auto") -> torch.Tensor:
    """The n-th smallest (1-based) entry of a 1-D tensor, as a 0-d tensor on its device.

    ``method``: "kthvalue" (selection on the CPU; what CPU tensors use), "sort" (a full sort on the tensor's
    device: CUDA's kthvalue is slow and the copy to the CPU costs more than the sort there) or "auto"
    (sort on CUDA, kthvalue otherwise). Both give the same value, ties included."""
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise RTLError(f"values must be a 1-D tensor, got {getattr(values, 'shape', type(values).__name__)}")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= values.numel():
        raise RTLError(f"n must be an int in [1, {values.numel()}], got {n!r}")
    if method not in ("auto", "sort", "kthvalue"):
        raise RTLError(f"method must be 'auto', 'sort' or 'kthvalue', got {method!r}")
    if method == "sort" or (method == "auto" and values.is_cuda):
        return torch.sort(values).values[n - 1]
    return torch.kthvalue(values.cpu(), n).values.to(values.device)


def _check_count(n, kept: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= kept:
        raise RTLError(f"the number of weights to prune must be an int in [1, {kept}] (the surviving weights), got {n!r}.")


def prune_weights_global(masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Drop the n lowest-scoring surviving entries over all layers (in place on ``masks``).

    The threshold is the n-th smallest surviving score (pruned entries score +inf); ties are broken by position
    for exact counts: the same set as the first n of a stable argsort of the survivors, in O(N)."""
    _check_count(n, int(sum(int(m.sum()) for m in masks.values())))
    names = list(masks)
    inf = torch.tensor(float("inf"))
    flat = torch.cat([torch.where(masks[nm], scores[nm].float(), inf.to(scores[nm].device)).flatten()
                      for nm in names])
    thr = kth_smallest(flat, n)
    drop = flat < thr
    need = n - int(drop.sum())
    if need > 0:
        drop[(flat == thr).nonzero().flatten()[:need]] = True
    off = 0
    for nm in names:
        m = masks[nm]
        m &= ~drop[off:off + m.numel()].view_as(m)
        off += m.numel()
    return masks


def prune_weights_layerwise(masks, scores, kept: int, n: int) -> dict[str, torch.Tensor]:
    """Every layer loses the same fraction n / kept of its surviving weights (largest remainders get the
    leftover counts, never the last weight of a layer): avoids the layer collapse a global ranking causes
    when deep layers start with smaller weights."""
    _check_count(n, kept)
    names = list(masks)
    alive = {nm: int(masks[nm].sum()) for nm in names}
    exact = {nm: n * alive[nm] / kept for nm in names}
    quota = {nm: min(int(math.floor(exact[nm])), max(alive[nm] - 1, 0)) for nm in names}
    left = n - sum(quota.values())
    for nm in sorted(names, key=lambda x: exact[x] - math.floor(exact[x]), reverse=True):
        if left <= 0:
            break
        if quota[nm] < alive[nm] - 1:
            quota[nm] += 1
            left -= 1
    for nm in names:
        q = quota[nm]
        if q <= 0:
            continue
        m = masks[nm]
        idx = m.nonzero(as_tuple=True)
        vals = scores[nm][idx].float()
        drop = torch.argsort(vals, stable=True)[:q]
        m[tuple(i[drop] for i in idx)] = False
    return masks


def channel_candidates(groups, keep: dict[str, torch.Tensor], imps: dict[str, torch.Tensor]):
    """``(candidates, alive)``: the surviving channel positions of every group with at least two of them, as
    ``(importance normalised to mean 1 over the group's alive positions, order, group root, position)``
    sorted ascending, and the number of alive positions per group."""
    cands: list[tuple[float, int, str, int]] = []
    alive_of = {}
    for g in groups:
        per = keep[g.root].cpu().view(g.ch_groups, g.period)[0]
        imp = imps[g.root].view(g.ch_groups, g.period).mean(0)
        alive = per.nonzero().flatten()
        alive_of[g.root] = int(alive.numel())
        if alive.numel() < 2:
            continue
        a = imp[alive].float()
        a = a / a.abs().mean().clamp_min(1e-12)
        for pos, v in zip(alive.tolist(), a.tolist()):
            cands.append((v, len(cands), g.root, pos))
    cands.sort()
    return cands, alive_of


def drop_channels(groups, keep: dict[str, torch.Tensor], cands, alive_of: dict[str, int], n: int) -> dict[str, torch.Tensor]:
    """Ticket keep-vectors with the first ``n`` candidates dropped, never the last position of a group (a
    physically pruned layer needs a channel); grouped convolutions keep the same positions in every group."""
    by_root = {g.root: g for g in groups}
    per = {r: keep[r].cpu().view(g.ch_groups, g.period)[0].clone() for r, g in by_root.items()}
    left = dict(alive_of)
    done = 0
    for _, _, root, pos in cands:
        if done >= n:
            break
        if left[root] <= 1:
            continue
        per[root][pos] = False
        left[root] -= 1
        done += 1
    return {r: per[r].repeat(g.ch_groups).to(keep[r].device) for r, g in by_root.items()}


def channel_kept_weights(space, masks: dict[str, torch.Tensor]) -> int:
    """How many prunable weights one ticket's channel keep-vectors ``{group root: [C]}`` keep: per layer and
    channel group, kept rows x kept columns x kernel size (what ``space.weight_element_masks`` would count,
    without building the element masks)."""
    lm = space.channel_layer_masks({n: v.unsqueeze(0) for n, v in masks.items()})
    kept = 0
    for name, shape in space.layers.items():
        sides, g = lm.get(name, {}), space.conv_groups.get(name, 1)
        row_side, col_side = ("in", "out") if space.layer_kinds[name] == "convT" else ("out", "in")
        n_rows, per_g_cols = shape[0], shape[1]
        rows = sides[row_side][0] if row_side in sides else torch.ones(n_rows, dtype=torch.bool)
        cols = sides[col_side][0] if col_side in sides else torch.ones(per_g_cols * g, dtype=torch.bool)
        per_group = rows.view(g, n_rows // g).sum(1).cpu() * cols.view(g, per_g_cols).sum(1).cpu()
        kept += int(per_group.sum()) * math.prod(shape[2:])
    return kept


def channel_weight_sparsity(space, masks: dict[str, torch.Tensor]) -> float:
    """The weight sparsity one ticket's channel keep-vectors ``{group root: [C]}`` give."""
    return 1.0 - channel_kept_weights(space, masks) / space.num_weights


def select_channels(space, keep: dict[str, torch.Tensor], imps: dict[str, torch.Tensor], fraction: float,
                    target: float) -> dict[str, torch.Tensor]:
    """One channel round: drop the lowest ``fraction`` of the ranked candidates and, if that overshoots
    ``target``, the smallest count that reaches it (bisection over the count; sparsity is monotone in it)."""
    groups = space.groups
    cands, alive_of = channel_candidates(groups, keep, imps)
    if not cands:
        return keep
    n = max(1, math.ceil(fraction * len(cands)))
    cand = drop_channels(groups, keep, cands, alive_of, n)
    if channel_weight_sparsity(space, cand) <= target + 1e-9:
        return cand
    lo, hi = 0, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if channel_weight_sparsity(space, drop_channels(groups, keep, cands, alive_of, mid)) >= target - 1e-12:
            hi = mid
        else:
            lo = mid
    return drop_channels(groups, keep, cands, alive_of, hi)
