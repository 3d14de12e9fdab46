"""Every ``examples/*.ipynb`` is committed executed (outputs and figure, full settings) and still runs end to end
in quick mode (``RTL_NOTEBOOK_QUICK=1``).

Notebooks read ``RTL_NOTEBOOK_QUICK`` in their first code cell and pick tiny sizes when it is "1". Each one
runs in a fresh ``python3`` kernel (this interpreter's ipykernel) with a temporary working directory, so
whatever it writes (run folders, figures) lands in ``tmp_path``.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

import nbformat
import nbclient
import ipykernel  # noqa: F401  ([test] extra: a missing one fails)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
CELL_TIMEOUT_S = 300

#: Lines a notebook must print (regular expressions); notebooks not listed must print something.
EXPECTED_OUTPUT = {
    "classification_timm.ipynb": [
        r"RESULT routing=context\s+balanced_accuracy=\d\.\d{3}",
        r"RESULT routing=learned\s+balanced_accuracy=\d\.\d{3}",
        r"mean Jaccard \d\.\d{3}",
        r"reloaded outputs equal: True",
        r"backbone bit-identical: True",
        r"RESULT learned tickets routing=gate balanced_accuracy=\d\.\d{3}",
    ],
    "inr_regions.ipynb": [
        r"forward passes 3 for 3 regions",
        r"RESULT method=rtl\s+sparsity=0\.50 psnr=\d+\.\d{2} dB",
        r"RESULT method=single_imp sparsity=0\.75 psnr=\d+\.\d{2} dB",
        r"RTL - single IMP at 50%: [+-]\d+\.\d{2} dB",
    ],
    "speech_enhancement.ipynb": [
        r"RESULT routing=context\s+si_snri=-?\d+\.\d{3} dB",
        r"RESULT routing=learned\s+si_snri=-?\d+\.\d{3} dB",
        r"router accuracy on unseen test noise: \d\.\d{3}",
    ],
    "own_image_folder.ipynb": [
        r"RESULT method=rtl\s+routing=context\s+sparsity=0\.50 balanced_accuracy=\d\.\d{3}",
        r"RESULT method=rtl\s+routing=learned\s+sparsity=0\.50 balanced_accuracy=\d\.\d{3}",
        r"packaged predictions correct: \d+ of \d+",
    ],
    "segmentation_smp.ipynb": [
        r"routed == composed per ticket: True",
        r"RESULT method=rtl\s+routing=label_free sparsity=0\.75 miou=\d\.\d{4}",
        r"RESULT method=single_imp routing=direct\s+sparsity=0\.75 miou=\d\.\d{4}",
        r"router pixel accuracy at 75%: \d\.\d{4}",
    ],
}

#: Notebooks that need Debian programs: (programs, install line). Skipped with the install line when they are
#: missing outside CI; CI (.ci/run) installs them, so there a missing program fails the test.
REQUIRES_PROGRAMS = {
    "speech_enhancement.ipynb": (("espeak-ng", "sox"), "apt-get install espeak-ng sox"),
}


def _text_outputs(nb) -> str:
    chunks = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                chunks.append(out.get("text", ""))
            elif out.get("output_type") in ("execute_result", "display_data"):
                chunks.append(out.get("data", {}).get("text/plain", ""))
    return "".join(chunks)


def test_examples_exist():
    assert NOTEBOOKS, f"no notebooks in {EXAMPLES}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_notebook_is_executed_with_its_figure(path):
    """Notebooks are committed executed (readable without running them): every code cell ran, in order, in one
    kernel, with the full settings (not the quick smoke run), no error, and at least one figure.
    Regenerate them with ``python examples/run_notebooks.py``."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cell"
    assert "RTL_NOTEBOOK_QUICK" in code[0].source, \
        f"{path.name}: the first code cell must set its sizes from the RTL_NOTEBOOK_QUICK environment variable"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), \
        f"{path.name}: cells ran out of order or not at all ({counts}); run python examples/run_notebooks.py {path.name}"
    errors = [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: committed with errors {[e.get('ename') for e in errors]}"
    assert re.search(r"quick=False", _text_outputs(nb)), \
        f"{path.name}: committed outputs must come from the full settings (quick=False), not RTL_NOTEBOOK_QUICK=1"
    figures = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert figures, f"{path.name}: committed without a figure; it must show its headline figure"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    import shutil
    programs, install = REQUIRES_PROGRAMS.get(path.name, ((), ""))
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{path.name} needs {missing} in CI: .ci/run must {install}")
        pytest.skip(f"{path.name} needs {missing}: {install} (CI installs them and requires this test)")
    monkeypatch.setenv("RTL_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("RTL_CACHE", str(tmp_path / "cache"))  # built data sets stay inside the test's folder
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # OpenMP threads that spin while waiting are pathological on an oversubscribed machine (a forward pass of
    # a small CNN took 50x longer with 2 spinning threads on 2 busy cores): let waiting threads sleep
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # one intra-op thread per xdist worker, as in conftest.py
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.setenv("MKL_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:  # show the traceback, not just "cell failed"
        pytest.fail(f"{path.name} failed in quick mode:\n{e}")

    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name} produced error outputs: {[e.get('ename') for e in errors]}"
    text = _text_outputs(nb)
    assert text.strip(), f"{path.name} printed nothing"
    for pattern in EXPECTED_OUTPUT.get(path.name, []):
        assert re.search(pattern, text), f"{path.name} did not print a line matching {pattern!r}:\n{text[-3000:]}"


def test_kernel_is_this_interpreter():
    """nbclient's "python3" kernel must start this interpreter (so it imports the same rtl_plugin).

    jupyter_client replaces a kernelspec's leading ``python`` / ``python3`` with ``sys.executable``.
    """
    from jupyter_client.kernelspec import KernelSpecManager
    exe = KernelSpecManager().get_kernel_spec("python3").argv[0]
    assert exe in ("python", f"python{sys.version_info[0]}") or Path(exe).resolve() == Path(sys.executable).resolve(), exe


def test_run_notebooks_refuses_unknown_names_and_unchecked_quick_outputs(capsys):
    """examples/run_notebooks.py regenerates the committed notebooks; it never writes quick-mode outputs back."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("run_notebooks", EXAMPLES / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["no_such.ipynb"]) == 2 and "no such notebook" in capsys.readouterr().err
    assert module.main(["--quick", NOTEBOOKS[0].name]) == 2 and "--check" in capsys.readouterr().err
