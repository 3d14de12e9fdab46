"""Ticket similarity diagnostics: Jaccard globally, per layer and per depth band; S_k; chance level;
shared vs private weights; parameter accounting.

All functions are label-free: they need only the masks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from rtl_plugin.errors import TicketError
from rtl_plugin.routed import RoutedModel
from rtl_plugin.tickets import TicketSet, jaccard_from_counts, pair_counts


def jaccard_per_layer(tickets: TicketSet) -> dict[str, torch.Tensor]:
    """``{layer: FloatTensor[K, K]}`` pairwise Jaccard of each prunable layer's masks."""
    K = tickets.num_tickets
    return {n: jaccard_from_counts(*pair_counts([m], K)) for n, m in tickets.element_masks().items()}


def depth_bands(layers: list[str], n_bands: int = 3) -> dict[str, list[str]]:
    """Split layers (in forward/definition order) into ``n_bands`` contiguous bands by index."""
    if n_bands < 1:
        raise TicketError(f"n_bands must be >= 1, got {n_bands}.")
    names = ["shallow", "middle", "deep"] if n_bands == 3 else [f"band{i}" for i in range(n_bands)]
    out: dict[str, list[str]] = {n: [] for n in names}
    L = len(layers)
    for i, layer in enumerate(layers):
        out[names[min(i * n_bands // max(L, 1), n_bands - 1)]].append(layer)
    return out


def jaccard_per_band(tickets: TicketSet, n_bands: int = 3) -> dict[str, torch.Tensor]:
    """``{band: FloatTensor[K, K]}`` Jaccard over the weights of each depth band."""
    K = tickets.num_tickets
    em = tickets.element_masks()
    res = {}
    for band, layers in depth_bands(list(tickets.space.layers), n_bands).items():
        if layers:
            res[band] = jaccard_from_counts(*pair_counts([em[n] for n in layers], K))
    return res


def ticket_scores(jaccard: torch.Tensor) -> torch.Tensor:
    """S_k = mean Jaccard of ticket k to the other tickets, FloatTensor [K]."""
    K = jaccard.shape[0]
    if K < 2:
        return torch.ones(K, dtype=jaccard.dtype)
    return (jaccard.sum(1) - jaccard.diagonal()) / (K - 1)


def mean_offdiagonal(jaccard: torch.Tensor) -> float:
    K = jaccard.shape[0]
    return 1.0 if K < 2 else float((jaccard.sum() - jaccard.diagonal().sum()) / (K * (K - 1)))


def chance_jaccard(p: float, q: float) -> float:
    """Expected Jaccard of independent random masks with keep rates p and q: pq / (p + q - pq)."""
    d = p + q - p * q
    return p * q / d if d > 0 else 0.0


def chance_matrix(tickets: TicketSet) -> torch.Tensor:
    keep = (1 - tickets.sparsity()).tolist()
    K = len(keep)
    return torch.tensor([[1.0 if a == b else chance_jaccard(keep[a], keep[b]) for b in range(K)] for a in range(K)],
                        dtype=torch.float64)


def sharing_counts(tickets: TicketSet) -> dict[str, int]:
    """Weights used by all tickets, by exactly one, by at least one (union) and by none."""
    all_, one, union, none = 0, 0, 0, 0
    for m in tickets.element_masks().values():
        c = m.reshape(m.shape[0], -1).sum(0)
        K = m.shape[0]
        all_ += int((c == K).sum())
        one += int((c == 1).sum())
        union += int((c > 0).sum())
        none += int((c == 0).sum())
    return {"shared_by_all": all_, "private": one, "union": union, "unused": none}


@dataclass
class Diagnosis:
    """Similarity and parameter accounting of one TicketSet."""
    num_tickets: int
    sparsity: list[float]
    jaccard: list[list[float]]
    mean_jaccard: float
    chance: float
    scores: list[float]
    bands: dict[str, float] = field(default_factory=dict)
    per_layer: dict[str, float] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)   # collapse flags read from one TicketSet (no sweep needed)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self, names: list[str] | None = None) -> str:
        names = names or [str(k) for k in range(self.num_tickets)]
        p = self.params
        lines = [f"K={self.num_tickets} tickets, sparsity " + ", ".join(f"{s:.3f}" for s in self.sparsity),
                 f"mean pairwise Jaccard {self.mean_jaccard:.3f} (chance {self.chance:.3f}); by depth: " +
                 ", ".join(f"{b} {v:.3f}" for b, v in self.bands.items()),
                 f"weights: union {p['union']:,} | shared by all {p['shared_by_all']:,} | private {p['private']:,} | "
                 f"per ticket max {p['per_ticket_max']:,} | K independent models {p['multi_model']:,}",
                 "S_k: " + ", ".join(f"{n}={s:.3f}" for n, s in zip(names, self.scores))]
        lines += [f"flag: {f}" for f in self.flags]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def diagnose(obj, n_bands: int = 3, bottleneck_density: float = 0.01) -> Diagnosis:
    """Diagnose a RoutedModel or a TicketSet (label-free); ``flags`` name bottleneck layers (a ticket keeps less
    than ``bottleneck_density`` of a layer's weights) and near-identical tickets."""
    tickets = obj.tickets if isinstance(obj, RoutedModel) else obj
    if not isinstance(tickets, TicketSet):
        raise TicketError(f"diagnose() needs a RoutedModel or a TicketSet, got {type(obj).__name__}.")
    j = tickets.jaccard()
    chance = chance_matrix(tickets)
    bands = {b: mean_offdiagonal(m) for b, m in jaccard_per_band(tickets, n_bands).items()}
    per_layer = {n: mean_offdiagonal(m) for n, m in jaccard_per_layer(tickets).items()}
    kept = tickets.kept()
    params = sharing_counts(tickets)
    params.update(per_ticket_max=int(kept.max()), multi_model=int(kept.sum()), total=tickets.space.num_weights)
    flags = []
    for n, m in tickets.element_masks().items():
        dens = m.reshape(m.shape[0], -1).float().mean(1)
        worst = int(dens.argmin())
        if float(dens[worst]) < bottleneck_density:
            flags.append(f"bottleneck: layer {n} keeps {float(dens[worst]):.2%} of its weights in ticket {worst} "
                         f"(< {bottleneck_density:.0%}); quality usually breaks here")
    off = j[~torch.eye(j.shape[0], dtype=torch.bool)]
    if j.shape[0] > 1 and float(off.min()) > 0.98:
        flags.append("tickets nearly identical (every pairwise Jaccard > 0.98): routing buys nothing here")
    return Diagnosis(flags=flags, num_tickets=tickets.num_tickets, sparsity=[round(float(s), 6) for s in tickets.sparsity()],
                     jaccard=[[round(float(v), 6) for v in row] for row in j], mean_jaccard=mean_offdiagonal(j),
                     chance=mean_offdiagonal(chance), scores=[float(s) for s in ticket_scores(j)], bands=bands,
                     per_layer=per_layer, params=params)
