"""The classification experiment behind ``rtl demo`` and ``rtl prune``: RTL against the paper's baselines.

Steps (all methods start from the same θ0 and get the same number of sample presentations):
1. data: heterogeneous domains (UCI digits, MNIST-5k, LFW faces, ...), partitioned into K subsets
   (by domain, by class, or label-free by k-means);
2. RTL: per-subset IMP ticket search, then joint retraining per target sparsity;
3. baselines: dense, single IMP (shuffled), single IMP (balanced batches), single IMP with context
   input, multi-model IMP;
4. routers for label-free inference (learned gate, nearest centroid);
5. results.json (stable schema), figures, saved tickets.
"""
from __future__ import annotations

import json
import platform
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn

from rtl_plugin import wrap
from rtl_plugin.comparison.learned import LearnedOptions
from rtl_plugin.comparison.baselines import BalancedLoader, ContextInputModel, CyclicLoader, context_train_step
from rtl_plugin.comparison.protocol import (METHODS, ComparisonConfig, ComparisonTask, Evaluation, SingleImpSetup,
                                            compare)
from rtl_plugin.diagnostics.collapse import CollapseMonitor
from rtl_plugin.diagnostics.sweep import SweepRecorder
from rtl_plugin.errors import DataError, MissingDependencyError, SpaceError
from rtl_plugin.routing.partition import by_kmeans, embed
from rtl_plugin.routing.gate import matched_accuracy
from rtl_plugin.routing.routers import create_router, flops_share
from rtl_plugin.tasks.classification.data import load_domains
from rtl_plugin.tasks.metrics import classification_metrics
from rtl_plugin._deprecated import renamed_fields


@renamed_fields({"search_epochs": "epochs_per_round"})
@dataclass
class ClassificationConfig:
    """Settings of one classification run (defaults: the ``rtl demo`` main job)."""
    model: str = "timm:test_resnet"
    dataset: str = "digits-domains"
    domains: tuple[str, ...] = ("digits", "mnist", "lfw")
    partition: str = "domain"            # domain | class | kmeans
    num_clusters: int = 3                # kmeans only
    granularity: str = "weight"
    sparsities: tuple[float, ...] = (0.5, 0.75, 0.9)
    schedule: str = "fraction"
    prune_fraction: float = 0.5
    prune_count: int | None = None
    scope: str = "global"                # global magnitude ranking (paper) | layer
    epochs_per_round: int = 1            # epochs per pruning round (T); was search_epochs
    retrain_epochs: int = 2
    per_ticket_state: bool = True        # RTL joint retraining: one Adam state per ticket, or one shared (False)
    batch_size: int = 64
    lr: float = 2e-3
    image_size: int | None = 32          # None (image folders only): the model's own input size
    max_per_domain: int | None = 1500    # caps MNIST-5k so the demo fits in a few CPU minutes
    seed: int = 0
    baselines: tuple[str, ...] = ("dense", "single_imp", "single_imp_balanced", "single_imp_context", "multi_imp")
    routers: tuple[str, ...] = ("learned", "centroid")
    equal_storage: bool = True
    shared_norm: bool = False
    device: str = "cpu"
    progress: bool = True
    collapse: str = "warn"               # collapse monitor during the search: off | warn | stop | relax
    # the user's own data (rtl_plugin.tasks.folders): an ImageFolder tree instead of the built-in domains
    data_dir: str | None = None          # DIR/<class>/<image>; domains are then the contexts (or one "all")
    val_dir: str | None = None           # test images (same layout); default: a seeded val_fraction of data_dir
    val_fraction: float = 0.25
    contexts: str | None = None          # CSV "relative path,context": one domain (ticket) per context
    unreadable: str = "skip"             # unreadable image files: skip (counted) | error
    checkpoint: str | None = None        # timm weights file (safetensors / weights-only torch) for the model
    tickets: str = "imp"                 # RTL's tickets: imp (the paper's search) | learned (scores + joint gate)
    learned_routing: str = "gate"        # learned: gate (label-free) | groups (the partition's subsets)
    learned_backbone: str = "frozen"     # learned: frozen (only scores, gate, classifier learn) | train

    @classmethod
    def quick(cls, **kw) -> "ClassificationConfig":
        """A seconds-long setting for tests."""
        base = dict(max_per_domain=48, image_size=16, sparsities=(0.5, 0.75), retrain_epochs=1, batch_size=32,
                    prune_fraction=0.5)
        base.update(kw)
        return cls(**base)


