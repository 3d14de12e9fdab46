"""Baselines of the RTL paper, all from the same θ0 with equal training budgets (sample presentations).

* ``single_imp``: one mask, one model, ordinary shuffled batches over all data;
* ``single_imp_balanced``: one mask trained with the same subset-balanced batches as RTL (separates the
  effect of balanced sampling from the effect of separate masks);
* ``single_imp_context``: one mask whose model receives the context (ticket id) as an input, through a
  learned embedding concatenated to the input channels (the paper's INR baseline, for images);
* ``multi_imp``: K independent models, each IMP-pruned and retrained on its own subset, no sharing.

Loader helpers keep budgets equal: ``CyclicLoader`` yields exactly n batches per epoch (cycling),
``BalancedLoader`` yields RTL's balanced cyclic batches as one stream.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from rtl_plugin.errors import DataError
from rtl_plugin.training.retrain import apply_loss, balanced_cyclic_batches


class CyclicLoader:
    """Exactly ``n_batches`` batches per epoch from ``loader``, restarting it when exhausted."""

    def __init__(self, loader, n_batches: int):
        if n_batches < 1:
            raise DataError(f"n_batches must be >= 1, got {n_batches}.")
        if len(loader) == 0:
            raise DataError("CyclicLoader got an empty loader; it needs at least one batch.")
        self.loader = loader
        self.n_batches = int(n_batches)
        self._it = None

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self):
        for _ in range(self.n_batches):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                yield next(self._it)
            except StopIteration:
                self._it = iter(self.loader)
                yield next(self._it)


class BalancedLoader:
    """RTL's balanced cyclic batches (M batch indices x K subsets) as one stream, for a single-mask model.

    Same samples, same number of steps (M x K) and same batch size as RTL's joint retraining. With
    ``mix=True`` (default) the K batches of one batch index are pooled, shuffled and re-split into K
    batches, so every step sees a balanced mix of subsets: a single model has ONE set of BatchNorm
    statistics, and subset-pure batches would make its running statistics track the last subset seen
    (RTL's tickets each keep their own statistics, so they do not need this). With
    ``with_context=True`` each batch gets the subset id of each sample appended: ``(x, y, ctx)``.
    """

    def __init__(self, loaders: Mapping[int, object], *, with_context: bool = False, mix: bool = True,
                 seed: int = 0):
        if not loaders:
            raise DataError("BalancedLoader needs at least one subset loader.")
        self.loaders = dict(loaders)
        self.with_context = with_context
        self.mix = mix
        self._gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return max(len(dl) for dl in self.loaders.values()) * len(self.loaders)

    def _with_ctx(self, batch, k):
        x = batch[0]
        return (*batch, torch.full((x.shape[0],), k, dtype=torch.long))

    def __iter__(self):
        K = len(self.loaders)
        pending = []
        for _, k, batch in balanced_cyclic_batches(self.loaders):
            batch = self._with_ctx(batch, k) if (self.with_context or self.mix) else batch
            if not self.mix:
                yield batch
                continue
            pending.append(batch)
            if len(pending) < K:
                continue
            cols = [torch.cat([b[i] for b in pending]) for i in range(len(pending[0]))]
            perm = torch.randperm(cols[0].shape[0], generator=self._gen)
            cols = [c[perm] for c in cols]
            if not self.with_context:
                cols = cols[:-1]
            for chunk in zip(*(c.chunk(K) for c in cols)):
                yield tuple(chunk)
            pending = []


class ContextInputModel(nn.Module):
    """``base(cat(x, emb(ctx) broadcast over H, W))``: a single model that receives the context as input.

    Args:
        base: a model whose first layer accepts ``in_channels + embed_dim`` channels.
        num_contexts: K.
        embed_dim: size of the learned context embedding.
    """

    def __init__(self, base: nn.Module, num_contexts: int, embed_dim: int = 4):
        super().__init__()
        self.base = base
        self.embed = nn.Embedding(num_contexts, embed_dim)
        self.num_contexts = num_contexts

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        e = self.embed(ctx)
        e = e.view(e.shape[0], e.shape[1], *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return self.base(torch.cat([x, e], dim=1))


def context_train_step(loss_fn=None):
    """Train step for ``(x, y, ctx)`` batches and a model called as ``model(x, ctx)``."""
    import torch.nn.functional as F
    loss_fn = loss_fn or F.cross_entropy

    def step(model, batch, optimizer):
        x, y, ctx = batch[0], batch[1], batch[2]
        optimizer.zero_grad(set_to_none=True)
        return apply_loss(loss_fn(model(x, ctx), y), optimizer)
    return step

