"""Speed, memory and storage of RTL vs dense / single-mask baselines (issue 7), one command, JSON output.

Every ratio is measured side by side in one run on one device (dimensionless; < 1 means RTL is faster /
smaller):

* ``routed_weight_vs_dense``      weight-mode RoutedModel on a mixed batch (K tickets, batch B) / dense model
* ``routed_channel50_vs_dense``   deployed channel package (``export_package`` -> ``load_package``: K slim
                                  models, batch bucketed by ticket) at 50% channel sparsity / dense, batch B
* ``routed_channel75_vs_dense``   the same at 75% channel sparsity
* ``joint_retrain_vs_dense``      ``joint_retrain`` seconds per sample / dense training seconds per sample
* ``ticket_search_vs_single_imp`` ``RTLPruner.find_tickets`` for K tickets (subset k per ticket) / the same
                                  pruner with one mask over all data (same schedule, batches, epochs)
* ``storage_vs_k_dense``          bytes of ``routed.save`` (shared fp32 weights + K bit-packed masks) / K dense
                                  fp32 models (safetensors)
* ``peak_memory_vs_dense``        peak memory of weight-mode routed inference (masked-weight cache included)
                                  / dense inference, batch B

Both execution paths run side by side (issue 19): ``*_bucketed_*`` (one call per ticket bucket) and
``*_grouped_*`` (one grouped call per layer for all tickets, ``RoutedModel(execution=...)`` and
``load_package(execution=...)``); the keys without a path (``routed_weight_vs_dense``, ``routed_channel50_vs_dense``,
...) are the path ``execution="auto"`` takes on the device (``settings.auto_execution``: bucketed on the CPU,
grouped on CUDA). ``peak_memory_grouped_bounded_vs_dense`` is the grouped path with the masked-weight cache
bounded to 0 copies (each layer masks its stacked weights on the fly); ``settings.grouped_padded_rows_vs_batch``
the padding the grouped path computes on, and ``routed_weight_grouped_balanced_*`` the grouped path on a route
with equal buckets (no padding).

plus extras (``*_b64`` CPU batch-64 channel ratios, cache-off weight mode, the soft-mask channel pass,
CSR storage, autocast ratios on CUDA, the search time breakdown) and the absolute numbers behind each
ratio. Times: median of ``--reps`` runs after warm-up (CUDA: synchronised).

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/speed.py --quick            # < 1 min on CPU
    python benchmarks/speed.py --skip training,search --image2 64,224 --out ...  # inference only (both paths)
    OMP_WAIT_POLICY=PASSIVE python benchmarks/speed.py --out benchmarks/results/speed_cpu
    python benchmarks/speed.py --device cuda --out benchmarks/results/speed_gpu
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch initialises OpenMP

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import rtl_plugin as rtl  # noqa: E402
from rtl_plugin.persist.package import export_package, load_package, package_size  # noqa: E402
from rtl_plugin.persist.io import atomic_write_json  # noqa: E402
from rtl_plugin.errors import ExecutionError  # noqa: E402
from rtl_plugin.grouped import GroupLayout  # noqa: E402
from rtl_plugin.routed import run_bucketed  # noqa: E402
from rtl_plugin.pruning.pruner import RTLPruner  # noqa: E402
from rtl_plugin.training.retrain import default_train_step, joint_retrain  # noqa: E402

REQUIRED = ("routed_weight_vs_dense", "routed_channel50_vs_dense", "routed_channel75_vs_dense",
            "joint_retrain_vs_dense", "ticket_search_vs_single_imp", "storage_vs_k_dense", "peak_memory_vs_dense")


# --------------------------------------------------------------------------- helpers
def device_info(dev: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        info["cpu"] = platform.processor()
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    return info


def git_commit() -> str | None:
    """The checkout's commit (with "-dirty" when tracked files differ), None outside a git checkout."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("-dirty" if dirty else "")) or None


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Clock:
    """Wall and process-CPU seconds of a block (CUDA synchronised at both ends).

    ``primary`` is what ratios use: process CPU time on the CPU device (the benchmark runs one intra-op
    thread, so on an idle machine CPU time == wall time, and on a shared machine it is not inflated by
    other jobs' preemption), wall time on CUDA."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.wall = self.cpu = 0.0

    def __enter__(self):
        sync(self.dev)
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.dev)
        self.wall, self.cpu = time.perf_counter() - self._w, time.process_time() - self._c
        return False

    @property
    def primary(self) -> float:
        return self.cpu if self.dev.type == "cpu" else self.wall


def measure(fns: dict, dev: torch.device, reps: int, out: dict, warmup: int = 1) -> None:
    """Time every ``fns[name]()`` ``reps`` times, interleaved (round-robin, so load changes hit all alike), after
    ``warmup`` calls each; stores the minimum per name in ``out["times_s"]`` (primary clock),
    ``out["times_wall_s"]`` and ``out["times_cpu_s"]``."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    got = {n: [] for n in fns}
    for _ in range(reps):
        for n, fn in fns.items():
            with Clock(dev) as c:
                fn()
            got[n].append(c)
    for n, cs in got.items():
        out["times_s"][n] = min(c.primary for c in cs)
        out["times_wall_s"][n] = min(c.wall for c in cs)
        out["times_cpu_s"][n] = min(c.cpu for c in cs)


