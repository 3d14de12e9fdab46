"""Segmentation with per-class tickets on smp U-Net (issue #5): RTL vs single IMP vs multi-model IMP, mIoU.

    python benchmarks/segmentation_mosaic.py                 # resnet18 + tf_efficientnet_lite0 (ImageNet), 50/75%
    python benchmarks/segmentation_mosaic.py --encoders resnet18
    python benchmarks/segmentation_mosaic.py --quick         # tiny setting, < 1 min (..._quick.json)

Writes benchmarks/results/segmentation_mosaic.json: per encoder, mIoU of RTL (oracle- and label-free-routed),
single IMP and multi-model IMP, per-class IoU, kept weights, the router's pixel accuracy and wall times.
Target (issue #5): RTL label-free mIoU >= single IMP at 75% sparsity.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch initialises OpenMP (shared CPUs)

import torch  # noqa: E402

from rtl_plugin._deprecated import add_deprecated_flag  # noqa: E402
from rtl_plugin.tasks.segmentation import ENCODERS, SegConfig, run_segmentation  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny setting, seconds")
    ap.add_argument("--encoders", default=",".join(ENCODERS), help=f"comma-separated subset of {ENCODERS}")
    ap.add_argument("--no-imagenet", action="store_true", help="tf_efficientnet_lite0 from random weights")
    ap.add_argument("--sparsities", default=None, help="e.g. 0.5,0.75")
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--epochs-per-round", type=int, default=None, help="passes over a ticket's subset per round")
    add_deprecated_flag(ap, "--search-epochs", "--epochs-per-round", type=int)
    ap.add_argument("--retrain-epochs", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--ticket-loss", choices=("balanced", "plain", "router"), default="balanced",
                    help="RTL / multi-IMP ticket loss (see rtl_plugin.tasks.segmentation)")
    ap.add_argument("--shared-state", action="store_true",
                    help="RTL joint retraining with one Adam state shared by the tickets (default: one per ticket)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--partition", choices=("class", "composition"), default="class",
                    help="class: a ticket per class, pixels routed by class; composition: a ticket per cluster of "
                         "mosaics by class composition, images routed whole")
    ap.add_argument("--num-clusters", type=int, default=None, help="composition tickets (default: number of classes)")
    add_deprecated_flag(ap, "--n-clusters", "--num-clusters", type=int)
    ap.add_argument("--decoder", default=None, help="decoder channels, e.g. 256,128,64,32,16")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None,
                    help="JSON path (default results/segmentation_mosaic.json; --quick: ..._quick.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    kw = {k: v for k, v in dict(n_train=args.n_train, n_test=args.n_test, size=args.size, lr=args.lr,
                                epochs_per_round=args.epochs_per_round, retrain_epochs=args.retrain_epochs,
                                batch_size=args.batch_size, num_clusters=args.num_clusters).items()
          if v is not None}
    if args.sparsities:
        kw["sparsities"] = tuple(float(s) for s in args.sparsities.split(","))
    if args.decoder:
        kw["decoder_channels"] = tuple(int(c) for c in args.decoder.split(","))
    kw.update(partition=args.partition, seed=args.seed, device=args.device, imagenet=not args.no_imagenet, ticket_loss=args.ticket_loss,
              per_ticket_state=not args.shared_state)
    t0 = time.perf_counter()
    runs = {}
    for enc in encoders:
        cfg = SegConfig.quick(encoder=enc, **kw) if args.quick else SegConfig(encoder=enc, **kw)
        res = run_segmentation(cfg)
        runs[enc] = res
        m = res["miou"]
        sps = sorted(m["single_imp"]["direct"])
        print(f"== {enc} ({res['model']['init']} init, {res['model']['prunable_weights']:,} prunable weights, "
              f"{res['total_time_s']:.0f}s)")
        print("mIoU                       " + "  ".join(f"{int(s * 100)}%".rjust(7) for s in sps))
        for meth in ("rtl", "multi_imp", "single_imp"):
            for routing in ("oracle", "label_free", "self", "soft", "direct"):
                if routing in m.get(meth, {}):
                    print(f"{meth + ' ' + routing:<27s}" + "  ".join(f"{m[meth][routing][s]:7.4f}" for s in sps))
        print("router pixel acc           " + "  ".join(f"{res['router_pixel_acc'][s]:7.4f}" for s in sps), flush=True)
    target = {}
    for enc, res in runs.items():
        m = res["miou"]
        if "rtl" in m and 0.75 in m["single_imp"]["direct"]:
            single = m["single_imp"]["direct"][0.75]
            target[enc] = {"rtl_label_free": m["rtl"]["label_free"][0.75], "single_imp": single,
                           "met_router": m["rtl"]["label_free"][0.75] >= single}
            for routing in ("self", "soft"):
                if routing in m["rtl"]:
                    target[enc].update({f"rtl_{routing}": m["rtl"][routing][0.75],
                                        f"met_{routing}": m["rtl"][routing][0.75] >= single})
    summary = {
        "benchmark": "segmentation_mosaic",
        "command": "python benchmarks/segmentation_mosaic.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args),
        "target": {"rule": "RTL label-free mIoU >= single IMP mIoU at 75% sparsity (label-free: "
                   "the single-IMP router; also reported: the tickets' own one-vs-rest scores ('self') and the "
                   "router-probability mixture ('soft'))", "by_encoder": target},
        "runs": runs, "total_time_s": round(time.perf_counter() - t0, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads, "device": args.device,
                    "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    out = Path(args.out) if args.out else HERE / "results" / (
        "segmentation_mosaic_quick.json" if args.quick else "segmentation_mosaic.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"target (RTL label-free >= single IMP at 75%): {target}; {summary['total_time_s']:.0f}s -> {out}")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
