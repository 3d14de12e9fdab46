"""benchmarks/speed.py --quick: one command writes speed.json with every required ratio (positive, finite),
the device and the absolute numbers behind the ratios. Correctness only; the numbers live in RESULTS.md."""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
REQUIRED = ("routed_weight_vs_dense", "routed_channel50_vs_dense", "routed_channel75_vs_dense",
            "joint_retrain_vs_dense", "ticket_search_vs_single_imp", "storage_vs_k_dense", "peak_memory_vs_dense")


@pytest.fixture(scope="module")
def speed_json(tmp_path_factory):
    import timm  # noqa: F401  ([test] extra: a missing one fails)
    out = tmp_path_factory.mktemp("speed")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--quick", "--out", str(out),
                           "--image2", "40", "--train-image2", "40"],
                          cwd=out, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "speed.json").read_text())


def test_required_ratios_positive_finite(speed_json):
    for key in REQUIRED:
        v = speed_json[key]
        assert isinstance(v, float) and math.isfinite(v) and v > 0, (key, v)
        assert speed_json["ratios"][key] == v
    assert all(math.isfinite(v) and v > 0 for v in speed_json["ratios"].values())


def test_device_settings_and_absolute_numbers(speed_json):
    assert speed_json["device"] == "cpu" and speed_json["threads"] == 1
    assert speed_json["device_info"]["torch"]
    assert speed_json["settings"]["quick"] is True and speed_json["settings"]["tickets"] == 10
    t = speed_json["times_s"]
    for key in ("dense_infer", "routed_weight_infer", "routed_channel50_infer", "routed_channel75_infer",
                "dense_train", "joint_retrain", "single_imp_search", "ticket_search"):
        assert t[key] > 0, key
    b = speed_json["bytes"]
    assert b["k_dense"] == 10 * b["dense_model"] and 0 < b["rtl_run"] < b["k_dense"]
    m = speed_json["peak_memory_bytes"]
    assert m["dense"] > 0 and m["routed_weight"] > 0
    # each ratio is the quotient of the absolute numbers stored beside it
    r = speed_json["ratios"]
    assert r["routed_weight_vs_dense"] == pytest.approx(t["routed_weight_infer"] / t["dense_infer"], rel=1e-2)
    assert r["storage_vs_k_dense"] == pytest.approx(b["rtl_run"] / b["k_dense"], rel=1e-3)
    assert r["ticket_search_vs_single_imp"] == pytest.approx(t["ticket_search"] / t["single_imp_search"], rel=1e-2)
    # extra input sizes and the steady-state / first-epoch split of the training timing
    for key in ("routed_weight_vs_dense_img40", "routed_channel50_vs_dense_img40", "routed_channel50_vs_dense_b64_img40",
                "joint_retrain_vs_dense_img40", "joint_retrain_first_epoch_vs_dense", "dense_bucketed_vs_dense",
                "dense_bucketed_vs_dense_img40", "routed_weight_vs_dense_bucketed"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert speed_json["settings"]["image2"] == [40] and speed_json["settings"]["train_image2"] == [40]
    assert r["joint_retrain_vs_dense"] == pytest.approx(
        (t["joint_retrain"] / speed_json["counts"]["joint_retrain_samples"])
        / (t["dense_train"] / speed_json["counts"]["dense_train_samples"]), rel=1e-2)
    # the channel tickets really are 50% / 75% channel-sparse (~75% / ~94% of the weights)
    assert speed_json["settings"]["channel50_weight_sparsity"] > 0.6
    assert speed_json["settings"]["channel75_weight_sparsity"] > speed_json["settings"]["channel50_weight_sparsity"]


def test_both_execution_paths_side_by_side(speed_json):
    """Issue 19: bucketed and grouped timings in one run; the keys of earlier runs are the path "auto" takes
    (bucketed on the CPU); peak memory with the bounded cache; the padding the grouped path computes on."""
    t, r = speed_json["times_s"], speed_json["ratios"]
    assert speed_json["settings"]["auto_execution"]["weight"] == "bucketed"
    for key in ("routed_weight_bucketed_infer", "routed_weight_grouped_infer", "routed_weight_grouped_balanced_infer",
                "routed_weight_grouped_nocache_infer", "routed_channel50_bucketed_infer",
                "routed_weight_grouped_infer_img40"):
        assert t[key] > 0, key
    assert t["routed_weight_infer"] == t["routed_weight_bucketed_infer"]
    assert r["routed_weight_grouped_vs_bucketed"] == pytest.approx(
        t["routed_weight_grouped_infer"] / t["routed_weight_bucketed_infer"], rel=1e-2)
    assert r["peak_memory_grouped_bounded_vs_dense"] > 0 and r["peak_memory_grouped_vs_dense"] > 0
    assert speed_json["settings"]["grouped_padded_rows_vs_batch"] >= 1.0
    # the channel packages run grouped unless their first-batch check refuses (then the reason is recorded)
    assert ("routed_channel50_grouped_infer" in t) != ("channel50_grouped_blocker" in speed_json["settings"])
