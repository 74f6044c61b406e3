"""Hand schedules, one module per variant, each finding blocks by the names its compute definition gives.

Every schedule samples its knobs (``sample_categorical``), so the same function is the variant's default
schedule and a MetaSchedule design space.
"""

from . import byte_products, float16_products, pair_products


def register_tensor_intrinsics(isa_class: str | None = None) -> None:
    """Register the tensor intrinsics the schedules tensorize with for targets of ``isa_class`` (None: every ISA).
    Each module registers its own when a schedule first asks for it (parsing them all takes ~3 s, at import it was
    most of ``import tvm_attn``); MetaSchedule's database parses its records' traces, which name them, when it
    loads, so ``tuning.open_database`` registers the target's first."""
    pair_products.register_intrinsics(isa_class)
    for module in (byte_products, float16_products):
        if isa_class is None or isa_class in module.ISA_CLASSES:
            module.register_intrinsics()
