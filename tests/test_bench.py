"""python -m tvm_attn.bench --quick end to end: every study measured, the report generated from the CSV."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import UNIT_ROUNDOFF
from tvm_attn import blas


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "tvm_attn.bench", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, rows, proc.stderr


def test_every_study_has_rows(quick_run):
    _, rows, _ = quick_run
    studies = {r["study"] for r in rows}
    assert {"seq_sweep", "threshold_effect", "topk_effect", "mass_effect", "causal", "blas_prefill", "decode",
            "prefill_16bit", "ceiling", "generation"} <= studies
    assert {r["dtype"] for r in rows if r["study"] == "decode"} == {"float32", "float16", "bfloat16"}
    providers = {r["provider"] for r in rows if r["study"] == "seq_sweep"}
    assert {"hand", "untuned", "numpy"} <= providers


def test_rows_are_complete_and_accurate(quick_run):
    _, rows, _ = quick_run
    for r in rows:
        if r["line"] == "fma peak":  # computed, not timed
            assert float(r["gflops"]) > 0 and "flop/cycle" in r["provider"]
            continue
        assert float(r["median_ms"]) > 0
        if r["study"] not in ("ceiling", "generation"):
            assert r["threads"] and r["target"] and float(r["gflops"]) > 0
            assert float(r["gbs"]) > 0 if r["provider"] != "sgemm" else r["gbs"] == ""
        if r["provider"] == "blas":  # the library called, named in the row
            assert r["record"] == blas.host_blas().name, r
            assert float(r["rel_err_dense"]) < 1e-5, r
        if r["provider"] in ("hand", "untuned"):
            assert int(r["bytes_intermediate"]) > 0
            if r["variant"] in ("standard", "flash", "mqa"):
                # Mean relative error: float32 computation, plus rounding the output to a 16-bit dtype.
                assert float(r["rel_err_dense"]) < 1e-5 + UNIT_ROUNDOFF[r["dtype"]], r
            else:
                assert float(r["rel_err_own"]) < 1e-4, r
                assert 0 < float(r["kept_fraction"]) <= 1


def test_report_is_generated_from_the_csv(quick_run):
    out, rows, stderr = quick_run
    report = (out / "report.md").read_text()
    sgemms = [r for r in rows if r["study"] == "ceiling" and r["line"] == "sgemm"]
    assert any(r["provider"].startswith("numpy/") and "kernels" in r["provider"] for r in sgemms)  # threadpoolctl
    ceiling = max(sgemms, key=lambda r: float(r["gflops"]))
    assert f"**{float(ceiling['gflops']):.0f} GFLOP/s** ({ceiling['provider']})" in report
    bandwidth = max(float(r["gbs"]) for r in rows if r["line"] == "read bandwidth")
    assert f"the percentages use {bandwidth:.1f} GB/s" in report
    generation = next(r for r in rows if r["study"] == "generation")
    assert int(generation["compiles"]) == 0  # a decode loop over growing lengths compiles nothing
    assert f"{float(generation['overhead_us']):.1f} us outside the kernel" in report
    for name in ("speedup_vs_torch", "gflops_vs_seq", "memory", "accuracy", "threshold_effect", "topk_effect",
                 "mass_effect", "tradeoff", "timing_comparison", "causal", "decode", "prefill_16bit"):
        assert f"({name}.png)" in report
        assert os.path.getsize(out / f"{name}.png") > 1000
    assert "| inputs | error budget | pruning | pick |" in report
    assert "| seq_kv | line | float32 ms | 16-bit ms | speedup |" in report
    reads = [r for r in rows if r["provider"] == "read-kv"]
    assert reads and {r["study"] for r in reads} == {"decode"}
    assert "| GB/s | of bandwidth | of read |" in report
    blas = [r for r in rows if r["provider"] == "blas"]
    if blas:  # numpy ships a BLAS on this host
        assert {r["study"] for r in blas} == {"blas_prefill"}
        assert "| seq_q | line | blas ms | blas GFLOP/s | blas of sgemm |" in report
        assert f"The BLAS called: {blas[0]['record']}." in report
    # The same-round sgemm: in the prefill studies from their longest quick seq on, its share in the tables.
    sgemms = [r for r in rows if r["provider"] == "sgemm"]
    assert {(r["study"], r["x"]) for r in sgemms} == {("seq_sweep", "128"), ("causal", "128"), ("blas_prefill", "128")}
    assert all(int(r["flops"]) == 2 * 2048**3 for r in sgemms)
    hand = next(r for r in rows if r["study"] == "seq_sweep" and r["x"] == "128" and r["line"] == "flash"
                and r["provider"] == "hand")
    same_round = next(r for r in sgemms if r["study"] == "seq_sweep" and r["line"] == "flash")
    share = f"{100 * float(hand['gflops']) / float(same_round['gflops']):.0f}%"
    assert any(line.startswith("| 128 | flash |") and f"| {share} |" in line for line in report.splitlines())
    progress = [line for line in stderr.splitlines() if line.startswith("[") and line.endswith(" ms")]
    assert len(progress) == len([r for r in rows if r["study"] not in ("ceiling", "generation")])


def test_model_study_on_a_tiny_model(tmp_path):
    """The model study's rows and report section, on a tiny random Llama and a stand-in tokenizer (the real run
    loads SmolLM2; see README)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import types

    from tvm_attn.bench.model import CONFIGS
    from tvm_attn.bench.report import write_report
    from tvm_attn.bench.runner import run_studies

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config).eval()

    def tokenizer(text, return_tensors):
        return types.SimpleNamespace(input_ids=torch.tensor([[ord(c) % 64 for c in text]]))

    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times, it was the age of wisdom. " * 4)
    configs = [c for c in CONFIGS if c[0] in ("flash", "topk 256", "topk 16", "mass 0.01")]
    from tvm_attn.bench.model import KV_FORMATS

    study = dict(model=model, tokenizer=tokenizer, text_path=text, window=40, windows=3, prompt=20, steps=4,
                 rounds=1, configs=configs, cache_dtypes=("float32", "int8"), kv_formats=KV_FORMATS[:1])
    csv_path = tmp_path / "results.csv"
    rows = [r for r in run_studies([], str(csv_path), model=study) if r["study"] == "model"]
    quality = {r["line"]: r for r in rows if r["x_name"] == "perplexity"}
    assert quality["flash"]["x"] == 3 * 39  # next-token predictions in three windows
    assert quality["flash"]["perplexity"] == pytest.approx(quality["torch sdpa"]["perplexity"], rel=1e-5)
    assert quality["flash"]["top1_agreement"] == 1.0
    assert quality["topk 256"]["top1_agreement"] == 1.0  # more keys than a window holds: dense
    assert quality["topk 256"]["perplexity"] == pytest.approx(quality["flash"]["perplexity"], rel=1e-5)
    assert quality["topk 16"]["perplexity"] != pytest.approx(quality["flash"]["perplexity"], rel=1e-5)
    kv = {r["line"]: r for r in rows if r["x_name"] == "kv_cache"}
    assert kv["float32 cache"]["perplexity"] == pytest.approx(quality["flash"]["perplexity"], rel=1e-5)
    assert kv["float32 cache"]["top1_agreement"] == 1.0
    # the int8 cache is the round trip through its own format (one float32 rounding of the scale apart)
    assert kv["int8 cache"]["perplexity"] == pytest.approx(kv[KV_FORMATS[0][0]]["perplexity"], rel=1e-4)
    assert kv["int8 cache"]["perplexity"] != pytest.approx(kv["float32 cache"]["perplexity"], rel=1e-7)
    speed = {r["provider"]: r for r in rows if r["x_name"] == "prompt"}
    assert set(speed) == {"tvm_attn", "torch-sdpa"} and all(r["tokens_per_s"] > 0 for r in speed.values())
    report = open(write_report(str(csv_path), str(tmp_path))).read()
    assert "## Model: SmolLM2-135M-Instruct through tvm_attn" in report
    assert f"| topk 16 | {quality['topk 16']['perplexity']:.3f} |" in report
    assert f"| int8 cache | {kv['int8 cache']['perplexity']:.4f} |" in report


