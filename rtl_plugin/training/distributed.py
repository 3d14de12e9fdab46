"""Ticket-synchronous data parallelism with ``torch.distributed`` (``torchrun --nproc_per_node N``).

At every step all ranks train the SAME ticket on disjoint shards of that ticket's global batch, so the
averaged gradient is one ticket's masked update, exactly as in one process with the same global batch:

* data: :func:`shard_loader` gives each rank a contiguous slice of every global batch. For a standard
  ``DataLoader`` the batch sampler is sharded (rank 0's index list of each batch is broadcast, each rank
  loads only its slice); other loaders (wrappers yielding batches) are iterated on every rank and each
  batch is sliced along dim 0, with a per-batch check that all ranks saw the same global batch.
* gradients: :func:`ticket_views` runs the ticket through ``torch.nn.parallel.DistributedDataParallel``
  wrapped around the whole ``RoutedModel`` (the ticket id travels as the ``route=`` keyword, so one DDP
  serves every ticket; ``functional_call``'s masked weights are products with the real parameters, so
  DDP's gradient hooks fire on them). DDP averages over ranks; when the shards of a batch are unequal
  (a last batch not divisible by the world size) the output gradient of each rank is scaled by
  ``n_rank * world / n_global`` so the result is the mean over the global batch, as in one process
  (exact for losses that are a mean over samples, like the default cross-entropy step). A NaN/inf output
  on any rank stops every rank with the same error.
* norms: batch statistics are synchronised (SyncBatchNorm semantics) by intercepting
  ``torch.nn.functional.batch_norm`` while a ticket view trains: mean and variance are those of the
  global batch (gathered from every rank, with autograd), so every rank normalises with the statistics one process would use
  and the per-ticket running statistics (``RoutedBatchNorm``'s row of ticket k) stay identical on all
  ranks. Works for any BatchNorm subclass that calls ``F.batch_norm`` (timm's ``BatchNormAct2d``). Each
  layer costs one all-gather of per-rank (count, mean, variance) forward and one all-reduce backward.
* masks and weights: :func:`prepare` broadcasts rank 0's weights, buffers, masks and RNG states at the
  start of a search or a retraining; every pruning round's masks are broadcast from rank 0
  (:func:`broadcast_masks`), so ranks cannot drift.
* checkpoints: :func:`on_main_process` runs the write on rank 0 only, between barriers; any rank can
  load the result, and a one-process run loads it too.

Not supported (a clear :class:`~rtl_plugin.errors.DistributedError`): FSDP (``FullyShardedDataParallel``
or ``fully_shard``), tensor-parallel ``DTensor`` parameters, and models already wrapped in DDP: pass the
plain model; rtl-plugin wraps it itself. Outside ``torch.distributed`` (or with one process) every helper
is a no-op, so the training code is the same in both cases.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, IterableDataset

from rtl_plugin.errors import DataError, DistributedError, RTLError
from rtl_plugin.persist.checkpoint import loader_generators
from rtl_plugin.routed import RoutedModel

__all__ = ["is_distributed", "rank", "world_size", "is_main_process", "barrier", "init_from_env", "shutdown",
           "launched_by_torchrun", "check_not_sharded", "shard_loader", "prepare", "ticket_view", "ticket_views",
           "broadcast_masks", "broadcast_state", "all_mean", "any_rank", "on_main_process", "local_device",
           "ShardedBatchSampler", "SlicedLoader", "SyncBatchNormMode", "DistributedTicketView", "DDP_OPTIONS",
           "mixed_route_view", "DistributedMixedRouteView"]


# ----------------------------------------------------------------------------- process group helpers
def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 outside torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a plain single process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    """True when the environment of ``torchrun`` (RANK, WORLD_SIZE, MASTER_ADDR) is present."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(device: str = "cpu") -> bool:
    """Initialise the default process group from torchrun's environment; True when this call created it.

    Backend: ``nccl`` when ``device`` is a CUDA device (each rank then uses ``cuda:LOCAL_RANK``), else
    ``gloo``. Returns False (and does nothing) without torchrun's variables or when a group already exists.
    """
    if not isinstance(device, str):
        raise DistributedError(f"device must be a string like 'cpu' or 'cuda', got {type(device).__name__}.")
    if not launched_by_torchrun() or not dist.is_available() or dist.is_initialized():
        return False
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise DistributedError("--device cuda was given under torchrun but CUDA is not available; use "
                                   "--device cpu (gloo backend) or run on a GPU machine.")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"could not initialise torch.distributed from torchrun's environment ({e}); "
                               "check MASTER_ADDR/MASTER_PORT and that every rank was started.") from e
    return True


