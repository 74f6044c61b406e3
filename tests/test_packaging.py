"""What a wheel holds, and where tuning records are written and looked up outside a source checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tvm_attn import tuning

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_the_benchmark_schedules_and_shipped_records(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("tvm_attn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("tvm_attn/bench/__main__.py", "tvm_attn/bench/model.py", "tvm_attn/schedules/flash.py",
                   "tvm_attn/hf.py", "tvm_attn/generate.py", "tvm_attn/plan.py"):
        assert module in names
    shipped = [p for p in (REPO / "tuning_logs").glob("*/*.json")]
    assert shipped
    for path in shipped:
        assert f"tvm_attn/tuning_logs/{path.parent.name}/{path.name}" in names
    assert not any("/logs/" in n for n in names)  # MetaSchedule's own logs stay out


def test_records_are_written_to_the_user_and_looked_up_there_then_in_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.LOGS_ENV, str(tmp_path / "mine"))
    assert tuning.user_logs_root() == tmp_path / "mine" == tuning.default_logs_root()
    assert tuning.lookup_roots() == [tmp_path / "mine", tuning.shipped_logs_root()]
    monkeypatch.delenv(tuning.LOGS_ENV)
    assert tuning.user_logs_root() == REPO / "tuning_logs"  # a source checkout: records to commit
    monkeypatch.setattr(tuning, "_source_checkout", lambda: False)  # as in an installed package
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    if sys.platform != "darwin":
        assert tuning.user_logs_root() == tmp_path / "data" / "tvm_attn" / "tuning_logs"
    assert tuning.lookup_roots()[-1] == tuning.shipped_logs_root()


def _imports(path: Path, package_root: Path) -> set[str]:
    """The tvm_attn modules ``path`` imports anywhere in it (at the top or inside functions)."""
    import ast

    module = ".".join(path.relative_to(package_root.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            found |= {name} | {f"{name}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def test_the_package_has_no_import_cycle():
    """No module imports (even lazily, inside a function) a module that imports it back, directly or through
    others; a package importing its own submodules is not a cycle."""
    root = Path(__file__).resolve().parents[1] / "tvm_attn"
    names = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in root.rglob("*.py")}
    graph = {name: {m for m in _imports(path, root) if m in names and m != name and not name.startswith(m + ".")}
             for name, path in names.items()}

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return trail + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None

    cycles = [c for c in map(cycle_from, sorted(graph)) if c]
    assert not cycles, f"import cycles: {[' -> '.join(c) for c in cycles]}"