def test_a_partial_run_replaces_only_its_studies_rows(tmp_path):
    from tvm_attn.bench.runner import FIELDS, merge_results

    def write(path, rows):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS, restval="")
            writer.writeheader()
            writer.writerows(rows)

    full, partial = tmp_path / "results.csv", tmp_path / "results.csv.partial"
    write(full, [dict(study="decode", median_ms=1), dict(study="model", median_ms=2), dict(study="ceiling",
                                                                                        median_ms=3)])
    write(partial, [dict(study="model", median_ms=4), dict(study="ceiling", median_ms=5)])
    merge_results(str(full), str(partial), {"model"})
    with open(full, newline="") as f:
        rows = [(r["study"], r["median_ms"]) for r in csv.DictReader(f)]
    assert rows == [("decode", "1"), ("ceiling", "3"), ("model", "4")] and not partial.exists()


def test_sparse_decode_study_and_report(tmp_path, monkeypatch):
    """The sparse_decode study's rows and report section on a small synthetic cache (the real run captures SmolLM2;
    see README): the certificate holds, top-k through the shadow is exact, the goals are stated."""
    from tvm_attn.bench import sparse_decode
    from tvm_attn.bench.report import write_report
    from tvm_attn.bench.runner import run_studies

    monkeypatch.setattr(sparse_decode, "EPS", (0.05,))
    monkeypatch.setattr(sparse_decode, "EXACT", sparse_decode.EXACT[:1])
    csv_path = tmp_path / "results.csv"
    study = dict(real=False, synthetic_sets=((8192, 1),), min_seconds=0.02, shadow_cost_keys=256)
    rows = [r for r in run_studies([], str(csv_path), sparse_decode=study) if r["study"] == "sparse_decode"]
    lines = {r["line"]: r for r in rows}
    assert {"flash", "bounded eps=0.05", "topk 64 (shadow)", "topk 64 (own kernel)"} <= set(lines)
    bounded = lines["bounded eps=0.05"]
    assert 0 < bounded["certificate"] <= 1 and 0 < bounded["kept_fraction"] < 1
    assert bounded["bytes_kv"] < lines["flash"]["bytes_kv"]
    assert lines["topk 64 (shadow)"]["rel_err_own"] < 1e-5
    assert {"memory: the shadow", "memory: K and V"} <= set(lines)
    report = open(write_report(str(csv_path), str(tmp_path))).read()
    assert "## Certified sparse decode" in report and "Goals (issue 30): bounded eps 0.05 >= 3x flash:" in report


