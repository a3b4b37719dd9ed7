"""The layout of a factorch layer in its state_dict.

A layer keeps all its factors in one flat parameter; how that parameter is
read (the factorization, the features, the tensorized modes, the ranks)
lives in the module, not in the tensor. Two layouts can have the same
number of elements (TT modes ((2, 4), (2, 3)) and ((4, 2), (3, 2))), so a
state_dict of one would load into the other and compute something else.
Each layer therefore stores its layout, a dict of ints, strings and lists,
under ``<prefix>_extra_state``, and loading a state_dict whose layout
differs raises naming both. A state_dict without the entry (saved before
layouts were stored) still loads, strict included.

The entry is the layout's JSON text as a uint8 CPU tensor rather than the
dict itself: code that walks a state_dict expecting tensors (transformers'
``save_pretrained`` and safetensors, ``{k: v.clone() for k, v in ...}``,
DDP/FSDP state_dict utilities) keeps working, and ``torch.load`` with
``weights_only=True`` reads it.
"""

from __future__ import annotations

import json

import torch

#: nn.Module's key suffix for get_extra_state.
EXTRA_STATE = "_extra_state"


def plain(v):
    """Tuples as lists, recursively (what the state_dict and JSON keep)."""
    if isinstance(v, (tuple, list)):
        return [plain(a) for a in v]
    return v


def encode(layout: dict) -> torch.Tensor:
    """The layout as a uint8 tensor of its JSON text."""
    return torch.tensor(list(json.dumps(layout, sort_keys=True).encode()), dtype=torch.uint8)


def decode(state):
    """The layout dict an extra state holds, or None when it holds none."""
    if isinstance(state, dict):  # accepted as well: the plain dict
        return state
    if isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1:
        try:
            layout = json.loads(bytes(state.cpu().tolist()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return layout if isinstance(layout, dict) else None
    return None


class LayoutState:
    """Mixin for an nn.Module: ``layout_state()`` -> the dict that
    identifies how its parameters are read."""

    def layout_state(self) -> dict:
        raise NotImplementedError

    def get_extra_state(self) -> torch.Tensor:
        return encode(self.layout_state())

    def _layout_mismatch(self, state, prefix: str = "") -> str | None:
        """Why `state` (a saved extra state) does not fit this layer, or None."""
        own = self.layout_state()
        saved = decode(state)
        if saved is None:
            got = (f"a {state.dtype} tensor of shape {list(state.shape)}"
                   if isinstance(state, torch.Tensor) else type(state).__name__)
            return (f"{prefix}{EXTRA_STATE}: expected a layer layout (the uint8 JSON tensor "
                    f"{type(self).__name__}.get_extra_state writes), got {got}")
        if plain(saved) != own:
            return (f"{prefix}{EXTRA_STATE}: the state_dict was saved from a "
                    f"{type(self).__name__} with layout {saved}, this layer has layout {own}; "
                    "the factors would be read in another layout (build the layer with the "
                    "saved factorization, ranks and tensorized_shape before loading)")
        return None

    def set_extra_state(self, state) -> None:
        msg = self._layout_mismatch(state)
        if msg is not None:
            raise ValueError(msg)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + EXTRA_STATE
        if key in state_dict:
            # Checked before any tensor is copied: a mismatch leaves the layer as it was.
            msg = self._layout_mismatch(state_dict[key], prefix)
            if msg is not None:
                error_msgs.append(msg)
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)  # saved before layouts were stored: accepted
