"""Coverage sweep: which timm, torchvision and smp models rtl-plugin routes and exports, in both granularities.

For every model (random weights, tiny inputs, K=3 random tickets):

* weight granularity must wrap, export a ticket that equals the routed ticket (``export_ticket`` checks it
  itself), and give a mixed-route batch equal to each route run alone;
* channel granularity must either be exact (the same checks; the export is a physically smaller model) or be
  refused at wrap with an ``RTLError`` naming the cause;
* smp models also route per pixel (each pixel equals its ticket's output).

The test suite runs the same checks (tests/integrations/test_coverage.py) and compares them with the recorded
file, and the README's "Supported models" table is rendered from that file::

    python benchmarks/coverage_sweep.py                   # all models -> benchmarks/results/coverage/
    python benchmarks/coverage_sweep.py --update-readme   # also rewrite the README table
    python benchmarks/coverage_sweep.py resnet18 mixnet_s # a few models, printed only
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "benchmarks" / "results" / "coverage"
SUPPORT_FILE = OUT_DIR / "support.json"
TABLE_FILE = OUT_DIR / "support.md"
README = ROOT / "README.md"
TABLE_START, TABLE_END = "<!-- support-table:start -->", "<!-- support-table:end -->"
K = 3
# seconds: the models here that group at all do so in < 5 s on a shared 2-core CPU. The refusals of
# non-converging models come from the deterministic group-size bound, not from this clock (a model that is
# merely slow, like ResNeSt at ~50 s, would be refused or not depending on the machine: it is not in the list).
GRAPH_TIMEOUT = 30.0
TOL = 1e-4


@dataclass(frozen=True)
class Spec:
    """One model of the sweep: ``source`` is "timm", "torchvision" or "smp"."""
    name: str
    family: str
    source: str = "timm"
    kwargs: dict = field(default_factory=dict)
    size: int = 32
    slow: bool = False

    @property
    def key(self) -> str:
        return f"{self.source}:{self.name}"


def _t(name, family, size=32, slow=False, **kwargs) -> Spec:
    return Spec(name, family, "timm", kwargs, size, slow)


def _tv(name, family, size=32, slow=False, **kwargs) -> Spec:
    return Spec(name, family, "torchvision", kwargs, size, slow)


def _smp(arch, encoder, size=64, slow=False) -> Spec:
    return Spec(f"{arch}/{encoder}", f"smp {arch}", "smp", {}, size, slow)


SPECS: list[Spec] = [
    # ---------------------------------------------------------------- timm
    _t("resnet18", "ResNet"), _t("resnet10t", "ResNet"), _t("resnet26d", "ResNet"),
    _t("seresnet18", "SE-ResNet"), _t("resnext26ts", "ResNeXt"),
    _t("skresnet18", "SKNet"),
    _t("nf_resnet26", "NF-Net", depths=(1, 1, 1, 1)), _t("nf_regnet_b0", "NF-Net"),
    _t("cspresnet50", "CSPNet"), _t("cs3darknet_s", "CSPNet"),
    _t("res2net50_14w_8s", "Res2Net", layers=(1, 1, 1, 1)), _t("res2next50", "Res2Net", layers=(1, 1, 1, 1)),
    _t("dpn48b", "DPN"), _t("dpn68", "DPN"),
    _t("dla46_c", "DLA"), _t("dla34", "DLA"),
    _t("hrnet_w18_small", "HRNet", size=64),
    _t("ghostnet_050", "GhostNet"), _t("ghostnetv2_100", "GhostNet", size=64), _t("repghostnet_050", "GhostNet"),
    _t("mixnet_s", "MixNet"), _t("rexnet_100", "ReXNet"),
    _t("regnetx_002", "RegNet"), _t("regnety_002", "RegNet"),
    _t("repvgg_a0", "RepVGG"), _t("mobileone_s0", "MobileOne", slow=True),
    _t("ese_vovnet19b_slim_dw", "VoVNet"), _t("hgnet_tiny", "HGNet"), _t("hgnetv2_b0", "HGNet"),
    _t("fastvit_t8", "FastViT"),
    _t("mobilenetv4_conv_small", "MobileNetV4"), _t("mobilenetv4_hybrid_medium", "MobileNetV4", size=64),
    _t("efficientnet_b0", "EfficientNet"), _t("tf_efficientnet_lite0", "EfficientNet"),
    _t("mobilenetv3_small_050", "MobileNetV3"), _t("lcnet_050", "LCNet"),
    _t("convnext_atto", "ConvNeXt"), _t("edgenext_xx_small", "EdgeNeXt", size=64),
    _t("vit_tiny_patch16_224", "ViT", img_size=32, patch_size=8, depth=2),
    _t("deit_tiny_patch16_224", "DeiT", img_size=32, patch_size=8, depth=2),
    _t("mobilevit_xxs", "MobileViT", size=64),
    _t("levit_128s", "LeViT", size=64, img_size=64),
    _t("efficientvit_b0", "EfficientViT", size=64), _t("efficientvit_m0", "EfficientViT", size=64, slow=True),
    _t("densenet121", "DenseNet", block_config=(2, 2, 2, 2)), _t("xception41", "Xception"),
    _t("selecsls42b", "SelecSLS"), _t("gernet_s", "GENet"), _t("inception_next_atto", "InceptionNeXt"),
    _t("poolformer_s12", "PoolFormer"),
    # ---------------------------------------------------------------- torchvision (torch-pruning's examples)
    _tv("resnet18", "ResNet"), _tv("resnext50_32x4d", "ResNeXt"), _tv("wide_resnet50_2", "Wide ResNet", slow=True),
    _tv("densenet121", "DenseNet", slow=True), _tv("mobilenet_v2", "MobileNetV2"),
    _tv("mobilenet_v3_small", "MobileNetV3"), _tv("efficientnet_b0", "EfficientNet"),
    _tv("efficientnet_v2_s", "EfficientNetV2", slow=True), _tv("mnasnet0_5", "MNASNet"),
    _tv("regnet_y_400mf", "RegNet"), _tv("googlenet", "GoogLeNet", aux_logits=False, init_weights=True),
    _tv("inception_v3", "Inception", size=75, aux_logits=False, init_weights=True), _tv("squeezenet1_1", "SqueezeNet", size=64),
    _tv("vgg11_bn", "VGG", slow=True), _tv("alexnet", "AlexNet", size=64), _tv("convnext_tiny", "ConvNeXt", slow=True),
    _tv("vit_b_16", "ViT", image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128),
    _tv("shufflenet_v2_x0_5", "ShuffleNetV2"),
    # ---------------------------------------------------------------- smp
    _smp("Unet", "resnet18"), _smp("Unet", "mobilenet_v2"), _smp("Unet", "efficientnet-b0"),
    _smp("Unet", "tu-tf_efficientnet_lite0"), _smp("Unet", "tu-regnety_002"), _smp("Unet", "tu-convnext_atto"),
    _smp("FPN", "resnet18"), _smp("FPN", "mobilenet_v2"),
    _smp("DeepLabV3Plus", "resnet18"), _smp("DeepLabV3Plus", "mobilenet_v2"),
]


# --------------------------------------------------------------------------- models
def build(spec: Spec) -> torch.nn.Module:
    """A fresh model with random weights (seeded)."""
    torch.manual_seed(0)
    if spec.source == "timm":
        import timm
        return timm.create_model(spec.name, pretrained=False, num_classes=5, **spec.kwargs)
    if spec.source == "torchvision":
        import torchvision
        kw = dict(spec.kwargs)
        if spec.name == "vit_b_16":
            from torchvision.models.vision_transformer import VisionTransformer
            return VisionTransformer(num_classes=5, **kw)
        return torchvision.models.get_model(spec.name, weights=None, num_classes=5, **kw)
    import segmentation_models_pytorch as smp
    arch, encoder = spec.name.split("/")
    return getattr(smp, arch)(encoder, encoder_weights=None, classes=3)


def _inputs(spec: Spec, batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# --------------------------------------------------------------------------- checks
def _random_tickets(r, seed: int):
    """Random coupled tickets (keep 0.6) that leave every layer at least one channel (redrawn if not)."""
    import rtl_plugin as rtl
    from rtl_plugin.persist.export import pruning_history
    for s in range(seed, seed + 8):
        t = rtl.TicketSet.random(r.space, K, keep=0.6, seed=s)
        r.set_tickets(t)
        if r.granularity == "weight":
            return
        try:
            for k in range(K):
                pruning_history(r, k)
            return
        except rtl.TicketError:
            continue
    raise AssertionError("no random ticket draw keeps every layer non-empty")


def _route_checks(spec: Spec, r) -> float:
    """Export one ticket (self-verified), mixed-route batch == each route alone, smp: per-pixel routes."""
    import rtl_plugin as rtl
    r.eval()
    x = _inputs(spec, 3, seed=1)
    route = torch.tensor([2, 0, 1])
    with torch.no_grad():
        slim = rtl.export_ticket(r, 1, check_inputs=x[:2])
        err = _rel(slim.eval()(x[:2]), r(x[:2], route=1))
        y = r(x, route=route)
        alone = [r(x[i:i + 1], route=int(route[i])) for i in range(3)]
        err_mix = max(_rel(y[i:i + 1], alone[i]) for i in range(3))
        assert err_mix < TOL, f"mixed-route batch differs from each route alone by {err_mix:.3g}"
        if spec.source == "smp":
            full = [r(x[:2], route=k) for k in range(K)]
            H, W = full[0].shape[-2:]
            pix = torch.zeros(2, H, W, dtype=torch.long)
            pix[:, : H // 2] = 1
            pix[1, :, : W // 3] = 2
            yp = r(x[:2], route=pix)
            want = torch.stack([full[k] for k in range(K)]).gather(
                0, pix[None, :, None].expand(1, 2, yp.shape[1], H, W))[0]
            err_pix = _rel(yp, want)
            assert err_pix < TOL, f"per-pixel routes differ from each ticket's pixels by {err_pix:.3g}"
    return max(err, err_mix)


def reason_of(err: Exception) -> str:
    """A short cause for the support table, from the refusal's message."""
    msg = str(err)
    rules = [("channel shuffle", "channel shuffle (tp cannot map the reshape)"),
             ("input widths it cannot infer", "tp cannot trace its concat (sliced / dual-path features)"),
             ("cannot trace", "torch-pruning cannot trace it"),
             ("does not converge", "group building does not converge (time guard)"),
             ("graph limit", "group building does not converge (time guard)"),
             ("index mapping through", "split/concat index mapping"),
             ("broadcast multiply", "broadcast multiply (attention gate)"),
             ("reshape", "attention reshape / broadcast"),
             ("GroupNorm", "GroupNorm (no masked group norm yet)"),
             ("cannot run", "export cannot run"),
             ("replaying", "pruning-history replay fails"),
             ("per sample", "per-sample routing (layer folds patches into the batch)"),
             ("differs from routed", "export differs"),
             ("LayerNorm over one", "LayerNorm over several dims")]
    layer_type = re.search(r"cannot mask layer '[^']+' \((\w+)\)", msg)
    if layer_type:
        return f"{layer_type.group(1)} cannot be channel-masked"
    for key, reason in rules:
        if key in msg:
            return reason
    return type(err).__name__