def test_serving_study_and_report(tmp_path):
    """The serving study on tiny shapes (python -m tvm_attn.bench --quick --study serving): every provider of the
    ragged round and of the continuous-batching loop has a row (the study itself raises when their outputs differ),
    and the report states the goals."""
    from tvm_attn.bench.__main__ import QUICK_SERVING
    from tvm_attn.bench.report import write_report
    from tvm_attn.bench.runner import run_studies
    from tvm_attn.bench.serving import PAGED, PER_SEQUENCE, READ, TORCH

    csv_path = tmp_path / "results.csv"
    rows = [r for r in run_studies([], str(csv_path), serving=QUICK_SERVING) if r["study"] == "serving"]
    torch = [TORCH] if importlib.util.find_spec("torch") else []  # torch is optional
    ragged = [r for r in rows if r["distribution"].startswith("ragged decode")]
    assert sorted((r["provider"], r["x"]) for r in ragged if r["provider"] == PAGED) == [(PAGED, 16), (PAGED, 64)]
    assert {r["provider"] for r in ragged} == {PAGED, PER_SEQUENCE, READ, *torch}
    loop = [r for r in rows if r["distribution"].startswith("continuous batching")]
    assert {r["provider"] for r in loop} == {PAGED, PER_SEQUENCE, *torch}
    assert all(r["tokens_per_s"] > 0 and r["gbs"] > 0 for r in loop)
    report = open(write_report(str(csv_path), str(tmp_path))).read()
    assert "## Many sequences at once: PagedKVCache" in report and "Goals (issue 28), page_size 16:" in report


