"""Factorized ``nn.Module`` layers."""

from .linear import FactorizedLinear

__all__ = ["FactorizedLinear"]
