"""benchmarks/aggregate_speech.py and aggregate_segmentation.py: numbers over seeds from result files,
paired differences with a t confidence interval, and refusal to mix settings or repeat a seed."""
import json
import math

import pytest


def _speech_result(seed, rtl, single, multi, learned, **config):
    def rows(shift):
        out = [{"method": "dense", "routing": "none", "sparsity": 0.0, "metrics": {"si_snri": 2.0 + shift}}]
        for s, a, b, c, d in zip((0.25, 0.5), rtl, single, multi, learned):
            out += [{"method": "rtl", "routing": "context", "sparsity": s, "metrics": {"si_snri": a + shift}},
                    {"method": "rtl", "routing": "learned", "sparsity": s, "metrics": {"si_snri": d + shift}},
                    {"method": "single_imp", "routing": "none", "sparsity": s, "metrics": {"si_snri": b + shift}},
                    {"method": "multi_imp", "routing": "context", "sparsity": s, "metrics": {"si_snri": c + shift}}]
        return out
    cfg = {"seed": seed, "sparsities": [0.25, 0.5], "noise_split": "instances", "per_ticket_state": False,
           "train_per_env": 96, "device": "cpu", "progress": False}
    cfg.update(config)
    return {"task": "speech_enhancement", "config": cfg, "rows": rows(0.0), "rows_real": rows(-1.0)}


def _write(tmp_path, name, obj):
    (tmp_path / name).write_text(json.dumps(obj))


def test_speech_paired_differences_and_ci(tmp_path, benchmark_module):
    agg_mod = benchmark_module("aggregate_speech")
    _write(tmp_path, "s0.json", _speech_result(0, rtl=(3.0, 2.0), single=(2.5, 2.5), multi=(2.0, 2.0), learned=(2.9, 1.7)))
    _write(tmp_path, "s1.json", _speech_result(1, rtl=(3.2, 2.2), single=(2.9, 2.4), multi=(2.0, 2.0), learned=(3.0, 2.1),
                                               device="cuda", progress=True))
    _write(tmp_path, "s2.json", _speech_result(2, rtl=(2.8, 2.6), single=(2.6, 2.5), multi=(2.0, 2.0), learned=(2.5, 2.6)))
    agg = agg_mod.aggregate(agg_mod.load_runs(str(tmp_path / "s*.json")))
    assert agg["seeds"] == [0, 1, 2]
    syn = agg["test_sets"]["synthetic"]
    assert syn["si_snri"]["rtl context"]["0.25"]["mean"] == pytest.approx(3.0)
    assert syn["si_snri"]["dense none"]["0.0"]["mean"] == pytest.approx(2.0)
    d = syn["paired"]["rtl_minus_single_imp"]["0.25"]  # diffs 0.5, 0.3, 0.2
    assert d["per_seed"] == pytest.approx([0.5, 0.3, 0.2])
    assert d["mean"] == pytest.approx(1 / 3, abs=1e-4)
    half = 4.302653 * math.sqrt(((0.5 - 1 / 3) ** 2 + (0.3 - 1 / 3) ** 2 + (0.2 - 1 / 3) ** 2) / 2) / math.sqrt(3)
    assert d["ci95"] == pytest.approx([1 / 3 - half, 1 / 3 + half], abs=1e-4)
    assert d["met_seeds"] == "3/3"
    assert syn["paired"]["rtl_minus_single_imp"]["0.5"]["met_seeds"] == "1/3"  # -0.5, -0.2, +0.1
    # router target is "within 0.2 dB": diffs -0.1, -0.2 (on the boundary: met), -0.3 at 25%; -0.3, -0.1, 0.0 at 50%
    assert syn["paired"]["router_minus_oracle"]["0.25"]["met_seeds"] == "2/3"
    assert syn["paired"]["router_minus_oracle"]["0.5"]["met_seeds"] == "2/3"
    # paired differences do not see a per-seed shift common to both methods
    assert agg["test_sets"]["real"]["paired"]["rtl_minus_multi_imp"]["0.25"]["mean"] == pytest.approx(1.0)
    text = agg_mod.format_aggregate(agg)
    assert "rtl_minus_single_imp" in text and "real speech" in text


def test_speech_refuses_mixed_settings_and_repeated_seeds(tmp_path, benchmark_module):
    agg_mod = benchmark_module("aggregate_speech")
    args = dict(rtl=(3.0, 2.0), single=(2.5, 2.5), multi=(2.0, 2.0), learned=(2.9, 1.7))
    _write(tmp_path, "a0.json", _speech_result(0, **args))
    _write(tmp_path, "a1.json", _speech_result(1, **args, per_ticket_state=True))
    with pytest.raises(SystemExit, match="per_ticket_state"):
        agg_mod.load_runs(str(tmp_path / "a*.json"))
    _write(tmp_path, "b0.json", _speech_result(0, **args))
    _write(tmp_path, "b1.json", _speech_result(0, **args))
    with pytest.raises(SystemExit, match="same seed"):
        agg_mod.load_runs(str(tmp_path / "b*.json"))
    with pytest.raises(SystemExit, match="no file"):
        agg_mod.load_runs(str(tmp_path / "none*.json"))
    _write(tmp_path, "c0.json", {"benchmark": "segmentation_mosaic"})
    with pytest.raises(SystemExit, match="not a speech_enhancement"):
        agg_mod.load_runs(str(tmp_path / "c*.json"))


def _seg_result(seed, rtl, single, **config):
    cfg = {"seed": seed, "n_train": 96, "partition": "class"}
    cfg.update(config)
    return {"benchmark": "segmentation_mosaic", "runs": {"resnet18": {
        "config": cfg, "miou": {"rtl": {"label_free": {"0.75": rtl}}, "single_imp": {"direct": {"0.75": single}}}}}}


def test_segmentation_gap_and_refusals(tmp_path, benchmark_module):
    agg_mod = benchmark_module("aggregate_segmentation")
    _write(tmp_path, "s0.json", _seg_result(0, 0.80, 0.78))
    _write(tmp_path, "s1.json", _seg_result(1, 0.70, 0.74))
    agg = agg_mod.aggregate(agg_mod.load_runs(str(tmp_path / "s*.json")))["resnet18"]
    assert agg["rtl_label_free_minus_single"]["0.75"] == pytest.approx(-0.01)
    assert agg["rtl_label_free_ge_single_seeds"]["0.75"] == "1/2"
    assert agg["miou"]["single_imp direct"]["0.75"]["mean"] == pytest.approx(0.76)
    _write(tmp_path, "m0.json", _seg_result(0, 0.8, 0.7))
    _write(tmp_path, "m1.json", _seg_result(1, 0.8, 0.7, n_train=192))
    with pytest.raises(SystemExit, match="n_train"):
        agg_mod.aggregate(agg_mod.load_runs(str(tmp_path / "m*.json")))
