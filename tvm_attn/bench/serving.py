"""The serving study: many sequences at once through PagedKVCache, against what a user has without it.

Ragged decode: one decode step of sequences whose lengths are spread evenly over shortest..longest, through one
``PagedKVCache.attend`` per page size, beside the same step as one ``KVCache.attend`` per sequence (the contiguous
cache), torch SDPA on the padded batch with a mask hiding the padding (what a torch user does), and a plain read of
the pages' bytes (provider read-kv), all timed in one interleaved round.

Continuous batching: ``slots`` sequences in flight; each step appends one position to every sequence and attends
all of them; a sequence that has generated its tokens leaves and a new one arrives with its prompt already cached
(prompt lengths and token counts drawn once from a seeded generator, the same schedule for every provider). The
three providers (one PagedKVCache call per step, one KVCache call per sequence, torch SDPA over the padded batch)
take their turns step by step, so that they share the machine's minutes. Timed: each step's appends and attention;
not timed: the arrivals' prompts entering a cache. Reported as generated tokens/s and K/V GB/s (the bytes of every
position attended, per step).
"""

from __future__ import annotations

import time

import numpy as np

import tvm_attn
from tvm_attn.timing import measure_interleaved

from .bandwidth import parallel_sum, reader

SHAPE = dict(heads=32, kv_heads=8, head_dim=128)  # a Llama-3-8B layer (GQA, groups of 4)
RAGGED = dict(sequences=16, shortest=64, longest=16384, page_sizes=(16, 32, 64, 128))
CONTINUOUS = dict(slots=8, shortest=64, longest=16384, steps=48, tokens=(8, 48))
PAGED = "tvm_attn PagedKVCache"
PER_SEQUENCE = "tvm_attn KVCache per sequence"
TORCH = "torch SDPA padded"
READ = "read-kv"
RAGGED_ROWS, LOOP_ROWS = "ragged decode", "continuous batching"  # the rows' distribution starts with these


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _kv_bytes(positions: int, kv_heads: int, head_dim: int) -> int:
    return positions * kv_heads * head_dim * 4 * 2  # float32 K and V