def _layer_of(err: Exception) -> str | None:
    m = re.search(r"layer '([^']+)' \((\w+)\)|layer <(\w+)>|layer '([^']+)'", str(err))
    if not m:
        return None
    return next(g for g in m.groups() if g)


def check_model(spec: Spec) -> dict:
    """Run the sweep's checks on one model; returns the record stored in support.json."""
    import rtl_plugin as rtl
    rec = {"key": spec.key, "name": spec.name, "family": spec.family, "source": spec.source}
    t0 = time.perf_counter()
    r = rtl.wrap(build(spec), K, example_inputs=_inputs(spec, 1, seed=0), granularity="weight")
    _random_tickets(r, seed=1)
    rec["weight"] = {"status": "ok", "max_err": _route_checks(spec, r)}
    t1 = time.perf_counter()
    try:
        r = rtl.wrap(build(spec), K, example_inputs=_inputs(spec, 1, seed=0), granularity="channel",
                     graph_timeout=GRAPH_TIMEOUT)
    except rtl.RTLError as e:
        rec["channel"] = {"status": "refused", "reason": reason_of(e), "error": type(e).__name__,
                          "layer": _layer_of(e), "message": str(e)[:600]}
    else:
        _random_tickets(r, seed=1)
        rec["channel"] = {"status": "exact", "max_err": _route_checks(spec, r)}
    rec["seconds"] = {"weight": round(t1 - t0, 2), "channel": round(time.perf_counter() - t1, 2)}
    return rec


