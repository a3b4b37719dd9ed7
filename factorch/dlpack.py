"""Every factorch op, forward and backward, on any DLPack array (numpy, JAX,
torch, ...) without torch's dispatcher: the C kernels of libfactorch called
through ctypes on borrowed views of the arrays.

    >>> import numpy as np, factorch.dlpack as fd
    >>> y = fd.lowrank_linear(x, U, V, bias)                 # numpy in, numpy out
    >>> y = fd.tt_linear(x_jax, cores_flat, None, (4, 8), (8, 4), (1, 3, 1))  # JAX in, JAX out
    >>> g = fd.tt_linear_backward(gy, x, cores_flat, (4, 8), (8, 4), (1, 3, 1))  # dict of grads

The functions take the arguments of the matching ``torch.ops.factorch`` op
(``None`` for no bias; padding_idx -1 for none), in the same order.

Memory and ownership:

- Inputs are never copied: each is borrowed through its ``__dlpack__``
  capsule for the call only (factorch keeps no pointer after it returns) and
  released through the capsule's deleter. The versioned protocol (DLPack >=
  1.0, ``__dlpack__(max_version=(1, 0))``) is asked for first, so read-only
  numpy arrays are accepted as inputs; producers without it are asked for
  the unversioned capsule.
- Outputs are allocated in the caller's framework, the framework of the
  op's reference array (x for the linear ops and convolutions, the factors
  for embeddings, grad_y for backward ops): torch tensors come from
  ``torch.empty`` on the reference's device, numpy arrays from ``np.empty``.
  For any other framework (JAX, ...) factorch allocates a 64-byte aligned
  CPU buffer (a numpy array), the kernel writes into it, and the framework
  takes it over zero-copy with its ``from_dlpack`` (the array API
  namespace's); the capsule's deleter frees the buffer when that framework
  drops the array. ``out=`` (forward ops) writes into a caller's array
  instead: it must be writable (a read-only one is refused) and dense, and
  not an array of a framework whose arrays are immutable (JAX, TensorFlow:
  refused; the result comes back as a new array instead).
- Arrays a producer refuses to export (numpy: non-native byte order) raise
  a FactorchError naming the argument and how to convert it.
- Empty inputs give empty outputs, whatever strides the producer gives them
  (numpy gives empty arrays zero strides).
- The op's workspace is one temporary buffer on the reference's device,
  freed when the call returns. Nothing else is allocated per call beyond a
  few ctypes structures.

Errors raise :class:`FactorchError` (a ``ValueError``) with the C layer's
message, which names the argument and what was expected; arguments that are
not arrays raise ``TypeError``.
"""

from __future__ import annotations

import ctypes
import math
from ctypes import POINTER, c_char, c_int, c_int64, c_size_t

import numpy as np
import torch

from . import _lib
from ._dlpack_abi import (FLAG_IS_COPIED, FLAG_READ_ONLY, KDL_CPU, Context, DLManagedTensor,
                          DLManagedTensorVersioned, DLTensor, capsule_is_valid, capsule_pointer)

__all__ = [
    "FactorchError",
    "lowrank_linear", "lowrank_linear_backward",
    "lowrank_linear_flat", "lowrank_linear_flat_backward",
    "cp_linear", "cp_linear_backward",
    "tucker_linear", "tucker_linear_backward",
    "tt_linear", "tt_linear_backward",
    "conv_chain", "conv_chain_backward",
    "lowrank_embedding", "lowrank_embedding_backward",
    "tt_embedding", "tt_embedding_backward",
    "lora_linear", "lora_linear_backward",
]

MAX_MODES = 8  # FCT_MAX_MODES
STAGE_INTS = 16

#: When set to a list, every call appends a record of what the C op got:
#: ``{"op", "pointers": {argument: data address}, "workspace_bytes"}`` (the
#: tests read it to prove that inputs and outputs are not copied).
trace: list | None = None


