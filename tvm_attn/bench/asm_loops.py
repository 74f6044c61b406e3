"""Loops of generated assembly (x86-64 AT&T and AArch64, ELF or Mach-O): the micro-kernel loops, found by their
FMAs, and the vector registers they move to or from the stack (spills)."""

from __future__ import annotations

import dataclasses
import re

_LABEL = re.compile(r"^(\.?L\w+):")
_X86_JUMP = re.compile(r"^\s+j[a-z]+\s+(\.?L\w+)\s*$")
_ARM_BRANCH = re.compile(r"^\s+(?:b(?:\.\w+)?|cbn?z|tbn?z)\s+(?:[^,]+,\s*)*(\.?L\w+)\s*$")
# Vector multiply-accumulates: float FMAs and dot products (bfloat16 pairs, int8 words).
_X86_FMA = re.compile(r"^\s+(?:vfn?m(?:add|sub)\d+[ps]s|vdpbf16ps|vpdpbusd)\s+.*%[xyz]mm")
# Apple's syntax puts the arrangement on the mnemonic (fmla.4s v0, v1, v2), the generic one on the operands.
_ARM_FMA = re.compile(r"^\s+(?:fmla|fmls|bfdot|bfmmla|bfmlal[bt]|fmlal2?|fdot|sdot|smmla)(?:\.\w+)?\s+v\d+")
_X86_STACK_VECTOR = re.compile(r"%[xyz]mm\d+.*\((?:%rsp|%rbp)\)|\((?:%rsp|%rbp)\).*%[xyz]mm\d+")
_ARM_STACK_VECTOR = re.compile(r"^\s+(?:ldr|str|ldp|stp|ldur|stur)(?:\.\w+)?\s+(?:[qd]\d+|v\d+)[^\[]*\[(?:sp|x29)\b")


@dataclasses.dataclass(frozen=True)
class Loop:
    start: int  # line of the loop's label
    end: int  # line of the backward branch
    lines: tuple[str, ...]
    fmas: int
    spills: tuple[str, ...]  # vector moves to or from the stack inside the loop

    @property
    def stack_stores(self) -> tuple[str, ...]:
        """The spills that write a vector register to the stack: x86 ``vmovups %ymm1, 32(%rsp)`` (AT&T: the
        destination last), AArch64 ``str q0, [sp, #16]`` / ``stp`` / ``stur``. (Loads alone may read stack buffers
        such as a kernel's q rows.)"""
        return tuple(s for s in self.spills if _is_store(s))

    @property
    def instructions(self) -> tuple[str, ...]:
        """The loop's instructions: its label, directives and comments left out."""
        return tuple(line.strip() for line in self.lines if line.strip()
                     and not line.strip().startswith((".", "//", ";", "#")) and not line.rstrip().endswith(":"))


def _is_store(instruction: str) -> bool:
    mnemonic, operands = (instruction.split(None, 1) + [""])[:2]
    if mnemonic.startswith(("str", "stp", "stur")):
        return True
    return mnemonic.startswith("v") and operands.rstrip().endswith(("(%rsp)", "(%rbp)"))


def loops(asm: str) -> list[Loop]:
    """Every loop (a branch back to an earlier label) of ``asm`` that contains no other loop."""
    text = asm.splitlines()
    x86 = any(_X86_JUMP.match(line) for line in text)
    branch, fma, stack = (_X86_JUMP, _X86_FMA, _X86_STACK_VECTOR) if x86 else (_ARM_BRANCH, _ARM_FMA, _ARM_STACK_VECTOR)
    labels: dict[str, int] = {}
    spans = []
    for number, line in enumerate(text):
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = number
        jump = branch.match(line)
        if jump and jump.group(1) in labels:
            spans.append((labels[jump.group(1)], number))
    innermost = [(s, e) for s, e in spans if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in spans)]
    found = []
    for s, e in innermost:
        body = tuple(text[s:e + 1])
        found.append(Loop(s, e, body, sum(bool(fma.match(line)) for line in body),
                          tuple(line.strip() for line in body if stack.search(line))))
    return found


def micro_kernel_loops(asm: str, min_fmas: int = 8) -> list[Loop]:
    """The innermost loops with at least ``min_fmas`` vector FMAs: the register-blocked micro-kernels."""
    return [loop for loop in loops(asm) if loop.fmas >= min_fmas]
