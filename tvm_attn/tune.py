"""python -m tvm_attn.tune: MetaSchedule + XGBoost autotuning of the hand schedules' knobs, per target.

Each workload is one (variant, spec). Its design space is the variant's hand schedule (schedules/<name>.py), whose
sampled knobs MetaSchedule's evolutionary search explores with the XGBoost cost model. Before searching, the hand
schedule with its default decisions is measured and recorded, so the best record is never slower than it. Records
go to <logs>/<target key>/ as they are measured: an interrupted run loses at most the batch being measured, and
running again resumes and adds trials.

Where records go (--logs, else): $TVM_ATTN_TUNING_LOGS; in a source checkout, the repository's tuning_logs/; in an
installed package, ~/.local/share/tvm_attn/tuning_logs ($XDG_DATA_HOME; ~/Library/Application Support on macOS).
Kernels look records up there first, then in the records shipped with tvm_attn.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import types
from pathlib import Path

import tvm
from tvm import s_tir
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import local_builder
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

from . import tuning
from .runtime import dlpack_argument, numpy_dtype
from .plan import Workload, add_workload_arguments, cli_workloads
from .targets import host_mismatch, resolve_target, runs_on_host, target_key
from .variants import get_variant, path_for


def _cores() -> int:
    return int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))


def make_runner(rpc_tracker: str | None, rpc_key: str | None, timeout_sec: float):
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40, enable_cpu_cache_flush=False)
    if rpc_tracker:
        host, _, port = rpc_tracker.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--rpc-tracker must be HOST:PORT, got {rpc_tracker!r}")
        if not rpc_key:
            raise ValueError("--rpc-key is required with --rpc-tracker")
        config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=rpc_key,
                                     session_timeout_sec=int(max(timeout_sec, 10)))
        return ms.runner.RPCRunner(config, evaluator_config=evaluator, max_workers=1)
    return ms.runner.LocalRunner(timeout_sec=timeout_sec, evaluator_config=evaluator)


BUILD_FUNC = "tvm_attn.tune.build"


@tvm.register_global_func(BUILD_FUNC, override=True)
def _build(mod: tvm.IRModule, target, _params):
    """MetaSchedule's default_build without its `import tvm.s_tir.tensor_intrin`, which takes ~27 s in every
    builder worker (each new one: PooledBuilder) and which these kernels do not use."""
    return tvm.driver.build(mod, target=target)


TENSOR_INTRIN_MODULE = "tvm.s_tir.tensor_intrin"


@contextlib.contextmanager
def _without_tvm_tensor_intrinsics():
    """MetaSchedule's TuneContext imports tvm.s_tir.tensor_intrin, which registers TVM's tensor intrinsics (CUDA,
    Hexagon, AMX, ...) by parsing some 270 TVMScript functions: 23 s here, in every tuning process. Our design
    spaces (the hand schedules, no schedule rules or postprocessors) use none of them, so while tuning a placeholder
    module stands in for it (our own intrinsics, schedules/byte_products.py and the like, are registered by our
    schedules)."""
    if TENSOR_INTRIN_MODULE in sys.modules:
        yield
        return
    placeholder = types.ModuleType(TENSOR_INTRIN_MODULE)
    sys.modules[TENSOR_INTRIN_MODULE] = placeholder
    try:
        yield
    finally:
        if sys.modules.get(TENSOR_INTRIN_MODULE) is placeholder:
            del sys.modules[TENSOR_INTRIN_MODULE]


def _init_builder_worker() -> None:
    """Builder workers are fresh processes: importing this module registers BUILD_FUNC there."""
    import tvm_attn.tune  # noqa: F401


@derived_object
class PooledBuilder(ms.builder.PyBuilder):
    """MetaSchedule's LocalBuilder (the same build and export in worker processes, the same timeout and errors),
    with one pool of workers for the whole run. LocalBuilder starts a new pool for every batch and one more for its
    sanity check, and each new worker pays ``import tvm`` (6-9 s on a 2-core Zen 1). TVM restarts the pool against
    the workers' memory growth; here each worker is recycled after ``uses`` builds instead."""

    def __init__(self, max_workers: int, timeout_sec: float, uses: int = 32):
        super().__init__()
        self.timeout_sec = timeout_sec
        self.pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec, maximum_process_uses=uses,
                                      initializer=_init_builder_worker)

    def build(self, build_inputs: list[ms.builder.BuilderInput]) -> list[ms.builder.BuilderResult]:
        jobs = [(BUILD_FUNC, None, b.mod, b.target, None) for b in build_inputs]
        results = []
        for done in self.pool.map_with_error_catching(lambda job: local_builder._worker_func(*job), jobs):
            if done.status == StatusKind.COMPLETE:
                results.append(ms.builder.BuilderResult(done.value, None))
            elif done.status == StatusKind.TIMEOUT:
                results.append(ms.builder.BuilderResult(
                    None, f"LocalBuilder: Timeout, killed after {self.timeout_sec} seconds"))
            else:
                results.append(ms.builder.BuilderResult(None, f"LocalBuilder: An exception occurred\n{done.value}"))
        return results

    def close(self) -> None:
        self.pool.shutdown()