def record(out: dict, name: str, c: "Clock") -> float:
    out["times_s"][name], out["times_wall_s"][name], out["times_cpu_s"][name] = c.primary, c.wall, c.cpu
    return c.primary


def make_model(name: str, num_classes: int) -> nn.Module:
    import timm
    return timm.create_model(name, num_classes=num_classes)


def channel_tickets(space, K: int, keep: float, seed: int = 1) -> rtl.TicketSet:
    """Channel tickets keeping ``keep`` of every group's channel positions (random, different per ticket)."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for grp in space.groups:
        per = torch.zeros(K, grp.period, dtype=torch.bool)
        n = max(1, round(grp.period * keep))
        for k in range(K):
            per[k, torch.randperm(grp.period, generator=g)[:n]] = True
        masks[grp.root] = per.repeat(1, grp.ch_groups)
    return rtl.TicketSet(space, masks)


def tensor_bytes(ts) -> int:
    seen, n = set(), 0
    for t in ts:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def module_bytes(m: nn.Module) -> int:
    return tensor_bytes(list(m.parameters()) + list(m.buffers()))


def routed_bytes(r: rtl.RoutedModel) -> int:
    cache = [t for entry in r._cache.values() for t in entry[1].values()]
    return module_bytes(r.model) + tensor_bytes(list(r.tickets.masks.values())) + tensor_bytes(cache)


class PeakMemory:
    """Peak memory of a block: CUDA ``max_memory_allocated``; CPU: the process's resident high-water mark
    (``VmHWM``, reset through /proc/self/clear_refs, free heap returned with malloc_trim first) above the
    resident size at entry, plus ``persistent`` bytes (the model's tensors, already resident at entry)."""

    def __init__(self, dev: torch.device, persistent: int):
        self.dev, self.persistent, self.peak = dev, persistent, None

    @staticmethod
    def _status(key: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in /proc/self/status")

    def __enter__(self):
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)
            self.base = torch.cuda.memory_allocated(self.dev)
        else:
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            transient = torch.cuda.max_memory_allocated(self.dev) - self.base
        else:
            transient = self._status("VmHWM") - self.base
        self.peak = self.persistent + max(transient, 0)
        return False


def loaders_for(K: int, n_batches: int, batch: int, shape, num_classes: int, seed: int = 0):
    """K subset loaders of synthetic (x, y) batches (subset k shifted by k so subsets differ)."""
    out = {}
    for k in range(K):
        g = torch.Generator().manual_seed(seed + k)
        n = n_batches * batch
        x = torch.randn(n, *shape, generator=g) + 0.1 * k
        y = torch.randint(0, num_classes, (n,), generator=g)
        out[k] = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)
    return out


def all_data_loader(loaders: dict, batch: int) -> DataLoader:
    xs = torch.cat([dl.dataset.tensors[0] for dl in loaders.values()])
    ys = torch.cat([dl.dataset.tensors[1] for dl in loaders.values()])
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(xs, ys), batch_size=batch, shuffle=True, generator=g)


# --------------------------------------------------------------------------- benchmarks
PATHS = ("bucketed", "grouped")


def _weight_models(a, base, dev, shape) -> dict:
    """Weight-mode routed models sharing one TicketSet: bucketed / grouped, each with the default masked-weight
    cache and without it (grouped: bound 0, so every layer masks its stacked weights on the fly)."""
    K = a.tickets
    rw = rtl.wrap(copy.deepcopy(base), K, example_inputs=torch.randn(1, *shape), granularity="weight").to(dev)
    rw.set_tickets(rtl.TicketSet.random(rw.space, K, keep=0.5, seed=2))
    rw.eval()
    models = {}
    for path in PATHS:
        for cache, tag in ((True, ""), (False if path == "bucketed" else 0, "_nocache")):
            r = copy.deepcopy(rw)
            r.set_tickets(rw.tickets)  # one copy of the masks
            r.execution, r.cache_masked_weights = path, cache
            models[f"{path}{tag}"] = r
    models["auto"] = rw.execution_on(dev)  # the path "auto" takes on this device
    return models


