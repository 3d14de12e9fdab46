"""`rtl prune --data DIR` end to end on real image folders written from offline sources (UCI digits + MNIST as
PNG / JPEG files; scikit-image photo mosaics with PNG class masks): results.json, figures, tickets, export."""
from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import timm
import torch

import rtl_plugin as rtl
from _image_folders import DIGITS, contexts_csv, write_digit_folder, write_mask_folder
from rtl_plugin.cli import main

FAST = ["--quick", "--no-progress", "--sparsities", "0.5", "--collapse", "off"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digit_folder(tmp_path_factory.mktemp("img") / "digits", per_class=6)


@pytest.fixture(scope="module")
def context_run(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "ctx"
    rc = main(["prune", "--data", str(digits), "--contexts", str(contexts_csv(digits)), "--baselines", "single_imp",
               "--routers", "learned", "--out", str(out), *FAST])
    assert rc == 0
    return out


def test_folder_run_with_contexts_writes_results_figures_tickets(context_run, digits, capsys):
    res = json.loads((context_run / "results.json").read_text())
    assert res["dataset"] == "folder:digits" and res["num_tickets"] == 2 and res["ticket_names"] == ["mnist", "uci"]
    assert res["data"]["classes"] == list(DIGITS) and res["data"]["train_images"] + res["data"]["test_images"] == 36
    assert res["config"]["data_dir"] == str(digits) and res["config"]["partition"] == "domain"
    assert {r["method"] for r in res["rows"]} == {"rtl", "single_imp"}
    assert {r["routing"] for r in res["rows"] if r["method"] == "rtl"} == {"context", "learned"}
    for fig in res["figures"]:
        assert (context_run / fig).read_bytes()[:4] == b"\x89PNG"
    routed = rtl.load(context_run / res["tickets"]["0.5"], timm.create_model("test_resnet", num_classes=3))
    assert routed.num_tickets == 2


def test_export_of_a_folder_run_reloads_the_folder(context_run, tmp_path, capsys):
    assert main(["export", str(context_run), "--out", str(tmp_path / "pkg")]) == 0
    assert "router learned" in capsys.readouterr().out
    slim = rtl.load_package(tmp_path / "pkg", timm.create_model("test_resnet", num_classes=3))
    with torch.no_grad():
        assert slim.eval()(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_checkpoint_val_folder_and_class_partition(digits, tmp_path, capsys):
    src = timm.create_model("test_resnet", num_classes=10)
    safetensors.torch.save_file(src.state_dict(), tmp_path / "r.safetensors")
    val = tmp_path / "val"
    shutil.copytree(digits, val)
    out = tmp_path / "run"
    assert main(["prune", "--data", str(digits), "--val-data", str(val), "--checkpoint", str(tmp_path / "r.safetensors"),
                 "--baselines", "", "--routers", "", "--max-per-domain", "10", "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "classifier reset from 10 to the data's 3 classes" in printed
    assert "partition class" in printed and "read 10 of 36 images" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["checkpoint"]["classifier_reset"] is True and res["checkpoint"]["num_classes"] == 10
    assert res["num_tickets"] == 3 and res["ticket_names"] == list(DIGITS)


def test_kmeans_partition_on_a_folder(digits, tmp_path, capsys):
    out = tmp_path / "km"
    assert main(["prune", "--data", str(digits), "--partition", "kmeans", "--clusters", "2", "--baselines", "",
                 "--routers", "", "--out", str(out), *FAST]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["partition"] == "kmeans" and res["num_tickets"] == 2 and res["data"]["contexts"] == ["all"]


@pytest.mark.parametrize("extra,needle", [
    (["--partition", "domain"], "needs the contexts"),
    (["--model", "timm:test_efficientnet", "--checkpoint", "CKPT"], "another architecture"),
    (["--contexts", "MISSING.csv"], "does not exist"),
    (["--data", "EMPTY"], "no class sub folders"),
    (["--data", "ONE"], "single class"),
    (["--data", "BROKEN", "--unreadable", "error"], "cannot be read"),
])
def test_folder_bad_inputs_are_clean_errors(digits, tmp_path, capsys, extra, needle):
    (tmp_path / "EMPTY").mkdir()
    shutil.copytree(digits / DIGITS[0], tmp_path / "ONE" / DIGITS[0])
    shutil.copytree(digits, tmp_path / "BROKEN")
    (tmp_path / "BROKEN" / DIGITS[1] / "x.jpg").write_bytes(b"no image")
    safetensors.torch.save_file(timm.create_model("test_resnet").state_dict(), tmp_path / "r.safetensors")
    paths = {"CKPT": tmp_path / "r.safetensors", "MISSING.csv": tmp_path / "missing.csv",
             **{n: tmp_path / n for n in ("EMPTY", "ONE", "BROKEN")}}
    argv = ["prune", "--data", str(digits), "--baselines", "", "--routers", "", "--out", str(tmp_path / "o"), *FAST]
    argv += [str(paths[a]) if a in paths else a for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rtl: error:") and needle in err, err


def test_segmentation_folder_run_and_export(tmp_path, capsys):
    data = write_mask_folder(tmp_path / "seg", n=10)
    out = tmp_path / "run"
    assert main(["prune", "--task", "segmentation", "--data", str(data), "--baselines", "", "--out", str(out),
                 *FAST]) == 0
    printed = capsys.readouterr().out
    assert "mIoU rtl        label_free" in printed and "pixel accuracy at 50%" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "segmentation" and res["ticket_names"] == ["brick", "grass", "coffee"]
    assert {r["method"] for r in res["rows"]} == {"rtl", "single_imp"}
    assert (out / "miou.png").is_file() and res["tickets"]["0.5"] == "tickets/sparsity_50"
    assert main(["export", str(out), "--out", str(tmp_path / "pkg")]) == 2  # the default learned router
    assert "--router none" in capsys.readouterr().err
    assert main(["export", str(out), "--out", str(tmp_path / "pkg"), "--router", "none"]) == 0
    assert main(["prune", "--task", "segmentation", "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "needs --data" in capsys.readouterr().err