class FactorchError(ValueError):
    """A C op refused its arguments; ``status`` is the fct_status code."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------
# C signatures
# --------------------------------------------------------------------------
_T = POINTER(DLTensor)
_TP = POINTER(_T)
_Ctx = POINTER(Context)
_SZ = POINTER(c_size_t)
_I64 = c_int64
_core = _lib.core


def _sig(name, *args):
    fn = getattr(_core, name)
    fn.argtypes = [_Ctx, *args]
    fn.restype = c_int


for _pre, _args in (
    ("lowrank_linear_forward", [_T] * 6),
    ("lowrank_linear_backward", [_T] * 9),
    ("cp_linear_forward", [_T, c_int, _TP, c_int, _TP, _T, _T, _T]),
    ("cp_linear_backward", [_T, _T, c_int, _TP, c_int, _TP, _T, _T, _TP, _TP, _T]),
    ("tucker_linear_forward", [_T, _T, c_int, _TP, c_int, _TP, _T, _T, _T]),
    ("tucker_linear_backward", [_T, _T, _T, c_int, _TP, c_int, _TP, _T, _T, _T, _TP, _TP, _T]),
    ("tt_linear_forward", [_T, c_int, _TP, _T, _T]),
    ("tt_linear_backward", [_T, _T, c_int, _TP, _T, _TP, _T]),
    ("conv_chain_forward", [_T, c_int, POINTER(_I64), _TP, _T, _T, _T]),
    ("conv_chain_backward", [_T, _T, c_int, POINTER(_I64), _TP, _T, _T, _TP, _T]),
    ("lowrank_embedding_forward", [_T, _T, _T, _I64, _T]),
    ("lowrank_embedding_backward", [_T, _T, _T, _T, _I64, _T, _T]),
    ("tt_embedding_forward", [_T, c_int, _TP, _I64, _I64, _T]),
    ("tt_embedding_backward", [_T, _T, c_int, _TP, _I64, _I64, _TP]),
):
    _sig("fct_" + _pre, *_args)
    _sig("fct_" + _pre + "_workspace", *_args, _SZ)
_sig("fct_conv_chain_check", c_int, POINTER(_I64), POINTER(_I64))


class _LoraBase(ctypes.Structure):  # fct_lora_base
    _fields_ = [("kind", ctypes.c_int32), ("reserved_", ctypes.c_int32), ("W", _T), ("U", _T),
                ("V", _T), ("bias", _T), ("base_out", _T)]


class _LoraOptions(ctypes.Structure):  # fct_lora_options
    _fields_ = [("scale", ctypes.c_double), ("dropout", ctypes.c_double),
                ("seed", ctypes.c_uint64)]


class _LoraGrads(ctypes.Structure):  # fct_lora_grads
    _fields_ = [(k, _T) for k in ("x", "A", "B", "W", "U", "V", "bias")]


_LB, _LO, _LG = POINTER(_LoraBase), POINTER(_LoraOptions), POINTER(_LoraGrads)
_sig("fct_lora_linear_forward", _T, _T, _T, _LB, _LO, _T, _T)
_sig("fct_lora_linear_forward_workspace", _T, _T, _T, _LB, _LO, _T, _T, _SZ)
_sig("fct_lora_linear_backward", _T, _T, _T, _T, _LB, _LO, _T, _LG)
_sig("fct_lora_linear_backward_workspace", _T, _T, _T, _T, _LB, _LO, _T, _LG, _SZ)


# --------------------------------------------------------------------------
# Borrowed inputs, carved factors, outputs in the caller's framework
# --------------------------------------------------------------------------
def _export_refused(name: str, array, e: BufferError) -> FactorchError:
    """The error for an array its producer would not export (numpy refuses
    non-native byte orders, and read-only arrays without DLPack >= 1.0)."""
    dt = getattr(array, "dtype", None)
    if isinstance(array, np.ndarray) and not dt.isnative:
        return FactorchError(6, f"{name}: expected an array in the machine's byte order, got "
                             f"dtype {dt.str!r} (convert it: "
                             f"{name}.astype({name}.dtype.newbyteorder('=')))")
    if isinstance(array, np.ndarray) and not array.flags.writeable:
        return FactorchError(6, f"{name}: expected a writable array or a numpy with DLPack 1.0 "
                             f"(which exports read-only arrays), got a read-only array ({e})")
    return FactorchError(6, f"{name}: expected an array its producer can export through DLPack, "
                         f"got one it refused ({e})")


def _export(name: str, array):
    """The array's DLPack capsule, versioned when the producer offers it."""
    if not hasattr(array, "__dlpack__"):
        raise TypeError(f"{name}: expected an array supporting DLPack, got {type(array).__name__}")
    if isinstance(array, torch.Tensor) and array.is_cuda:
        return torch.utils.dlpack.to_dlpack(array)  # on torch's current stream, no sync
    try:
        return array.__dlpack__(max_version=(1, 0))
    except TypeError:  # a producer from before DLPack 1.0
        pass
    except BufferError as e:
        raise _export_refused(name, array, e) from None
    try:
        return array.__dlpack__()
    except BufferError as e:  # e.g. a read-only array the producer cannot flag as such
        raise _export_refused(name, array, e) from None


#: Frameworks whose arrays are immutable by contract (a DLPack export of
#: one is writable memory, but writing it breaks what the framework assumes:
#: JAX caches, shares and reuses buffers); ``out=`` refuses them.
_IMMUTABLE_FRAMEWORKS = {"jax": "JAX", "jaxlib": "JAX", "tensorflow": "TensorFlow"}


def _immutable_framework(array) -> str | None:
    top = type(array).__module__.split(".")[0]
    return _IMMUTABLE_FRAMEWORKS.get(top)


class _Borrowed:
    """A DLTensor of an array for the duration of a call. Holds the capsule,
    whose destructor runs the producer's deleter when this object goes."""

    def __init__(self, name: str, array, writable: bool = False):
        self.capsule = _export(name, array)
        if capsule_is_valid(self.capsule, b"dltensor_versioned"):
            ptr = capsule_pointer(self.capsule, b"dltensor_versioned")
            managed = ctypes.cast(ptr, POINTER(DLManagedTensorVersioned)).contents
            flags = int(managed.flags)
        else:
            ptr = capsule_pointer(self.capsule, b"dltensor")
            managed = ctypes.cast(ptr, POINTER(DLManagedTensor)).contents
            flags = 0
        if writable and flags & FLAG_READ_ONLY:
            raise FactorchError(6, f"{name}: the array is read-only; an output must be writable")
        if writable and flags & FLAG_IS_COPIED:
            raise FactorchError(6, f"{name}: its producer exported a copy, which the op's "
                                "results would not reach")
        self.tensor = managed.dl_tensor
        self.ptr = ctypes.pointer(self.tensor)

    @property
    def shape(self) -> tuple:
        t = self.tensor
        return tuple(t.shape[i] for i in range(t.ndim))

    @property
    def address(self) -> int:
        return (self.tensor.data or 0) + self.tensor.byte_offset