def _channel_packages(a, base, dev, shape, out: dict, tmp: Path, g) -> tuple[dict, object]:
    """Channel packages at 50% / 75% channel sparsity, each loaded bucketed and grouped, and the soft-mask
    channel-mode routed model."""
    K = a.tickets
    rc = rtl.wrap(copy.deepcopy(base), K, example_inputs=torch.randn(1, *shape), granularity="channel")
    slims = {}
    for keep, tag in ((0.5, "channel50"), (0.25, "channel75")):
        rc.set_tickets(channel_tickets(rc.space, K, keep, seed=3))
        rc.train()
        rc(torch.randn(4 * K, *shape, generator=g), route=torch.arange(4 * K) % K)  # per-ticket BN statistics
        rc.eval()
        with Clock(dev) as c:
            export_package(rc, tmp / f"pkg_{tag}", example_inputs=torch.randn(2, *shape, generator=g))
        record(out, f"export_package_{tag}", c)
        for path in PATHS:
            with Clock(dev) as c:
                slims[f"{tag}_{path}"] = load_package(tmp / f"pkg_{tag}", make_model(a.model, a.classes),
                                                      map_location=dev, execution=path if path == "bucketed" else "auto")
            record(out, f"load_package_{tag}", c)
            if path == "grouped":
                try:  # set after load, so that a refusal is recorded rather than raised
                    slims[f"{tag}_grouped"].execution = "grouped"
                except ExecutionError as e:
                    out["settings"][f"{tag}_grouped_blocker"] = str(e)
        out["bytes"][f"package_{tag}"] = package_size(tmp / f"pkg_{tag}")
        out["settings"][f"{tag}_weight_sparsity"] = round(float(rc.tickets.sparsity().mean()), 4)
    rc.set_tickets(channel_tickets(rc.space, K, 0.5, seed=3))
    rc.to(dev).eval()
    return slims, rc


def _grouped_ok(slims: dict, x, route, out: dict) -> list[str]:
    """The package tags whose grouped path runs (first call: its check against the slim models); the others
    are recorded with the reason and left out of the grouped timings."""
    ok = []
    for tag in ("channel50", "channel75"):
        if f"{tag}_grouped_blocker" in out["settings"]:
            continue
        try:
            slims[f"{tag}_grouped"](x, route=route)
            ok.append(tag)
        except Exception as e:  # noqa: BLE001  (a refusal or a failure: recorded, the other timings still run)
            out["settings"][f"{tag}_grouped_blocker"] = f"{type(e).__name__}: {e}"
    return ok


def _alias_auto(out: dict, auto: dict, suffixes) -> None:
    """``routed_weight_infer...`` / ``routed_channel50_infer...`` (the keys of earlier runs): the path "auto"
    takes on this device, copied from the explicit ``..._bucketed`` / ``..._grouped`` timing."""
    for key in ("times_s", "times_wall_s", "times_cpu_s"):
        t = out[key]
        for kind, path in auto.items():
            for sfx in suffixes:
                src = f"routed_{kind}_{path}_infer{sfx}"
                if src in t:
                    t[f"routed_{kind}_infer{sfx}"] = t[src]


def _inference_fns(w: dict, slims: dict, grouped_tags: list, dense, dense_bucketed, x, route, sfx: str = "") -> dict:
    fns = {f"dense_infer{sfx}": lambda: dense(x), f"dense_bucketed_infer{sfx}": lambda: dense_bucketed(x, route)}
    if "grouped" in w["paths"]:
        K = w["grouped"].num_tickets
        balanced = torch.randperm(route.numel(), generator=torch.Generator().manual_seed(7)).to(route.device) % K
        # equal buckets: the grouped path without padding (what the padding of the random route costs)
        fns[f"routed_weight_grouped_balanced_infer{sfx}"] = lambda: w["grouped"](x, route=balanced)
    for path in PATHS:
        if path in w["paths"]:
            fns[f"routed_weight_{path}_infer{sfx}"] = lambda r=w[path]: r(x, route=route)
        for tag in ("channel50", "channel75") if not sfx else ("channel50",):
            if path == "bucketed" or tag in grouped_tags:
                fns[f"routed_{tag}_{path}_infer{sfx}"] = lambda s=slims[f"{tag}_{path}"]: s(x, route=route)
    return fns


