"""Routers: pick the ticket for each input when the context is unknown at test time.

Every router is an ``nn.Module`` with

* ``fit(x, ticket_ids, *, epochs=None, seed=0) -> self``  (x [N, ...], ticket_ids int64 [N] in [0, K));
* ``forward(x) -> LongTensor [B]``: predicted ticket ids, ready for ``routed(x, route=router(x))``;
* ``accuracy(x, ticket_ids) -> float``;
* ``flops_per_sample(input_shape) -> int``: input_shape is one sample's shape without the batch dim.

Registered timm-style: ``create_router("learned", num_tickets=K, pool=4)``; ``list_routers()``.

=============  =====================================================================================
``context``    the paper: the ticket is the known context (``router(x, context=ids)``); 0 FLOPs
``learned``    pooled input -> Linear(32) -> ReLU -> Linear(K), cross-entropy; ~1e-4 of a ResNet-18
``centroid``   nearest per-ticket centroid of the same standardised pooled features
``all``        one-vs-rest detector tickets: run all K tickets, take the highest positive score (K x model)
=============  =====================================================================================

Features of the cheap routers: 4-D inputs [B, C, H, W] (images, spectrograms [B, C, T, F]) are
``adaptive_avg_pool2d``-ed to ``pool x pool`` (dims beyond the last two are flattened into C);
3-D [B, C, L] and 2-D [B, L] (waveforms) are ``adaptive_avg_pool1d``-ed to ``bins`` (64) bins.
"""
from __future__ import annotations

import abc
import contextlib
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rtl_plugin import _tp
from rtl_plugin.errors import DataError, RouteError
from rtl_plugin.registry import Registry

__all__ = [
    "Router", "ContextRouter", "LearnedRouter", "CentroidRouter", "RunAllRouter", "RouterReport",
    "register_router", "create_router", "list_routers", "route_accuracy", "flops_share", "router_report",
    "positive_score", "pooled_features", "model_flops",
]

_ROUTERS: Registry = Registry("router", RouteError, set_name=True)


# --------------------------------------------------------------------------- registry


def register_router(name: str) -> Callable[[type["Router"]], type["Router"]]:
    """Class decorator: ``@register_router("learned")``."""
    return _ROUTERS.register(name)


def list_routers() -> list[str]:
    return _ROUTERS.names()


def create_router(name: str, *, num_tickets: int, **kw) -> "Router":
    """Router instance by registered name, e.g. ``create_router("learned", num_tickets=3, hidden=32)``."""
    return _ROUTERS.get(name)(num_tickets, **kw)


# --------------------------------------------------------------------------- helpers


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_k(num_tickets) -> int:
    if not _is_int(num_tickets) or num_tickets < 1:
        raise RouteError(f"num_tickets must be an integer >= 1, got {num_tickets!r}")
    return int(num_tickets)


def _check_pos_int(v, what: str) -> int:
    if not _is_int(v) or v < 1:
        raise RouteError(f"{what} must be an integer >= 1, got {v!r}")
    return int(v)


