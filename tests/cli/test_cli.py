"""The `rtl` command line and the classification experiment behind `rtl demo`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rtl_plugin as rtl
from rtl_plugin.cli import main

METHODS = {"dense", "single_imp", "single_imp_balanced", "single_imp_context", "multi_imp", "rtl"}
METRICS = {"balanced_accuracy", "precision", "recall", "accuracy", "auc"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rc = main(["demo", "--quick", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


def test_demo_results_schema(demo_run):
    res = json.loads((demo_run / "results.json").read_text())
    for key in ("task", "dataset", "model", "granularity", "num_tickets", "seed", "device", "rows", "similarity",
                "wall_time_s"):
        assert key in res
    assert res["task"] == "classification" and res["num_tickets"] == 3
    assert {r["method"] for r in res["rows"]} == METHODS
    assert set(res["wall_time_s"]) >= {"ticket_search", "single_imp", "multi_imp", "joint_retrain"}
    for r in res["rows"]:
        assert r["routing"] in {"context", "learned", "centroid", "all", "none"}
        assert METRICS <= set(r["metrics"])
        assert 0.0 <= r["metrics"]["accuracy"] <= 1.0
        assert r["params"] > 0
    sps = sorted({r["sparsity"] for r in res["rows"] if r["method"] == "rtl"})
    assert sps == [0.5, 0.75]
    # label-free rows exist next to the oracle-routed ones
    assert {r["routing"] for r in res["rows"] if r["method"] == "rtl"} == {"context", "learned", "centroid"}
    # both matchings are reported for single IMP
    assert {r["matching"] for r in res["rows"] if r["method"] == "single_imp"} == {"equal_cost", "equal_storage"}
    # parameter accounting: RTL stores the union, multi-model stores K tickets
    for s in sps:
        rtl_row = next(r for r in res["rows"] if r["method"] == "rtl" and r["sparsity"] == s and r["routing"] == "context")
        multi = next(r for r in res["rows"] if r["method"] == "multi_imp" and r["sparsity"] == s)
        assert rtl_row["params"] <= multi["params"]
        assert rtl_row["params"] >= max(rtl_row["per_ticket_params"])
        assert multi["params"] == sum(rtl_row["per_ticket_params"])
    for sim in res["similarity"]:
        assert 0.0 <= sim["chance"] <= 1.0 and 0.0 <= sim["mean_jaccard"] <= 1.0


def test_demo_writes_figures_and_loadable_tickets(demo_run):
    res = json.loads((demo_run / "results.json").read_text())
    for fig in res["figures"]:
        p = demo_run / fig
        assert p.is_file() and p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG"
    assert res["tickets"]["0.5"] == "tickets/sparsity_50"  # relative to the run folder: the folder can move
    folder = demo_run / res["tickets"]["0.5"]
    import timm
    model = timm.create_model("test_resnet", num_classes=22, in_chans=3)
    routed = rtl.load(folder, model)
    assert routed.num_tickets == 3
    assert abs(float(routed.tickets.sparsity().mean()) - 0.5) < 1e-3
    with torch.no_grad():
        y = routed.eval()(torch.randn(4, 3, 16, 16), route=torch.tensor([0, 1, 2, 0]))
    assert y.shape == (4, 22) and torch.isfinite(y).all()


def test_diagnose_prints_similarity(demo_run, capsys):
    assert main(["diagnose", str(demo_run)]) == 0
    out = capsys.readouterr().out
    assert "mean pairwise Jaccard" in out and "sparsity_50" in out and "digits=" in out and "by depth" in out
    assert "collapse monitor:" in out and "report.html" in out
    for f in ("report.md", "report.html", "diagnostics.json", "sweep.png"):
        assert (demo_run / "diagnostics" / f).is_file(), f


@pytest.mark.parametrize("spec,expect", [("timm:resnet18", "layer4.0.downsample.0"), ("audio:unet", "unet.enc1.conv")])
def test_info_prints_space(spec, expect, capsys):
    assert main(["info", spec]) == 0
    out = capsys.readouterr().out
    assert "prunable weights" in out and expect in out and "channel groups" in out


def test_info_unknown_family_is_a_clean_error(capsys):
    assert main(["info", "keras:resnet"]) == 2
    assert "unknown model family" in capsys.readouterr().err


def test_bad_sparsities_rejected(tmp_path):
    with pytest.raises(SystemExit):
        main(["prune", "--sparsities", "a,b", "--out", str(tmp_path)])
    assert main(["prune", "--quick", "--sparsities", "0.9,0.5", "--out", str(tmp_path), "--no-progress",
                 "--baselines", "", "--routers", ""]) == 2


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "rtl_plugin.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "demo" in proc.stdout and "prune" in proc.stdout


@pytest.mark.parametrize("argv,needle", [
    (["diagnose", "/nonexistent/run"], "is not a folder"),
    (["info", "timm:not_a_model_name"], "unknown timm model"),
    (["prune", "--quick", "--model", "timm:no_such_net", "--routers", "", "--baselines", ""], "unknown timm model"),
    (["prune", "--quick", "--domains", "digits,nowhere", "--routers", "", "--baselines", ""], "nowhere"),
])
def test_cli_bad_inputs_are_clean_errors(argv, needle, tmp_path, capsys):
    rc = main(argv + (["--out", str(tmp_path / "o")] if argv[0] == "prune" else []))
    err = capsys.readouterr().err
    assert rc == 2 and needle.lower() in err.lower(), err


def test_export_channel_run_to_package_with_onnx(tmp_path):
    import torch

    import rtl_plugin as rtl
    from rtl_plugin.tasks.classification.data import load_domains
    from rtl_plugin.tasks.classification.runner import make_model_factory

    run = tmp_path / "run"
    assert main(["prune", "--quick", "--granularity", "channel", "--baselines", "", "--routers", "",
                 "--sparsities", "0.5", "--no-progress", "--collapse", "off", "--out", str(run)]) == 0
    pkg = tmp_path / "pkg"
    assert main(["export", str(run), "--out", str(pkg), "--onnx"]) == 0
    assert {f"ticket_{k}.onnx" for k in range(3)} <= {p.name for p in pkg.iterdir()}
    cfg = json.loads((run / "results.json").read_text())["config"]
    train, _ = load_domains(image_size=cfg["image_size"], channels=3, domains=tuple(cfg["domains"]), seed=0,
                            max_per_domain=cfg["max_per_domain"])
    make = make_model_factory(cfg["model"], train.num_classes, 3)
    slim = rtl.load_package(pkg, make(0))
    routed = rtl.load(run / "tickets" / "sparsity_50", make(0)).eval()
    x, ids = train.x[:12], train.domain[:12]
    with torch.no_grad():
        a, b = slim(x, route=ids), routed(x, route=ids)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        assert slim(x).shape == b.shape  # the packaged learned router picks the tickets
    assert main(["export", str(run), "--out", str(tmp_path / "p2"), "--sparsity", "0.8"]) == 2
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "p3")]) == 2


# ----------------------------------------------------------------------------- self-contained run folders
def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def _demo_model():
    import timm
    return timm.create_model("test_resnet", num_classes=22, in_chans=3)


def test_results_json_holds_no_absolute_path(demo_run):
    res = json.loads((demo_run / "results.json").read_text())
    strings = list(_strings(res))
    assert "tickets/sparsity_50" in strings  # the walk sees the ticket entries
    bad = [s for s in strings if s.startswith("/") or str(demo_run) in s or demo_run.name in s]
    assert bad == []


def test_moved_run_folder_loads_diagnoses_and_exports(demo_run, tmp_path):
    """The demo run folder moved elsewhere (the original gone): tickets load, diagnose and export work."""
    import shutil

    from rtl_plugin.persist.run_folder import saved_tickets
    moved = tmp_path / "elsewhere" / "moved_run"
    moved.parent.mkdir()
    shutil.move(str(demo_run), str(moved))
    try:
        assert not demo_run.exists()
        saved = saved_tickets(moved)
        assert set(saved) == {0.5, 0.75} and all(moved in f.parents for f in saved.values())
        for s, folder in saved.items():
            routed = rtl.load(folder, _demo_model())
            assert abs(float(routed.tickets.sparsity().mean()) - s) < 1e-3
        diag = rtl.diagnose_run(moved)
        assert Path(diag["out_dir"]) == moved / "diagnostics"
        assert diag["figures"] and all((moved / "diagnostics" / f).read_bytes()[:4] == b"\x89PNG"
                                       for f in diag["figures"])
        assert "sparsity_75" in Path(diag["report_md"]).read_text() and Path(diag["report_html"]).is_file()
        written = list(_strings(json.loads((moved / "diagnostics" / "diagnostics.json").read_text())))
        assert "tickets/sparsity_75" in written and not [s for s in written if s.startswith("/")]
        pkg = tmp_path / "pkg"
        assert main(["export", str(moved), "--out", str(pkg), "--sparsity", "0.75", "--router", "none"]) == 0
        slim = rtl.load_package(pkg, _demo_model())
        routed = rtl.load(saved[0.75], _demo_model()).eval()
        x, ids = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2] * 2)
        with torch.no_grad():
            assert torch.equal(slim(x, route=ids), routed(x, route=ids))
    finally:
        shutil.move(str(moved), str(demo_run))  # the fixture serves the other tests of this module


def test_old_results_with_absolute_ticket_paths(demo_run, tmp_path, capsys):
    """results.json of the previous version (absolute paths to a deleted place): resolved inside the copy."""
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("diagnostics"))
    res = json.loads((run / "results.json").read_text())
    res["tickets"] = {s: f"/gone/original/run/tickets/{Path(e).name}" for s, e in res["tickets"].items()}
    (run / "results.json").write_text(json.dumps(res))
    assert main(["export", str(run), "--out", str(tmp_path / "pkg"), "--router", "none"]) == 0
    assert "sparsity_75" in capsys.readouterr().out  # the sparsest saved one, found in this copy
    assert rtl.load_package(tmp_path / "pkg", _demo_model()).num_tickets == 3
    shutil.rmtree(run / "tickets" / "sparsity_75")
    assert main(["export", str(run), "--out", str(tmp_path / "pkg2"), "--router", "none"]) == 2
    err = capsys.readouterr().err
    assert "sparsity_75" in err and "does not exist" in err and "/gone/original" in err


def test_prune_with_learned_tickets_and_a_joint_gate(tmp_path, capsys):
    out = tmp_path / "learned"
    assert main(["prune", "--quick", "--max-per-domain", "48", "--sparsities", "0.5", "--tickets", "learned",
                 "--learned-routing", "groups", "--learned-backbone", "train", "--baselines", "", "--routers", "",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "learned tickets: 50% gate accuracy" in printed and "rtl                   gate" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["tickets"] == "learned" and res["config"]["learned_backbone"] == "train"
    rows = {r["routing"]: r for r in res["rows"] if r["method"] == "rtl"}
    assert set(rows) == {"context", "gate"}  # groups: the domains trained the tickets, the gate learned them
    assert 0.0 <= rows["gate"]["routing_accuracy"] <= 1.0 and 0 < rows["gate"]["router_flops_share"] < 0.01
    summary = res["learned_tickets"][0]
    assert summary["sparsity"] == 0.5 and summary["steps"] > 0 and len(summary["route_counts"]) == 3
    import timm
    routed = rtl.load(out / res["tickets"]["0.5"], timm.create_model("test_resnet", num_classes=22, in_chans=3))
    assert torch.allclose(routed.tickets.sparsity(), torch.full((3,), 0.5, dtype=routed.tickets.sparsity().dtype),
                          atol=1e-3)
    # the jointly trained gate is saved beside the tickets and packaged by `rtl export --router gate`
    from rtl_plugin.comparison.learned import load_gate
    gate = load_gate(out / res["tickets"]["0.5"])
    assert main(["export", str(out), "--out", str(tmp_path / "pkg"), "--router", "gate"]) == 0
    slim = rtl.load_package(tmp_path / "pkg", timm.create_model("test_resnet", num_classes=22, in_chans=3))
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(slim(x), routed.eval()(x, route=gate(x)), rtol=1e-4, atol=1e-5)
    with pytest.raises(rtl.errors.RouteError, match="no jointly trained gate"):
        load_gate(tmp_path)
    assert main(["prune", "--task", "segmentation", "--data", str(tmp_path), "--tickets", "learned",
                 "--out", str(tmp_path / "seg")]) == 2
    assert "--tickets learned is for classification" in capsys.readouterr().err
