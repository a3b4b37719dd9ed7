"""What the factorch layers share.

- Properties that only some factorizations have (``U`` of a low-rank layer,
  ``cores`` of a TT one, ...): on a layer of another factorization they
  raise AttributeError, so ``hasattr``, ``getattr(m, name, default)`` and
  ``inspect.getmembers`` (which torch.jit.trace runs over a module) treat
  them as absent, with a message saying why.
- The warning of from_linear / from_conv / from_embedding when ``energy``
  picks a rank past break-even (more parameters than the dense layer).
- The input check of the linear layers, wrapped for torch.fx: symbolic
  tracing cannot branch on a Proxy's shape, so the check is recorded as one
  call and runs on the real tensor when the traced module does (callers
  name it ``_common.check_linear_input``: fx patches this module's global).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def check_linear_input(x: Tensor, in_features: int) -> Tensor:
    """x itself, once it is a tensor [..., in_features] (ValueError naming x
    otherwise)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"x: expected at least 1 dim [..., in_features = {in_features}], "
                         "got a 0-d tensor")
    if x.shape[-1] != in_features:
        raise ValueError(f"x: expected a last dim of in_features = {in_features}, "
                         f"got shape {list(x.shape)}")
    return x


torch.fx.wrap("check_linear_input")


def warn_past_break_even(what: str, energy, rank, params: int, dense: int,
                         stacklevel: int = 3) -> None:
    """A UserWarning when the rank ``energy`` picked gives ``params`` factor
    parameters, more than the ``dense`` weight's: the layer would be larger
    (and slower) than the one it replaces."""
    if energy is None or params <= dense:
        return
    warnings.warn(
        f"energy={energy}: the rank it picks, {rank}, gives this {what} {params} parameters, "
        f"more than the {dense} of the dense weight (past break-even, {params / dense:.2f}x); "
        "give a smaller energy, a ratio below 1 or a rank, or keep the layer dense",
        UserWarning, stacklevel=stacklevel)


class FactorViews:
    """Mixin for nn.Module subclasses with a ``factorization`` attribute.

    ``_FACTOR_VIEWS`` maps each such property to the factorizations that have
    it; ``_VIEW_NOUN`` is what the message calls the module. When a property
    raises AttributeError Python falls back to ``__getattr__``, and
    nn.Module's would say only "object has no attribute"; this one keeps the
    reason."""

    _FACTOR_VIEWS: dict[str, tuple[str, ...]] = {}
    _VIEW_NOUN = "layer"

    def _no_view(self, name: str) -> AttributeError:
        allowed = self._FACTOR_VIEWS[name]
        only = ", ".join(repr(a) for a in allowed)
        return AttributeError(f"{name}: a {self.factorization!r} {self._VIEW_NOUN} has none "
                              f"(only {only})")

    def _check_view(self, name: str) -> None:
        """Raises the AttributeError when this layer's factorization has no
        ``name``."""
        if self.factorization not in self._FACTOR_VIEWS[name]:
            raise self._no_view(name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            views = type(self)._FACTOR_VIEWS
            fact = self.__dict__.get("factorization")
            if name in views and fact is not None and fact not in views[name]:
                raise self._no_view(name) from None
            raise
