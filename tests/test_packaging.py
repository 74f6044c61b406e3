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
