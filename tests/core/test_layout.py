"""The package layout contract: the core never loads task pipelines, and 0.1 module paths still resolve."""
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from rtl_plugin._deprecated import MOVED_MODULES


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_import_rtl_plugin_loads_no_task_module():
    loaded = _modules_after("import rtl_plugin")
    assert "rtl_plugin.routed" in loaded  # the probe works
    tasks = sorted(m for m in loaded if m.startswith("rtl_plugin.tasks") or m == "rtl_plugin.cli")
    assert tasks == [], f"`import rtl_plugin` loaded task code: {tasks}"


def test_core_subpackages_load_no_task_module():
    code = "\n".join(f"import rtl_plugin.{p}" for p in
                     ("pruning", "training", "routing", "diagnostics", "persist", "comparison"))
    loaded = _modules_after(code)
    assert not [m for m in loaded if m.startswith("rtl_plugin.tasks")]


@pytest.mark.parametrize("old,new", sorted(MOVED_MODULES.items()))
def test_old_module_path_warns_and_is_the_new_module(old, new):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)


def test_extras_that_test_installs_are_imported_not_skipped():
    """`pip install -e ".[test]"` installs every optional dependency the suite uses, so a missing one is a broken
    install and must fail the suite; only what [test] cannot install (CUDA, apt data) may skip, with skipif."""
    tests_dir = Path(__file__).resolve().parents[1]
    offenders = [f"{p.relative_to(tests_dir)}:{i}" for p in sorted(tests_dir.rglob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "pytest.importorskip(" in line and p.name != Path(__file__).name]
    assert offenders == [], f"import [test] extras directly instead of importorskip: {offenders}"


def test_pyproject_installs_every_subpackage():
    """An editable install hides a subpackage missing from pyproject's list; a wheel would not ship it."""
    import tomllib
    root = Path(__file__).resolve().parents[2]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(root).parts) for p in (root / "rtl_plugin").rglob("__init__.py")
               if not p.is_symlink() and "integrations" not in p.parent.relative_to(root).parts}
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert "rtl_plugin.integrations" in listed


def test_functions_are_short():
    """No function in the package or its adapters is longer than 80 lines (readable at once)."""
    import ast
    root = Path(__file__).resolve().parents[2]
    long = []
    for p in sorted((root / "rtl_plugin").rglob("*.py")) + sorted((root / "integrations").glob("*.py")):
        if "integrations" in p.relative_to(root).parts[1:2]:
            continue  # the rtl_plugin/integrations symlink of a worktree: the files are read from integrations/
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{p.relative_to(root)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert long == [], f"split these functions: {long}"