class _Carved:
    """Row-major sub-tensors (the factors) of a borrowed 1-D flat tensor,
    zero-copy: same memory, shapes and strides of their own."""

    def __init__(self, name: str, flat: _Borrowed, shapes: list[tuple]):
        t = flat.tensor
        need = sum(math.prod(s) for s in shapes)
        if t.ndim != 1 or t.shape[0] != need:
            raise FactorchError(5, f"{name}: expected a 1-D array of {need} elements (the factors "
                                f"back to back), got shape {list(flat.shape)}")
        stride = t.strides[0] if t.strides else 1
        item = max(1, t.dtype.bits // 8)
        self.keep, self.ptrs, off = [], [], 0
        for s in shapes:
            sh = (c_int64 * len(s))(*s)
            st, acc = [], stride
            for n in reversed(s):
                st.append(acc)
                acc *= n
            strides = (c_int64 * len(s))(*reversed(st))
            byte = off * stride * item
            base = (t.data or 0) + t.byte_offset + byte
            sub = DLTensor(base, t.device, len(s), t.dtype, sh, strides, 0)
            self.keep.append((sh, strides, sub))
            self.ptrs.append(ctypes.pointer(sub))
            off += math.prod(s)

    def array(self, lo: int = 0, hi: int | None = None):
        ptrs = self.ptrs[lo:hi]
        return (_T * len(ptrs))(*ptrs)


def _np_dtype(t: DLTensor):
    code, bits = t.dtype.code, t.dtype.bits
    try:
        if code == 4 and bits == 16:
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype({(2, 16): np.float16, (2, 32): np.float32, (2, 64): np.float64,
                         (0, 32): np.int32, (0, 64): np.int64}[(code, bits)])
    except (KeyError, ImportError):
        raise FactorchError(2, f"unsupported DLPack dtype (code {code}, {bits} bits)") from None


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    n = math.prod(shape) * dtype.itemsize
    raw = np.empty(n + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + n].view(dtype).reshape(shape)


class _Call:
    """One call of a C op: the borrowed arguments, the outputs, the
    workspace, in the framework of `ref` (the op's reference array)."""

    def __init__(self, op: str, ref_name: str, ref):
        self.op, self.keep, self.pointers = op, [], {}
        self.ref = ref
        self.ref_view = self.borrow(ref_name, ref)
        self.is_torch = isinstance(ref, torch.Tensor)
        self.results = []  # (buffer, name) of factorch-allocated outputs of other frameworks

    def borrow(self, name, array, writable=False):
        if array is None:
            return None
        b = _Borrowed(name, array, writable)
        self.keep.append(b)
        self.pointers[name] = b.address
        return b

    def ptr(self, name, array, writable=False):
        b = self.borrow(name, array, writable)
        return None if b is None else b.ptr

    def carve(self, name, flat: _Borrowed, shapes) -> _Carved:
        c = _Carved(name, flat, shapes)
        self.keep.append(c)
        return c

    def output(self, name, shape, dtype_of: _Borrowed | None = None, out=None):
        """(the DLTensor* the op writes, what the caller gets back)."""
        if out is not None:
            fw = _immutable_framework(out)
            if fw is not None:
                raise FactorchError(6, f"out: {fw} arrays are immutable, so factorch does not "
                                    f"write into one; call without out= (the result is a new "
                                    f"{fw} array)")
            b = self.borrow(name, out, writable=True)
            return b.ptr, out
        t = (dtype_of or self.ref_view).tensor
        shape = tuple(int(s) for s in shape)
        if self.is_torch:
            ref = self.ref
            dt = ref.dtype if dtype_of is None else _torch_dtype(t)
            res = torch.empty(shape, dtype=dt, device=ref.device)
            buf = res
        else:
            if self.ref_view.tensor.device.device_type != KDL_CPU:
                raise FactorchError(3, f"{name}: factorch allocates outputs on the CPU only for "
                                    "non-torch arrays; pass out= on the arrays' device")
            buf = _aligned_empty(shape, _np_dtype(t))
            res = buf if isinstance(self.ref, np.ndarray) else None
        b = self.borrow(name, buf, writable=True)
        if res is None:
            self.results.append(buf)
            res = ("pending", len(self.results) - 1)
        return b.ptr, res

    def flat_grads(self, need, xv: _Borrowed, shapes, bias_len: int):
        """The gradient outputs of an op on one flat parameter: grad_x like x,
        grad_weights flat in `shapes`' layout (returned carved), grad_bias
        [bias_len]; each only when in `need` (else None). Returns
        (results by name, grad_x, carved grad_weights, grad_bias)."""
        res, gx, gw, gb = {}, None, None, None
        if "x" in need:
            gx, res["x"] = self.output("grad_x", xv.shape, dtype_of=xv)
        if "weights" in need:
            _, res["weights"] = self.output("grad_weights",
                                            (sum(math.prod(s) for s in shapes),), dtype_of=xv)
            gw = self.carve("grad_weights", self.keep[-1], shapes)
        if "bias" in need:
            gb, res["bias"] = self.output("grad_bias", (bias_len,), dtype_of=xv)
        return res, gx, gw, gb

    def run(self, query, fn, args, check_finite: bool = True):
        err = ctypes.create_string_buffer(512)
        flags = _lib.FLAG_CHECK_FINITE if check_finite else 0
        ctx = Context(None, None, 0, flags, ctypes.cast(err, POINTER(c_char)), len(err))
        cuda = self.is_torch and self.ref.is_cuda
        if cuda:
            ctx.stream = torch.cuda.current_stream(self.ref.device).cuda_stream
        nbytes = c_size_t(0)
        status = query(ctypes.byref(ctx), *args, ctypes.byref(nbytes))
        if status == 0:
            if cuda:
                ws = torch.empty(nbytes.value + 256, dtype=torch.uint8, device=self.ref.device)
                base = ws.data_ptr()
            else:
                ws = np.empty(nbytes.value + 256, dtype=np.uint8)
                base = ws.ctypes.data
            ctx.workspace = base + (-base) % 256  # the C API wants 256-byte alignment
            ctx.workspace_bytes = nbytes.value
            status = fn(ctypes.byref(ctx), *args)
            del ws
        if trace is not None:
            trace.append({"op": self.op, "pointers": dict(self.pointers),
                          "workspace_bytes": nbytes.value})
        if status != 0:
            raise FactorchError(status, err.value.decode() or _core.fct_status_string(status).decode())

    def give(self, res):
        """What the caller gets for an output: its own framework's array."""
        if isinstance(res, tuple) and len(res) == 2 and res[0] == "pending":
            buf = self.results[res[1]]
            ns = getattr(self.ref, "__array_namespace__", None)
            return ns().from_dlpack(buf) if ns is not None else buf
        return res


_TORCH_DTYPES = {(2, 16): torch.float16, (2, 32): torch.float32, (2, 64): torch.float64,
                 (4, 16): torch.bfloat16}


def _torch_dtype(t: DLTensor):
    return _TORCH_DTYPES[(t.dtype.code, t.dtype.bits)]


def _ints(name: str, values, lo: int = 1, min_len: int = 1, max_len: int = MAX_MODES) -> list:
    try:
        vals = [v for v in values]
    except TypeError:
        raise FactorchError(13, f"{name}: expected a sequence of ints, got {values!r}") from None
    if not min_len <= len(vals) <= max_len or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= lo for v in vals):
        raise FactorchError(13, f"{name}: expected {min_len} to {max_len} ints >= {lo}, got "
                            f"{list(values)!r}")
    return [int(v) for v in vals]