def make_builder(target):
    """Builds in worker processes; artifacts are MetaSchedule's default .tar of objects (an RPC server links them
    on the device, e.g. with the Mac's own clang)."""
    return PooledBuilder(max_workers=_cores(), timeout_sec=60)


def _measure_hand(variant, spec, target, mod, builder, runner):
    """The hand schedule with its default decisions, measured by the same builder and runner: (trace, seconds)."""
    sch = s_tir.Schedule(mod)
    hand_schedule(variant, spec)(sch, target)
    (built,) = builder.build([ms.builder.BuilderInput(sch.mod, target)])
    if built.error_msg:
        raise RuntimeError(f"the hand schedule of {variant.name} {spec.name} does not build: {built.error_msg}")
    args_info = ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"])
    (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args_info)])
    result = future.result()
    if result.error_msg:
        raise RuntimeError(f"the hand schedule of {variant.name} {spec.name} failed to run: {result.error_msg}")
    return sch.trace, [float(s) for s in result.run_secs], args_info


def tune_workload(w: Workload, target, db, *, trials: int, builder, runner, work_dir: str, logs_root, progress,
                  seed: int | None = None) -> dict:
    """Tune one workload. Returns {"hand_ms": the best time before this run (the hand schedule's on a first run),
    "best_ms": after it (both MetaSchedule runner times)}, plus the confirmation's times when it ran."""
    variant = get_variant(w.variant)
    mod = tuning.workload(variant, w.spec, target)
    if tuning.best_record(db, mod, target) is None:
        trace, secs, args_info = _measure_hand(variant, w.spec, target, mod, builder, runner)
        db.commit_tuning_record(ms.database.TuningRecord(trace, db.commit_workload(mod), secs, target, args_info))
        progress.hand(min(secs))
    hand = tuning.best_record(db, mod, target)
    hand_ms = min(float(s) for s in hand.run_secs) * 1e3
    progress.start(w, hand_ms)
    if trials > 0:
        schedule = hand_schedule(variant, w.spec)
        space = ms.space_generator.ScheduleFn(lambda sch: schedule(sch, target), sch_rules=[], postprocs=[],
                                              mutator_probs={ms.mutator.MutateTileSize(): 1.0})
        # MetaSchedule logs to files under work_dir/logs and echoes to stdout: send the echo to a file too.
        with (open(Path(work_dir) / "metaschedule_console.log", "a") as console, contextlib.redirect_stdout(console),
              _without_tvm_tensor_intrinsics()):
            ms.tune_tir(mod=mod, target=target, work_dir=work_dir, max_trials_global=trials,
                        num_trials_per_iter=min(trials, 8), builder=builder, runner=runner, database=db,
                        cost_model="xgb", space=space, num_tuning_cores=_cores(), seed=seed,
                        measure_callbacks=ms.measure_callback.MeasureCallback.create("default")
                        + [progress.callback()])
    best = tuning.best_record(db, mod, target)
    row = {"hand_ms": hand_ms, "best_ms": min(float(s) for s in best.run_secs) * 1e3}
    if runs_on_host(target):
        row.update(confirm(variant, w.spec, target, db, mod, best, logs_root, progress.out))
    else:  # no device here to confirm on: the kernel uses the runner's pick
        tuning.write_confirmed(target, logs_root, mod, tuning.record_digest(best), _family(variant, w.spec, target))
    return row


def hand_schedule(variant, spec):
    """The hand schedule (and design space) of the kernel serving ``spec``."""
    return variant.kernel_parts(path_for(spec.seq_q))[1]


def _family(variant, spec, target) -> str:
    return tuning.family_key(variant, spec.kernel, path_for(spec.seq_q), target)


