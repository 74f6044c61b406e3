"""python -m tvm_attn.bench: the seed report's questions answered with measurements anyone can repeat."""

import os

# The providers' thread pools (TVM's, torch's OpenMP, numpy's OpenBLAS) share the cores. A pool that busy-waits after
# its call holds a core the next library's parallel region needs, and that call then waits for a scheduler tick:
# measured here, flash at seq 256 took 4.0 ms interleaved with torch and numpy against 2.0 ms alone. Idle workers
# that sleep at once make interleaved equal alone. Set before any of the libraries loads; a caller's values win.
PASSIVE_THREAD_POOLS = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4", "TVM_THREAD_POOL_SPIN_COUNT": "0"}
for _name, _value in PASSIVE_THREAD_POOLS.items():
    os.environ.setdefault(_name, _value)
