"""Region-routed implicit neural representation (the paper's §4 image-fitting experiment).

An INR maps Fourier features of a pixel's (x, y) position to its RGB colour: ``INRMLP`` 34→128→128→128→128→3
(ReLU, 53,888 weights, all prunable). RTL finds one ticket per image region (pixels of region k are ticket
k's subset) and routes every pixel to its region's ticket; the single-mask IMP baseline gets the region as
an extra input through a learned embedding (as in the paper). ``run_inr(config)`` compares RTL, single IMP
and the dense model (optionally K independent models, "multi_imp") from the same θ0 with the same number of
pixel presentations and returns PSNRs. Measured results: ``benchmarks/RESULTS.md`` §5.

Per-pixel routing cost: pixels are batch items, so ``routed(features [N, 34], route=region_ids [N])``
buckets the batch by ticket (one argsort + index_select) and runs each ticket present in the batch once
with its masked weights: R forward passes of the MLP over disjoint pixel subsets (R = distinct regions in
the batch), i.e. the same multiply-adds as one dense pass over N pixels, plus the gather/scatter.
``run_inr`` measures it (``results["routing_cost"]``).
"""
from __future__ import annotations

import copy
import math
import platform
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from rtl_plugin import wrap
from rtl_plugin.comparison.baselines import ContextInputModel
from rtl_plugin.comparison.protocol import check_lr_and_sparsities, ComparisonConfig, ComparisonTask, Evaluation, SingleImpSetup, compare
from rtl_plugin.errors import DataError, MissingDependencyError, RouteError, SparsityError
from rtl_plugin.tasks.images import make_mosaic
from rtl_plugin.training.retrain import apply_loss, mixed_route_retrain

# --------------------------------------------------------------------------- encoding and model


def pixel_coords(height: int, width: int) -> torch.Tensor:
    """Pixel centres in row-major order: [H*W, 2] float32, columns (x, y) in [0, 1]."""
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 2:
            raise DataError(f"{name} must be an int >= 2 (pixels), got {v!r}.")
    ys, xs = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)


class FourierFeatures(nn.Module):
    """Gaussian random Fourier features of 2-D positions (Tancik et al. 2020), raw coordinates kept.

    ``gamma(v) = [v, sin(2π B v), cos(2π B v)]`` with ``B`` [F, 2] drawn once from N(0, scale²) (a fixed
    buffer, reproducible from ``seed``). With F = 16 frequencies the encoding is 2 + 2·16 = 34-d, the
    paper's input size.

    Args:
        num_frequencies: F >= 1.
        scale: standard deviation of the frequencies in cycles per unit of v (v in [0, 1]).
        seed: draws ``B``.
    Shapes: input [N, 2] (x, y in [0, 1]); output [N, 2 + 2F].
    """

    def __init__(self, num_frequencies: int = 16, scale: float = 6.0, seed: int = 0):
        super().__init__()
        if not isinstance(num_frequencies, int) or isinstance(num_frequencies, bool) or num_frequencies < 1:
            raise DataError(f"num_frequencies must be an int >= 1, got {num_frequencies!r}.")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
            raise DataError(f"scale must be a positive number (cycles per unit), got {scale!r}.")
        g = torch.Generator().manual_seed(int(seed))
        self.register_buffer("B", torch.randn(num_frequencies, 2, generator=g) * float(scale))
        self.num_frequencies = num_frequencies
        self.scale = float(scale)

    @property
    def out_features(self) -> int:
        return 2 + 2 * self.num_frequencies

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        if not isinstance(coords, torch.Tensor) or coords.dim() != 2 or coords.shape[1] != 2:
            shape = tuple(coords.shape) if isinstance(coords, torch.Tensor) else type(coords).__name__
            raise DataError(f"coords must be a tensor [N, 2] of (x, y) positions, got {shape}; "
                            "build them with pixel_coords(H, W).")
        if not coords.is_floating_point():
            raise DataError(f"coords must be floating point, got {coords.dtype}.")
        proj = 2 * math.pi * coords @ self.B.to(coords.dtype).t()
        return torch.cat([coords, torch.sin(proj), torch.cos(proj)], 1)

    def extra_repr(self) -> str:
        return f"num_frequencies={self.num_frequencies}, scale={self.scale}, out_features={self.out_features}"