def confirm(variant, spec, target, db, mod, best, logs_root, out) -> dict:
    """Time the fastest record against the hand schedule here, interleaved, with the benchmark's timer, and note
    the winner in confirmed.json, which lookups follow. MetaSchedule's runner times each candidate once, in another
    process: measured here, its pick lost to the hand schedule on 24 of the 40 default-plan workloads where the two
    differed."""
    import numpy as np

    from .timing import measure_interleaved

    hand = tuning.hand_trace(variant, spec, target)
    if str(hand) == str(best.trace):
        tuning.write_confirmed(target, logs_root, mod, tuning.record_digest(best), _family(variant, spec, target))
        return {}
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    args = [dlpack_argument(rng.standard_normal(shape).astype(numpy_dtype(spec.dtype)))
            for shape in (spec.q_shape, spec.kv_shape, spec.kv_shape)]
    result = tvm.runtime.empty(spec.q_shape, spec.dtype, dev)
    traces = {"hand": hand, "tuned": best.trace}
    fns = {}
    for name, trace in traces.items():
        sch = s_tir.Schedule(mod)
        trace.apply_to_schedule(sch, remove_postproc=False)
        fn = tvm.compile(sch.mod, target=target)["main"]
        fns[name] = lambda fn=fn: fn(*args, result)
    timings = measure_interleaved(fns)
    winner = min(timings, key=lambda name: timings[name].median_ms)
    hand_record = next((r for r in tuning.valid_records(db, mod, target) if str(r.trace) == str(hand)), None)
    if winner == "hand" and hand_record is None:  # cannot happen after tune_workload, which records it first
        raise RuntimeError(f"no record of the hand schedule of {variant.name} {spec.name}")
    tuning.write_confirmed(target, logs_root, mod, tuning.record_digest(hand_record if winner == "hand" else best),
                           _family(variant, spec, target))
    print(f"  confirmed here: hand {timings['hand'].median_ms:.3f} ms, tuned {timings['tuned'].median_ms:.3f} ms: "
          f"keeps the {winner} schedule", file=out, flush=True)
    return {"confirmed_hand_ms": timings["hand"].median_ms, "confirmed_best_ms": timings[winner].median_ms}


BLAS_MARGIN = 1.03  # "best" builds schedule="blas" only where it measured at least this much faster


def weighs_blas(variant, spec, target) -> bool:
    """Whether the kernel serving ``spec`` has a BLAS-backed form to weigh here: float32 dense prefill, a BLAS for
    the target, the target runs on this host."""
    from . import blas

    if (path_for(spec.seq_q) != "prefill" or variant.blas_compute is None or spec.dtype != "float32"
            or not runs_on_host(target)):
        return False
    try:
        blas.for_target(target)
    except ValueError:
        return False
    return True


def weigh_blas(variant, spec, target, logs_root, out) -> dict:
    """Time schedule="blas" against the kept schedule (the record noted in ``logs_root``, else the hand schedule)
    here, interleaved, with the benchmark's timer, and note in confirmed.json whether it was faster by BLAS_MARGIN:
    "best" then builds it for every length of this kernel."""
    import numpy as np

    from .kernel import scheduled_module
    from .timing import measure_interleaved

    tuning._cached_database.cache_clear()  # the confirmation just written
    record = tuning.tuned_record(variant, spec, target, root=logs_root)
    kept = (tuning.apply_record(variant, spec, record, target).mod if record is not None
            else scheduled_module(variant, spec, target, "hand").mod)
    mods = {"tuned" if record is not None else "hand": kept,
            "blas": scheduled_module(variant, spec, target, "blas").mod}
    rng = np.random.default_rng(0)
    args = [dlpack_argument(rng.standard_normal(shape).astype(numpy_dtype(spec.dtype)))
            for shape in (spec.q_shape, spec.kv_shape, spec.kv_shape)]
    result = tvm.runtime.empty(spec.q_shape, spec.dtype, tvm.cpu())
    fns = {}
    for name, mod in mods.items():
        fn = tvm.compile(mod, target=target)["main"]
        fns[name] = lambda fn=fn: fn(*args, result)
    timings = measure_interleaved(fns)
    kept_name = next(iter(mods))
    speedup = timings[kept_name].median_ms / timings["blas"].median_ms
    faster = speedup >= BLAS_MARGIN
    tuning.write_blas_choice(target, logs_root, _family(variant, spec, target), speedup if faster else None)
    tuning._cached_database.cache_clear()
    print(f"  blas here: {timings['blas'].median_ms:.3f} ms against {kept_name} {timings[kept_name].median_ms:.3f} "
          f"ms ({speedup:.2f}x): \"best\" {'builds' if faster else 'does not build'} it", file=out, flush=True)
    return {"blas_ms": timings["blas"].median_ms, "blas_speedup": speedup}