def local_device(device: str) -> str:
    """``cuda`` under torchrun means this rank's GPU ``cuda:LOCAL_RANK``; other devices are unchanged."""
    if not isinstance(device, str):
        raise DistributedError(f"device must be a string like 'cpu' or 'cuda', got {type(device).__name__}.")
    if device.startswith("cuda:") and is_distributed():
        raise DistributedError(f"--device {device} would put every rank on the same GPU; under torchrun use "
                               "--device cuda (rank r uses cuda:LOCAL_RANK) and CUDA_VISIBLE_DEVICES to pick GPUs.")
    if device == "cuda" and is_distributed():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def shutdown() -> None:
    """Destroy the default process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- wrapper checks
def _unsupported_wrapper(model: nn.Module) -> str | None:
    kinds = [(DistributedDataParallel, "DistributedDataParallel"), (DataParallel, "DataParallel")]
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        kinds.append((FullyShardedDataParallel, "FSDP (FullyShardedDataParallel)"))
    except ImportError:  # pragma: no cover - builds without distributed
        pass
    try:
        from torch.distributed.fsdp import FSDPModule
        kinds.append((FSDPModule, "FSDP (fully_shard)"))
    except ImportError:  # pragma: no cover - older torch
        pass
    for m in model.modules():
        for cls, name in kinds:
            if isinstance(m, cls):
                return name
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return None
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return "DTensor (tensor/FSDP2-sharded) parameters"
    return None


def check_not_sharded(model: nn.Module) -> None:
    """Raise :class:`DistributedError` when ``model`` is (or contains) a DDP/DataParallel/FSDP wrapper or
    DTensor-sharded parameters: rtl-plugin needs the plain, unsharded model and does the wrapping itself."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    kind = _unsupported_wrapper(model)
    if kind is None:
        return
    if kind.startswith("FSDP") or kind.startswith("DTensor"):
        raise DistributedError(f"the model is wrapped with {kind}, which rtl-plugin does not support yet (masks and "
                               "ticket search need every rank to hold the full weights). Pass the plain model to "
                               "rtl.wrap and launch with torchrun: ticket search and joint retraining then run "
                               "data-parallel (DDP) by themselves.")
    raise DistributedError(f"the model is wrapped in {kind}; pass the plain model (model.module) to rtl.wrap. "
                           "Under torchrun, find_tickets and joint_retrain wrap the RoutedModel in DDP themselves.")


# ----------------------------------------------------------------------------- collectives
def broadcast_state(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``module`` (in place)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"broadcast_state needs an nn.Module, got {type(module).__name__}.")
    if not is_distributed():
        return
    dev = _comm_device()
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            buf = t.detach().to(dev)
            dist.broadcast(buf, 0)
            if buf.data_ptr() != t.data_ptr():
                t.copy_(buf)


