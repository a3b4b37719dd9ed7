"""FactorizedConv1d / FactorizedConv2d: drop-ins for nn.Conv1d / nn.Conv2d
whose kernel is kept factorized (CP, Tucker-2, low-rank or Tensor-Train) and
run as ONE fused C op per direction (``torch.ops.factorch.conv_chain``; the
layouts are in factorch/_conv_layout.py, the kernels in ops/conv_chain.c)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from .. import _ops, limits
from .._conv_layout import FACTORIZATIONS, ConvGeometry, ConvLayout, resolve_rank, tt_modes
from ._common import FactorViews
from ._layout_state import LayoutState, plain

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _pos_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return v


def _per_axis(name: str, v, nd: int, lo: int) -> tuple:
    vals = (v,) * nd if isinstance(v, int) and not isinstance(v, bool) else v
    if not isinstance(vals, (tuple, list)) or len(vals) != nd or not all(
        isinstance(a, int) and not isinstance(a, bool) and a >= lo for a in vals
    ):
        what = "positive" if lo == 1 else "non-negative"
        raise ValueError(f"{name}: expected a {what} int or {nd} of them, got {v!r}")
    return tuple(vals)


class _FactorizedConvNd(FactorViews, LayoutState, nn.Module):
    _nd = 2
    _FACTOR_VIEWS = {"U": ("lowrank",), "V": ("lowrank",)}
    _VIEW_NOUN = "convolution"

    def __init__(self, in_channels, out_channels, kernel_size, factorization="tucker",
                 rank=0.25, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode="zeros", tensorized_shape=None, device=None, dtype=None) -> None:
        super().__init__()
        nd = self._nd
        if factorization not in FACTORIZATIONS:
            raise ValueError(
                f"factorization: expected one of {list(FACTORIZATIONS)}, got {factorization!r}"
            )
        self.in_channels = _pos_int("in_channels", in_channels)
        self.out_channels = _pos_int("out_channels", out_channels)
        self.groups = _pos_int("groups", groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups: in_channels ({in_channels}) and out_channels ({out_channels}) must "
                f"be divisible by groups ({groups})"
            )
        self.kernel_size = _per_axis("kernel_size", kernel_size, nd, 1)
        self.stride = _per_axis("stride", stride, nd, 1)
        self.dilation = _per_axis("dilation", dilation, nd, 1)
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode: expected one of {list(_PADDING_MODES)}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding: expected 'same', 'valid', or ints, got {padding!r}")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
            self.padding = padding
            if padding == "valid":
                pads = ((0, 0),) * nd
            else:  # as torch: the odd pixel goes after
                tot = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
                pads = tuple((t // 2, t - t // 2) for t in tot)
        else:
            self.padding = _per_axis("padding", padding, nd, 0)
            pads = tuple((p, p) for p in self.padding)
        self._pads = pads  # per axis (before, after)
        if factorization == "tt" and groups != 1:
            raise ValueError("groups: factorization='tt' supports groups=1 only")
        self.factorization = factorization
        # The op sees 2-D geometry; padding it does itself only for "zeros".
        pad2 = pads if padding_mode == "zeros" else ((0, 0),) * nd
        lift = (lambda t, one: (one, *t)) if nd == 1 else (lambda t, one: tuple(t))
        self._geom = ConvGeometry(in_channels, out_channels, lift(self.kernel_size, 1),
                                  lift(self.stride, 1), lift(pad2, (0, 0)),
                                  lift(self.dilation, 1), groups)
        ins = outs = ()
        if factorization == "tt":
            ins, outs = tt_modes(tensorized_shape, in_channels, out_channels)
            self.tensorized_shape = (ins, outs)
        elif tensorized_shape is not None:
            raise ValueError("tensorized_shape: only for factorization='tt'")
        self._layout = ConvLayout(factorization, self._geom,
                                  resolve_rank(factorization, rank, self._geom, ins, outs),
                                  tuple(ins), tuple(outs))
        #: lowrank, cp: R (per group); tucker: (R_in, R_out); tt: (r_1, .., r_(d-1), r_spatial).
        self.rank = self._layout.rank
        limits.check_layer_parameters(
            "rank", f"a {factorization!r} convolution {in_channels} -> {out_channels} of rank "
            f"{self.rank}", self._layout.num_parameters, device, dtype)
        kw = {"device": device, "dtype": dtype}
        self.factors = nn.Parameter(torch.empty(self._layout.num_parameters, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **kw))
        else:
            self.register_parameter("bias", None)
        #: Relative Frobenius error of the kernel when built by from_conv.
        self.reconstruction_error: float | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._layout.init_(self.factors)
        if self.bias is not None:
            fan_in = self.in_channels // self.groups * math.prod(self.kernel_size)
            b = 1 / math.sqrt(fan_in)
            with torch.no_grad():
                self.bias.uniform_(-b, b)

    def layout_state(self) -> dict:
        """How ``factors`` is read, as plain data; stored in the state_dict
        (``_extra_state``) and checked on load (factorch/nn/_layout_state.py).
        Stride, padding and dilation are not part of it: they change the
        computation, not how the kernel's factors are stored."""
        return {"factorization": self.factorization, "in_channels": self.in_channels,
                "out_channels": self.out_channels, "kernel_size": plain(self.kernel_size),
                "groups": self.groups, "rank": plain(self._layout.rank),
                "tensorized_shape": plain(getattr(self, "tensorized_shape", None))}

    # ---- views ------------------------------------------------------------
    @property
    def weights(self) -> list[Tensor]:
        """Each stage's weight [out_channels, in_channels / groups, kh, kw],
        views of ``factors`` (layouts in factorch/_conv_layout.py)."""
        return self._layout.views(self.factors)

    def _lowrank_views(self, what: str) -> list[Tensor]:
        self._check_view(what)
        return self.weights

    @property
    def U(self) -> Tensor:
        """lowrank: ``U [C_out, R]``, the 1x1 stage (a view of ``factors``;
        with groups, group g's rows multiply its own R channels)."""
        u = self._lowrank_views("U")[1]
        return u.view(u.shape[0], u.shape[1])

    @property
    def V(self) -> Tensor:
        """lowrank: ``V [g·R, C_in / g · kh · kw]``, the kh×kw stage as a
        matrix (a view of ``factors``); W_g = U_g · V_g as for a linear layer."""
        v = self._lowrank_views("V")[0]
        return v.view(v.shape[0], -1)

    # ---- forward ----------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return _conv_forward(x, self.factors, self.bias, self._layout, self._nd, self._pads,
                             self.padding_mode)

    # ---- from / to dense ----------------------------------------------------
    @classmethod
    def from_conv(cls, conv, factorization: str = "tucker", rank=None, ratio=None, energy=None,
                  tensorized_shape=None):
        """Factorizes a trained convolution with factorch's C decompositions
        (float64, each group's kernel on its own): truncated SVD of the kernel
        as [C_out, C_in·kh·kw] for ``"lowrank"``, Tucker-HOOI on the channel
        modes (the spatial modes kept whole) for ``"tucker"``, CP-ALS for
        ``"cp"``, TT-SVD with the spatial kernel as the last core for ``"tt"``.

        Exactly one of ``rank`` (as the constructor takes it), ``ratio``
        (fraction of the dense parameter count) or ``energy`` (lowrank: share
        of the squared singular values kept; tucker: the same per channel
        mode; tt: TT-SVD's relative error bound ``sqrt(1 - energy)``; not for
        cp). Every option of ``conv`` carries over; the relative Frobenius
        error of the kernel is in ``reconstruction_error``. When ``energy``
        picks a rank with more parameters than the dense kernel (past
        break-even) a UserWarning says so."""
        from ._conv_from import from_conv

        return from_conv(cls, conv, factorization, rank, ratio, energy, tensorized_shape)

    # ---- dense ------------------------------------------------------------
    def dense_weight(self) -> Tensor:
        """The dense kernel [C_out, C_in / groups, *kernel_size] (formed)."""
        w = self._layout.reconstruct(self.factors.detach())
        return w.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def weight(self) -> Tensor:
        """The dense kernel [C_out, C_in / groups, *kernel_size] the factors
        represent, formed on each access and differentiable; not a parameter
        (training updates ``factors``) and never formed by the forward. For
        code written for nn.Conv that reads ``.weight``: transformers' vision
        patch embeddings (ViT, CLIP, SigLIP, ...) cast their input to
        ``projection.weight.dtype`` in every forward."""
        w = self._layout.reconstruct(self.factors)
        return w.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def _dense_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups, bias=self.bias is not None,
                    padding_mode=self.padding_mode, device=self.factors.device,
                    dtype=self.factors.dtype)

    @property
    def num_parameters(self) -> int:
        return self.factors.numel() + (self.bias.numel() if self.bias is not None else 0)

    @property
    def compression_ratio(self) -> float:
        """Parameters of the dense layer over this layer's."""
        dense = self.out_channels * (self.in_channels // self.groups) * math.prod(self.kernel_size)
        dense += self.out_channels if self.bias is not None else 0
        return dense / self.num_parameters

    def flops(self, input_size, batch: int = 1) -> int:
        """2 × multiply-adds of the forward for `batch` inputs of spatial
        size `input_size` ((H, W), or L for 1-D), bias excluded."""
        return self._layout.flops(*self._chain_size(input_size), batch)

    def _chain_size(self, input_size) -> tuple[int, int]:
        """(H, W) as the chain sees an input of spatial size ``input_size``
        ((H, W), or L for 1-D): after a non-zero padding_mode's padding."""
        if self._nd == 1:
            h, w = 1, input_size if isinstance(input_size, int) else input_size[0]
        else:
            h, w = input_size
        if self.padding_mode != "zeros":
            h += self._pads[0][0] + self._pads[0][1] if self._nd == 2 else 0
            w += self._pads[-1][0] + self._pads[-1][1]
        return h, w

    def plan(self, input_size, batch: int = 1) -> dict:
        """What the C op would do for ``batch`` inputs of spatial size
        ``input_size`` ((H, W), or L for 1-D; before a non-zero
        padding_mode's padding): FLOPs forward and backward, workspace bytes,
        and per direction the strategy: "contract" (the chain of stages) or
        "form_w" (the dense kernel formed from the factors, then one dense
        convolution; only for chains that compose into one convolution, on
        the CPU). ``forward_strategy`` is an inference forward's; a training
        forward follows ``backward_strategy``. ``plan`` says whether the chain
        composes and both strategies' prices."""
        return self._plan(input_size, batch, 0)

    def _plan(self, input_size, batch: int, flags: int) -> dict:
        """plan with the C op's FCT_FLAG_* bits (the FORCE flags in tests)."""
        import ctypes

        from .. import _lib
        from ..factorizations import _DTYPES, _PlanInfo
        from .._dlpack_abi import DLDataType, DLDevice

        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
            raise ValueError(f"batch: expected a non-negative int, got {batch!r}")
        flat, _ = self._layout.stages(*self._chain_size(input_size))
        n = len(flat) // _ops.STAGE_INTS
        dev = DLDevice(2 if self.factors.device.type == "cuda" else 1, 0)
        code, bits = _DTYPES.get(self.factors.dtype, (2, 32))
        info = _PlanInfo()
        st = _lib.core.fct_conv_chain_plan(
            ctypes.c_int(n), (ctypes.c_int64 * len(flat))(*flat), ctypes.c_int64(batch), dev,
            DLDataType(code, bits, 1), ctypes.c_uint32(flags), ctypes.byref(info))
        if st != 0:
            raise ValueError(f"plan: the C op refused the stages "
                             f"({_lib.core.fct_status_string(st).decode()})")
        return info.as_dict()

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"factorization={self.factorization!r}, rank={self.rank}, stride={self.stride}")
        if self.padding not in (0, (0,) * self._nd):
            s += f", padding={self.padding}"
        if self.dilation != (1,) * self._nd:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", compression={self.compression_ratio:.1f}x"