def _check_x(x, what: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise DataError(f"{what} must be a float tensor [B, ...], got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 2:
        raise DataError(f"{what} must be batched [B, ...] with at least 2 dims, got shape {tuple(x.shape)}; "
                        "add a batch dim with x.unsqueeze(0)")
    if x.shape[0] == 0:
        raise DataError(f"{what} is an empty batch; pass at least one sample")
    return x


def _check_ids(ids, k: int, n: int | None, what: str = "ticket_ids") -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.as_tensor(np.asarray(ids))
        except (TypeError, ValueError, RuntimeError):
            raise RouteError(f"{what} must be a LongTensor [N], got {type(ids).__name__}") from None
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
        raise RouteError(f"{what} must have an integer dtype, got {ids.dtype}; use .long()")
    if ids.dim() != 1:
        raise RouteError(f"{what} must be 1-D [N], got shape {tuple(ids.shape)}; give one ticket id per sample")
    if n is not None and ids.shape[0] != n:
        raise DataError(f"{what} has {ids.shape[0]} entries for {n} samples; give one ticket id per sample")
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= k:
            raise RouteError(f"{what} contains ticket id {lo if lo < 0 else hi}, outside [0, {k}); "
                             f"valid tickets are 0..{k - 1}")
    return ids.long()


def sample_shape(input_shape) -> tuple[int, ...]:
    """One sample's input shape (no batch dim), checked."""
    if isinstance(input_shape, torch.Size):
        input_shape = tuple(input_shape)
    if not isinstance(input_shape, (tuple, list)) or not input_shape or \
            not all(_is_int(s) and s >= 1 for s in input_shape):
        raise DataError(f"input_shape must be one sample's shape without the batch dim, e.g. (3, 32, 32), "
                        f"got {input_shape!r}")
    return tuple(int(s) for s in input_shape)


def pooled_features(x: torch.Tensor, *, pool: int = 4, bins: int = 64) -> torch.Tensor:
    """Cheap router features [B, D] of x [B, L] / [B, C, L] / [B, C, H, W] (/ more dims folded into C)."""
    x = _check_x(x)
    if x.dim() == 2:
        f = F.adaptive_avg_pool1d(x.unsqueeze(1), bins)
    elif x.dim() == 3:
        f = F.adaptive_avg_pool1d(x, bins)
    else:
        f = F.adaptive_avg_pool2d(x.flatten(1, -3) if x.dim() > 4 else x, pool)
    return f.flatten(1)


def _feature_dim(shape: tuple[int, ...], pool: int, bins: int) -> int:
    if len(shape) == 1:
        return bins
    if len(shape) == 2:
        return shape[0] * bins
    return math.prod(shape[:-2]) * pool * pool


def _pool_flops(shape: tuple[int, ...], pool: int, bins: int) -> int:
    """Adds of the pooling (every input element once) plus one division per output feature."""
    return math.prod(shape) + _feature_dim(shape, pool, bins)


@contextlib.contextmanager
def _single_thread(active: bool):
    """Run tiny CPU training on one intra-op thread (restored after): multi-threading such small matmuls
    only adds synchronisation, which becomes 10-50x slower when the cores are busy."""
    if not active or torch.get_num_threads() == 1:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def route_accuracy(pred, true) -> float:
    """Fraction of samples routed to their true ticket: pred, true int [N]."""
    pred = pred if isinstance(pred, torch.Tensor) else torch.as_tensor(np.asarray(pred))
    true = true if isinstance(true, torch.Tensor) else torch.as_tensor(np.asarray(true))
    for t, what in ((pred, "pred"), (true, "true")):
        if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
            raise RouteError(f"{what} must hold integer ticket ids, got {t.dtype}; use .long() (or argmax first)")
    if pred.shape != true.shape or pred.dim() != 1:
        raise DataError(f"pred {tuple(pred.shape)} and true {tuple(true.shape)} must both be [N]; "
                        "give one ticket id per sample")
    if pred.numel() == 0:
        raise DataError("route_accuracy got no samples; pass at least one")
    return float((pred.cpu() == true.cpu()).double().mean())


# --------------------------------------------------------------------------- base


class Router(nn.Module, abc.ABC):
    """Base router over ``num_tickets`` tickets."""
    name = "base"

    def __init__(self, num_tickets: int):
        super().__init__()
        self.num_tickets = _check_k(num_tickets)

    def fit(self, x: torch.Tensor, ticket_ids: torch.Tensor, *, epochs: int | None = None,
            seed: int = 0) -> "Router":
        """Default: nothing to learn (validates the inputs)."""
        _check_ids(ticket_ids, self.num_tickets, _check_x(x).shape[0])
        return self

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, ticket_ids: torch.Tensor, **kw) -> float:
        """Routing accuracy of ``self(x, **kw)`` against the true ticket ids [N]."""
        ids = _check_ids(ticket_ids, self.num_tickets, _check_x(x).shape[0])
        return route_accuracy(self(x, **kw), ids)

    @abc.abstractmethod
    def flops_per_sample(self, input_shape) -> int:
        """Floating-point operations to route one sample of ``input_shape`` (batch dim excluded)."""

    def extra_repr(self) -> str:
        return f"num_tickets={self.num_tickets}"


# --------------------------------------------------------------------------- context (the paper)


@register_router("context")
class ContextRouter(Router):
    """The paper's routing: the context (domain / class / condition) is known and *is* the ticket id.

    ``forward(x, context=ids)`` validates ``ids`` (int, LongTensor [B], or with ``names`` a sequence of
    ticket names) and returns LongTensor [B] on x's device. 0 FLOPs.
    """

    def __init__(self, num_tickets: int, *, names: Sequence[str] | None = None):
        super().__init__(num_tickets)
        if names is not None:
            names = [str(n) for n in names]
            if len(names) != self.num_tickets or len(set(names)) != len(names):
                raise RouteError(f"names must be {self.num_tickets} distinct ticket names, got {names!r}")
        self.names = names

    def forward(self, x: torch.Tensor | None = None, *, context=None) -> torch.Tensor:
        if context is None:
            raise RouteError("ContextRouter needs the known context: call router(x, context=ticket_ids); "
                             "use a 'learned' or 'centroid' router when the context is unknown")
        n = None if x is None else _check_x(x).shape[0]
        if _is_int(context):
            if not 0 <= int(context) < self.num_tickets:
                raise RouteError(f"context {context} is outside [0, {self.num_tickets}); "
                                 f"valid tickets are 0..{self.num_tickets - 1}")
            if n is None:
                raise RouteError("an int context needs x to know the batch size; pass router(x, context=k)")
            return torch.full((n,), int(context), dtype=torch.long, device=x.device)
        if not isinstance(context, torch.Tensor) and not isinstance(context, np.ndarray) \
                and isinstance(context, Sequence) and context and isinstance(context[0], str):
            if self.names is None:
                raise RouteError("string contexts need ticket names: ContextRouter(K, names=[...])")
            unknown = sorted({c for c in context if c not in self.names})
            if unknown:
                raise RouteError(f"unknown contexts {unknown}; known ticket names: {self.names}")
            context = torch.tensor([self.names.index(c) for c in context], dtype=torch.long)
        ids = _check_ids(context, self.num_tickets, n, "context")
        return ids.to(x.device) if x is not None else ids

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, ticket_ids: torch.Tensor, *, context=None) -> float:
        """With no ``context`` the true ids are the context (oracle routing: 1.0)."""
        return super().accuracy(x, ticket_ids, context=ticket_ids if context is None else context)

    def flops_per_sample(self, input_shape) -> int:
        sample_shape(input_shape)
        return 0