def _int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise FactorchError(13, f"{name}: expected an int >= {lo}, got {v!r}")
    return int(v)


def _need(need, allowed) -> set:
    unknown = set(need) - set(allowed)
    if unknown:
        raise ValueError(f"need: expected names among {', '.join(allowed)}, got {sorted(unknown)}")
    return set(need)


# --------------------------------------------------------------------------
# Low rank: y = x·Vᵀ·Uᵀ + bias
# --------------------------------------------------------------------------
def lowrank_linear(x, U, V, bias=None, *, out=None, check_finite: bool = True):
    """``y = x·Vᵀ·Uᵀ + bias``; x ``[..., in]``, U ``[out, r]``, V ``[r, in]``.
    ``out``: an optional ``[..., out]`` array to write into."""
    c = _Call("lowrank_linear", "x", x)
    u = c.borrow("U", U)
    y, res = c.output("y", (*c.ref_view.shape[:-1], u.shape[0]), out=out)
    args = [c.ref_view.ptr, u.ptr, c.ptr("V", V), c.ptr("bias", bias), y, None]
    c.run(_core.fct_lowrank_linear_forward_workspace, _core.fct_lowrank_linear_forward, args,
          check_finite)
    return c.give(res)


def lowrank_linear_backward(grad_y, x, U, V, *, need=("x", "U", "V", "bias"),
                            check_finite: bool = True) -> dict:
    """Gradients of :func:`lowrank_linear` as a dict with the keys in ``need``
    (any of "x", "U", "V", "bias")."""
    need = _need(need, ("x", "U", "V", "bias"))
    c = _Call("lowrank_linear_backward", "grad_y", grad_y)
    xv, uv, vv = c.borrow("x", x), c.borrow("U", U), c.borrow("V", V)
    shapes = {"x": xv.shape, "U": uv.shape, "V": vv.shape, "bias": uv.shape[:1]}
    outs, res = {}, {}
    for k in ("x", "U", "V", "bias"):
        if k in need:
            outs[k], res[k] = c.output("grad_" + k, shapes[k], dtype_of=xv)
    args = [c.ref_view.ptr, xv.ptr, uv.ptr, vv.ptr, None] + [outs.get(k) for k in
                                                             ("x", "U", "V", "bias")]
    c.run(_core.fct_lowrank_linear_backward_workspace, _core.fct_lowrank_linear_backward, args,
          check_finite)
    return {k: c.give(v) for k, v in res.items()}


def _lowrank_flat_shapes(inn, out_features, rank):
    return [(rank, inn), (out_features, rank)]  # V then U