class INRMLP(nn.Sequential):
    """MLP ``in_features → hidden x depth → out_features`` with ReLU (default 34→128→128→128→128→3).

    Shapes: input [N, in_features] (encoded positions), output [N, out_features] (RGB, unbounded; clamp to
    [0, 1] for display and PSNR).
    """

    def __init__(self, in_features: int = 34, hidden: int = 128, depth: int = 4, out_features: int = 3):
        for name, v, lo in (("in_features", in_features, 1), ("hidden", hidden, 1), ("depth", depth, 1),
                            ("out_features", out_features, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise DataError(f"{name} must be an int >= {lo}, got {v!r}.")
        layers: list[nn.Module] = []
        d = in_features
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        layers.append(nn.Linear(d, out_features))
        super().__init__(*layers)
        self.in_features, self.out_features = in_features, out_features


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of ``pred`` (clamped to [0, 1]) against ``target`` in [0, 1], same shape: 10·log10(1 / MSE)."""
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor) or pred.shape != target.shape:
        raise DataError(f"pred and target must be tensors of the same shape, got "
                        f"{getattr(pred, 'shape', type(pred).__name__)} and {getattr(target, 'shape', type(target).__name__)}.")
    if pred.numel() == 0:
        raise DataError("psnr of an empty tensor is undefined; pass at least one pixel.")
    mse = float(F.mse_loss(pred.detach().float().clamp(0, 1), target.detach().float()))
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


# --------------------------------------------------------------------------- loaders and steps


class PixelBatches:
    """Full-batch loader: yields ``(features, rgb)`` (and the region ids with ``with_region``) once per epoch.

    An INR sees every pixel of its subset at every step (``len() == 1``), so one epoch = one optimizer step.
    """

    def __init__(self, *tensors: torch.Tensor):
        if not tensors or any(t.shape[0] != tensors[0].shape[0] for t in tensors) or tensors[0].shape[0] == 0:
            raise DataError("PixelBatches needs non-empty tensors with the same first dimension.")
        self.tensors = tensors

    def __len__(self) -> int:
        return 1

    def __iter__(self):
        yield self.tensors


class MixedPixelBatches:
    """Single-model batches with RTL's budget: per epoch, all N pixels shuffled and split into ``n_batches``
    batches of ``(features, rgb, region)`` (RTL's joint retraining makes K steps over K regions per epoch)."""

    def __init__(self, feats: torch.Tensor, rgb: torch.Tensor, region: torch.Tensor, n_batches: int, seed: int = 0):
        if n_batches < 1 or n_batches > feats.shape[0]:
            raise DataError(f"n_batches must be in [1, {feats.shape[0]}], got {n_batches}.")
        self.feats, self.rgb, self.region = feats, rgb, region
        self.n_batches = int(n_batches)
        self._gen = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self):
        perm = torch.randperm(self.feats.shape[0], generator=self._gen).to(self.feats.device)
        for idx in perm.chunk(self.n_batches):
            yield self.feats[idx], self.rgb[idx], self.region[idx]


def mse_step(model: nn.Module, batch, optimizer) -> float:
    """Train step for ``(features [N, D], rgb [N, 3])`` batches: MSE, backward, optimizer step."""
    x, y = batch[0], batch[1]
    optimizer.zero_grad(set_to_none=True)
    return apply_loss(F.mse_loss(model(x), y), optimizer)


def context_mse_step(model: nn.Module, batch, optimizer) -> float:
    """Train step for ``(features, rgb, region)`` batches and a model called as ``model(features, region)``."""
    x, y, ctx = batch[0], batch[1], batch[2]
    optimizer.zero_grad(set_to_none=True)
    return apply_loss(F.mse_loss(model(x, ctx), y), optimizer)


def region_subsets(feats: torch.Tensor, rgb: torch.Tensor, regions: torch.Tensor) -> dict[int, PixelBatches]:
    """``{k: PixelBatches(features of region k, rgb of region k)}`` for k = 0..K-1 (ids must be 0..K-1)."""
    if regions.dim() != 1 or regions.shape[0] != feats.shape[0] or rgb.shape[0] != feats.shape[0]:
        raise DataError(f"features {tuple(feats.shape)}, rgb {tuple(rgb.shape)} and regions {tuple(regions.shape)} "
                        "must have one row per pixel.")
    K = int(regions.max()) + 1
    out = {}
    for k in range(K):
        idx = (regions == k).nonzero().flatten()
        if idx.numel() == 0:
            raise DataError(f"region {k} has no pixel; region ids must be 0..K-1 with every id present.")
        out[k] = PixelBatches(feats[idx], rgb[idx])
    return out


# --------------------------------------------------------------------------- the experiment


@dataclass
class INRConfig:
    """Settings of one region-routed INR run (defaults: the benchmark's 64x64, 4-region mosaic).

    Budget (pixel presentations are equal for every method): ticket search trains each ticket
    ``search_steps`` full-batch steps on its region per pruning round (rewinding to θ0 every round); joint
    retraining runs ``retrain_steps`` epochs (K steps, one per region). The single-mask models (single IMP
    and the dense model, which gets one retraining's budget) see all N pixels ``search_steps`` /
    ``retrain_steps`` times, split per epoch into ``single_batches``: "full" (one full-batch step per epoch:
    as many steps as each RTL ticket gets, the paper-style INR setting) or "per_region" (K batches of N/K
    shuffled pixels: as many optimizer steps as all RTL tickets together).
    """
    size: int = 64
    n_regions: int = 4
    image_seed: int = 0
    seed: int = 0                        # θ0 and Fourier frequencies
    num_frequencies: int = 16            # 2 + 2·16 = 34 input features
    fourier_scale: float = 6.0
    hidden: int = 128
    depth: int = 4
    embed_dim: int = 8                   # single IMP / dense: learned region embedding size
    single_batches: str = "full"         # "full" | "per_region" (see the class docstring)
    retrain_mode: str = "sequential_shared"  # RTL joint retraining: "sequential_shared" | "sequential" |
                                             # "mixed" (was "summed"; see RETRAIN_MODES)
    sparsities: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)
    prune_fraction: float = 0.5
    search_steps: int = 150
    retrain_steps: int = 300
    lr: float = 1e-3                     # Adam (the paper: 1e-2 over 10,000 steps; at our 150/300-step budget
                                         # 1e-2 made RTL's PSNR jump non-monotonically across sparsities)
    methods: tuple[str, ...] = ("rtl", "single_imp", "dense")  # + "multi_imp": K independent models
    figures_dir: str | None = None
    image_name: str | None = None        # label of a user image (results and figure file name)
    figure_sparsities: tuple[float, ...] = (0.5, 0.75, 0.9)
    cache_dir: str | None = None
    device: str = "cpu"
    progress: bool = False

    @classmethod
    def quick(cls, **kw) -> "INRConfig":
        """A seconds-long setting for tests and notebooks (24x24 mosaic, 3 regions, narrow MLP)."""
        base = dict(size=24, n_regions=3, hidden=32, sparsities=(0.5, 0.75), search_steps=8, retrain_steps=15,
                    lr=1e-2, figure_sparsities=(0.5, 0.75))
        base.update(kw)
        return cls(**base)

    def __post_init__(self):
        if self.retrain_mode == "summed":
            warnings.warn('INRConfig(retrain_mode="summed") is deprecated and will be removed in the next version; '
                          'use retrain_mode="mixed".', DeprecationWarning, stacklevel=3)
            self.retrain_mode = "mixed"


_METHODS = ("rtl", "single_imp", "dense", "multi_imp")

#: How RTL's tickets are retrained jointly (stage 2), all with the same pixel presentations per epoch:
#:
#: * ``"sequential_shared"`` (default): the paper's stage 2: per epoch K sequential optimizer steps, step k
#:   on region k's pixels with the update restricted to ticket k (``joint_retrain(per_ticket_state=False)``:
#:   weights ticket k does not own are restored after its step), ONE Adam optimizer for all tickets (the
#:   paper runs one Adam; it never mentions per-ticket state).
#: * ``"sequential"``: the same K sequential masked steps with one Adam state PER TICKET (``joint_retrain``'s
#:   default; what this module used before).
#: * ``"mixed"`` (was ``"summed"``): per epoch ONE optimizer step on all pixels, each routed to its ticket
#:   (``routed(features, route=region)``, one MSE over the image, one backward): a weight's gradient is the
#:   sum of the gradients of the tickets that own it (a ticket that does not own a weight multiplies it by
#:   0 in its forward, so it contributes no gradient); weights no ticket owns get zero gradient and, with
#:   Adam without weight decay, never move. As many optimizer steps as single IMP's full-batch steps.
#:
#: Why not ``"sequential"`` (measured, RESULTS.md §5): with per-ticket Adam state each ticket's update of a
#: shared weight is normalised by that ticket's own gradient history, so every ticket moves the shared
#: weights (86-91% of a ticket at 25% sparsity) by about ``lr`` per step in its own direction: K
#: uncoordinated full-size steps per epoch that fight, and denser tickets (more sharing) fit worse. One
#: shared Adam state normalises a shared weight by the gradients of all its owners and its momentum
#: averages them. ``"mixed"`` removes the fight too, with K times fewer optimizer steps (as many as
#: single IMP's full-batch steps); on this step-limited budget it fits less than ``"sequential_shared"``.
RETRAIN_MODES = ("mixed", "sequential", "sequential_shared")


def _validate_config(cfg: INRConfig) -> None:
    if not isinstance(cfg, INRConfig):
        raise DataError(f"run_inr needs an INRConfig, got {type(cfg).__name__}; e.g. run_inr(INRConfig.quick()).")
    for name in ("search_steps", "retrain_steps", "embed_dim"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise DataError(f"{name} must be an int >= 1, got {v!r}.")
    sps = check_lr_and_sparsities(cfg.lr, cfg.sparsities, why_above_zero="the dense model is reported separately")
    bad = [f for f in cfg.figure_sparsities if f not in sps]
    if bad:
        raise SparsityError(f"figure_sparsities {bad} are not in sparsities {sps}; pick from those.")
    if cfg.retrain_mode not in RETRAIN_MODES + ("summed",):  # "summed": the deprecated name of "mixed"
        raise DataError(f"retrain_mode must be one of {RETRAIN_MODES} (see inr.RETRAIN_MODES), got {cfg.retrain_mode!r}.")
    if cfg.single_batches not in ("full", "per_region"):
        raise DataError(f"single_batches must be 'full' (one full-batch step per epoch) or 'per_region' (K steps "
                        f"of N/K pixels per epoch), got {cfg.single_batches!r}.")
    unknown = [m for m in cfg.methods if m not in _METHODS]
    if unknown or not cfg.methods:
        raise DataError(f"methods must be a non-empty subset of {_METHODS}, got {tuple(cfg.methods)}.")
    if "multi_imp" in cfg.methods and "rtl" not in cfg.methods:
        raise DataError("multi_imp reuses RTL's ticket search (per-subset IMP masks); add 'rtl' to methods.")


def _context_model(cfg: INRConfig, base_state: dict, K: int) -> nn.Module:
    """Single-model INR with a learned region embedding; θ0 copied from the RTL model where shapes overlap
    (every hidden layer, and the first layer's columns for the 34 position features)."""
    torch.manual_seed(cfg.seed + 1)
    base = INRMLP(2 + 2 * cfg.num_frequencies + cfg.embed_dim, cfg.hidden, cfg.depth)
    sd = base.state_dict()
    with torch.no_grad():
        for k, v in base_state.items():
            if sd[k].shape == v.shape:
                sd[k].copy_(v)
            else:  # first layer: position columns from θ0, embedding columns freshly initialised
                sd[k][:, :v.shape[1]].copy_(v)
    base.load_state_dict(sd)
    return ContextInputModel(base, K, embed_dim=cfg.embed_dim)


def _median_ms(fn, reps: int) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``reps`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


@torch.no_grad()
def _routing_cost(routed, plain: nn.Module, feats: torch.Tensor, regions: torch.Tensor, reps: int = 5) -> dict:
    """Forward passes and wall time of one routed evaluation over all pixels vs one dense pass."""
    calls = []
    first = routed.model[0]
    h = first.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        routed(feats, route=regions)
    finally:
        h.remove()

    routed_ms = _median_ms(lambda: routed(feats, route=regions), reps)
    dense_ms = _median_ms(lambda: plain(feats), reps)
    return {"pixels": int(feats.shape[0]), "regions_present": int(regions.unique().numel()),
            "forward_passes": len(calls), "pixels_per_pass": calls, "routed_forward_ms": round(routed_ms, 3),
            "dense_forward_ms": round(dense_ms, 3), "ratio": round(routed_ms / max(dense_ms, 1e-9), 3)}


def summed_retrain(routed, feats: torch.Tensor, rgb: torch.Tensor, regions: torch.Tensor, *,
                   optimizer: torch.optim.Optimizer, epochs: int) -> list[float]:
    """Joint retraining of all tickets, one optimizer step per epoch on every pixel routed to its ticket.

    ``routed(feats, route=regions)`` runs each ticket once over its own pixels (masked weights), one MSE over
    all pixels, one backward, one ``optimizer.step()``: a shared weight gets the sum of its owners' gradients
    (pixel-weighted), a weight outside every ticket gets zero gradient. Returns the loss per epoch.

    This is :func:`training.mixed_route_retrain` with the whole image as one batch. Guarantee: entries that
    no ticket owns never change (restored after every step, so any optimizer is safe).
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise DataError(f"epochs must be an int >= 0, got {epochs!r}.")
    if regions.dim() != 1 or regions.shape[0] != feats.shape[0] or rgb.shape[0] != feats.shape[0]:
        raise DataError(f"features {tuple(feats.shape)}, rgb {tuple(rgb.shape)} and regions {tuple(regions.shape)} "
                        "must have one row per pixel.")
    return mixed_route_retrain(routed, [(feats, rgb, regions)], optimizer=optimizer, epochs=epochs,
                               loss_fn=F.mse_loss, progress=False)["loss"]


def _check_image(image: torch.Tensor, regions) -> None:
    """A user image [3, H, W] in [0, 1] and its region map [H, W] of ids 0..K-1 (every id present)."""
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise DataError(f"image must be a float tensor [3, H, W] in [0, 1], got "
                        f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}.")
    if not bool(torch.isfinite(image).all()) or float(image.min()) < 0 or float(image.max()) > 1:
        raise DataError("image values must be finite and in [0, 1]; scale it (e.g. uint8 / 255).")
    if not isinstance(regions, torch.Tensor) or regions.shape != image.shape[1:]:
        raise RouteError(f"regions must be an integer tensor [H, W] matching the image {tuple(image.shape[1:])}, "
                         f"got {tuple(regions.shape) if isinstance(regions, torch.Tensor) else type(regions).__name__}.")
    if regions.is_floating_point() or regions.dtype == torch.bool:
        raise RouteError(f"regions must have an integer dtype, got {regions.dtype}; use regions.long().")
    ids = regions.unique()
    if int(ids.min()) < 0 or ids.tolist() != list(range(int(ids.max()) + 1)):
        raise RouteError(f"region ids must be 0..K-1 with every id present, got {ids.tolist()}.")


class INRTask(ComparisonTask):
    """The region-routed INR's pieces of the comparison protocol: one ticket per image region over a Fourier-feature
    MLP, full-batch MSE steps, PSNR; single IMP and the dense model get the region as a learned-embedding input."""
    name = "inr_regions"

    def __init__(self, cfg: INRConfig, image: torch.Tensor, regions: torch.Tensor, sources):
        self.cfg, self.image, self.sources = cfg, image, sources
        self.dev = dev = torch.device(cfg.device)
        self.t_start = time.perf_counter()
        self.regions = regions.long()
        self.H, self.W = image.shape[1:]
        self.K = int(self.regions.max()) + 1
        torch.manual_seed(cfg.seed)
        enc = FourierFeatures(cfg.num_frequencies, cfg.fourier_scale, seed=cfg.seed)
        self.feats = enc(pixel_coords(self.H, self.W)).to(dev)
        self.rgb = image.permute(1, 2, 0).reshape(-1, 3).to(dev)
        self.reg = self.regions.reshape(-1).to(dev)
        self.subsets = region_subsets(self.feats, self.rgb, self.reg)
        self.theta0 = copy.deepcopy(self._mlp().state_dict())
        # single IMP and dense: per round / epoch all pixels in K batches (or one) = RTL's K per-region steps
        self.mixed = MixedPixelBatches(self.feats, self.rgb, self.reg, 1 if cfg.single_batches == "full" else self.K,
                                       seed=cfg.seed)
        self.train_step = mse_step
        self.recon: dict[tuple[str, float], torch.Tensor] = {}
        self.routing_cost = None
        self.num_single_weights = None

    def _mlp(self) -> INRMLP:
        torch.manual_seed(self.cfg.seed)
        return INRMLP(self.feats.shape[1], self.cfg.hidden, self.cfg.depth).to(self.dev)

    def _evaluate(self, method: str, sparsity: float, fn, **extras) -> Evaluation:
        """PSNR over the image and per region of ``fn()`` (RGB per pixel); keeps the reconstruction."""
        with torch.no_grad():
            out = fn().float().clamp(0, 1)
        per = [round(psnr(out[self.reg == k], self.rgb[self.reg == k]), 4) for k in range(self.K)]
        value = round(psnr(out, self.rgb), 4)
        self.recon[(method, sparsity)] = out.reshape(self.H, self.W, 3).permute(2, 0, 1).cpu()
        return Evaluation("context", {"psnr": value}, {"psnr": value, "psnr_per_region": per}, **extras)

    def ticket_loaders(self) -> dict:
        return self.subsets

    def mixed_retrain_loader(self):
        """One batch of every pixel routed to its region's ticket: one optimizer step per epoch ("mixed")."""
        return [(self.feats, self.rgb, self.reg)]

    def build_routed(self, num_tickets: int):
        return wrap(self._mlp(), num_tickets, example_inputs=self.feats[:2], output_layers=[])

    def evaluate_rtl(self, routed, tickets, sparsity: float) -> list[Evaluation]:
        evaluation = self._evaluate("rtl", sparsity, lambda: routed(self.feats, route=self.reg))
        if sparsity == max(self.cfg.sparsities):
            plain = INRMLP(self.feats.shape[1], self.cfg.hidden, self.cfg.depth).to(self.dev).eval()
            self.routing_cost = _routing_cost(routed, plain, self.feats, self.reg)
        return [evaluation]

    def multi_imp_output(self, model, k: int) -> torch.Tensor:
        with torch.no_grad():
            return model(self.feats[self.reg == k], route=0)

    def evaluate_multi(self, outputs: list, sparsity: float) -> Evaluation:
        out = torch.zeros_like(self.rgb)
        for k, part in enumerate(outputs):
            out[self.reg == k] = part
        return self._evaluate("multi_imp", sparsity, lambda: out)

    def single_imp_setup(self, method: str) -> SingleImpSetup:
        model = _context_model(self.cfg, self.theta0, self.K).to(self.dev)
        example = (self.feats[:2], torch.zeros(2, dtype=torch.long, device=self.dev))
        routed = wrap(model, 1, example_inputs=example, adapter="generic", output_layers=[], ignored_layers=["embed"])
        self.num_single_weights = routed.space.num_weights
        return SingleImpSetup(routed, self.mixed, len(self.mixed), len(self.mixed), context_mse_step)

    def evaluate_single(self, routed, method: str, tickets, sparsity: float) -> Evaluation:
        return self._evaluate("single_imp", sparsity, lambda: routed(self.feats, self.reg, route=0))

    def train_dense(self) -> Evaluation:
        dense = _context_model(self.cfg, self.theta0, self.K).to(self.dev)
        opt = torch.optim.Adam(dense.parameters(), lr=self.cfg.lr)
        dense.train()
        for _ in range(self.cfg.retrain_steps):
            for batch in self.mixed:
                context_mse_step(dense, batch, opt)
        dense.eval()
        params = sum(m.weight.numel() for m in dense.base if isinstance(m, nn.Linear))
        return self._evaluate("dense", 0.0, lambda: dense(self.feats, self.reg), params=params)

    def describe(self, results: dict) -> dict:
        cfg, K, H, W = self.cfg, self.K, self.H, self.W
        table: dict = {}
        for r in results["rows"]:
            if r["method"] == "dense":
                table["dense"] = r["psnr"]
            else:
                table.setdefault(r["method"], {})[r["sparsity"]] = r["psnr"]
        rtl_steps = cfg.retrain_steps * (1 if cfg.retrain_mode in ("summed", "mixed") else K)
        return {
            "task": "inr_regions", "dataset": "mosaic" if self.sources is not None else "user",
            "model": f"inr:mlp(hidden={cfg.hidden},depth={cfg.depth})", "granularity": "weight", "seed": cfg.seed,
            "image": {"source": "mosaic" if self.sources is not None else "user", "name": cfg.image_name,
                      "seed": cfg.image_seed, "size": [H, W], "n_regions": K, "sources": self.sources,
                      "region_pixels": [int(v) for v in torch.bincount(self.reg.cpu(), minlength=K)]},
            "encoding": {"kind": "gaussian_fourier", "num_frequencies": cfg.num_frequencies,
                         "scale": cfg.fourier_scale, "features": int(self.feats.shape[1])},
            "prunable_weights": {"rtl": results["prunable_weights"], "single_imp": self.num_single_weights},
            "psnr": table, "routing_cost": self.routing_cost,
            "budget": {"pixel_presentations_search_per_round": cfg.search_steps * H * W,
                       "pixel_presentations_retrain": cfg.retrain_steps * H * W,
                       "optimizer_steps_retrain": {"rtl_mode": cfg.retrain_mode, "rtl_total": rtl_steps,
                                                   "single": cfg.retrain_steps * len(self.mixed)}},
            "total_time_s": round(time.perf_counter() - self.t_start, 3),
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpu_threads": torch.get_num_threads(), "device": str(self.dev)}}

    def plot(self, results: dict, out_dir: Path) -> list[str]:
        return plot_reconstructions(self.image, self.regions, self.recon, results["psnr"],
                                    replace(self.cfg, figures_dir=str(out_dir)))


def comparison_config(cfg: INRConfig) -> ComparisonConfig:
    """The protocol's settings of an INR run. Methods: RTL, then multi-model IMP (it reuses RTL's masks), single
    IMP and dense (they share one stream of shuffled pixel batches, in this order)."""
    methods = tuple(m for m in ("rtl", "multi_imp", "single_imp", "dense") if m in cfg.methods)
    mixed = cfg.retrain_mode in ("summed", "mixed")
    return ComparisonConfig(sparsities=tuple(sorted(float(s) for s in cfg.sparsities)), methods=methods,
                            prune_fraction=cfg.prune_fraction, epochs_per_round=cfg.search_steps,
                            retrain_epochs=cfg.retrain_steps, lr=cfg.lr,
                            per_ticket_state=cfg.retrain_mode == "sequential",
                            retrain_mode="mixed" if mixed else "sequential", equal_storage=False,
                            device=torch.device(cfg.device), progress=cfg.progress)


def run_inr(config: INRConfig | None = None, out_dir: str | Path | None = None, *, image: torch.Tensor | None = None,
            regions: torch.Tensor | None = None) -> dict:
    """Fit one image with RTL (one ticket per region), single IMP (region embedding input) and a dense model.

    Args:
        config: an :class:`INRConfig` (default: the benchmark setting).
        out_dir: optional run folder: ``results.json`` and the reconstruction figure go there.
        image: optional RGB image [3, H, W] in [0, 1]; default ``make_mosaic(image_seed, n_regions, size)``.
        regions: its region map [H, W] (int, ids 0..K-1, every id present); required with ``image``.
    Returns:
        the results dict (stable schema: rows with ``metrics: {psnr}``) plus ``psnr`` ({"rtl": {sparsity: dB},
        "single_imp": {...}, "dense": dB, "multi_imp": {...} when asked}), per-row ``psnr`` and
        ``psnr_per_region``, ``similarity``, ``routing_cost``, ``figures`` (paths, when ``figures_dir`` is set),
        image info, the config, and ``reconstructions`` ({(method, sparsity): image [3, H, W] in [0, 1]}; tuple
        keys: drop it before ``json.dump``).
    """
    cfg = INRConfig() if config is None else config
    _validate_config(cfg)
    if "rtl" not in cfg.methods:
        raise DataError(f"methods must include 'rtl' (the comparison is RTL against its baselines), got "
                        f"{tuple(cfg.methods)}.")
    sources = None
    if image is None:
        if regions is not None:
            raise DataError("regions= was given without image=; pass both or neither.")
        image, regions, sources = make_mosaic(cfg.image_seed, cfg.n_regions, cfg.size, cache_dir=cfg.cache_dir,
                                              return_sources=True)
    else:
        _check_image(image, regions)
    task = INRTask(cfg, image, regions, sources)
    results = compare(task, comparison_config(cfg), out_dir)
    if out_dir is None:
        results["figures"] = (plot_reconstructions(image, task.regions, task.recon, results["psnr"], cfg)
                              if cfg.figures_dir else [])
    results["reconstructions"] = task.recon
    return results


def plot_reconstructions(image: torch.Tensor, regions: torch.Tensor, recon: dict, table: dict,
                         cfg: INRConfig) -> list[str]:
    """Target, region map and RTL / single-IMP reconstructions at ``cfg.figure_sparsities``; returns the PNG path."""
    from pathlib import Path
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingDependencyError('figures need matplotlib: pip install "rtl-plugin[plots]"') from e
    methods = [m for m in ("rtl", "single_imp") if any(k[0] == m for k in recon)]
    fs = [float(s) for s in cfg.figure_sparsities]
    ncol = 1 + len(fs)
    nrow = max(len(methods), 1) + ("dense" in table)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.2 * ncol, 2.3 * nrow), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(image.permute(1, 2, 0).cpu().numpy())
    axes[0, 0].set_title("target", fontsize=9)
    if nrow > 1:
        axes[1, 0].imshow(regions.cpu().numpy(), cmap="tab10", interpolation="nearest")
        axes[1, 0].set_title(f"{int(regions.max()) + 1} regions", fontsize=9)
    label = {"rtl": "RTL", "single_imp": "single IMP"}
    for i, m in enumerate(methods):
        for j, s in enumerate(fs):
            if (m, s) in recon:
                axes[i, j + 1].imshow(recon[(m, s)].permute(1, 2, 0).numpy())
                axes[i, j + 1].set_title(f"{label[m]} {int(round(s * 100))}%: {table[m][s]:.1f} dB", fontsize=9)
    if "dense" in table:
        axes[-1, 1].imshow(recon[("dense", 0.0)].permute(1, 2, 0).numpy())
        axes[-1, 1].set_title(f"dense: {table['dense']:.1f} dB", fontsize=9)
    fig.tight_layout()
    out = Path(cfg.figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = (f"inr_{cfg.image_name}" if cfg.image_name else f"inr_mosaic_s{cfg.image_seed}") + \
        f"_n{int(regions.max()) + 1}_{image.shape[1]}px"
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)
    path = out / f"{safe}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


__all__ = ["FourierFeatures", "INRMLP", "INRConfig", "RETRAIN_MODES", "run_inr", "summed_retrain", "pixel_coords", "psnr", "region_subsets",
           "mse_step", "context_mse_step", "plot_reconstructions"]
