"""Data pieces for a plain training loop over routed samples: :class:`RoutedDataset` (``(x, y, route)`` items)
and :class:`RouteBalancedSampler` (a batch sampler giving single-ticket batches in balanced cyclic order, or
balanced mixed-route batches), for ``DataLoader(dataset, batch_sampler=sampler)``."""
from __future__ import annotations

import math
from typing import Iterator, Mapping, Sequence

import torch
from torch.utils.data import ConcatDataset, Dataset, Sampler

from rtl_plugin.errors import DataError

__all__ = ["RoutedDataset", "RouteBalancedSampler", "as_routes"]


def as_routes(routes, *, n: int | None = None) -> torch.Tensor:
    """``routes`` (a 1-D integer tensor, array or sequence of per-sample ticket ids >= 0) as a CPU LongTensor."""
    try:
        t = routes if isinstance(routes, torch.Tensor) else torch.as_tensor(routes)
    except (TypeError, ValueError, RuntimeError):
        raise DataError(f"routes must be a 1-D sequence or tensor of integer ticket ids, one per sample, got "
                        f"{type(routes).__name__}.") from None
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise DataError(f"routes must be a 1-D integer tensor with one ticket id per sample, got a {t.dtype} tensor "
                        f"of shape {tuple(t.shape)}.")
    if n is not None and t.shape[0] != n:
        raise DataError(f"routes holds {t.shape[0]} ticket ids for a dataset of {n} samples; give one per sample.")
    if t.numel() == 0:
        raise DataError("routes is empty; the dataset needs at least one sample.")
    if bool((t < 0).any()):
        raise DataError("routes holds negative ticket ids; ticket ids are ints in [0, K).")
    return t.detach().to("cpu", torch.long)


class RoutedDataset(Dataset):
    """``dataset`` with each sample's ticket id appended: item ``i`` is ``(*dataset[i], route_i)`` (or
    ``(dataset[i], route_i)`` for a non-tuple item); ``route_i`` is a 0-d LongTensor, so the default collate
    gives a ``[B]`` route tensor. ``routes`` (a LongTensor) is what :class:`RouteBalancedSampler` takes."""

    def __init__(self, dataset, routes):
        try:
            n = len(dataset)
        except TypeError:
            raise DataError(f"RoutedDataset needs a map-style dataset with __len__, got {type(dataset).__name__}.") from None
        self.dataset = dataset
        self.routes = as_routes(routes, n=n)

    @classmethod
    def from_subsets(cls, subsets) -> "RoutedDataset":
        """One dataset from ``{ticket: dataset}`` (or a list, ticket = position): the concatenation, each
        sample routed to its subset's ticket (the data ``joint_retrain`` takes as one loader per ticket)."""
        items = dict(subsets) if isinstance(subsets, Mapping) else dict(enumerate(subsets)) \
            if isinstance(subsets, Sequence) else None
        if not items:
            raise DataError("from_subsets needs a non-empty {ticket: dataset} dict or list of datasets.")
        for k, ds in items.items():
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise DataError(f"subset keys must be ticket ids (ints >= 0), got {k!r}.")
            if not hasattr(ds, "__len__") or len(ds) == 0:
                raise DataError(f"subset {k} is empty or has no length; every ticket needs samples.")
        keys = sorted(items)
        routes = torch.cat([torch.full((len(items[k]),), k, dtype=torch.long) for k in keys])
        return cls(ConcatDataset([items[k] for k in keys]), routes)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        route = self.routes[i]
        return (*item, route) if isinstance(item, (tuple, list)) else (item, route)


