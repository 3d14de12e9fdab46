"""persist sits below pruning, training, diagnostics and the tasks: its module-level imports never reach them,
so those packages can import persist at module top (no import cycle to hide in a function body)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("rtl_plugin.pruning", "rtl_plugin.training", "rtl_plugin.diagnostics", "rtl_plugin.tasks",
             "rtl_plugin.comparison", "rtl_plugin.cli")


def _module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _top_level_imports(f: Path) -> set[str]:
    """rtl_plugin modules imported at module level (not inside functions or classes) by file ``f``."""
    out = set()
    for node in ast.parse(f.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rtl_plugin"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}"))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("rtl_plugin"))
    return out


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            mod = ".".join(parts[:i])
            f = _module_file(mod)
            if mod in seen or f is None or mod == "rtl_plugin":  # the package root imports everything public
                continue
            seen.add(mod)
            todo.extend(_top_level_imports(f))
    return seen


def test_persist_imports_no_higher_layer():
    for f in sorted((ROOT / "rtl_plugin" / "persist").glob("*.py")):
        reached = _closure(f"rtl_plugin.persist.{f.stem}")
        bad = sorted(m for m in reached if m.startswith(FORBIDDEN))
        assert bad == [], f"{f.name} reaches {bad} at import time"


def test_checker_follows_imports():
    assert {"rtl_plugin.routed", "rtl_plugin.routing.routers"} <= _closure("rtl_plugin.persist.package")
    assert any(m.startswith("rtl_plugin.tasks") for m in _closure("rtl_plugin.tasks.classification.runner"))
