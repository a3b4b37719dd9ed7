"""Process-wide settings of the C kernels."""

from __future__ import annotations

from . import _lib

# Checking outputs for NaN/Inf costs one pass over them; on CUDA it also costs
# a stream synchronisation, so it is off there unless asked for.
_check_finite = {"cpu": True, "cuda": False}


def set_check_finite(cpu: bool | None = None, cuda: bool | None = None) -> None:
    """Raise ``RuntimeError`` naming the inputs holding NaN/Inf when an op's
    output is not finite (default: on for CPU, off for CUDA)."""
    for dev, value in (("cpu", cpu), ("cuda", cuda)):
        if value is not None:
            _check_finite[dev] = bool(value)
            _lib.glue.fct_torch_set_flags(dev == "cuda", _lib.FLAG_CHECK_FINITE if value else 0)


def get_check_finite() -> dict[str, bool]:
    return dict(_check_finite)


def set_stall_policy(stall_us: float = 200.0, hold_min_ms: float = 20.0,
                     hold_max_ms: float = 1000.0) -> None:
    """How the CPU kernels react to a busy machine (the defaults shown).

    Two parallel calls in a row whose calling thread waited more than
    ``stall_us`` at the thread pool's join (another process holding a core
    keeps one of its threads descheduled), and longer than it worked, make
    the kernels run serially for a hold of ``hold_min_ms``, four times
    longer while tries after a hold stall again, up to ``hold_max_ms`` (a
    stalled call costs milliseconds, so holds are long). ``stall_us=0``
    always uses the pool. Results are the same bits either way (a resting
    pool runs the same blocks one after another); setting the policy ends a
    hold.
    """
    for name, v in (("stall_us", stall_us), ("hold_min_ms", hold_min_ms),
                    ("hold_max_ms", hold_max_ms)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
            raise ValueError(f"set_stall_policy: {name} must be a number >= 0, got {v!r}")
    if hold_max_ms < hold_min_ms:
        raise ValueError(f"set_stall_policy: hold_max_ms ({hold_max_ms}) must be >= "
                         f"hold_min_ms ({hold_min_ms})")
    _lib.core.fct_cpu_set_stall_policy(int(stall_us * 1e3), int(hold_min_ms * 1e6),
                                       int(hold_max_ms * 1e6))


def pool_stalls() -> dict[str, int | bool]:
    """``{"stalls": parallel calls that stalled since import, "resting": whether
    the kernels run serially now}`` (see :func:`set_stall_policy`)."""
    return {"stalls": int(_lib.core.fct_cpu_pool_stalls()),
            "resting": bool(_lib.core.fct_cpu_pool_resting())}


set_check_finite(**_check_finite)


def release_workspace() -> int:
    """Frees the calling thread's kept CPU workspace and returns its size in
    bytes (0 if it had none).

    A CPU call needing 16 MB of workspace or more (tensorized layers at large
    batches) borrows one buffer the thread keeps between calls, at most the
    ops' 64 MB workspace cap in the usual case, instead of allocating it each
    time: glibc would serve it with fresh pages (~0.5 ms per MB of page
    faults). It is freed when the thread exits, or here."""
    return int(_lib.glue.fct_torch_release_workspace())


def kept_workspace() -> int:
    """Bytes of CPU workspace the calling thread keeps (see release_workspace)."""
    return int(_lib.glue.fct_torch_kept_workspace())
