"""Bounds on the work one call may ask for, so that a harmless-looking
argument (``rank=10**6``, ``n_iter_max=2**31 - 1``) fails at once with a
message giving the size it would need, instead of allocating terabytes or
running for hours.

- Memory: the decompositions (factorch.decompose) check the bytes of their
  results and of the C workspace, and the layers' constructors the bytes of
  their parameters, against :func:`memory_limit` before allocating: by
  default the memory available on the device when the call starts (CPU:
  ``MemAvailable`` of /proc/meminfo; CUDA: the free bytes of
  ``torch.cuda.mem_get_info``); :func:`set_memory_limit` sets a cap of its
  own (or ``None`` for the default again). Too large a request raises a
  ``ValueError`` naming the argument that sets the size.
- Iterations: ``n_iter_max`` of CP-ALS and Tucker-HOOI is at most
  :data:`MAX_SWEEPS`, ``n_iter`` (power iterations) of the randomized SVD at
  most :data:`MAX_POWER_ITERATIONS`.
"""

from __future__ import annotations

import os

import torch

#: Most ALS / HOOI sweeps one decomposition may ask for (``n_iter_max``).
#: factorch's own conversions use 1000 at most; each sweep costs a pass of
#: GEMMs over the whole tensor.
MAX_SWEEPS = 100_000

#: Most power iterations of ``randomized_svd`` (``n_iter``); 2 to 7 are the
#: usual choices (torch.svd_lowrank, sklearn), each costing two passes over
#: the matrix.
MAX_POWER_ITERATIONS = 1_000

_limit: int | None = None


def set_memory_limit(nbytes: int | None) -> None:
    """Caps the bytes one decomposition or layer constructor may allocate
    (``None``: the memory available on the device, the default)."""
    global _limit
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int)
                               or nbytes < 0):
        raise ValueError(f"nbytes: expected None or an int >= 0, got {nbytes!r}")
    _limit = nbytes


def _cpu_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_limit(device="cpu") -> int | None:
    """The bytes a call on ``device`` may allocate: the cap of
    :func:`set_memory_limit`, else the memory available there now (None when
    it cannot be told, e.g. a meta device)."""
    if _limit is not None:
        return _limit
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cpu":
        return _cpu_available()
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    return None


def format_bytes(n: int) -> str:
    """``n`` bytes for people: 64.0 TB, 1.5 GB, 512 B."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def check_bytes(name: str, what: str, nbytes: int, device="cpu") -> None:
    """ValueError naming ``name`` when ``what`` (a description of the
    allocation) needs more than :func:`memory_limit` bytes on ``device``."""
    limit = memory_limit(device)
    if limit is not None and nbytes > limit:
        source = "the cap of factorch.limits.set_memory_limit" if _limit is not None else (
            f"the memory available on {torch.device(device).type}")
        raise ValueError(f"{name}: {what} needs {format_bytes(nbytes)} ({nbytes} bytes), more "
                         f"than {source} ({format_bytes(limit)}); use a smaller {name}")


def check_layer_parameters(name: str, what: str, numel: int, device, dtype) -> None:
    """The constructors' check: ``numel`` parameters of ``dtype`` on
    ``device`` (the defaults when None)."""
    dev = torch.device(device) if device is not None else torch.get_default_device()
    if dev.type == "meta":
        return
    dt = dtype if dtype is not None else torch.get_default_dtype()
    itemsize = torch.empty((), dtype=dt, device="meta").element_size()
    check_bytes(name, f"{what} ({numel} parameters of {str(dt).removeprefix('torch.')})",
                numel * itemsize, dev)


__all__ = ["MAX_SWEEPS", "MAX_POWER_ITERATIONS", "set_memory_limit", "memory_limit",
           "check_bytes", "format_bytes"]
