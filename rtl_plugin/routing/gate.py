"""A shallow gate trained jointly with learned tickets (an extension, not the paper's method).

``Gate`` = pooled input -> standardisation (running mean / variance, no affine) -> one ``nn.Linear`` -> softmax;
``gate(x)`` returns ticket ids like every :class:`~rtl_plugin.routing.routers.Router`. Its cost is far below 1% of
a vision model's FLOPs; :meth:`Gate.flops_per_sample` counts the pooling adds plus torch-pruning's own
``count_ops_and_params`` MACs of the standardisation and the linear layer (x2, the convention of
:func:`~rtl_plugin.routing.routers.model_flops`), and :func:`~rtl_plugin.routing.routers.flops_share` divides by
the model's.

Training pieces, used by :func:`rtl_plugin.training.learned.learn_tickets`:

* :func:`straight_through_route`: hard ticket ids from (optionally Gumbel-perturbed) logits and a per-sample factor
  whose value is 1 and whose gradient reaches the chosen ticket's probability (multiply the routed output by it);
* :func:`load_balance_loss`: the Switch-Transformer term ``K * sum_k f_k * P_k`` (f_k: share of samples routed to k,
  P_k: mean probability of k), 1 when balanced, so no ticket starves;
* :func:`routing_entropy`: mean per-sample entropy (a sparsity regulariser on the routing: low = confident);
* :func:`matched_accuracy`: routing accuracy under the best one-to-one matching of tickets to groups (label-free
  tickets are numbered arbitrarily).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rtl_plugin import _tp
from rtl_plugin.errors import DataError, RouteError
from rtl_plugin.routing.routers import Router, pooled_features, register_router, route_accuracy, sample_shape

__all__ = ["Gate", "straight_through_route", "load_balance_loss", "routing_entropy", "matched_accuracy"]


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _pos_int(v, what: str) -> int:
    if not _is_int(v) or v < 1:
        raise RouteError(f"{what} must be an integer >= 1, got {v!r}")
    return int(v)


def _pos_float(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or math.isinf(v):
        raise RouteError(f"{what} must be a positive number, got {v!r}")
    return float(v)


def _float_batch(x, what: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 or x.shape[0] == 0:
        raise DataError(f"{what} must be a non-empty float batch [B, ...], got "
                        f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    return x


def _ticket_ids(ids, k: int, n: int) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool or ids.dim() != 1:
        raise RouteError(f"ticket_ids must be an integer tensor [N], got {getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.shape[0] != n:
        raise DataError(f"ticket_ids has {ids.shape[0]} entries for {n} samples; give one ticket id per sample")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k):
        raise RouteError(f"ticket_ids must lie in [0, {k}); got ids in [{int(ids.min())}, {int(ids.max())}]")
    return ids.long()


@register_router("gate")
class Gate(Router):
    """One linear layer + softmax on pooled, standardised input features.

    Args:
        num_tickets: K.
        pool: images [B, C, H, W] are average-pooled to ``pool x pool`` per channel (C * pool^2 features).
        bins: 1-D / 2-D inputs are pooled to ``bins`` bins per channel.
        input_shape: one sample's shape (e.g. (3, 32, 32)) to build the layers now (needed before
            ``load_state_dict``); otherwise :meth:`build` / the first :meth:`fit` or joint training builds them.
        seed: initialisation of the linear layer (global RNG untouched).
    """

    def __init__(self, num_tickets: int, *, pool: int = 4, bins: int = 64, input_shape=None, seed: int = 0):
        super().__init__(num_tickets)
        self.pool = _pos_int(pool, "pool")
        self.bins = _pos_int(bins, "bins")
        if not _is_int(seed) or seed < 0:
            raise RouteError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.norm: nn.BatchNorm1d | None = None
        self.linear: nn.Linear | None = None
        self.input_shape = None
        if input_shape is not None:
            self.build(input_shape)

    # ------------------------------------------------------------------ layers
    def feature_dim(self, input_shape) -> int:
        shape = sample_shape(input_shape)
        return int(pooled_features(torch.zeros((1,) + shape), pool=self.pool, bins=self.bins).shape[1])

    def build(self, input_shape) -> "Gate":
        """Create the standardisation and linear layer for samples of ``input_shape`` (no-op when built for it)."""
        shape = sample_shape(input_shape)
        if self.linear is not None:
            if shape != self.input_shape:
                raise DataError(f"the gate was built for inputs {self.input_shape}, got {shape}; use inputs shaped "
                                "like the training data or a new Gate")
            return self
        d = self.feature_dim(shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.norm = nn.BatchNorm1d(d, affine=False, momentum=None)  # cumulative mean / variance
            self.linear = nn.Linear(d, self.num_tickets)
        self.input_shape = shape
        return self

    @property
    def built(self) -> bool:
        return self.linear is not None

    def _check_ready(self, x: torch.Tensor) -> None:
        if self.linear is None:
            raise RouteError("the gate has no layers yet; call gate.build(input_shape), gate.fit(x, ids) or train it "
                             "with learn_tickets first")
        if tuple(x.shape[1:]) != self.input_shape:
            raise DataError(f"the gate was built for inputs {self.input_shape}, got {tuple(x.shape[1:])}")
        if x.device != self.linear.weight.device:
            raise RouteError(f"the input is on {x.device} but the gate is on {self.linear.weight.device}; "
                             "call gate.to(device)")

    # ------------------------------------------------------------------ forward
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Ticket logits [B, K] (differentiable)."""
        x = _float_batch(x)
        self._check_ready(x)
        return self.linear(self.norm(pooled_features(x, pool=self.pool, bins=self.bins).float()))

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax ticket probabilities [B, K]."""
        return self.logits(x).softmax(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted ticket ids, LongTensor [B]."""
        return self.logits(x).argmax(1)

    # ------------------------------------------------------------------ stand-alone fit
    def fit(self, x: torch.Tensor, ticket_ids: torch.Tensor, *, epochs: int | None = None, seed: int = 0,
            lr: float = 1e-2, batch_size: int = 256) -> "Gate":
        """Cross-entropy on known ticket ids (the gate fitted after the tickets); Adam, ``epochs`` (100) passes,
        deterministic in ``seed``. Returns self in eval mode."""
        x = _float_batch(x)
        ids = _ticket_ids(ticket_ids, self.num_tickets, x.shape[0]).to(x.device)
        epochs = 100 if epochs is None else _pos_int(epochs, "epochs")
        batch_size = _pos_int(batch_size, "batch_size")
        if not _is_int(seed) or seed < 0:
            raise RouteError(f"seed must be a non-negative integer, got {seed!r}")
        self.build(tuple(x.shape[1:])).to(x.device)
        opt = torch.optim.Adam(self.linear.parameters(), lr=_pos_float(lr, "lr"))
        gen = torch.Generator().manual_seed(int(seed))
        n = x.shape[0]
        self.train()
        with torch.enable_grad():
            for _ in range(epochs):
                order = torch.randperm(n, generator=gen).to(x.device)
                for start in range(0, n, batch_size):
                    sel = order[start:start + batch_size]
                    loss = F.cross_entropy(self.logits(x[sel]), ids[sel])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        return self.eval()

    # ------------------------------------------------------------------ cost
    def flops_per_sample(self, input_shape) -> int:
        """Pooling adds (every input element once) + 2 x torch-pruning's MACs of the standardisation and linear
        layer on one sample + K (softmax / argmax)."""
        shape = sample_shape(input_shape)
        d = self.feature_dim(shape)
        head = nn.Sequential(nn.BatchNorm1d(d, affine=False), nn.Linear(d, self.num_tickets)).eval()
        macs = _tp.count_macs(head, torch.zeros(1, d))
        return int(math.prod(shape)) + int(2 * macs) + self.num_tickets

    def extra_repr(self) -> str:
        return f"num_tickets={self.num_tickets}, pool={self.pool}, bins={self.bins}, input_shape={self.input_shape}"


