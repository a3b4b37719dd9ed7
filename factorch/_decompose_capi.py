"""ctypes bindings of the C decompositions (``fct_svd``, ``fct_randomized_svd``,
``fct_cp_als``, ``fct_tucker_hooi``, ``fct_tensor_train``) and the calling
convention they share: borrowed DLPack views of torch tensors or numpy
arrays (zero-copy), a workspace allocated on the input's device after the
C workspace query, and C errors raised as ``FactorchError`` (a
``ValueError``) carrying the C layer's message.

The DLPack structures are factorch._dlpack_abi's; the error type is
:class:`factorch.dlpack.FactorchError`.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_char, c_double, c_int, c_int32, c_int64, c_size_t, c_uint64

import numpy as np
import torch

from . import _lib, limits
from ._dlpack_abi import Context as _Context
from ._dlpack_abi import DLManagedTensor as _DLManagedTensor
from ._dlpack_abi import DLTensor as _DLTensor
from ._dlpack_abi import capsule_pointer as _capsule_ptr
from .dlpack import FactorchError

_T = POINTER(_DLTensor)
_TP = POINTER(_T)  # DLTensor* const*

INIT_SVD, INIT_RANDOM, INIT_GIVEN = 0, 1, 2


class DecompInfo(ctypes.Structure):
    _fields_ = [("rel_error", c_double), ("n_iter", c_int32), ("converged", c_int32)]


class RsvdOptions(ctypes.Structure):
    _fields_ = [("n_oversamples", c_int64), ("n_iter", c_int32), ("reserved_", c_int32),
                ("seed", c_uint64)]


class CpOptions(ctypes.Structure):
    _fields_ = [("n_iter_max", c_int32), ("init", c_int32), ("tol", c_double),
                ("l2_reg", c_double), ("seed", c_uint64), ("normalize_factors", c_int32),
                ("reserved_", c_int32)]


class TuckerOptions(ctypes.Structure):
    _fields_ = [("n_iter_max", c_int32), ("init", c_int32), ("tol", c_double),
                ("seed", c_uint64)]


_core = _lib.core
_Ctx = POINTER(_Context)
_I64P = POINTER(c_int64)
_core.fct_svd_workspace.argtypes = [_Ctx, _T, _T, _T, _T, POINTER(c_size_t)]
_core.fct_svd.argtypes = [_Ctx, _T, _T, _T, _T, POINTER(DecompInfo)]
_core.fct_randomized_svd_workspace.argtypes = [_Ctx, _T, _T, _T, _T, POINTER(RsvdOptions),
                                               POINTER(c_size_t)]
_core.fct_randomized_svd.argtypes = [_Ctx, _T, _T, _T, _T, POINTER(RsvdOptions),
                                     POINTER(DecompInfo)]
_core.fct_cp_als_workspace.argtypes = [_Ctx, _T, c_int, _TP, _T, POINTER(CpOptions),
                                       POINTER(c_size_t)]
_core.fct_cp_als.argtypes = [_Ctx, _T, c_int, _TP, _T, POINTER(CpOptions), POINTER(c_double),
                             POINTER(DecompInfo)]
_core.fct_tucker_hooi_workspace.argtypes = [_Ctx, _T, _T, c_int, _TP, POINTER(TuckerOptions),
                                            POINTER(c_size_t)]
_core.fct_tucker_hooi.argtypes = [_Ctx, _T, _T, c_int, _TP, POINTER(TuckerOptions),
                                  POINTER(c_double), POINTER(DecompInfo)]
_core.fct_tensor_train_capacity.argtypes = [_Ctx, _T, c_int, _I64P, _I64P, POINTER(c_int64)]
_core.fct_tensor_train_workspace.argtypes = [_Ctx, _T, c_int, _I64P, _I64P, c_double, _T,
                                             POINTER(c_size_t)]
_core.fct_tensor_train.argtypes = [_Ctx, _T, c_int, _I64P, _I64P, c_double, _T, _I64P,
                                   POINTER(DecompInfo)]
for _f in ("fct_svd_workspace", "fct_svd", "fct_randomized_svd_workspace", "fct_randomized_svd",
           "fct_cp_als_workspace", "fct_cp_als", "fct_tucker_hooi_workspace", "fct_tucker_hooi",
           "fct_tensor_train_capacity", "fct_tensor_train_workspace", "fct_tensor_train"):
    getattr(_core, _f).restype = c_int


class View:
    """Borrowed DLTensor of a torch tensor or numpy array; keeps the exporting
    capsule (and so the memory) alive."""

    def __init__(self, array):
        if isinstance(array, torch.Tensor):
            self.capsule = torch.utils.dlpack.to_dlpack(array)  # no stream sync
        else:
            self.capsule = array.__dlpack__()
        ptr = _capsule_ptr(self.capsule, b"dltensor")
        self.ptr = ctypes.cast(ptr, POINTER(_DLManagedTensor))
        self.tensor = ctypes.pointer(self.ptr.contents.dl_tensor)


def view(array):
    """A ``DLTensor*`` of array that keeps its View (and capsule) alive."""
    if array is None:
        return None
    v = View(array)
    ptr = v.tensor
    ptr._view = v
    return ptr


def views(arrays):
    """A ``DLTensor* const*`` array of views; the Views are kept on it."""
    vs = [View(a) for a in arrays]
    arr = (_T * len(vs))(*[v.tensor for v in vs])
    arr._views = vs  # keep the capsules alive with the array
    return arr


def i64_array(values):
    if values is None:
        return None
    return (c_int64 * len(values))(*[int(v) for v in values])


class _Workspace:
    def __init__(self, like, nbytes: int):
        if isinstance(like, torch.Tensor):
            self.buf = torch.empty(nbytes + 256, dtype=torch.uint8, device=like.device)
            base = self.buf.data_ptr()
        else:
            self.buf = np.empty(nbytes + 256, dtype=np.uint8)
            base = self.buf.ctypes.data
        self.ptr = base + (-base) % 256  # the C API wants 256-byte alignment
        self.nbytes = nbytes


def device_of(like):
    return like.device if isinstance(like, torch.Tensor) else torch.device("cpu")


def call(like, query, op, args, op_tail=(), rename=None, budget=None):
    """Runs ``query(ctx, *args, &bytes)`` then ``op(ctx, *args, *op_tail)`` with
    a workspace on ``like``'s device; raises FactorchError with C's message,
    its leading argument name mapped through ``rename`` (C name -> Python).
    ``budget``: (argument name, what the call is, bytes of its results):
    the results and the workspace must fit factorch.limits.memory_limit."""
    err = ctypes.create_string_buffer(512)
    ctx = _Context(None, None, 0, 0, ctypes.cast(err, POINTER(c_char)), len(err))
    if isinstance(like, torch.Tensor) and like.is_cuda:
        ctx.stream = torch.cuda.current_stream(like.device).cuda_stream
    nbytes = c_size_t(0)
    status = query(ctypes.byref(ctx), *args, ctypes.byref(nbytes))
    ws = None
    if status == 0 and budget is not None:
        name, what, result_bytes = budget
        limits.check_bytes(name, f"{what} (results {limits.format_bytes(result_bytes)}, C "
                           f"workspace {limits.format_bytes(nbytes.value)})",
                           result_bytes + nbytes.value, device_of(like))
    if status == 0:
        ws = _Workspace(like, nbytes.value)
        ctx.workspace, ctx.workspace_bytes = ws.ptr, ws.nbytes
        status = op(ctypes.byref(ctx), *args, *op_tail)
    if status != 0:
        raise error(status, err.value.decode() or _core.fct_status_string(status).decode(), rename)
    return ws


def error(status: int, msg: str, rename=None) -> FactorchError:
    for c_name, py_name in (rename or {}).items():
        if msg.startswith(c_name + ":"):
            msg = py_name + msg[len(c_name):]
            break
    return FactorchError(status, msg)


def check(status: int, err, rename=None):
    if status != 0:
        raise error(status, err.value.decode() or _core.fct_status_string(status).decode(), rename)


def new_context():
    err = ctypes.create_string_buffer(512)
    return _Context(None, None, 0, 0, ctypes.cast(err, POINTER(c_char)), len(err)), err


core = _core
