"""The C kernels on any DLPack-exporting arrays (numpy, and CuPy/JAX-style
arrays through ``out=``), without torch's dispatcher: zero-copy views of the
inputs are handed to libfactorch through ctypes.

    >>> import numpy as np, factorch.dlpack as fd
    >>> y = fd.lowrank_linear(x, U, V, bias)           # numpy in, numpy out

Errors raise ``ValueError`` with the C layer's message, which names the
argument and what was expected.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_char, c_int32, c_int64, c_size_t, c_uint8, c_uint16, c_uint32
from ctypes import c_uint64, c_void_p

import numpy as np

from . import _lib

__all__ = ["lowrank_linear", "lowrank_linear_backward", "FactorchError"]


class FactorchError(ValueError):
    """A C op refused its arguments; ``status`` is the fct_status code."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", c_int32), ("device_id", c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", c_uint8), ("bits", c_uint8), ("lanes", c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", c_void_p),
        ("device", _DLDevice),
        ("ndim", c_int32),
        ("dtype", _DLDataType),
        ("shape", POINTER(c_int64)),
        ("strides", POINTER(c_int64)),
        ("byte_offset", c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", c_void_p), ("deleter", c_void_p)]


class _Context(ctypes.Structure):
    _fields_ = [
        ("stream", c_void_p),
        ("workspace", c_void_p),
        ("workspace_bytes", c_size_t),
        ("flags", c_uint32),
        ("error", POINTER(c_char)),
        ("error_bytes", c_size_t),
    ]


_capsule_ptr = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_ptr.restype = c_void_p
_capsule_ptr.argtypes = [ctypes.py_object, ctypes.c_char_p]

_T = POINTER(_DLTensor)
_core = _lib.core
_core.fct_lowrank_linear_forward_workspace.argtypes = [POINTER(_Context), _T, _T, _T, _T, _T, _T, POINTER(c_size_t)]
_core.fct_lowrank_linear_forward.argtypes = [POINTER(_Context), _T, _T, _T, _T, _T, _T]
_core.fct_lowrank_linear_backward_workspace.argtypes = [POINTER(_Context)] + [_T] * 9 + [POINTER(c_size_t)]
_core.fct_lowrank_linear_backward.argtypes = [POINTER(_Context)] + [_T] * 9


class _View:
    """Borrowed DLTensor of an array; keeps the exporting capsule alive."""

    def __init__(self, name: str, array):
        if not hasattr(array, "__dlpack__"):
            raise TypeError(f"{name}: expected an array supporting DLPack, got {type(array).__name__}")
        self.capsule = array.__dlpack__()  # the unversioned "dltensor" capsule
        ptr = _capsule_ptr(self.capsule, b"dltensor")
        self.ptr = ctypes.cast(ptr, POINTER(_DLManagedTensor))
        self.tensor = ctypes.pointer(self.ptr.contents.dl_tensor)


def _view(name, array):
    return None if array is None else _View(name, array)


def _ptr(view):
    return None if view is None else view.tensor


def _call(query, op, args, flags):
    err = ctypes.create_string_buffer(512)
    ctx = _Context(None, None, 0, flags, ctypes.cast(err, POINTER(c_char)), len(err))
    nbytes = c_size_t(0)
    status = query(ctypes.byref(ctx), *args, ctypes.byref(nbytes))
    if status == 0:
        ws = np.empty(nbytes.value + 256, dtype=np.uint8)
        base = ws.ctypes.data
        ctx.workspace = base + (-base) % 256  # the C API wants 256-byte alignment
        ctx.workspace_bytes = nbytes.value
        status = op(ctypes.byref(ctx), *args)
    if status != 0:
        msg = err.value.decode() or _core.fct_status_string(status).decode()
        raise FactorchError(status, msg)


def _flags(check_finite: bool) -> int:
    return _lib.FLAG_CHECK_FINITE if check_finite else 0


def _new_like(x, shape):
    return np.empty(shape, dtype=np.asarray(x).dtype)


def lowrank_linear(x, U, V, bias=None, *, out=None, check_finite: bool = True):
    """``y = x·Vᵀ·Uᵀ + bias`` for numpy (or any DLPack CPU) arrays.

    ``out``: optional preallocated ``[..., out]`` array (any DLPack array on
    the inputs' device, e.g. for CuPy). Returns ``out`` or a new numpy array.
    """
    if out is None:
        out = _new_like(x, (*np.shape(x)[:-1], np.shape(U)[0]))
    vs = [_view("x", x), _view("U", U), _view("V", V), _view("bias", bias), _view("y", out)]
    args = [_ptr(v) for v in vs] + [None]
    _call(_core.fct_lowrank_linear_forward_workspace, _core.fct_lowrank_linear_forward, args,
          _flags(check_finite))
    return out


def lowrank_linear_backward(grad_y, x, U, V, *, need=("x", "U", "V", "bias"), check_finite=True):
    """Gradients of :func:`lowrank_linear` as a dict with the keys in ``need``
    (any of "x", "U", "V", "bias")."""
    unknown = set(need) - {"x", "U", "V", "bias"}
    if unknown:
        raise ValueError(f"need: expected names among x, U, V, bias, got {sorted(unknown)}")
    shapes = {"x": np.shape(x), "U": np.shape(U), "V": np.shape(V), "bias": np.shape(U)[:1]}
    grads = {k: _new_like(x, shapes[k]) for k in need}
    ins = [_view("grad_y", grad_y), _view("x", x), _view("U", U), _view("V", V)]
    outs = [_view("grad_" + k, grads.get(k)) for k in ("x", "U", "V", "bias")]
    args = [_ptr(v) for v in ins] + [None] + [_ptr(v) for v in outs]
    _call(_core.fct_lowrank_linear_backward_workspace, _core.fct_lowrank_linear_backward, args,
          _flags(check_finite))
    return grads
