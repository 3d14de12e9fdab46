"""Routers for a model that grew a ticket (``routed.add_ticket``): K -> K + 1 routes.

``grow_router(router, x_new)`` returns a new router over K + 1 tickets whose last ticket serves ``x_new``:

* ``ContextRouter``: one more context id (and a name, when the router has names);
* ``CentroidRouter``: extended without the old data: its K centroids and feature standardisation are kept and
  the new ticket's centroid is the mean of ``x_new``'s standardised features (an input keeps its old route
  unless the new centroid is nearer);
* ``LearnedRouter`` (or a CentroidRouter given ``x=`` instead of ``x_new``): refitted from scratch over K + 1
  tickets, which needs samples of every ticket: ``x=`` and ``ticket_ids=`` (old and new data, ids in [0, K]).
"""
from __future__ import annotations

import copy

import torch

from rtl_plugin.errors import DataError, RouteError
from rtl_plugin.routing.routers import CentroidRouter, ContextRouter, LearnedRouter, Router, create_router

__all__ = ["grow_router"]

_LEARNED_OPTIONS = ("pool", "bins", "hidden", "lr", "epochs", "batch_size", "weight_decay")


def _grow_context(router: ContextRouter, name: str | None) -> ContextRouter:
    names = None
    if router.names is not None:
        if name is None:
            raise RouteError("this ContextRouter has ticket names; give the new ticket's with name=...")
        names = list(router.names) + [str(name)]
    return ContextRouter(router.num_tickets + 1, names=names)


def _grow_centroid(router: CentroidRouter, x_new: torch.Tensor) -> CentroidRouter:
    if not bool(router.fitted):
        raise RouteError("the CentroidRouter is not fitted; fit it over all K + 1 tickets instead of growing it.")
    grown = copy.deepcopy(router)
    with torch.no_grad():
        z = grown._standardised(x_new)
        grown.num_tickets = router.num_tickets + 1
        grown.centroids = torch.cat([router.centroids.to(z.device), z.mean(0, keepdim=True)], 0)
    return grown.eval()


def _refit(router: Router, x, ticket_ids, seed: int) -> Router:
    if x is None or ticket_ids is None:
        raise DataError(f"a {type(router).__name__} is refitted over K + 1 tickets: pass x= and ticket_ids= (samples "
                        f"of every ticket, ids in [0, {router.num_tickets}]).")
    if isinstance(router, LearnedRouter):
        cfg = {k: getattr(router, k) for k in _LEARNED_OPTIONS}
    else:
        cfg = {"pool": router.pool, "bins": router.bins}
    new = create_router(router.name, num_tickets=router.num_tickets + 1, **cfg)
    return new.fit(x, ticket_ids, seed=seed)


def grow_router(router: Router, x_new: torch.Tensor | None = None, *, x: torch.Tensor | None = None,
                ticket_ids: torch.Tensor | None = None, name: str | None = None, seed: int = 0) -> Router:
    """A router over ``router.num_tickets + 1`` tickets, the last one the newly added ticket (see the module doc).

    Args:
        router: the router of the K-ticket model (left unchanged).
        x_new: samples of the new ticket's data (CentroidRouter).
        x, ticket_ids: samples of every ticket and their ids in [0, K] (routers that are refitted).
        name: the new ticket's name (a ContextRouter with names).
    """
    if not isinstance(router, Router):
        raise RouteError(f"grow_router needs a Router (rtl_plugin.routing), got {type(router).__name__}.")
    if isinstance(router, ContextRouter):
        return _grow_context(router, name)
    if not isinstance(router, (CentroidRouter, LearnedRouter)):
        raise RouteError(f"grow_router extends context, centroid and learned routers; build a new "
                         f"{type(router).__name__} over K + 1 tickets instead.")
    if isinstance(router, CentroidRouter) and x_new is not None:
        if not isinstance(x_new, torch.Tensor) or not x_new.is_floating_point() or x_new.dim() < 2 or not len(x_new):
            raise DataError("x_new must be a non-empty float tensor [N, ...] of the new ticket's samples.")
        return _grow_centroid(router, x_new)
    return _refit(router, x, ticket_ids, seed)
