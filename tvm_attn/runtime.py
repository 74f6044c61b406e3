"""Load kernels exported by `python -m tvm_attn.export`, with apache-tvm-ffi and numpy only.

    import tvm_attn.runtime
    kernel = tvm_attn.runtime.load("kernels/attn_flash_b2_h8_kv8_q512_k512_d64_f32_x86_64-znver4.so")
    out = kernel(q, k, v)          # numpy in, numpy out; torch tensors in, a torch tensor out (via DLPack)

Kernels take float32, float16 or bfloat16 (the manifest's ``dtype``; bfloat16 numpy arrays are ml_dtypes').

This module never imports `tvm` (the compiler): a program that only runs kernels needs `apache-tvm-ffi`, numpy and
the TVM runtime library shipped next to the kernel (`libtvm_runtime.so` / `.dylib`), which parallel kernels and
kernels with scratch memory call into for their thread pool and workspace.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

MANIFEST_FORMAT = "tvm_attn.kernel/1"
ALIGNMENT_BYTES = 4  # the kernels assume element alignment only (manifests of older exports may say 64)
ARGUMENTS = ("q", "k", "v")


class ManifestError(ValueError):
    """A manifest that is missing, unreadable, or describes a kernel this machine cannot run."""


def _manifest_path(path: Path) -> Path:
    if path.suffix == ".json":
        return path
    return path.with_name(path.name[: -len(path.suffix)] + ".json") if path.suffix else path.with_suffix(".json")


def read_manifest(path) -> dict:
    """The manifest of an exported kernel, given the library or the manifest itself."""
    manifest_path = _manifest_path(Path(path))
    if not manifest_path.exists():
        raise ManifestError(f"no manifest {manifest_path}: export kernels with python -m tvm_attn.export, which "
                            f"writes <name>.json next to the library")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{manifest_path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{manifest_path} is not a tvm_attn kernel manifest (format {MANIFEST_FORMAT!r})")
    manifest["_dir"] = str(manifest_path.parent)
    return manifest


def _host_platform() -> tuple[str, str]:
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "aarch64": "arm64"}.get(machine, machine)
    return arch, sys.platform


def _host_cpu_flags() -> set[str] | None:
    """The CPU's feature flags as Linux names them (None where they cannot be read): /proc/cpuinfo's "flags" (x86)
    or "Features" (arm64) line; on macOS the FEAT_ names under sysctl hw.optional.arm, lower-cased without FEAT_
    (FEAT_SME: "sme")."""
    if sys.platform == "darwin":
        try:
            listing = subprocess.run(["sysctl", "hw.optional.arm"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        return {name.rsplit(".FEAT_", 1)[1].lower() for name, _, value in
                (line.partition(": ") for line in listing.splitlines()) if ".FEAT_" in name and value.strip() == "1"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def check_runs_here(manifest: dict) -> None:
    """Raise ManifestError when the kernel was built for another architecture, OS or CPU features."""
    target = manifest["target"]
    arch, os_name = _host_platform()
    if target["arch"] != arch or target["os"] != os_name:
        raise ManifestError(f"kernel {manifest['name']} was built for {target['key']} ({target['arch']}, "
                            f"{target['os']}); this machine is {arch}, {os_name}: export it for this machine's target")
    flags = _host_cpu_flags()
    missing = [f for f in target.get("cpu_features", []) if flags is not None and f not in flags]
    if missing:
        raise ManifestError(f"kernel {manifest['name']} needs CPU features {', '.join(missing)} that this CPU lacks: "
                            f"export it for this machine's target")


_runtime_loaded: dict[str, ctypes.CDLL] = {}


def _installed_tvm() -> str | None:
    try:
        return importlib.metadata.version("apache-tvm")
    except importlib.metadata.PackageNotFoundError:
        return None


def _runtime_library(manifest: dict) -> Path | None:
    """The TVM runtime library: an installed apache-tvm's (found, not imported), else the one next to the kernel."""
    name = manifest.get("runtime_library")
    if not name:
        return None
    # An installed apache-tvm's own copy comes first: `import tvm` later in the process then reuses the loaded
    # library, where a second copy would register TVM's global functions twice and abort the process.
    candidates = []
    spec = importlib.util.find_spec("tvm")  # locates the package without executing it
    if spec is not None and spec.submodule_search_locations and _installed_tvm() == manifest["versions"]["tvm"]:
        candidates += [Path(p) / "lib" / name for p in spec.submodule_search_locations]
    candidates.append(Path(manifest["_dir"]) / name)
    for path in candidates:
        if path.exists():
            return path
    raise ManifestError(f"kernel {manifest['name']} needs the TVM runtime library {name} (thread pool, workspace); "
                        f"looked in {', '.join(str(c) for c in candidates)}. Export with python -m tvm_attn.export "
                        f"(it ships the library for the host), or copy {name} of apache-tvm "
                        f"{manifest['versions']['tvm']} next to the kernel")


