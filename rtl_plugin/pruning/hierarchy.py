"""Coarse-to-fine tickets: sub-tickets searched from their parent ticket's masks, so that sub mask ⊆ parent mask.

The routed model holds the parents (super-group tickets, e.g. one per domain, already searched) and the
sub-tickets (e.g. one per class of a domain). :func:`search_sub_tickets` starts every sub-ticket at its parent's
masks and prunes it further on its own data with the pruner's public steps (``begin_search``, ``rewind``,
``train_ticket``, ``prune_round``, ``finish_search``); pruning only removes entries, so every recorded mask of a
sub-ticket is a subset of its parent's. The sparsities asked for should lie above the parents' own.
"""
from __future__ import annotations

from typing import Mapping

import torch

from rtl_plugin.errors import RTLError, TicketError
from rtl_plugin.pruning.gradients import estimate_gradients, needs_gradients
from rtl_plugin.pruning.pruner import RTLPruner, SearchResult
from rtl_plugin.training.loop import normalize_subsets
from rtl_plugin.training.optim import fresh_optimizers

__all__ = ["search_sub_tickets", "check_nested"]


def _check_parents(pruner: RTLPruner, parents: Mapping[int, int], loaders: dict) -> None:
    if not isinstance(pruner, RTLPruner):
        raise TypeError(f"search_sub_tickets needs an RTLPruner, got {type(pruner).__name__}.")
    if not isinstance(parents, Mapping) or not parents:
        raise TicketError("parents must be a non-empty {sub_ticket: parent_ticket} dict.")
    ts = pruner.routed.tickets
    for sub, parent in parents.items():
        ts.check_index(sub)
        ts.check_index(parent)
        if sub in parents.values():
            raise TicketError(f"ticket {sub} is both a sub-ticket and a parent; nest one level per search "
                              "(search the parents first, then their sub-tickets).")
        if sub not in loaders:
            raise TicketError(f"sub-ticket {sub} has no loader; give one DataLoader per sub-ticket.")


def check_nested(tickets, parents: Mapping[int, int]) -> None:
    """RTLError unless every sub-ticket's element mask is a subset of its parent's (``tickets``: a TicketSet)."""
    elem = tickets.element_masks()
    for sub, parent in parents.items():
        for n, m in elem.items():
            if bool((m[sub] & ~m[parent]).any()):
                raise RTLError(f"sub-ticket {sub} keeps weights of layer {n!r} that its parent {parent} drops; "
                               "search it from its parent's masks with search_sub_tickets.")


def search_sub_tickets(pruner: RTLPruner, parents: Mapping[int, int], subsets, *,
                       optimizer: torch.optim.Optimizer | None = None, epochs_per_round: int = 1,
                       device=None) -> SearchResult:
    """Search every sub-ticket (``parents = {sub: parent}``) from its parent's masks on ``subsets[sub]``
    (``{sub: DataLoader}``), toward ``pruner``'s sparsities; returns the SearchResult (``tickets_at``) and
    leaves the last sparsity's masks set. The parents' masks are not changed; the shared weights end at the
    rewind point (the weights at the start), as after ``find_tickets``."""
    loaders = normalize_subsets(subsets)
    _check_parents(pruner, parents, loaders)
    if not isinstance(epochs_per_round, int) or isinstance(epochs_per_round, bool) or epochs_per_round < 1:
        raise TicketError(f"epochs_per_round must be a positive int, got {epochs_per_round!r}.")
    routed = pruner.routed
    make_opt = fresh_optimizers(routed, optimizer)
    for sub, parent in parents.items():  # the start masks too: a target never reached records the parent's
        routed.set_ticket(sub, {n: m[parent].clone() for n, m in routed.tickets.masks.items()})
    subs = sorted(parents)
    pruner.begin_search(subs)
    try:
        for sub in subs:
            routed.set_ticket(sub, {n: m[parents[sub]].clone() for n, m in routed.tickets.masks.items()})
        for sub in subs:
            while pruner.record_targets(sub) is not None:
                pruner.rewind(sub)
                loss = pruner.train_ticket(sub, loaders[sub], optimizer=make_opt(), epochs=epochs_per_round,
                                           device=device)
                if needs_gradients(pruner.importance):
                    estimate_gradients(routed, sub, loaders[sub], importance=pruner.importance,
                                       batches=pruner.importance_batches, device=device)
                pruner.prune_round(sub, loss=loss)
    except BaseException:
        pruner.abandon_search()
        raise
    result = pruner.finish_search()
    for ts in result.tickets_at.values():
        check_nested(ts, parents)
    return result