def broadcast_masks(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's boolean masks ``{name: BoolTensor}`` on every rank (one collective); returns new tensors."""
    if not isinstance(masks, dict) or not all(isinstance(m, torch.Tensor) for m in masks.values()):
        raise DistributedError("broadcast_masks expects a dict {name: BoolTensor}.")
    if not is_distributed() or not masks:
        return masks
    names = sorted(masks)
    dev = _comm_device()
    flat = torch.cat([masks[n].detach().reshape(-1).to(device=dev, dtype=torch.uint8) for n in names])
    dist.broadcast(flat, 0)
    out, off = {}, 0
    for n in names:
        m = masks[n]
        out[n] = flat[off:off + m.numel()].view(m.shape).to(device=m.device, dtype=torch.bool)
        off += m.numel()
    return {n: out[n] for n in masks}


def _broadcast_tickets(routed) -> None:
    masks = broadcast_masks(dict(routed.tickets.masks))
    with torch.no_grad():
        for n, m in routed.tickets.masks.items():
            m.copy_(masks[n])
    routed.masks_changed()


def all_mean(value):
    """Mean over ranks of a float or a list of floats (unchanged with one process)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, list, tuple)):
        raise DistributedError(f"all_mean expects a number or a list of numbers, got {type(value).__name__}.")
    if not is_distributed():
        return value
    vals = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]
    t = torch.tensor(vals, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    out = (t / world_size()).tolist()
    return out if isinstance(value, (list, tuple)) else out[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (keeps stop decisions in lockstep)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _same_on_all_ranks(obj, what: str) -> None:
    """Raise DistributedError on every rank when ``obj`` (JSON-able) differs between ranks."""
    h = int.from_bytes(hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).digest()[:7], "big")
    t = torch.tensor([h, -h], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != h or int(t[1]) != -h:
        raise DistributedError(f"the ranks disagree on {what}; every rank must build the same model, tickets and "
                               "data (same seed, same dataset, same batch size).")


def on_main_process(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` on rank 0 only (e.g. a checkpoint write), between barriers.

    Every rank waits until the write is complete; if it fails on rank 0, every rank raises (rank 0 the
    original exception, the others a DistributedError), so no rank hangs. Returns fn's result on rank 0.
    """
    if not callable(fn):
        raise DistributedError(f"on_main_process needs a callable, got {type(fn).__name__}.")
    if not is_distributed():
        return fn(*args, **kwargs)
    dist.barrier()  # nobody still reads the previous checkpoint
    result, err = None, None
    if rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - reported to every rank, re-raised below
            err = e
    flag = torch.tensor([0 if err is None else 1], dtype=torch.int64, device=_comm_device())
    dist.broadcast(flag, 0)
    if err is not None:
        raise err
    if flag.item():
        raise DistributedError("rank 0 failed while writing a checkpoint (see rank 0's error); stopping every rank.")
    return result


# ----------------------------------------------------------------------------- data sharding
def _split_sizes(n: int, world: int) -> list[int]:
    return [n // world + (1 if r < n % world else 0) for r in range(world)]


class ShardedBatchSampler:
    """A batch sampler giving this rank a contiguous slice of every global batch of ``inner``.

    Every rank draws each batch from ``inner`` (so its generators stay in lockstep with one process), and
    rank 0's index list is broadcast, so all ranks shard the same global batch. A global batch smaller than the world
    size raises :class:`DataError` (use ``drop_last=True`` or a larger batch).
    """

    def __init__(self, inner, rank_: int, world: int):
        if not hasattr(inner, "__iter__") or not hasattr(inner, "__len__"):
            raise DataError("ShardedBatchSampler needs a batch sampler with __iter__ and __len__.")
        if not (isinstance(world, int) and world >= 1 and isinstance(rank_, int) and 0 <= rank_ < world):
            raise DistributedError(f"invalid rank {rank_!r} for world size {world!r}.")
        self.inner = inner
        self.rank = rank_
        self.world = world
        self.sampler = getattr(inner, "sampler", None)  # where checkpoints find the shuffling generator
        self.generator = getattr(inner, "generator", None)  # ... or here (a batch sampler that shuffles itself)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        # one global batch at a time, exactly as far as the loader asks: the inner sampler's RNG draws (and so
        # the shuffling of later epochs) are the same as in one process
        dev = _comm_device()
        it = iter(self.inner)
        while True:
            bad, idx = None, []
            try:
                idx = [int(i) for i in next(it)]
                status = 1
            except StopIteration:
                status = 0
            except (TypeError, ValueError) as e:
                status, bad = -1, e
            header = torch.tensor([status, len(idx)], dtype=torch.int64, device=dev)
            dist.broadcast(header, 0)
            status, n = int(header[0]), int(header[1])
            if status < 0:
                raise DataError(f"the batch sampler must yield lists of integer dataset indices to be sharded across "
                                f"ranks ({bad or 'rank 0 failed'}); use a map-style dataset.")
            if status == 0:
                return
            buf = torch.tensor(idx if self.rank == 0 else [0] * n, dtype=torch.int64, device=dev)
            dist.broadcast(buf, 0)
            if n < self.world:
                raise DataError(f"a global batch of {n} samples cannot be split over {self.world} ranks; use "
                                f"drop_last=True or a batch size of at least {self.world}.")
            sizes = _split_sizes(n, self.world)
            start = sum(sizes[:self.rank])
            yield buf[start:start + sizes[self.rank]].cpu().tolist()


def _slice_batch(batch, start: int, stop: int, size: int):
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() and batch.shape[0] == size else batch
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_slice_batch(b, start, stop, size) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice_batch(b, start, stop, size) for b in batch)
    if isinstance(batch, dict):
        return type(batch)({k: _slice_batch(v, start, stop, size) for k, v in batch.items()})
    return batch


def _first_tensor(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    vals = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for v in vals:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


class SlicedLoader:
    """Fallback for loaders that are not plain DataLoaders: every rank iterates ``loader`` and keeps its
    slice (dim 0) of each batch. Checks per batch that all ranks saw the same global batch (seed the
    loader's randomness identically on every rank)."""

    def __init__(self, loader, rank_: int, world: int):
        try:
            len(loader)
        except TypeError:
            raise DataError("a loader sharded across ranks needs __len__ (balanced cyclic batching needs it).") from None
        self.loader = loader
        self.rank = rank_
        self.world = world

    def __len__(self) -> int:
        return len(self.loader)

    # where checkpoints look for the shuffling generators
    generator = property(lambda self: getattr(self.loader, "generator", None))
    sampler = property(lambda self: getattr(self.loader, "sampler", None))
    batch_sampler = property(lambda self: getattr(self.loader, "batch_sampler", None))

    def __iter__(self):
        for batch in self.loader:
            t = _first_tensor(batch)
            if t is None:
                raise DataError("a batch holds no tensor; cannot shard it across ranks.")
            n = int(t.shape[0]) if t.dim() else 1
            probe = torch.tensor([float(n), float(t.detach().double().nan_to_num().sum())], dtype=torch.float64)
            both = torch.cat([probe, -probe]).to(_comm_device())
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            both = both.cpu()
            if not (torch.equal(both[:2], probe) and torch.equal(-both[2:], probe)):
                raise DataError("the ranks' loaders yield different batches; seed their shuffling identically on every "
                                "rank (e.g. DataLoader(..., generator=torch.Generator().manual_seed(0))).")
            if n < self.world:
                raise DataError(f"a global batch of {n} samples cannot be split over {self.world} ranks; use "
                                f"drop_last=True or a batch size of at least {self.world}.")
            sizes = _split_sizes(n, self.world)
            start = sum(sizes[:self.rank])
            yield _slice_batch(batch, start, start + sizes[self.rank], n)


def shard_loader(loader):
    """This rank's view of ``loader``: a disjoint contiguous slice of every global batch (same batch count on
    every rank, so balanced cyclic batching stays in lockstep). Returns ``loader`` unchanged outside
    torch.distributed. A ``DataLoader`` over a map-style dataset is rebuilt with a
    :class:`ShardedBatchSampler` (each rank loads only its samples); any other loader is sliced."""
    if not is_distributed():
        return loader
    if isinstance(loader, (_ShardedDataLoader, SlicedLoader)):
        return loader
    r, w = rank(), world_size()
    if isinstance(loader, DataLoader) and loader.batch_sampler is not None \
            and not isinstance(loader.dataset, IterableDataset):
        kw = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                  timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                  multiprocessing_context=loader.multiprocessing_context if loader.num_workers else None,
                  persistent_workers=loader.persistent_workers)
        if loader.num_workers:
            kw["prefetch_factor"] = loader.prefetch_factor
        if getattr(loader, "pin_memory_device", ""):
            kw["pin_memory_device"] = loader.pin_memory_device
        out = _ShardedDataLoader(loader.dataset, batch_sampler=ShardedBatchSampler(loader.batch_sampler, r, w), **kw)
        return out
    return SlicedLoader(loader, r, w)


class _ShardedDataLoader(DataLoader):
    """A DataLoader whose batch sampler is a :class:`ShardedBatchSampler` (never sharded twice)."""


def _broadcast_rng(loaders: dict) -> None:
    """Rank 0's torch CPU RNG and loader generator states on every rank (same shuffling everywhere)."""
    states = [torch.get_rng_state()]
    gens = [g for k in sorted(loaders) for g in loader_generators(loaders[k])]
    states += [g.get_state() for g in gens]
    dev = _comm_device()
    for i, s in enumerate(states):
        buf = s.to(dev)
        dist.broadcast(buf, 0)
        s = buf.cpu()
        if i == 0:
            torch.set_rng_state(s)
        else:
            gens[i - 1].set_state(s)


def prepare(routed, loaders: dict) -> dict:
    """Start of a distributed search or retraining: check that all ranks agree (model, K, masks' shapes,
    loader sizes), broadcast rank 0's weights, buffers, masks and RNG states, and return this rank's
    sharded loaders. Returns ``loaders`` unchanged with one process."""
    if not isinstance(routed, RoutedModel):
        raise TypeError(f"prepare() needs a RoutedModel, got {type(routed).__name__}.")
    if not isinstance(loaders, dict):
        raise DataError(f"loaders must be a dict {{ticket: loader}}, got {type(loaders).__name__}.")
    check_not_sharded(routed.model)
    if not is_distributed():
        return loaders
    _same_on_all_ranks({"fingerprint": routed.space.fingerprint, "granularity": routed.granularity,
                        "K": routed.num_tickets, "loaders": {str(k): len(dl) for k, dl in loaders.items()}},
                       "the model, K or the number of batches per ticket")
    broadcast_state(routed.model)
    _broadcast_tickets(routed)
    _broadcast_rng(loaders)
    return {k: shard_loader(dl) for k, dl in loaders.items()}


# ----------------------------------------------------------------------------- synchronised batch norm
class _AllGather(torch.autograd.Function):
    """``[world, *x.shape]``: every rank's ``x``; the gradient of this rank's row is summed over all ranks."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g)
        return g[rank()]


_BN_SIG = inspect.signature(F.batch_norm)


def _sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps):
    """Batch norm over the global batch: each rank's (count, mean, biased variance) per channel are gathered
    in one collective (one more in backward) and combined exactly (Chan et al.)."""
    C = input.shape[1]
    low = input.dtype in (torch.float16, torch.bfloat16)
    x = input.float() if low else input
    dims = [0] + list(range(2, x.dim()))
    shape = [1, C] + [1] * (x.dim() - 2)
    n_local = x.numel() // C if C else 0
    if n_local:
        mean_r, var_r = x.mean(dims), x.var(dims, unbiased=False)
    else:  # no local sample (a mixed-route batch's ticket): zeros that keep x's graph, so this rank's backward
        mean_r = var_r = x.sum(dims)  # also reaches the all-reduce of _AllGather that the other ranks run
    stats = _AllGather.apply(torch.cat([mean_r, var_r, x.new_full((1,), float(n_local))]))  # [W, 2C + 1]
    counts = stats[:, 2 * C:].detach()  # [W, 1]
    n = float(counts.sum())
    if n <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {int(n)} over all ranks.")
    means, vars_ = stats[:, :C], stats[:, C:2 * C]
    mean = (counts * means).sum(0) / n
    var = (counts * (vars_ + (means - mean) ** 2)).sum(0) / n
    y = (x - mean.view(shape)) * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    if running_mean is not None and running_var is not None:
        m = 0.1 if momentum is None else float(momentum)
        with torch.no_grad():
            running_mean.mul_(1 - m).add_(mean.detach().to(running_mean.dtype), alpha=m)
            running_var.mul_(1 - m).add_((var.detach() * (n / (n - 1))).to(running_var.dtype), alpha=m)
    return y.to(input.dtype) if low else y


class SyncBatchNormMode(TorchFunctionMode):
    """While active, training-mode ``F.batch_norm`` uses batch statistics all-reduced over every rank."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            a = _BN_SIG.bind(*args, **kwargs)
            a.apply_defaults()
            p = a.arguments
            if p["training"]:
                return _sync_batch_norm(p["input"], p["running_mean"], p["running_var"], p["weight"], p["bias"],
                                        p["momentum"], p["eps"])
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------- DDP ticket views
class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def _scale_grads(obj, scale: float):
    if isinstance(obj, torch.Tensor):
        return _ScaleGrad.apply(obj, scale) if obj.requires_grad else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_scale_grads(o, scale) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_scale_grads(o, scale) for o in obj)
    if isinstance(obj, dict):
        return type(obj)({k: _scale_grads(v, scale) for k, v in obj.items()})
    return obj


