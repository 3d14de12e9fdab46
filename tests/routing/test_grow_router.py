"""grow_router: a router over K + 1 tickets for a model that grew one (context, centroid extended, learned refit)."""
import pytest
import torch

from rtl_plugin.errors import DataError, RouteError
from rtl_plugin.routing.grow import grow_router
from rtl_plugin.routing.routers import CentroidRouter, ContextRouter, LearnedRouter, create_router


def domains(n: int, seed: int = 0):
    """4 easy domains [n, 3, 16, 16]: noise / brighter / stripes / darker."""
    g = torch.Generator().manual_seed(seed)
    d = torch.arange(n) % 4
    x = 0.5 * torch.randn(n, 3, 16, 16, generator=g)
    x[d == 1] += 1.0
    x[d == 2] += torch.sin(6 * torch.linspace(-1, 1, 16)).view(1, 1, 16, 1)
    x[d == 3] -= 1.0
    return x, d


def test_centroid_router_extended_without_old_data():
    x, d = domains(400)
    xt, dt = domains(200, 1)
    old = create_router("centroid", num_tickets=3).fit(x[d < 3], d[d < 3])
    grown = grow_router(old, x[d == 3])
    assert isinstance(grown, CentroidRouter) and grown.num_tickets == 4 and old.num_tickets == 3
    assert torch.equal(grown.centroids[:3], old.centroids) and torch.equal(grown.mean, old.mean)
    assert grown.accuracy(xt, dt) > 0.9
    pred_old, pred_new = old(xt), grown(xt)
    keep = pred_new != 3  # an input keeps its old route unless the new centroid is nearer
    assert torch.equal(pred_new[keep], pred_old[keep])


def test_learned_router_refit_and_context_router():
    x, d = domains(400)
    old = LearnedRouter(3, hidden=8, epochs=30).fit(x[d < 3], d[d < 3])
    grown = grow_router(old, x=x, ticket_ids=d)
    assert isinstance(grown, LearnedRouter) and grown.num_tickets == 4 and grown.hidden == 8 and grown.epochs == 30
    assert grown.accuracy(*domains(200, 1)) > 0.9
    ctx = grow_router(ContextRouter(3, names=["a", "b", "c"]), name="d")
    assert ctx.num_tickets == 4 and ctx.names == ["a", "b", "c", "d"]
    assert ctx(x[:2], context=["d", "a"]).tolist() == [3, 0]
    assert grow_router(ContextRouter(3)).num_tickets == 4


def test_grow_router_bad_inputs():
    x, d = domains(40)
    with pytest.raises(DataError, match="x= and ticket_ids="):
        grow_router(LearnedRouter(3, epochs=1).fit(x[d < 3], d[d < 3]))
    with pytest.raises(RouteError, match="name="):
        grow_router(ContextRouter(2, names=["a", "b"]))
    with pytest.raises(RouteError, match="not fitted"):
        grow_router(CentroidRouter(2), x)
    with pytest.raises(DataError, match="x_new"):
        grow_router(create_router("centroid", num_tickets=3).fit(x[d < 3], d[d < 3]), torch.zeros(0, 3, 16, 16))
    with pytest.raises(RouteError, match="needs a Router"):
        grow_router("centroid")