def lowrank_linear_flat(x, weights, bias, out_features: int, rank: int, *, out=None,
                        check_finite: bool = True):
    """:func:`lowrank_linear` on a layer's flat parameter: V ``[rank, in]``
    then U ``[out_features, rank]`` back to back (FactorizedLinear.factors)."""
    out_features, rank = _int("out_features", out_features, 1), _int("rank", rank, 1)
    c = _Call("lowrank_linear_flat", "x", x)
    w = c.carve("weights", c.borrow("weights", weights),
                _lowrank_flat_shapes(c.ref_view.shape[-1], out_features, rank))
    y, res = c.output("y", (*c.ref_view.shape[:-1], out_features), out=out)
    args = [c.ref_view.ptr, w.ptrs[1], w.ptrs[0], c.ptr("bias", bias), y, None]
    c.run(_core.fct_lowrank_linear_forward_workspace, _core.fct_lowrank_linear_forward, args,
          check_finite)
    return c.give(res)


def lowrank_linear_flat_backward(grad_y, x, weights, out_features: int, rank: int, *,
                                 need=("x", "weights", "bias"), check_finite: bool = True) -> dict:
    """Gradients of :func:`lowrank_linear_flat`; "weights" is one flat
    gradient in the parameter's layout."""
    need = _need(need, ("x", "weights", "bias"))
    out_features, rank = _int("out_features", out_features, 1), _int("rank", rank, 1)
    c = _Call("lowrank_linear_flat_backward", "grad_y", grad_y)
    xv = c.borrow("x", x)
    shapes = _lowrank_flat_shapes(xv.shape[-1] if xv.shape else 0, out_features, rank)
    w = c.carve("weights", c.borrow("weights", weights), shapes)
    res, gx, gw, gb = c.flat_grads(need, xv, shapes, out_features)
    gw = [None, None] if gw is None else gw.ptrs
    args = [c.ref_view.ptr, xv.ptr, w.ptrs[1], w.ptrs[0], None, gx, gw[1], gw[0], gb]
    c.run(_core.fct_lowrank_linear_backward_workspace, _core.fct_lowrank_linear_backward, args,
          check_finite)
    return {k: c.give(v) for k, v in res.items()}


# --------------------------------------------------------------------------
# CP, Tucker, TT on the flat layouts of factorch/factorizations.py
# --------------------------------------------------------------------------
def _cp_shapes(in_modes, out_modes, rank):
    return [(i, rank) for i in in_modes] + [(o, rank) for o in out_modes]


def _tucker_shapes(in_modes, out_modes, in_ranks, out_ranks):
    return ([(math.prod(out_ranks), math.prod(in_ranks))] + list(zip(in_modes, in_ranks))
            + list(zip(out_modes, out_ranks)))


def _tt_shapes(in_modes, out_modes, ranks):
    return [(ranks[k], in_modes[k], out_modes[k], ranks[k + 1]) for k in range(len(in_modes))]


def _tensorized_args(kind, in_modes, out_modes, r1, r2=None):
    ins = _ints("in_modes", in_modes)
    outs = _ints("out_modes", out_modes)
    if kind == "cp":
        rank = _int("rank", r1, 1)
        return ins, outs, (rank,), _cp_shapes(ins, outs, rank)
    if kind == "tucker":
        ir = _ints("in_ranks", r1, min_len=len(ins), max_len=len(ins))
        orr = _ints("out_ranks", r2, min_len=len(outs), max_len=len(outs))
        return ins, outs, (ir, orr), _tucker_shapes(ins, outs, ir, orr)
    if len(outs) != len(ins):
        raise FactorchError(13, f"out_modes: expected {len(ins)} output mode sizes (as many as "
                            f"in_modes), got {len(outs)}")
    ranks = _ints("ranks", r1, min_len=len(ins) + 1, max_len=len(ins) + 1)
    return ins, outs, (ranks,), _tt_shapes(ins, outs, ranks)


def _tensorized_forward(kind, x, weights, bias, in_modes, out_modes, r1, r2, out, check_finite):
    ins, outs, _, shapes = _tensorized_args(kind, in_modes, out_modes, r1, r2)
    c = _Call(f"{kind}_linear", "x", x)
    w = c.carve("weights", c.borrow("weights", weights), shapes)
    y, res = c.output("y", (*c.ref_view.shape[:-1], math.prod(outs)), out=out)
    b = c.ptr("bias", bias)
    p, q = len(ins), len(outs)
    xp = c.ref_view.ptr
    if kind == "cp":
        args = [xp, p, w.array(0, p), q, w.array(p), b, y, None]
    elif kind == "tucker":
        args = [xp, w.ptrs[0], p, w.array(1, 1 + p), q, w.array(1 + p), b, y, None]
    else:
        args = [xp, p, w.array(), b, y]
    c.run(getattr(_core, f"fct_{kind}_linear_forward_workspace"),
          getattr(_core, f"fct_{kind}_linear_forward"), args, check_finite)
    return c.give(res)


