"""Fake (meta) kernels and autograd for the ops registered from C.

The schemas and the CPU/CUDA kernels are registered by libfactorch_torch
(torch_glue/register.c); this module adds what torch.compile, torch.export and
training need, on the same names.
"""

from __future__ import annotations

import torch

from . import _lib  # noqa: F401  (registers the ops)

ops = torch.ops.factorch


# --------------------------------------------------------------------------
# Gradients that carry a graph. The C backward ops have no derivative of
# their own, so when a backward runs with the graph being recorded
# (create_graph=True: double backward, gradient penalties, meta-learning)
# and grad_y or a saved input requires grad, the gradients are computed
# instead by differentiating the op's aten definition (factorch/_decomp.py),
# whose result is differentiable again. The usual first-order backward keeps
# the C op.
# --------------------------------------------------------------------------
def _recording(*tensors) -> bool:
    """Whether a backward must return differentiable gradients."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _grads_by_definition(name, inputs, needs, grad_y):
    """d(definition(*inputs)[0])/d(inputs[i]) · grad_y for each i where
    needs[i], with create_graph=True; None elsewhere."""
    from ._decomp import definition

    fn = definition(name)
    wanted = [i for i, n in enumerate(needs) if n]
    out = [None] * len(inputs)
    if not wanted:
        return out
    with torch.enable_grad():
        y = fn(*inputs)
        if isinstance(y, (tuple, list)):
            y = y[0]
        grads = torch.autograd.grad(y, [inputs[i] for i in wanted], grad_y, create_graph=True,
                                    allow_unused=True)
    for i, g in zip(wanted, grads):
        out[i] = torch.zeros_like(inputs[i]) if g is None else g
    return out


# --------------------------------------------------------------------------
# Forward-mode AD and torch.func transforms. The C ops have no forward
# derivative and no batching rule: under forward-mode AD a C op drops the
# tangents (torch.func.jvp / jacfwd saw zeros), and under vmap, grad or
# jacrev it would loop over the batch or fail. The layers and
# factorch.functional therefore call the ops through `call`, which runs the
# op's aten definition (factorch/_decomp.py, written in differentiable,
# batchable torch ops) in those cases, and the C op otherwise. Never while
# torch.compile or torch.export trace: they keep the factorch ops in the graph.
# --------------------------------------------------------------------------
_forward_ad = torch.autograd.forward_ad
_peek_interpreter = torch._C._functorch.peek_interpreter_stack


def needs_definition(args) -> bool:
    """Whether a call on `args` must run the aten definition: a torch.func
    transform is active (its interpreter is on functorch's stack while the
    transformed function runs), or a forward-mode AD level is open and an
    argument has a tangent. Cheap in the usual case (two checks, no loop)."""
    return not torch.compiler.is_compiling() and _transformed(args)


def _transformed(args) -> bool:
    """needs_definition outside torch.compile / torch.export tracing."""
    if _peek_interpreter() is not None:
        return True
    if _forward_ad._current_level < 0:
        return False
    return any(isinstance(a, torch.Tensor) and _forward_ad.unpack_dual(a).tangent is not None
               for a in args)


_overloads: dict = {}
_functions: dict = {}  # op name -> its autograd.Function (_register_autograd)
_BelowAutograd = torch._C._AutoDispatchBelowAutograd
_any_autocast = torch._C._is_any_autocast_enabled
_tracing_state = torch._C._get_tracing_state


def call(name: str, *args):
    """torch.ops.factorch.<name>(*args), or its aten definition where
    :func:`needs_definition` says so. A call that records no graph (no_grad,
    inference, nothing requiring grad) enters the dispatcher below autograd,
    so it skips the op's Python autograd kernel; one that records a graph
    runs the op's autograd.Function at once, the work of its Autograd kernel
    without the dispatcher's round trip into Python (boxing the arguments,
    then unboxing them for the kernel). The functional entry points and the
    layers thus pay for autograd only when they use it, and once. Never
    while torch.compile or torch.export trace (they see the plain op), nor
    under what the dispatcher runs before autograd: autocast (its cast must
    come before the Function saves its inputs, recorded in the graph) and
    torch.jit.trace (which must record the op, not the Function)."""
    op = _overloads.get(name)
    if op is None:
        op = _overloads[name] = getattr(ops, name).default
    if torch.compiler.is_compiling():
        return op(*args)
    if _transformed(args):
        from ._decomp import definition

        return definition(name)(*args)
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        fn = _functions.get(name)
        if fn is None or _any_autocast() or _tracing_state() is not None:
            return op(*args)
        return fn.apply(*args)
    with _BelowAutograd():
        return op(*args)


# --------------------------------------------------------------------------
# Autograd. Each op's Autograd kernel is registered by `_register_autograd`,
# which takes what torch.library.register_autograd takes (the backward and
# setup_context) but builds a leaner kernel: a call that records no graph
# (no_grad, inference, or no input requiring grad) goes straight to the C
# kernel below autograd, and one that does runs a plain autograd.Function.
# register_autograd's kernel walks the schema (fill_defaults, one pybind
# round trip per argument per argument) and the arguments' pytree on every
# call, graph or not. Counted with callgrind at 64×64, rank 8, M = 1, per
# call: the raw op 64k -> 58k instructions under no_grad and 147k -> 82k
# with a graph; the layer (through `call`, below) 108k -> 84k and 221k ->
# 135k; a training step 505k -> 413k (nn.Linear: 45k, 305k).
# --------------------------------------------------------------------------
_autograd_lib = torch.library.Library("factorch", "IMPL")
_after_autograd = torch._C._after_autograd_keyset


def _register_autograd(qualname, backward, setup_context):
    name = qualname.split("::")[1]
    op = getattr(ops, name).default

    # Old-style (forward takes ctx): Function.apply then skips the
    # signature binding that a separate setup_context staticmethod costs on
    # every call. torch.func transforms never reach it (see `call`).
    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                out = op(*args)
            setup_context(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Function.__name__ = Function.__qualname__ = f"{name}_function"
    _functions[name] = Function

    def kernel(keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return Function.apply(*args)
        return op.redispatch(keyset & _after_autograd, *args)

    _autograd_lib.impl(name, kernel, "Autograd", with_keyset=True)


def _check_devices(ref_name, ref, **tensors):
    """Every tensor on ref's device. A fake also runs when only SOME of the
    arguments are meta tensors (the dispatcher then picks the Meta kernel for
    a call on CPU tensors); without this check such a call would return an
    uninitialised CPU tensor instead of raising (the ops' fuzz tests mix
    devices)."""
    for name, t in tensors.items():
        torch._check(
            t.device == ref.device,
            lambda: f"{name}: expected device {ref.device} (the device of {ref_name}), "
            f"got {t.device}",
        )


# --------------------------------------------------------------------------
# lowrank_linear(x, U, V, bias) -> (y, t);  y = x·Vᵀ·Uᵀ + bias,  t = x·Vᵀ
# --------------------------------------------------------------------------
def _check_lowrank(x, U, V, bias):
    torch._check(x.dim() >= 1, lambda: f"x: expected at least 1 dim, got {x.dim()}")
    _check_devices("x", x, U=U, V=V, bias=bias)
    torch._check(U.dim() == 2, lambda: f"U: expected 2 dims [out, r], got {U.dim()}")
    torch._check(V.dim() == 2, lambda: f"V: expected 2 dims [r, in], got {V.dim()}")
    torch._check(
        V.shape[1] == x.shape[-1],
        lambda: f"V: expected [r, in] with in = {x.shape[-1]} (the last dim of x), "
        f"got {list(V.shape)}",
    )
    torch._check(
        U.shape[1] == V.shape[0],
        lambda: f"U: expected [out, r] with r = {V.shape[0]} (the first dim of V), "
        f"got {list(U.shape)}",
    )
    for name, t in (("U", U), ("V", V)):
        torch._check(
            t.dtype == x.dtype,
            lambda: f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}",
        )
    if bias.numel() != 0:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == U.shape[0],
            lambda: f"bias: expected shape [{U.shape[0]}], got {list(bias.shape)}",
        )


@torch.library.register_fake("factorch::lowrank_linear")
def _lowrank_linear_fake(x, U, V, bias):
    _check_lowrank(x, U, V, bias)
    lead = x.shape[:-1]
    return x.new_empty((*lead, U.shape[0])), x.new_empty((*lead, V.shape[0]))


@torch.library.register_fake("factorch::lowrank_linear_backward")
def _lowrank_linear_backward_fake(grad_y, x, U, V, t, need_x, need_U, need_V, need_bias):
    _check_devices("x", x, grad_y=grad_y, U=U, V=V, t=t)

    def out(need, shape):
        return x.new_empty(shape if need else (0,))

    return (
        out(need_x, x.shape),
        out(need_U, U.shape),
        out(need_V, V.shape),
        out(need_bias, (U.shape[0],)),
    )


def _lowrank_linear_setup(ctx, inputs, output):
    x, U, V, bias = inputs
    _, t = output
    ctx.save_for_backward(x, U, V, t, bias)
    ctx.has_bias = bias.numel() != 0
    ctx.mark_non_differentiable(t)


def _lowrank_linear_backward(ctx, grad_y, _grad_t):
    x, U, V, t, bias = ctx.saved_tensors
    nx, nU, nV, nb = ctx.needs_input_grad
    nb = nb and ctx.has_bias
    if _recording(grad_y, x, U, V, bias):
        return tuple(_grads_by_definition("lowrank_linear", (x, U, V, bias), (nx, nU, nV, nb),
                                          grad_y))
    gx, gU, gV, gb = ops.lowrank_linear_backward(grad_y, x, U, V, t, nx, nU, nV, nb)
    return (gx if nx else None, gU if nU else None, gV if nV else None, gb if nb else None)


_register_autograd(
    "factorch::lowrank_linear", _lowrank_linear_backward, setup_context=_lowrank_linear_setup
)


# --------------------------------------------------------------------------
# lowrank_linear_flat(x, weights, bias, out_features, rank) -> (y, t): the
# same on a layer's one flat parameter, V [rank, in] then U [out, rank]; its
# backward returns the factors' gradient as one flat tensor.
# --------------------------------------------------------------------------
def _check_lowrank_flat(x, weights, bias, out_features, rank):
    torch._check(x.dim() >= 1, lambda: f"x: expected at least 1 dim, got {x.dim()}")
    _check_devices("x", x, weights=weights, bias=bias)
    torch._check(out_features >= 1, lambda: f"out_features: expected >= 1, got {out_features}")
    torch._check(rank >= 1, lambda: f"rank: expected >= 1, got {rank}")
    numel = rank * (x.shape[-1] + out_features)
    torch._check(
        weights.dim() == 1 and weights.shape[0] == numel,
        lambda: f"weights: expected a contiguous 1-D tensor of {numel} elements (V [rank, in] "
        f"then U [out_features, rank]), got {weights.dim()} dims with {weights.numel()} elements",
    )
    torch._check(weights.dtype == x.dtype,
                 lambda: f"weights: expected dtype {x.dtype} (the dtype of x), got {weights.dtype}")
    if bias.numel() != 0:
        torch._check(bias.dim() == 1 and bias.shape[0] == out_features,
                     lambda: f"bias: expected shape [{out_features}], got {list(bias.shape)}")


@torch.library.register_fake("factorch::lowrank_linear_flat")
def _lowrank_linear_flat_fake(x, weights, bias, out_features, rank):
    _check_lowrank_flat(x, weights, bias, out_features, rank)
    lead = x.shape[:-1]
    return x.new_empty((*lead, out_features)), x.new_empty((*lead, rank))


@torch.library.register_fake("factorch::lowrank_linear_flat_backward")
def _lowrank_linear_flat_backward_fake(grad_y, x, weights, t, out_features, rank, need_x,
                                       need_weights, need_bias):
    _check_devices("x", x, grad_y=grad_y, weights=weights, t=t)

    def out(need, shape):
        return x.new_empty(shape if need else (0,))

    return out(need_x, x.shape), out(need_weights, weights.shape), out(need_bias, (out_features,))


def _lowrank_linear_flat_setup(ctx, inputs, output):
    x, weights, bias, out_features, rank = inputs
    _, t = output
    ctx.save_for_backward(x, weights, t, bias)
    ctx.shape = (out_features, rank)
    ctx.has_bias = bias.numel() != 0
    ctx.mark_non_differentiable(t)


def _lowrank_linear_flat_backward(ctx, grad_y, _grad_t):
    x, weights, t, bias = ctx.saved_tensors
    nx, nw, nb = ctx.needs_input_grad[:3]
    nb = nb and ctx.has_bias
    if _recording(grad_y, x, weights, bias):
        return tuple(_grads_by_definition("lowrank_linear_flat", (x, weights, bias, *ctx.shape),
                                          (nx, nw, nb, False, False), grad_y))
    gx, gw, gb = ops.lowrank_linear_flat_backward(grad_y, x, weights, t, *ctx.shape, nx, nw, nb)
    return gx if nx else None, gw if nw else None, gb if nb else None, None, None


_register_autograd(
    "factorch::lowrank_linear_flat", _lowrank_linear_flat_backward,
    setup_context=_lowrank_linear_flat_setup
)


# --------------------------------------------------------------------------
# Tensorized layers (CP, Tucker, TT). `weights` is the layer's flat parameter
# holding every factor or core back to back (factorch/factorizations.py gives
# the layout); the mode sizes and ranks are int lists. The fakes only read
# shapes, so they work under torch.compile and torch.export.
# --------------------------------------------------------------------------
def _prod(values):
    out = 1
    for v in values:
        out *= v
    return out


def _check_tensorized(x, weights, bias, numel, out, what):
    torch._check(x.dim() >= 1, lambda: f"x: expected at least 1 dim, got {x.dim()}")
    _check_devices("x", x, weights=weights, bias=bias)
    torch._check(
        weights.dim() == 1 and weights.shape[0] == numel,
        lambda: f"weights: expected a contiguous 1-D tensor of {numel} elements ({what}), "
        f"got shape {list(weights.shape)}",
    )
    torch._check(
        weights.dtype == x.dtype,
        lambda: f"weights: expected dtype {x.dtype} (the dtype of x), got {weights.dtype}",
    )
    if bias.numel() != 0:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == out,
            lambda: f"bias: expected shape [{out}], got {list(bias.shape)}",
        )


def _check_in(x, in_modes, whose):
    n = _prod(in_modes)
    torch._check(
        x.shape[-1] == n,
        lambda: f"x: expected a last dim of {n} (in: the product of the {whose}), "
        f"got {x.shape[-1]}",
    )


def _grads_fake(x, weights, out, need_x, need_weights, need_bias):
    def make(need, shape):
        return x.new_empty(shape if need else (0,))

    return make(need_x, x.shape), make(need_weights, weights.shape), make(need_bias, (out,))


def _cp_numel(in_modes, out_modes, rank):
    return rank * (sum(in_modes) + sum(out_modes))


@torch.library.register_fake("factorch::cp_linear")
def _cp_linear_fake(x, weights, bias, in_modes, out_modes, rank):
    out = _prod(out_modes)
    _check_tensorized(x, weights, bias, _cp_numel(in_modes, out_modes, rank), out,
                      "the CP factors [mode, rank] of in_modes then out_modes")
    _check_in(x, in_modes, "mode sizes of in_factors")
    lead = x.shape[:-1]
    return x.new_empty((*lead, out)), x.new_empty((*lead, rank))


@torch.library.register_fake("factorch::cp_linear_backward")
def _cp_linear_backward_fake(grad_y, x, weights, z, in_modes, out_modes, rank, need_x,
                             need_weights, need_bias):
    _check_devices("x", x, grad_y=grad_y, weights=weights, z=z)
    return _grads_fake(x, weights, _prod(out_modes), need_x, need_weights, need_bias)


def _cp_linear_setup(ctx, inputs, output):
    x, weights, bias, in_modes, out_modes, rank = inputs
    _, z = output
    ctx.save_for_backward(x, weights, z, bias)
    ctx.args = (in_modes, out_modes, rank)
    ctx.has_bias = bias.numel() != 0
    ctx.mark_non_differentiable(z)


def _cp_linear_backward(ctx, grad_y, _grad_z):
    x, weights, z, bias = ctx.saved_tensors
    nx, nw, nb = ctx.needs_input_grad[:3]
    nb = nb and ctx.has_bias
    if _recording(grad_y, x, weights, bias):
        return tuple(_grads_by_definition("cp_linear", (x, weights, bias, *ctx.args),
                                          (nx, nw, nb, False, False, False), grad_y))
    gx, gw, gb = ops.cp_linear_backward(grad_y, x, weights, z, *ctx.args, nx, nw, nb)
    return (gx if nx else None, gw if nw else None, gb if nb else None, None, None, None)


_register_autograd(
    "factorch::cp_linear", _cp_linear_backward, setup_context=_cp_linear_setup
)


def _tucker_numel(in_modes, out_modes, in_ranks, out_ranks):
    return (_prod(in_ranks) * _prod(out_ranks) + sum(i * t for i, t in zip(in_modes, in_ranks))
            + sum(o * s for o, s in zip(out_modes, out_ranks)))


def tucker_states_per_row(in_modes, out_modes, in_ranks, out_ranks) -> int:
    """Elements per row of what tucker_linear keeps for its backward
    (fct_tucker_linear_states, ops/tucker_linear.c): t = x projected on
    every input factor [M, T] and z = t·coreᵀ [M, S], when T + S <= in + out
    (no more than x's and y's rows together); 0 otherwise (the backward
    recomputes them)."""
    k = _prod(in_ranks) + _prod(out_ranks)
    return k if k <= _prod(in_modes) + _prod(out_modes) else 0


@torch.library.register_fake("factorch::tucker_linear")
def _tucker_linear_fake(x, weights, bias, in_modes, out_modes, in_ranks, out_ranks, keep):
    out = _prod(out_modes)
    torch._check(len(in_ranks) == len(in_modes),
                 lambda: f"in_ranks: expected {len(in_modes)} ranks (one per input mode)")
    torch._check(len(out_ranks) == len(out_modes),
                 lambda: f"out_ranks: expected {len(out_modes)} ranks (one per output mode)")
    _check_tensorized(x, weights, bias, _tucker_numel(in_modes, out_modes, in_ranks, out_ranks),
                      out, "the Tucker core then the factors of in_modes then out_modes")
    _check_in(x, in_modes, "mode sizes of in_factors")
    per_row = tucker_states_per_row(in_modes, out_modes, in_ranks, out_ranks) if keep else 0
    return (x.new_empty((*x.shape[:-1], out)),
            x.new_empty((_prod(x.shape[:-1]) * per_row,)))


@torch.library.register_fake("factorch::tucker_linear_backward")
def _tucker_linear_backward_fake(grad_y, x, weights, states, in_modes, out_modes, in_ranks,
                                 out_ranks, need_x, need_weights, need_bias):
    _check_devices("x", x, grad_y=grad_y, weights=weights, states=states)
    return _grads_fake(x, weights, _prod(out_modes), need_x, need_weights, need_bias)


def _tucker_linear_setup(ctx, inputs, output):
    x, weights, bias, *args = inputs
    ctx.save_for_backward(x, weights, output[1], bias)
    ctx.args = tuple(args[:4])  # the lists; keep is not the backward's
    ctx.has_bias = bias.numel() != 0
    ctx.mark_non_differentiable(output[1])


def _tucker_linear_backward(ctx, grad_y, _grad_states):
    x, weights, states, bias = ctx.saved_tensors
    nx, nw, nb = ctx.needs_input_grad[:3]
    nb = nb and ctx.has_bias
    if _recording(grad_y, x, weights, bias):
        return tuple(_grads_by_definition("tucker_linear", (x, weights, bias, *ctx.args, False),
                                          (nx, nw, nb) + (False,) * 5, grad_y))
    gx, gw, gb = ops.tucker_linear_backward(grad_y, x, weights, states, *ctx.args, nx, nw, nb)
    return (gx if nx else None, gw if nw else None, gb if nb else None) + (None,) * 5


def _tensorized_setup(ctx, inputs, output):
    x, weights, bias, *args = inputs
    ctx.save_for_backward(x, weights, bias)
    ctx.args = tuple(args)
    ctx.has_bias = bias.numel() != 0


def _tensorized_backward(op, name):
    def backward(ctx, grad_y):
        x, weights, bias = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad[:3]
        nb = nb and ctx.has_bias
        if _recording(grad_y, x, weights, bias):
            return tuple(_grads_by_definition(name, (x, weights, bias, *ctx.args),
                                              (nx, nw, nb) + (False,) * len(ctx.args), grad_y))
        gx, gw, gb = op(grad_y, x, weights, *ctx.args, nx, nw, nb)
        return (gx if nx else None, gw if nw else None, gb if nb else None) + (None,) * len(ctx.args)

    return backward


_register_autograd(
    "factorch::tucker_linear", _tucker_linear_backward, setup_context=_tucker_linear_setup
)


def _tt_numel(in_modes, out_modes, ranks):
    return sum(ranks[k] * i * o * ranks[k + 1] for k, (i, o) in enumerate(zip(in_modes, out_modes)))


@torch.library.register_fake("factorch::tt_linear")
def _tt_linear_fake(x, weights, bias, in_modes, out_modes, ranks):
    out = _prod(out_modes)
    d = len(in_modes)
    torch._check(len(out_modes) == d,
                 lambda: f"out_modes: expected {d} output mode sizes (as many as in_modes)")
    torch._check(len(ranks) == d + 1 and ranks[0] == 1 and ranks[-1] == 1,
                 lambda: f"ranks: expected d + 1 = {d + 1} ranks starting and ending with 1, "
                 f"got {list(ranks)}")
    _check_tensorized(x, weights, bias, _tt_numel(in_modes, out_modes, ranks), out,
                      "the TT cores [r_k, i_k, o_k, r_(k+1)] one after the other")
    _check_in(x, in_modes, "cores' input modes")
    return x.new_empty((*x.shape[:-1], out))


@torch.library.register_fake("factorch::tt_linear_backward")
def _tt_linear_backward_fake(grad_y, x, weights, in_modes, out_modes, ranks, need_x,
                             need_weights, need_bias):
    _check_devices("x", x, grad_y=grad_y, weights=weights)
    return _grads_fake(x, weights, _prod(out_modes), need_x, need_weights, need_bias)


_register_autograd(
    "factorch::tt_linear",
    _tensorized_backward(ops.tt_linear_backward, "tt_linear"),
    setup_context=_tensorized_setup,
)


# --------------------------------------------------------------------------
# conv_chain(x, weights, bias, stages, out_shape, keep) -> (y, saved): every
# factorized convolution as a chain of convolution stages (ops/conv_chain.c).
# stages: 16 ints per stage (fct_conv_stage's fields, factorch.h); weights:
# each stage's [out_channels, in_channels / groups, kh, kw] back to back;
# saved: the intermediate activations the backward reads, all but the
# recomputed depthwise ones (empty when keep is false, for inference).
# --------------------------------------------------------------------------
STAGE_INTS = 16


def conv_stage_out_numel(stage) -> int:
    """Elements per image a stage writes (stage: its 16 ints)."""
    b, _ci, h, w, co, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, _g = stage
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    return b * co * oh * ow


MAX_STAGES = 16  # FCT_MAX_STAGES


def conv_stage_recomputed(i, n_stages, stage) -> bool:
    """ops/conv_chain.c's rule: a depthwise stage inside the chain (CP's
    filters) is not saved by the forward; the backward recomputes it."""
    ci, co, g = stage[1], stage[4], stage[15]
    return 0 < i < n_stages - 1 and g > 1 and ci == g and co == g


def conv_saved_per_image(st) -> int:
    """Elements per image of `saved` (fct_conv_chain_check): the outputs of
    every stage but the last and the recomputed ones."""
    return sum(conv_stage_out_numel(s) for i, s in enumerate(st[:-1])
               if not conv_stage_recomputed(i, len(st), s))


def _conv_stages(stages):
    torch._check(
        0 < len(stages) <= MAX_STAGES * STAGE_INTS and len(stages) % STAGE_INTS == 0,
        lambda: f"stages: expected {STAGE_INTS} ints per stage for 1 to {MAX_STAGES} stages, "
        f"got {len(stages)} ints",
    )
    st = [stages[i:i + STAGE_INTS] for i in range(0, len(stages), STAGE_INTS)]
    _check_conv_stages(st)
    return st


def _check_conv_stages(st):
    """The checks of fct_conv_chain_check (ops/conv_chain.c), all but the C
    kernels' int32 GEMM limits, so that the fakes (meta tensors,
    torch.compile) reject what the C op rejects, naming `stages`, where a
    stride or groups of 0 would divide by zero and negative or huge sizes
    would fail in new_empty (tests/python/test_fuzz_conv_ops.py). One
    torch._check per condition: they may be symbolic."""
    prev = None
    for i, s in enumerate(st):
        b, ci, h, w, co, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, g = s
        for name, v, lo in (("batch", b, 1), ("in_channels", ci, 1), ("in_h", h, 1),
                            ("in_w", w, 1), ("out_channels", co, 1), ("kh", kh, 1),
                            ("kw", kw, 1), ("stride_h", sh, 1), ("stride_w", sw, 1),
                            ("pad_top", pt, 0), ("pad_left", pl, 0), ("pad_bottom", pb, 0),
                            ("pad_right", pr, 0), ("dil_h", dh, 1), ("dil_w", dw, 1),
                            ("groups", g, 1)):
            torch._check(v >= lo, lambda: f"stages[{i}]: {name} must be >= {lo}, got {v}")
        for v in (ci, co):
            torch._check(v % g == 0,
                         lambda: f"stages[{i}]: groups ({g}) must divide in_channels ({ci}) "
                         f"and out_channels ({co})")
        for k, d, n in ((kh, dh, h + pt + pb), (kw, dw, w + pl + pr)):
            torch._check(d * (k - 1) < n,
                         lambda: f"stages[{i}]: the kernel (with dilation) is larger than the "
                         "padded input")
        out = conv_stage_out_numel(s)
        for v in (b * ci * h * w, out):
            # Symbolic sizes (torch.export's dynamic dims) are left to the C
            # op's own check at run time: a bound here would become a guard
            # that contradicts an unbounded Dim.
            if isinstance(v, int):
                torch._check(v < 2**63, lambda: f"stages[{i}]: sizes overflow int64")
        if prev is not None:
            torch._check(b * ci * h * w == prev,
                         lambda: f"stages[{i}]: reads {b * ci * h * w} elements per image "
                         f"(batch·in_channels·in_h·in_w) but stages[{i - 1}] writes {prev}")
        prev = out


def _conv_weights_numel(stages):
    return sum(st[4] * (st[1] // st[15]) * st[5] * st[6] for st in stages)


@torch.library.register_fake("factorch::conv_chain")
def _conv_chain_fake(x, weights, bias, stages, out_shape, keep):
    st = _conv_stages(stages)
    last = conv_stage_out_numel(st[-1])

    def what():
        return (f"out_shape: expected 1 to 7 non-negative sizes multiplying to {last} (the "
                f"elements per image the last stage writes), got {list(out_shape)}")

    torch._check(1 <= len(out_shape) <= 7, what)
    for v in out_shape:
        torch._check(v >= 0, what)
    torch._check(_prod(out_shape) == last, what)
    _check_tensorized(x, weights, bias, _conv_weights_numel(st), out_shape[0],
                      "each stage's weight [out_channels, in_channels / groups, kh, kw]")
    saved = conv_saved_per_image(st)
    n = x.shape[0]
    return x.new_empty((n, *out_shape)), x.new_empty((n * saved if keep else 0,))


@torch.library.register_fake("factorch::conv_chain_backward")
def _conv_chain_backward_fake(grad_y, x, weights, saved, stages, need_x, need_weights,
                              need_bias):
    _check_devices("x", x, grad_y=grad_y, weights=weights, saved=saved)
    _conv_stages(stages)
    return _grads_fake(x, weights, grad_y.shape[1], need_x, need_weights, need_bias)


def _conv_chain_setup(ctx, inputs, output):
    x, weights, bias, stages, out_shape, _keep = inputs
    ctx.save_for_backward(x, weights, output[1], bias)
    ctx.stages = stages
    ctx.out_shape = out_shape
    ctx.has_bias = bias.numel() != 0


def _conv_chain_backward(ctx, grad_y, _grad_saved):
    x, weights, saved, bias = ctx.saved_tensors
    nx, nw, nb = ctx.needs_input_grad[:3]
    nb = nb and ctx.has_bias
    if _recording(grad_y, x, weights, bias):
        return tuple(_grads_by_definition(
            "conv_chain", (x, weights, bias, ctx.stages, ctx.out_shape, False),
            (nx, nw, nb, False, False, False), grad_y))
    gx, gw, gb = ops.conv_chain_backward(grad_y, x, weights, saved, ctx.stages, nx, nw, nb)
    return gx if nx else None, gw if nw else None, gb if nb else None, None, None, None


_register_autograd(
    "factorch::conv_chain", _conv_chain_backward, setup_context=_conv_chain_setup
)


# --------------------------------------------------------------------------
# Factorized embeddings. y = T[indices] for a table T kept as U·V
# (lowrank_embedding) or as TT cores in one flat tensor (tt_embedding, the
# tensorized layers' layout with the vocabulary modes as input modes and the
# embedding modes as output modes). padding_idx is -1 for none; indices are
# not differentiable. The range of the indices is data: checked by the C
# kernels, not by the fakes.
# --------------------------------------------------------------------------
def _check_indices(indices):
    torch._check(
        indices.dtype in (torch.int64, torch.int32),
        lambda: f"indices: expected dtype int64 or int32, got {indices.dtype}",
    )
    torch._check(
        indices.dim() <= 7,
        lambda: f"indices: expected 0 to 7 dims (the output adds one), got {indices.dim()}",
    )


@torch.library.register_fake("factorch::lowrank_embedding")
def _lowrank_embedding_fake(indices, U, V, padding_idx):
    _check_indices(indices)
    _check_devices("U", U, indices=indices, V=V)
    torch._check(U.dim() == 2, lambda: f"U: expected 2 dims [num_embeddings, R], got {U.dim()}")
    torch._check(V.dim() == 2, lambda: f"V: expected 2 dims [R, embedding_dim], got {V.dim()}")
    torch._check(
        V.shape[0] == U.shape[1],
        lambda: f"V: expected [R, embedding_dim] with R = {U.shape[1]} (the last dim of U), "
        f"got {list(V.shape)}",
    )
    torch._check(
        V.dtype == U.dtype,
        lambda: f"V: expected dtype {U.dtype} (the dtype of U), got {V.dtype}",
    )
    return U.new_empty((*indices.shape, V.shape[1]))


@torch.library.register_fake("factorch::lowrank_embedding_backward")
def _lowrank_embedding_backward_fake(grad_y, indices, U, V, padding_idx, need_U, need_V):
    _check_devices("U", U, grad_y=grad_y, indices=indices, V=V)
    return U.new_empty(U.shape if need_U else (0,)), V.new_empty(V.shape if need_V else (0,))


def _lowrank_embedding_setup(ctx, inputs, output):
    indices, U, V, padding_idx = inputs
    ctx.save_for_backward(indices, U, V)
    ctx.padding_idx = padding_idx


def _lowrank_embedding_backward(ctx, grad_y):
    indices, U, V = ctx.saved_tensors
    nU, nV = ctx.needs_input_grad[1:3]
    if _recording(grad_y, U, V):
        return tuple(_grads_by_definition("lowrank_embedding", (indices, U, V, ctx.padding_idx),
                                          (False, nU, nV, False), grad_y))
    gU, gV = ops.lowrank_embedding_backward(grad_y, indices, U, V, ctx.padding_idx, nU, nV)
    return None, gU if nU else None, gV if nV else None, None


_register_autograd(
    "factorch::lowrank_embedding", _lowrank_embedding_backward,
    setup_context=_lowrank_embedding_setup,
)


def _tt_embedding_dim(weights, modes, dims, ranks):
    d = len(modes)
    torch._check(len(dims) == d,
                 lambda: f"dims: expected {d} embedding mode sizes (as many as modes)")
    torch._check(len(ranks) == d + 1 and ranks[0] == 1 and ranks[-1] == 1,
                 lambda: f"ranks: expected d + 1 = {d + 1} ranks starting and ending with 1, "
                 f"got {list(ranks)}")
    numel = _tt_numel(modes, dims, ranks)
    torch._check(
        weights.dim() == 1 and weights.shape[0] == numel,
        lambda: f"weights: expected a contiguous 1-D tensor of {numel} elements (the TT cores "
        f"[r_k, n_k, m_k, r_(k+1)] one after the other), got shape {list(weights.shape)}",
    )
    return _prod(dims)


@torch.library.register_fake("factorch::tt_embedding")
def _tt_embedding_fake(indices, weights, num_embeddings, modes, dims, ranks, padding_idx):
    _check_indices(indices)
    _check_devices("weights", weights, indices=indices)
    dim = _tt_embedding_dim(weights, modes, dims, ranks)
    return weights.new_empty((*indices.shape, dim))


@torch.library.register_fake("factorch::tt_embedding_backward")
def _tt_embedding_backward_fake(grad_y, indices, weights, num_embeddings, modes, dims, ranks,
                                padding_idx):
    _check_devices("weights", weights, grad_y=grad_y, indices=indices)
    return weights.new_empty(weights.shape)


def _tt_embedding_setup(ctx, inputs, output):
    indices, weights, *args = inputs
    ctx.save_for_backward(indices, weights)
    ctx.args = tuple(args)  # num_embeddings, modes, dims, ranks, padding_idx


def _tt_embedding_backward(ctx, grad_y):
    indices, weights = ctx.saved_tensors
    if _recording(grad_y, weights):
        return tuple(_grads_by_definition("tt_embedding", (indices, weights, *ctx.args),
                                          (False, ctx.needs_input_grad[1]) + (False,) * 5,
                                          grad_y))
    gw = None
    if ctx.needs_input_grad[1]:
        gw = ops.tt_embedding_backward(grad_y, indices, weights, *ctx.args)
    return (None, gw) + (None,) * len(ctx.args)


_register_autograd(
    "factorch::tt_embedding", _tt_embedding_backward, setup_context=_tt_embedding_setup
)


# --------------------------------------------------------------------------
# lora_linear(x, A, B, W, U, V, base_out, bias, seed, base_kind, scale, dropout)
#   -> (y, t);  y = base + scale · t · Bᵀ,  t = drop(x) · Aᵀ
# base_kind: LORA_DENSE (x·Wᵀ + bias), LORA_LOWRANK ((x·Vᵀ)·Uᵀ + bias) or
# LORA_GIVEN (base_out, another layer's output); the tensors of the other
# kinds are empty and ignored. seed: a one-element int64 cpu tensor, read
# only when dropout > 0 (the mask is regenerated from it by the backward).
# --------------------------------------------------------------------------
LORA_DENSE, LORA_LOWRANK, LORA_GIVEN = 0, 1, 2


def _check_lora(x, A, B, W, U, V, base_out, bias, seed, base_kind, scale, dropout):
    torch._check(x.dim() >= 1, lambda: f"x: expected at least 1 dim, got {x.dim()}")
    torch._check(
        base_kind in (LORA_DENSE, LORA_LOWRANK, LORA_GIVEN),
        lambda: f"base_kind: expected 0 (dense), 1 (low-rank) or 2 (given), got {base_kind}",
    )
    torch._check(0.0 <= dropout < 1.0, lambda: f"dropout: expected p in [0, 1), got {dropout}")
    torch._check(A.dim() == 2, lambda: f"A: expected 2 dims [r, in], got {A.dim()}")
    torch._check(B.dim() == 2, lambda: f"B: expected 2 dims [out, r], got {B.dim()}")
    n_in, r, out = x.shape[-1], A.shape[0], B.shape[0]
    torch._check(
        A.shape[1] == n_in,
        lambda: f"A: expected [r, in] with in = {n_in} (the last dim of x), got {list(A.shape)}",
    )
    torch._check(
        B.shape[1] == r,
        lambda: f"B: expected [out, r] with r = {r} (the first dim of A), got {list(B.shape)}",
    )
    used = {"A": A, "B": B}
    if base_kind == LORA_DENSE:
        used["W"] = W
        torch._check(
            W.dim() == 2 and W.shape[0] == out and W.shape[1] == n_in,
            lambda: f"W: expected [out, in] = [{out}, {n_in}], got {list(W.shape)}",
        )
    elif base_kind == LORA_LOWRANK:
        used["U"], used["V"] = U, V
        torch._check(U.dim() == 2 and U.shape[0] == out,
                     lambda: f"U: expected [out, rb] with out = {out}, got {list(U.shape)}")
        torch._check(
            V.dim() == 2 and V.shape[0] == U.shape[1] and V.shape[1] == n_in,
            lambda: f"V: expected [rb, in] = [{U.shape[1]}, {n_in}], got {list(V.shape)}",
        )
    else:
        used["base_out"] = base_out
        want = (*x.shape[:-1], out)
        torch._check(
            tuple(base_out.shape) == want,
            lambda: f"base_out: expected {list(want)} (x's leading dims, out), "
            f"got {list(base_out.shape)}",
        )
        torch._check(bias.numel() == 0,
                     lambda: "bias: expected none with a given base_out (its layer adds it)")
    if bias.numel() != 0:
        used["bias"] = bias
        torch._check(
            bias.dim() == 1 and bias.shape[0] == out,
            lambda: f"bias: expected shape [{out}], got {list(bias.shape)}",
        )
    _check_devices("x", x, **used)
    for name, t in used.items():
        torch._check(
            t.dtype == x.dtype,
            lambda: f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}",
        )
    if dropout > 0:
        torch._check(
            seed.dtype == torch.int64 and seed.numel() == 1 and seed.device.type == "cpu",
            lambda: "seed: expected a one-element int64 cpu tensor when dropout > 0",
        )


@torch.library.register_fake("factorch::lora_linear")
def _lora_linear_fake(x, A, B, W, U, V, base_out, bias, seed, base_kind, scale, dropout):
    _check_lora(x, A, B, W, U, V, base_out, bias, seed, base_kind, scale, dropout)
    lead = x.shape[:-1]
    return x.new_empty((*lead, B.shape[0])), x.new_empty((*lead, A.shape[0]))


@torch.library.register_fake("factorch::lora_linear_backward")
def _lora_linear_backward_fake(grad_y, x, A, B, W, U, V, t, seed, base_kind, scale, dropout,
                               need_x, need_A, need_B, need_W, need_U, need_V, need_bias):
    used = {"grad_y": grad_y, "A": A, "B": B, "t": t}
    if base_kind == LORA_DENSE:
        used["W"] = W
    elif base_kind == LORA_LOWRANK:
        used["U"], used["V"] = U, V
    _check_devices("x", x, **used)

    def out(need, shape):
        return x.new_empty(shape if need else (0,))

    return (out(need_x, x.shape), out(need_A, A.shape), out(need_B, B.shape),
            out(need_W, W.shape), out(need_U, U.shape), out(need_V, V.shape),
            out(need_bias, (B.shape[0],)))


def _lora_linear_setup(ctx, inputs, output):
    x, A, B, W, U, V, base_out, bias, seed, base_kind, scale, dropout = inputs
    _, t = output
    ctx.save_for_backward(x, A, B, W, U, V, t, seed, bias)
    ctx.args = (base_kind, scale, dropout)
    ctx.has_bias = bias.numel() != 0
    ctx.mark_non_differentiable(t)


def _lora_linear_backward(ctx, grad_y, _grad_t):
    x, A, B, W, U, V, t, seed, bias = ctx.saved_tensors
    kind, scale, dropout = ctx.args
    nx, nA, nB, nW, nU, nV, nbo, nb = ctx.needs_input_grad[:8]
    nW = nW and kind == LORA_DENSE
    nU, nV = nU and kind == LORA_LOWRANK, nV and kind == LORA_LOWRANK
    nb = nb and ctx.has_bias
    if _recording(grad_y, x, A, B, W, U, V, bias):
        # The definition regenerates the dropout mask from the seed as the C
        # kernels do. base_out only adds to y: its value does not change the
        # others' gradients.
        base_out = torch.zeros_like(grad_y) if kind == LORA_GIVEN else x.new_empty(0)
        g = _grads_by_definition(
            "lora_linear", (x, A, B, W, U, V, base_out, bias, seed, kind, scale, dropout),
            (nx, nA, nB, nW, nU, nV, False, nb) + (False,) * 4, grad_y)
        g[6] = grad_y if nbo else None
        return tuple(g)
    gx = gA = gB = gW = gU = gV = gb = None
    if nx or nA or nB or nW or nU or nV or nb:
        with torch.no_grad():
            gx, gA, gB, gW, gU, gV, gb = ops.lora_linear_backward(
                grad_y, x, A, B, W, U, V, t, seed, *ctx.args, nx, nA, nB, nW, nU, nV, nb)
    op_grads = (gx if nx else None, gA if nA else None, gB if nB else None,
                gW if nW else None, gU if nU else None, gV if nV else None, gb if nb else None)
    # base_out's gradient is grad_y itself (y = base_out + adapter).
    return op_grads[:6] + (grad_y if nbo else None, op_grads[6]) + (None,) * 4


_register_autograd(
    "factorch::lora_linear", _lora_linear_backward, setup_context=_lora_linear_setup
)


# --------------------------------------------------------------------------
# Autocast. Under torch.autocast a layer before a factorch op (an nn.Linear,
# a matmul) hands it bfloat16 or float16 activations while the factors stay
# float32, which the kernels would reject as a dtype mismatch. Like
# nn.Linear, the ops that take activations cast their floating inputs first:
# on the CPU to float32 (the CPU kernels are float32/float64 only), on CUDA
# to autocast's dtype (the CUDA kernels take bfloat16 and float16 with
# float32 accumulation). float64 tensors are left as they are, as torch's
# autocast does. The embeddings take indices, not activations: see below.
# --------------------------------------------------------------------------
_AUTOCAST_OPS = ("lowrank_linear", "lowrank_linear_flat", "cp_linear", "tucker_linear",
                 "tt_linear", "conv_chain", "lora_linear")
_autocast_lib = torch.library.Library("factorch", "FRAGMENT")


def _autocast_cast(value, device_type, dtype):
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.device.type == device_type and (
                value.dtype is not torch.float64):
            return value.to(dtype)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_autocast_cast(v, device_type, dtype) for v in value)
    return value


def _cuda_autocast_kernel(name):
    op = getattr(ops, name).default
    excluded = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA)

    def kernel(*args):
        dtype = torch.get_autocast_dtype("cuda")
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*_autocast_cast(args, "cuda", dtype))

    return kernel


for _name in _AUTOCAST_OPS:
    torch.library.register_autocast(f"factorch::{_name}", "cpu", torch.float32)
    _autocast_lib.impl(_name, _cuda_autocast_kernel(_name), "AutocastCUDA")

# The embeddings on the CPU: float32 factors are left as they are, and
# bfloat16 / float16 ones (a model.bfloat16() under autocast) are cast to
# float32, which the CPU kernels take. On CUDA they run in their own dtype,
# as nn.Embedding does.
for _name in ("lowrank_embedding", "tt_embedding"):
    torch.library.register_autocast(f"factorch::{_name}", "cpu", torch.float32)
