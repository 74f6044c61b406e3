"""The registry of attention variants that tune, bench, export and the tests all iterate."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import numpy as np

from .. import references as _ref
from ..schedules import blas_prefill as _blas_prefill_schedule
from ..schedules import bounded as _bounded_schedule
from ..schedules import decode as _decode_schedule
from ..schedules import flash as _flash_schedule
from ..schedules import pruned as _pruned_schedule
from ..schedules import sme_prefill as _sme_prefill_schedule
from ..schedules import standard as _standard_schedule
from ..schedules import tree_split as _tree_split_schedule
from ..schedules.byte_products import has_byte_products
from ..schedules.float16_products import has_float16_products
from ..schedules.pair_products import has_pair_products
from ..targets import capabilities
from ..spec import KNOBS, AttentionSpec
from . import blas_prefill, bounded, decode, flash, pruned, sme_prefill, standard, tree_split


# shadow: the kernel KVCache.attend runs over the cache's shadow of K; tree: the dense variants' kernel for draft
# trees of TREE_KERNEL_MIN_ROWS..TREE_DECODE_MAX_ROWS nodes (variants/tree_split.py)
PATHS = ("prefill", "decode", "shadow", "tree")
DECODE_MAX_ROWS = 8  # calls with at most this many query rows (seq_q) take a variant's decode kernel
# Draft trees of up to this many nodes take the dense variants' split-KV kernels (kernel.build): the decode kernel,
# and from TREE_KERNEL_MIN_ROWS nodes on the tree kernel, whose row tiles hold 16 nodes' rows (it computes them all:
# with fewer nodes the decode kernel, which walks the keys once per node, is faster). Measured here (Zen 4, 8192
# cached positions, float32, one interleaved round each): the tree kernel against the decode kernel took 0.74x (GQA
# 32/8 D128) and 0.73x (MHA 32 D128) at 16 nodes, 0.94x (MHA) at 12, 1.17x (MHA) and 1.13x (GQA) at 9.
TREE_DECODE_MAX_ROWS = 16
TREE_KERNEL_MIN_ROWS = 12


def path_for(seq_q: int) -> str:
    """Which kernel of a variant serves ``seq_q`` query rows: "decode" for a few, "prefill" for more."""
    return "decode" if seq_q <= DECODE_MAX_ROWS else "prefill"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One attention variant: its compute definition, hand schedule and float64 reference, and optionally a second
    compute and schedule for decode (few query rows). Both kernels compute the same function and serve every
    length; the decode one is organized for few rows."""

    name: str
    summary: str
    compute: Callable  # KernelSpec -> tvm PrimFunc (batch and lengths are run-time sizes)
    schedule: Callable  # (tvm.s_tir.Schedule, tvm Target) -> None; also a MetaSchedule design space
    reference: Callable[..., np.ndarray]  # (AttentionSpec, q, k, v) -> float64 output
    knob: str | None = None  # the AttentionSpec field this variant requires
    keep: Callable | None = None  # pruned variants: (AttentionSpec, q, k) -> bool mask of the keys kept
    decode_compute: Callable | None = None  # as compute, for few query rows (None: compute serves decode too)
    decode_schedule: Callable | None = None
    # A compute reading the int8 shadow of K a KVCache keeps, (q, k, v, codes, lo, step, [sinks,] [tree,] out): what
    # KVCache.attend runs, reading full K and V rows only for the keys the bounds cannot rule out.
    shadow_compute: Callable | None = None
    shadow_schedule: Callable | None = None
    # The result depends on where K's blocks start (the shadow's, from key 0): windowed calls pass every key rather
    # than only those from the first one a query sees.
    blocks_from_key0: bool = False
    # The dense variants' kernel for draft trees of TREE_KERNEL_MIN_ROWS..TREE_DECODE_MAX_ROWS nodes (path "tree").
    tree_compute: Callable | None = None
    tree_schedule: Callable | None = None
    # Paths whose compute takes pairs=True: bfloat16 matmuls in pair products (schedules/pair_products.py) on
    # targets that have them.
    pair_paths: frozenset = frozenset()
    # Paths whose compute takes float16_products=True: float16 QK^T in NEON fmlal (schedules/float16_products.py)
    # on targets that have it.
    float16_product_paths: frozenset = frozenset()
    # Paths whose compute reads integer K and V (KernelSpec.kv_dtype, tvm_attn/quantized_kv.py) as codes and row
    # scales, (q, k, v, k_scale, v_scale, out): what an integer KVCache runs (it dequantizes for the other kernels).
    integer_kv_paths: frozenset = frozenset()
    # Dense prefill with its tiles' matmuls in a BLAS (schedule="blas"): (KernelSpec, blas.Blas) -> PrimFunc.
    blas_compute: Callable | None = None
    blas_schedule: Callable | None = None
    # Dense prefill with its tiles' matmuls as Arm SME outer products (schedule="sme"): KernelSpec -> IRModule.
    sme_compute: Callable | None = None
    sme_schedule: Callable | None = None
    # Whether the kernels of compute and decode_compute apply AttentionSpec.softcap (logit softcapping).
    softcap: bool = False
    # Whether the kernels of compute and decode_compute take sink logits (AttentionSpec.sinks).
    sinks: bool = False
    # Whether the kernels of compute and decode_compute add ALiBi biases (AttentionSpec.alibi_slopes).
    alibi: bool = False
    # Whether the kernels of compute and decode_compute take a tree mask (AttentionSpec.tree_parents).
    tree: bool = False

    def kernel_parts(self, path: str) -> tuple[Callable, Callable]:
        """(compute, schedule) of the kernel serving ``path`` ("prefill", "decode", "shadow" or "tree")."""
        if path not in PATHS:
            raise ValueError(f"unknown path {path!r}: use one of {', '.join(PATHS)}")
        if path == "decode" and self.decode_compute is not None:
            return self.decode_compute, self.decode_schedule
        if path == "tree":
            if self.tree_compute is None:
                raise ValueError(f"variant {self.name!r} has no kernel for draft trees")
            return self.tree_compute, self.tree_schedule
        if path == "shadow":
            if self.shadow_compute is None:
                raise ValueError(f"variant {self.name!r} has no kernel reading the shadow of K")
            return self.shadow_compute, self.shadow_schedule
        return self.compute, self.schedule

    def computes_in_pairs(self, path: str, kspec, target) -> bool:
        """Whether the kernel serving ``path`` for ``kspec`` on ``target`` computes in bfloat16 pair products."""
        return path in self.pair_paths and kspec.kv_dtype is None and uses_pair_products(kspec, target)

    def computes_in_float16_products(self, path: str, kspec, target) -> bool:
        """Whether the kernel serving ``path`` for ``kspec`` on ``target`` computes float16 products unwidened."""
        return (path in self.float16_product_paths and kspec.kv_dtype is None
                and uses_float16_products(kspec, target))

    def computes_in_byte_products(self, path: str, kspec, target) -> bool:
        """Whether the kernel serving ``path`` for ``kspec`` on ``target`` computes q . K's integer codes in byte
        dot products."""
        return path in self.integer_kv_paths and uses_byte_products(kspec, target)

    def compute_for(self, path: str, kspec, target):
        """The PrimFunc of the kernel serving ``path`` for ``kspec`` on ``target`` (generic over batch and
        lengths): in 16-bit products (bfloat16 pairs, float16 lanes) or byte products (integer K) where the target
        has them and this path computes that way."""
        compute, _ = self.kernel_parts(path)
        if self.computes_in_pairs(path, kspec, target):
            return _parsed(compute, kspec, "pairs")
        if self.computes_in_float16_products(path, kspec, target):
            return _parsed(compute, kspec, "float16_products")
        if self.computes_in_byte_products(path, kspec, target):
            return _parsed(compute, kspec, "byte_products")
        return _parsed(compute, kspec, None)

    def has_decode_kernel(self) -> bool:
        return self.decode_compute is not None

    def path_of(self, spec: AttentionSpec) -> str:
        """Which kernel of this variant serves ``spec``: ``path_for(spec.seq_q)``, the decode kernel where the
        variant has none, and for draft trees of up to TREE_DECODE_MAX_ROWS nodes the split-KV ones: the tree
        kernel from TREE_KERNEL_MIN_ROWS nodes, the decode kernel below."""
        return self.path_for_rows(spec.seq_q, spec.tree_parents is not None)

    def path_for_rows(self, seq_q: int, tree: bool = False) -> str:
        """``path_of`` a spec of ``seq_q`` query rows (``tree``: the rows are a draft tree's nodes)."""
        path = path_for(seq_q)
        if tree and self.tree_compute is not None and TREE_KERNEL_MIN_ROWS <= seq_q <= TREE_DECODE_MAX_ROWS:
            return "tree"
        if path == "prefill" and tree and seq_q <= TREE_DECODE_MAX_ROWS and self.decode_compute is decode.compute:
            return "decode"
        if path == "decode" and not self.has_decode_kernel():
            return "prefill"
        return path

    def check(self, spec: AttentionSpec) -> None:
        """Raise ValueError when spec sets a knob this variant does not use, or lacks the one it needs, or asks
        for softcapping, sinks, ALiBi or a tree mask the variant does not do."""
        if spec.softcap is not None and not self.softcap:
            raise ValueError(f"softcap={spec.softcap!r}: variant {self.name!r} does not apply logit softcapping "
                             f"(the variants that do: {', '.join(v.name for v in VARIANTS.values() if v.softcap)})")
        if spec.alibi_slopes is not None and not self.alibi:
            raise ValueError(f"alibi_slopes: variant {self.name!r} does not add ALiBi biases yet (the variants that "
                             f"do: {', '.join(v.name for v in VARIANTS.values() if v.alibi)})")
        if spec.sinks and not self.sinks:
            raise ValueError(f"sinks: variant {self.name!r} does not take attention sinks yet (the variants that do: "
                             f"{', '.join(v.name for v in VARIANTS.values() if v.sinks)})")
        if spec.tree_parents is not None and not self.tree:
            raise ValueError(f"tree_parents: variant {self.name!r} does not take tree masks yet (the variants that "
                             f"do: {', '.join(v.name for v in VARIANTS.values() if v.tree)})")
        for knob in KNOBS:
            value = getattr(spec, knob)
            if knob == self.knob and value is None:
                raise ValueError(f"variant {self.name!r} needs {knob}=..., got {knob}=None")
            if knob != self.knob and value is not None:
                raise ValueError(f"{knob}={value!r} is only used by variant {variant_using(knob)}, not "
                                 f"{self.name!r}")


