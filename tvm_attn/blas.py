"""The BLAS library that kernels with the "blas" schedule call for their tiles' matmuls (cblas sgemm), found when a
kernel is built and loaded into the process before it runs.

On macOS targets that is Accelerate (Apple's matrix unit on M1-M4; ``runtime.load`` opens the framework before an
exported kernel); on a Linux host the OpenBLAS that numpy's wheels ship (``numpy.libs``), or the library ``TVM_ATTN_BLAS`` names (one that
exports a CBLAS ``cblas_sgemm``: OpenBLAS, MKL's ``libmkl_rt``, BLIS). The kernels call sgemm from their own
parallel tasks, so each call must run on one thread: OpenBLAS is told so per thread
(``openblas_set_num_threads_local``), MKL and BLIS through their environment (``MKL_NUM_THREADS=1``,
``BLIS_NUM_THREADS=1``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import glob
import os

ENV = "TVM_ATTN_BLAS"
# (sgemm symbol, index dtype): ILP64 builds take 64-bit sizes. numpy's scipy-openblas64 prefixes its CBLAS names.
_SGEMMS = (("scipy_cblas_sgemm64_", "int64"), ("cblas_sgemm64_", "int64"), ("scipy_cblas_sgemm", "int32"),
           ("cblas_sgemm", "int32"))
_THREADS_LOCAL = "openblas_set_num_threads_local"  # OpenBLAS >= 0.3.27: the calling thread's thread count
_CONFIG = ("scipy_openblas_get_config64_", "scipy_openblas_get_config", "openblas_get_config64_",
           "openblas_get_config")


@dataclasses.dataclass(frozen=True)
class Blas:
    """A CBLAS library: where it is, its sgemm symbol and size type, how a call is kept on one thread."""

    name: str  # what it is, for reports: "OpenBLAS 0.3.31 ... (numpy.libs/libscipy_openblas64_...so)"
    path: str  # the library loaded before the kernel runs
    sgemm: str
    index_dtype: str  # "int32" (LP64) or "int64" (ILP64)
    threads_local: str | None = None  # a function(int) setting the calling thread's BLAS threads

    def load(self) -> None:
        """Make the library's symbols visible to kernels compiled in this process (and to exported ones loaded
        after it)."""
        _load_global(self.path)


ACCELERATE = Blas("Accelerate (Apple's BLAS: the matrix unit on M1-M4)",
                  "/System/Library/Frameworks/Accelerate.framework/Accelerate", "cblas_sgemm", "int32")


@functools.lru_cache(maxsize=None)
def _load_global(path: str) -> ctypes.CDLL:
    return ctypes.CDLL(path, mode=os.RTLD_GLOBAL)


def describe(path: str) -> Blas:
    """The Blas of the library file ``path``; ValueError naming it when it cannot be loaded or exports no sgemm."""
    where = os.path.abspath(path) if os.sep in path else path  # a bare name: the dynamic loader's search
    try:
        lib = _load_global(where)
    except OSError as err:
        raise ValueError(f"BLAS library {path!r} cannot be loaded: {err}") from None
    found = next(((sym, dtype) for sym, dtype in _SGEMMS if hasattr(lib, sym)), None)
    if found is None:
        raise ValueError(f"{path} exports no CBLAS sgemm (looked for {', '.join(s for s, _ in _SGEMMS)})")
    name = os.path.basename(path)
    config = next((getattr(lib, sym) for sym in _CONFIG if hasattr(lib, sym)), None)
    if config is not None:  # OpenBLAS: version, build options and the kernels it runs (OPENBLAS_CORETYPE)
        config.restype = ctypes.c_char_p
        name = f"{' '.join(config().decode().split())} ({name})"
    return Blas(name, where, found[0], found[1],
                _THREADS_LOCAL if hasattr(lib, _THREADS_LOCAL) else None)


@functools.lru_cache(maxsize=None)
def host_blas() -> Blas | None:
    """This process's BLAS for kernels built for the host: ``TVM_ATTN_BLAS``, else numpy's OpenBLAS, else None."""
    if os.environ.get(ENV):
        return describe(os.environ[ENV])
    import numpy

    bundled = sorted(glob.glob(os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs",
                                            "lib*openblas*.so*")))
    return describe(bundled[0]) if bundled else None


def for_target(target) -> Blas:
    """The BLAS a "blas" kernel for ``target`` calls: Accelerate for macOS, this host's for a Linux target of
    its architecture; ValueError otherwise."""
    from .targets import capabilities, resolve_target, target_key, target_os

    t = resolve_target(target)
    if target_os(t) == "macos":
        return ACCELERATE
    if target_os(t) == "linux" and capabilities(t).arch == capabilities("host").arch:
        found = host_blas()
        if found is None:
            raise ValueError(f"no BLAS for the 'blas' schedule on this host: numpy ships none here; set {ENV} to a "
                             f"library exporting cblas_sgemm (OpenBLAS, MKL's libmkl_rt, BLIS)")
        return found
    raise ValueError(f"the 'blas' schedule has no BLAS for target {target_key(t)}: it builds for macOS "
                     f"(Accelerate) and for Linux on this host's architecture (numpy's OpenBLAS or {ENV})")
