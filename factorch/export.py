"""Deployment of models holding factorch layers: ONNX files and torch.export
programs.

- ``torch.export.export(model, args)`` keeps every ``factorch::`` op as it is
  (the C kernels run when the program runs); ``torch.export.save`` / ``load``
  round-trip it, and a fresh process only needs ``import factorch`` before
  ``torch.export.load`` (the ops are registered on import). :func:`decompose`
  turns the ops into standard aten ops when asked.
- ``torch.onnx.export(model, args, path, dynamo=True)`` works inside
  ``with factorch.export.onnx_ready():``, which lends torch's decomposition
  table a definition of every op in aten ops (factorch/_decomp.py) for the
  block; the exporter uses them for ops it has no ONNX translation of. Each op becomes standard ONNX operators
  (low rank: two MatMul and an Add; CP / Tucker / TT: Reshape and MatMul
  chains in the C plan's contraction order; convolutions: one Conv per stage,
  with groups; embeddings: Gather then MatMul), so onnxruntime and TensorRT
  run the file with no custom domain. :func:`to_onnx` wraps the call, can
  fold tensorized layers into dense weights, and validates the file.

Needs the ``export`` extra (onnx, onnxruntime, onnxscript) for ONNX.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ._decomp import DECOMPOSITIONS, decompositions, in_decomposition_table, register

__all__ = ["to_onnx", "decompose", "decompositions", "register", "DECOMPOSITIONS",
           "folded_weights", "load", "onnx_ready"]

#: ``with onnx_ready(): torch.onnx.export(model, args, path, dynamo=True)``:
#: the factorch ops export as standard ONNX operators inside the block.
onnx_ready = in_decomposition_table

#: ONNX operator domains a factorch export may use: the standard operator
#: set only (no custom domain a runtime would need a plugin for).
STANDARD_DOMAINS = ("", "ai.onnx")


def decompose(program: "torch.export.ExportedProgram") -> "torch.export.ExportedProgram":
    """The program with every factorch op replaced by its aten definition
    (and torch.export's default decompositions applied)."""
    return program.run_decompositions(decompositions())


def load(path) -> "torch.export.ExportedProgram":
    """``torch.export.load`` with the factorch ops registered (importing this
    module did it)."""
    return torch.export.load(str(path))


def _dense_twin(module: nn.Module) -> nn.Module | None:
    """The dense layer computing what a CP / Tucker / TT factorch layer
    computes (None for other modules, low-rank ones included: their two
    MatMuls are already cheaper than the dense one)."""
    from .nn import FactorizedConv1d, FactorizedConv2d, FactorizedEmbedding, FactorizedLinear

    if getattr(module, "factorization", "lowrank") == "lowrank":
        return None
    if isinstance(module, FactorizedLinear):
        return module.to_linear()
    if isinstance(module, (FactorizedConv1d, FactorizedConv2d)):
        return module.to_conv()
    if isinstance(module, FactorizedEmbedding):
        return module.to_embedding()
    return None


@contextlib.contextmanager
def folded_weights(model: nn.Module):
    """Within the block, every CP, Tucker and TT layer of ``model`` (linear,
    convolution, embedding) runs as its dense twin, whose weight W is formed
    once here (so an export stores W as an initializer). The model is put
    back as it was on exit."""
    patched = []
    try:
        for m in list(model.modules()):
            dense = _dense_twin(m)
            if dense is None:
                continue
            dense.train(m.training)
            dense.requires_grad_(False)
            m.add_module("_fct_dense", dense)
            m.__dict__["forward"] = dense.forward  # shadows the class's forward
            patched.append(m)
        yield model
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
            del m._modules["_fct_dense"]


def _check_domains(proto) -> None:
    bad = sorted({n.domain for n in proto.graph.node if n.domain not in STANDARD_DOMAINS})
    bad += sorted({f.domain for f in proto.functions})
    if bad:
        raise RuntimeError(f"to_onnx: the exported graph uses non-standard operator domains {bad}")


def to_onnx(model: nn.Module, example_inputs, path, dynamic_shapes=None, fold_weights: bool = False,
            opset_version: int | None = None, **export_kwargs):
    """Exports ``model`` to the ONNX file ``path`` and validates it.

    Args:
        model: any module holding factorch layers (put it in eval mode first
            for inference graphs: dropout and the like are traced as they are).
        example_inputs: a tuple of positional inputs (or one tensor).
        path: the .onnx file to write (large weights may go to a side file
            next to it, as torch.onnx writes them).
        dynamic_shapes: as ``torch.export.export`` takes them, e.g.
            ``({0: Dim("batch"), 1: Dim("seq")},)`` for one input with dynamic
            batch and sequence dims.
        fold_weights: CP / Tucker / TT layers exported as their dense weight,
            formed once and stored as an initializer (see
            :func:`folded_weights`), instead of their contraction chains.
        opset_version: the ONNX opset (None: the exporter's default).
        export_kwargs: passed on to ``torch.onnx.export``.

    Returns:
        The ``torch.onnx.ONNXProgram``. The file is checked with
        ``onnx.checker`` (full check, shape inference included) and must use
        standard operator domains only.
    """
    import onnx

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    path = Path(path)
    kwargs = dict(dynamo=True, dynamic_shapes=dynamic_shapes, optimize=True, verbose=False)
    if opset_version is not None:
        kwargs["opset_version"] = opset_version
    kwargs.update(export_kwargs)
    fold = folded_weights(model) if fold_weights else contextlib.nullcontext()
    with fold, torch.no_grad(), in_decomposition_table():
        program = torch.onnx.export(model, example_inputs, str(path), **kwargs)
    onnx.checker.check_model(str(path), full_check=True)
    _check_domains(onnx.load(str(path), load_external_data=False))
    return program