def test_integer_kv_study_and_report(tmp_path):
    """The integer-cache study on tiny shapes (python -m tvm_attn.bench --quick --study integer_kv): a row per cache
    dtype and the read per point (the study itself raises when a cache's output differs from float32's), and the
    report states the goals."""
    from tvm_attn.bench.__main__ import QUICK_INTEGER_KV
    from tvm_attn.bench.report import write_report
    from tvm_attn.bench.runner import run_studies

    csv_path = tmp_path / "results.csv"
    rows = [r for r in run_studies([], str(csv_path), integer_kv=QUICK_INTEGER_KV) if r["study"] == "integer_kv"]
    assert sorted(r["line"] for r in rows) == sorted(
        f"kv_heads={kvh} ({kind}) {name}" for kvh, kind in ((4, "MHA"), (2, "GQA"))
        for name in ("float32", "float16", "int8", "read-kv"))
    assert all(r["gbs"] > 0 for r in rows)
    int8 = next(r for r in rows if r["line"].endswith("int8") and r["kv_heads"] == 4)
    assert int8["bytes_kv"] == 2 * 4 * 256 * (64 + 4)  # codes and a float32 scale per row
    report = open(write_report(str(csv_path), str(tmp_path))).read()
    assert "## Integer KV caches: decode from int8 K and V" in report
    assert "Goals (issue 30): kv_heads=4 (MHA) int8 vs float16" in report


def test_features_study_and_report(tmp_path):
    """The features study on tiny shapes (python -m tvm_attn.bench --quick --study features): a row per feature and the
    kernel without it, a row per tree provider, and the report's section states issue 29's goals."""
    from tvm_attn.bench.__main__ import QUICK_FEATURES
    from tvm_attn.bench.features import DECODE_CALLS, FEATURES, PAGED, SAME_KEYS, TAKEN
    from tvm_attn.bench.report import write_report
    from tvm_attn.bench.runner import run_studies

    csv_path = tmp_path / "results.csv"
    rows = [r for r in run_studies([], str(csv_path), features=QUICK_FEATURES) if r["study"] == "features"]
    cost = [r for r in rows if r["feature"] != "tree"]
    for point in QUICK_FEATURES["cost"]["points"]:  # flash's prefill kernel, bounded's reading a cache's shadow
        variant = point.get("variant", "flash")
        for n in range(QUICK_FEATURES["cost"]["rounds"]):
            at = [r for r in cost if r["line"] == point["label"] and r["round"] == n]
            assert sorted(r["feature"] for r in at) == sorted(
                ["", *FEATURES, *(SAME_KEYS if variant != "flash" else ())])
            assert {r["variant"] for r in at} == {variant}
    tree = [r for r in rows if r["feature"] == "tree"]
    assert {r["provider"] for r in tree} == {TAKEN, DECODE_CALLS, "split-KV decode kernel", "flash prefill kernel",
                                             "mqa prefill kernel", PAGED}
    assert all(r["median_ms"] > 0 for r in rows)
    report = open(write_report(str(csv_path), str(tmp_path))).read()
    assert "## Attention features: softcap, sinks, ALiBi, tree verification" in report
    assert "Goals (issue 29): each feature at most" in report and "one call verifying the tree at most" in report
    assert "2 interleaved rounds per kernel (the median of their ratios" in report