@functools.lru_cache(maxsize=1024)
def _parsed(compute: Callable, kspec, products: str | None):
    """compute(kspec), with ``products``=True when given, once per process (PrimFuncs are immutable): TVMScript takes
    0.1-0.3 s to parse a kernel, and a build asks for its PrimFunc up to three times (the keys of its tuning record
    and its BLAS choice, then the schedule)."""
    return compute(kspec, **({products: True} if products else {}))


def uses_pair_products(kspec, target) -> bool:
    """Whether the bfloat16 kernels of ``kspec`` compute in pair products on ``target`` (None: the host): where it
    has them and the head dim is whole steps of the decode kernel's partial dot products (2 x 16 dims; prefill's
    P V needs whole vectors)."""
    return (kspec.dtype == "bfloat16" and kspec.head_dim % (2 * decode.LANES) == 0
            and has_pair_products(capabilities(target if target is not None else "host")))


def uses_float16_products(kspec, target) -> bool:
    """Whether the float16 kernels of ``kspec`` compute float16 products unwidened on ``target`` (None: the host):
    where it has them (NEON fmlal) and the head dim is whole steps of the decode kernel's partial dot products."""
    return (kspec.dtype == "float16" and kspec.head_dim % decode.LANES == 0
            and has_float16_products(capabilities(target if target is not None else "host")))


