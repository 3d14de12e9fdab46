"""The ``rtl`` command line: demo, prune, info, diagnose."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rtl_plugin._deprecated import add_deprecated_flag
from rtl_plugin.diagnostics.report import diagnose_run
from rtl_plugin.errors import RTLError
from rtl_plugin.persist.io import load
from rtl_plugin.persist.package import export_package
from rtl_plugin.persist.run_folder import read_results, saved_tickets
from rtl_plugin.routing.routers import create_router
from rtl_plugin.training.distributed import init_from_env, is_main_process, local_device, shutdown
from rtl_plugin.wrapping import resolve_adapter, wrap


def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in s.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.5,0.75,0.9, got {s!r}") from e


def _default_out() -> str:
    return str(Path("rtl-runs") / time.strftime("%Y%m%d-%H%M%S"))


def _add_run_args(p: argparse.ArgumentParser, *, demo: bool) -> None:
    p.add_argument("--out", default=None, help="output folder (default rtl-runs/<timestamp>)")
    p.add_argument("--quick", action="store_true", help="a seconds-long run on a small slice of the data (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if demo:
        return
    p.add_argument("--model", default="timm:test_resnet", help="timm:NAME (any timm classifier)")
    p.add_argument("--domains", default="digits,mnist,lfw", help="comma-separated: digits, mnist, lfw, fashion")
    p.add_argument("--partition", default="domain", choices=["domain", "class", "kmeans"])
    p.add_argument("--clusters", type=int, default=3, help="number of k-means clusters (--partition kmeans)")
    p.add_argument("--granularity", default="weight", choices=["weight", "channel"])
    p.add_argument("--sparsities", type=_floats, default=(0.5, 0.75, 0.9))
    p.add_argument("--schedule", default="fraction", choices=["fraction", "count"])
    p.add_argument("--prune-fraction", type=float, default=0.5)
    p.add_argument("--prune-count", type=int, default=None)
    p.add_argument("--scope", default="global", choices=["global", "layer"],
                   help="weight ranking: one global magnitude ranking (paper) or per layer")
    p.add_argument("--epochs-per-round", type=int, default=1, help="training epochs per pruning round")
    add_deprecated_flag(p, "--search-epochs", "--epochs-per-round", type=int)
    p.add_argument("--retrain-epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--max-per-domain", type=int, default=1500, help="cap per domain (0 = all data)")
    p.add_argument("--baselines", default="dense,single_imp,single_imp_balanced,single_imp_context,multi_imp")
    p.add_argument("--routers", default="learned,centroid")
    p.add_argument("--shared-norm", action="store_true", help="one set of BN statistics for all tickets (the paper)")
    p.add_argument("--collapse", default="warn", choices=["off", "warn", "stop", "relax"],
                   help="collapse monitor during the search: record only (warn), stop at / relax before the "
                        "predicted collapse and keep the last healthy masks, or off")


def _run(args, *, demo: bool, _replica: bool = False) -> int:
    from rtl_plugin.tasks.classification.runner import ClassificationConfig, format_table, run_classification
    args.device = local_device(args.device)  # torchrun: --device cuda means this rank's GPU
    if not is_main_process() and not _replica:
        return _run_replica(args, demo=demo)
    kw = dict(seed=args.seed, device=args.device, progress=not args.no_progress)
    if not demo:
        kw.update(model=args.model, domains=tuple(d for d in args.domains.split(",") if d), partition=args.partition,
                  num_clusters=args.clusters, granularity=args.granularity, sparsities=args.sparsities,
                  schedule=args.schedule, prune_fraction=args.prune_fraction, prune_count=args.prune_count, scope=args.scope,
                  epochs_per_round=args.epochs_per_round, retrain_epochs=args.retrain_epochs, batch_size=args.batch_size,
                  lr=args.lr, image_size=args.image_size, max_per_domain=args.max_per_domain or None,
                  baselines=tuple(b for b in args.baselines.split(",") if b),
                  routers=tuple(r for r in args.routers.split(",") if r), shared_norm=args.shared_norm,
                  collapse=args.collapse)
    cfg = ClassificationConfig.quick(**kw) if args.quick else ClassificationConfig(**kw)
    out = args.out or _default_out()
    print(f"rtl {'demo' if demo else 'prune'}: RTL vs baselines on {cfg.dataset} ({', '.join(cfg.domains)}), "
          f"model {cfg.model}, sparsities {list(cfg.sparsities)}, output {out}", flush=True)
    res = run_classification(cfg, out)
    print()
    print(format_table(res, "balanced_accuracy"))
    print()
    print(format_table(res, "auc"))
    print()
    if res.get("routers"):
        for n, r in res["routers"].items():
            print(f"router {n}: routing accuracy {r['accuracy']:.3f}, FLOPs share {r['flops_share']:.3%}")
    sims = ", ".join(f"{int(s['sparsity']*100)}%: {s['mean_jaccard']:.3f} (chance {s['chance']:.3f})"
                     for s in res["similarity"])
    print(f"mean ticket Jaccard: {sims}")
    col = res.get("collapse")
    if col:
        w = col["warning"]
        print("collapse monitor: " + ("no collapse predicted along the search" if w is None else
                                      f"collapse predicted at {100 * w['sparsity']:.1f}% sparsity "
                                      f"(confidence {w['confidence']:.2f}, action {col['action']})") +
              f"; details: rtl diagnose {out}")
    w = res["wall_time_s"]
    print(f"wall time: ticket search {w['ticket_search']:.1f}s, single IMP {w['single_imp']:.1f}s, "
          f"joint retrain {w['joint_retrain']:.1f}s, total {res['total_time_s']:.1f}s")
    print(f"results: {Path(out) / 'results.json'}; figures: {', '.join(res.get('figures', []))}; "
          f"tickets: {Path(out) / 'tickets'}")
    return 0


def _run_replica(args, *, demo: bool) -> int:
    """A rank > 0 under torchrun: the same pipeline (its collectives need every rank), silent, its output
    in a temporary folder that is deleted; rank 0 prints the tables and writes the run folder."""
    tmp = tempfile.mkdtemp(prefix="rtl-replica-")
    args.out, args.no_progress = tmp, True
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return _run(args, demo=demo, _replica=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _model_from_spec(spec: str, num_classes: int):
    family, _, name = spec.partition(":") if ":" in spec else ("timm", "", spec)
    if family == "timm":
        import timm
        if name not in timm.list_models():
            raise RTLError(f"unknown timm model {name!r}; see timm.list_models() (e.g. timm:resnet18).")
        return timm.create_model(name, num_classes=num_classes)
    if family == "smp":
        import segmentation_models_pytorch as smp
        arch, _, enc = name.partition(":")
        if not enc:
            arch, enc = "Unet", arch
        return getattr(smp, arch)(enc, encoder_weights=None, classes=num_classes)
    if family == "audio":
        from rtl_plugin.integrations.audio import AudioUNet
        return AudioUNet()
    raise RTLError(f"unknown model family {family!r}; use timm:NAME, smp:ENCODER (Unet), smp:ARCH:ENCODER or audio:unet.")


def _info(args) -> int:
    model = _model_from_spec(args.model, args.num_classes)
    routed = wrap(model, 1, granularity=args.granularity)
    ad = resolve_adapter(model)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"model: {args.model} ({type(model).__name__}), adapter: {ad.name}, parameters: {n_all:,}")
    print(routed.space.summary())
    if args.json:
        print(json.dumps(routed.space.to_dict())[:2000])
    return 0


def _diagnose(args) -> int:
    S = None
    if args.class_similarity:
        f = Path(args.class_similarity)
        try:
            S = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise RTLError(f"--class-similarity {f}: cannot read a JSON [K, K] matrix ({e}).") from e
    res = diagnose_run(args.run, out_dir=args.out, class_similarity=S, wordnet=args.wordnet,
                       figures=not args.no_figures)
    print(res["summary"])
    print(f"report: {res['report_md']} and {res['report_html']} (self-contained); figures: "
          f"{', '.join(res['figures']) or 'none'}")
    return 0


def _pick_sparsity(saved: dict, wanted: float | None) -> float:
    """The saved sparsity ``wanted`` (default: the sparsest saved one)."""
    if wanted is None:
        return max(saved)
    sp = min(saved, key=lambda s: abs(s - wanted))
    if abs(sp - wanted) > 1e-6:
        raise RTLError(f"the run has tickets at sparsities {sorted(saved)}, not {wanted}; pick one of them.")
    return sp


def _refit_router(name: str, cfg: dict, train, num_tickets: int):
    """A router of kind ``name`` fitted on the run's training data and ticket ids (None for ``none``)."""
    if name == "none":
        return None
    part = cfg.get("partition", "domain")
    if part not in ("domain", "class"):
        raise RTLError(f"--router needs the run's ticket ids; this run's partition is {part!r} (only 'domain' "
                       "and 'class' runs can refit a router here). Use --router none and route yourself.")
    router = create_router(name, num_tickets=num_tickets)
    router.fit(train.x, train.domain if part == "domain" else train.y, seed=cfg.get("seed", 0))
    return router