def test_feature_costs_are_judged_on_the_median_round():
    """A feature's ratio is the median over the rounds, each round's kernel with the feature against the one without
    timed in that round; one favourable round does not meet the goal."""
    from tvm_attn.bench.features import GOALS, feature_cost_rows, features_section

    line = "flash prefill"
    rows = [dict(study="features", line=line, feature=feature, variant="flash", record="hand", round=n,
                 median_ms=ms) for n, without, with_cap in ((0, 10.0, 10.8), (1, 20.0, 22.2), (2, 10.0, 11.2))
            for feature, ms in (("", without), ("softcap 30", with_cap))]
    report = "\n".join(features_section(rows, None))
    assert "1.110x (1.080-1.120, hand)" in report  # the median of 1.08, 1.11, 1.12
    assert "| 10.000 (hand) |" in report  # the median time without
    assert f"each feature at most 1.110x its dense kernel without (goal <= {GOALS['feature_cost']:.2f}x: not met)" \
        in report
    with pytest.raises(ValueError, match="rounds must be a positive integer, got 0"):
        feature_cost_rows(points=(), rounds=0)


@pytest.mark.parametrize("quick", [False, True])
def test_the_default_plan_is_what_the_benchmark_times(quick):
    """tune and export default to the core's plan (tvm_attn/plan.py); the benchmark's studies time exactly those
    kernels, each also at the length the plan tunes it at."""
    from tvm_attn.bench.runner import spec_for
    from tvm_attn.bench.studies import default_studies
    from tvm_attn.plan import default_plan
    from tvm_attn.variants import path_for

    timed = {}  # kernel -> the specs the benchmark times it at
    for study in default_studies(quick):
        for x in study.x_vals:
            for line in study.lines:
                if "hand" in study.providers and study.measures(line, x):
                    spec = spec_for(study, line, x)
                    timed.setdefault((line.variant, path_for(spec.seq_q), spec.kernel), set()).add(spec)
    plan = default_plan(quick)
    assert {(w.variant, path_for(w.spec.seq_q), w.spec.kernel) for w in plan} == set(timed)
    for w in plan:
        assert w.spec in timed[(w.variant, path_for(w.spec.seq_q), w.spec.kernel)], w.name