# --------------------------------------------------------------------------- table
def render_table(records: list[dict]) -> str:
    """The README's support table (markdown), one row per model, grouped by source and family."""
    order = {"timm": 0, "torchvision": 1, "smp": 2}
    rows = ["| source | family | model | weight | channel |", "|---|---|---|---|---|"]
    for rec in sorted(records, key=lambda r: (order[r["source"]], r["family"].lower(), r["name"])):
        ch = rec["channel"]
        channel = "✓ exact" if ch["status"] == "exact" else f"refused: {ch['reason']}"
        weight = "✓" if rec["weight"]["status"] == "ok" else "✗"
        rows.append(f"| {rec['source']} | {rec['family']} | `{rec['name']}` | {weight} | {channel} |")
    return "\n".join(rows)


def summary(records: list[dict]) -> dict:
    reasons: dict[str, int] = {}
    for rec in records:
        if rec["channel"]["status"] == "refused":
            reasons[rec["channel"]["reason"]] = reasons.get(rec["channel"]["reason"], 0) + 1
    return {"models": len(records), "weight_ok": sum(r["weight"]["status"] == "ok" for r in records),
            "channel_exact": sum(r["channel"]["status"] == "exact" for r in records),
            "channel_refused": sum(r["channel"]["status"] == "refused" for r in records),
            "refused_by_reason": dict(sorted(reasons.items(), key=lambda kv: -kv[1]))}


