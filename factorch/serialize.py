"""Saving a compressed model without pickles, and loading it back into a
freshly built dense model of the same architecture.

A saved model is a folder:
    model.safetensors  every tensor of the model's state_dict (tied tensors once)
    factorch.json      the format version, the factorch version, the SHA-256
                       of model.safetensors, and for every factorch layer what
                       is needed to build it: its class, factorization,
                       shapes, ranks, options and dtype.

``load_compressed`` checks the format version and the checksum, builds each
listed layer in place of the dense module of the same name (which must have
the same shape), then loads every tensor with ``load_state_dict(strict=True)``
after checking that dtypes and shapes agree, so the result is bit-exact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from .compression import _set_module
from .factorizations import LowRank
from .nn import FactorizedConv1d, FactorizedConv2d, FactorizedEmbedding, FactorizedLinear
from .nn._layout_state import EXTRA_STATE, LayoutState

FORMAT = "factorch-compressed"
#: 2: every factorch layer keeps its factors in one flat ``factors`` tensor.
#: 1 (read too): low-rank linears and embeddings kept ``U`` and ``V``.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
TENSORS = "model.safetensors"
META = "factorch.json"

_CLASSES = {c.__name__: c for c in (FactorizedLinear, FactorizedConv1d, FactorizedConv2d,
                                    FactorizedEmbedding)}
_DENSE = {"FactorizedLinear": nn.Linear, "FactorizedConv1d": nn.Conv1d,
          "FactorizedConv2d": nn.Conv2d, "FactorizedEmbedding": nn.Embedding}


class CompressedFormatError(ValueError):
    """A saved compressed model that cannot be loaded as it is."""


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:
        raise ImportError("save_compressed/load_compressed need safetensors: "
                          "pip install 'factorch[hf]' (or safetensors)") from e
    return st


def _jsonable(v):
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return v


def _tupled(v):
    if isinstance(v, list):
        return tuple(_tupled(x) for x in v)
    return v


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def layer_spec(m: nn.Module) -> dict:
    """What rebuilding a factorch layer takes (its constructor's arguments)."""
    name = type(m).__name__
    ref = next(m.parameters())
    spec = {"type": name, "factorization": m.factorization, "rank": _jsonable(m.rank),
            "tensorized_shape": _jsonable(getattr(m, "tensorized_shape", None)),
            "dtype": _dtype_name(ref.dtype)}
    if isinstance(m, FactorizedLinear):
        spec.update(in_features=m.in_features, out_features=m.out_features,
                    bias=m.bias is not None)
    elif isinstance(m, (FactorizedConv1d, FactorizedConv2d)):
        spec.update(in_channels=m.in_channels, out_channels=m.out_channels,
                    kernel_size=list(m.kernel_size), stride=list(m.stride),
                    padding=m.padding if isinstance(m.padding, str) else list(m.padding),
                    dilation=list(m.dilation), groups=m.groups, bias=m.bias is not None,
                    padding_mode=m.padding_mode)
    elif isinstance(m, FactorizedEmbedding):
        spec.update(num_embeddings=m.num_embeddings, embedding_dim=m.embedding_dim,
                    padding_idx=m.padding_idx)
    else:
        raise TypeError(f"layer_spec: not a factorch layer: {name}")
    return spec


def _build(spec: dict, device) -> nn.Module:
    cls = _CLASSES[spec["type"]]
    dtype = getattr(torch, spec["dtype"])
    shape = _tupled(spec["tensorized_shape"]) if spec["factorization"] != "lowrank" else None
    common = dict(factorization=spec["factorization"], rank=_tupled(spec["rank"]),
                  tensorized_shape=shape, device=device, dtype=dtype)
    if cls is FactorizedLinear:
        return cls(spec["in_features"], spec["out_features"], bias=spec["bias"], **common)
    if cls is FactorizedEmbedding:
        return cls(spec["num_embeddings"], spec["embedding_dim"],
                   padding_idx=spec["padding_idx"], **common)
    if spec["factorization"] != "tt":
        common.pop("tensorized_shape")
    pad = spec["padding"]
    return cls(spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]),
               stride=tuple(spec["stride"]), padding=pad if isinstance(pad, str) else tuple(pad),
               dilation=tuple(spec["dilation"]), groups=spec["groups"], bias=spec["bias"],
               padding_mode=spec["padding_mode"], **common)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _version() -> str:
    from . import __version__

    return __version__


def save_compressed(model: nn.Module, directory, report=None) -> Path:
    """Writes ``model`` (with its factorch layers) to ``directory``:
    ``model.safetensors`` and ``factorch.json`` (plus ``report.json`` when a
    :class:`~factorch.compression.CompressionReport` is given). Returns the
    folder."""
    st = _safetensors()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    layers = {n: layer_spec(m) for n, m in model.named_modules() if type(m).__name__ in _CLASSES}
    tensors, aliases, seen = {}, {}, {}
    for k, v in _tensors(model).items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape),
               tuple(v.stride()), v.dtype) if v.device.type != "meta" else None
        if key is not None and key in seen:  # tied weights (an LM head sharing the embedding)
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        tensors[k] = v.detach().contiguous().cpu()
    st.save_file(tensors, str(d / TENSORS))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "factorch_version": _version(),
            "torch_version": torch.__version__, "model_class": type(model).__name__,
            "sha256": _sha256(d / TENSORS), "layers": layers, "aliases": aliases}
    (d / META).write_text(json.dumps(meta, indent=1))
    if report is not None:
        report.to_json(d / "report.json")
    return d


