"""Runs inside the emulated aarch64 Python (`.ci/arm64-env`), driven by tests/arm64_emulation.py: calls kernels
cross-compiled for arm64 on the arguments the host saved, and saves what they wrote. Needs numpy, ml_dtypes,
apache-tvm-ffi and the aarch64 libtvm_runtime.so ($TVM_ATTN_ARM64_RUNTIME); never the TVM compiler.

    python arm64_runner.py JOBS_DIR

JOBS_DIR/jobs.json lists calls {"name", "library", "arguments": [{"file", "dtype", "offset", "shape", "strides"}],
"outputs": [argument indices]}: each argument is a view (element offset, shape and strides) of the buffer saved in
"file" as raw bytes, so strided views of a cache's buffers reach the kernel as they do on the host. The outputs of
call NAME are saved as JOBS_DIR/NAME.npz (out0, out1, ...).
"""

import ctypes
import importlib.util
import json
import os
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import tvm_ffi

# tvm_attn/runtime.py (stdlib and numpy only) passes bfloat16 arrays as the kernels' own loader does.
_spec = importlib.util.spec_from_file_location("runtime", Path(__file__).parents[1] / "tvm_attn" / "runtime.py")
runtime = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runtime)


def argument(jobs_dir: Path, desc: dict) -> np.ndarray:
    raw = np.fromfile(jobs_dir / desc["file"], dtype=np.uint8)
    dtype = np.dtype(ml_dtypes.bfloat16) if desc["dtype"] == "bfloat16" else np.dtype(desc["dtype"])
    start = desc["offset"] * dtype.itemsize
    return np.lib.stride_tricks.as_strided(raw[start:].view(dtype), shape=desc["shape"],
                                           strides=[s * dtype.itemsize for s in desc["strides"]])


def main(jobs_dir: Path) -> None:
    ctypes.CDLL(os.environ["TVM_ATTN_ARM64_RUNTIME"], ctypes.RTLD_GLOBAL)
    if (jobs_dir / "support.so").exists():  # tests/arm64_emulation.py: SME_SUPPORT
        ctypes.CDLL(str(jobs_dir / "support.so"), ctypes.RTLD_GLOBAL)
    modules = {}
    jobs = json.loads((jobs_dir / "jobs.json").read_text())
    for job in jobs:
        if job["library"] not in modules:
            modules[job["library"]] = tvm_ffi.load_module(str(jobs_dir / job["library"]))
        args = [argument(jobs_dir, desc) for desc in job["arguments"]]
        print(f"calling {job['name']}", file=sys.stderr, flush=True)  # the last one names a call that crashed
        modules[job["library"]][job["function"]](*map(runtime.dlpack_argument, args))
        outputs = {f"out{i}": np.ascontiguousarray(args[n]) for i, n in enumerate(job["outputs"])}
        # bfloat16 leaves as its bits (np.savez cannot store ml_dtypes' dtype)
        np.savez(jobs_dir / f"{job['name']}.npz",
                 **{k: a.view(np.uint16) if a.dtype.name == "bfloat16" else a for k, a in outputs.items()})
    print(f"ran {len(jobs)} calls of {len(modules)} libraries")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
