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


set_check_finite(**_check_finite)