def ragged_decode(sequences: int, shortest: int, longest: int, page_sizes: tuple, heads: int, kv_heads: int,
                  head_dim: int, min_seconds: float, seed: int = 0) -> list[dict]:
    """One decode step of ``sequences`` sequences of lengths spread over shortest..longest (rows as above)."""
    rng = np.random.default_rng(seed)
    lengths = [int(n) for n in np.linspace(shortest, longest, sequences)]
    q = rng.standard_normal((sequences, heads, head_dim), np.float32)
    paged = {ps: tvm_attn.PagedKVCache(num_pages=sum(-(-n // ps) for n in lengths), page_size=ps,
                                       kv_heads=kv_heads, head_dim=head_dim) for ps in page_sizes}
    ids = {ps: [] for ps in page_sizes}
    contiguous = []
    torch = _torch()
    padded = None
    if torch is not None:
        padded = (torch.zeros(sequences, kv_heads, longest, head_dim), torch.zeros(sequences, kv_heads, longest,
                  head_dim), torch.zeros(sequences, 1, 1, longest, dtype=torch.bool))
    for i, n in enumerate(lengths):
        k = rng.standard_normal((kv_heads, n, head_dim), np.float32)
        v = rng.standard_normal((kv_heads, n, head_dim), np.float32)
        for ps, cache in paged.items():
            ids[ps].append(cache.add_sequence())
            cache.append(ids[ps][-1], k, v)
        one = tvm_attn.KVCache(batch=1, kv_heads=kv_heads, head_dim=head_dim, capacity=n)
        one.append(k[None], v[None])
        contiguous.append(one)
        if padded is not None:
            padded[0][i, :, :n], padded[1][i, :, :n], padded[2][i, ..., :n] = (torch.from_numpy(k),
                                                                              torch.from_numpy(v), True)
    out = np.empty_like(q)
    q_rows = [np.ascontiguousarray(q[i][:, None][None]) for i in range(sequences)]  # (1, heads, 1, head_dim)
    outs = [np.empty_like(r) for r in q_rows]
    fns = {}
    for ps, cache in paged.items():
        fns[(PAGED, ps)] = (lambda c=cache, s=ids[ps]: c.attend(q, s, [1] * sequences, out=out))
    fns[(PER_SEQUENCE, 0)] = lambda: [c.attend(r, out=o) for c, r, o in zip(contiguous, q_rows, outs)]
    if padded is not None:
        q_t = torch.from_numpy(q)[:, :, None]
        fns[(TORCH, 0)] = lambda: torch.nn.functional.scaled_dot_product_attention(
            q_t, padded[0], padded[1], attn_mask=padded[2], enable_gqa=True)
    pool = paged[page_sizes[0]]
    k_pool, v_pool = pool.buffers
    rows, row = reader(k_pool.nbytes)
    read_sum = parallel_sum(rows, row)
    sums = np.empty((rows, 8, 16), np.float32)
    fns[(READ, page_sizes[0])] = lambda: (read_sum(k_pool.reshape(rows, row), sums),
                                          read_sum(v_pool.reshape(rows, row), sums))
    for fn in fns.values():  # build every kernel before timing
        fn()
    _check_same(paged, ids, contiguous, q, q_rows)
    timings = measure_interleaved(fns, min_seconds=min_seconds)
    nbytes = _kv_bytes(sum(lengths), kv_heads, head_dim)
    rows_out = []
    for (provider, ps), t in timings.items():
        read = k_pool.nbytes * 2 if provider == READ else nbytes
        rows_out.append(dict(study="serving", distribution=f"{RAGGED_ROWS} {shortest}-{longest}", x_name="page_size",
                             x=ps,
                             line=f"{provider}" + (f" page_size={ps}" if provider == PAGED else ""),
                             provider=provider, variant="flash", batch=sequences, heads=heads, kv_heads=kv_heads,
                             seq_q=1, seq_kv=sum(lengths), head_dim=head_dim, causal=True,
                             median_ms=t.median_ms, q25_ms=t.q25_ms, q75_ms=t.q75_ms, repeats=t.repeats,
                             bytes_kv=read, gbs=read / t.median_ms / 1e6))
    return rows_out


def _check_same(paged, ids, contiguous, q, q_rows):
    """The providers compute the same step: every page size's output against the per-sequence caches'."""
    expected = np.concatenate([c.attend(r)[0, :, 0][None] for c, r in zip(contiguous, q_rows)])
    for ps, cache in paged.items():
        got = cache.attend(q, ids[ps], [1] * len(ids[ps]))
        if not np.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"serving study: page_size={ps} differs from the per-sequence KVCache calls by "
                               f"{np.abs(got - expected).max():.2e}")


class _Schedule:
    """Who is in flight at each step: prompt lengths and token counts drawn once, so every provider sees the same
    arrivals and departures."""

    def __init__(self, slots: int, shortest: int, longest: int, tokens: tuple, seed: int):
        self.rng = np.random.default_rng(seed)
        self.shortest, self.longest, self.tokens = shortest, longest, tokens
        self.arrivals = []  # (prompt length, tokens to generate), in arrival order

    def arrival(self, n: int) -> tuple[int, int]:
        while len(self.arrivals) <= n:
            self.arrivals.append((int(self.rng.integers(self.shortest, self.longest + 1)),
                                  int(self.rng.integers(self.tokens[0], self.tokens[1] + 1))))
        return self.arrivals[n]


class _Paged:
    name = PAGED

    def __init__(self, slots, capacity, kv_heads, head_dim):
        self.cache = tvm_attn.PagedKVCache(num_pages=slots * -(-capacity // 16), page_size=16, kv_heads=kv_heads,
                                           head_dim=head_dim)
        self.ids = [None] * slots

    def enter(self, slot, k, v):
        if self.ids[slot] is not None:
            self.cache.remove_sequence(self.ids[slot])
        self.ids[slot] = self.cache.add_sequence()
        self.cache.append(self.ids[slot], k, v)

    def step(self, k, v, q):
        for slot, seq in enumerate(self.ids):
            self.cache.append(seq, k[slot], v[slot])
        return self.cache.attend(q, self.ids, [1] * len(self.ids))


class _PerSequence:
    name = PER_SEQUENCE

    def __init__(self, slots, capacity, kv_heads, head_dim):
        self.caches = [tvm_attn.KVCache(batch=1, kv_heads=kv_heads, head_dim=head_dim, capacity=capacity)
                       for _ in range(slots)]

    def enter(self, slot, k, v):
        self.caches[slot].truncate(0)
        self.caches[slot].append(k[None], v[None])

    def step(self, k, v, q):
        outs = []
        for slot, cache in enumerate(self.caches):
            cache.append(k[slot][None], v[slot][None])
            outs.append(cache.attend(np.ascontiguousarray(q[slot][:, None][None]))[0, :, 0])
        return np.stack(outs)


class _TorchPadded:
    name = TORCH

    def __init__(self, slots, capacity, kv_heads, head_dim, torch):
        self.torch = torch
        self.k = torch.zeros(slots, kv_heads, capacity, head_dim)
        self.v = torch.zeros(slots, kv_heads, capacity, head_dim)
        self.lengths = [0] * slots

    def enter(self, slot, k, v):
        n = k.shape[1]
        self.k[slot, :, :n], self.v[slot, :, :n] = self.torch.from_numpy(k), self.torch.from_numpy(v)
        self.lengths[slot] = n

    def step(self, k, v, q):
        torch = self.torch
        for slot, n in enumerate(self.lengths):
            self.k[slot, :, n], self.v[slot, :, n] = torch.from_numpy(k[slot][:, 0]), torch.from_numpy(v[slot][:, 0])
            self.lengths[slot] = n + 1
        longest = max(self.lengths)
        mask = torch.arange(longest)[None, :] < torch.tensor(self.lengths)[:, None]
        out = torch.nn.functional.scaled_dot_product_attention(
            torch.from_numpy(q)[:, :, None], self.k[:, :, :longest], self.v[:, :, :longest],
            attn_mask=mask[:, None, None], enable_gqa=True)
        return out[:, :, 0].numpy()


def continuous_batching(slots: int, shortest: int, longest: int, steps: int, tokens: tuple, heads: int,
                        kv_heads: int, head_dim: int, seed: int = 0) -> list[dict]:
    """The continuous-batching loop (rows as above): one row per provider."""
    schedule = _Schedule(slots, shortest, longest, tokens, seed)
    capacity = longest + tokens[1]
    providers = [_Paged(slots, capacity, kv_heads, head_dim), _PerSequence(slots, capacity, kv_heads, head_dim)]
    torch = _torch()
    if torch is not None:
        providers.append(_TorchPadded(slots, capacity, kv_heads, head_dim, torch))
    for p in providers:  # build the kernels (cached by shape, not by cache) before the timed steps
        warm = type(p)(slots, 2, kv_heads, head_dim, *([torch] if isinstance(p, _TorchPadded) else []))
        for slot in range(slots):
            warm.enter(slot, *np.ones((2, kv_heads, 1, head_dim), np.float32))
        warm.step(np.ones((slots, kv_heads, 1, head_dim), np.float32), np.ones((slots, kv_heads, 1, head_dim),
                  np.float32), np.ones((slots, heads, head_dim), np.float32))
    rng = np.random.default_rng(seed + 1)
    lengths, left, arrived = [0] * slots, [0] * slots, 0
    seconds = {p.name: 0.0 for p in providers}
    attended = 0  # positions attended over all steps (each read once per step)
    for step in range(steps):
        for slot in range(slots):
            if left[slot] == 0:  # the slot's sequence is done (or the loop starts): the next one arrives
                prompt, left[slot] = schedule.arrival(arrived)
                arrived += 1
                k = rng.standard_normal((kv_heads, prompt, head_dim), np.float32)
                v = rng.standard_normal((kv_heads, prompt, head_dim), np.float32)
                for p in providers:
                    p.enter(slot, k, v)
                lengths[slot] = prompt
        k = rng.standard_normal((slots, kv_heads, 1, head_dim), np.float32)
        v = rng.standard_normal((slots, kv_heads, 1, head_dim), np.float32)
        q = rng.standard_normal((slots, heads, head_dim), np.float32)
        outs = {}
        for p in providers[step % len(providers):] + providers[:step % len(providers)]:  # take turns
            t0 = time.perf_counter()
            outs[p.name] = p.step(k, v, q)
            seconds[p.name] += time.perf_counter() - t0
        for name, got in outs.items():
            if not np.allclose(got, outs[PAGED], rtol=1e-4, atol=1e-5):
                raise RuntimeError(f"serving study: {name} differs from {PAGED} at step {step} by "
                                   f"{np.abs(got - outs[PAGED]).max():.2e}")
        for slot in range(slots):
            lengths[slot] += 1
            left[slot] -= 1
        attended += sum(lengths)
    nbytes = _kv_bytes(attended, kv_heads, head_dim)
    lengths = f"prompts {shortest}-{longest}, tokens {tokens[0]}-{tokens[1]}"
    return [dict(study="serving", distribution=f"{LOOP_ROWS} {lengths}", x_name="steps", x=steps, line=p.name,
                 provider=p.name, variant="flash", batch=slots, heads=heads, kv_heads=kv_heads, seq_q=1,
                 seq_kv=attended // steps, head_dim=head_dim, causal=True, repeats=steps,
                 median_ms=seconds[p.name] / steps * 1e3, tokens_per_s=slots * steps / seconds[p.name],
                 bytes_kv=nbytes, gbs=nbytes / seconds[p.name] / 1e9) for p in providers]


def serving_study(ragged: dict = RAGGED, continuous: dict = CONTINUOUS, shape: dict = SHAPE,
                  min_seconds: float = 0.5, log=None) -> list[dict]:
    """The serving study's rows: the ragged decode round, then the continuous-batching loop."""
    rows = ragged_decode(**ragged, **shape, min_seconds=min_seconds)
    for r in rows:
        if log:
            print(f"serving ragged decode {r['line']}: {r['median_ms']:.2f} ms, {r['gbs']:.1f} GB/s", file=log,
                  flush=True)
    loop = continuous_batching(**continuous, **shape)
    for r in loop:
        if log:
            print(f"serving continuous batching {r['line']}: {r['tokens_per_s']:.0f} tokens/s, {r['gbs']:.1f} GB/s",
                  file=log, flush=True)
    return rows + loop


GOALS = dict(read=0.8, torch=2.0, per_sequence=1.3, page_cost=0.05)  # issue 28's


def serving_section(rows, ctx) -> list[str]:
    """The report's part for the serving study (rows of study "serving")."""
    from .formatting import pick, ratio, table

    rs = pick(rows, study="serving")
    if not rs:
        return []
    parts = ["## Many sequences at once: PagedKVCache", ""]
    ragged = [r for r in rs if r["distribution"].startswith(RAGGED_ROWS)]
    if ragged:
        first = ragged[0]
        paged = sorted((r for r in ragged if r["provider"] == PAGED), key=lambda r: r["x"])
        base = paged[0]
        per_seq, torch_row, read = (next((r for r in ragged if r["provider"] == p), None)
                                    for p in (PER_SEQUENCE, TORCH, READ))
        parts += [f"One decode step of {int(first['batch'])} sequences of lengths spread evenly over "
                  f"{first['distribution'][len(RAGGED_ROWS) + 1:]} ({int(first['seq_kv'])} positions), "
                  f"{int(first['heads'])} query heads over {int(first['kv_heads'])} KV heads, head_dim "
                  f"{int(first['head_dim'])}, float32: one `PagedKVCache.attend` per page size; one `KVCache.attend` "
                  "per sequence (the contiguous cache); torch SDPA on the batch padded to the longest sequence with "
                  "a mask; a plain read of the pages' bytes (read-kv, page_size "
                  f"{int(base['x'])}). All timed in one interleaved round. GB/s: the K and V bytes of every position "
                  "(read-kv: of the pages) over the time.", ""]
        body = [[r["line"], f"{r['median_ms']:.3f}", f"{r['gbs']:.1f}", ratio(base, r)] for r in ragged]
        parts += [table(["", "ms", "GB/s", f"page_size={int(base['x'])} vs this"], body), ""]
        verdicts = []
        if read:
            share = read["median_ms"] / base["median_ms"]
            verdicts.append(f"{100 * share:.0f}% of the same-round read (goal >= {100 * GOALS['read']:.0f}%: "
                            f"{'met' if share >= GOALS['read'] else 'not met'})")
        if torch_row:
            got = torch_row["median_ms"] / base["median_ms"]
            verdicts.append(f"{got:.2f}x torch SDPA padded (goal >= {GOALS['torch']:g}x: "
                            f"{'met' if got >= GOALS['torch'] else 'not met'})")
        if per_seq:
            got = per_seq["median_ms"] / base["median_ms"]
            verdicts.append(f"{got:.2f}x the per-sequence KVCache calls (goal >= {GOALS['per_sequence']:g}x: "
                            f"{'met' if got >= GOALS['per_sequence'] else 'not met'})")
            costs = [f"{int(r['x'])}: {100 * (r['median_ms'] / per_seq['median_ms'] - 1):+.0f}%" for r in paged]
            worst = max(r["median_ms"] / per_seq["median_ms"] - 1 for r in paged)
            verdicts.append(f"time against the contiguous cache by page size {', '.join(costs)} (goal <= "
                            f"+{100 * GOALS['page_cost']:.0f}%: {'met' if worst <= GOALS['page_cost'] else 'not met'})")
        parts += [f"Goals (issue 28), page_size {int(base['x'])}: " + "; ".join(verdicts) + ".", ""]
    loop = [r for r in rs if r["distribution"].startswith(LOOP_ROWS)]
    if loop:
        first = loop[0]
        paged = next((r for r in loop if r["provider"] == PAGED), None)
        parts += [f"Continuous batching ({first['distribution'][len(LOOP_ROWS) + 1:]}, drawn per sequence): "
                  f"{int(first['batch'])} sequences in flight for {int(first['repeats'])} steps; each generates its "
                  "tokens, then leaves, and the next arrives with its prompt already cached (not timed). A step "
                  f"appends one position to every sequence and attends all of them ({int(first['seq_kv'])} "
                  "positions on average); the providers take turns step by step and their outputs are checked "
                  "against each other at every step.", ""]
        body = [[r["line"], f"{r['tokens_per_s']:.0f}", f"{r['median_ms']:.2f}", f"{r['gbs']:.2f}",
                 ratio(paged, r)] for r in loop]
        parts += [table(["", "tokens/s", "ms per step", "GB/s", "PagedKVCache vs this"], body), ""]
    return parts