class FactorizedConv2d(_FactorizedConvNd):
    """``nn.Conv2d`` with the kernel kept factorized.

    factorization:
      - ``"cp"``: 1x1 C_in→R, depthwise kh×1, depthwise 1×kw, 1x1 R→C_out
        (Lebedev et al.); rank: R (an int) or a fraction.
      - ``"tucker"``: 1x1 C_in→R_in, kh×kw R_in→R_out, 1x1 R_out→C_out
        (Tucker-2, Kim et al.); rank: an int, (R_in, R_out) or a fraction.
      - ``"lowrank"``: kh×kw C_in→R, 1x1 R→C_out (truncated SVD of the kernel
        as [C_out, C_in·kh·kw]); rank: R or a fraction.
      - ``"tt"``: a Tensor-Train over the channel modes (``tensorized_shape``
        ((i_1..i_d), (o_1..o_d)), or balanced modes when None) with the
        spatial kernel in one more core; rank: an int, the d ranks
        (r_1..r_(d-1), then the spatial core's) or a fraction.

    A fraction in (0, 1] (or "same") is the share of the dense kernel's
    parameters to keep. With ``groups`` > 1 each group's kernel is factorized
    on its own (ranks are per group). Every ``nn.Conv2d`` option works:
    stride, padding (ints, per axis, "same", "valid"), dilation, groups, bias,
    padding_mode (non-zero modes pad with ``F.pad`` first, as torch does).
    The whole chain runs as one C op forward and one backward; training
    keeps the chain's rank-sized intermediate activations for the backward.
    """

    _nd = 2

    def to_conv(self) -> nn.Conv2d:
        """The dense nn.Conv2d computing the same function."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                         **self._dense_kwargs())
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv


class FactorizedConv1d(_FactorizedConvNd):
    """``nn.Conv1d`` with the kernel kept factorized; see FactorizedConv2d
    (the CP chain has no height filter: 1x1, depthwise 1×k, 1x1)."""

    _nd = 1

    def to_conv(self) -> nn.Conv1d:
        conv = nn.Conv1d(self.in_channels, self.out_channels, self.kernel_size,
                         **self._dense_kwargs())
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv


def _conv_forward(x: Tensor, factors: Tensor, bias: Tensor | None, layout: ConvLayout, nd: int,
                  pads: tuple, padding_mode: str) -> Tensor:
    """A factorized convolution's forward: checks x [N, C, (H,) W] (or
    unbatched), pads it for a non-zero padding_mode and runs the stage chain
    (one op). A function of tensors and plain values, wrapped for torch.fx
    below: symbolic tracing cannot compute the stage list from a Proxy's
    shape, so the traced graph calls this with the real tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a Tensor, got {type(x).__name__}")
    if x.dim() not in (nd + 1, nd + 2):
        raise ValueError(
            f"x: expected {nd + 2} dims [N, C, {'H, W' if nd == 2 else 'L'}] (or {nd + 1} "
            f"unbatched), got {x.dim()}"
        )
    G = layout.geom
    c = x.shape[-nd - 1]
    if c != G.in_channels:
        raise ValueError(f"x: expected {G.in_channels} channels (dim {-nd - 1}), got {c}")
    unbatched = x.dim() == nd + 1
    if unbatched:
        x = x.unsqueeze(0)
    if padding_mode != "zeros":
        # torch reflects only within the input (padding < size), wraps around
        # at most once (padding <= size) and replicates an edge that exists:
        # checked here so that the error names x.
        for ax, (before, after) in enumerate(pads):
            dim = x.dim() - nd + ax
            size, big = x.shape[dim], max(before, after)
            need = {"reflect": big + 1, "circular": big}.get(padding_mode, 1 if big else 0)
            if size < need:
                raise ValueError(f"x: padding_mode={padding_mode!r} with padding {big} needs a "
                                 f"size of at least {need} along dim {dim}, got {size}")
        flat_pads = [p for ax in reversed(pads) for p in ax]
        x = TF.pad(x, flat_pads, mode=padding_mode)
    n = x.shape[0]
    h, w = (1, x.shape[-1]) if nd == 1 else (x.shape[-2], x.shape[-1])
    if torch.jit.is_tracing():
        # The tracer hands sizes as tensors, which the op's SymInt[] stage
        # list cannot hold: the trace is specialised to this input size (the
        # op rejects inputs of another size).
        h, w = int(h), int(w)
    for ax, size in ((0, h), (1, w)):
        padded = size + G.pads[ax][0] + G.pads[ax][1]
        extent = G.dilation[ax] * (G.kernel[ax] - 1) + 1
        if extent > padded:
            raise ValueError(
                f"x: the padded input ({padded} along axis {ax - 2 + (nd == 2)}) is smaller "
                f"than the dilated kernel ({extent})"
            )
    stages, out_shape = layout.stages(h, w)
    if nd == 1:
        out_shape = [out_shape[0], out_shape[2]]
    bias = bias if bias is not None else x.new_empty(0)
    args = (x, factors, bias)
    # keep: the C op saves the intermediate activations for its backward
    # when one can follow (a jit trace records one value for every later
    # call, so it keeps them: the traced module then trains too); the torch
    # definition (forward mode, torch.func) has autograd's own.
    keep = (torch.jit.is_tracing() or (
        torch.is_grad_enabled() and any(t.requires_grad for t in args))) and (
        not _ops.needs_definition(args))
    y, _ = _ops.call("conv_chain", *args, stages, out_shape, keep)
    return y.squeeze(0) if unbatched and n == 1 else y


torch.fx.wrap("_conv_forward")