def _tensorized_backward(kind, grad_y, x, weights, in_modes, out_modes, r1, r2, need,
                         check_finite):
    need = _need(need, ("x", "weights", "bias"))
    ins, outs, _, shapes = _tensorized_args(kind, in_modes, out_modes, r1, r2)
    c = _Call(f"{kind}_linear_backward", "grad_y", grad_y)
    xv = c.borrow("x", x)
    w = c.carve("weights", c.borrow("weights", weights), shapes)
    res, gx, gw, gb = c.flat_grads(need, xv, shapes, math.prod(outs))
    p, q = len(ins), len(outs)
    gy = c.ref_view.ptr

    def g(lo=0, hi=None):
        return None if gw is None else gw.array(lo, hi)

    if kind == "cp":
        args = [gy, xv.ptr, p, w.array(0, p), q, w.array(p), None, gx, g(0, p), g(p), gb]
    elif kind == "tucker":
        args = [gy, xv.ptr, w.ptrs[0], p, w.array(1, 1 + p), q, w.array(1 + p), None, gx,
                None if gw is None else gw.ptrs[0], g(1, 1 + p), g(1 + p), gb]
    else:
        args = [gy, xv.ptr, p, w.array(), gx, g(), gb]
    c.run(getattr(_core, f"fct_{kind}_linear_backward_workspace"),
          getattr(_core, f"fct_{kind}_linear_backward"), args, check_finite)
    return {k: c.give(v) for k, v in res.items()}


_GRADS = ("x", "weights", "bias")


def cp_linear(x, weights, bias, in_modes, out_modes, rank: int, *, out=None,
              check_finite: bool = True):
    """CP linear (``torch.ops.factorch.cp_linear``'s y): weights holds A_k
    ``[i_k, R]`` then B_k ``[o_k, R]``."""
    return _tensorized_forward("cp", x, weights, bias, in_modes, out_modes, rank, None, out,
                               check_finite)


def cp_linear_backward(grad_y, x, weights, in_modes, out_modes, rank: int, *, need=_GRADS,
                       check_finite: bool = True) -> dict:
    return _tensorized_backward("cp", grad_y, x, weights, in_modes, out_modes, rank, None, need,
                                check_finite)


def tucker_linear(x, weights, bias, in_modes, out_modes, in_ranks, out_ranks, *, out=None,
                  check_finite: bool = True):
    """Tucker linear: weights holds the core ``[s.., t..]``, V_k ``[i_k, t_k]``,
    U_k ``[o_k, s_k]``."""
    return _tensorized_forward("tucker", x, weights, bias, in_modes, out_modes, in_ranks,
                               out_ranks, out, check_finite)


def tucker_linear_backward(grad_y, x, weights, in_modes, out_modes, in_ranks, out_ranks, *,
                           need=_GRADS, check_finite: bool = True) -> dict:
    return _tensorized_backward("tucker", grad_y, x, weights, in_modes, out_modes, in_ranks,
                                out_ranks, need, check_finite)


def tt_linear(x, weights, bias, in_modes, out_modes, ranks, *, out=None,
              check_finite: bool = True):
    """TT-matrix linear: weights holds the cores ``[r_(k-1), i_k, o_k, r_k]``."""
    return _tensorized_forward("tt", x, weights, bias, in_modes, out_modes, ranks, None, out,
                               check_finite)


def tt_linear_backward(grad_y, x, weights, in_modes, out_modes, ranks, *, need=_GRADS,
                       check_finite: bool = True) -> dict:
    return _tensorized_backward("tt", grad_y, x, weights, in_modes, out_modes, ranks, None, need,
                                check_finite)


