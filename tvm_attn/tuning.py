"""Tuning records: one MetaSchedule JSONDatabase per target under tuning_logs/<target key>/, looked up per kernel.

A kernel serves every batch and length, but MetaSchedule measures concrete shapes: a workload is the kernel's
compute with its sizes fixed to one (variant, spec), and `tune` notes for each kernel (its family: variant, path,
kernel spec) the record that won at the shape it was tuned at; every length the kernel serves uses that record.
MetaSchedule's database matches workloads by structure and ignores the target a record was measured on, so records
live in one directory per target key and every record's own target is checked again on lookup.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import sys
import warnings
from pathlib import Path

import tvm
import tvm_ffi
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from .schedules import register_tensor_intrinsics
from .schedules.common import schedule_score_terms, schedule_target
from .spec import AttentionSpec, KernelSpec
from .targets import capabilities, resolve_target, target_from_key, target_key
from .variants import path_for

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
# {workload key: digest of the schedule that won the confirmation timing,
#  "family:<family key>": "<workload key>/<digest>", the record every length of that kernel uses}
CONFIRMED_FILE = "confirmed.json"
# confirmed.json: "blas:<family>" -> schedule="blas"'s measured speedup over the kept schedule ("1.12x"), or "no"
BLAS_CHOICE = "blas:"
FAMILY = "family:"


LOGS_ENV = "TVM_ATTN_TUNING_LOGS"
_PACKAGE = Path(__file__).resolve().parent


def shipped_logs_root() -> Path:
    """The records shipped with tvm_attn: tuning_logs/ inside the installed package (a wheel), else the
    repository's tuning_logs/ (a source checkout)."""
    for candidate in (_PACKAGE / "tuning_logs", _PACKAGE.parent / "tuning_logs"):
        if candidate.is_dir():
            return candidate
    return _PACKAGE / "tuning_logs"


def _source_checkout() -> bool:
    return (_PACKAGE.parent / "pyproject.toml").is_file() and (_PACKAGE.parent / "tuning_logs").is_dir()


def user_logs_root() -> Path:
    """Where `tune` writes records: $TVM_ATTN_TUNING_LOGS; else, in a source checkout, the repository's
    tuning_logs/ (records to commit); else a per-user directory: $XDG_DATA_HOME/tvm_attn/tuning_logs
    (~/.local/share/...; ~/Library/Application Support/... on macOS)."""
    env = os.environ.get(LOGS_ENV)
    if env:
        return Path(env)
    if _source_checkout():
        return _PACKAGE.parent / "tuning_logs"
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "tvm_attn" / "tuning_logs"


def default_logs_root() -> Path:
    """The root `tune` writes to (user_logs_root)."""
    return user_logs_root()


def lookup_roots() -> list[Path]:
    """Where records are looked up, first match wins: the user's records, then the shipped ones."""
    roots = []
    for root in (user_logs_root(), shipped_logs_root()):
        if root.resolve() not in [r.resolve() for r in roots]:
            roots.append(root)
    return roots


def logs_dir(target, root: Path | None = None) -> Path:
    return Path(root or default_logs_root()) / target_key(target)


def generic_workload(variant, kspec: KernelSpec, path: str, target) -> tvm.IRModule:
    """The IRModule of the kernel serving ``path`` for ``kspec`` on ``target``: batch and lengths are run-time
    sizes."""
    return tvm.IRModule({"main": variant.compute_for(path, kspec, target)})


def workload(variant, spec: AttentionSpec, target) -> tvm.IRModule:
    """The IRModule a variant is tuned as for ``spec`` on ``target``: the kernel of spec's path (its compute,
    unscheduled) with batch, seq_q and seq_kv fixed to spec's. The key of its records."""
    generic = generic_workload(variant, spec.kernel, path_for(spec.seq_q), target)
    return tvm.IRModule({"main": with_sizes(generic["main"], spec)})


def with_sizes(func, spec: AttentionSpec):
    """A kernel's PrimFunc (scheduled or not) with batch, seq_q and seq_kv fixed to spec's."""
    q, k, v, out = func.params
    sized = {}
    for param, shape in ((q, spec.q_shape), (k, spec.kv_shape), (v, spec.kv_shape), (out, spec.q_shape)):
        # Strides stay run-time values, as in the kernel a record of this workload is applied to.
        strides = [tvm.tirx.Var(f"{param.name}_stride{i}", "int32") for i in range(3)] + [1]
        sized[param] = tvm.tirx.decl_buffer(shape, param.dtype, param.name, strides=strides,
                                            data_alignment=param.data_alignment, offset_factor=1)
    return func.specialize(sized)