class DistributedTicketView(nn.Module):
    """Ticket ``k``'s forward through a DDP that wraps the whole RoutedModel (shared by all tickets' views).

    In training mode batch statistics are synchronised across ranks; with autograd on, the forward goes
    through DDP (gradients averaged over ranks, weighted by shard size). In eval mode, or with autograd
    off, it is the plain routed forward. ``loss_weight`` (``n_rank * world / n_global`` of the last
    training forward) turns a rank's mean loss into its share of the global mean: averaging
    ``loss * loss_weight`` over ranks gives the one-process loss.
    """

    def __init__(self, ddp, routed, k: int):
        super().__init__()
        self.ddp = ddp
        object.__setattr__(self, "routed", routed)  # not a submodule: parameters are reached through ddp
        self.k = int(k)
        self.loss_weight = 1.0  # n_rank * world / n_global of the last training forward (see forward)

    def forward(self, *args, **kwargs):
        routed = self.routed
        if not routed.training:
            return routed(*args, route=self.k, **kwargs)
        with SyncBatchNormMode():
            if not torch.is_grad_enabled():
                return routed(*args, route=self.k, **kwargs)
            scale = self.loss_weight = self._shard_scale(args)
            out = self.ddp(*args, route=self.k, **kwargs)
        _check_finite_everywhere(out, f"ticket {self.k}")
        return out if scale == 1.0 else _scale_grads(out, scale)

    def _shard_scale(self, args) -> float:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        n = int(x.shape[0]) if x is not None and x.dim() else 1
        t = torch.tensor([n, n * n, int(n == 0)], dtype=torch.int64, device=_comm_device())
        dist.all_reduce(t)  # one collective: total, sum of squares (all equal iff W * sum n^2 == total^2), empties
        total, squares, empty = (int(v) for v in t.tolist())
        W = world_size()
        if empty:
            raise DataError(f"a rank received an empty shard (global batch of {total} over {W} ranks); use "
                            f"drop_last=True or a batch size of at least {W}.")
        return 1.0 if W * squares == total * total else n * W / total


