"""benchmarks/search_grouped.py on a tiny model: one command times the three searches and compares the masks."""
import json
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_search_grouped_tiny_float64(tmp_path):
    import timm  # noqa: F401  ([test] extra: a missing one fails)
    out = tmp_path / "search.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search_grouped.py"), "--model", "test_resnet",
                           "--image", "16", "--tickets", "3", "--batches", "2", "--batch", "8", "--dtype", "float64",
                           "--out", str(out)], cwd=tmp_path, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["ratios"]) >= {"sequential_vs_single_imp", "grouped_vs_single_imp", "grouped_vs_sequential"}
    assert all(math.isfinite(v) and v > 0 for v in res["ratios"].values())
    assert res["rounds"] == {"single": 1, "sequential": 3, "grouped": 3}
    assert res["masks_grouped_vs_sequential"]["0.5"]["differing_entries"] == 0  # float64: equal masks
    assert res["masks_grouped_vs_sequential"]["0.5"]["entries"] > 3 * 300_000
    assert 0 <= res["trained_weights_ticket0_diff"]["max_rel"] < 1e-9
    assert res["command"].startswith("python benchmarks/search_grouped.py") and res["machine"]["torch"]
