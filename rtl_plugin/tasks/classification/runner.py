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

import copy
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from rtl_plugin.errors import DataError, SpaceError


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
    search_epochs: int = 1               # epochs per pruning round (T)
    retrain_epochs: int = 2
    per_ticket_state: bool = True        # RTL joint retraining: one Adam state per ticket, or one shared (False)
    batch_size: int = 64
    lr: float = 2e-3
    image_size: int = 32
    max_per_domain: int | None = 1500    # caps MNIST-5k so the demo fits in a few CPU minutes
    seed: int = 0
    baselines: tuple[str, ...] = ("dense", "single_imp", "single_imp_balanced", "single_imp_context", "multi_imp")
    routers: tuple[str, ...] = ("learned", "centroid")
    equal_storage: bool = True
    shared_norm: bool = False
    device: str = "cpu"
    progress: bool = True
    collapse: str = "warn"               # collapse monitor during the search: off | warn | stop | relax

    @classmethod
    def quick(cls, **kw) -> "ClassificationConfig":
        """A seconds-long setting for tests."""
        base = dict(max_per_domain=48, image_size=16, sparsities=(0.5, 0.75), retrain_epochs=1, batch_size=32,
                    prune_fraction=0.5)
        base.update(kw)
        return cls(**base)


# --------------------------------------------------------------------------- model factory
def make_model_factory(spec: str, num_classes: int, in_chans: int):
    """``"timm:NAME"`` -> a function ``(seed, extra_in_chans=0) -> nn.Module`` giving the same θ0 per seed."""
    if ":" in spec:
        family, name = spec.split(":", 1)
    else:
        family, name = "timm", spec
    if family != "timm":
        raise SpaceError(f"the classification experiment supports timm models ('timm:NAME'), got {spec!r}.")
    try:
        import timm
    except ImportError as e:
        from rtl_plugin.errors import MissingDependencyError
        raise MissingDependencyError('timm is required: pip install "rtl-plugin[timm]"') from e
    if name not in timm.list_models():
        raise SpaceError(f"unknown timm model {name!r}; see timm.list_models().")

    def make(seed: int, extra_in_chans: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return timm.create_model(name, num_classes=num_classes, in_chans=in_chans + extra_in_chans)
    return make


# --------------------------------------------------------------------------- data
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


# --------------------------------------------------------------------------- the run
def run_classification(cfg: ClassificationConfig, out_dir: str | Path) -> dict:
    """Run RTL and its baselines; write results.json, figures and tickets into ``out_dir``; return results."""
    from rtl_plugin import wrap
    from rtl_plugin.tasks.classification.data import load_domains
    from rtl_plugin.tasks.metrics import classification_metrics
    from rtl_plugin.pruning.pruner import RTLPruner
    from rtl_plugin.training.retrain import joint_retrain, retrain_tickets
    from rtl_plugin.comparison.baselines import BalancedLoader, ContextInputModel, CyclicLoader, context_train_step
    from rtl_plugin.diagnostics.similarity import chance_matrix, mean_offdiagonal

    if not isinstance(cfg.per_ticket_state, bool):
        raise DataError(f"per_ticket_state must be True or False, got {cfg.per_ticket_state!r}.")
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(cfg.device)
    log = _Log(True)

    # ---- data and partition
    train, test = load_domains(image_size=cfg.image_size, channels=3, domains=cfg.domains, seed=cfg.seed,
                               max_per_domain=cfg.max_per_domain)
    C = train.num_classes
    make = make_model_factory(cfg.model, C, 3)
    if cfg.partition == "domain":
        assign_train, assign_test = train.domain, test.domain
        names = list(train.domain_names)
    elif cfg.partition == "class":
        assign_train, assign_test = train.y, test.y
        names = list(train.class_names)
    elif cfg.partition == "kmeans":
        from rtl_plugin.routing.partition import by_kmeans, embed
        emb_model = make(cfg.seed)
        _train_plain(emb_model, _all_loader(train.x, train.y, cfg.batch_size, cfg.seed), 1, cfg.lr, dev)
        part = by_kmeans(embed(emb_model, train.x), cfg.num_clusters, seed=cfg.seed, y=train.y,
                         class_names=train.class_names)
        assign_train = part.assignment
        e_tr, e_te = embed(emb_model, train.x), embed(emb_model, test.x)
        cents = torch.stack([e_tr[assign_train == k].mean(0) for k in range(part.num_tickets)])
        assign_test = torch.cdist(e_te, cents).argmin(1)  # test samples join their nearest cluster
        names = part.names
        log(part.describe())
    else:
        raise DataError(f"partition must be 'domain', 'class' or 'kmeans', got {cfg.partition!r}.")
    K = int(assign_train.max()) + 1
    subsets_idx = [(assign_train == k).nonzero().flatten() for k in range(K)]
    loaders = _loaders(train.x, train.y, subsets_idx, cfg.batch_size, cfg.seed)
    M = max(len(dl) for dl in loaders.values())
    xt, yt, ct = test.x.to(dev), test.y, assign_test.to(dev)
    log(f"data: {len(train)} train / {len(test)} test images, {C} classes, K={K} tickets "
        f"({', '.join(f'{n}:{len(i)}' for n, i in zip(names, subsets_idx))}), model {cfg.model}")

    rows: list[dict] = []
    similarity: list[dict] = []
    wall = {"ticket_search": 0.0, "single_imp": 0.0, "multi_imp": 0.0, "joint_retrain": 0.0}
    opt_factory = lambda params: torch.optim.Adam(params, lr=cfg.lr)  # noqa: E731
    example = train.x[:1].to(dev)

    def row(method, routing, sparsity, params, logits, matching="equal_cost", **extra):
        m = classification_metrics(logits, yt, num_classes=C)
        r = {"method": method, "routing": routing, "sparsity": sparsity, "params": int(params),
             "matching": matching, "metrics": {k: round(float(v), 6) for k, v in m.items()}}
        r.update(extra)
        rows.append(r)
        return r

    # ---- RTL: ticket search
    routed = wrap(make(cfg.seed).to(dev), K, example_inputs=example, granularity=cfg.granularity,
                  shared_norm=cfg.shared_norm)
    theta0 = copy.deepcopy(routed.model.state_dict())
    callbacks, monitor = [], None
    if cfg.collapse != "off":
        from rtl_plugin.diagnostics.collapse import CollapseMonitor
        from rtl_plugin.diagnostics.sweep import SweepRecorder
        if cfg.collapse not in ("warn", "stop", "relax"):
            raise DataError(f"collapse must be 'off', 'warn', 'stop' or 'relax', got {cfg.collapse!r}.")
        g = torch.Generator().manual_seed(cfg.seed)
        pick = torch.randperm(len(xt), generator=g)[:256].to(dev)
        xs, ys, cs = xt[pick], yt.to(dev)[pick], ct[pick]

        def subset_accuracy(model, k):  # labels: evaluation only, the monitor never reads it
            sel = cs == k
            if not bool(sel.any()):
                return float("nan")
            was = model.training
            model.eval()
            try:
                with torch.no_grad():
                    return float((model(xs[sel], route=k).argmax(1) == ys[sel]).float().mean())
            finally:
                model.train(was)

        monitor = CollapseMonitor(action=cfg.collapse, recorder=SweepRecorder(probe=xs, metric=subset_accuracy))
        callbacks.append(monitor)
    pruner = RTLPruner(routed, target_sparsity=cfg.sparsities, schedule=cfg.schedule,
                       prune_fraction=cfg.prune_fraction, prune_count=cfg.prune_count, progress=cfg.progress,
                       scope=cfg.scope, order="round" if monitor is not None else "ticket", callbacks=callbacks)
    t = time.perf_counter()
    search = pruner.find_tickets(loaders, epochs_per_round=cfg.search_epochs, optimizer_factory=opt_factory,
                                 device=dev)
    wall["ticket_search"] = time.perf_counter() - t
    log(f"ticket search: {len(search.history)} rounds in {wall['ticket_search']:.1f}s")
    collapse = None
    if monitor is not None:
        monitor.sweep.save(out_dir / "sweep.json")
        w = monitor.warnings[0] if monitor.warnings else None
        collapse = {"action": cfg.collapse, "warning": None if w is None else w.to_dict(), "events": monitor.sweep.events}
        log("collapse monitor: " + ("no collapse predicted" if w is None else
                                    f"collapse predicted at {100 * w.sparsity:.1f}% sparsity ({cfg.collapse})"))
    n_total = routed.space.num_weights

    # ---- routers (label-free inference), trained once on the training inputs and subset ids
    routers = {}
    if cfg.routers:
        from rtl_plugin.routing.routers import create_router, flops_share
        for rname in cfg.routers:
            router = create_router(rname, num_tickets=K)
            router.fit(train.x, assign_train, seed=cfg.seed)
            router = router.to(dev) if isinstance(router, nn.Module) else router
            acc = float(router.accuracy(xt, ct))
            share = float(flops_share(router, make(cfg.seed), example.cpu()))
            routers[rname] = {"router": router, "accuracy": acc, "flops_share": share}
            log(f"router {rname}: routing accuracy {acc:.3f}, FLOPs share {share:.4%}")

    # ---- RTL: joint retraining per target
    saved = {}
    for s in cfg.sparsities:
        tickets = search.tickets_at[s]
        wall["joint_retrain"] += retrain_tickets(routed, theta0, tickets, loaders, lr=cfg.lr, epochs=cfg.retrain_epochs,
                                                 device=dev, progress=cfg.progress,
                                                 per_ticket_state=cfg.per_ticket_state)
        union = tickets.union_count()
        per_ticket = [int(v) for v in tickets.kept()]
        j = tickets.jaccard()
        similarity.append({"sparsity": s, "mean_jaccard": round(mean_offdiagonal(j), 6),
                           "chance": round(mean_offdiagonal(chance_matrix(tickets)), 6), "jaccard": j.tolist(),
                           "union": union, "intersection": tickets.intersection_count()})
        logits = _predict(lambda xb, cb: routed(xb, route=cb), xt, extra=ct)
        row("rtl", "context", s, union, logits, per_ticket_params=per_ticket,
            subset_accuracy=_subset_acc(logits, yt, ct.cpu(), K))
        for rname, info in routers.items():
            router = info["router"]
            logits = _predict(lambda xb, cb: routed(xb, route=router(xb)), xt)
            row("rtl", rname, s, union, logits, routing_accuracy=round(info["accuracy"], 6),
                router_flops_share=info["flops_share"])
        folder = out_dir / "tickets" / f"sparsity_{int(round(s * 100)):02d}"
        routed.save(folder, extra={"sparsity": s, "ticket_names": names, "config": _jsonable(asdict(cfg))})
        saved[s] = folder.relative_to(out_dir).as_posix()  # relative: the run folder can be moved
        routed.train()

    budget_batches = M * K  # presentations per retraining epoch, equal for every method

    # ---- dense
    if "dense" in cfg.baselines:
        dense = make(cfg.seed).to(dev)
        _train_plain(dense, CyclicLoader(_all_loader(train.x, train.y, cfg.batch_size, cfg.seed), budget_batches),
                     cfg.retrain_epochs, cfg.lr, dev)
        dense.eval()
        logits = _predict(lambda xb, cb: dense(xb), xt)
        row("dense", "context", 0.0, n_total, logits)

    # ---- single-mask IMP variants
    union_sparsities = {s: round(1 - search.tickets_at[s].union_count() / n_total, 6) for s in cfg.sparsities}
    for method in ("single_imp", "single_imp_balanced", "single_imp_context"):
        if method not in cfg.baselines:
            continue
        t = time.perf_counter()
        if method == "single_imp_context":
            base = make(cfg.seed, extra_in_chans=4)
            model1 = ContextInputModel(base, K, embed_dim=4).to(dev)
            ex = (example, torch.zeros(1, dtype=torch.long, device=dev))
            cls_name = "base." + _classifier_name(base)
            r1 = wrap(model1, 1, example_inputs=ex, adapter="generic", output_layers=[cls_name],
                      ignored_layers=["embed"], shared_norm=cfg.shared_norm)
            search_loader = BalancedLoader(loaders, with_context=True)
            step = context_train_step()
        else:
            r1 = wrap(make(cfg.seed).to(dev), 1, example_inputs=example, granularity=cfg.granularity,
                      shared_norm=cfg.shared_norm)
            search_loader = (BalancedLoader(loaders) if method == "single_imp_balanced"
                             else CyclicLoader(_all_loader(train.x, train.y, cfg.batch_size, cfg.seed),
                                               sum(len(dl) for dl in loaders.values())))
            step = None
        targets = sorted(set(cfg.sparsities) | (set(union_sparsities.values()) if (cfg.equal_storage and method == "single_imp") else set()))
        targets = [t_ for t_ in targets if 0 <= t_ < 1]
        theta1 = copy.deepcopy(r1.model.state_dict())
        p1 = RTLPruner(r1, target_sparsity=targets, schedule=cfg.schedule, prune_fraction=cfg.prune_fraction,
                       prune_count=cfg.prune_count, progress=cfg.progress, scope=cfg.scope)
        # per round one pass over all data, like the K per-subset searches together
        search_len = sum(len(dl) for dl in loaders.values())
        res1 = p1.find_tickets({0: CyclicLoader(search_loader, search_len)}, train_step=step,
                               epochs_per_round=cfg.search_epochs, optimizer_factory=opt_factory, device=dev)
        for s1 in targets:
            retrain_tickets(r1, theta1, res1.tickets_at[s1], {0: CyclicLoader(search_loader, budget_batches)},
                            lr=cfg.lr, epochs=cfg.retrain_epochs, train_step=step, device=dev, progress=cfg.progress)
            if method == "single_imp_context":
                logits = _predict(lambda xb, cb: r1(xb, cb, route=0), xt, extra=ct)
            else:
                logits = _predict(lambda xb, cb: r1(xb, route=0), xt)
            kept = int(res1.tickets_at[s1].kept()[0])
            if s1 in cfg.sparsities:
                row(method, "context" if method == "single_imp_context" else "none", s1, kept, logits,
                    matching="equal_cost", subset_accuracy=_subset_acc(logits, yt, ct.cpu(), K))
            for s, us in union_sparsities.items():
                if method == "single_imp" and abs(us - s1) < 1e-9:
                    row(method, "none", s, kept, logits, matching="equal_storage", single_sparsity=s1,
                        subset_accuracy=_subset_acc(logits, yt, ct.cpu(), K))
            r1.train()
        if method == "single_imp":
            wall["single_imp"] = time.perf_counter() - t
        log(f"{method}: done in {time.perf_counter() - t:.1f}s")

    # ---- multi-model IMP: K independent models; per-subset IMP from the same θ0 gives exactly the
    # masks of RTL's ticket search, so they are reused; each model is retrained alone on its subset.
    if "multi_imp" in cfg.baselines:
        t = time.perf_counter()
        for s in cfg.sparsities:
            tickets = search.tickets_at[s]
            logits = torch.zeros(len(yt), C)
            for k in range(K):
                mk = wrap(make(cfg.seed).to(dev), 1, example_inputs=example, granularity=cfg.granularity,
                          shared_norm=cfg.shared_norm)
                mk.set_tickets(_single_ticket(mk.space, tickets, k))
                joint_retrain(mk, {0: CyclicLoader(loaders[k], M)},
                              optimizer=torch.optim.Adam(mk.parameters(), lr=cfg.lr),
                              epochs=cfg.retrain_epochs, device=dev, progress=False)
                mk.eval()
                sel = (ct.cpu() == k).nonzero().flatten()
                if len(sel):
                    logits[sel] = _predict(lambda xb, cb: mk(xb, route=0), xt[sel.to(dev)])
            row("multi_imp", "context", s, int(tickets.kept().sum()), logits,
                subset_accuracy=_subset_acc(logits, yt, ct.cpu(), K))
        wall["multi_imp"] = time.perf_counter() - t + wall["ticket_search"]
        log(f"multi_imp: done in {time.perf_counter() - t:.1f}s")

    results = {
        "task": "classification", "dataset": cfg.dataset, "model": cfg.model, "granularity": cfg.granularity,
        "num_tickets": K, "seed": cfg.seed, "device": str(dev),
        "ticket_names": names, "partition": cfg.partition, "prunable_weights": n_total,
        "rows": rows, "similarity": similarity, "collapse": collapse,
        "routers": {n: {"accuracy": round(i["accuracy"], 6), "flops_share": i["flops_share"]} for n, i in routers.items()},
        "wall_time_s": {k: round(v, 3) for k, v in wall.items()},
        "total_time_s": round(time.perf_counter() - t_start, 3),
        "tickets": saved,
        "config": _jsonable(asdict(cfg)),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
    }
    from rtl_plugin.persist.io import atomic_write_json
    atomic_write_json(out_dir / "results.json", results)
    try:
        from rtl_plugin.diagnostics.plots import plot_classification_results
        results["figures"] = plot_classification_results(results, out_dir)
        atomic_write_json(out_dir / "results.json", results)
    except ImportError as e:  # matplotlib missing: results stay valid without figures
        log(f"figures skipped ({e}); pip install 'rtl-plugin[plots]'")
    return results


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


def _single_ticket(space, tickets, k):
    from rtl_plugin.tickets import TicketSet
    return TicketSet(space, {n: m[k:k + 1].clone() for n, m in tickets.masks.items()})


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


__all__ = ["ClassificationConfig", "run_classification", "format_table", "make_model_factory"]
