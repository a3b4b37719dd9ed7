"""The DLPack ABI (dlpack/dlpack.h, version 1.x) and factorch's fct_context
as ctypes structures: the one definition every ctypes caller of libfactorch
uses (factorch.dlpack, the decompositions, the C plan queries)."""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_char, c_int32, c_int64, c_size_t, c_uint8, c_uint16, c_uint32
from ctypes import c_uint64, c_void_p

#: DLDeviceType values factorch uses.
KDL_CPU, KDL_CUDA = 1, 2
#: DLDataTypeCode values.
KDL_INT, KDL_UINT, KDL_FLOAT, KDL_BFLOAT = 0, 1, 2, 4
#: DLManagedTensorVersioned.flags bits.
FLAG_READ_ONLY, FLAG_IS_COPIED = 1, 2


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", c_int32), ("device_id", c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", c_uint8), ("bits", c_uint8), ("lanes", c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", c_void_p),
        ("device", DLDevice),
        ("ndim", c_int32),
        ("dtype", DLDataType),
        ("shape", POINTER(c_int64)),
        ("strides", POINTER(c_int64)),  # in elements; NULL: row-major
        ("byte_offset", c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    """The unversioned capsule's payload ("dltensor")."""
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", c_void_p), ("deleter", c_void_p)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", c_uint32), ("minor", c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    """The versioned capsule's payload ("dltensor_versioned", DLPack >= 1.0),
    which can say that the memory is read-only."""
    _fields_ = [("version", DLPackVersion), ("manager_ctx", c_void_p), ("deleter", c_void_p),
                ("flags", c_uint64), ("dl_tensor", DLTensor)]


class Context(ctypes.Structure):
    """fct_context (ops/include/factorch.h)."""
    _fields_ = [
        ("stream", c_void_p),
        ("workspace", c_void_p),
        ("workspace_bytes", c_size_t),
        ("flags", c_uint32),
        ("error", POINTER(c_char)),
        ("error_bytes", c_size_t),
    ]


capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
capsule_pointer.restype = c_void_p
capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]

capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
capsule_is_valid.restype = ctypes.c_int
capsule_is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]