def bench_inference(a, dev, out: dict, tmp: Path) -> None:
    K, B, shape = a.tickets, a.batch, (3, a.image, a.image)
    torch.manual_seed(0)
    base = make_model(a.model, a.classes)
    dense = copy.deepcopy(base).to(dev).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, *shape, generator=g).to(dev)
    route = torch.randint(0, K, (B,), generator=g).to(dev)
    times, mem = out["times_s"], out["peak_memory_bytes"]
    lay = GroupLayout(route)
    out["settings"]["grouped_padded_rows_vs_batch"] = round(lay.padded_batch / B, 4)

    def dense_bucketed(inp, rt):  # the dense model on the same K buckets: the floor of any per-ticket-weights run
        return run_bucketed(lambda args, kwargs, t: dense(*args), (inp,), {}, rt)

    with torch.no_grad():
        w = _weight_models(a, base, dev, shape)
        slims, rc = _channel_packages(a, base, dev, shape, out, tmp, g)
        grouped_tags = _grouped_ok(slims, x, route, out)
        w["paths"] = ["bucketed"]
        try:  # a failure of the grouped path is recorded; the other timings still run
            w["grouped"](x, route=route)
            w["grouped_nocache"](x, route=route)
            w["paths"].append("grouped")
        except Exception as e:  # noqa: BLE001
            out["settings"]["weight_grouped_error"] = f"{type(e).__name__}: {e}"
        auto = {"weight": w["auto"], "channel50": slims["channel50_grouped"].execution_on(dev)
                if "channel50" in grouped_tags and dev.type == "cuda" else "bucketed",
                "channel75": "grouped" if "channel75" in grouped_tags and dev.type == "cuda" else "bucketed"}
        if w["auto"] not in w["paths"]:
            auto["weight"] = w["auto"] = "bucketed"  # the grouped path failed (recorded above)
        out["settings"]["auto_execution"] = auto
        fns = _inference_fns(w, slims, grouped_tags, dense, dense_bucketed, x, route)
        fns.update({"routed_weight_bucketed_nocache_infer": lambda: w["bucketed_nocache"](x, route=route),
                    "routed_channel_mask_infer": lambda: rc(x, route=route)})
        if "grouped" in w["paths"]:
            fns["routed_weight_grouped_nocache_infer"] = lambda: w["grouped_nocache"](x, route=route)
        if dev.type == "cpu" and B > 64:
            x64, r64 = x[:64], route[:64]
            fns.update({"dense_infer_b64": lambda: dense(x64)})
            for tag in ("channel50", "channel75"):
                fns[f"routed_{tag}_bucketed_infer_b64"] = lambda s=slims[f"{tag}_bucketed"]: s(x64, route=r64)
        measure(fns, dev, a.reps, out)
        _alias_auto(out, auto, ("", "_b64"))
        for key in ("times_s", "times_wall_s", "times_cpu_s"):
            out[key]["routed_weight_nocache_infer"] = out[key][f"routed_weight_{w['auto']}_nocache_infer"]
        for size in a.image2:  # larger inputs: compute grows, the per-ticket weight traffic does not
            x2 = torch.randn(B, 3, size, size, generator=g).to(dev)
            x2b, r2b = x2[:64], route[:64]
            fns2 = _inference_fns(w, slims, grouped_tags, dense, dense_bucketed, x2, route, f"_img{size}")
            fns2.update({f"dense_infer_b64_img{size}": lambda: dense(x2b),
                         f"routed_channel50_bucketed_infer_b64_img{size}":
                         lambda: slims["channel50_bucketed"](x2b, route=r2b)})
            measure(fns2, dev, max(2, a.reps // 2), out)
            _alias_auto(out, auto, (f"_img{size}", f"_b64_img{size}"))
            del x2, x2b
        _bench_autocast(a, dev, out, w, slims, dense, x, route)
        _bench_memory(dev, mem, w, slims, dense, x, route)
    _inference_ratios(a, out)


def _bench_autocast(a, dev, out, w, slims, dense, x, route) -> None:
    autocasts = [("bf16", torch.bfloat16), ("fp16", torch.float16)] if dev.type == "cuda" else \
        ([] if a.quick else [("bf16", torch.bfloat16)])
    for name, dt in autocasts:
        with torch.autocast(dev.type, dtype=dt):
            fns = {f"dense_infer_{name}": lambda: dense(x),
                   f"routed_channel50_bucketed_infer_{name}": lambda: slims["channel50_bucketed"](x, route=route)}
            for path in w["paths"]:
                fns[f"routed_weight_{path}_infer_{name}"] = lambda r=w[path]: r(x, route=route)
            measure(fns, dev, max(2, a.reps // 2), out)
    _alias_auto(out, {"weight": w["auto"], "channel50": "bucketed"}, ("_bf16", "_fp16"))


def _bench_memory(dev, mem: dict, w: dict, slims: dict, dense, x, route) -> None:
    """Peak memory, one model at a time; cached paths are measured with their cache filled (persistent)."""
    with PeakMemory(dev, module_bytes(dense)) as pm:
        dense(x)
    mem["dense"] = pm.peak
    for name in ("bucketed", "grouped", "bucketed_nocache", "grouped_nocache"):
        if name.split("_")[0] not in w["paths"]:
            continue
        r = w[name]
        r(x, route=route)  # fill the cache where there is one
        with PeakMemory(dev, routed_bytes(r)) as pm:
            r(x, route=route)
        mem[f"routed_weight_{name}"] = pm.peak
    mem["routed_weight"] = mem[f"routed_weight_{w['auto']}"]
    mem["routed_weight_nocache"] = mem[f"routed_weight_{w['auto']}_nocache"]
    for name, slim in slims.items():
        try:
            slim(x, route=route)
        except Exception:  # noqa: BLE001  (a grouped package that refused or failed: recorded in settings)
            continue
        stacked = slim._stacked.specs if slim._stacked is not None and name.endswith("grouped") else {}
        extra = tensor_bytes([t for s in stacked.values() for t in s.values() if isinstance(t, torch.Tensor)])
        with PeakMemory(dev, module_bytes(slim) + extra) as pm:
            slim(x, route=route)
        mem[f"routed_{name}"] = pm.peak
    for tag in ("channel50", "channel75"):
        mem[f"routed_{tag}"] = mem[f"routed_{tag}_bucketed"]


def _inference_ratios(a, out: dict) -> None:
    times, mem, r = out["times_s"], out["peak_memory_bytes"], out["ratios"]
    pairs = [("routed_weight_vs_dense", "routed_weight_infer", "dense_infer"),
             ("routed_weight_nocache_vs_dense", "routed_weight_nocache_infer", "dense_infer"),
             ("dense_bucketed_vs_dense", "dense_bucketed_infer", "dense_infer"),
             ("routed_weight_vs_dense_bucketed", "routed_weight_infer", "dense_bucketed_infer"),
             ("routed_channel50_vs_dense", "routed_channel50_infer", "dense_infer"),
             ("routed_channel75_vs_dense", "routed_channel75_infer", "dense_infer"),
             ("routed_channel_mask_vs_dense", "routed_channel_mask_infer", "dense_infer"),
             ("routed_channel50_vs_dense_b64", "routed_channel50_infer_b64", "dense_infer_b64"),
             ("routed_channel75_vs_dense_b64", "routed_channel75_infer_b64", "dense_infer_b64"),
             ("routed_weight_grouped_vs_bucketed", "routed_weight_grouped_infer", "routed_weight_bucketed_infer"),
             ("routed_channel50_grouped_vs_bucketed", "routed_channel50_grouped_infer",
              "routed_channel50_bucketed_infer")]
    for sfx in ("", "_bf16", "_fp16", *[f"_img{s}" for s in a.image2]):
        for kind in ("routed_weight_bucketed", "routed_weight_grouped", "routed_weight_grouped_balanced",
                     "routed_weight_bucketed_nocache",
                     "routed_weight_grouped_nocache", "routed_channel50_bucketed", "routed_channel50_grouped",
                     "routed_channel75_bucketed", "routed_channel75_grouped", "routed_weight", "routed_channel50",
                     "dense_bucketed"):
            if sfx and kind in ("routed_channel75_bucketed", "routed_channel75_grouped"):
                continue
            if (kind, sfx) not in (("routed_weight", ""), ("routed_channel50", ""), ("dense_bucketed", "")):
                pairs.append((f"{kind}_vs_dense{sfx}", f"{kind}_infer{sfx}", f"dense_infer{sfx}"))
        if sfx.startswith("_img"):
            pairs.append((f"routed_channel50_vs_dense_b64{sfx}", f"routed_channel50_infer_b64{sfx}",
                          f"dense_infer_b64{sfx}"))
    for key, num, den in pairs:
        if num in times and den in times:
            r[key] = times[num] / times[den]
            out["ratios_wall"][key] = out["times_wall_s"][num] / out["times_wall_s"][den]
    for key, name in (("peak_memory_vs_dense", "routed_weight"), ("peak_memory_nocache_vs_dense", "routed_weight_nocache"),
                      ("peak_memory_bucketed_vs_dense", "routed_weight_bucketed"),
                      ("peak_memory_grouped_vs_dense", "routed_weight_grouped"),
                      ("peak_memory_grouped_bounded_vs_dense", "routed_weight_grouped_nocache"),
                      ("peak_memory_channel50_vs_dense", "routed_channel50"),
                      ("peak_memory_channel75_vs_dense", "routed_channel75"),
                      ("peak_memory_channel50_grouped_vs_dense", "routed_channel50_grouped")):
        if name in mem:
            r[key] = mem[name] / mem["dense"]


def bench_training(a, dev, out: dict, image: int | None = None, n_batches: int | None = None,
                   reps: int | None = None, suffix: str = "") -> None:
    """Joint retraining per sample vs dense training per sample (same model, batches and Adam).

    Steady state: one ``joint_retrain`` call runs ``1 + reps`` epochs; after each joint epoch a callback
    runs one dense epoch (interleaved, so load changes hit both alike). The first epoch of each (optimizer
    state creation: K per-ticket Adam states vs one) is reported apart as ``..._first_epoch``; the ratio uses
    the fastest later epoch of each."""
    image, n_batches, reps = image or a.image, n_batches or a.train_batches, reps or a.train_reps
    K, shape = a.tickets, (3, image, image)
    loaders = loaders_for(K, n_batches, a.train_batch, shape, a.classes)
    torch.manual_seed(0)
    base = make_model(a.model, a.classes)
    dense = copy.deepcopy(base).to(dev).train()
    step = default_train_step()
    batches = [(x.to(dev), y.to(dev)) for dl in loaders.values() for x, y in dl]
    r = rtl.wrap(copy.deepcopy(base), K, example_inputs=torch.randn(1, *shape), granularity="weight").to(dev)
    r.set_tickets(rtl.TicketSet.random(r.space, K, keep=0.5, seed=2))
    dense_opt = torch.optim.Adam(dense.parameters(), lr=1e-3)
    joint_c, dense_c = [], []
    clock = {"joint": Clock(dev)}

    def dense_epoch(info):
        clock["joint"].__exit__()
        joint_c.append(clock["joint"])
        with Clock(dev) as c:
            for b in batches:
                step(dense, b, dense_opt)
        dense_c.append(c)
        clock["joint"] = Clock(dev).__enter__()

    clock["joint"].__enter__()
    hist = joint_retrain(r, loaders, optimizer=torch.optim.Adam(r.parameters(), lr=1e-3), epochs=1 + reps,
                         device=dev, progress=False, callbacks=[dense_epoch])
    steps_per_epoch = hist["steps"] // (1 + reps)
    n_dense, n_joint = sum(b[0].shape[0] for b in batches), steps_per_epoch * a.train_batch
    out["counts"].update({f"dense_train_samples{suffix}": n_dense, f"joint_retrain_samples{suffix}": n_joint})
    for tag, js, ds in (("", joint_c[1:], dense_c[1:]), ("_first_epoch", joint_c[:1], dense_c[:1])):
        t_dense = record(out, f"dense_train{tag}{suffix}", min(ds, key=lambda c: c.primary))
        t_joint = record(out, f"joint_retrain{tag}{suffix}", min(js, key=lambda c: c.primary))
        out["ratios"][f"joint_retrain{tag}_vs_dense{suffix}"] = (t_joint / n_joint) / (t_dense / n_dense)
        out["ratios_wall"][f"joint_retrain{tag}_vs_dense{suffix}"] = (
            (out["times_wall_s"][f"joint_retrain{tag}{suffix}"] / n_joint)
            / (out["times_wall_s"][f"dense_train{tag}{suffix}"] / n_dense))
    for size in a.train_image2 if not suffix else ():  # compute grows, the per-step O(weights) work does not
        bench_training(a, dev, out, image=size, n_batches=1, reps=2, suffix=f"_img{size}")


def bench_search(a, dev, out: dict) -> None:
    """K per-subset IMP searches (RTLPruner) vs one single-mask IMP over all data, same schedule."""
    K, shape = a.tickets, (3, a.image, a.image)
    loaders = loaders_for(K, a.search_batches, a.train_batch, shape, a.classes, seed=100)
    targets = [float(s) for s in a.search_sparsities.split(",")]

    def timed_pruner(pruner):
        acc = {"train": 0.0, "prune": 0.0}
        for meth, key in (("train_ticket", "train"), ("prune_round", "prune")):  # the public search steps
            orig = getattr(pruner, meth)

            def wrapped(*args, _orig=orig, _key=key, **kw):
                with Clock(dev) as c:
                    res = _orig(*args, **kw)
                acc[_key] += c.primary
                return res
            setattr(pruner, meth, wrapped)  # instance attribute: find_tickets calls these steps; changes nothing
        return acc

    def run(num, subsets):
        torch.manual_seed(0)
        r = rtl.wrap(make_model(a.model, a.classes), num, example_inputs=torch.randn(1, *shape),
                     granularity="weight").to(dev)
        p = RTLPruner(r, sparsities=targets, prune_fraction=a.prune_fraction, progress=False)
        acc = timed_pruner(p)
        with Clock(dev) as c:
            res = p.find_tickets(subsets, epochs_per_round=1, device=dev)
        return c, acc, len(res.history)

    c1, acc1, rounds1 = run(1, {0: all_data_loader(loaders, a.train_batch)})
    cK, accK, roundsK = run(K, loaders)
    t_single, t_rtl = record(out, "single_imp_search", c1), record(out, "ticket_search", cK)
    out["times_s"].update({"single_imp_search_train": acc1["train"], "single_imp_search_prune": acc1["prune"],
                           "ticket_search_train": accK["train"], "ticket_search_prune": accK["prune"],
                           "single_imp_search_other": t_single - acc1["train"] - acc1["prune"],
                           "ticket_search_other": t_rtl - accK["train"] - accK["prune"]})
    out["counts"].update({"single_imp_rounds": rounds1, "ticket_search_rounds": roundsK})
    out["ratios"]["ticket_search_vs_single_imp"] = t_rtl / t_single
    out["ratios_wall"]["ticket_search_vs_single_imp"] = out["times_wall_s"]["ticket_search"] / \
        out["times_wall_s"]["single_imp_search"]
    out["ratios"]["ticket_search_train_vs_single_imp_train"] = accK["train"] / max(acc1["train"], 1e-12)


def bench_storage(a, out: dict, tmp: Path) -> None:
    """Bytes on disk: RTL run (shared fp32 weights + K bit-packed masks) vs K dense fp32 vs K CSR models."""
    from safetensors.torch import save_file
    K, shape = a.tickets, (3, a.image, a.image)
    torch.manual_seed(0)
    base = make_model(a.model, a.classes)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp / "dense.safetensors"))
    dense_bytes = (tmp / "dense.safetensors").stat().st_size
    r = rtl.wrap(copy.deepcopy(base), K, example_inputs=torch.randn(1, *shape), granularity="weight")
    r.set_tickets(rtl.TicketSet.random(r.space, K, keep=1 - a.storage_sparsity, seed=4))
    r.save(tmp / "run")
    rtl_bytes = package_size(tmp / "run")
    # K sparse models: every prunable weight as CSR over [out, in * kh * kw] (int32 indices, fp32 values),
    # everything else dense fp32 (one file holding all K models)
    csr = {}
    state = base.state_dict()
    prunable = {f"{n}.weight" for n in r.space.layers}
    for k in range(K):
        for name, v in state.items():
            if name in prunable:
                m = r.tickets.masks[name[:-len(".weight")]][k]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # sparse CSR "beta" warning
                    s = (v * m).reshape(v.shape[0], -1).to_sparse_csr()
                csr[f"{k}/{name}/crow"] = s.crow_indices().to(torch.int32)
                csr[f"{k}/{name}/col"] = s.col_indices().to(torch.int32)
                csr[f"{k}/{name}/val"] = s.values().contiguous()
            else:
                csr[f"{k}/{name}"] = v.clone()  # each model stores its own copy
    save_file(csr, str(tmp / "csr.safetensors"))
    csr_bytes = (tmp / "csr.safetensors").stat().st_size
    out["bytes"].update({"rtl_run": rtl_bytes, "dense_model": dense_bytes, "k_dense": K * dense_bytes,
                         "k_csr": csr_bytes})
    out["ratios"]["storage_vs_k_dense"] = rtl_bytes / (K * dense_bytes)
    out["ratios"]["storage_vs_k_csr"] = rtl_bytes / csr_bytes
    for tag in ("channel50", "channel75"):
        if f"package_{tag}" in out["bytes"]:
            out["ratios"][f"storage_{tag}_package_vs_k_dense"] = out["bytes"][f"package_{tag}"] / (K * dense_bytes)


# --------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model and sizes (< 1 min on CPU)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1: shared machines)")
    p.add_argument("--out", default="benchmarks/results/speed", help="folder for speed.json")
    p.add_argument("--model", default=None, help="timm model name (default resnet18; quick: test_resnet)")
    p.add_argument("--tickets", type=int, default=10)
    p.add_argument("--batch", type=int, default=None, help="inference batch (default 256; quick 64)")
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--image2", default=None, help="comma list: also time inference at these input sizes "
                   "(default 64,224: resnet18's native 224x224; quick: none)")
    p.add_argument("--train-image2", default=None, help="comma list: also time training at these input sizes "
                   "(default 64; quick: none)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--train-batch", type=int, default=None)
    p.add_argument("--train-batches", type=int, default=None, help="batches per ticket subset (joint retraining)")
    p.add_argument("--train-reps", type=int, default=None, help="interleaved repetitions of the training timing")
    p.add_argument("--search-batches", type=int, default=None, help="batches per ticket subset (ticket search)")
    p.add_argument("--search-sparsities", default="0.5", help="targets of the search (rounds: prune-fraction each)")
    p.add_argument("--prune-fraction", type=float, default=0.5)
    p.add_argument("--storage-sparsity", type=float, default=0.75)
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="CUDA: keep cuDNN's default algorithm choice "
                   "(default: torch.backends.cudnn.benchmark = True for dense and routed runs alike; the grouped "
                   "convolutions of the grouped path depend on it)")
    p.add_argument("--skip", default="", help="comma list of sections to skip: inference,training,search,storage")
    a = p.parse_args(argv)
    quick = a.quick
    defaults = {"model": "test_resnet" if quick else "resnet18", "batch": 64 if quick else 256,
                "reps": 2 if quick else 5, "train_batch": 16 if quick else 64,
                "train_batches": 1 if quick else 3, "train_reps": 1 if quick else 2,
                "image2": "" if quick else "64,224",
                "train_image2": "" if quick else "64", "search_batches": 1 if quick else 4}
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    for k in ("image2", "train_image2"):
        try:
            sizes = [int(v) for v in str(getattr(a, k)).split(",") if v.strip()]
        except ValueError:
            p.error(f"--{k.replace('_', '-')} takes a comma list of ints, got {getattr(a, k)!r}")
        if any(v < 8 for v in sizes):
            p.error(f"--{k.replace('_', '-')}: sizes must be >= 8, got {sizes}")
        setattr(a, k, sizes)
    return a