# --------------------------------------------------------------------------- model factory
def make_model_factory(spec: str, num_classes: int, in_chans: int, *, checkpoint=None):
    """``"timm:NAME"`` -> a function ``(seed, extra_in_chans=0) -> nn.Module`` giving the same θ0 per seed;
    with ``checkpoint`` (a :class:`~rtl_plugin.tasks.classification.checkpoints.CheckpointInfo`) θ0 is the
    checkpoint's weights with a ``num_classes`` classifier."""
    if ":" in spec:
        family, name = spec.split(":", 1)
    else:
        family, name = "timm", spec
    if family != "timm":
        raise SpaceError(f"the classification experiment supports timm models ('timm:NAME'), got {spec!r}.")
    try:
        import timm
    except ImportError as e:
        raise MissingDependencyError('timm is required: pip install "rtl-plugin[timm]"') from e
    if name not in timm.list_models():
        raise SpaceError(f"unknown timm model {name!r}; see timm.list_models().")

    def make(seed: int, extra_in_chans: int = 0) -> nn.Module:
        if checkpoint is not None:
            from rtl_plugin.tasks.classification.checkpoints import create_from_checkpoint
            return create_from_checkpoint(name, checkpoint, num_classes=num_classes,
                                          in_chans=in_chans + extra_in_chans, seed=seed)
        torch.manual_seed(seed)
        return timm.create_model(name, num_classes=num_classes, in_chans=in_chans + extra_in_chans)
    return make


# --------------------------------------------------------------------------- data
def _timm_name(spec: str) -> str:
    return spec.split(":", 1)[1] if ":" in spec else spec


def checkpoint_info(cfg: ClassificationConfig):
    """The run's checkpoint (None without one); read once, its class count decides the classifier."""
    if cfg.checkpoint is None:
        return None
    from rtl_plugin.tasks.classification.checkpoints import inspect_checkpoint
    make_model_factory(cfg.model, 2, 3)  # validates the model name before the file is read
    return inspect_checkpoint(_timm_name(cfg.model), cfg.checkpoint)


def folder_transform(model: str, image_size: int | None):
    """timm's evaluation transform for ``model`` (resize, centre crop, normalisation of its data config) at
    ``image_size`` (None: the model's own input size), and the image size it yields."""
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg
    pre = get_pretrained_cfg(_timm_name(model))
    args = {} if image_size is None else {"input_size": (3, int(image_size), int(image_size))}
    data_cfg = resolve_data_config(args, pretrained_cfg=pre.to_dict() if pre is not None else None)
    return create_transform(**data_cfg, is_training=False), int(data_cfg["input_size"][-1])


def load_task_data(cfg: ClassificationConfig, *, progress: bool = False, log=print):
    """``(train, test, data info or None)``: the built-in domains, or the ImageFolder ``cfg.data_dir``."""
    if cfg.data_dir is None:
        train, test = load_domains(image_size=cfg.image_size, channels=3, domains=cfg.domains, seed=cfg.seed,
                                   max_per_domain=cfg.max_per_domain)
        return train, test, None
    from rtl_plugin.tasks.folders import load_image_folder
    make_model_factory(cfg.model, 2, 3)  # a clean error for an unknown model before any image is read
    if cfg.image_size is not None and (not isinstance(cfg.image_size, int) or cfg.image_size < 8):
        raise DataError(f"image_size must be an integer >= 8 or None (the model's own), got {cfg.image_size!r}.")
    transform, size = folder_transform(cfg.model, cfg.image_size)
    data = load_image_folder(cfg.data_dir, transform=transform, image_size=size, val_dir=cfg.val_dir,
                             val_fraction=cfg.val_fraction, contexts=cfg.contexts, seed=cfg.seed,
                             max_per_context=cfg.max_per_domain, unreadable=cfg.unreadable, progress=progress,
                             log=log)
    for note in data.notes:
        log(note)
    return data.train, data.test, {**data.info(), "image_size": size}


def _loaders(x, y, subsets_idx, batch_size, seed):
    from torch.utils.data import DataLoader, TensorDataset
    out = {}
    for k, idx in enumerate(subsets_idx):
        if len(idx) == 0:
            raise DataError(f"subset {k} is empty; choose fewer tickets or another partition.")
        g = torch.Generator().manual_seed(seed * 1000 + k)
        out[k] = DataLoader(TensorDataset(x[idx], y[idx]), batch_size=batch_size, shuffle=True, generator=g)
    return out


