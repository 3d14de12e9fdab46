"""benchmarks/fashion_detectors.py: the benchmark CNN's θ0 is the paper's Kaiming-normal init (fan_in, ReLU),
and the per-ticket per-layer density recorded for every sparsity is each ticket's own kept fraction."""
import math

import pytest
import torch
import torch.nn as nn

import rtl_plugin as rtl


def test_plain_cnn_conv_weights_have_kaiming_normal_std(benchmark_module, kaiming_std_ratios):
    fd = benchmark_module("fashion_detectors")
    ratios = kaiming_std_ratios(fd.model_factory("cnn")(0))
    assert len(ratios) == 5
    # the smallest layer has 144 weights: its std is within ~15% of the target; the others within ~5%
    assert all(abs(r - 1.0) < 0.2 for r in ratios), ratios
    assert abs(sum(ratios[1:]) / 4 - 1.0) < 0.05, ratios
    # PyTorch's default conv init U(±1/sqrt(fan_in)) has std sqrt(1/(3 fan_in)): ratio 1/sqrt(6) ~ 0.41
    default = nn.Conv2d(32, 64, 3, bias=False)
    assert abs(kaiming_std_ratios(default)[0] - 1 / math.sqrt(6)) < 0.05


def test_torch_init_keeps_pytorchs_default_for_the_ablation(benchmark_module, kaiming_std_ratios):
    fd = benchmark_module("fashion_detectors")
    ratios = kaiming_std_ratios(fd.model_factory("cnn", "torch")(0))
    # U(±1/sqrt(fan_in)): std ratio 1/sqrt(6) ~ 0.41 of the Kaiming std, bounded at 1/sqrt(fan_in)
    assert all(abs(r - 1 / math.sqrt(6)) < 0.08 for r in ratios), ratios
    convs = [m for m in fd.model_factory("cnn", "torch")(0).modules() if isinstance(m, nn.Conv2d)]
    assert all(float(m.weight.abs().max()) <= 1 / math.sqrt(m.weight[0].numel()) + 1e-7 for m in convs)
    with pytest.raises(ValueError, match="init must be one of"):
        fd.PlainCNN(init="xavier")


def test_plain_cnn_init_is_normal_not_uniform(benchmark_module):
    fd = benchmark_module("fashion_detectors")
    convs = [m.weight.detach().flatten() for m in fd.model_factory("cnn")(1).modules() if isinstance(m, nn.Conv2d)]
    z = torch.cat([w / w.std() for w in convs[1:]])  # each layer standardised: a mixture of scales is not normal
    # a uniform distribution is bounded at sqrt(3) std; a normal one of ~115K draws is not
    assert float(z.abs().max()) > 3.5
    assert abs(float((z ** 4).mean()) - 3.0) < 0.3  # normal kurtosis 3 (uniform: 1.8)


def test_same_seed_same_theta0(benchmark_module):
    fd = benchmark_module("fashion_detectors")
    make = fd.model_factory("cnn")
    a, b = make(3).state_dict(), make(3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_per_ticket_layer_density_is_each_tickets_kept_fraction(benchmark_module):
    fd = benchmark_module("fashion_detectors")
    model = fd.PlainCNN(widths=(4, 4, 4, 4, 4))
    routed = rtl.wrap(model, 3, example_inputs=torch.randn(1, 1, 28, 28))
    masks = routed.tickets.element_masks()
    names = list(masks)
    masks[names[0]][1].zero_()                     # ticket 1 drops the whole first layer
    masks[names[-1]][2].view(-1)[: masks[names[-1]][2].numel() // 4] = False  # ticket 2 drops a quarter of the last
    per_ticket = fd.layer_density_per_ticket(routed.tickets)
    assert per_ticket[names[0]] == [1.0, 0.0, 1.0]
    assert per_ticket[names[-1]] == [1.0, 1.0, 0.75]
    mean = fd.layer_density(routed.tickets)
    assert all(abs(mean[n] - sum(v) / 3) < 1e-6 for n, v in per_ticket.items())


def _seed_record(seed: int, rtl: float, single: float, wall: dict) -> dict:
    metrics = lambda v: {m: v for m in ("balanced_accuracy", "precision", "recall", "auc", "argmax_accuracy")}  # noqa: E731
    rows = [{"method": m, "sparsity": 0.5, "matching": "equal_cost", "routing": "all", "params": 10,
             "metrics": metrics(v)} for m, v in (("rtl", rtl), ("single_imp", single), ("multi_imp", rtl))]
    sim = [{"sparsity": 0.5, "mean_jaccard": 0.7, "chance": 0.3, "union_fraction": 0.6, "per_layer": {"a": 0.9}}]
    return {"seed": seed, "prunable_weights": 20, "rows": rows, "similarity": sim, "wall_time_s": wall}


def _result_file(tmp_path, name, seeds, **settings) -> str:
    import json
    wall = {"total": 1.0} if settings.get("methods") == ["rtl"] else {"dense": 0.5, "total": 1.0}
    recs = [_seed_record(s, 0.9 + 0.01 * s, 0.8, wall) for s in seeds]
    data = {"benchmark": "fashion_detectors", "command": f"python x --seeds {seeds}", "commit": "abc",
            "machine": {"cpu_count": 2}, "settings": {"seeds": seeds, "lr": 1e-3, **settings}, "per_seed": recs}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_merge_recomputes_summary_over_seeds_and_keeps_each_runs_provenance(tmp_path, benchmark_module):
    fd = benchmark_module("fashion_detectors")
    a = _result_file(tmp_path, "a.json", [0, 1])
    b = _result_file(tmp_path, "b.json", [2], methods=["rtl"])  # a run of fewer methods merges too
    merged = fd.merge_results([b, a], str(tmp_path / "m.json"))
    assert [s["seed"] for s in merged["per_seed"]] == [0, 1, 2] and merged["settings"]["seeds"] == [0, 1, 2]
    rtl = next(r for r in merged["summary"]["rows"] if r["method"] == "rtl")
    assert rtl["metrics"]["balanced_accuracy"]["n"] == 3
    assert abs(rtl["metrics"]["balanced_accuracy"]["mean"] - 0.91) < 1e-9
    assert [m["file"] for m in merged["merged_from"]] == [b, a] and "commit" not in merged
    assert merged["summary"]["wall_time_s"]["dense"]["n"] == 2 and merged["summary"]["wall_time_s"]["total"]["n"] == 3


def test_merge_refuses_other_settings_and_repeated_seeds(tmp_path, benchmark_module):
    fd = benchmark_module("fashion_detectors")
    a = _result_file(tmp_path, "a.json", [0])
    with pytest.raises(SystemExit, match="settings"):
        fd.merge_results([a, _result_file(tmp_path, "b.json", [1], lr=1e-2)], str(tmp_path / "m.json"))
    with pytest.raises(SystemExit, match="init"):
        fd.merge_results([_result_file(tmp_path, "k.json", [1], init="kaiming"),
                          _result_file(tmp_path, "t.json", [2], init="torch")], str(tmp_path / "m.json"))
    with pytest.raises(SystemExit, match="seed repeated"):
        fd.merge_results([a, _result_file(tmp_path, "c.json", [0])], str(tmp_path / "m.json"))
