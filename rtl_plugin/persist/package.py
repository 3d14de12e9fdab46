"""Deployable package of an RTL run: slim tickets, a router and a manifest, loadable as one routed model.

``export_package(routed, dir, router=...)`` writes::

    manifest.json              format "rtl-plugin-package", format_version, granularity, K, fingerprint,
                               the ticket space, per-ticket pruning histories, router config, sha256 of files
    ticket_<k>.safetensors     channel mode: ticket k's physically smaller model (its own norm statistics)
    routed/                    weight mode: the routed run (``routed.save``: shared weights + bit-packed masks)
    router.safetensors         the router's state (learned / centroid routers)
    ticket_<k>.onnx, router.onnx   with ``onnx=True`` (checked against PyTorch with onnxruntime)

No pickle: architectures are rebuilt from a fresh base model given at load time (as ``rtl.load``), by
replaying each ticket's torch-pruning history on a copy of it. ``load_package(dir, model)`` returns a
:class:`SlimRoutedModel`: ``slim(x, route=ids)`` buckets the batch by ticket (argsort, no per-sample Python
loop) and runs each bucket through its slim model; ``slim(x)`` routes with the packaged router.
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from rtl_plugin.errors import (ArchitectureMismatchError, CorruptFileError, ExecutionError, ExportError,
                               MissingDependencyError, RouteError, RTLError, SpaceError, TicketError)
from rtl_plugin.norms import RoutedBatchNorm
from rtl_plugin.persist.atomic import atomic_write_bytes
from rtl_plugin.persist.export import export_ticket, prune_copy, pruning_history
from rtl_plugin.persist.io import load, save
from rtl_plugin.persist.manifest import (PACKAGE, check_fingerprint, read_manifest, read_verified, sha256,
                                         tensors_from_bytes, tensors_to_bytes, write_manifest)
from rtl_plugin.persist.stacked import StackedTickets
from rtl_plugin.routed import EXECUTIONS, RoutedModel, check_route, run_bucketed, run_per_pixel
from rtl_plugin.routing.routers import Router, RunAllRouter, create_router, positive_score
from rtl_plugin.space import TicketSpace

PACKAGE_FORMAT = PACKAGE.format
PACKAGE_VERSION = PACKAGE.version
MANIFEST = "manifest.json"
ROUTER_FILE = "router.safetensors"
ROUTED_DIR = "routed"
_ROUTER_CONFIG = {  # registered router name -> constructor arguments stored in the manifest
    "context": ("names",),
    "learned": ("pool", "bins", "hidden", "lr", "epochs", "batch_size", "weight_decay", "input_shape"),
    "centroid": ("pool", "bins", "input_shape"),
    "gate": ("pool", "bins", "input_shape", "seed"),
    "all": (),
}


def _ticket_file(k: int, ext: str = "safetensors") -> str:
    return f"ticket_{k}.{ext}"


# --------------------------------------------------------------------------- the deployed model
class SlimRoutedModel(nn.Module):
    """K deployed tickets behind one routed forward (inference only).

    Channel mode holds K physically smaller models (``self.tickets``, an ``nn.ModuleList``); weight mode
    holds the routed model itself (``self.routed``, eval mode, masked weights cached per ticket).

    ``forward(x, route=None, context=None)``:
      * ``route``: an int, LongTensor [B] (mixed batches are bucketed by ticket) or [B, H, W] (per pixel);
      * without ``route`` the packaged router picks the tickets (a context router needs ``context=ids``).
    Returns what the base model returns (e.g. logits [B, classes]), in the input order.

    ``execution`` ("auto" / "grouped" / "bucketed", see ``RoutedModel.execution``): channel mode, "grouped" runs
    the K slim models as one network (``persist.stacked.StackedTickets``: per-layer stacks padded to the widest
    ticket, one grouped call per layer, checked against the slim models on the first batch); "bucketed" runs
    one slim model per ticket bucket; "auto" groups on CUDA where the model allows it. Weight mode: the routed
    model's switch.
    """

    def __init__(self, tickets: Sequence[nn.Module] | None = None, *, routed: RoutedModel | None = None,
                 router: nn.Module | None = None, execution: str = "auto"):
        super().__init__()
        if (tickets is None) == (routed is None):
            raise TicketError("SlimRoutedModel needs either tickets=[K slim models] (channel mode) or "
                              "routed=<RoutedModel> (weight mode), not both or neither.")
        if tickets is not None:
            tickets = list(tickets)
            if not tickets or not all(isinstance(m, nn.Module) for m in tickets):
                raise TicketError("tickets must be a non-empty sequence of nn.Module (one slim model per ticket).")
            self.tickets = nn.ModuleList(tickets)
            self.routed = None
            self.granularity = "channel"
        else:
            if not isinstance(routed, RoutedModel):
                raise TypeError(f"routed must be a RoutedModel, got {type(routed).__name__}.")
            self.tickets = None
            self.routed = routed
            self.granularity = routed.granularity
        self.attach_router(router)
        object.__setattr__(self, "_stacked", None)  # the grouped path's stacks, built on first use
        self.execution = execution
        self.eval()

    @property
    def execution(self) -> str:
        """How a mixed batch runs: "auto", "grouped" or "bucketed" (see the class docstring)."""
        return self.routed.execution if self.routed is not None else self._execution

    @execution.setter
    def execution(self, value: str) -> None:
        if self.routed is not None:
            self.routed.execution = value  # validates, ExecutionError naming the fix
            return
        if not isinstance(value, str) or value not in EXECUTIONS:
            raise ExecutionError(f"execution must be one of {EXECUTIONS}, got {value!r}.")
        if value == "grouped" and self._stacked_tickets().blocker is not None:
            raise ExecutionError(f"execution='grouped' cannot run these tickets: {self._stacked.blocker}; use "
                                 "execution='auto' (falls back to one slim model per ticket) or 'bucketed'.")
        object.__setattr__(self, "_execution", value)

    def execution_on(self, device) -> str:
        """The path a mixed batch on ``device`` takes now: "grouped" or "bucketed" (channel mode: the first-batch
        check of the grouped path runs on the first grouped call, so call this after one batch)."""
        if self.routed is not None:
            return self.routed.execution_on(device)
        wanted = self._execution == "grouped" or (self._execution == "auto" and torch.device(device).type == "cuda")
        if not wanted or self.training:
            return "bucketed"
        return "grouped" if self._stacked_tickets().blocker is None else "bucketed"

    def _stacked_tickets(self) -> StackedTickets:
        if self._stacked is None or self._stacked.stale():
            object.__setattr__(self, "_stacked", StackedTickets(list(self.tickets)))
        return self._stacked

    def _apply(self, fn, recurse=True):
        object.__setattr__(self, "_stacked", None)  # moved tensors: the stacks are rebuilt on the next grouped call
        return super()._apply(fn, recurse)

    def attach_router(self, router: nn.Module | None) -> None:
        """Route calls without ``route=`` through ``router`` (None: such calls raise RouteError).

        A run-all router holds this model by reference, so it is kept as a plain attribute, not a submodule.
        """
        K = self.num_tickets
        if router is not None:
            if not isinstance(router, nn.Module) or not callable(router):
                raise RouteError(f"router must be an rtl_plugin.routing.routers.Router, got {type(router).__name__}.")
            if getattr(router, "num_tickets", K) != K:
                raise RouteError(f"the router routes {router.num_tickets} tickets, the package holds {K}; "
                                 "fit a router with num_tickets equal to K.")
        if "router" in self._modules:
            del self._modules["router"]
        if router is not None and getattr(router, "name", None) == "all":
            object.__setattr__(self, "router", router)
        else:
            self.router = router  # a module becomes a submodule, None a plain attribute

    @property
    def num_tickets(self) -> int:
        return len(self.tickets) if self.tickets is not None else self.routed.num_tickets

    def ticket_module(self, k: int) -> nn.Module:
        """The deployed model of ticket ``k`` (channel: a slim ``nn.Module``; weight: a routed view)."""
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < self.num_tickets:
            raise TicketError(f"ticket index must be an int in [0, {self.num_tickets}), got {k!r}.")
        return self.tickets[k] if self.tickets is not None else self.routed.ticket_module(k)

    def _run_ticket(self, args, kwargs, t: int):
        return self.tickets[t](*args, **kwargs)

    def _run_per_sample(self, args, kwargs, route: torch.Tensor):
        if self._execution == "grouped" or (self._execution == "auto" and route.device.type == "cuda"):
            if self.training:
                if self._execution == "grouped":
                    raise ExecutionError("a grouped channel package runs in eval mode only; call .eval() or use "
                                         "execution='bucketed'.")
            else:
                plan = self._stacked_tickets()
                if plan.blocker is None and not plan.verified:
                    plan.verify(args, kwargs)
                if plan.blocker is None:
                    return plan.run(args, kwargs, route)
                if self._execution == "grouped":
                    raise ExecutionError(f"execution='grouped' cannot run these tickets: {plan.blocker}; use "
                                         "execution='auto' or 'bucketed'.")
        return run_bucketed(self._run_ticket, args, kwargs, route)

    def forward(self, *args, route=None, context=None, **kwargs):
        if not args or not isinstance(args[0], torch.Tensor):
            raise RouteError("SlimRoutedModel expects the input tensor as its first positional argument.")
        x = args[0]
        if route is None:
            if self.router is None:
                raise RouteError("no route given and the package has no router: pass route=<ticket ids> or export "
                                 "the package with router=<a fitted router>.")
            with torch.no_grad():
                route = self.router(x, context=context) if getattr(self.router, "name", "") == "context" \
                    else self.router(x)
        elif context is not None:
            raise RouteError("pass either route= or context= (for a context router), not both.")
        if self.routed is not None:
            return self.routed(*args, route=route, **kwargs)
        route = check_route(route, x, self.num_tickets)
        if isinstance(route, int):
            return self._run_ticket(args, kwargs, route)
        if route.shape[0] == 0:
            return self._run_ticket(args, kwargs, 0)
        if route.dim() == 1:
            return self._run_per_sample(args, kwargs, route)
        return run_per_pixel(self._run_per_sample, args, kwargs, route, self.num_tickets)

    def extra_repr(self) -> str:
        params = [sum(p.numel() for p in m.parameters()) for m in self.tickets] if self.tickets is not None else []
        return (f"num_tickets={self.num_tickets}, granularity={self.granularity}, "
                f"router={getattr(self.router, 'name', None)}" + (f", params_per_ticket={params}" if params else ""))


# --------------------------------------------------------------------------- ONNX
def _onnx_modules():
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        raise MissingDependencyError(f"ONNX export needs onnx and onnxruntime ({e}); install them with "
                                     "pip install 'rtl-plugin[deploy]'.") from e
    return onnxruntime


def _flat_tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat_tensors(o)]
    if isinstance(out, dict):
        return [t for k in out for t in _flat_tensors(out[k])]
    raise RTLError(f"cannot export a model output of type {type(out).__name__} to ONNX; return tensors.")


def onnx_run(path, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run an ONNX file with onnxruntime (CPU) on ``inputs``; returns the outputs as CPU tensors."""
    ort = _onnx_modules()
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"{path} does not exist; export it with export_onnx() or export_package(onnx=True).")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in sess.run(None, feeds)]