def readme_table(text: str) -> str | None:
    """The table between the README's support-table markers (None when the markers are missing)."""
    if TABLE_START not in text or TABLE_END not in text:
        return None
    return text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()


def _with_table(text: str, table: str) -> str:
    head, rest = text.split(TABLE_START, 1)
    return head + TABLE_START + "\n" + table + "\n" + TABLE_END + rest.split(TABLE_END, 1)[1]


def _commit() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return head + ("+uncommitted-changes" if dirty else "")


def _machine() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_num_threads": torch.get_num_threads(),
            "load_average_at_start": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="model names or keys (default: all; a subset is printed only)")
    ap.add_argument("--update-readme", action="store_true", help="rewrite the README's support table")
    args = ap.parse_args(argv)
    specs = [s for s in SPECS if not args.models or s.name in args.models or s.key in args.models]
    machine, t0, cpu0 = _machine(), time.perf_counter(), time.process_time()
    records = []
    for spec in specs:
        rec = check_model(spec)
        records.append(rec)
        ch = rec["channel"]
        print(f"{spec.key:45s} weight ok  channel {ch['status']:8s} {ch.get('reason', '')}  "
              f"({rec['seconds']['weight']:.1f}s + {rec['seconds']['channel']:.1f}s)", flush=True)
    total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(json.dumps(summary(records), indent=1), f"\n{total:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    if args.models:
        return 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    body = {"benchmark": "coverage sweep (benchmarks/coverage_sweep.py)", "command": " ".join(sys.argv),
            "commit": _commit(), "machine": machine, "seconds_total": round(total, 1), "cpu_seconds_total": round(cpu, 1),
            "load_average_at_end": list(os.getloadavg()), "num_tickets": K,
            "graph_timeout_s": GRAPH_TIMEOUT, "tolerance": TOL, "summary": summary(records), "models": records}
    SUPPORT_FILE.write_text(json.dumps(body, indent=1, ensure_ascii=False) + "\n")
    TABLE_FILE.write_text(render_table(records) + "\n")
    if args.update_readme:
        README.write_text(_with_table(README.read_text(), render_table(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