def _searched(db, w: Workload, target) -> bool:
    """Whether w has records beyond the hand schedule's."""
    mod = tuning.workload(get_variant(w.variant), w.spec, target)
    return db.has_workload(mod) and len(db.get_top_k(db.commit_workload(mod), 2)) >= 2


class Progress:
    """Terminal progress: workload i of n, trials done, best time and GFLOP/s so far, time left."""

    def __init__(self, n: int, trials: int, budget_s: float, out=None):
        self.n, self.trials, self.budget_s, self.out = n, trials, budget_s, out or sys.stderr
        self.i, self.started = 0, time.time()
        self.w, self.best_ms, self.done = None, math.inf, 0

    def hand(self, secs: float) -> None:
        print(f"  hand schedule measured: {secs * 1e3:.3f} ms", file=self.out, flush=True)

    def start(self, w: Workload, best_ms: float) -> None:
        self.i += 1
        self.w, self.best_ms, self.done = w, best_ms, 0
        self.line()

    def line(self) -> None:
        left = self.budget_s - (time.time() - self.started)
        gflops = self.w.spec.dense_flops() / (self.best_ms * 1e-3) / 1e9
        print(f"[{self.i}/{self.n}] {self.w.name}: {self.done}/{self.trials} trials, best {self.best_ms:.3f} ms "
              f"({gflops:.1f} GFLOP/s), {left / 60:.1f} min left", file=self.out, flush=True)

    def callback(self):
        progress = self

        @derived_object
        class _Callback(ms.measure_callback.PyMeasureCallback):
            def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
                for result in runner_results:
                    progress.done += 1
                    if result.run_secs and not result.error_msg:
                        progress.best_ms = min(progress.best_ms, min(float(s) for s in result.run_secs) * 1e3)
                progress.line()

        return _Callback()


def run_blas_only(plan: list[Workload], target, logs_root: Path, out=None) -> list[dict]:
    """Weigh schedule="blas" against the kept schedules of ``plan``'s kernels that have a BLAS-backed form, without
    tuning anything."""
    out = out or sys.stderr
    t = resolve_target(target)
    if not runs_on_host(t):
        raise ValueError(f"target {target_key(t)} cannot run on this {target_key('host')} host ({host_mismatch(t)}): "
                         f"the BLAS-backed kernels are weighed here only")
    tuning.open_database(t, logs_root, create=True)  # lookups read confirmed.json beside a database
    rows = []
    for w in plan:
        variant = get_variant(w.variant)
        if weighs_blas(variant, w.spec, t):
            print(f"{w.name}:", file=out, flush=True)
            rows.append({"workload": w.name, **weigh_blas(variant, w.spec, t, logs_root, out)})
    return rows