def _export(args) -> int:
    """Package one sparsity of a run folder: slim tickets (channel mode) or shared weights + masks, a router."""
    from rtl_plugin.tasks.classification.data import load_domains
    from rtl_plugin.tasks.classification.runner import make_model_factory
    run = Path(args.run)
    res = read_results(run)
    cfg = res.get("config") or {}
    if not res.get("tickets"):
        raise RTLError(f"{run / 'results.json'} lists no saved tickets; rerun `rtl prune` (it saves tickets per "
                       "sparsity).")
    saved = saved_tickets(run, res)  # folders inside this run folder, wherever it was moved or copied to
    sp = _pick_sparsity(saved, args.sparsity)
    train, _ = load_domains(image_size=cfg.get("image_size", 32), channels=3, domains=tuple(cfg.get("domains", ())),
                            seed=cfg.get("seed", 0), max_per_domain=cfg.get("max_per_domain"))
    model = make_model_factory(cfg.get("model", res.get("model")), train.num_classes, 3)(cfg.get("seed", 0))
    routed = load(saved[sp], model)
    routed.eval()
    router = _refit_router(args.router, cfg, train, routed.num_tickets)
    ex = train.x[:4].to(next(routed.parameters()).device)
    out = export_package(routed, args.out, router=router, example_inputs=ex, onnx=args.onnx)
    print(f"exported {saved[sp].name} ({100 * sp:.0f}% sparsity, {routed.granularity} mode, K={routed.num_tickets}"
          f"{', router ' + args.router if router is not None else ''}{', ONNX' if args.onnx else ''}) -> {out}")
    print("load it with: rtl_plugin.load_package(PKG, fresh_model)  (the run's model, e.g. "
          f"{cfg.get('model', res.get('model'))})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtl", description="Routing the Lottery: K routed sparse tickets over shared weights.")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the main job: RTL vs its baselines on embedded real data (digits, MNIST-5k, LFW)")
    _add_run_args(d, demo=True)
    pr = sub.add_parser("prune", help="the same pipeline with options (model, data, partition, sparsities, ...)")
    _add_run_args(pr, demo=False)
    i = sub.add_parser("info", help="print a model's ticket space (prunable layers, groups, ignored layers)")
    i.add_argument("model", help="timm:NAME | smp:ENCODER | smp:ARCH:ENCODER | audio:unet")
    i.add_argument("--granularity", default="channel", choices=["weight", "channel"])
    i.add_argument("--num-classes", type=int, default=10)
    i.add_argument("--json", action="store_true")
    g = sub.add_parser("diagnose", help="collapse diagnostics of a run folder: summary, figures, Markdown/HTML report")
    g.add_argument("run", help="a run folder of rtl demo / rtl prune (or one saved TicketSet folder)")
    g.add_argument("--out", default=None, help="output folder (default RUN/diagnostics)")
    g.add_argument("--class-similarity", default=None,
                   help="JSON file with a [K, K] class similarity matrix for semantic alignment (Spearman)")
    g.add_argument("--wordnet", action="store_true",
                   help="semantic alignment against WordNet path similarity of the ticket names "
                        "(needs apt-get install wordnet-base)")
    g.add_argument("--no-figures", action="store_true", help="text and report only")
    e = sub.add_parser("export", help="deployable package of a run: slim tickets (channel mode), router, manifest")
    e.add_argument("run", help="a run folder of rtl demo / rtl prune")
    e.add_argument("--out", required=True, help="package folder to write")
    e.add_argument("--sparsity", type=float, default=None, help="which saved sparsity (default: the sparsest)")
    e.add_argument("--router", default="learned", choices=["none", "learned", "centroid", "context"],
                   help="router for label-free inference, refit on the run's training data (default learned)")
    e.add_argument("--onnx", action="store_true", help="also write ONNX files (checked with onnxruntime)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    owns_group = False
    try:
        if args.cmd in ("demo", "prune"):  # under torchrun: join the process group (nccl on CUDA, else gloo)
            owns_group = init_from_env(args.device)
        if args.cmd == "demo":
            return _run(args, demo=True)
        if args.cmd == "prune":
            return _run(args, demo=False)
        if args.cmd == "info":
            return _info(args)
        if args.cmd == "diagnose":
            return _diagnose(args)
        if args.cmd == "export":
            return _export(args)
    except RTLError as e:
        print(f"rtl: error: {e}", file=sys.stderr)
        return 2
    finally:
        if owns_group:
            shutdown()
    return 1


if __name__ == "__main__":
    sys.exit(main())