def main(argv=None) -> dict:
    a = parse(argv)
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available; use --device cpu.")
    if dev.type == "cpu":
        torch.set_num_threads(a.threads)
    else:
        torch.backends.cudnn.benchmark = not a.no_cudnn_benchmark
    t0 = time.perf_counter()
    out = {"device": str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
           "device_info": device_info(dev), "threads": torch.get_num_threads(),
           "commit": git_commit(),
           "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
           "settings": {k: getattr(a, k) for k in ("quick", "model", "tickets", "batch", "image", "image2", "train_image2", "classes",
                                                   "reps",
                                                   "train_batch", "train_batches", "train_reps", "search_batches",
                                                   "search_sparsities", "prune_fraction", "storage_sparsity",
                                                   "no_cudnn_benchmark")},
           "clock": "process CPU time (1 thread)" if dev.type == "cpu" else "wall (CUDA synchronised)",
           "ratios": {}, "ratios_wall": {}, "times_s": {}, "times_wall_s": {}, "times_cpu_s": {}, "bytes": {},
           "peak_memory_bytes": {}, "counts": {}, "section_wall_s": {}}
    skip = set(filter(None, a.skip.split(",")))
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for name, fn in (("inference", lambda: bench_inference(a, dev, out, tmp)),
                         ("training", lambda: bench_training(a, dev, out)),
                         ("search", lambda: bench_search(a, dev, out)),
                         ("storage", lambda: bench_storage(a, out, tmp))):
            if name in skip:
                continue
            t = time.perf_counter()
            fn()
            out["section_wall_s"][name] = round(time.perf_counter() - t, 2)
            print(f"[speed] {name}: {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    for k in REQUIRED:  # top-level copies of the required ratios
        if k in out["ratios"]:
            out[k] = round(out["ratios"][k], 4)
    for key in ("ratios", "ratios_wall"):
        out[key] = {k: round(v, 4) for k, v in out[key].items()}
    for key in ("times_s", "times_wall_s", "times_cpu_s"):
        out[key] = {k: round(v, 5) for k, v in out[key].items()}
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(a.out) / "speed.json", out)
    print(json.dumps({"device": out["device"], "threads": out["threads"], **out["ratios"], "wall_s": out["wall_s"]},
                     indent=1))
    return out


if __name__ == "__main__":
    main()