def _all_loader(x, y, batch_size, seed):
    from torch.utils.data import DataLoader, TensorDataset
    g = torch.Generator().manual_seed(seed * 1000 + 999)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=g)


@torch.no_grad()
def _predict(fn, x, batch_size=256, extra=None):
    outs = []
    for i in range(0, x.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        outs.append(fn(x[sl], None if extra is None else extra[sl]).float().cpu())
    return torch.cat(outs)


# --------------------------------------------------------------------------- the task
class ClassificationTask(ComparisonTask):
    """Classification's pieces of the comparison protocol: domains, a timm model, cross-entropy, accuracy metrics,
    a collapse monitor during the search and routers for label-free inference."""
    name = "classification"

    def __init__(self, cfg: ClassificationConfig, out_dir: Path):
        self.cfg, self.out_dir = cfg, out_dir
        self.dev = torch.device(cfg.device)
        self.log = _Log(True)
        self.t_start = time.perf_counter()
        self.collapse, self.monitor, self.routers = None, None, {}
        self._load_data()

    # ---- data
    def _load_data(self) -> None:
        cfg = self.cfg
        self.checkpoint = checkpoint_info(cfg)
        self.train, self.test, self.data_info = load_task_data(cfg, progress=cfg.progress, log=self.log)
        self.num_classes = self.train.num_classes
        self.make = make_model_factory(cfg.model, self.num_classes, 3, checkpoint=self.checkpoint)
        if self.checkpoint is not None:
            self.log(self.checkpoint.head_message(self.num_classes))
        self.assign_train, assign_test, self.names = self._partition()
        K = int(self.assign_train.max()) + 1
        subsets_idx = [(self.assign_train == k).nonzero().flatten() for k in range(K)]
        self.loaders = _loaders(self.train.x, self.train.y, subsets_idx, cfg.batch_size, cfg.seed)
        self.batches_per_ticket = max(len(dl) for dl in self.loaders.values())
        self.xt, self.yt, self.ct = self.test.x.to(self.dev), self.test.y, assign_test.to(self.dev)
        self.example = self.train.x[:1].to(self.dev)
        self.log(f"data: {len(self.train)} train / {len(self.test)} test images, {self.num_classes} classes, "
                 f"K={K} tickets ({', '.join(f'{n}:{len(i)}' for n, i in zip(self.names, subsets_idx))}), "
                 f"model {cfg.model}")

    def _partition(self):
        """Subset ids of the train and test images, and the subsets' names."""
        cfg, train, test = self.cfg, self.train, self.test
        if cfg.partition == "domain" and cfg.data_dir is not None and cfg.contexts is None:
            raise DataError("partition 'domain' on an image folder needs the contexts: pass --contexts FILE.csv "
                            "('relative path,context' rows), or --partition class / --partition kmeans.")
        if cfg.partition == "domain":
            return train.domain, test.domain, list(train.domain_names)
        if cfg.partition == "class":
            return train.y, test.y, list(train.class_names)
        if cfg.partition != "kmeans":
            raise DataError(f"partition must be 'domain', 'class' or 'kmeans', got {cfg.partition!r}.")
        emb_model = self.make(cfg.seed)
        _train_plain(emb_model, self._all_loader(), 1, cfg.lr, self.dev)
        part = by_kmeans(embed(emb_model, train.x), cfg.num_clusters, seed=cfg.seed, y=train.y,
                         class_names=train.class_names)
        e_tr, e_te = embed(emb_model, train.x), embed(emb_model, test.x)
        cents = torch.stack([e_tr[part.assignment == k].mean(0) for k in range(part.num_tickets)])
        self.log(part.describe())
        return part.assignment, torch.cdist(e_te, cents).argmin(1), part.names  # test joins its nearest cluster

    def _all_loader(self):
        return _all_loader(self.train.x, self.train.y, self.cfg.batch_size, self.cfg.seed)

    def ticket_loaders(self) -> dict:
        return self.loaders

    def multi_imp_loader(self, k: int):
        return CyclicLoader(self.loaders[k], self.batches_per_ticket)

    # ---- models
    def build_routed(self, num_tickets: int):
        cfg = self.cfg
        return wrap(self.make(cfg.seed).to(self.dev), num_tickets, example_inputs=self.example,
                    granularity=cfg.granularity, shared_norm=cfg.shared_norm)

    def search_options(self, routed) -> dict:
        self.monitor = _collapse_monitor(self.cfg, self.xt, self.yt, self.ct, self.dev)
        return {"order": "round" if self.monitor is not None else "ticket",
                "callbacks": [] if self.monitor is None else [self.monitor]}

    def after_search(self, routed, search) -> None:
        if self.cfg.tickets == "learned":
            self.log("learned tickets: " + "; ".join(
                f"{int(r['sparsity'] * 100)}% gate accuracy {r['gate_accuracy'] or 0:.3f}, routes {r['route_counts']}"
                for r in search.summary()))
        else:
            self.log(f"ticket search: {len(search.history)} rounds")
        if self.monitor is not None:
            self.monitor.sweep.save(self.out_dir / "sweep.json")
            w = self.monitor.warnings[0] if self.monitor.warnings else None
            self.collapse = {"action": self.cfg.collapse, "warning": None if w is None else w.to_dict(),
                             "events": self.monitor.sweep.events}
            self.log("collapse monitor: " + ("no collapse predicted" if w is None else
                                             f"collapse predicted at {100 * w.sparsity:.1f}% sparsity "
                                             f"({self.cfg.collapse})"))
        self._fit_routers()

    def _fit_routers(self) -> None:
        """Routers for label-free inference, trained once on the training inputs and subset ids."""
        K = len(self.loaders)
        for rname in self.cfg.routers:
            router = create_router(rname, num_tickets=K)
            router.fit(self.train.x, self.assign_train, seed=self.cfg.seed)
            router = router.to(self.dev) if isinstance(router, nn.Module) else router
            acc = float(router.accuracy(self.xt, self.ct))
            share = float(flops_share(router, self.make(self.cfg.seed), self.example.cpu()))
            self.routers[rname] = {"router": router, "accuracy": acc, "flops_share": share}
            self.log(f"router {rname}: routing accuracy {acc:.3f}, FLOPs share {share:.4%}")

    # ---- evaluation
    def _evaluation(self, routing: str, logits: torch.Tensor, with_subsets: bool = True, **extras) -> Evaluation:
        if with_subsets:
            extras["subset_accuracy"] = _subset_acc(logits, self.yt, self.ct.cpu(), len(self.loaders))
        return Evaluation(routing, classification_metrics(logits, self.yt, num_classes=self.num_classes), extras)

    def evaluate_rtl(self, routed, tickets, sparsity: float) -> list[Evaluation]:
        out = [self._evaluation("context", _predict(lambda xb, cb: routed(xb, route=cb), self.xt, extra=self.ct))]
        for rname, info in self.routers.items():
            router = info["router"]
            logits = _predict(lambda xb, cb: routed(xb, route=router(xb)), self.xt)
            out.append(self._evaluation(rname, logits, with_subsets=False,
                                        routing_accuracy=round(info["accuracy"], 6),
                                        router_flops_share=info["flops_share"]))
        return out

    def evaluate_gate(self, routed, gate, sparsity: float) -> Evaluation:
        """The jointly trained gate's routing (label-free tickets: accuracy matched to the subsets)."""
        routes = gate(self.xt)
        if self.cfg.learned_routing == "gate":
            accuracy = matched_accuracy(routes, self.ct, len(self.loaders))[0]
        else:
            accuracy = float((routes == self.ct).float().mean())
        logits = _predict(lambda xb, cb: routed(xb, route=gate(xb)), self.xt)
        share = float(flops_share(gate, self.make(self.cfg.seed), self.example.cpu()))
        return self._evaluation("gate", logits, with_subsets=False, routing_accuracy=round(float(accuracy), 6),
                                router_flops_share=share)

    def classifier_names(self, routed) -> list[str]:
        return [_classifier_name(routed.model)]

    def ticket_metadata(self, sparsity: float) -> dict:
        return {"sparsity": sparsity, "ticket_names": self.names, "config": _jsonable(asdict(self.cfg))}

    def train_dense(self) -> Evaluation:
        dense = self.make(self.cfg.seed).to(self.dev)
        budget = CyclicLoader(self._all_loader(), self.batches_per_ticket * len(self.loaders))
        _train_plain(dense, budget, self.cfg.retrain_epochs, self.cfg.lr, self.dev)
        dense.eval()
        return self._evaluation("context", _predict(lambda xb, cb: dense(xb), self.xt), with_subsets=False)

    def single_imp_setup(self, method: str) -> SingleImpSetup:
        cfg, loaders = self.cfg, self.loaders
        search_len = sum(len(dl) for dl in loaders.values())  # per round one pass over all data
        budget = self.batches_per_ticket * len(loaders)
        if method == "single_imp_context":
            base = self.make(cfg.seed, extra_in_chans=4)
            model = ContextInputModel(base, len(loaders), embed_dim=4).to(self.dev)
            ex = (self.example, torch.zeros(1, dtype=torch.long, device=self.dev))
            routed = wrap(model, 1, example_inputs=ex, adapter="generic",
                          output_layers=["base." + _classifier_name(base)], ignored_layers=["embed"],
                          shared_norm=cfg.shared_norm)
            return SingleImpSetup(routed, BalancedLoader(loaders, with_context=True), search_len, budget,
                                  context_train_step())
        routed = self.build_routed(1)
        loader = (BalancedLoader(loaders) if method == "single_imp_balanced"
                  else CyclicLoader(self._all_loader(), search_len))
        return SingleImpSetup(routed, loader, search_len, budget)

    def evaluate_single(self, routed, method: str, tickets, sparsity: float) -> Evaluation:
        if method == "single_imp_context":
            return self._evaluation("context", _predict(lambda xb, cb: routed(xb, cb, route=0), self.xt,
                                                        extra=self.ct))
        return self._evaluation("none", _predict(lambda xb, cb: routed(xb, route=0), self.xt))

    def multi_imp_output(self, model, k: int):
        sel = (self.ct.cpu() == k).nonzero().flatten()
        return sel, (_predict(lambda xb, cb: model(xb, route=0), self.xt[sel.to(self.dev)]) if len(sel) else None)

    def evaluate_multi(self, outputs: list, sparsity: float) -> Evaluation:
        logits = torch.zeros(len(self.yt), self.num_classes)
        for sel, part in outputs:
            if part is not None:
                logits[sel] = part
        return self._evaluation("context", logits)

    def similarity_extras(self, tickets) -> dict:
        return {"jaccard": tickets.jaccard().tolist()}

    def describe(self, results: dict) -> dict:
        cfg = self.cfg
        extra = {} if self.data_info is None else {"data": self.data_info}
        if self.checkpoint is not None:
            extra["checkpoint"] = {**self.checkpoint.to_dict(),
                                   "classifier_reset": self.checkpoint.num_classes != self.num_classes}
        return {**extra, "task": "classification", "dataset": cfg.dataset, "model": cfg.model,
                "granularity": cfg.granularity,
                "seed": cfg.seed, "ticket_names": self.names, "partition": cfg.partition, "collapse": self.collapse,
                "routers": {n: {"accuracy": round(i["accuracy"], 6), "flops_share": i["flops_share"]}
                            for n, i in self.routers.items()},
                "total_time_s": round(time.perf_counter() - self.t_start, 3), "config": _jsonable(asdict(cfg)),
                "machine": {"python": platform.python_version(), "torch": torch.__version__,
                            "cpu_threads": torch.get_num_threads(), "platform": platform.platform()}}


def _collapse_monitor(cfg: ClassificationConfig, xt, yt, ct, dev):
    """The collapse monitor of the ticket search, probing 256 test images (None when ``collapse='off'``)."""
    if cfg.collapse == "off":
        return None
    if cfg.collapse not in ("warn", "stop", "relax"):
        raise DataError(f"collapse must be 'off', 'warn', 'stop' or 'relax', got {cfg.collapse!r}.")
    g = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(len(xt), generator=g)[:256].to(dev)
    return CollapseMonitor(action=cfg.collapse,
                           recorder=SweepRecorder(probe=xt[pick], metric=_SubsetAccuracy(xt[pick], yt.to(dev)[pick],
                                                                                         ct[pick])))


class _SubsetAccuracy:
    """Accuracy of ticket k on the probe images of subset k (labels: evaluation only, the monitor never reads them)."""

    def __init__(self, xs, ys, cs):
        self.xs, self.ys, self.cs = xs, ys, cs

    def __call__(self, model, k: int) -> float:
        sel = self.cs == k
        if not bool(sel.any()):
            return float("nan")
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return float((model(self.xs[sel], route=k).argmax(1) == self.ys[sel]).float().mean())
        finally:
            model.train(was)


# --------------------------------------------------------------------------- the run
def comparison_config(cfg: ClassificationConfig) -> ComparisonConfig:
    """The protocol's settings of a classification run (baselines in the protocol's canonical order)."""
    baselines = tuple(m for m in METHODS if m != "rtl" and m in cfg.baselines)
    return ComparisonConfig(sparsities=tuple(cfg.sparsities), methods=("rtl", *baselines), schedule=cfg.schedule,
                            prune_fraction=cfg.prune_fraction, prune_count=cfg.prune_count, scope=cfg.scope,
                            epochs_per_round=cfg.epochs_per_round, retrain_epochs=cfg.retrain_epochs, lr=cfg.lr,
                            per_ticket_state=cfg.per_ticket_state, equal_storage=cfg.equal_storage,
                            device=torch.device(cfg.device), progress=cfg.progress, tickets=cfg.tickets,
                            learned=LearnedOptions(routing=cfg.learned_routing, backbone=cfg.learned_backbone,
                                                   epochs=cfg.retrain_epochs, seed=cfg.seed))


def config_from_dict(d: dict) -> ClassificationConfig:
    """The ClassificationConfig a run recorded (``results["config"]``); unknown keys are ignored."""
    if not isinstance(d, dict):
        raise DataError(f"a run's config must be a dict (results.json 'config'), got {type(d).__name__}.")
    names = {f.name for f in fields(ClassificationConfig)}
    return ClassificationConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def run_classification(config: ClassificationConfig | None = None, out_dir: str | Path = "rtl-runs/classification",
                       *, cfg: ClassificationConfig | None = None) -> dict:
    """Run RTL and its baselines; write results.json, figures and tickets into ``out_dir``; return results.

    ``cfg=`` is the deprecated name of ``config``."""
    if cfg is not None:
        if config is not None:
            raise DataError("run_classification got both config and cfg=; pass config only (cfg is its old name).")
        warnings.warn("run_classification(cfg=...) is deprecated and will be removed in the next version; use "
                      "run_classification(config, out_dir).", DeprecationWarning, stacklevel=2)
    cfg = config if config is not None else (cfg if cfg is not None else ClassificationConfig())
    if not isinstance(cfg, ClassificationConfig):
        raise DataError(f"config must be a ClassificationConfig, got {type(cfg).__name__}.")
    if not isinstance(cfg.per_ticket_state, bool):
        raise DataError(f"per_ticket_state must be True or False, got {cfg.per_ticket_state!r}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = ClassificationTask(cfg, out_dir)
    return compare(task, comparison_config(cfg), out_dir)


# --------------------------------------------------------------------------- helpers
class _Log:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            from tqdm.auto import tqdm
            tqdm.write(msg)


def _classifier_name(model: nn.Module) -> str:
    head = model.get_classifier()
    return {m: n for n, m in model.named_modules()}[head]


def _subset_acc(logits, y, ctx, K) -> list[float]:
    pred = logits.argmax(1)
    return [round(float((pred[ctx == k] == y[ctx == k]).float().mean()), 6) if (ctx == k).any() else None
            for k in range(K)]


def _train_plain(model: nn.Module, loader, epochs: int, lr: float, device) -> None:
    import torch.nn.functional as F
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


def format_table(results: dict, metric: str = "balanced_accuracy") -> str:
    """Methods x sparsities table, shaped like the paper's (metric and parameters)."""
    sps = sorted({r["sparsity"] for r in results["rows"] if r["method"] != "dense"})
    keys = []
    for r in results["rows"]:
        key = (r["method"], r["routing"], r.get("matching", "equal_cost"))
        if key not in keys:
            keys.append(key)
    head = f"{'method':<22s}{'routing':<10s}{'matching':<14s}" + "".join(f"{f'{int(s*100)}%':>18s}" for s in sps)
    lines = [f"{metric} / #params (prunable weights)", head, "-" * len(head)]
    for key in keys:
        cells = []
        for s in sps:
            hit = [r for r in results["rows"] if (r["method"], r["routing"], r.get("matching", "equal_cost")) == key
                   and (r["sparsity"] == s or r["method"] == "dense")]
            if hit:
                r = hit[0]
                cells.append(f"{r['metrics'][metric]:.3f} / {_short(r['params'])}".rjust(18))
            else:
                cells.append(" " * 15 + "  -")
        lines.append(f"{key[0]:<22s}{key[1]:<10s}{key[2]:<14s}" + "".join(cells))
    return "\n".join(lines)


def _short(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


__all__ = ["ClassificationConfig", "run_classification", "format_table", "make_model_factory", "load_task_data",
           "folder_transform", "checkpoint_info", "config_from_dict"]