# --------------------------------------------------------------------------
# Convolution chains (stages: 16 ints each, as torch.ops.factorch.conv_chain)
# --------------------------------------------------------------------------
def _stages(stages):
    st = _ints("stages", stages, lo=0, min_len=STAGE_INTS, max_len=STAGE_INTS * 16)
    if len(st) % STAGE_INTS:
        raise FactorchError(13, f"stages: expected {STAGE_INTS} ints per stage, got {len(st)}")
    n = len(st) // STAGE_INTS
    arr = (c_int64 * len(st))(*st)
    err = ctypes.create_string_buffer(512)
    ctx = Context(None, None, 0, 0, ctypes.cast(err, POINTER(c_char)), len(err))
    spi = c_int64(0)
    status = _core.fct_conv_chain_check(ctypes.byref(ctx), n, arr, ctypes.byref(spi))
    if status != 0:
        raise FactorchError(status, err.value.decode())
    per = [st[i:i + STAGE_INTS] for i in range(0, len(st), STAGE_INTS)]
    shapes = [(s[4], s[1] // s[15], s[5], s[6]) for s in per]
    last = per[-1]
    oh = (last[2] + last[9] + last[11] - last[13] * (last[5] - 1) - 1) // last[7] + 1
    ow = (last[3] + last[10] + last[12] - last[14] * (last[6] - 1) - 1) // last[8] + 1
    return n, arr, shapes, int(spi.value), last[0] * last[4] * oh * ow


def conv_chain(x, weights, bias, stages, out_shape, *, keep: bool = False, out=None,
               check_finite: bool = True):
    """A factorized convolution (``torch.ops.factorch.conv_chain``): y
    ``[N, *out_shape]``; with ``keep`` returns ``(y, saved)``, saved being
    what :func:`conv_chain_backward` reads."""
    n, arr, shapes, spi, last = _stages(stages)
    oshape = _ints("out_shape", out_shape, lo=0, max_len=7)
    if math.prod(oshape) != last:
        raise FactorchError(5, f"out_shape: expected sizes multiplying to {last} (the elements "
                            f"per image the last stage writes), got {oshape}")
    c = _Call("conv_chain", "x", x)
    w = c.carve("weights", c.borrow("weights", weights), shapes)
    N = c.ref_view.shape[0] if c.ref_view.shape else 0
    y, res = c.output("y", (N, *oshape), out=out)
    saved, sres = (c.output("saved", (N * spi,)) if keep else (None, None))
    args = [c.ref_view.ptr, n, arr, w.array(), c.ptr("bias", bias), y, saved]
    c.run(_core.fct_conv_chain_forward_workspace, _core.fct_conv_chain_forward, args,
          check_finite)
    return (c.give(res), c.give(sres)) if keep else c.give(res)


def conv_chain_backward(grad_y, x, weights, saved, stages, *, need=_GRADS,
                        check_finite: bool = True) -> dict:
    """Gradients of :func:`conv_chain` (``saved`` from its ``keep=True``
    call; None for a one-stage chain)."""
    need = _need(need, _GRADS)
    n, arr, shapes, _, _ = _stages(stages)
    c = _Call("conv_chain_backward", "grad_y", grad_y)
    xv = c.borrow("x", x)
    w = c.carve("weights", c.borrow("weights", weights), shapes)
    gy_shape = c.ref_view.shape  # bias runs along y's dim 1
    res, gx, gw, gb = c.flat_grads(need, xv, shapes, gy_shape[1] if len(gy_shape) > 1 else 0)
    gw = None if gw is None else gw.array()
    args = [c.ref_view.ptr, xv.ptr, n, arr, w.array(), c.ptr("saved", saved), gx, gw, gb]
    c.run(_core.fct_conv_chain_backward_workspace, _core.fct_conv_chain_backward, args,
          check_finite)
    return {k: c.give(v) for k, v in res.items()}


# --------------------------------------------------------------------------
# Embeddings (outputs in the framework of the factors)
# --------------------------------------------------------------------------
def _pad(padding_idx) -> int:
    if padding_idx is None:
        return -1
    return _int("padding_idx", padding_idx, -1)


def lowrank_embedding(indices, U, V, padding_idx=-1, *, out=None, check_finite: bool = True):
    """Rows of the table ``U·V`` (U ``[num, R]``, V ``[R, dim]``) at indices
    (int32/int64, any shape): y ``[*indices.shape, dim]``."""
    c = _Call("lowrank_embedding", "U", U)
    iv, vv = c.borrow("indices", indices), c.borrow("V", V)
    y, res = c.output("y", (*iv.shape, vv.shape[-1] if vv.shape else 0), out=out)
    args = [iv.ptr, c.ref_view.ptr, vv.ptr, _pad(padding_idx), y]
    c.run(_core.fct_lowrank_embedding_forward_workspace, _core.fct_lowrank_embedding_forward,
          args, check_finite)
    return c.give(res)


def lowrank_embedding_backward(grad_y, indices, U, V, padding_idx=-1, *, need=("U", "V"),
                               check_finite: bool = True) -> dict:
    need = _need(need, ("U", "V"))
    c = _Call("lowrank_embedding_backward", "grad_y", grad_y)
    iv, uv, vv = c.borrow("indices", indices), c.borrow("U", U), c.borrow("V", V)
    outs, res = {}, {}
    for k, v in (("U", uv), ("V", vv)):
        if k in need:
            outs[k], res[k] = c.output("grad_" + k, v.shape, dtype_of=uv)
    args = [c.ref_view.ptr, iv.ptr, uv.ptr, vv.ptr, _pad(padding_idx), outs.get("U"),
            outs.get("V")]
    c.run(_core.fct_lowrank_embedding_backward_workspace, _core.fct_lowrank_embedding_backward,
          args, check_finite)
    return {k: c.give(v) for k, v in res.items()}


def _tt_embedding_args(num_embeddings, modes, dims, ranks):
    modes = _ints("modes", modes)
    dims = _ints("dims", dims, min_len=len(modes), max_len=len(modes))
    ranks = _ints("ranks", ranks, min_len=len(modes) + 1, max_len=len(modes) + 1)
    return _int("num_embeddings", num_embeddings, 1), _tt_shapes(modes, dims, ranks), dims


def tt_embedding(indices, weights, num_embeddings: int, modes, dims, ranks, padding_idx=-1, *,
                 out=None, check_finite: bool = True):
    """Rows of the TT (TT-Rec) table whose cores ``[r_(k-1), n_k, m_k, r_k]``
    are back to back in weights: y ``[*indices.shape, ∏ m_k]``."""
    num, shapes, dims = _tt_embedding_args(num_embeddings, modes, dims, ranks)
    c = _Call("tt_embedding", "weights", weights)
    w = c.carve("weights", c.ref_view, shapes)
    iv = c.borrow("indices", indices)
    y, res = c.output("y", (*iv.shape, math.prod(dims)), out=out)
    args = [iv.ptr, len(shapes), w.array(), num, _pad(padding_idx), y]
    c.run(_core.fct_tt_embedding_forward_workspace, _core.fct_tt_embedding_forward, args,
          check_finite)
    return c.give(res)


def tt_embedding_backward(grad_y, indices, weights, num_embeddings: int, modes, dims, ranks,
                          padding_idx=-1, *, check_finite: bool = True) -> dict:
    """{"weights": the flat gradient of the cores}."""
    num, shapes, _ = _tt_embedding_args(num_embeddings, modes, dims, ranks)
    c = _Call("tt_embedding_backward", "grad_y", grad_y)
    iv = c.borrow("indices", indices)
    wb = c.borrow("weights", weights)
    w = c.carve("weights", wb, shapes)
    _, res = c.output("grad_weights", wb.shape, dtype_of=wb)
    gw = c.carve("grad_weights", c.keep[-1], shapes)
    args = [c.ref_view.ptr, iv.ptr, len(shapes), w.array(), num, _pad(padding_idx), gw.array()]
    c.run(_core.fct_tt_embedding_backward_workspace, _core.fct_tt_embedding_backward, args,
          check_finite)
    return {"weights": c.give(res)}


# --------------------------------------------------------------------------
# LoRA linear: y = base + scale·(drop(x)·Aᵀ)·Bᵀ
# --------------------------------------------------------------------------
def _lora_base(c: _Call, W, U, V, bias, base_out=None, given: bool = False):
    """The fct_lora_base (kept alive by c) and the borrowed W, U, V by name."""
    named = [n for n, v in (("W", W), ("U/V", U if U is not None else V),
                            ("base_out", base_out if not given else True)) if v is not None]
    if len(named) != 1 or (U is None) != (V is None) or (given and bias is not None):
        raise TypeError("base: expected exactly one of W, (U, V) or base_out, got "
                        + (", ".join(named) or "none") + (" and bias" if bias is not None else ""))
    views = {k: c.borrow(k, v) for k, v in (("W", W), ("U", U), ("V", V)) if v is not None}
    kind = 0 if W is not None else 1 if U is not None else 2

    def p(k):
        return views[k].ptr if k in views else None

    base = _LoraBase(kind, 0, p("W"), p("U"), p("V"), c.ptr("bias", bias),
                     c.ptr("base_out", base_out))
    c.keep.append(base)
    return base, views


def _lora_options(scale, dropout, seed) -> _LoraOptions:
    return _LoraOptions(float(scale), float(dropout), int(seed) & (2**64 - 1))


def lora_linear(x, A, B, scale, *, W=None, U=None, V=None, base_out=None, bias=None,
                dropout: float = 0.0, seed: int = 0, out=None, check_finite: bool = True):
    """``y = base + scale·(drop(x)·Aᵀ)·Bᵀ`` with A ``[r, in]``, B ``[out, r]``
    and the base: ``x·Wᵀ + bias`` (W), ``(x·Vᵀ)·Uᵀ + bias`` (U, V) or a given
    ``base_out [..., out]``. Dropout ``p = dropout`` draws its mask from
    ``seed`` (the same mask as ``torch.ops.factorch.lora_linear`` with that
    seed; pass the same seed to :func:`lora_linear_backward`)."""
    c = _Call("lora_linear", "x", x)
    a, b = c.borrow("A", A), c.borrow("B", B)
    base, _ = _lora_base(c, W, U, V, bias, base_out)
    opts = _lora_options(scale, dropout, seed)
    y, res = c.output("y", (*c.ref_view.shape[:-1], b.shape[0] if b.shape else 0), out=out)
    args = [c.ref_view.ptr, a.ptr, b.ptr, ctypes.byref(base), ctypes.byref(opts), y, None]
    c.run(_core.fct_lora_linear_forward_workspace, _core.fct_lora_linear_forward, args,
          check_finite)
    return c.give(res)


def lora_linear_backward(grad_y, x, A, B, scale, *, W=None, U=None, V=None, bias=None,
                         given_base: bool = False, dropout: float = 0.0, seed: int = 0,
                         need=("x", "A", "B"), check_finite: bool = True) -> dict:
    """Gradients of :func:`lora_linear` as a dict with the keys in ``need``
    (any of "x", "A", "B", and of the base "W", "U", "V", "bias"; a frozen
    base asks for none of those). ``given_base=True`` for a forward with
    ``base_out`` (whose gradient is grad_y itself)."""
    need = _need(need, ("x", "A", "B", "W", "U", "V", "bias"))
    c = _Call("lora_linear_backward", "grad_y", grad_y)
    xv, av, bv = c.borrow("x", x), c.borrow("A", A), c.borrow("B", B)
    base, views = _lora_base(c, W, U, V, bias, given=given_base)
    shapes = {"x": xv.shape, "A": av.shape, "B": bv.shape,
              **{k: v.shape for k, v in views.items()}}
    if bias is not None:
        shapes["bias"] = bv.shape[:1]
    grads, res = _LoraGrads(), {}
    for k in ("x", "A", "B", "W", "U", "V", "bias"):
        if k in need:
            if k not in shapes:
                raise TypeError(f"need: {k!r} asked for, but the call has no {k}")
            ptr, res[k] = c.output("grad_" + k, shapes[k], dtype_of=xv)
            setattr(grads, k, ptr)
    c.keep.append(grads)
    opts = _lora_options(scale, dropout, seed)
    args = [c.ref_view.ptr, xv.ptr, av.ptr, bv.ptr, ctypes.byref(base), ctypes.byref(opts), None,
            ctypes.byref(grads)]
    c.run(_core.fct_lora_linear_backward_workspace, _core.fct_lora_linear_backward, args,
          check_finite)
    return {k: c.give(v) for k, v in res.items()}
