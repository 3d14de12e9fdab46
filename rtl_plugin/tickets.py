"""TicketSet: K boolean masks over one TicketSpace.

Weight granularity: ``{layer: BoolTensor[K, *weight_shape]}``.
Channel granularity: ``{group_root: BoolTensor[K, C_root]}``.
Counting (sparsity, union, Jaccard) is always done over prunable weight *elements*.
"""
from __future__ import annotations

import numpy as np
import torch

from rtl_plugin.errors import TicketError
from rtl_plugin.space import TicketSpace


def pair_counts(masks: list[torch.Tensor], K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(intersection [K, K], union [K, K]) element counts of K-ticket masks ``[K, ...]`` summed over ``masks``."""
    inter = torch.zeros(K, K, dtype=torch.float64)
    for m in masks:
        f = m.reshape(K, -1)
        # exact integer counts (a float32 matmul loses counts above 2**24 weights per layer)
        for i in range(K):
            inter[i] += (f[i:i + 1] & f).sum(1).double().cpu()
    kept = torch.diagonal(inter).clone()
    return inter, kept[:, None] + kept[None, :] - inter


def jaccard_from_counts(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """|A∩B| / |A∪B|, 1 where both masks are empty."""
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


class TicketSet:
    """K masks over a space. ``version`` increases on every change (caches key on it)."""

    def __init__(self, space: TicketSpace, masks: dict[str, torch.Tensor]):
        self.space = space
        self.masks: dict[str, torch.Tensor] = {}
        self.version = 0
        self._layer_cache = None
        self._elem_cache = None
        self._set_all(masks)

    # ------------------------------------------------------------------ construction
    @classmethod
    def full(cls, space: TicketSpace, num_tickets: int, device=None) -> "TicketSet":
        """All-ones masks (dense tickets)."""
        if not isinstance(num_tickets, int) or isinstance(num_tickets, bool) or num_tickets < 1:
            raise TicketError(f"num_tickets must be a positive int, got {num_tickets!r}.")
        return cls(space, {k: torch.ones(num_tickets, *s, dtype=torch.bool, device=device)
                           for k, s in space.mask_shapes().items()})

    @classmethod
    def random(cls, space: TicketSpace, num_tickets: int, keep: float = 0.5, *, seed: int = 0) -> "TicketSet":
        """Random masks with keep probability ``keep`` (channel mode: tiled for grouped convs, >=1 kept per group)."""
        if not isinstance(num_tickets, int) or isinstance(num_tickets, bool) or num_tickets < 1:
            raise TicketError(f"num_tickets must be a positive int, got {num_tickets!r}.")
        if not 0.0 < keep <= 1.0:
            raise TicketError(f"keep must be in (0, 1], got {keep}.")
        g = torch.Generator().manual_seed(seed)
        masks = {}
        if space.granularity == "weight":
            for k, s in space.mask_shapes().items():
                masks[k] = torch.rand(num_tickets, *s, generator=g) < keep
        else:
            for grp in space.groups:
                if grp.ties:  # tied channels / attention heads: draw once per coupled class
                    masks[grp.root] = grp.random_keep(num_tickets, keep, g)
                    continue
                base = torch.rand(num_tickets, grp.period, generator=g) < keep
                first = torch.randint(grp.period, (num_tickets,), generator=g)
                base[torch.arange(num_tickets), first] = True
                masks[grp.root] = base.repeat(1, grp.ch_groups)
        return cls(space, masks)

    def copy(self) -> "TicketSet":
        return TicketSet(self.space, {k: v.clone() for k, v in self.masks.items()})

    def appended(self, masks: dict[str, torch.Tensor] | None = None) -> "TicketSet":
        """A new TicketSet holding these K tickets (copied, unchanged) and one more, ticket K: ``masks`` (one
        ticket's ``{key: BoolTensor}``, every key of the space) or, by default, dense (all-ones)."""
        new = {}
        for n, m in self.masks.items():
            row = torch.ones_like(m[:1]) if masks is None else None
            if masks is not None:
                if n not in masks:
                    raise TicketError(f"the new ticket's masks lack key {n!r}; give one mask per key of the ticket "
                                      "space (e.g. a ticket of another TicketSet of this space), or None for dense.")
                row = torch.as_tensor(masks[n], device=m.device)
                if row.dtype != torch.bool or tuple(row.shape) != tuple(m.shape[1:]):
                    raise TicketError(f"the new ticket's mask {n!r} is {row.dtype} {tuple(row.shape)}; expected "
                                      f"torch.bool {tuple(m.shape[1:])} (one ticket's mask of this space).")
                row = row.unsqueeze(0)
            new[n] = torch.cat([m, row], 0)
        if masks is not None:
            extra = sorted(set(masks) - set(self.masks))[:3]
            if extra:
                raise TicketError(f"the new ticket's masks have unknown keys {extra}; they come from another space.")
        return TicketSet(self.space, new)

    # ------------------------------------------------------------------ access
    @property
    def num_tickets(self) -> int:
        return next(iter(self.masks.values())).shape[0]

    @property
    def granularity(self) -> str:
        return self.space.granularity

    @property
    def device(self) -> torch.device:
        return next(iter(self.masks.values())).device

    def to(self, device) -> "TicketSet":
        if self.device != torch.device(device):
            self.masks = {k: v.to(device) for k, v in self.masks.items()}
            self.mark_modified()
        return self

    def ticket(self, k: int) -> dict[str, torch.Tensor]:
        """Masks of ticket ``k`` (views)."""
        self.check_index(k)
        return {n: m[k] for n, m in self.masks.items()}

    def set_ticket(self, k: int, masks: dict[str, torch.Tensor]) -> None:
        """Replace ticket ``k``'s masks (keys and shapes must match the space)."""
        self.check_index(k)
        if self.space.granularity == "weight":  # validate everything first, then write row k in place
            checked = {}
            for n, m in masks.items():
                if n not in self.masks:
                    raise TicketError(f"unknown mask key {n!r}; expected keys of the ticket space "
                                      f"({len(self.masks)} keys).")
                m = torch.as_tensor(m, device=self.masks[n].device)
                if m.dtype != torch.bool:
                    raise TicketError(f"mask {n!r} has dtype {m.dtype}; masks must be torch.bool.")
                if tuple(m.shape) != tuple(self.masks[n].shape[1:]):
                    raise TicketError(f"mask {n!r} has shape {tuple(m.shape)}, expected "
                                      f"{tuple(self.masks[n].shape[1:])} (one ticket's mask from the same architecture).")
                checked[n] = m
            for n, m in checked.items():
                self.masks[n][k] = m
            self.mark_modified()
            return
        new = {n: m.clone() for n, m in self.masks.items()}
        for n, m in masks.items():
            if n not in new:
                raise TicketError(f"unknown mask key {n!r}; expected keys of the ticket space ({len(new)} keys).")
            m = torch.as_tensor(m, device=new[n].device)
            if m.dtype != torch.bool:
                raise TicketError(f"mask {n!r} has dtype {m.dtype}; masks must be torch.bool.")
            if tuple(m.shape) != tuple(new[n].shape[1:]):
                raise TicketError(f"mask {n!r} has shape {tuple(m.shape)}, expected {tuple(new[n].shape[1:])} "
                                  "(one ticket's mask from the same architecture).")
            new[n][k] = m
        self._set_all(new)

    def check_index(self, k) -> None:
        """Raise TicketError unless ``k`` is a valid ticket index."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= int(k) < self.num_tickets:
            raise TicketError(f"ticket index must be an int in [0, {self.num_tickets}), got {k!r}.")

    def _set_all(self, masks: dict[str, torch.Tensor]) -> None:
        shapes = self.space.mask_shapes()
        if set(masks) != set(shapes):
            missing = sorted(set(shapes) - set(masks))[:3]
            extra = sorted(set(masks) - set(shapes))[:3]
            raise TicketError(f"mask keys do not match the ticket space (missing {missing}, unexpected {extra}); "
                              "masks must come from the same architecture and granularity.")
        k0 = None
        checked = {}
        for n, s in shapes.items():
            m = masks[n]
            if not isinstance(m, torch.Tensor):
                m = torch.as_tensor(m)
            if m.dtype != torch.bool:
                raise TicketError(f"mask {n!r} has dtype {m.dtype}; masks must be torch.bool.")
            if tuple(m.shape[1:]) != tuple(s):
                raise TicketError(f"mask {n!r} has shape {tuple(m.shape)}, expected [K, {', '.join(map(str, s))}] "
                                  "(masks from another architecture?).")
            if k0 is None:
                k0 = m.shape[0]
            elif m.shape[0] != k0:
                raise TicketError(f"mask {n!r} holds {m.shape[0]} tickets, others hold {k0}.")
            checked[n] = m
        if not k0:
            raise TicketError("a TicketSet needs at least one ticket.")
        if self.space.granularity == "channel":
            for g in self.space.groups:
                if g.ch_groups > 1:
                    v = checked[g.root].view(k0, g.ch_groups, g.period)
                    if not bool((v == v[:, :1]).all()):
                        raise TicketError(f"group {g.root!r} feeds a grouped layer ({g.ch_groups} channel groups): a "
                                          "ticket must keep the same positions in every channel group.")
        self.masks = checked
        self.mark_modified()

    def mark_modified(self) -> None:
        """Masks were edited in place: bump the version and drop derived masks."""
        self.version += 1
        self._layer_cache = None
        self._elem_cache = None

    # ------------------------------------------------------------------ derived masks
    def layer_channel_masks(self) -> dict[str, dict[str, torch.Tensor]]:
        """Channel mode: ``{module: {"out"/"in": BoolTensor[K, C]}}`` (cached)."""
        if self._layer_cache is None:
            self._layer_cache = self.space.channel_layer_masks(self.masks)
        return self._layer_cache

    def element_masks(self) -> dict[str, torch.Tensor]:
        """``{layer: BoolTensor[K, *weight_shape]}`` over prunable weights (cached; expanded views in channel mode)."""
        if self._elem_cache is None:
            if self.granularity == "weight":
                self._elem_cache = self.masks
            else:
                self._elem_cache = self.space.weight_element_masks(self.layer_channel_masks(), self.num_tickets,
                                                                   device=self.device)
        return self._elem_cache

    # ------------------------------------------------------------------ counting
    def kept(self) -> torch.Tensor:
        """Kept prunable weights per ticket, LongTensor [K]."""
        return sum(m.reshape(m.shape[0], -1).sum(1) for m in self.element_masks().values())

    def sparsity(self) -> torch.Tensor:
        """Fraction of prunable weights removed per ticket, FloatTensor [K]."""
        return 1.0 - self.kept().double() / self.space.num_weights

    def union_count(self) -> int:
        """Weights kept by at least one ticket (RTL's stored parameter count)."""
        return int(sum(m.any(0).sum() for m in self.element_masks().values()))

    def intersection_count(self) -> int:
        """Weights kept by every ticket."""
        return int(sum(m.all(0).sum() for m in self.element_masks().values()))

    def pairwise_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(intersection [K, K], union [K, K]) counts over all prunable weights."""
        return pair_counts(list(self.element_masks().values()), self.num_tickets)

    def jaccard(self) -> torch.Tensor:
        """Pairwise Jaccard |A∩B| / |A∪B| over all prunable weights, FloatTensor [K, K] (1 on the diagonal)."""
        return jaccard_from_counts(*self.pairwise_counts())

    # ------------------------------------------------------------------ storage
    def packed(self) -> dict[str, np.ndarray]:
        """Bit-packed masks ``{key: uint8[ceil(K * numel / 8)]}`` (1 bit per mask entry)."""
        return {k: np.packbits(v.detach().cpu().numpy().reshape(-1)) for k, v in self.masks.items()}

    @classmethod
    def from_packed(cls, space: TicketSpace, num_tickets: int, packed: dict[str, np.ndarray]) -> "TicketSet":
        masks = {}
        for k, s in space.mask_shapes().items():
            if k not in packed:
                raise TicketError(f"packed masks lack key {k!r}: they belong to another architecture or granularity.")
            n = num_tickets * int(np.prod(s, dtype=np.int64))
            arr = np.asarray(packed[k], dtype=np.uint8).reshape(-1)
            if arr.size != (n + 7) // 8:
                raise TicketError(f"packed mask {k!r} has {arr.size} bytes, expected {(n + 7) // 8} for "
                                  f"{num_tickets} tickets of shape {tuple(s)}.")
            bits = np.unpackbits(arr, count=n).astype(bool)
            masks[k] = torch.from_numpy(bits.reshape(num_tickets, *s))
        return cls(space, masks)

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.3f}" for s in self.sparsity().tolist())
        return f"TicketSet(K={self.num_tickets}, granularity={self.granularity}, sparsity=[{sp}])"
