"""Partitions: which ticket each training sample belongs to.

A :class:`Partition` maps N samples to K tickets (``assignment`` int64 [N], every ticket non-empty).
Builders: :func:`by_class` (one ticket per class), :func:`by_groups` (user-given class groups),
:func:`by_condition` (metadata such as domain or recording condition), :func:`by_kmeans`
(unsupervised clusters of :func:`embed` features). They are registered timm-style::

    part = create_partitioner("kmeans", k=3, seed=0)(embed(model, x), y=y)
    part.subsets()   # [LongTensor of sample indices] * K

Only torch, numpy and the standard library are imported here; scikit-learn is imported lazily by
:func:`by_kmeans` and raises :class:`~rtl_plugin.errors.MissingDependencyError` when absent.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from rtl_plugin.errors import DataError, MissingDependencyError
from rtl_plugin.registry import Registry
from rtl_plugin.routed import RoutedModel

__all__ = [
    "Partition", "by_class", "by_groups", "by_condition", "by_kmeans", "embed",
    "register_partitioner", "create_partitioner", "list_partitioners",
]

KINDS = ("class", "groups", "condition", "kmeans")
_PARTITIONERS: Registry = Registry("partitioner", DataError)


# --------------------------------------------------------------------------- helpers


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _labels(y, what: str = "y") -> torch.Tensor:
    """Integer labels -> int64 CPU tensor [N] (DataError otherwise)."""
    if isinstance(y, torch.Tensor):
        t = y.detach().cpu()
    else:
        try:
            t = torch.as_tensor(np.asarray(y))
        except (TypeError, ValueError, RuntimeError):
            raise DataError(f"{what} must be a 1-D integer tensor / array of labels, got {type(y).__name__}") from None
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise DataError(f"{what} must hold integer labels, got dtype {t.dtype}; convert with .long()")
    if t.dim() != 1:
        raise DataError(f"{what} must be 1-D [N], got shape {tuple(t.shape)}; flatten it or pass one label per sample")
    if t.numel() == 0:
        raise DataError(f"{what} is empty; a partition needs at least one sample per ticket")
    t = t.long()
    if int(t.min()) < 0:
        raise DataError(f"{what} contains the negative label {int(t.min())}; labels must be class ids >= 0")
    return t


def _composition(assignment: torch.Tensor, y: torch.Tensor | None, k: int) -> dict[int, dict[int, int]] | None:
    if y is None:
        return None
    comp: dict[int, dict[int, int]] = {}
    for t in range(k):
        cls, cnt = torch.unique(y[assignment == t], return_counts=True)
        comp[t] = {int(c): int(n) for c, n in zip(cls.tolist(), cnt.tolist())}
    return comp


def _check_names(names, k: int, default: list[str], what: str) -> list[str]:
    if names is None:
        return default
    if isinstance(names, str):
        raise DataError(f"{what} must be a sequence of {k} strings, got the single string {names!r}")
    names = [str(n) for n in names]
    if len(names) != k:
        raise DataError(f"{what} has {len(names)} entries for {k} tickets; give exactly one name per ticket")
    return names


def _check_class_names(class_names, num_classes: int | None) -> list[str] | None:
    if class_names is None:
        return None
    if isinstance(class_names, str):
        raise DataError("class_names must be a sequence of strings, one per class, not a single string")
    class_names = [str(n) for n in class_names]
    if num_classes is not None and len(class_names) < num_classes:
        raise DataError(f"class_names has {len(class_names)} entries but labels go up to {num_classes - 1}; "
                        "give one name per class")
    return class_names


# --------------------------------------------------------------------------- Partition


@dataclass
class Partition:
    """Samples -> tickets.

    assignment: int64 [N], ticket id per sample; every id in [0, num_tickets) has >= 1 sample.
    names: one name per ticket. kind: "class" | "groups" | "condition" | "kmeans".
    composition: ``{ticket: {class_id: count}}`` when class labels were known, else None.
    class_names: optional names of the class ids in ``composition`` (used by :meth:`describe`).
    """

    assignment: torch.Tensor
    num_tickets: int
    names: list[str]
    kind: str
    composition: dict | None = None
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.num_tickets) or self.num_tickets < 1:
            raise DataError(f"num_tickets must be an integer >= 1, got {self.num_tickets!r}")
        self.num_tickets = int(self.num_tickets)
        self.assignment = _labels(self.assignment, "assignment")
        k = self.num_tickets
        hi = int(self.assignment.max())
        if hi >= k:
            raise DataError(f"assignment contains ticket id {hi}, outside [0, {k}); ids must be 0..{k - 1}")
        sizes = torch.bincount(self.assignment, minlength=k)
        empty = (sizes == 0).nonzero().flatten().tolist()
        if empty:
            raise DataError(f"tickets {empty} have no samples; K={k} exceeds the {k - len(empty)} non-empty "
                            "subsets, so lower K or provide samples for every ticket")
        self.names = _check_names(self.names, k, [f"ticket {t}" for t in range(k)], "names")
        if self.kind not in KINDS:
            raise DataError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.composition is not None:
            self.composition = {int(t): {int(c): int(n) for c, n in v.items()} for t, v in self.composition.items()}
        if self.class_names is not None:
            self.class_names = [str(n) for n in self.class_names]

    def __len__(self) -> int:
        return int(self.assignment.numel())

    def subsets(self) -> list[torch.Tensor]:
        """Sample indices per ticket: K LongTensors (sorted)."""
        return [(self.assignment == t).nonzero().flatten() for t in range(self.num_tickets)]

    def sizes(self) -> list[int]:
        """Samples per ticket, K ints."""
        return torch.bincount(self.assignment, minlength=self.num_tickets).tolist()

    def to_dict(self, *, include_assignment: bool = True) -> dict[str, Any]:
        """JSON-safe dict (composition keys become strings in JSON; :meth:`from_dict` turns them back)."""
        d: dict[str, Any] = {
            "kind": self.kind, "num_tickets": self.num_tickets, "names": list(self.names),
            "sizes": self.sizes(),
            "composition": None if self.composition is None else
            {str(t): {str(c): n for c, n in v.items()} for t, v in self.composition.items()},
            "class_names": None if self.class_names is None else list(self.class_names),
        }
        if include_assignment:
            d["assignment"] = self.assignment.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Partition":
        """Inverse of :meth:`to_dict` (needs the assignment)."""
        if not isinstance(d, dict):
            raise DataError(f"Partition.from_dict needs a dict, got {type(d).__name__}")
        missing = [k for k in ("assignment", "num_tickets", "names", "kind") if k not in d]
        if missing:
            hint = "; save it with to_dict(include_assignment=True)" if "assignment" in missing else ""
            raise DataError(f"partition dict lacks {missing}{hint}")
        return cls(assignment=torch.as_tensor(d["assignment"], dtype=torch.int64), num_tickets=d["num_tickets"],
                   names=list(d["names"]), kind=d["kind"], composition=d.get("composition"),
                   class_names=d.get("class_names"))

    def _class_name(self, c: int) -> str:
        if self.class_names is not None and 0 <= c < len(self.class_names):
            return self.class_names[c]
        return str(c)

    def describe(self) -> str:
        """One line per ticket: ``ticket 0 'name' n=120: 3 x80 (67%), 5 x40 (33%)``."""
        lines = []
        for t, n in enumerate(self.sizes()):
            line = f"ticket {t} {self.names[t]!r} n={n}"
            if self.composition is not None:
                items = sorted(self.composition.get(t, {}).items(), key=lambda kv: (-kv[1], kv[0]))
                line += ": " + ", ".join(f"{self._class_name(c)} x{m} ({100.0 * m / max(n, 1):.0f}%)"
                                         for c, m in items)
            lines.append(line)
        return "\n".join(lines)


# --------------------------------------------------------------------------- registry


def register_partitioner(name: str) -> Callable[[Callable[..., Partition]], Callable[..., Partition]]:
    """Function decorator: ``@register_partitioner("class")``."""
    return _PARTITIONERS.register(name)


def list_partitioners() -> list[str]:
    return _PARTITIONERS.names()


def create_partitioner(name: str, **kw) -> Callable[..., Partition]:
    """Partition builder by name with keyword config bound, e.g. ``create_partitioner("kmeans", k=3)(emb, y=y)``."""
    return functools.partial(_PARTITIONERS.get(name), **kw)


# --------------------------------------------------------------------------- builders


@register_partitioner("class")
def by_class(y, *, num_classes: int | None = None, class_names: Sequence[str] | None = None) -> Partition:
    """One ticket per class: y int [N] in [0, num_classes) -> K = num_classes (every class needs a sample)."""
    y = _labels(y)
    if num_classes is None:
        num_classes = int(y.max()) + 1
    elif not _is_int(num_classes) or num_classes < 1:
        raise DataError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    num_classes = int(num_classes)
    if int(y.max()) >= num_classes:
        raise DataError(f"y contains label {int(y.max())}, outside [0, {num_classes}); raise num_classes or fix labels")
    class_names = _check_class_names(class_names, num_classes)
    sizes = torch.bincount(y, minlength=num_classes)
    empty = (sizes == 0).nonzero().flatten().tolist()
    if empty:
        raise DataError(f"classes {empty} have no samples, so {num_classes} class tickets cannot be built; "
                        "group classes with by_groups() or pass data that contains every class")
    names = class_names[:num_classes] if class_names is not None else [f"class {c}" for c in range(num_classes)]
    return Partition(y.clone(), num_classes, names, "class", None, class_names)


@register_partitioner("groups")
def by_groups(y, groups: Sequence[Sequence[int]], *, names: Sequence[str] | None = None,
              num_classes: int | None = None, class_names: Sequence[str] | None = None) -> Partition:
    """Ticket g holds the samples whose class is in ``groups[g]``.

    Every class id must be in exactly one group; every label of ``y`` (and, with ``num_classes``,
    every class in [0, num_classes)) must be covered; every group needs >= 1 sample.
    """
    y = _labels(y)
    if isinstance(groups, (np.ndarray, torch.Tensor)):
        groups = groups.tolist()
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or len(groups) == 0:
        raise DataError("groups must be a non-empty sequence of class-id lists, e.g. [[0, 1], [2, 3, 4]]")
    owner: dict[int, int] = {}
    norm: list[list[int]] = []
    for g, members in enumerate(groups):
        if isinstance(members, (np.ndarray, torch.Tensor)):
            members = members.tolist()
        if isinstance(members, (str, bytes)) or not isinstance(members, Sequence):
            raise DataError(f"groups[{g}] must be a list of class ids, got {members!r}")
        if not members:
            raise DataError(f"groups[{g}] is empty; every group needs at least one class id")
        for c in members:
            if not _is_int(c) or c < 0:
                raise DataError(f"groups[{g}] holds {c!r}; class ids must be integers >= 0")
            if int(c) in owner:
                raise DataError(f"class {c} is in groups[{owner[int(c)]}] and groups[{g}]; "
                                "put every class in exactly one group")
            owner[int(c)] = g
        norm.append([int(c) for c in members])
    if num_classes is not None:
        if not _is_int(num_classes) or num_classes < 1:
            raise DataError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        extra = sorted(c for c in owner if c >= num_classes)
        if extra:
            raise DataError(f"groups name classes {extra}, outside [0, {num_classes}); fix groups or num_classes")
        missing = [c for c in range(num_classes) if c not in owner]
        if missing:
            raise DataError(f"classes {missing} are in no group; put every class in exactly one group")
    present = torch.unique(y).tolist()
    uncovered = [c for c in present if c not in owner]
    if uncovered:
        raise DataError(f"labels {uncovered} of y are in no group; add them to a group (every class in exactly one)")
    k = len(groups)
    lut = torch.full((max(max(owner), int(y.max())) + 1,), -1, dtype=torch.int64)
    for c, g in owner.items():
        lut[c] = g
    assignment = lut[y]
    sizes = torch.bincount(assignment, minlength=k)
    empty = (sizes == 0).nonzero().flatten().tolist()
    if empty:
        raise DataError(f"groups {empty} have no samples in y; K={k} exceeds the {k - len(empty)} non-empty groups, "
                        "so drop or merge those groups")
    class_names = _check_class_names(class_names, int(y.max()) + 1)
    default = ["+".join(class_names[c] if class_names and c < len(class_names) else str(c) for c in grp)
               for grp in norm]
    names = _check_names(names, k, default, "names")
    return Partition(assignment, k, names, "groups", _composition(assignment, y, k), class_names)


@register_partitioner("condition")
def by_condition(cond, *, names: Sequence[str] | None = None, y=None,
                 class_names: Sequence[str] | None = None) -> Partition:
    """Metadata labels (ints or strings) [N] -> ticket ids in sorted order of the distinct values.

    ``names`` defaults to ``str(value)``; with class labels ``y`` [N] the composition is recorded.
    """
    if isinstance(cond, torch.Tensor):
        arr = cond.detach().cpu().numpy()
    elif isinstance(cond, (str, bytes)):
        raise DataError("cond must be a sequence of N labels, not a single string")
    else:
        try:
            arr = np.asarray(list(cond) if not isinstance(cond, np.ndarray) else cond)
        except TypeError:
            raise DataError("cond must be a sequence of N labels (ints or strings), "
                            f"got {type(cond).__name__}") from None
    if arr.ndim != 1:
        raise DataError(f"cond must be 1-D [N], got shape {arr.shape}; pass one label per sample")
    if arr.size == 0:
        raise DataError("cond is empty; a partition needs at least one sample per ticket")
    if arr.dtype.kind in "fc":
        raise DataError(f"cond holds {arr.dtype} values; use integer or string labels (e.g. cond.astype(int))")
    if arr.dtype.kind == "O":
        kinds = {type(v) for v in arr.tolist()}
        if not (all(issubclass(t, str) for t in kinds) or all(issubclass(t, (int, np.integer)) for t in kinds)):
            raise DataError(f"cond mixes label types {sorted(t.__name__ for t in kinds)}; use all ints or all strings")
        arr = arr.astype(str if issubclass(next(iter(kinds)), str) else np.int64)
    if arr.dtype.kind not in "iuUSb":
        raise DataError(f"cond must hold ints or strings, got dtype {arr.dtype}")
    values, inverse = np.unique(arr, return_inverse=True)
    k = len(values)
    assignment = torch.from_numpy(inverse.reshape(-1).astype(np.int64))
    names = _check_names(names, k, [str(v) for v in values.tolist()], "names")
    comp = None
    if y is not None:
        y = _labels(y)
        if y.numel() != assignment.numel():
            raise DataError(f"y has {y.numel()} labels but cond has {assignment.numel()}; give one of each per sample")
        comp = _composition(assignment, y, k)
        class_names = _check_class_names(class_names, int(y.max()) + 1)
    else:
        class_names = _check_class_names(class_names, None)
    return Partition(assignment, k, names, "condition", comp, class_names)


def _as_embeddings(emb) -> np.ndarray:
    if isinstance(emb, torch.Tensor):
        emb = emb.detach().cpu().float().numpy()
    else:
        try:
            emb = np.asarray(emb, dtype=np.float64)
        except (TypeError, ValueError):
            raise DataError(f"embeddings must be a float array [N, D], got {type(emb).__name__}") from None
    if emb.ndim != 2:
        raise DataError(f"embeddings must be 2-D [N, D], got shape {emb.shape}; flatten features per sample")
    if emb.shape[0] == 0 or emb.shape[1] == 0:
        raise DataError(f"embeddings are empty (shape {emb.shape}); pass at least K samples with D >= 1 features")
    if not np.all(np.isfinite(emb)):
        raise DataError("embeddings contain NaN or inf; check the model / inputs that produced them")
    return emb


def _num_clusters_argument(num_clusters, k):
    if k is None:
        if num_clusters is None:
            raise DataError("by_kmeans needs num_clusters, the number of clusters (tickets), e.g. by_kmeans(emb, 4).")
        return num_clusters
    warnings.warn("by_kmeans(k=...) is deprecated; use num_clusters=... (or pass it positionally).",
                  DeprecationWarning, stacklevel=3)
    if num_clusters is not None:
        raise DataError("pass num_clusters only (k= is its deprecated name), not both.")
    return k


@register_partitioner("kmeans")
def by_kmeans(embeddings, num_clusters: int | None = None, *, seed: int = 0, y=None,
              class_names: Sequence[str] | None = None, k: int | None = None) -> Partition:
    """K-means (scikit-learn, ``n_init=10``) on embeddings [N, D] -> ``num_clusters`` tickets.

    Clusters are numbered by their first sample, so the result depends only on the data and ``seed``.
    With class labels ``y`` [N] the composition ``{ticket: {class: count}}`` is recorded. ``k=`` is the
    deprecated name of ``num_clusters``.
    """
    k = _num_clusters_argument(num_clusters, k)
    emb = _as_embeddings(embeddings)
    n = emb.shape[0]
    if not _is_int(k) or k < 1:
        raise DataError(f"num_clusters must be an integer >= 1, got {k!r}")
    if k > n:
        raise DataError(f"num_clusters={k} clusters need at least {k} samples, got {n}; lower num_clusters or "
                        "pass more samples")
    if not _is_int(seed) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    if y is not None:
        y = _labels(y)
        if y.numel() != n:
            raise DataError(f"y has {y.numel()} labels but embeddings have {n} rows; give one label per sample")
    distinct = np.unique(emb, axis=0).shape[0]
    if distinct < k:
        raise DataError(f"num_clusters={k} exceeds the {distinct} distinct embeddings, so some clusters would be "
                        f"empty; lower num_clusters to <= {distinct}")
    try:
        from sklearn.cluster import KMeans
    except ImportError as exc:
        raise MissingDependencyError('by_kmeans needs scikit-learn: pip install "scikit-learn>=1.3" '
                                     '(or pip install "rtl-plugin[data]")') from exc
    labels = KMeans(n_clusters=int(k), n_init=10, random_state=int(seed)).fit_predict(emb)
    _, first = np.unique(labels, return_index=True)
    present = labels[np.sort(first)]  # cluster ids in order of first appearance
    if present.size < k:
        raise DataError(f"k-means left {k - present.size} of {k} clusters empty; lower num_clusters")
    remap = np.empty(int(labels.max()) + 1, dtype=np.int64)
    remap[present] = np.arange(present.size)
    assignment = torch.from_numpy(remap[labels])
    class_names = _check_class_names(class_names, None if y is None else int(y.max()) + 1)
    return Partition(assignment, int(k), [f"cluster {i}" for i in range(k)], "kmeans",
                     _composition(assignment, y, int(k)), class_names)


# --------------------------------------------------------------------------- embeddings


def _pool(f: torch.Tensor) -> torch.Tensor:
    if f.dim() == 4:        # [B, C, H, W] -> [B, C]
        return f.mean((2, 3))
    if f.dim() == 3:        # [B, tokens, D] -> [B, D]
        return f.mean(1)
    return f.flatten(1)


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Features of a dense model: float32 [N, D] on the CPU.

    Uses ``model.forward_features`` then ``model.forward_head(..., pre_logits=True)`` (timm) or a global
    average pool when available, else the model's output flattened. Runs in eval mode without grad and
    restores the training flag.
    """
    if isinstance(model, RoutedModel):
        raise DataError("embed needs a dense model; pass the original model or routed.plain_copy(k)")
    if not isinstance(model, nn.Module):
        raise DataError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise DataError(f"x must be a float tensor [N, ...], got {getattr(x, 'shape', type(x))}")
    if x.shape[0] == 0:
        raise DataError("x is empty; pass at least one sample")
    if not _is_int(batch_size) or batch_size < 1:
        raise DataError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    p = next(model.parameters(), None)
    dev = p.device if p is not None else x.device
    was = model.training
    model.eval()
    out = []
    try:
        for xb in x.split(int(batch_size)):
            xb = xb.to(dev)
            if hasattr(model, "forward_features"):
                f = model.forward_features(xb)
                if hasattr(model, "forward_head"):
                    try:
                        f = model.forward_head(f, pre_logits=True)
                    except TypeError:
                        pass
                f = _pool(f)
            else:
                f = model(xb)
                if not isinstance(f, torch.Tensor):
                    raise DataError(f"{type(model).__name__} returned {type(f).__name__}; embed needs a tensor "
                                    "output or a forward_features method")
                f = f.flatten(1)
            out.append(f.float().cpu())
    finally:
        model.train(was)
    return torch.cat(out)
