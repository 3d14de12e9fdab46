"""benchmarks/collapse_sweep.py --merge: seeds run as separate processes become one result file, and only runs
of one protocol merge."""
import json

import pytest


def _run(tmp_path, name, seeds, **settings) -> str:
    data = {"benchmark": "collapse_sweep", "command": f"python x --seeds {seeds}", "commit": f"c{seeds[0]}",
            "machine": {"cpu_count": 2}, "settings": {"model": "cnn", "lr": 1e-3, "progress": False, **settings},
            "per_seed": [{"seed": s, "sweep": {}, "truth": [], "wall_time_s": 1.0} for s in seeds]}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_merge_orders_seeds_recomputes_and_keeps_provenance(tmp_path, monkeypatch, benchmark_module):
    cs = benchmark_module("collapse_sweep")
    seen = []
    monkeypatch.setattr(cs, "evaluate", lambda per_seed: seen.append([r["seed"] for r in per_seed]) or {"rows": [], "monitor": {}})
    monkeypatch.setattr(cs, "markdown", lambda results: "table")
    a, b = _run(tmp_path, "a.json", [2]), _run(tmp_path, "b.json", [0, 1], progress=True)
    merged = cs.merge_results([a, b], str(tmp_path / "m.json"))
    assert [r["seed"] for r in merged["per_seed"]] == [0, 1, 2] and seen == [[0, 1, 2]]
    assert [m["file"] for m in merged["merged_from"]] == [a, b]
    assert [m["commit"] for m in merged["merged_from"]] == ["c2", "c0"]
    on_disk = json.loads((tmp_path / "m.json").read_text())
    assert on_disk["markdown"] == "table" and [r["seed"] for r in on_disk["per_seed"]] == [0, 1, 2]
    assert on_disk["evaluation"]["monitor"]["scored_at_commit"]  # the scoring code's commit is recorded once


def test_merge_refuses_other_settings_and_repeated_seeds(tmp_path, benchmark_module):
    cs = benchmark_module("collapse_sweep")
    a = _run(tmp_path, "a.json", [0])
    with pytest.raises(SystemExit, match="settings"):
        cs.merge_results([a, _run(tmp_path, "b.json", [1], lr=1e-2)], str(tmp_path / "m.json"))
    with pytest.raises(SystemExit, match="seed repeated"):
        cs.merge_results([a, _run(tmp_path, "c.json", [0])], str(tmp_path / "m.json"))
    with pytest.raises(SystemExit, match="at least two"):
        cs.merge_results([a], str(tmp_path / "m.json"))
    assert not (tmp_path / "m.json").exists()