def run(plan: list[Workload], target, *, trials: int, budget_min: float, logs_root: Path, rpc_tracker=None,
        rpc_key=None, seed=None, runner_timeout: float = 10.0, untuned_only: bool = False,
        out=None) -> list[dict]:
    """Tune ``plan`` for ``target`` within ``budget_min`` minutes; return one summary row per workload.
    ``untuned_only`` skips workloads that already have searched records (finishing an interrupted plan).
    Progress goes to ``out`` (default: sys.stderr at the time of the call)."""
    out = out or sys.stderr
    t = resolve_target(target)
    if not rpc_tracker and not runs_on_host(t):
        raise ValueError(f"target {target_key(t)} cannot run on this {target_key('host')} host "
                         f"({host_mismatch(t)}): measure it on the device with --rpc-tracker HOST:PORT --rpc-key KEY")
    runner = make_runner(rpc_tracker, rpc_key, runner_timeout)  # checks the RPC options before writing anything
    db = tuning.open_database(t, logs_root, create=True)
    work_dir = Path(logs_root) / target_key(t) / "logs"  # MetaSchedule's own logs; not committed
    work_dir.mkdir(parents=True, exist_ok=True)
    if untuned_only:
        searched = [w for w in plan if _searched(db, w, t)]
        plan = [w for w in plan if w not in searched]
        print(f"{len(searched)} workloads already tuned, skipped", file=out, flush=True)
    with contextlib.closing(make_builder(t)) as builder:
        progress = Progress(len(plan), trials, budget_min * 60, out)
        rows = []
        for w in plan:
            if time.time() - progress.started > budget_min * 60:
                print(f"time budget of {budget_min:g} min used: {len(plan) - len(rows)} workloads not tuned",
                      file=out, flush=True)
                break
            row = tune_workload(w, t, db, trials=trials, builder=builder, runner=runner, work_dir=str(work_dir),
                                logs_root=logs_root,
                                progress=progress, seed=seed)
            row.update(workload=w.name, gflops=w.spec.dense_flops() / (row["best_ms"] * 1e-3) / 1e9)
            if not rpc_tracker and weighs_blas(get_variant(w.variant), w.spec, t):
                row.update(weigh_blas(get_variant(w.variant), w.spec, t, logs_root, out))
            rows.append(row)
            print(f"  done {w.name}: hand {row['hand_ms']:.3f} ms -> best {row['best_ms']:.3f} ms "
                  f"({row['hand_ms'] / row['best_ms']:.2f}x)", file=out, flush=True)
    tuning._cached_database.cache_clear()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tvm_attn.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser, "tune")
    parser.add_argument("--target", default="host", help="host, apple-m1..apple-m4, or a TVM target JSON")
    parser.add_argument("--trials", type=int, default=8, help="measured trials per workload beyond the hand "
                        "schedule (default 8: the default plan then fits the default budget on 2 cores); 0 only "
                        "confirms the best records against the hand schedules")
    parser.add_argument("--time-budget", type=float, default=45.0, help="minutes for the whole plan (default 45); "
                        "workloads not started by then are skipped and listed")
    parser.add_argument("--rpc-tracker", default=None, help="HOST:PORT of a TVM RPC tracker: measure on its devices")
    parser.add_argument("--rpc-key", default=None, help="device key registered with the tracker")
    parser.add_argument("--logs", default=None, help="where to write records (default: see above; now "
                        f"{tuning.user_logs_root()})")
    parser.add_argument("--seed", type=int, default=None, help="random seed of the search")
    parser.add_argument("--untuned-only", action="store_true", help="skip workloads that already have tuned "
                        "records (finish an interrupted plan instead of adding trials everywhere)")
    parser.add_argument("--blas-only", action="store_true", help="only weigh schedule=\"blas\" against the kept "
                        "schedules of the plan's float32 dense prefill kernels (tune does so after confirming each)")
    args = parser.parse_args(argv)

    plan = cli_workloads(parser, args)
    logs_root = Path(args.logs) if args.logs else tuning.default_logs_root()
    if args.blas_only:
        try:
            rows = run_blas_only(plan, args.target, logs_root)
        except ValueError as err:
            parser.error(str(err))
        for r in rows:
            print(f"{r['workload']:60s} blas {r['blas_ms']:10.3f} ms {r['blas_speedup']:6.2f}x the kept schedule")
        return
    print(f"tuning {len(plan)} workloads for {target_key(args.target)} into {logs_root / target_key(args.target)}, "
          f"{args.trials} trials each, budget {args.time_budget:g} min", file=sys.stderr, flush=True)
    try:
        rows = run(plan, args.target, trials=args.trials, budget_min=args.time_budget, logs_root=logs_root,
                   rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key, seed=args.seed,
                   untuned_only=args.untuned_only)
    except ValueError as err:  # a corrupt log (CorruptTuningLog), RPC options, a target this host cannot run
        parser.error(str(err))
    print("\nhand/tuned: MetaSchedule's runner; confirmed: hand vs the kept schedule, timed here interleaved")
    print(f"{'workload':60s} {'hand ms':>10s} {'tuned ms':>10s} {'speedup':>8s} {'GFLOP/s':>8s} "
          f"{'confirmed hand':>15s} {'kept':>10s}")
    for r in rows:
        confirmed = (f"{r['confirmed_hand_ms']:15.3f} {r['confirmed_best_ms']:10.3f}" if "confirmed_hand_ms" in r
                     else f"{'-':>15s} {'-':>10s}")
        print(f"{r['workload']:60s} {r['hand_ms']:10.3f} {r['best_ms']:10.3f} {r['hand_ms'] / r['best_ms']:7.2f}x "
              f"{r['gflops']:8.1f} {confirmed}")


if __name__ == "__main__":
    main()