class RouteBalancedSampler(Sampler):
    """A batch sampler over samples with per-sample ticket ids (use as ``DataLoader(..., batch_sampler=...)``).

    Default (``mixed=False``): every batch holds one ticket's samples, and an epoch is balanced cyclic
    batching as in ``joint_retrain``: M = the largest number of batches of any ticket; for each batch index
    the tickets come in ascending order; a ticket with fewer batches starts over (reshuffled) until it has M.
    ``len(sampler) == M * number of tickets``. With ``shuffle=False`` the batches are those of an unshuffled
    ``DataLoader`` over each ticket's samples (in dataset order), i.e. exactly ``joint_retrain``'s order for
    loaders over those subsets.

    ``mixed=True``: balanced mixed-route batches (for ``mixed_route_retrain`` or a ``step(ticket=route)``
    loop): each epoch every ticket contributes as many samples as the largest ticket has (smaller ones
    repeat, reshuffled), the union is shuffled (``shuffle=False``: interleaved ticket by ticket) and cut
    into batches of ``batch_size``.

    Args:
        routes: one ticket id per dataset sample (e.g. ``RoutedDataset.routes``).
        batch_size: samples per batch.
        seed: seeds ``self.generator``, which every epoch draws from, so two samplers with the same seed give
            the same batches (checkpoints of ``joint_retrain`` / ``mixed_route_retrain`` save its state).
        shuffle: reshuffle each ticket's samples every epoch (False: dataset order).
        drop_last: drop each ticket's last incomplete batch (mixed: the epoch's last incomplete batch).
        tickets: the ticket ids to draw from (default: every id present in ``routes``).
    """

    def __init__(self, routes, batch_size: int, *, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 mixed: bool = False, tickets: Sequence[int] | None = None):
        routes = as_routes(routes)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be an int >= 1, got {batch_size!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise DataError(f"seed must be an int, got {seed!r}.")
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last), ("mixed", mixed)):
            if not isinstance(flag, bool):
                raise DataError(f"{name} must be True or False, got {flag!r}.")
        present = sorted(set(routes.tolist()))
        chosen = present if tickets is None else sorted(set(_ticket_ids(tickets)))
        missing = [k for k in chosen if k not in present]
        if missing:
            raise DataError(f"tickets {missing} have no sample in routes; drop them from tickets= or add their data.")
        self.batch_size, self.shuffle, self.drop_last, self.mixed = batch_size, shuffle, drop_last, mixed
        self.indices = {k: torch.nonzero(routes == k).flatten() for k in chosen}
        self.generator = torch.Generator().manual_seed(seed)
        small = [k for k, idx in self.indices.items() if drop_last and not mixed and len(idx) < batch_size]
        if small:
            raise DataError(f"tickets {small} have fewer samples than batch_size={batch_size}, so drop_last=True "
                            "leaves them no batch; use drop_last=False or a smaller batch_size.")

    @property
    def tickets(self) -> list[int]:
        """The ticket ids the batches come from, ascending."""
        return list(self.indices)

    def _batches_of(self, k: int) -> int:
        n = len(self.indices[k])
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        if self.mixed:
            total = len(self.indices) * max(len(i) for i in self.indices.values())
            return total // self.batch_size if self.drop_last else math.ceil(total / self.batch_size)
        return max(self._batches_of(k) for k in self.indices) * len(self.indices)

    def _order(self, k: int) -> torch.Tensor:
        idx = self.indices[k]
        return idx[torch.randperm(len(idx), generator=self.generator)] if self.shuffle else idx

    def _chunks(self, k: int) -> list[list[int]]:
        order = self._order(k).tolist()
        stop = self._batches_of(k) * self.batch_size if self.drop_last else len(order)
        return [order[i:i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        if self.mixed:
            yield from self._mixed_epoch()
            return
        pending = {k: self._chunks(k) for k in self.indices}
        M = max(self._batches_of(k) for k in self.indices)
        for _ in range(M):
            for k in self.indices:
                if not pending[k]:
                    pending[k] = self._chunks(k)  # this ticket's subset starts over (as a re-iterated loader)
                yield pending[k].pop(0)

    def _mixed_epoch(self) -> Iterator[list[int]]:
        n_max = max(len(i) for i in self.indices.values())
        per = []
        for k in self.indices:
            taken = []
            while len(taken) < n_max:
                taken.extend(self._order(k).tolist())
            per.append(taken[:n_max])
        if self.shuffle:
            flat = torch.tensor(per).flatten()
            union = flat[torch.randperm(len(flat), generator=self.generator)].tolist()
        else:
            union = [i for column in zip(*per) for i in column]  # ticket by ticket, interleaved
        stop = len(self) * self.batch_size if self.drop_last else len(union)
        for i in range(0, stop, self.batch_size):
            yield union[i:i + self.batch_size]


def _ticket_ids(tickets) -> list[int]:
    if isinstance(tickets, (str, bytes)) or not isinstance(tickets, Sequence) or not tickets:
        raise DataError(f"tickets must be a non-empty sequence of ticket ids, got {tickets!r}.")
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in tickets):
        raise DataError(f"tickets must hold ints >= 0, got {list(tickets)!r}.")
    return list(tickets)