def uses_byte_products(kspec, target) -> bool:
    """Whether the kernels of ``kspec`` reading integer K compute q . codes in byte dot products on ``target``
    (None: the host): where it has them (NEON sdot) and the head dim is whole words of them."""
    return (kspec.kv_dtype is not None and kspec.head_dim % decode.WORD == 0
            and kspec.head_dim <= decode.MAX_BYTE_HEAD_DIM
            and has_byte_products(capabilities(target if target is not None else "host")))


def integer_kv_variants() -> list[str]:
    """The variants with a kernel reading integer K and V."""
    return [v.name for v in VARIANTS.values() if v.integer_kv_paths]


def variant_using(knob: str) -> str:
    """The variants whose pruning knob is ``knob``, quoted for messages: "'topk'", "'mass' or 'bounded'"."""
    return " or ".join(repr(v.name) for v in VARIANTS.values() if v.knob == knob)


def _on_scores(keep):
    """A keep rule of the scores as a keep rule of (spec, q, k)."""
    return lambda spec, q, k: keep(spec, _ref.scores(spec, q, k))


# The dense variants compute one function: their decode calls share the split-KV kernel, and their prefill the
# BLAS-backed one (schedule="blas") and the SME one (schedule="sme").
DENSE = dict(decode_compute=decode.compute, decode_schedule=_decode_schedule.schedule,
             float16_product_paths=frozenset({"decode"}), integer_kv_paths=frozenset({"decode"}),
             blas_compute=blas_prefill.compute, blas_schedule=_blas_prefill_schedule.schedule,
             sme_compute=sme_prefill.compute, sme_schedule=_sme_prefill_schedule.schedule,
             tree_compute=tree_split.compute, tree_schedule=_tree_split_schedule.schedule, softcap=True, sinks=True,
             alibi=True, tree=True)