def _compare_with_onnx(want: list[torch.Tensor], path: Path, inputs: tuple, *, rtol: float, atol: float) -> dict:
    """Max absolute / relative error of the ONNX file on ``inputs`` against the PyTorch outputs ``want``;
    RTLError beyond tolerance."""
    got = onnx_run(path, inputs)
    if len(got) != len(want):
        raise RTLError(f"the ONNX model returns {len(got)} outputs, PyTorch {len(want)}; report the model.")
    err = {"max_abs_err": 0.0, "max_rel_err": 0.0}
    for g, w in zip(got, want):
        w = w.detach().cpu()
        if g.shape != w.shape:
            raise RTLError(f"ONNX output shape {tuple(g.shape)} differs from PyTorch {tuple(w.shape)}; "
                           "the graph was traced with a batch-dependent shape.")
        if not w.is_floating_point():
            if not torch.equal(g.to(w.dtype), w):
                raise RTLError(f"ONNX integer output differs from PyTorch ({path}); check the opset or report "
                               "the layer.")
            continue
        a = float((g.float() - w.float()).abs().max()) if w.numel() else 0.0
        scale = float(w.float().abs().max()) if w.numel() else 0.0
        if a > atol + rtol * scale:
            raise RTLError(f"ONNX output differs from PyTorch by {a:.3g} (max |y| {scale:.3g}) in {path}; "
                           "an operator is exported differently: check the opset or report the layer.")
        err["max_abs_err"] = max(err["max_abs_err"], a)
        err["max_rel_err"] = max(err["max_rel_err"], a / max(scale, 1e-12))
    return err