# --------------------------------------------------------------------------- training pieces


def straight_through_route(logits: torch.Tensor, *, tau: float = 1.0, gumbel: bool = True,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B], factor [B])``: ids = argmax of softmax((logits + Gumbel noise) / tau) (no noise with
    ``gumbel=False``); factor = p_id / p_id.detach(), value 1, gradient d/dlogits of the chosen probability.

    Multiply each sample's routed output by its factor: the task loss then moves the gate toward tickets whose
    output lowers it (straight-through Gumbel-softmax with hard one-hot routing)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise RouteError(f"logits must be a float tensor [B, K], got {getattr(logits, 'shape', type(logits).__name__)}")
    tau = _pos_float(tau, "tau")
    z = logits
    if gumbel:
        u = torch.rand(logits.shape, generator=generator).clamp_(1e-9, 1.0 - 1e-9).to(logits.device)
        z = logits - torch.log(-torch.log(u))
    probs = (z / tau).softmax(1)
    ids = probs.argmax(1)
    chosen = probs.gather(1, ids[:, None]).squeeze(1)
    return ids, chosen / chosen.detach()


def load_balance_loss(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance term ``K * sum_k f_k * P_k``: 1 when routing is uniform, K when one ticket
    takes every sample with certainty. ``probs`` [B, K] (softmax), ``ids`` [B] the hard routes."""
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        raise RouteError(f"probs must be [B, K], got {getattr(probs, 'shape', type(probs).__name__)}")
    K = probs.shape[1]
    ids = _ticket_ids(ids, K, probs.shape[0])
    share = torch.bincount(ids, minlength=K).to(probs.dtype) / max(1, ids.shape[0])
    return K * (share.detach() * probs.mean(0)).sum()


def routing_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean per-sample entropy of ``probs`` [B, K] (nats)."""
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        raise RouteError(f"probs must be [B, K], got {getattr(probs, 'shape', type(probs).__name__)}")
    return -(probs * probs.clamp_min(1e-12).log()).sum(1).mean()


def matched_accuracy(pred, true, num_tickets: int) -> tuple[float, list[int]]:
    """``(accuracy, matching)``: routing accuracy of ``pred`` against group ids ``true`` under the one-to-one
    ticket -> group matching that maximises it (``matching[ticket] = group``); exhaustive for K <= 8."""
    K = _pos_int(num_tickets, "num_tickets")
    pred, true = torch.as_tensor(pred).cpu(), torch.as_tensor(true).cpu()
    route_accuracy(pred, true)  # validates dtype, shape, non-empty
    pred, true = pred.long(), true.long()
    if K > 8:
        raise RouteError(f"matched_accuracy searches all K! matchings; K={K} is too many (at most 8)")
    G = max(K, int(true.max()) + 1)
    counts = torch.zeros(K, G, dtype=torch.long)
    counts.index_put_((pred.clamp(0, K - 1), true), torch.ones_like(pred), accumulate=True)
    best, match = -1, list(range(K))
    for perm in itertools.permutations(range(G), K):
        hit = int(sum(counts[t, g] for t, g in enumerate(perm)))
        if hit > best:
            best, match = hit, list(perm)
    return best / pred.numel(), match
