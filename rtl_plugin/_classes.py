"""Equivalence classes of integer indices (one union-find for every place that ties channels together)."""
from __future__ import annotations

from typing import Iterable


def merge_classes(classes: Iterable[Iterable[int]]) -> list[list[int]]:
    """Union of overlapping index classes, each sorted, in sorted order; classes of one element are dropped."""
    parent: dict[int, int] = {}

    def find(a: int) -> int:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for c in classes:
        c = list(c)
        for b in c[1:]:
            ra, rb = find(c[0]), find(b)
            if ra != rb:
                parent[ra] = rb
        if c:
            find(c[0])
    out: dict[int, list[int]] = {}
    for a in parent:
        out.setdefault(find(a), []).append(a)
    return sorted(sorted(c) for c in out.values() if len(c) > 1)