PRUNED_DECODE = dict(decode_compute=pruned.compute_decode, decode_schedule=_pruned_schedule.schedule, softcap=True,
                     sinks=True, alibi=True, tree=True)
# Kernels reading a KVCache's shadow of K (variants/bounded.py): bounded's only cache kernel, top-k's and threshold's
# at decode. They take softcapping, sinks, ALiBi and tree masks as the other kernels do.
SHADOW = dict(shadow_compute=bounded.compute_shadow, shadow_schedule=_bounded_schedule.schedule)

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("standard", "softmax(scale q k^T) v with the score matrix materialized",
                standard.compute, _standard_schedule.schedule, _ref.dense, **DENSE,
                pair_paths=frozenset({"decode", "tree"})),
        Variant("flash", "blocked online softmax over KV tiles, no score matrix",
                flash.compute, _flash_schedule.schedule, _ref.dense, **DENSE,
                pair_paths=frozenset({"prefill", "decode", "tree"})),
        Variant("mqa", "flash whose row tiles stack the query heads of a KV group (multi-/grouped-query)",
                flash.compute_grouped, _flash_schedule.schedule, _ref.dense, **DENSE,
                pair_paths=frozenset({"prefill", "decode", "tree"})),
        Variant("threshold", "softmax weights below threshold dropped (largest kept), renormalized",
                pruned.compute, _pruned_schedule.schedule, _ref.threshold, knob="threshold",
                keep=_on_scores(_ref.threshold_keep), **PRUNED_DECODE, **SHADOW),
        Variant("topk", "softmax over the top_k largest scores of each row",
                pruned.compute, _pruned_schedule.schedule, _ref.topk, knob="top_k",
                keep=_on_scores(_ref.topk_keep), **PRUNED_DECODE, **SHADOW),
        Variant("mass", "the fewest largest weights holding 1 - eps of each row's softmax mass, renormalized",
                pruned.compute, _pruned_schedule.schedule, _ref.mass, knob="eps",
                keep=_on_scores(_ref.mass_keep), **PRUNED_DECODE),
        Variant("bounded", "a set of keys certified from an int8 shadow of K to hold >= 1 - eps of each row's "
                "softmax mass, renormalized (|out - dense| <= 2 eps max|v|)",
                bounded.compute, _bounded_schedule.schedule, _ref.bounded, knob="eps", keep=_ref.bounded_keep,
                **SHADOW, blocks_from_key0=True, softcap=True, sinks=True, alibi=True, tree=True),
    )
}


def get_variant(name: str) -> Variant:
    """The registered variant called ``name``; ValueError naming the known ones otherwise."""
    if isinstance(name, Variant):
        return name
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown variant {name!r}: use one of {', '.join(VARIANTS)}") from None
