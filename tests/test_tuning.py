"""python -m tvm_attn.tune: design spaces that replay, records that resume and are looked up per target, logs
that fail loudly when corrupt, and measuring through an RPC tracker on loopback."""

from __future__ import annotations

import dataclasses

import json
import shutil
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import tvm
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.schedule import Trace

import tvm_attn
from conftest import assert_matches_reference, make_inputs
from tvm_attn import kernel as kernel_module
from tvm_attn import tune, tuning
from tvm_attn.variants import path_for

TINY = dict(batch=1, heads=2, seq_q=32, head_dim=32)


@pytest.mark.parametrize("variant,knobs", [("standard", {}), ("flash", {}), ("mqa", {"kv_heads": 1}),
                                           ("threshold", {"threshold": 0.05}), ("topk", {"top_k": 8}),
                                           ("flash", {"seq_q": 1, "heads": 8, "kv_heads": 2})])
@pytest.mark.parametrize("seq", [33, 128])
def test_design_space_replays_with_any_decisions(variant, knobs, seq):
    """MetaSchedule replays a schedule's trace with re-sampled decisions: loop counts must not depend on them."""
    fields = dict(batch=1, heads=2, seq_q=seq, seq_kv=seq, head_dim=64) | knobs
    spec = tvm_attn.AttentionSpec(**fields)
    v = tvm_attn.get_variant(variant)
    mod = tuning.workload(v, spec, "host")
    sch = s_tir.Schedule(mod, seed=1)
    v.kernel_parts(path_for(spec.seq_q))[1](sch, tvm_attn.resolve_target("host"))
    for seed in range(2, 30):
        Trace(sch.trace.insts, {}).apply_to_schedule(s_tir.Schedule(mod, seed=seed), remove_postproc=True)


def test_a_record_applies_to_every_length():
    """Records are measured at one length; the kernel they schedule takes every length."""
    spec = tvm_attn.AttentionSpec(batch=1, heads=4, kv_heads=2, seq_q=1, seq_kv=300, head_dim=32, causal=True)
    v = tvm_attn.get_variant("flash")
    sch = s_tir.Schedule(tuning.workload(v, spec, "host"), seed=3)
    v.kernel_parts("decode")[1](sch, tvm_attn.resolve_target("host"))
    generic = s_tir.Schedule(tuning.generic_workload(v, spec.kernel, "decode", "host"))
    sch.trace.apply_to_schedule(generic, remove_postproc=False)
    fn = tvm.compile(generic.mod, target=tvm_attn.resolve_target("host"))["main"]
    for batch, seq_q, seq_kv in ((1, 1, 300), (2, 3, 1000), (1, 1, 5)):
        other = tvm_attn.AttentionSpec(batch=batch, heads=4, kv_heads=2, seq_q=seq_q, seq_kv=seq_kv, head_dim=32,
                                       causal=True)
        q, k, vv = make_inputs(other)
        out = np.empty(other.q_shape, np.float32)
        fn(q, k, vv, out)
        assert_matches_reference("flash", other, out, q, k, vv)


