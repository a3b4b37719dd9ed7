"""factorch: factorized (low-rank, CP, Tucker, Tensor-Train) layers for
PyTorch, with forward and backward kernels in C (OpenBLAS) and CUDA C (cuBLAS).
"""

from __future__ import annotations

from . import _lib, _ops, functional, nn  # noqa: F401  (_ops registers fakes/autograd)
from ._config import (get_check_finite, kept_workspace, pool_stalls, release_workspace,
                      set_check_finite, set_stall_policy)
from . import limits  # noqa: E402  (memory and iteration caps of the decompositions and layers)
from . import decompose  # noqa: E402  (decompositions in C: svd, randomized_svd, cp, tucker, TT)
from . import data, evaluate  # noqa: E402  (calibration text, perplexity and speed)
from .compression import CompressionReport, compress, select_targets  # noqa: E402
from .serialize import load_compressed, save_compressed  # noqa: E402
from . import lora  # noqa: E402  (LoRA adapters, merge, PEFT's format)
from . import _decomp, export  # noqa: E402,F401  (aten definitions of the ops; ONNX, torch.export)
from .distill import DistillHistory, distill  # noqa: E402

__version__ = _lib.version()


def cuda_available() -> bool:
    """True when factorch's CUDA backend is loaded (see ``cuda_load_error``)."""
    return bool(_lib.core.fct_cuda_available())


cuda_load_error = _lib.cuda_load_error

__all__ = [
    "functional",
    "nn",
    "decompose",
    "limits",
    "compress",
    "select_targets",
    "CompressionReport",
    "save_compressed",
    "load_compressed",
    "lora",
    "export",
    "distill",
    "DistillHistory",
    "data",
    "evaluate",
    "set_check_finite",
    "set_stall_policy",
    "pool_stalls",
    "release_workspace",
    "kept_workspace",
    "get_check_finite",
    "cuda_available",
    "__version__",
]
