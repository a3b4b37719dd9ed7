"""Loads factorch's shared libraries: the C kernels (libfactorch), the CUDA
backend when present (libfactorch_cuda) and the torch registration
(libfactorch_torch, which defines the ``torch.ops.factorch.*`` ops)."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import torch

_NAMES = ("libfactorch.so", "libfactorch_torch.so")


def _search_dirs() -> list[Path]:
    """FACTORCH_LIB_DIR when set, then ``_libs`` in each folder of this
    package: a wheel installs the libraries in factorch/_libs beside this
    file; an editable install (scikit-build-core's redirect mode) keeps the
    sources in the checkout and installs the libraries into site-packages'
    factorch/_libs, a second folder of the same package's ``__path__``."""
    dirs = []
    if os.environ.get("FACTORCH_LIB_DIR"):
        dirs.append(Path(os.environ["FACTORCH_LIB_DIR"]))
    for d in sys.modules[__package__].__path__:
        dirs.append(Path(d) / "_libs")
    return dirs


def _find_lib_dir() -> Path:
    for d in _search_dirs():
        if all((d / n).is_file() for n in _NAMES):
            return d
    raise ImportError(
        "factorch: the compiled libraries (libfactorch.so, libfactorch_torch.so) were not "
        "found; build them with `make build` (or `pip install .`), or point FACTORCH_LIB_DIR "
        "at the folder holding them. Looked in: " + ", ".join(str(d) for d in _search_dirs())
    )


LIB_DIR = _find_lib_dir()

# RTLD_GLOBAL so that libfactorch_cuda and libfactorch_torch bind to this copy.
core = ctypes.CDLL(str(LIB_DIR / "libfactorch.so"), mode=ctypes.RTLD_GLOBAL)
core.fct_status_string.restype = ctypes.c_char_p
core.fct_status_string.argtypes = [ctypes.c_int]
core.fct_version.restype = ctypes.c_uint32
core.fct_cuda_available.restype = ctypes.c_int
core.fct_cpu_set_num_threads.restype = ctypes.c_int
core.fct_cpu_set_num_threads.argtypes = [ctypes.c_int]
core.fct_cpu_set_stall_policy.argtypes = [ctypes.c_int64] * 3
core.fct_cpu_pool_stalls.restype = ctypes.c_uint64
core.fct_cpu_pool_resting.restype = ctypes.c_int
core.fct_cpu_pool_rest.argtypes = [ctypes.c_int64]

cuda_load_error: str | None = None
_cuda_path = LIB_DIR / "libfactorch_cuda.so"
if not _cuda_path.is_file():
    cuda_load_error = "factorch was built without CUDA (libfactorch_cuda.so is absent)"
elif not torch.cuda.is_available():
    cuda_load_error = "torch sees no CUDA device"
else:
    try:
        ctypes.CDLL(str(_cuda_path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:  # e.g. no CUDA runtime on this machine
        cuda_load_error = f"libfactorch_cuda.so could not be loaded: {e}"

torch.ops.load_library(str(LIB_DIR / "libfactorch_torch.so"))
glue = ctypes.CDLL(str(LIB_DIR / "libfactorch_torch.so"))
glue.fct_torch_registration_status.restype = ctypes.c_int
glue.fct_torch_set_flags.argtypes = [ctypes.c_int, ctypes.c_uint32]
glue.fct_torch_release_workspace.restype = ctypes.c_size_t
glue.fct_torch_kept_workspace.restype = ctypes.c_size_t
if glue.fct_torch_registration_status() != 0:
    raise ImportError("factorch: registering the ops with torch's dispatcher failed")

FLAG_CHECK_FINITE = 1


def version() -> str:
    v = core.fct_version()
    return f"{v >> 16}.{(v >> 8) & 0xFF}.{v & 0xFF}"