def test_tune_and_export_do_not_import_the_benchmark():
    """The core never imports the benchmark (nor its thread-pool settings, which it sets on import)."""
    code = ("import os, sys; import tvm_attn.tune, tvm_attn.export; from tvm_attn.plan import default_plan; "
            "default_plan(); print(any(m.startswith('tvm_attn.bench') for m in sys.modules), "
            "os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "None"]


def test_two_runs_are_compared_point_by_point(quick_run, tmp_path):
    """--compare: the within-point ratios of two runs; here a copy of the quick run with one hand time doubled."""
    from tvm_attn.bench.stability import compare

    out, rows, _ = quick_run
    target = next(r for r in rows if r["study"] == "seq_sweep" and r["provider"] == "hand" and r["line"] == "flash")
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        copied = list(reader)
    for r in copied:
        if all(r[k] == target[k] for k in ("study", "x", "line", "provider", "distribution")):
            r["median_ms"] = str(2 * float(r["median_ms"]))
    with open(tmp_path / "other.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=reader.fieldnames)
        writer.writeheader()
        writer.writerows(copied)
    same = compare(str(out / "results.csv"), str(out / "results.csv"))
    assert "| hand / torch-sdpa |" in same and "100.0%" not in same
    changed = compare(str(out / "results.csv"), str(tmp_path / "other.csv"))
    # untuned / hand halves in the other run: its ratio changes by 100%, and is the largest change
    assert f"| seq_sweep | {float(target['x']):g} | flash | gaussian | untuned / hand |" in changed
    assert "| 100.0% |" in changed.split("The ten largest")[1].splitlines()[4]


def test_rounds_group_what_the_report_divides():
    """A causal point's lines (causal against no mask) share one round; a 16-bit decode line shares its float32
    line's round; other studies time each line in its own round."""
    from tvm_attn.bench.studies import default_studies

    studies = {s.name: s for s in default_studies()}
    for name, together in (("causal", True), ("seq_sweep", False)):
        s = studies[name]
        keys = {s.round_key(line, s.x_vals[-1], "gaussian") for line in s.lines}
        assert (len(keys) == 1) == together, name
    decode = studies["decode"]
    keys = {decode.round_key(line, decode.x_vals[0], "gaussian") for line in decode.lines}
    assert len(keys) == len(decode.lines) // 3  # float32, float16, bfloat16 of each KV-head count together


def test_interleaved_callables_are_timed_over_the_same_span():
    """A callable that settles early keeps taking turns until the slowest one has settled, so a ratio compares the
    same minutes of the machine (before, the fast one stopped after a few turns and the slow one went on alone)."""
    import time

    from tvm_attn.timing import measure_interleaved

    calls = {"fast": [], "slow": []}

    def timed(name, seconds):
        def run():
            time.sleep(seconds)
            calls[name].append(time.perf_counter())
        return run

    result = measure_interleaved({"fast": timed("fast", 0.0005), "slow": timed("slow", 0.012)}, min_seconds=0.03,
                                 min_repeats=8, turn_seconds=0.01)
    assert result["slow"].repeats >= 8
    # The fast one was still being timed in the slow one's last quarter of calls.
    assert calls["fast"][-1] > calls["slow"][len(calls["slow"]) * 3 // 4]


def test_the_garbage_collector_is_off_while_timing_and_restored_after():
    """A collection pausing inside a timed call would be counted as that call's time (timeit's policy)."""
    import gc

    from tvm_attn.timing import measure_interleaved

    seen = []
    assert gc.isenabled()
    measure_interleaved({"a": lambda: seen.append(gc.isenabled())}, min_seconds=0.001, min_repeats=3)
    assert seen and not any(seen)
    assert gc.isenabled()
    with pytest.raises(ZeroDivisionError):
        measure_interleaved({"a": lambda: 1 / 0}, min_seconds=0.001)
    assert gc.isenabled()


def test_sgemm_worker_computes_the_product_in_its_own_process():
    """The same-round ceiling really multiplies (its answer is the product's trace) and stops when closed."""
    import numpy as np

    from tvm_attn.bench.ceiling import SgemmWorker

    worker = SgemmWorker(64, 1)
    try:
        assert "kernels" in worker.blas
        a = np.random.default_rng(0).standard_normal((64, 64), dtype=np.float32)
        assert worker() == pytest.approx(float(np.trace(a.astype(np.float64) @ a)), rel=1e-4)
        assert worker.flops == 2 * 64**3
    finally:
        worker.close()
    assert worker._proc.poll() == 0


def test_a_failed_ceiling_measurement_does_not_lose_the_run(monkeypatch, capsys):
    """The sgemm subprocess failing (e.g. threadpoolctl missing) costs that ceiling line, not the run's rows."""
    from tvm_attn.bench import ceiling

    def fail(*args, **kwargs):
        raise RuntimeError("the OpenBLAS sgemm subprocess failed: no module threadpoolctl")

    monkeypatch.setattr(ceiling, "openblas_sgemm", fail)
    rows = ceiling.sgemm_rows(64, 1, min_seconds=0.01)
    assert all(not r["provider"].startswith("numpy/") for r in rows)
    assert "numpy's sgemm ceiling not measured" in capsys.readouterr().err


def test_a_declared_section_is_drawn_by_the_one_renderer(tmp_path):
    """sections.Section: the table has a row per (x, line) in the declared order, cells see the point's providers,
    plots get a series per line."""
    from tvm_attn.bench.sections import Column, Context, Plot, Section

    rows = [dict(study="s", x=float(x), line=line, provider=p, median_ms=float(x) * (2 if p == "b" else 1))
            for x in (1, 2) for line in ("l1", "l2") for p in ("a", "b")]
    ctx = Context(out_dir=str(tmp_path), machine="here", ceiling=None, peak=None, bandwidth=None, readers=[])
    section = Section("s", "Title", intro=("Intro.",), by_line=True,
                      columns=(Column("x", lambda p: p.x), Column("line", lambda p: p.line),
                               Column("b / a", lambda p: p["b"]["median_ms"] / p["a"]["median_ms"])),
                      plots=(Plot("toy", "toy plot", "Toy ({machine})", "x", "ms",
                                  y=lambda p: p["a"]["median_ms"]),),
                      has_row=lambda p: p.x != 2 or p.line != "l2")
    parts = section.render(rows + [dict(rows[0], study="other")], ctx)
    assert parts[:4] == ["## Title", "", "Intro.", ""]
    table = next(part for part in parts if part.startswith("| x |")).splitlines()
    assert table[2:] == ["| 1 | l1 | 2.0 |", "| 2 | l1 | 2.0 |", "| 1 | l2 | 2.0 |"]
    assert "![toy plot](toy.png)" in parts and (tmp_path / "toy.png").stat().st_size > 1000
    assert Section("missing", "T", columns=()).render(rows, ctx) == []


def test_a_run_held_to_the_avx2_class(tmp_path):
    """--isa avx2: the kernels are built for x86-64-v3, the same-round sgemm is OpenBLAS's Haswell kernels."""
    from tvm_attn.targets import host_mismatch

    if host_mismatch({"kind": "llvm", "mcpu": "x86-64-v3"}) is not None:
        pytest.skip("this host does not run AVX2 code")
    proc = subprocess.run([sys.executable, "-m", "tvm_attn.bench", "--quick", "--isa", "avx2", "--study", "causal",
                           "--provider", "hand", "--provider", "sgemm", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["target"] for r in rows} == {"x86_64-x86-64-v3"}
    assert {r["provider"] for r in rows if r["study"] == "causal"} == {"hand", "sgemm"}
    assert any("Haswell" in r["provider"] for r in rows if r["study"] == "ceiling")
    bad = subprocess.run([sys.executable, "-m", "tvm_attn.bench", "--isa", "avx3", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown ISA class 'avx3'" in bad.stderr


def test_the_report_has_a_section_per_isa_class(quick_run, tmp_path):
    """A machine's report puts its runs held to each ISA class (<key>, <key>-avx2 beside it) side by side, and the
    Apple estimate's CSV (bench/results/apple-estimate.csv) when there is one."""
    from tvm_attn.bench import apple_estimate
    from tvm_attn.bench.report import write_report

    out, rows, _ = quick_run
    key = rows[0]["target"]
    for name, target in ((key, key), (f"{key}-avx2", "x86_64-x86-64-v3")):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({**r, "target": target} for r in rows)
    apple_estimate.write_csv([apple_estimate.LoopEstimate("flash prefill", "apple-m3", 37, 24,
                                                          {"apple": 9.5, "neoverse-v2": 6.4})],
                             str(tmp_path / "apple-estimate.csv"))
    report = open(write_report(str(tmp_path / key / "results.csv"), str(tmp_path / key))).read()
    section = report[report.index("## ISA classes"):]
    assert f"native: x86_64-avx512 ({key} code)" in section or f"({key} code)" in section
    assert "avx2: x86_64-avx2 (x86_64-x86-64-v3 code)" in section
    assert "| flash prefill | 63% / 94% |" in section  # 24 FMAs / (4 pipes x 9.5 and 6.4 cycles)
    alone = tmp_path / "alone" / key
    alone.mkdir(parents=True)
    (alone / "results.csv").write_bytes((out / "results.csv").read_bytes())
    assert "## ISA classes" not in open(write_report(str(alone / "results.csv"), str(alone))).read()
