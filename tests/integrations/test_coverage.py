"""The coverage sweep (benchmarks/coverage_sweep.py) in CI: every timm / torchvision / smp model of the sweep
wraps and exports exactly in weight granularity, is exact or refused at wrap (with an RTLError naming the
cause) in channel granularity, routes mixed batches (and smp: pixels) like each route alone, and gives the
result recorded in benchmarks/results/coverage/support.json, from which the README's table is rendered."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _sweep():
    spec = importlib.util.spec_from_file_location("coverage_sweep", ROOT / "benchmarks" / "coverage_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["coverage_sweep"] = mod  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


sweep = _sweep()
RECORDED = {m["key"]: m for m in json.loads(sweep.SUPPORT_FILE.read_text())["models"]}


def _param(spec):
    return pytest.param(spec, id=spec.key, marks=[pytest.mark.slow] if spec.slow else [])


@pytest.mark.parametrize("spec", [_param(s) for s in sweep.SPECS])
def test_model_is_exact_or_refused_as_recorded(spec):
    rec = sweep.check_model(spec)  # raises on a wrong export, a crash after export, a failing route check
    assert rec["weight"]["status"] == "ok" and rec["weight"]["max_err"] < sweep.TOL
    ch = rec["channel"]
    assert ch["status"] in ("exact", "refused")
    if ch["status"] == "exact":
        assert ch["max_err"] < sweep.TOL
    else:
        assert ch["error"] in ("UnsupportedLayerError", "GraphTimeoutError", "SpaceError"), ch
        assert "granularity='weight'" in ch["message"], ch["message"]  # the refusal names the alternative
    want = RECORDED.get(spec.key)
    assert want is not None, f"{spec.key} is not in {sweep.SUPPORT_FILE}: rerun benchmarks/coverage_sweep.py"
    assert (ch["status"], ch.get("reason")) == (want["channel"]["status"], want["channel"].get("reason")), \
        f"{spec.key}: the sweep file records {want['channel']}; rerun benchmarks/coverage_sweep.py --update-readme"


def test_sweep_covers_the_families_and_sizes_the_issue_names():
    timm_families = {s.family for s in sweep.SPECS if s.source == "timm"}
    need = {"ResNet", "SE-ResNet", "NF-Net", "CSPNet", "Res2Net", "DPN", "DLA", "HRNet", "GhostNet", "MixNet",
            "ReXNet", "RegNet", "RepVGG", "VoVNet", "HGNet", "FastViT", "MobileNetV4", "EfficientNet", "ConvNeXt",
            "ViT", "DeiT", "MobileViT", "LeViT", "EfficientViT"}
    assert need <= timm_families, need - timm_families
    assert sum(s.source == "timm" for s in sweep.SPECS) >= 40
    smp = [s.name.split("/") for s in sweep.SPECS if s.source == "smp"]
    assert {a for a, _ in smp} >= {"Unet", "FPN", "DeepLabV3Plus"} and len({e for _, e in smp}) >= 6
    assert set(RECORDED) == {s.key for s in sweep.SPECS}, "support.json is out of date: rerun the sweep"


def test_readme_table_is_the_sweep_file():
    table = sweep.readme_table((ROOT / "README.md").read_text())
    assert table is not None, "README.md lacks the support-table markers"
    assert table == sweep.render_table(list(RECORDED.values())), \
        "README's Supported models table differs from the sweep: run benchmarks/coverage_sweep.py --update-readme"
    assert sweep.TABLE_FILE.read_text().strip() == table
