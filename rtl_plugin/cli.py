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
    _add_data_args(p)
    p.add_argument("--model", default=None, help="timm:NAME (any timm classifier; default timm:test_resnet) or, "
                   "with --task segmentation, smp:ENCODER (resnet18 or tu-tf_efficientnet_lite0)")
    p.add_argument("--checkpoint", default=None, help="timm weights for --model: .safetensors or a weights-only "
                   "torch file; the classifier is reset when the data has another number of classes")
    p.add_argument("--domains", default="digits,mnist,lfw", help="comma-separated: digits, mnist, lfw, fashion")
    p.add_argument("--partition", default=None, choices=["domain", "class", "kmeans", "composition"],
                   help="tickets: one per domain / context (default with --contexts or built-in domains), per "
                        "class (default for --data without --contexts), per k-means cluster of features; "
                        "segmentation: class (default) or composition")
    p.add_argument("--clusters", type=int, default=None, help="number of clusters (kmeans: default 3)")
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
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (segmentation 16)")
    p.add_argument("--lr", type=float, default=None, help="default 2e-3 (segmentation 1e-3)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size: built-in domains 32; --data: the model's own (timm data config); "
                        "segmentation 64 (a multiple of 32)")
    p.add_argument("--max-per-domain", type=int, default=1500,
                   help="cap of images per domain / context (0 = all); segmentation: per folder")
    p.add_argument("--baselines", default="dense,single_imp,single_imp_balanced,single_imp_context,multi_imp")
    p.add_argument("--routers", default="learned,centroid")
    p.add_argument("--shared-norm", action="store_true", help="one set of BN statistics for all tickets (the paper)")
    p.add_argument("--tickets", default="imp", choices=["imp", "learned"],
                   help="RTL's tickets: IMP search (the paper) or learned masks with a jointly trained gate "
                        "(learn_tickets; --retrain-epochs passes, evaluated without joint retraining)")
    p.add_argument("--learned-routing", default="gate", choices=["gate", "groups"],
                   help="--tickets learned: the gate routes label-free (gate) or the partition's subsets train "
                        "the tickets and the gate learns them (groups)")
    p.add_argument("--learned-backbone", default="frozen", choices=["frozen", "train"],
                   help="--tickets learned: shared weights frozen (scores, gate and classifier learn) or co-trained")
    p.add_argument("--collapse", default="warn", choices=["off", "warn", "stop", "relax"],
                   help="collapse monitor during the search: record only (warn), stop at / relax before the "
                        "predicted collapse and keep the last healthy masks, or off")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="classification", choices=["classification", "segmentation"])
    p.add_argument("--data", default=None, help="your images: an ImageFolder tree DIR/<class>/<image> "
                   "(segmentation: DIR/images/ + DIR/masks/ integer class maps); default: the built-in domains")
    p.add_argument("--val-data", default=None, help="test images in the same layout (default: a seeded split)")
    p.add_argument("--val-fraction", type=float, default=0.25, help="share of --data held out when no --val-data")
    p.add_argument("--contexts", default=None, help="CSV of 'relative path,context' rows: one ticket per context")
    p.add_argument("--unreadable", default="skip", choices=["skip", "error"],
                   help="image files that cannot be read: skip them (counted) or stop with their list")


def _classification_config(args, *, demo: bool):
    from rtl_plugin.tasks.classification.runner import ClassificationConfig
    kw = dict(seed=args.seed, device=args.device, progress=not args.no_progress)
    if not demo:
        folder = args.data is not None
        partition = args.partition or ("class" if folder and args.contexts is None else "domain")
        if partition == "composition":
            raise RTLError("--partition composition is for --task segmentation; classification takes domain, "
                           "class or kmeans.")
        kw.update(model=args.model or "timm:test_resnet", domains=tuple(d for d in args.domains.split(",") if d),
                  partition=partition, num_clusters=args.clusters or 3, granularity=args.granularity,
                  sparsities=args.sparsities, schedule=args.schedule, prune_fraction=args.prune_fraction,
                  prune_count=args.prune_count, scope=args.scope, epochs_per_round=args.epochs_per_round,
                  retrain_epochs=args.retrain_epochs, batch_size=args.batch_size or 64, lr=args.lr or 2e-3,
                  max_per_domain=args.max_per_domain or None, baselines=tuple(b for b in args.baselines.split(",") if b),
                  routers=tuple(r for r in args.routers.split(",") if r), shared_norm=args.shared_norm,
                  collapse=args.collapse, checkpoint=args.checkpoint, unreadable=args.unreadable,
                  tickets=args.tickets, learned_routing=args.learned_routing, learned_backbone=args.learned_backbone)
        if args.image_size is not None or (folder and not args.quick):
            kw["image_size"] = args.image_size  # None on a folder: the model's own input size
        if folder:
            kw.update(domains=(), dataset=f"folder:{Path(args.data).resolve().name}", data_dir=str(Path(args.data).resolve()),
                      val_dir=None if args.val_data is None else str(Path(args.val_data).resolve()),
                      val_fraction=args.val_fraction,
                      contexts=None if args.contexts is None else str(Path(args.contexts).resolve()))
        elif args.val_data or args.contexts:
            raise RTLError("--val-data and --contexts describe your own images: pass --data DIR as well.")
    return ClassificationConfig.quick(**kw) if args.quick else ClassificationConfig(**kw)


