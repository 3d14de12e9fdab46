"""torch-pruning's README snippet and its RTL conversion (examples/torch_pruning_snippet/): at most 10 changed
lines, and RTL's ticket 0 is exactly the model the stock snippet builds. The K-ticket plain loop runs."""
import difflib
import pathlib
import runpy

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
SNIPPETS = ROOT / "examples" / "torch_pruning_snippet"


def _changed_lines(a: str, b: str) -> int:
    sm = difflib.SequenceMatcher(a=a.splitlines(), b=b.splitlines(), autojunk=False)
    return sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in sm.get_opcodes() if tag != "equal")


def _run(name: str, tmp_path) -> dict:
    src = (SNIPPETS / name).read_text().replace("224, 224", "64, 64")  # the same model, a cheaper trace
    path = tmp_path / name
    path.write_text(src)
    torch.manual_seed(0)
    return runpy.run_path(str(path))


def test_conversion_changes_at_most_ten_lines_and_readme_shows_it():
    stock, converted = (SNIPPETS / "stock.py").read_text(), (SNIPPETS / "rtl.py").read_text()
    assert _changed_lines(stock, converted) <= 10
    readme = (ROOT / "README.md").read_text()
    diff = [line for line in difflib.unified_diff(stock.splitlines(), converted.splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    for line in diff:
        assert line in readme, f"README's diff lacks {line!r}"


def test_converted_snippet_gives_exactly_the_stock_pruned_model(tmp_path):
    stock = _run("stock.py", tmp_path)
    rtl_ns = _run("rtl.py", tmp_path)
    assert rtl_ns["nparams"] == stock["nparams"] and rtl_ns["macs"] == stock["macs"]
    assert rtl_ns["base_nparams"] == stock["base_nparams"]
    x = torch.randn(2, 3, 64, 64)
    a, b = stock["model"].eval(), rtl_ns["model"].eval()
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    routed = rtl_ns["pruner"].routed.eval()
    torch.testing.assert_close(routed(x, route=0), b(x), rtol=1e-4, atol=1e-5)


def test_k_ticket_loop_example_runs(capsys):
    ns = runpy.run_path(str(SNIPPETS / "k_tickets.py"))
    out = capsys.readouterr().out
    assert out.count("accuracy") == 3
    routed = ns["routed"]
    for k in range(3):
        assert 0.7 < ns["pruner"].ticket_sparsity(k) < 0.8  # 50% of channels per layer ~ 75% of weights
    assert float(routed.tickets.jaccard()[0, 1]) < 1.0