def read_meta(directory) -> dict:
    """factorch.json of a saved model, checked for its format and version."""
    p = Path(directory) / META
    if not p.is_file():
        raise FileNotFoundError(f"directory: no {META} in {directory} (not written by "
                                "factorch.save_compressed)")
    try:
        meta = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompressedFormatError(f"{p}: not valid JSON ({e}); the file is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CompressedFormatError(f"{p}: not a factorch compressed model (format "
                                    f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise CompressedFormatError(
            f"{p}: format version {meta.get('format_version')!r} (written by factorch "
            f"{meta.get('factorch_version')}); this factorch ({_version()}) reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}")
    for key, kind in (("layers", dict), ("aliases", dict), ("sha256", str)):
        if not isinstance(meta.get(key), kind):
            raise CompressedFormatError(f"{p}: '{key}' is missing or not a {kind.__name__}")
    return meta


def load_compressed(model: nn.Module, directory, check_sha256: bool = True) -> nn.Module:
    """Turns ``model`` (a dense model of the architecture that was saved,
    freshly built, any weights) into the saved compressed model, in place,
    bit-exact. Returns ``model``.

    Raises CompressedFormatError for a damaged or foreign folder, a format
    version this factorch does not read, or a model that does not match
    (a module missing or of another shape, tensors missing or extra)."""
    st = _safetensors()
    d = Path(directory)
    meta = read_meta(d)
    path = d / TENSORS
    if not path.is_file():
        raise FileNotFoundError(f"directory: no {TENSORS} in {directory}")
    if check_sha256 and _sha256(path) != meta["sha256"]:
        raise CompressedFormatError(f"{path}: its SHA-256 differs from the one recorded in "
                                    f"{META}: the file was changed or damaged")
    plan = []
    for name, spec in meta["layers"].items():
        if not isinstance(spec, dict) or spec.get("type") not in _CLASSES:
            raise CompressedFormatError(f"{META}: layer {name!r} has no known type")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CompressedFormatError(
                f"model: has no module {name!r} (saved from a {meta.get('model_class')}): "
                "not the architecture that was saved") from None
        want = _DENSE[spec["type"]]
        if not isinstance(old, (want, _CLASSES[spec["type"]])):
            raise CompressedFormatError(f"model: {name} is a {type(old).__name__}, the saved "
                                        f"layer replaces an {want.__name__}")
        dims = {"FactorizedLinear": ("in_features", "out_features"),
                "FactorizedEmbedding": ("num_embeddings", "embedding_dim")}.get(
                    spec["type"], ("in_channels", "out_channels"))
        for k in dims:
            if getattr(old, k) != spec.get(k):
                raise CompressedFormatError(f"model: {name}.{k} is {getattr(old, k)}, the saved "
                                            f"layer has {spec.get(k)}")
        ref = next(old.parameters())
        try:
            layer = _build(spec, ref.device)
        except (TypeError, ValueError, KeyError) as e:
            raise CompressedFormatError(f"{META}: layer {name!r} cannot be built: {e}") from None
        plan.append((name, layer))
    tensors = st.load_file(str(path))
    for alias, canon in meta["aliases"].items():
        if canon not in tensors:
            raise CompressedFormatError(f"{META}: alias {alias!r} names a missing tensor {canon!r}")
        tensors[alias] = tensors[canon]
    if meta["format_version"] == 1:
        for name, spec in meta["layers"].items():
            if spec["factorization"] == "lowrank" and spec["type"] in ("FactorizedLinear",
                                                                       "FactorizedEmbedding"):
                LowRank.upgrade_state_dict(tensors, name + ".")
    olds = [(name, model.get_submodule(name)) for name, _ in plan]
    _replace(model, plan)
    try:
        _load_checked(model, tensors)
    except Exception:
        _replace(model, olds)  # leave the model as it came
        raise
    return model


def _replace(model: nn.Module, modules) -> None:
    for name, layer in modules:
        _set_module(model, name, layer)


def _tensors(model: nn.Module) -> dict:
    """model's state_dict without the factorch layers' layouts
    (``_extra_state``, factorch/nn/_layout_state.py): factorch.json records
    each layer's layout already, and the layers accept them missing on load,
    so files stay as they were and older ones still load."""
    skip = {f"{name}.{EXTRA_STATE}" if name else EXTRA_STATE
            for name, m in model.named_modules() if isinstance(m, LayoutState)}
    return {k: v for k, v in model.state_dict().items() if k not in skip}


def _load_checked(model: nn.Module, tensors: dict) -> None:
    own = _tensors(model)
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        raise CompressedFormatError(
            "model: does not match the saved tensors"
            + (f"; missing from the file: {', '.join(missing[:5])}" if missing else "")
            + (f" ({len(missing)} in all)" if len(missing) > 5 else "")
            + (f"; not in the model: {', '.join(extra[:5])}" if extra else ""))
    for k, v in own.items():
        t = tensors[k]
        if t.shape != v.shape or t.dtype != v.dtype:
            raise CompressedFormatError(
                f"{k}: saved as {_dtype_name(t.dtype)} {list(t.shape)}, the model has "
                f"{_dtype_name(v.dtype)} {list(v.shape)}")
    model.load_state_dict(tensors, strict=True)