# --------------------------------------------------------------------------- pooled-feature routers


class _PooledRouter(Router):
    """Shared plumbing: pooled features standardised with the training mean / std (buffers)."""

    _stat_buffers = ("mean", "std")

    def __init__(self, num_tickets: int, *, pool: int = 4, bins: int = 64, input_shape=None):
        super().__init__(num_tickets)
        self.pool = _check_pos_int(pool, "pool")
        self.bins = _check_pos_int(bins, "bins")
        self.register_buffer("fitted", torch.tensor(False))
        for b in self._stat_buffers:
            self.register_buffer(b, None)
        self.input_shape = None if input_shape is None else sample_shape(input_shape)

    def _maybe_allocate(self) -> None:
        """Build buffers / layers up front when ``input_shape`` is known (so ``load_state_dict`` works)."""
        if self.input_shape is not None:
            self._allocate(_feature_dim(self.input_shape, self.pool, self.bins))

    def _allocate(self, d: int, seed: int = 0) -> None:
        self.mean = torch.zeros(d)
        self.std = torch.ones(d)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_features(x, pool=self.pool, bins=self.bins).float()

    def _fit_stats(self, f: torch.Tensor) -> torch.Tensor:
        self.mean = f.mean(0)
        self.std = f.std(0, unbiased=False).clamp_min(1e-6)
        return (f - self.mean) / self.std

    def _standardised(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.fitted):
            raise RouteError(f"this {type(self).__name__} is not fitted; call router.fit(x, ticket_ids) first")
        f = self._features(x)
        if f.shape[1] != self.mean.shape[0]:
            raise DataError(f"the router was fitted on inputs with {self.mean.shape[0]} pooled features, this input "
                            f"{tuple(x.shape[1:])} gives {f.shape[1]}; use inputs shaped like the training data")
        return (f - self.mean.to(f.device)) / self.std.to(f.device)

    def extra_repr(self) -> str:
        return f"num_tickets={self.num_tickets}, pool={self.pool}, bins={self.bins}, fitted={bool(self.fitted)}"


