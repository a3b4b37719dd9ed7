"""Factorized ``nn.Module`` layers."""

from .conv import FactorizedConv1d, FactorizedConv2d
from .embedding import FactorizedEmbedding
from .linear import FactorizedLinear

__all__ = ["FactorizedConv1d", "FactorizedConv2d", "FactorizedEmbedding", "FactorizedLinear"]