def _load_runtime(path: Path) -> None:
    # RTLD_GLOBAL: the kernel's TVMBackend* calls resolve against it when the kernel library is loaded.
    key = str(path.resolve())
    if key not in _runtime_loaded:
        _runtime_loaded[key] = ctypes.CDLL(key, mode=ctypes.RTLD_GLOBAL)


@functools.lru_cache(maxsize=None)
def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a kernel dtype name: float32, float16, or bfloat16 (ml_dtypes.bfloat16)."""
    if name == "bfloat16":
        import ml_dtypes  # a dependency of apache-tvm; only bfloat16 users need it here

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


_DL_UINT, _DL_BFLOAT = 1, 4  # DLDataTypeCode values
_DTYPE_OFFSET = 20  # of DLTensor.dtype in a DLManagedTensor: data (8 bytes), device (8), ndim (4)
# Our own prototype of PyCapsule_GetPointer (setting restype on ctypes.pythonapi's would change it for everyone).
_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))


def dlpack_argument(array):
    """``array`` (numpy, or a torch tensor: passed as it is) as a kernel argument without a copy. numpy exports every
    dtype the kernels take through DLPack except bfloat16 (ml_dtypes' is not a dtype numpy knows): such arrays go as
    the DLPack export of their uint16 view, relabelled bfloat16."""
    if not isinstance(array, np.ndarray) or array.dtype.kind == "f" or array.dtype.name != "bfloat16":
        return array  # torch tensors export bfloat16 themselves; kind before .name: .name is slow
    import tvm_ffi

    capsule = array.view(np.uint16).__dlpack__()  # no max_version: the unversioned "dltensor" capsule
    dtype = (ctypes.c_uint8 * 2).from_address(_capsule_pointer(capsule, b"dltensor") + _DTYPE_OFFSET)
    if (dtype[0], dtype[1]) != (_DL_UINT, 16):
        raise RuntimeError(f"numpy's DLPack export of a uint16 array has dtype code {dtype[0]}, bits {dtype[1]}: "
                           f"this numpy lays DLPack out differently; pass bfloat16 as torch tensors instead")
    dtype[0] = _DL_BFLOAT
    return tvm_ffi.from_dlpack(capsule)


def aligned_empty(shape, dtype, alignment: int) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on an ``alignment``-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    offset = (-raw.ctypes.data) % alignment
    return raw[offset: offset + nbytes].view(dtype).reshape(shape)


def file_sha256(path) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_overlap(out: np.ndarray, inputs: dict) -> None:
    """ValueError when ``out`` shares memory with one of ``inputs`` ({name: array}): the kernels read the inputs
    while they write out."""
    for name, x in inputs.items():
        if np.may_share_memory(out, x):
            raise ValueError(f"out overlaps {name}: the kernel reads {name} while it writes out; pass an out of its "
                             f"own")


class ExportedKernel:
    """An exported attention kernel: call it as kernel(q, k, v) or kernel(q, k, v, out=out)."""

    def __init__(self, manifest: dict, function):
        self.manifest = manifest
        self.name = manifest["name"]
        self._function = function
        self._args = {a["name"]: a for a in manifest["arguments"]}
        # Never below the element alignment every kernel is built for: a manifest claiming less would make us pass
        # buffers the kernel cannot read.
        element = numpy_dtype(self._args["out"]["dtype"]).itemsize
        self.alignment = max(int(manifest["alignment_bytes"]), element)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self._args["out"]["shape"])

    def __repr__(self) -> str:
        return f"ExportedKernel({self.name!r}, schedule={self.manifest['schedule']!r})"

    def _prepare(self, name: str, array, *, writable: bool = False) -> np.ndarray:
        arg = self._args[name]
        if not hasattr(array, "shape") or not hasattr(array, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(array).__name__}")
        if not isinstance(array, np.ndarray):
            array = numpy_view(array)  # torch and other DLPack producers: a zero-copy view on the CPU
        if tuple(array.shape) != tuple(arg["shape"]):
            raise ValueError(f"{name} has shape {tuple(array.shape)}, kernel {self.name} takes {tuple(arg['shape'])}")
        if array.dtype != numpy_dtype(arg["dtype"]):
            raise TypeError(f"{name} is {array.dtype}, kernel {self.name} takes {arg['dtype']}")
        aligned = array.flags.c_contiguous and array.ctypes.data % self.alignment == 0
        if aligned and array.flags.writeable:
            return array
        if writable:
            raise ValueError(f"out must be a writable C-contiguous array, {self.alignment}-byte aligned")
        # The manifest describes dense buffers aligned to alignment_bytes: copy the ones that are not. Read-only
        # arrays too: DLPack cannot mark a tensor read-only, so numpy refuses to export them.
        copy = aligned_empty(array.shape, array.dtype, self.alignment)
        copy[...] = array
        return copy

    def __call__(self, q, k, v, *, sinks=None, tree_parents=None, out=None):
        """Attention of q, k, v (``sinks``: the (heads,) float32 sink logits of a kernel exported with them;
        ``tree_parents``: the parent of each query row's node, for a kernel exported with a tree mask:
        ``tvm_attn.AttentionSpec``'s)."""
        args = [self._prepare(n, x) for n, x in zip(ARGUMENTS, (q, k, v))]
        if ("tree" in self._args) != (tree_parents is not None):
            raise ValueError(f"kernel {self.name} takes a tree mask: pass tree_parents=" if tree_parents is None else
                             f"kernel {self.name} was exported without a tree mask: do not pass tree_parents=")
        tree = () if tree_parents is None else (_tree_mask(tree_parents, self._args["tree"]["shape"][0]),)
        if ("sinks" in self._args) != (sinks is not None):
            raise ValueError(f"kernel {self.name} takes sinks: pass sinks=" if sinks is None else
                             f"kernel {self.name} was exported without sinks: do not pass sinks=")
        if sinks is not None:
            sinks = self._prepare("sinks", sinks)
            if not np.isfinite(sinks).all():
                raise ValueError(f"sinks must be finite, got {sinks.tolist()}")
        result = out
        if out is None:
            out = result = aligned_empty(self.out_shape, numpy_dtype(self._args["out"]["dtype"]), self.alignment)
            if all(is_torch(x) for x in (q, k, v)):
                result = torch_view(out)  # torch in, torch out, sharing the output buffer
        out_view = self._prepare("out", out, writable=True)
        refuse_overlap(out_view, dict(zip(ARGUMENTS, args)))
        self._function(*(dlpack_argument(a) for a in (*args, *(() if sinks is None else (sinks,)), *tree, out_view)))
        return result


def _tree_mask(tree_parents, nodes: int) -> np.ndarray:
    """The checked (nodes, nodes) int32 mask of ``tree_parents`` (AttentionSpec.tree_mask)."""
    # Imported here: tests/arm64_runner.py loads this file on its own, and tvm_attn.spec needs numpy only.
    from .spec import ancestor_mask
    from .spec import tree_parents as checked

    # (a copy: the cached mask is read-only, and DLPack cannot pass read-only arrays)
    return np.array(ancestor_mask(checked(numpy_view(tree_parents) if is_torch(tree_parents) else tree_parents, nodes)))


def is_torch(x) -> bool:
    """Whether x is a torch tensor (checked without importing torch)."""
    return type(x).__module__.startswith("torch")


def numpy_view(x) -> np.ndarray:
    """A DLPack producer's CPU tensor as a numpy array without a copy (torch bfloat16 through its int16 bits, as
    numpy imports no bfloat16)."""
    if is_torch(x) and str(x.dtype) == "torch.bfloat16":
        import torch

        return np.from_dlpack(x.view(torch.int16)).view(numpy_dtype("bfloat16"))
    return np.from_dlpack(x)


def torch_view(array: np.ndarray):
    """A numpy array as a torch tensor of its dtype sharing its memory (bfloat16 through its bits, as torch
    imports no ml_dtypes array)."""
    import torch

    if array.dtype.name == "bfloat16":
        return torch.from_dlpack(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_dlpack(array)


def _load_blas(manifest: dict) -> None:
    """Load the BLAS a kernel exported with schedule="blas" calls, so that its undefined sgemm resolves: Accelerate
    on macOS, else this environment's (numpy's OpenBLAS, or TVM_ATTN_BLAS), which must export the same functions."""
    from .blas import ACCELERATE, host_blas

    want = manifest["blas"]
    if manifest["target"]["os"] == "darwin":
        ACCELERATE.load()
        return

    try:
        found = host_blas()
    except ValueError as err:
        raise ManifestError(f"kernel {manifest['name']} calls a BLAS: {err}") from None
    if found is None or (found.sgemm, found.threads_local) != (want["sgemm"], want["threads_local"]):
        raise ManifestError(f"kernel {manifest['name']} calls {want['sgemm']} of {want['name']}; this environment's "
                            f"BLAS is {found.name + ' (' + found.sgemm + ')' if found else 'none'}: set TVM_ATTN_BLAS "
                            f"to a library exporting {want['sgemm']}, or export the kernel here")
    found.load()


def load(path) -> ExportedKernel:
    """Load an exported kernel from its library or its manifest; checks that it runs on this machine."""
    import tvm_ffi

    manifest = read_manifest(path)
    check_runs_here(manifest)
    library = Path(manifest["_dir"]) / manifest["library"]
    if library.suffix == ".tar":
        raise ManifestError(f"{library} holds object files only (no linker was found when it was exported): link "
                            f"it into a shared library, or export again where clang and lld are installed")
    suffix = library.suffix
    if (manifest["library"] != library.name or library.name != f"{manifest['name']}{suffix}"
            or suffix not in (".so", ".dylib")):
        raise ManifestError(f"the manifest of {manifest['name']} names the library {library.name!r}: an exported "
                            f"kernel's library is {manifest['name']}.so or .dylib")
    if not library.exists():
        raise ManifestError(f"the library {library} named by the manifest does not exist")
    expected = manifest.get("sha256")
    if not isinstance(expected, str):
        raise ManifestError(f"{manifest['name']}'s manifest has no sha256 of its library (exported before tvm_attn "
                            f"recorded one): export it again")
    if file_sha256(library) != expected:
        raise ManifestError(f"{library} is not the library its manifest describes (sha256 differs: truncated, "
                            f"corrupted or replaced); export it again")
    installed = _installed_tvm()
    if installed is not None and installed != manifest["versions"]["tvm"]:
        # The kernel would bring its own runtime library next to this environment's, and TVM aborts the process
        # when the second one registers its functions.
        raise ManifestError(f"kernel {manifest['name']} was exported with apache-tvm {manifest['versions']['tvm']}, "
                            f"this environment has apache-tvm {installed}: export it again here, or load it where "
                            f"apache-tvm {manifest['versions']['tvm']} (or none) is installed")
    if "tvm" not in sys.modules:  # else the compiler already loaded the runtime
        runtime = _runtime_library(manifest)
        if runtime is not None:
            _load_runtime(runtime)
    if manifest.get("blas"):
        _load_blas(manifest)
    module = tvm_ffi.load_module(str(library))
    try:
        function = module[manifest["function"]]
    except Exception as err:  # tvm_ffi raises its own error types for a missing symbol
        raise ManifestError(f"{library} does not export {manifest['function']!r}: {err}") from None
    return ExportedKernel(manifest, function)