@register_router("learned")
class LearnedRouter(_PooledRouter):
    """Lightweight gate: pooled features (standardised) -> Linear(hidden) -> ReLU -> Linear(K).

    Trained with cross-entropy, Adam (``lr`` 1e-2), full batch when N <= ``batch_size`` (256) else
    shuffled mini-batches; ``epochs`` (100) passes; deterministic in ``seed`` (global RNG untouched;
    on the CPU the loop runs on one intra-op thread, restored afterwards).
    Pass ``input_shape`` (one sample, e.g. (3, 32, 32)) to build the layers up front, e.g. before
    ``load_state_dict``; otherwise they are built by ``fit``.
    """

    def __init__(self, num_tickets: int, *, pool: int = 4, bins: int = 64, hidden: int = 32, lr: float = 1e-2,
                 epochs: int = 100, batch_size: int = 256, weight_decay: float = 0.0, input_shape=None):
        super().__init__(num_tickets, pool=pool, bins=bins, input_shape=input_shape)
        self.hidden = _check_pos_int(hidden, "hidden")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise RouteError(f"lr must be a positive number, got {lr!r}")
        self.lr = float(lr)
        self.epochs = _check_pos_int(epochs, "epochs")
        self.batch_size = _check_pos_int(batch_size, "batch_size")
        self.weight_decay = float(weight_decay)
        self.net = None
        self._maybe_allocate()

    def _allocate(self, d: int, seed: int = 0) -> None:
        super()._allocate(d, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(d, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.num_tickets))

    def fit(self, x: torch.Tensor, ticket_ids: torch.Tensor, *, epochs: int | None = None,
            seed: int = 0) -> "LearnedRouter":
        """Train on x [N, ...] and true ticket ids [N]; returns self (in eval mode)."""
        ids = _check_ids(ticket_ids, self.num_tickets, _check_x(x).shape[0])
        epochs = self.epochs if epochs is None else _check_pos_int(epochs, "epochs")
        if not _is_int(seed) or seed < 0:
            raise RouteError(f"seed must be a non-negative integer, got {seed!r}")
        with torch.no_grad():
            f = self._features(x)
        self._allocate(f.shape[1], int(seed))
        self.to(x.device)
        with torch.no_grad():
            z = self._fit_stats(f)
        ids = ids.to(x.device)
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(int(seed))
        n = z.shape[0]
        self.train()
        with torch.enable_grad(), _single_thread(x.device.type == "cpu"):
            for _ in range(epochs):
                order = torch.randperm(n, generator=gen).to(x.device) if n > self.batch_size else None
                for start in range(0, n, self.batch_size):
                    sel = None if order is None else order[start:start + self.batch_size]
                    zb, yb = (z, ids) if sel is None else (z[sel], ids[sel])
                    loss = F.cross_entropy(self.net(zb), yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        self.fitted.fill_(True)
        self.input_shape = tuple(x.shape[1:])
        return self.eval()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Ticket logits [B, K]."""
        if self.net is not None and isinstance(x, torch.Tensor) and x.device != self.net[0].weight.device:
            raise RouteError(f"the input is on {x.device} but the router is on {self.net[0].weight.device}; "
                             "call router.to(device)")
        return self.net(self._standardised(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted ticket ids, LongTensor [B]."""
        return self.logits(x).argmax(1)

    def flops_per_sample(self, input_shape) -> int:
        """Pooling adds + standardisation (2D) + 2 x MACs of both Linears + bias adds + ReLU + argmax (K)."""
        shape = sample_shape(input_shape)
        d, h, k = _feature_dim(shape, self.pool, self.bins), self.hidden, self.num_tickets
        return _pool_flops(shape, self.pool, self.bins) + 2 * d + 2 * (d * h + h * k) + (h + k) + h + k


@register_router("centroid")
class CentroidRouter(_PooledRouter):
    """Nearest centroid (squared Euclidean) of the standardised pooled features; ``fit`` stores [K, D] centroids."""

    _stat_buffers = ("mean", "std", "centroids")

    def __init__(self, num_tickets: int, *, pool: int = 4, bins: int = 64, input_shape=None):
        super().__init__(num_tickets, pool=pool, bins=bins, input_shape=input_shape)
        self._maybe_allocate()

    def _allocate(self, d: int, seed: int = 0) -> None:
        super()._allocate(d, seed)
        self.centroids = torch.zeros(self.num_tickets, d)

    def fit(self, x: torch.Tensor, ticket_ids: torch.Tensor, *, epochs: int | None = None,
            seed: int = 0) -> "CentroidRouter":
        """Per-ticket means of the standardised features (``epochs``/``seed`` unused); every ticket needs a sample."""
        ids = _check_ids(ticket_ids, self.num_tickets, _check_x(x).shape[0])
        counts = torch.bincount(ids.cpu(), minlength=self.num_tickets)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise DataError(f"tickets {empty} have no training samples; a centroid router needs >= 1 sample per "
                            "ticket, so add samples or lower num_tickets")
        with torch.no_grad():
            f = self._features(x)
            self._allocate(f.shape[1])
            self.to(x.device)
            z = self._fit_stats(f)
            ids = ids.to(x.device)
            sums = torch.zeros(self.num_tickets, z.shape[1], device=z.device).index_add_(0, ids, z)
            self.centroids = sums / counts.to(z.device, z.dtype).unsqueeze(1)
        self.fitted.fill_(True)
        self.input_shape = tuple(x.shape[1:])
        return self.eval()

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """Squared distances to every ticket's centroid, [B, K]."""
        z = self._standardised(x)
        return torch.cdist(z, self.centroids.to(z.device)).square()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.distances(x).argmin(1)

    def flops_per_sample(self, input_shape) -> int:
        """Pooling + standardisation (2D) + K distances (3D each: sub, square, add) + argmin (K)."""
        shape = sample_shape(input_shape)
        d, k = _feature_dim(shape, self.pool, self.bins), self.num_tickets
        return _pool_flops(shape, self.pool, self.bins) + 2 * d + 3 * d * k + k


# --------------------------------------------------------------------------- run all detector tickets


def positive_score(out) -> torch.Tensor:
    """Positive-class score [B] of a detector output: logits [B] or [B, 1] as is; [B, 2]: log-odds l1 - l0."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise RouteError(f"a detector ticket must return a tensor, got {type(out).__name__}; pass score_fn=")
    if out.dim() == 1:
        return out
    if out.dim() == 2 and out.shape[1] == 1:
        return out[:, 0]
    if out.dim() == 2 and out.shape[1] == 2:
        return out[:, 1] - out[:, 0]
    raise RouteError(f"cannot read a positive-class score from an output of shape {tuple(out.shape)}; expected "
                     "[B], [B, 1] or [B, 2] (index 1 positive), or pass score_fn=lambda out: ... -> [B]")


def _plain(model: nn.Module) -> nn.Module:
    return model.plain_copy(0) if hasattr(model, "plain_copy") else model


def _example_inputs_argument(example_inputs, example_input, fn: str):
    """``example_inputs``, or the deprecated ``example_input=`` (with a DeprecationWarning)."""
    if example_input is None:
        if example_inputs is None:
            raise RouteError(f"{fn} needs example_inputs, a batch [B, ...] the model accepts.")
        return example_inputs
    warnings.warn(f"{fn}(example_input=...) is deprecated; use example_inputs=... (the name rtl.wrap and "
                  "torch-pruning use).", DeprecationWarning, stacklevel=3)
    if example_inputs is not None:
        raise RouteError(f"pass example_inputs only (example_input= is its deprecated name), not both, to {fn}.")
    return example_input


def model_flops(model: nn.Module, example_inputs=None, *, example_input=None) -> int:
    """FLOPs of one sample through ``model`` (2 x torch-pruning's MAC count; a RoutedModel counts ticket 0 dense).

    ``torch_pruning.utils.count_ops_and_params`` returns (MACs, params) for the batch it is given, with
    bias adds and element-wise ops counted like MACs; only the first sample of ``example_inputs`` is used
    (``example_input=`` is its deprecated name).
    """
    example_input = _example_inputs_argument(example_inputs, example_input, "model_flops")
    if isinstance(example_input, torch.Tensor):
        example_input = example_input[:1]
    elif isinstance(example_input, (tuple, list)):
        example_input = type(example_input)(a[:1] if isinstance(a, torch.Tensor) and a.dim() else a
                                            for a in example_input)
    return int(2 * _tp.count_macs(_plain(model), example_input))


@register_router("all")
class RunAllRouter(Router):
    """One-vs-rest detector tickets: run all K tickets of ``model`` and route to the highest positive score.

    ``model`` is a RoutedModel (or any module taking ``route=k`` with ``num_tickets``) whose ticket k
    outputs the positive-class score of class k; ``score_fn(out) -> [B]`` reads it (default
    :func:`positive_score`). Runs in eval mode without grad (norm statistics are not updated).
    Cost: ``flops_per_sample`` is K x the model's FLOPs (dense count: masked weights are still
    multiplied), i.e. ``flops_share`` = K. The model is held by reference, not as a submodule,
    so ``router.to()`` / ``state_dict()`` leave it alone.
    """

    def __init__(self, num_tickets: int, *, model: nn.Module, score_fn: Callable | None = None):
        super().__init__(num_tickets)
        if not isinstance(model, nn.Module) or not hasattr(model, "num_tickets"):
            raise RouteError("RunAllRouter needs model=<RoutedModel> (a module with num_tickets taking route=k); "
                             "build one with rtl.wrap(model, K, ...)")
        if int(model.num_tickets) != self.num_tickets:
            raise RouteError(f"num_tickets={self.num_tickets} but the model routes {model.num_tickets} tickets; "
                             "pass num_tickets=model.num_tickets")
        if score_fn is not None and not callable(score_fn):
            raise RouteError(f"score_fn must be callable (out -> scores [B]), got {type(score_fn).__name__}")
        object.__setattr__(self, "model", model)
        self.score_fn = score_fn or positive_score
        self._flops: dict[tuple, int] = {}

    @torch.no_grad()
    def scores(self, x: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """Positive-class score of every ticket, [B, K]."""
        x = _check_x(x)
        was = self.model.training
        self.model.eval()
        try:
            cols = []
            for k in range(self.num_tickets):
                s = self.score_fn(self.model(x, route=k, **model_kwargs))
                if not isinstance(s, torch.Tensor) or s.shape != (x.shape[0],):
                    raise RouteError(f"score_fn returned {getattr(s, 'shape', type(s).__name__)} for ticket {k}; "
                                     f"it must return one score per sample, shape [{x.shape[0]}]")
                cols.append(s.float())
        finally:
            self.model.train(was)
        return torch.stack(cols, 1)

    def forward(self, x: torch.Tensor, **model_kwargs) -> torch.Tensor:
        return self.scores(x, **model_kwargs).argmax(1)

    def flops_per_sample(self, input_shape) -> int:
        """K x the model's FLOPs on one sample of ``input_shape`` (+ K for the argmax)."""
        shape = sample_shape(input_shape)
        if shape not in self._flops:
            p = next(self.model.parameters(), None)
            ex = torch.zeros((1,) + shape, device=p.device if p is not None else "cpu")
            self._flops[shape] = model_flops(self.model, ex)
        return self.num_tickets * self._flops[shape] + self.num_tickets


# --------------------------------------------------------------------------- reports


def flops_share(router: Router, model: nn.Module, example_inputs: torch.Tensor | None = None, *,
                example_input: torch.Tensor | None = None) -> float:
    """Router FLOPs / model FLOPs per sample; model FLOPs = 2 x ``tp.utils.count_ops_and_params`` MACs.

    ``example_inputs`` is a batch [B, ...] (its first sample is counted); a RoutedModel counts as dense.
    ``example_input=`` is its deprecated name.
    """
    example_input = _example_inputs_argument(example_inputs, example_input, "flops_share")
    if not isinstance(router, Router):
        raise RouteError(f"router must be a Router, got {type(router).__name__}")
    x = _check_x(example_input, "example_inputs")
    return router.flops_per_sample(tuple(x.shape[1:])) / model_flops(model, x)


@dataclass
class RouterReport:
    """Routing accuracy and cost of one router (``flops_share`` = router FLOPs / model FLOPs)."""
    name: str
    accuracy: float
    flops_share: float

    def to_dict(self) -> dict:
        return asdict(self)


def router_report(router: Router, x: torch.Tensor, ticket_ids: torch.Tensor, *, model: nn.Module | None = None,
                  name: str | None = None, **forward_kw) -> RouterReport:
    """RouterReport of ``router`` on (x, ticket_ids); ``flops_share`` is NaN without ``model``."""
    acc = router.accuracy(x, ticket_ids, **forward_kw)
    share = float("nan") if model is None else flops_share(router, model, x)
    return RouterReport(name or router.name, acc, share)