def family_key(variant, kspec: KernelSpec, path: str, target) -> str:
    """The key of one compiled kernel (variant, path, kernel spec, what the target computes it with): the
    structural hash of its generic IR."""
    return workload_key(generic_workload(variant, kspec, path, target))


class CorruptTuningLog(ValueError):
    """A tuning log file that is not a MetaSchedule JSON database of this project."""


def check_log_files(directory: Path) -> None:
    """Raise CorruptTuningLog naming the file and line when a database file is not line-by-line valid JSON of
    the expected shape (a truncated last line after a killed run included)."""
    for name, width in ((WORKLOAD_FILE, 2), (RECORD_FILE, 2)):
        path = directory / name
        if not path.exists():
            continue
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    entry = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise CorruptTuningLog(f"{path}:{number} is not text (bytes that are not UTF-8): the file is "
                                           f"corrupt. Remove that line (or the file) and tune again.") from None
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
    register_tensor_intrinsics(capabilities(target).isa_class)  # the traces name them: parsed as they load
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
        confirmed = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        why = err.msg if isinstance(err, json.JSONDecodeError) else "bytes that are not UTF-8"
        raise CorruptTuningLog(f"{path} is not valid JSON ({why}); remove it and run "
                               f"python -m tvm_attn.tune --trials 0 to confirm again") from None
    if not isinstance(confirmed, dict) or not all(isinstance(v, str) for v in confirmed.values()):
        raise CorruptTuningLog(f"{path} is not a map of workload keys to schedule digests")
    return confirmed


def write_confirmed(target, root: Path | None, mod: tvm.IRModule, digest: str, family: str | None = None) -> None:
    """Note ``digest`` as the record ``mod`` uses, and, given ``family``, as the record that kernel uses."""
    confirmed = read_confirmed(target, root)
    confirmed[workload_key(mod)] = digest
    if family is not None:
        confirmed[FAMILY + family] = f"{workload_key(mod)}/{digest}"
    _write_confirmed(target, root, confirmed)


def write_blas_choice(target, root: Path | None, family: str, speedup: float | None) -> None:
    """Note that schedule="blas" measured ``speedup`` times faster than the kept schedule for the kernel ``family``
    (then "best" builds it), or, with None, that it did not."""
    confirmed = read_confirmed(target, root)
    confirmed[BLAS_CHOICE + family] = "no" if speedup is None else f"{speedup:.2f}x"
    _write_confirmed(target, root, confirmed)


def _write_confirmed(target, root: Path | None, confirmed: dict) -> None:
    path = logs_dir(target, root) / CONFIRMED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(confirmed, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)  # atomic: a killed run never leaves half a file


class _LoadedLogs:
    """One target's database and confirmed.json as read once per process, and its records by workload."""

    def __init__(self, target, root: Path):
        self.db = open_database(target, root)
        self.confirmed = read_confirmed(target, root) if self.db is not None else {}

    @functools.cached_property
    def records_by_workload(self) -> dict:
        found: dict = {}
        for record in self.db.get_all_tuning_records() if self.db is not None else []:
            found.setdefault(workload_key(record.workload.mod), []).append(record)
        return found


@functools.lru_cache(maxsize=8)
def _cached_database(target_json: str, root: str) -> _LoadedLogs:
    return _LoadedLogs(resolve_target(target_json), Path(root))