def _run(args, *, demo: bool, _replica: bool = False) -> int:
    from rtl_plugin.tasks.classification.runner import run_classification
    args.device = local_device(args.device)  # torchrun: --device cuda means this rank's GPU
    if not is_main_process() and not _replica:
        return _run_replica(args, demo=demo)
    if not demo and args.task == "segmentation":
        return _run_segmentation(args)
    cfg = _classification_config(args, demo=demo)
    out = args.out or _default_out()
    source = (f"{args.data} ({'contexts ' + Path(cfg.contexts).name if cfg.contexts else 'no contexts'})"
              if cfg.data_dir else f"{cfg.dataset} ({', '.join(cfg.domains)})")
    print(f"rtl {'demo' if demo else 'prune'}: RTL vs baselines on {source}, partition {cfg.partition}, "
          f"model {cfg.model}, sparsities {list(cfg.sparsities)}, output {out}", flush=True)
    res = run_classification(cfg, out)
    _print_classification(res, out)
    return 0


def _print_classification(res: dict, out: str) -> None:
    from rtl_plugin.tasks.classification.runner import format_table
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


def _segmentation_config(args):
    from rtl_plugin.tasks.segmentation import SegConfig
    if args.data is None:
        raise RTLError("--task segmentation needs --data DIR with images/ and masks/ (integer class maps); the "
                       "built-in texture mosaics run with python benchmarks/segmentation_mosaic.py.")
    if args.tickets != "imp":
        raise RTLError("--tickets learned is for classification; segmentation finds its tickets by IMP "
                       "(leave out --tickets).")
    if args.contexts or args.checkpoint:
        raise RTLError("--contexts and --checkpoint are for classification; segmentation routes pixels by class "
                       "(--partition class) or images by class composition (--partition composition).")
    family, _, encoder = (args.model or "smp:resnet18").partition(":")
    if family != "smp" or not encoder:
        raise RTLError(f"--task segmentation takes --model smp:ENCODER (resnet18 or tu-tf_efficientnet_lite0), "
                       f"got {args.model!r}.")
    partition = args.partition or "class"
    if partition not in ("class", "composition"):
        raise RTLError(f"--task segmentation takes --partition class or composition, got {partition!r}.")
    methods = ("rtl", "single_imp") + (("multi_imp",) if "multi_imp" in args.baselines.split(",") else ())
    kw = dict(encoder=encoder, data_dir=str(Path(args.data).resolve()),
              val_dir=None if args.val_data is None else str(Path(args.val_data).resolve()),
              val_fraction=args.val_fraction, max_images=args.max_per_domain or None, unreadable=args.unreadable,
              size=args.image_size or 64, sparsities=tuple(sorted(args.sparsities)), prune_fraction=args.prune_fraction,
              epochs_per_round=args.epochs_per_round, retrain_epochs=args.retrain_epochs,
              batch_size=args.batch_size or 16, lr=args.lr or 1e-3, methods=methods, partition=partition,
              num_clusters=args.clusters, seed=args.seed, device=args.device, progress=not args.no_progress,
              save_tickets=True)
    if args.quick:
        kw.update(size=args.image_size or 32, max_images=min(kw["max_images"] or 24, 24))
        return SegConfig.quick(**kw)
    return SegConfig(**kw)