def _check_finite_everywhere(out, what: str) -> None:
    """Raise on every rank when any rank's output holds NaN/inf (a rank raising alone would leave the others
    waiting in DDP's gradient all-reduce)."""
    bad = []
    _visit_tensors(out, lambda t: bad.append(bool((~torch.isfinite(t.detach())).any())))
    flag = torch.tensor([1 if any(bad) else 0], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        raise RTLError(f"non-finite model output while training {what} on "
                       f"{'this rank' if any(bad) else 'another rank'}; lower the learning rate or check the data "
                       "for NaN/inf (every rank stops).")


def _visit_tensors(obj, fn) -> None:
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            fn(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _visit_tensors(v, fn)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _visit_tensors(v, fn)


DDP_OPTIONS: dict = {"find_unused_parameters": False}
"""Keyword arguments for the DistributedDataParallel that :func:`ticket_views` creates; set
``DDP_OPTIONS["find_unused_parameters"] = True`` for models with trainable parameters their forward does
not use (DDP otherwise stops with "Expected to have finished reduction in the prior iteration")."""


def ticket_views(routed, tickets) -> dict[int, nn.Module]:
    """``{k: view}`` running ticket k: plain ``routed.ticket_module(k)`` with one process, else
    :class:`DistributedTicketView` objects sharing one DDP over ``routed`` (created here: it broadcasts
    rank 0's parameters and buffers)."""
    if not isinstance(routed, RoutedModel):
        raise TypeError(f"ticket_views() needs a RoutedModel, got {type(routed).__name__}.")
    try:
        ks = [k for k in tickets]
    except TypeError:
        raise DistributedError(f"tickets must be an iterable of ticket ids, got {type(tickets).__name__}.") from None
    for k in ks:
        routed.tickets.check_index(k)  # TicketError naming the valid range
    ks = [int(k) for k in ks]
    if not is_distributed():
        return {k: routed.ticket_module(k) for k in ks}
    ddp = _create_ddp(routed, routed)
    return {k: DistributedTicketView(ddp, routed, k) for k in ks}


def _create_ddp(module: nn.Module, routed) -> DistributedDataParallel:
    """A DDP over ``module`` (whose parameters are ``routed``'s), without per-forward buffer broadcasts."""
    check_not_sharded(routed.model)
    p = next((q for q in routed.parameters() if q.requires_grad), None)
    if p is None:
        raise DistributedError("the model has no trainable parameter; nothing to train data-parallel.")
    dev_ids = [p.device.index if p.device.index is not None else torch.cuda.current_device()] \
        if p.device.type == "cuda" else None
    # buffers (per-ticket norm statistics) stay identical through synchronised batch norms: no per-forward sync
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    if not isinstance(DDP_OPTIONS, dict):
        raise DistributedError(f"rtl_plugin.training.distributed.DDP_OPTIONS must be a dict of DDP keyword arguments, got "
                               f"{type(DDP_OPTIONS).__name__}.")
    return DistributedDataParallel(module, device_ids=dev_ids, **{**no_sync, **DDP_OPTIONS})


def ticket_view(routed, k: int) -> nn.Module:
    """One ticket's training view (see :func:`ticket_views`)."""
    return ticket_views(routed, [k])[int(k)]



# ----------------------------------------------------------------------------- mixed-route batches
class _PerTicketForward(nn.Module):
    """A mixed-route batch's forward as one routed forward per ticket of ``tickets`` (outputs put back in sample
    order). Every rank runs the same tickets in the same order, some of them on zero local samples, so the
    synchronised batch norms of all ranks meet in the same collectives."""

    def __init__(self, routed):
        super().__init__()
        self.routed = routed

    def forward(self, x, route, tickets):
        parts, where = [], []
        for t in tickets:
            idx = torch.nonzero(route == t).flatten()
            out = self.routed(x.index_select(0, idx), route=int(t))
            if not isinstance(out, torch.Tensor):
                raise DistributedError("mixed-route training under torchrun needs a model whose output is one tensor "
                                       f"[B, ...], got {type(out).__name__}.")
            parts.append(out)
            where.append(idx)
        return torch.cat(parts).index_select(0, torch.argsort(torch.cat(where)))


class DistributedMixedRouteView(DistributedTicketView):
    """``view(x, route=route)`` of a mixed-route batch through a DDP shared by all ranks (see
    :func:`mixed_route_view`); ``loss_weight`` as in :class:`DistributedTicketView`."""

    def __init__(self, ddp, routed):
        super().__init__(ddp, routed, 0)

    def forward(self, x, *, route):
        routed = self.routed
        if not routed.training:
            return routed(x, route=route)
        present = torch.zeros(routed.num_tickets, dtype=torch.int64, device=_comm_device())
        present[route.to(present.device).unique()] = 1
        dist.all_reduce(present, op=dist.ReduceOp.MAX)  # the tickets of the global batch, on every rank
        tickets = torch.nonzero(present.cpu()).flatten().tolist()
        with SyncBatchNormMode():
            if not torch.is_grad_enabled():
                return self.ddp.module(x, route, tickets)
            scale = self.loss_weight = self._shard_scale((x,))
            out = self.ddp(x, route, tickets)
        _check_finite_everywhere(out, "a mixed-route batch")
        return out if scale == 1.0 else _scale_grads(out, scale)


def mixed_route_view(routed) -> nn.Module:
    """``view(x, route=route)`` for mixed-route training: ``routed`` itself with one process; under torchrun a
    :class:`DistributedMixedRouteView` (DDP over the per-ticket forwards of the tickets present in the global
    batch, synchronised batch norms; created here: it broadcasts rank 0's parameters and buffers)."""
    if not isinstance(routed, RoutedModel):
        raise TypeError(f"mixed_route_view() needs a RoutedModel, got {type(routed).__name__}.")
    if not is_distributed():
        return routed
    return DistributedMixedRouteView(_create_ddp(_PerTicketForward(routed), routed), routed)