def _tune(logs, *extra, trials=4):
    cmd = [sys.executable, "-m", "tvm_attn.tune", "--variant", "flash", "--seq", "32", "--batch", "1",
           "--heads", "2", "--head-dim", "32", "--trials", str(trials), "--logs", str(logs), "--seed", "1", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _records(logs) -> int:
    path = logs / tvm_attn.target_key("host") / tuning.RECORD_FILE
    return sum(1 for line in open(path) if line.strip())


@pytest.fixture(scope="module")
def tuned_logs(tmp_path_factory):
    logs = tmp_path_factory.mktemp("tuning_logs")
    proc = _tune(logs)
    return logs, proc


def test_tune_reports_progress_and_summary(tuned_logs):
    logs, proc = tuned_logs
    assert "hand schedule measured" in proc.stderr
    assert "[1/1] flash_b1_h2_kv2_q32_k32_d32: 4/4 trials, best" in proc.stderr
    assert "flash_b1_h2_kv2_q32_k32_d32" in proc.stdout.splitlines()[-1]
    assert "Logging directory" not in proc.stdout + proc.stderr  # MetaSchedule's own logs went to files
    assert _records(logs) == 1 + 4  # the hand schedule, then 4 trials


def test_tuned_record_is_used(tuned_logs, monkeypatch):
    logs, _ = tuned_logs
    monkeypatch.setenv("TVM_ATTN_TUNING_LOGS", str(logs))
    tuning._cached_database.cache_clear()
    spec = tvm_attn.AttentionSpec(**TINY)
    try:
        kernel = tvm_attn.build("flash", spec, schedule="tuned")
        assert kernel.schedule == "tuned"
        q, k, v = make_inputs(spec)
        assert_matches_reference("flash", spec, kernel(q, k, v), q, k, v)
        # A kernel with softcapping, ALiBi or sinks replays the record of the kernel without.
        for feature in (dict(softcap=5.0), dict(alibi_slopes=(0.5, 0.25)), dict(sinks=True)):
            featured = dataclasses.replace(spec, **feature)
            kernel = tvm_attn.build("flash", featured, schedule="tuned")
            assert kernel.schedule == "tuned", feature
            sinks = np.array([0.5, -1.0], np.float32) if featured.sinks else None
            assert_matches_reference("flash", featured, kernel(q, k, v, sinks=sinks), q, k, v, sinks=sinks)
    finally:
        tuning._cached_database.cache_clear()


def test_records_of_another_target_are_never_applied(tuned_logs, tmp_path):
    """MetaSchedule's database ignores targets: x86 records copied under an Apple key must not be used there."""
    logs = tmp_path / "logs"
    shutil.copytree(tuned_logs[0] / tvm_attn.target_key("host"), logs / "arm64-apple-macos-apple-m3")
    spec = tvm_attn.AttentionSpec(**TINY)
    assert tuning.tuned_record(tvm_attn.get_variant("flash"), spec, "apple-m3", root=logs) is None
    assert tuning.tuned_record(tvm_attn.get_variant("flash"), spec, "host", root=tuned_logs[0]) is not None


def test_truncated_log_is_a_clear_error(tuned_logs, tmp_path, capsys):
    logs = tmp_path / "logs"
    shutil.copytree(tuned_logs[0], logs)
    path = logs / tvm_attn.target_key("host") / tuning.RECORD_FILE
    text = path.read_text()
    path.write_text(text[: len(text) - 40])  # a run killed in the middle of writing its last record
    n_lines = text.count("\n")
    with pytest.raises(tuning.CorruptTuningLog, match=f"{tuning.RECORD_FILE}:{n_lines} is not valid JSON"):
        tuning.open_database("host", logs)
    with pytest.raises(SystemExit) as exited:
        tune.main(["--variant", "flash", "--seq", "32", "--batch", "1", "--heads", "2", "--head-dim", "32",
                   "--trials", "1", "--logs", str(logs)])
    assert exited.value.code == 2 and "is not valid JSON" in capsys.readouterr().err
    assert path.read_text() == text[: len(text) - 40]  # nothing overwritten


def test_foreign_file_is_a_clear_error(tmp_path):
    directory = tmp_path / tvm_attn.target_key("host")
    directory.mkdir()
    (directory / tuning.RECORD_FILE).write_text('{"not": "a metaschedule record"}\n')
    with pytest.raises(tuning.CorruptTuningLog, match="is not a MetaSchedule database entry"):
        tuning.open_database("host", tmp_path)


def test_untuned_kernels_warn_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_ATTN_TUNING_LOGS", str(tmp_path))
    tuning._cached_database.cache_clear()
    kernel_module._build_cached.cache_clear()  # kernels serve every length: other tests may have built this one
    monkeypatch.setattr(tuning, "_warned", set())
    spec = tvm_attn.AttentionSpec(batch=1, heads=2, seq_q=17, head_dim=16)
    q, k, v = make_inputs(spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tvm_attn.attention(q, k, v)
        tvm_attn.attention(q, k, v)
    untuned = [w for w in caught if issubclass(w.category, tuning.UntunedWarning)]
    assert len(untuned) == 1 and "using the hand schedule" in str(untuned[0].message)
    tuning._cached_database.cache_clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_device(port: int, key: str, timeout: float = 60.0) -> None:
    """Poll the tracker until a server with ``key`` is registered and free."""
    import tvm.rpc

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if tvm.rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"][key]["free"] >= 1:
                return
        except Exception:  # tracker not up yet, or key not registered yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no free RPC server with key {key!r} on tracker port {port} after {timeout} s")


def test_running_again_through_an_rpc_tracker_resumes_and_adds_trials(tuned_logs, tmp_path):
    """A second run (here measuring on a device behind an RPC tracker on loopback) reuses the first run's records,
    the hand schedule's included, and adds its trials. (One tuning run for both: each costs ~45 s of CI.)"""
    logs = tmp_path / "logs"
    shutil.copytree(tuned_logs[0], logs)
    before = _records(logs)
    tracker_port, server_port = _free_port(), _free_port()  # each binds in [port, --port-end)
    procs = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                               "--port", str(tracker_port), "--port-end", str(tracker_port + 1)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                                       "--port", str(server_port), "--port-end", str(server_port + 1),
                                       "--tracker", f"127.0.0.1:{tracker_port}",
                                       "--key", "loopback"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for_device(tracker_port, "loopback")
        proc = _tune(logs, "--rpc-tracker", f"127.0.0.1:{tracker_port}", "--rpc-key", "loopback", trials=2)
        assert "2/2 trials" in proc.stderr
        assert "hand schedule measured" not in proc.stderr  # the recorded hand schedule is reused
        assert _records(logs) == before + 2
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.parametrize("options,message", [
    (["--rpc-tracker", "nohost"], "--rpc-tracker must be HOST:PORT, got 'nohost'"),
    (["--rpc-tracker", "127.0.0.1:9190"], "--rpc-key is required with --rpc-tracker")])
def test_rpc_options_are_checked(options, message, tmp_path, capsys):
    """A usage error (exit 2, no traceback), before anything is written."""
    with pytest.raises(SystemExit) as exited:
        tune.main(["--variant", "flash", "--logs", str(tmp_path / "logs"), *options])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "logs").exists()


def test_lookup_follows_the_confirmed_winner(tuned_logs, tmp_path):
    """tune times its pick against the hand schedule in-process and notes the winner; lookups use that record."""
    logs, _ = tuned_logs
    directory = logs / tvm_attn.target_key("host")
    confirmed = json.loads((directory / tuning.CONFIRMED_FILE).read_text())
    spec = tvm_attn.AttentionSpec(**TINY)
    flash = tvm_attn.get_variant("flash")
    key = tuning.workload_key(tuning.workload(flash, spec, "host"))
    assert tuning.record_digest(tuning.tuned_record(flash, spec, "host", root=logs)) == confirmed[key]
    copy = tmp_path / "logs"
    shutil.copytree(logs, copy)
    (copy / tvm_attn.target_key("host") / tuning.CONFIRMED_FILE).write_text("{cut off")
    tuning._cached_database.cache_clear()
    with pytest.raises(tuning.CorruptTuningLog, match="confirmed.json is not valid JSON"):
        tuning.tuned_record(flash, spec, "host", root=copy)
    tuning._cached_database.cache_clear()


def test_records_without_a_target_are_not_applied(tuned_logs, tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(tuned_logs[0], logs)
    path = logs / tvm_attn.target_key("host") / tuning.RECORD_FILE
    lines = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        entry[1][2] = None  # the record's target
        lines.append(json.dumps(entry))
    path.write_text("\n".join(lines) + "\n")
    tuning._cached_database.cache_clear()
    try:
        assert tuning.tuned_record(tvm_attn.get_variant("flash"), tvm_attn.AttentionSpec(**TINY), "host",
                                   root=logs) is None
    finally:
        tuning._cached_database.cache_clear()


def test_binary_garbage_in_a_log_names_the_file_and_line(tuned_logs, tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(tuned_logs[0], logs)
    directory = logs / tvm_attn.target_key("host")
    with open(directory / tuning.RECORD_FILE, "ab") as f:
        f.write(b"\xff\xfe\x00garbage\n")
    n_lines = (directory / tuning.RECORD_FILE).read_bytes().count(b"\n")
    with pytest.raises(tuning.CorruptTuningLog, match=f"{tuning.RECORD_FILE}:{n_lines} is not text"):
        tuning.open_database("host", logs)
    (directory / tuning.CONFIRMED_FILE).write_bytes(b"\xff\xfe")
    with pytest.raises(tuning.CorruptTuningLog, match="confirmed.json is not valid JSON"):
        tuning.read_confirmed("host", logs)


def test_records_serve_other_cpus_of_their_isa_class(tmp_path):
    """Records tuned for an AVX2 target (x86-64-v3) serve an AVX2 CPU without records of its own (haswell), never
    an AVX-512 or an Apple one; a CPU's own records come first."""
    logs = tmp_path / "logs"
    avx2 = '{"kind": "llvm", "mcpu": "x86-64-v3"}'
    if not tvm_attn.targets.runs_on_host(avx2):
        pytest.skip("this host does not run AVX2 code")
    _tune(logs, "--target", avx2, trials=0)  # the hand schedule measured and recorded: a record like any other
    spec = tvm_attn.AttentionSpec(**TINY)
    flash = tvm_attn.get_variant("flash")
    record = tuning.tuned_record(flash, spec, avx2, root=logs)
    assert record is not None and tvm_attn.target_key(record.target) == "x86_64-x86-64-v3"
    assert tuning.class_record_keys({"kind": "llvm", "mcpu": "haswell"}, logs) == ["x86_64-x86-64-v3"]
    assert tuning.record_digest(tuning.tuned_record(flash, spec, {"kind": "llvm", "mcpu": "haswell"}, root=logs)) \
        == tuning.record_digest(record)
    for other in ({"kind": "llvm", "mcpu": "znver4"}, "apple-m3"):
        assert tuning.tuned_record(flash, spec, other, root=logs) is None


def test_the_builder_keeps_its_workers_between_batches():
    """One pool of build workers per tuning run: a second batch reuses the first's workers (each new worker pays
    `import tvm`), and a module that does not build is that input's error, not the batch's."""
    target = tvm_attn.resolve_target("host")
    v = tvm_attn.get_variant("flash")
    spec = tvm_attn.AttentionSpec(**TINY)
    sch = s_tir.Schedule(tuning.workload(v, spec, target))
    v.kernel_parts("prefill")[1](sch, target)
    broken = tvm.IRModule({"main": tvm.tirx.PrimFunc([], tvm.tirx.Evaluate(0))})  # no global symbol
    builder = tune.make_builder(target)
    try:
        first = builder.build([ms.builder.BuilderInput(sch.mod, target)])
        workers = {w._proc.pid for w in builder.pool._worker_map.values()}
        second = builder.build([ms.builder.BuilderInput(broken, target),
                                ms.builder.BuilderInput(sch.mod, target)])
        assert {w._proc.pid for w in builder.pool._worker_map.values()} >= workers
    finally:
        builder.close()
    assert first[0].error_msg is None and second[1].error_msg is None
    assert second[0].error_msg is not None and second[0].artifact_path is None
