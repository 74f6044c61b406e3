"""Tuning records: one MetaSchedule JSONDatabase per target under tuning_logs/<target key>/, looked up per kernel.

MetaSchedule's database matches workloads by structure and ignores the target a record was measured on, so records
live in one directory per target key and every record's own target is checked again on lookup.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from pathlib import Path

import tvm
import tvm_ffi
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from .spec import AttentionSpec
from .targets import resolve_target, target_key

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
CONFIRMED_FILE = "confirmed.json"  # {workload key: digest of the schedule that won the confirmation timing}


def default_logs_root() -> Path:
    """$TVM_ATTN_TUNING_LOGS, else the repository's tuning_logs/ next to the package."""
    env = os.environ.get("TVM_ATTN_TUNING_LOGS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "tuning_logs"


def logs_dir(target, root: Path | None = None) -> Path:
    return Path(root or default_logs_root()) / target_key(target)


def workload(variant, spec: AttentionSpec) -> tvm.IRModule:
    """The IRModule a variant is tuned as (its compute, unscheduled): the key of its records."""
    return tvm.IRModule({"main": variant.compute(spec)})


class CorruptTuningLog(ValueError):
    """A tuning log file that is not a MetaSchedule JSON database of this project."""


def check_log_files(directory: Path) -> None:
    """Raise CorruptTuningLog naming the file and line when a database file is not line-by-line valid JSON of
    the expected shape (a truncated last line after a killed run included)."""
    for name, width in ((WORKLOAD_FILE, 2), (RECORD_FILE, 2)):
        path = directory / name
        if not path.exists():
            continue
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CorruptTuningLog(
                        f"{path}:{number} is not valid JSON ({err.msg}); the file is corrupt or was cut off by an "
                        f"interrupted run. Remove that line (or the file) and tune again."
                    ) from None
                if not isinstance(entry, list) or len(entry) != width:
                    raise CorruptTuningLog(f"{path}:{number} is not a MetaSchedule database entry")
                if name == RECORD_FILE and (not isinstance(entry[1], list) or len(entry[1]) < 4):
                    raise CorruptTuningLog(f"{path}:{number} is not a MetaSchedule tuning record")


def open_database(target, root: Path | None = None, *, create: bool = False) -> ms.database.JSONDatabase | None:
    """The JSONDatabase of ``target``, checked first; None when there is none (and not ``create``)."""
    directory = logs_dir(target, root)
    if not create and not (directory / RECORD_FILE).exists():
        return None
    directory.mkdir(parents=True, exist_ok=True)
    check_log_files(directory)
    try:
        return ms.database.JSONDatabase(path_workload=str(directory / WORKLOAD_FILE),
                                        path_tuning_record=str(directory / RECORD_FILE),
                                        allow_missing=True)
    except Exception as err:  # TVM's own parse errors
        raise CorruptTuningLog(f"{directory}: MetaSchedule could not load the database: {err}") from None


def workload_key(mod: tvm.IRModule) -> str:
    """The structural hash MetaSchedule keys workloads by, as a string."""
    return str(tvm_ffi.structural_hash(mod))


def read_confirmed(target, root: Path | None = None) -> dict:
    """The confirmation winners of ``target``: {workload key: schedule digest}; CorruptTuningLog when unreadable."""
    path = logs_dir(target, root) / CONFIRMED_FILE
    if not path.exists():
        return {}
    try:
        confirmed = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CorruptTuningLog(f"{path} is not valid JSON ({err.msg}); remove it and run "
                               f"python -m tvm_attn.tune --trials 0 to confirm again") from None
    if not isinstance(confirmed, dict) or not all(isinstance(v, str) for v in confirmed.values()):
        raise CorruptTuningLog(f"{path} is not a map of workload keys to schedule digests")
    return confirmed


def write_confirmed(target, root: Path | None, mod: tvm.IRModule, digest: str) -> None:
    path = logs_dir(target, root) / CONFIRMED_FILE
    confirmed = read_confirmed(target, root)
    confirmed[workload_key(mod)] = digest
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(confirmed, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)  # atomic: a killed run never leaves half a file


@functools.lru_cache(maxsize=8)
def _cached_database(target_json: str, root: str):
    t = resolve_target(target_json)
    db = open_database(t, Path(root))
    return db, (read_confirmed(t, Path(root)) if db is not None else {})


def valid_records(db, mod: tvm.IRModule, target) -> list:
    """The successful records of ``mod`` measured on ``target`` (same target key), fastest first."""
    if db is None or not db.has_workload(mod):
        return []
    key = target_key(target)
    return [r for r in db.get_top_k(db.commit_workload(mod), 100000)
            if (r.target is None or target_key(r.target) == key)
            and r.run_secs and all(float(s) < 1e9 for s in r.run_secs)]


def best_record(db, mod: tvm.IRModule, target, confirmed: dict | None = None):
    """The record of ``mod`` measured on ``target`` to use: the confirmation winner if there is one, else the
    fastest successful record; None without records."""
    records = valid_records(db, mod, target)
    winner = (confirmed or {}).get(workload_key(mod))
    if winner is not None:
        for record in records:
            if record_digest(record) == winner:
                return record
    return records[0] if records else None


def tuned_record(variant, spec: AttentionSpec, target, root: Path | None = None):
    """The best tuning record of (variant, spec) measured on ``target``, or None."""
    t = resolve_target(target)
    db, confirmed = _cached_database(str(t), str(root or default_logs_root()))
    return best_record(db, workload(variant, spec), t, confirmed)


def apply_record(variant, spec: AttentionSpec, record) -> s_tir.Schedule:
    """Replay a record's trace on the variant's compute."""
    sch = s_tir.Schedule(workload(variant, spec))
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    return sch


def record_digest(record) -> str:
    """A short stable id of a record's schedule (sha256 of its trace), for manifests and reports."""
    return hashlib.sha256(str(record.trace).encode()).hexdigest()[:16]


def tuned_schedule(variant, spec: AttentionSpec, target, root: Path | None = None) -> s_tir.Schedule | None:
    """The tuned schedule of (variant, spec) on ``target``, or None when no record exists."""
    record = tuned_record(variant, spec, target, root)
    return None if record is None else apply_record(variant, spec, record)


class UntunedWarning(UserWarning):
    """No tuned record exists for a kernel; the hand schedule is used."""


_warned: set = set()


def warn_untuned(variant_name: str, spec: AttentionSpec, target) -> None:
    """Say once per workload that no tuned record exists and the hand schedule is used."""
    key = (variant_name, spec, target_key(target))
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"no tuned record for {variant_name} {spec.name} on {target_key(target)}: using the hand "
                      f"schedule (python -m tvm_attn.tune tunes it)", UntunedWarning, stacklevel=6)