def valid_records(db, mod: tvm.IRModule, target) -> list:
    """The successful records of ``mod`` measured on ``target`` (same target key), fastest first."""
    if db is None or not db.has_workload(mod):
        return []
    key = target_key(target)
    return [r for r in db.get_top_k(db.commit_workload(mod), 100000)
            if r.target is not None and target_key(r.target) == key
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
    """The tuning record the kernel serving ``spec`` uses on ``target`` (noted by `tune` for the kernel, whatever
    length it was tuned at), or None. A CPU without a record of its own for the kernel takes one measured on
    another CPU of its ISA class (``class_record_keys``)."""
    t = resolve_target(target)
    family = FAMILY + family_key(variant, spec.kernel, path_for(spec.seq_q), t)
    roots = [root] if root is not None else lookup_roots()
    own = (_noted_record(family, target_key(t), t, logs_root) for logs_root in roots)
    same_class = (_noted_record(family, key, target_from_key(key), logs_root)
                  for logs_root in roots for key in class_record_keys(t, Path(logs_root)))
    record = next((record for record in itertools.chain(own, same_class) if record is not None), None)
    if record is None and (spec.sinks or spec.softcap is not None or spec.alibi_slopes is not None
                           or spec.tree_parents is not None):
        # A kernel with sinks differs from the one without in its output block, one with softcapping or ALiBi in a
        # block adjusting the scores, one with a tree mask in its masked tiles' key test: that one's record serves it.
        return tuned_record(variant, dataclasses.replace(spec, sinks=False, softcap=None, alibi_slopes=None,
                                                         tree_parents=None), target, root)
    return record


def blas_measured_faster(variant, spec: AttentionSpec, target, root: Path | None = None) -> bool:
    """Whether `tune` measured schedule="blas" faster than the kept schedule for the kernel serving ``spec`` on
    ``target``: its own measurement where it has one, else those on other CPUs of its ISA class, every one of which
    must have found it faster. CPUs of one class disagree: OpenBLAS's AVX2 sgemm under the dense prefill took
    1.06x-1.34x the kept schedule's speed on a Zen 5 held to AVX2, 0.44x-0.58x on a Zen 1."""
    t = resolve_target(target)
    key = BLAS_CHOICE + family_key(variant, spec.kernel, path_for(spec.seq_q), t)
    roots = [root] if root is not None else lookup_roots()
    for logs_root in roots:
        choice = _cached_database(str(t), str(logs_root)).confirmed.get(key)
        if choice is not None:
            return choice != "no"
    others = [_cached_database(str(target_from_key(k)), str(logs_root)).confirmed.get(key)
              for logs_root in roots for k in class_record_keys(t, Path(logs_root))]
    others = [choice for choice in others if choice is not None]
    return bool(others) and all(choice != "no" for choice in others)


def class_record_keys(target, root: Path) -> list[str]:
    """The target keys under ``root`` other than ``target``'s whose CPUs share its ISA class (x86_64-avx2,
    x86_64-avx512, aarch64-neon): their records serve a CPU that has none of its own."""
    own, isa_class = target_key(target), capabilities(target).isa_class
    keys = []
    for directory in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
        other = target_from_key(directory.name) if directory.name != own else None
        if other is not None and (directory / RECORD_FILE).exists() and capabilities(other).isa_class == isa_class:
            keys.append(directory.name)
    return keys


def _noted_record(family: str, key: str, key_target, logs_root):
    """The record noted for ``family`` in ``logs_root``/``key`` (the directory of ``key_target``), measured on a CPU
    of that key, or None."""
    logs = _cached_database(str(key_target), str(logs_root))
    noted = logs.confirmed.get(family)
    if logs.db is None or noted is None:
        return None
    wkey, _, digest = noted.partition("/")
    for record in logs.records_by_workload.get(wkey, []):
        # A record without a target is not known to be this target's: never applied (MetaSchedule's database
        # ignores targets).
        if record_digest(record) == digest and record.target is not None and target_key(record.target) == key:
            return record
    return None


def hand_trace(variant, spec: AttentionSpec, target):
    """The trace of the hand schedule of the kernel serving ``spec`` on ``target`` (a record with this trace is the
    hand schedule itself: tuning found nothing faster)."""
    path = path_for(spec.seq_q)
    sch = s_tir.Schedule(generic_workload(variant, spec.kernel, path, target))
    variant.kernel_parts(path)[1](sch, resolve_target(target))
    return sch.trace


def apply_record(variant, spec: AttentionSpec, record, target) -> s_tir.Schedule:
    """Replay a record's trace on the kernel serving ``spec`` on ``target`` (generic over batch and lengths)."""
    sch = s_tir.Schedule(generic_workload(variant, spec.kernel, path_for(spec.seq_q), target))
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    if "score_terms" not in str(record.trace):  # the record of the kernel without softcap and ALiBi (tuned_record)
        schedule_score_terms(sch, schedule_target(target)[1])
    return sch


def record_digest(record) -> str:
    """A short stable id of a record's schedule (sha256 of its trace), for manifests and reports."""
    return hashlib.sha256(str(record.trace).encode()).hexdigest()[:16]


class UntunedWarning(UserWarning):
    """No tuned record exists for a kernel; the hand schedule is used."""


_warned: set = set()


def warn_untuned(variant_name: str, spec: AttentionSpec, target) -> None:
    """Say once per kernel that no tuned record exists and the hand schedule is used."""
    path = path_for(spec.seq_q)
    key = (variant_name, spec.kernel, path, target_key(target))
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"no tuned record for the {variant_name} {path} kernel {spec.kernel.name} on "
                      f"{target_key(target)}: using the hand "
                      f"schedule (python -m tvm_attn.tune tunes it)", UntunedWarning, stacklevel=_caller_stacklevel())


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside this package: warnings then point at the user's call (attention,
    build or KVCache.attend, whichever it came through)."""
    package = str(Path(__file__).resolve().parent)
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(package):
        frame, level = frame.f_back, level + 1
    return level