def _run_segmentation(args) -> int:
    from rtl_plugin.tasks.segmentation import run_segmentation
    cfg = _segmentation_config(args)
    out = args.out or _default_out()
    print(f"rtl prune: segmentation, RTL vs baselines on {args.data}, smp U-Net {cfg.encoder}, partition "
          f"{cfg.partition}, sparsities {list(cfg.sparsities)}, output {out}", flush=True)
    res = run_segmentation(cfg, out)
    print()
    for method, by_routing in res["miou"].items():
        for routing, by_sp in by_routing.items():
            cells = "  ".join(f"{int(100 * s)}%: {v:.4f}" for s, v in sorted(by_sp.items()))
            print(f"mIoU {method:<11s}{routing:<12s}{cells}")
    for s, a in sorted(res["router_pixel_acc"].items()):
        print(f"label-free router (single IMP) pixel accuracy at {int(100 * s)}%: {a:.4f}")
    print(f"mean ticket Jaccard: " + ", ".join(f"{int(s['sparsity'] * 100)}%: {s['mean_jaccard']:.3f} "
                                                f"(chance {s['chance']:.3f})" for s in res["similarity"]))
    print(f"results: {Path(out) / 'results.json'}; figures: {', '.join(res.get('figures', []))}; "
          f"tickets: {Path(out) / 'tickets'}; total {res['total_time_s']:.1f}s")
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
    run = Path(args.run)
    res = read_results(run)
    cfg = res.get("config") or {}
    if not res.get("tickets"):
        raise RTLError(f"{run / 'results.json'} lists no saved tickets; rerun `rtl prune` (it saves tickets per "
                       "sparsity).")
    saved = saved_tickets(run, res)  # folders inside this run folder, wherever it was moved or copied to
    sp = _pick_sparsity(saved, args.sparsity)
    if str(res.get("task", "")).startswith("segmentation"):
        routed, router, ex, model_name = _segmentation_export_model(args, res, saved[sp])
    else:
        routed, router, ex, model_name = _classification_export_model(args, cfg, saved[sp])
    out = export_package(routed, args.out, router=router, example_inputs=ex, onnx=args.onnx)
    print(f"exported {saved[sp].name} ({100 * sp:.0f}% sparsity, {routed.granularity} mode, K={routed.num_tickets}"
          f"{', router ' + args.router if router is not None else ''}{', ONNX' if args.onnx else ''}) -> {out}")
    print(f"load it with: rtl_plugin.load_package(PKG, fresh_model)  (the run's model, e.g. {model_name})")
    return 0


def _classification_export_model(args, cfg: dict, folder: Path):
    """The run's routed model from its saved tickets, the refit router and example inputs."""
    from rtl_plugin.tasks.classification.runner import config_from_dict, load_task_data, make_model_factory
    config = config_from_dict(cfg)
    train, _, _ = load_task_data(config, log=lambda msg: None)
    # the tickets hold every weight: the architecture alone is built (no checkpoint file needed)
    model = make_model_factory(config.model, train.num_classes, 3)(config.seed)
    routed = load(folder, model)
    routed.eval()
    if args.router == "gate":
        from rtl_plugin.comparison.learned import load_gate
        router = load_gate(folder)
    else:
        router = _refit_router(args.router, cfg, train, routed.num_tickets)
    return routed, router, train.x[:4].to(next(routed.parameters()).device), config.model


def _segmentation_export_model(args, res: dict, folder: Path):
    """A segmentation run's routed U-Net from its saved tickets (per-pixel routes: no packaged router)."""
    import torch
    from rtl_plugin.tasks.segmentation import build_unet
    if args.router != "none":
        raise RTLError("a segmentation run routes pixels by class (or images by composition): its label-free "
                       "router is the single-IMP model, not a packaged router; export with --router none.")
    cfg = res.get("config") or {}
    classes = len((res.get("data") or {}).get("classes") or cfg.get("classes") or ())
    model = build_unet(cfg.get("encoder", "resnet18"), classes, imagenet=False, seed=cfg.get("seed", 0),
                       decoder_channels=tuple(cfg.get("decoder_channels", (128, 64, 32, 16, 16))))
    routed = load(folder, model)
    routed.eval()
    size = int(cfg.get("size", 64))
    return routed, None, torch.zeros(2, 3, size, size), f"smp.Unet({cfg.get('encoder')!r}, classes={classes})"


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
    e.add_argument("--router", default="learned", choices=["none", "learned", "centroid", "context", "gate"],
                   help="router for label-free inference, refit on the run's training data (default learned); "
                        "gate: the gate trained jointly with learned tickets (rtl prune --tickets learned)")
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