def export_onnx(module: nn.Module, path, example_inputs, *, opset: int = 17, dynamic_batch: bool = True,
                check: bool = True, check_inputs=None, rtol: float = 1e-4, atol: float = 1e-5) -> dict:
    """Export ``module`` (a slim ticket, a router, any plain model) to ONNX and check it with onnxruntime.

    Uses torch's TorchScript-based exporter (``dynamo=False``: works offline without onnxscript), with a
    dynamic batch dimension. The file is written atomically.

    Args:
        module: an ``nn.Module`` without routing (export a RoutedModel's tickets with ``export_ticket``).
        path: the ``.onnx`` file to write.
        example_inputs: a tensor [B, ...] or a tuple of tensors, used for tracing.
        check: run onnxruntime on ``check_inputs`` (default: ``example_inputs``) and compare with PyTorch:
            floats within ``atol + rtol * max|y|``, integers exactly.
    Returns:
        ``{"path": str, "max_abs_err": float, "max_rel_err": float}`` (errors 0.0 when ``check`` is False).
    Raises:
        MissingDependencyError: onnx / onnxruntime missing. RTLError: ONNX output differs from PyTorch.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"export_onnx() needs an nn.Module, got {type(module).__name__}.")
    if isinstance(module, (RoutedModel, SlimRoutedModel)):
        raise SpaceError("a routed model buckets batches in Python and cannot be exported to ONNX as one graph; "
                         "export each ticket (export_ticket / export_package(onnx=True)) and the router separately.")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise RTLError("example_inputs must be a tensor or a tuple of tensors, e.g. torch.randn(2, 3, 32, 32).")
    _onnx_modules()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names_in = [f"input_{i}" for i in range(len(inputs))]
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            ref = _flat_tensors(module(*inputs))
        names_out = [f"output_{i}" for i in range(len(ref))]
        axes = None
        if dynamic_batch:
            axes = {n: {0: "batch"} for n in names_in + names_out}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, inputs, tmp, dynamo=False, opset_version=opset, input_names=names_in,
                                  output_names=names_out, dynamic_axes=axes, do_constant_folding=True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        err = {"path": str(path), "max_abs_err": 0.0, "max_rel_err": 0.0}
        if check:
            cin, want = inputs, ref  # the traced inputs' outputs are already computed
            if check_inputs is not None:
                cin = (check_inputs,) if isinstance(check_inputs, torch.Tensor) else tuple(check_inputs)
                with torch.no_grad():
                    want = _flat_tensors(module(*cin))
            err.update(_compare_with_onnx(want, path, cin, rtol=rtol, atol=atol))
        return err
    finally:
        module.train(was)


# --------------------------------------------------------------------------- routers
def _router_entry(router, K: int) -> tuple[dict, bytes | None]:
    if not isinstance(router, Router):
        raise RouteError(f"router must be an rtl_plugin.routing.routers.Router (create_router(...)), got "
                         f"{type(router).__name__}.")
    name = getattr(router, "name", None)
    if name not in _ROUTER_CONFIG:
        raise RouteError(f"router {name!r} cannot be packaged; packaged routers: {sorted(_ROUTER_CONFIG)}.")
    if router.num_tickets != K:
        raise RouteError(f"the router routes {router.num_tickets} tickets, the model {K}; fit it with num_tickets={K}.")
    if name in ("learned", "centroid") and not bool(router.fitted):
        raise RouteError(f"the {name} router is not fitted; call router.fit(x, ticket_ids) before packaging.")
    if name == "gate" and not router.built:
        raise RouteError("the gate has no layers yet; train it (learn_tickets or gate.fit) before packaging.")
    if name == "all" and router.score_fn is not positive_score:
        raise RouteError("a run-all router with a custom score_fn cannot be serialised; package it without "
                         "router= and build RunAllRouter(K, model=slim, score_fn=...) after load_package().")
    cfg = {}
    for k in _ROUTER_CONFIG[name]:
        v = getattr(router, k)
        cfg[k] = list(v) if isinstance(v, tuple) else v
    state = {k: v for k, v in router.state_dict().items() if v is not None}
    data = tensors_to_bytes(state) if state else None
    return {"name": name, "config": cfg, "file": ROUTER_FILE if data else None}, data


def _rebuild_router(entry: dict, K: int, data: bytes | None, model: nn.Module, where: Path):
    name = entry.get("name")
    if name not in _ROUTER_CONFIG:
        raise CorruptFileError(f"the package names an unknown router {name!r}; {PACKAGE.fix}.")
    if name == "all":
        return RunAllRouter(K, model=model)
    cfg = dict(entry.get("config") or {})
    if cfg.get("input_shape") is not None:
        cfg["input_shape"] = tuple(cfg["input_shape"])
    router = create_router(name, num_tickets=K, **cfg)
    if data is not None:
        state = tensors_from_bytes(data, where, PACKAGE)
        try:
            router.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CorruptFileError(f"{where} does not fit the {name} router described in the manifest ({e}); "
                                   f"{PACKAGE.fix}.") from e
    return router.eval()


# --------------------------------------------------------------------------- package export
def _example_inputs(routed: RoutedModel, example_inputs) -> torch.Tensor:
    if example_inputs is None:
        if routed.space.example_input_shape is None or routed.space.trace_root:
            raise SpaceError("the ticket space has no model-level example input shape; pass example_inputs= "
                             "(a tensor the model accepts, e.g. torch.randn(2, 3, 32, 32)).")
        p = next(routed.model.parameters())
        g = torch.Generator().manual_seed(0)
        example_inputs = torch.randn(routed.space.example_input_shape, generator=g).to(p.device, p.dtype)
    if not isinstance(example_inputs, torch.Tensor):
        raise RTLError("example_inputs must be one input tensor [B, ...] (the model's first positional argument).")
    return example_inputs


def _write_file(path: Path, name: str, data: bytes, files: dict) -> None:
    atomic_write_bytes(path / name, data)
    files[name] = sha256(data)


def _write_slim_tickets(routed: RoutedModel, path: Path, example_inputs: torch.Tensor, *, onnx: bool,
                        verify: bool, tol: float, files: dict, onnx_meta: dict) -> list[dict]:
    """Channel mode: one physically smaller model per ticket (checked against the routed ticket)."""
    trace_ex = None
    if routed.space.example_input_shape is not None:
        p = next(routed.model.parameters())
        trace_ex = torch.zeros(routed.space.example_input_shape, device=p.device, dtype=p.dtype)
    tickets_meta = []
    for k in range(routed.num_tickets):
        # export_ticket verifies the slim model on the package's inputs (ExportMismatchError beyond tol)
        slim = export_ticket(routed, k, example_inputs=trace_ex, check_inputs=example_inputs, verify=verify,
                             tol=tol).eval()
        name = _ticket_file(k)
        _write_file(path, name, tensors_to_bytes(slim.state_dict()), files)
        tickets_meta.append({"ticket": k, "file": name, "history": pruning_history(routed, k),
                             "params": int(sum(p.numel() for p in slim.parameters())),
                             "sparsity": round(float(routed.tickets.sparsity()[k]), 6)})
        if onnx:
            oname = _ticket_file(k, "onnx")
            onnx_meta[oname] = export_onnx(slim, path / oname, example_inputs)["max_rel_err"]
            files[oname] = sha256((path / oname).read_bytes())
    return tickets_meta


def _write_routed(routed: RoutedModel, path: Path, *, onnx: bool) -> list[dict]:
    """Weight mode: the routed run itself (shared weights + bit-packed masks) in ``routed/``."""
    if onnx:
        raise SpaceError("onnx=True needs channel granularity (weight tickets are dense tensors with "
                         "zeros: export one with export_onnx(export_ticket(routed, k), ...)).")
    save(routed, path / ROUTED_DIR)
    return [{"ticket": k, "sparsity": round(float(s), 6)} for k, s in enumerate(routed.tickets.sparsity().tolist())]


def _write_router(router, router_entry: dict | None, router_bytes: bytes | None, path: Path,
                  example_inputs: torch.Tensor, *, onnx: bool, files: dict, onnx_meta: dict) -> None:
    if router_bytes is not None:
        _write_file(path, ROUTER_FILE, router_bytes, files)
    if onnx and router_entry is not None and router_entry["name"] in ("learned", "centroid"):
        onnx_meta["router.onnx"] = export_onnx(router, path / "router.onnx", example_inputs)["max_rel_err"]
        files["router.onnx"] = sha256((path / "router.onnx").read_bytes())


def export_package(routed: RoutedModel, path, *, router=None, example_inputs=None, onnx: bool = False,
                   verify: bool = True, tol: float = 1e-4) -> Path:
    """Write a deployable package of ``routed`` to the folder ``path``; returns the folder.

    Args:
        routed: the trained RoutedModel (channel mode: every ticket becomes a physically smaller model;
            weight mode: the shared weights + bit-packed masks are stored and served by the routed model).
        router: optional fitted router (``context``, ``learned``, ``centroid`` or ``all``) used when the
            package is called without ``route=``.
        example_inputs: a tensor [B, ...] for tracing, verification and ONNX (default: random tensor of the
            ticket space's example shape).
        onnx: also write ``ticket_<k>.onnx`` (channel mode) and ``router.onnx`` (learned / centroid),
            each checked against PyTorch with onnxruntime.
        verify: check every slim ticket against ``routed(x, route=k)`` (eval mode) on ``example_inputs``
            (``export_ticket``'s check): a slim model that cannot run raises ExportError, a relative difference
            above ``tol`` ExportMismatchError naming the first diverging layer.
    """
    if not isinstance(routed, RoutedModel):
        raise TypeError(f"export_package() needs a RoutedModel, got {type(routed).__name__}.")
    router_entry, router_bytes = (None, None) if router is None else _router_entry(router, routed.num_tickets)
    example_inputs = _example_inputs(routed, example_inputs)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    onnx_meta: dict = {}
    was = routed.training
    routed.eval()
    try:
        if routed.granularity == "channel":
            tickets_meta = _write_slim_tickets(routed, path, example_inputs, onnx=onnx, verify=verify, tol=tol,
                                               files=files, onnx_meta=onnx_meta)
        else:
            tickets_meta = _write_routed(routed, path, onnx=onnx)
        _write_router(router, router_entry, router_bytes, path, example_inputs, onnx=onnx, files=files,
                      onnx_meta=onnx_meta)
    finally:
        routed.train(was)
    body = {
        "granularity": routed.granularity, "num_tickets": routed.num_tickets, "fingerprint": routed.space.fingerprint,
        "space": routed.space.to_dict(), "tickets": tickets_meta, "router": router_entry,
        "example_input_shape": list(example_inputs.shape), "onnx_max_rel_err": onnx_meta, "files": files,
    }
    write_manifest(path / MANIFEST, PACKAGE, body)  # last: a folder with a manifest is complete
    return path


# --------------------------------------------------------------------------- package load
def read_package_manifest(path) -> dict:
    """Read and validate a package's manifest (format, version, required keys, one entry per channel ticket)."""
    mf = Path(path) / MANIFEST
    m = read_manifest(mf, PACKAGE)
    if m["granularity"] == "channel" and len(m["tickets"]) != m["num_tickets"]:
        raise CorruptFileError(f"{mf} lists {len(m['tickets'])} tickets for num_tickets={m['num_tickets']}; "
                               f"{PACKAGE.fix}.")
    return m


def _read_checked(path: Path, name: str, manifest: dict) -> bytes:
    return read_verified(path / name, manifest["files"].get(name), PACKAGE)


def _fresh_model_check(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_package() needs a fresh base model (nn.Module) of the packaged architecture, "
                        f"got {type(model).__name__}.")
    if isinstance(model, (RoutedModel, SlimRoutedModel)) or any(isinstance(m, RoutedBatchNorm) for m in model.modules()):
        raise ArchitectureMismatchError("load_package() needs a fresh, unwrapped model (e.g. timm.create_model(...)), "
                                        "not a RoutedModel or a model already wrapped by rtl.wrap.")


def _load_slim_ticket(path: Path, m: dict, space: TicketSpace, k: int, model: nn.Module) -> nn.Module:
    """Ticket ``k``: a copy of ``model`` pruned by replaying its torch-pruning history, then its weights."""
    entry = m["tickets"][k]
    if not isinstance(entry, dict) or entry.get("ticket") != k or not isinstance(entry.get("history"), list):
        raise CorruptFileError(f"ticket entry {k} of {path / MANIFEST} is damaged; {PACKAGE.fix}.")
    state = tensors_from_bytes(_read_checked(path, entry["file"], m), path / entry["file"], PACKAGE)
    base = copy.deepcopy(model)
    root = base.get_submodule(space.trace_root) if space.trace_root else base
    p = next(root.parameters())
    if space.example_input_shape is None:
        raise CorruptFileError(f"the packaged ticket space has no example input shape; {PACKAGE.fix}.")
    ex = torch.zeros(space.example_input_shape, device=p.device, dtype=p.dtype)
    try:
        prune_copy(base, space.trace_root, entry["history"], ex)  # the export's own pruning path
        base.load_state_dict(state, strict=True)
    except (ExportError, RuntimeError, KeyError, IndexError, ValueError) as e:
        raise ArchitectureMismatchError(f"ticket {k} of {path} does not fit this model after replaying its "
                                        f"pruning history ({type(e).__name__}: {e}); create the same model "
                                        "(name, num_classes, encoder) before loading.") from e
    return base.eval()


def load_package(path, model: nn.Module, *, map_location=None, execution: str = "auto") -> SlimRoutedModel:
    """Load a package written by :func:`export_package` into a :class:`SlimRoutedModel` (eval mode).

    Args:
        path: the package folder.
        model: a fresh instance of the packaged architecture (same constructor arguments); it is copied
            (channel mode: once per ticket, then pruned by replaying the ticket's torch-pruning history).
        map_location: device to move the loaded model to.
        execution: "auto", "grouped" or "bucketed" (``SlimRoutedModel.execution``).
    Raises:
        ArchitectureMismatchError: ``model`` is another architecture. CorruptFileError: a file is missing or
        modified. FormatVersionError: written by a newer rtl-plugin.
    """
    path = Path(path)
    m = read_package_manifest(path)
    _fresh_model_check(model)
    check_fingerprint(model, m, path, PACKAGE)
    K = m["num_tickets"]
    if m["granularity"] == "channel":
        space = TicketSpace.from_dict(m["space"])
        slim = SlimRoutedModel([_load_slim_ticket(path, m, space, k, model) for k in range(K)])
    else:
        slim = SlimRoutedModel(routed=load(path / ROUTED_DIR, model).eval())
    entry = m.get("router")
    if entry is not None:
        if not isinstance(entry, dict):
            raise CorruptFileError(f"the router entry of {path / MANIFEST} is damaged; {PACKAGE.fix}.")
        data = _read_checked(path, entry["file"], m) if entry.get("file") else None
        slim.attach_router(_rebuild_router(entry, K, data, slim, path / ROUTER_FILE))
    if map_location is not None:
        slim.to(map_location)
    slim.execution = execution
    return slim.eval()


def package_size(path) -> int:
    """Bytes on disk of a package folder (all files, recursively)."""
    path = Path(path)
    if not path.is_dir():
        raise CorruptFileError(f"{path} is not a folder; pass a package folder written by export_package.")
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


__all__ = ["SlimRoutedModel", "export_package", "load_package", "export_onnx", "onnx_run", "read_package_manifest",
           "package_size", "PACKAGE_VERSION"]
