"""Group ids from k-means clusters of a frozen dense model's features, for new inputs too.

:func:`~rtl_plugin.routing.partition.by_kmeans` partitions a fixed set of samples. Training loops that see
batches (e.g. :func:`~rtl_plugin.training.learned.learn_tickets` with ``routing="groups"``) need the group of any
input: :class:`FeatureClusters` keeps the partition's centroids and assigns every input to the nearest one, in
the same :func:`~rtl_plugin.routing.partition.embed` feature space. The embedding model is a private frozen copy,
so training the model the clusters came from does not move the groups.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from rtl_plugin.errors import DataError
from rtl_plugin.routed import RoutedModel
from rtl_plugin.routing.partition import Partition, by_kmeans, embed

__all__ = ["FeatureClusters"]


class FeatureClusters:
    """``groups(x) -> LongTensor [B]``: the nearest k-means centroid of ``embed(model, x)``.

    Build it with :meth:`fit`. Attributes: ``partition`` (the k-means :class:`Partition` of the fitted samples),
    ``centroids`` float32 [K, D], ``num_groups`` K.
    """

    def __init__(self, model: nn.Module, centroids: torch.Tensor, partition: Partition):
        if not isinstance(model, nn.Module) or isinstance(model, RoutedModel):
            raise DataError("FeatureClusters needs a dense nn.Module (the pretrained model or "
                            f"routed.plain_copy(k)), got {type(model).__name__}.")
        if not isinstance(centroids, torch.Tensor) or centroids.dim() != 2 or centroids.shape[0] < 1:
            raise DataError(f"centroids must be a float tensor [K, D], got {getattr(centroids, 'shape', centroids)}.")
        self.model = model.eval()
        self.centroids = centroids.float().cpu()
        self.partition = partition
        self.num_groups = int(centroids.shape[0])

    @classmethod
    def fit(cls, model: nn.Module, x: torch.Tensor, num_groups: int, *, seed: int = 0, y=None,
            class_names=None) -> "FeatureClusters":
        """K-means (``num_groups`` clusters, ``seed``) of ``embed(model, x)``; ``y`` only records the clusters'
        class composition. ``model`` is deep-copied and frozen."""
        if isinstance(model, RoutedModel):
            raise DataError("FeatureClusters.fit needs the dense model; pass routed.plain_copy(0) or the "
                            "pretrained model, not the RoutedModel.")
        if not isinstance(model, nn.Module):
            raise DataError(f"model must be an nn.Module, got {type(model).__name__}.")
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        features = embed(frozen, x)
        part = by_kmeans(features, num_groups, seed=seed, y=y, class_names=class_names)
        centroids = torch.stack([features[part.assignment == k].mean(0) for k in range(part.num_tickets)])
        return cls(frozen, centroids, part)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 or x.shape[0] == 0:
            raise DataError(f"x must be a non-empty float batch [B, ...], got {getattr(x, 'shape', type(x))}.")
        features = embed(self.model, x)
        if features.shape[1] != self.centroids.shape[1]:
            raise DataError(f"the inputs embed to {features.shape[1]} features, the centroids have "
                            f"{self.centroids.shape[1]}; pass inputs shaped like the ones the clusters were fit on.")
        return torch.cdist(features, self.centroids).argmin(1).to(x.device)

    def __repr__(self) -> str:
        return f"FeatureClusters(num_groups={self.num_groups}, dim={self.centroids.shape[1]})"
