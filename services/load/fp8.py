"""fp8 checkpoints: upcast as they are read, or kept in fp8 and upcast one layer at a time.

A plain fp8 file (e4m3fn or e5m2) stores the weights themselves; ComfyUI's "fp8_scaled" ones store
``weight / scale`` in fp8 and the scale as ``<layer>.scale_weight`` (older ComfyUI) or
``<layer>.weight_scale``, with a ``scaled_fp8`` marker tensor: their weights are only right once
multiplied back. ComfyUI's newer quantized files mark each layer with ``<layer>.comfy_quant`` (uint8 JSON
naming its format) and add an ``input_scale``: their fp8 layers are read the same way, any other format
(nvfp4, mxfp8...) is refused (:func:`_take_comfy_quant`).

Upcast (the default on the CPU): :func:`fold_fp8_scales` multiplies the scales into the upcast
tensors and drops the scales and the marker, which no model has as parameters.

Kept (``MODELBUS_FP8_STORAGE``, see :func:`keeps_fp8`): the fp8 tensors stay fp8 in memory, half of
bf16, and :func:`keep_fp8` hooks each module holding them so that its forward pass sees them upcast
to the compute dtype, times their scale: ``w.to(dtype) * scale.to(dtype)``, the same arithmetic as the
fold, so a kept model's outputs are the upcast model's. The upcast copy lives only during the module's
own forward. diffusers' ``enable_layerwise_casting`` hook casts the whole module back to the storage
dtype after each forward: that writes new tensors (the cache's one flat buffer would then hold a
second, dead copy of every weight), rounds a module's bf16 bias to fp8, and knows no scale; the hook
here is one of its kind in the same registry, under the same name, so diffusers still reports the
model's ``dtype`` as the compute dtype, and it never writes the stored tensor.

A file's layout is often converted to diffusers' names (qkv split in three, renames) after the read:
each scale follows its weight through the conversion as a tag that every torch operation passes on
(:func:`split_fp8`, :func:`scales_after`); where the tags cannot tell a scale (tensors of two scales
joined, a per-row scale's rows cut), the load falls back to the upcast.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK, LayerwiseCastingHook

from modelbus.services.load.errors import InvalidModelException
from modelbus.services.load.safetensors_fast import read_header

_SCALES = {".scale_weight": ".weight", ".weight_scale": ".weight"}
_COMFY_QUANT = ".comfy_quant"  # ComfyUI's per-layer quantization config: uint8 JSON like {"format": "float8_e4m3fn"}
_COMFY_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
_MARKERS = ("scaled_fp8",)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
#: values of ``MODELBUS_FP8_STORAGE``
FP8_STORAGE_POLICIES = ("auto", "on", "off")
_SCALE_BUFFER = "_fp8_scale_"  # + the parameter's name: a module's buffer of that parameter's scale


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in FP8_DTYPES


def keeps_fp8(policy: str, device: torch.device) -> bool:
    """Whether loads for ``device`` keep fp8 weights in fp8. ``auto``: on CUDA devices with fp8 support
    (compute capability 8.9, Ada and Hopper, and later), where the memory saved costs little time; not
    on the CPU, where the upcast on every forward pass is paid in full: a FLUX-shaped fp8_scaled
    transformer (1 + 2 blocks of width 1536, fp32 compute) held 0.39x the memory and ran its forward
    pass 1.74x slower there (``tests/bench/bench_fp8.py``, one run on the busy 2-core dev VM)."""
    if policy == "on":
        return True
    if policy != "auto" or device.type != "cuda":
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def _is_marker(key: str) -> bool:
    return any(key == m or key.endswith("." + m) for m in _MARKERS)


def is_scale(key: str) -> bool:
    """A ComfyUI fp8_scaled file's scale or marker tensor (held as a buffer only by a kept load)."""
    return _is_marker(key) or _scale_target(key) is not None


def _scale_target(key: str) -> str | None:
    suffix = next((s for s in _SCALES if key.endswith(s)), None)
    return key[: -len(suffix)] + _SCALES[suffix] if suffix is not None else None


def _checked_factor(scale: torch.Tensor, weight: torch.Tensor, key: str, target: str, where: object) -> torch.Tensor:
    """The factor ``weight`` is multiplied by: one number, or one per row (a column of the rows' count)."""
    rows = weight.shape[0] if weight.dim() else 0
    per_row = scale.dim() > 0 and scale.numel() == rows == scale.shape[0]
    if not scale.is_floating_point() or (scale.numel() != 1 and not per_row):
        raise InvalidModelException(f"{where}: fp8 scale {key} of shape {tuple(scale.shape)} fits no row of "
                                    f"{target} {tuple(weight.shape)}")  # fmt: skip
    if not bool(torch.isfinite(scale).all()):
        raise InvalidModelException(f"{where}: fp8 scale {key} is not a finite number (inf or nan)")
    return scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, *([1] * (weight.dim() - 1)))


_INDEX = re.compile(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)")


def _scaled_weights(tensors: dict[str, torch.Tensor]) -> set[str]:
    return {str(_scale_target(k)) for k in tensors if _scale_target(k) is not None}


def _check_unscaled(fp8: Collection[str], tensors: dict[str, torch.Tensor], where: object) -> None:
    """Refuse a scaled file where an fp8 tensor lacks the scale that its kin (the same name in another
    block, of the same rank: ``blocks.3.q.weight`` beside ``blocks.0.q.weight``) have: its stored values are
    ``weight / scale``, and read without the scale they would be wrong (ComfyUI quantizes all of a layer's
    kind or none). An fp8 tensor whose kin have no scale either (an embedding, a norm) is the weight itself."""
    targets = _scaled_weights(tensors)
    if not targets:
        return
    scaled_kin = {(_INDEX.sub("N", t), tensors[t].dim()): t for t in targets if t in tensors}
    for key in sorted(k for k in fp8 if k in tensors and k not in targets):
        kin = scaled_kin.get((_INDEX.sub("N", key), tensors[key].dim()))
        if kin is not None and not _is_marker(key) and _scale_target(key) is None:
            raise InvalidModelException(f"{where}: fp8 tensor {key} has no scale in a scaled file "
                                        f"(no {key.removesuffix('.weight')}.scale_weight; {kin} has one)")


def _comfy_format(conf: torch.Tensor) -> str | None:
    try:
        info = json.loads(bytes(conf.reshape(-1).tolist())) if conf.dtype == torch.uint8 else None
    except (ValueError, UnicodeDecodeError):
        return None
    fmt = info.get("format") if isinstance(info, dict) else None
    return fmt if isinstance(fmt, str) else None


def _take_comfy_quant(tensors: dict[str, torch.Tensor], where: object) -> None:
    """Check and remove a ComfyUI quantized file's ``<layer>.comfy_quant`` configs and ``<layer>.input_scale``
    tensors (a quantized matmul's activation scale, not needed once the weights are upcast), in place. Only
    the fp8 formats with a ``weight_scale`` are read (their scale is folded as ``scale_weight`` is); any
    other format (nvfp4, mxfp8, int8 blocks...) or a malformed config is refused."""
    layers = [k.removesuffix(_COMFY_QUANT) for k in tensors if k.endswith(_COMFY_QUANT)]
    for layer in sorted(layers):
        fmt = _comfy_format(tensors[layer + _COMFY_QUANT])
        if fmt is None:
            raise InvalidModelException(f"{where}: ComfyUI quantization config {layer}{_COMFY_QUANT} is malformed "
                                        "(not uint8 JSON with a \"format\")")  # fmt: skip
        if fmt not in _COMFY_FP8_FORMATS:
            raise InvalidModelException(f"{where}: ComfyUI {fmt} quantization is not supported: {layer}")
        weight = tensors.get(layer + ".weight")
        if weight is not None and layer + ".weight_scale" not in tensors:
            raise InvalidModelException(f"{where}: ComfyUI {fmt} layer {layer} has no {layer}.weight_scale")
    if layers:
        for key in [k for k in tensors if k.endswith((_COMFY_QUANT, ".input_scale"))]:
            del tensors[key]


def stored_fp8(path: Path, select: Callable[[str], bool] | None = None) -> set[str] | None:
    """The names of a safetensors file's fp8 tensors (those ``select`` keeps), from its header; None for
    other files."""
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    return {e.name for e in read_header(path).entries.values() if e.dtype in FP8_DTYPES
            and (select is None or select(e.name))}


def fold_fp8_scales(tensors: dict[str, torch.Tensor], where: object = "",
                    fp8: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """Multiply each scaled weight by its scale, in place; the scale entries are removed. ``fp8``: the
    names the file stores in fp8 (they are upcast by now), to refuse one that lacks its scale. A ComfyUI
    ``comfy_quant`` file's configs are checked first (:func:`_take_comfy_quant`)."""
    _take_comfy_quant(tensors, where)
    _check_unscaled(fp8 or (), tensors, where)
    for key in [k for k in tensors if _is_marker(k)]:
        del tensors[key]
    for key in [k for k in tensors if _scale_target(k) is not None]:
        target = str(_scale_target(key))
        scale = tensors.pop(key)
        weight = tensors.get(target)
        if weight is None:
            continue  # the scale of a tensor the loader did not select
        tensors[target] = weight * _checked_factor(scale, weight, key, target, where).to(weight.dtype)
    return tensors


class _Tagged(torch.Tensor):
    """An fp8 tensor of a scaled file on its way through a layout conversion: ``fp8_scale`` (its scale, or
    :data:`_UNIT` for an unscaled one) follows it through every torch operation (chunks, concatenations,
    views, copies); an operation on tensors of different scales gives :data:`_MIXED`."""

    fp8_scale: Any

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        found: dict[int, Any] = {}
        _walk((args, kwargs), lambda t: found.setdefault(id(t.fp8_scale), t.fp8_scale))
        out = super().__torch_function__(func, types, args, kwargs or {})
        if found:
            tag = next(iter(found.values())) if len(found) == 1 else _MIXED
            _walk(out, lambda t: setattr(t, "fp8_scale", tag))
        return out


_UNIT = object()   # the tag of an fp8 tensor without a scale
_MIXED = object()  # the tag of a tensor made from tensors of different scales


def _walk(obj: Any, visit: Callable[[_Tagged], object]) -> None:
    if isinstance(obj, _Tagged):
        visit(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _walk(item, visit)
    elif isinstance(obj, dict):
        for item in obj.values():
            _walk(item, visit)


def split_fp8(tensors: dict[str, torch.Tensor], dtype: torch.dtype, where: object = ""
              ) -> tuple[dict[str, torch.Tensor], bool]:
    """For a kept load: the file's tensors with the fp8 ones as they are, other floating ones cast to
    ``dtype``, scales and markers taken out, and whether the file is scaled. In a scaled file each fp8
    tensor carries its scale (``_Tagged``) into the conversion; :func:`scales_after` reads them out."""
    scales: dict[str, tuple[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    scaled = False
    _take_comfy_quant(tensors, where)
    _check_unscaled([k for k, t in tensors.items() if is_fp8(t)], tensors, where)
    for key, t in tensors.items():
        target = _scale_target(key)
        if _is_marker(key):
            scaled = True
        elif target is not None:
            scales[target] = (key, t.to(torch.float32).clone())
            scaled = True
        elif is_fp8(t) or not t.is_floating_point() or t.dtype == dtype:
            out[key] = t
        else:
            out[key] = t.to(dtype)
    for target, (key, scale) in scales.items():
        weight = out.get(target)
        if weight is not None and not is_fp8(weight):  # a scale beside a weight already upcast: folded at once
            out[target] = weight * _checked_factor(scale, weight, key, target, where).to(weight.dtype)
        elif weight is not None:
            _checked_factor(scale, weight, key, target, where)
    if scaled:
        for key, t in out.items():
            if is_fp8(t):
                tagged = t.as_subclass(_Tagged)
                tagged.fp8_scale = scales[key][1] if key in scales else _UNIT
                out[key] = tagged
    return out, scaled


def scales_after(converted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The scale of each fp8 tensor of a scaled file's ``converted`` tensors, by converted name; the tensors
    become plain ones again (in place), and one the conversion upcast has its scale multiplied in. None
    when a scale cannot be told: an fp8 tensor that lost its tag or mixes scales, or a per-row scale whose
    rows the conversion cut."""
    out: dict[str, torch.Tensor] = {}
    unknown = False
    for name, t in list(converted.items()):
        if not isinstance(t, _Tagged):
            unknown = unknown or is_fp8(t)
            continue
        scale = t.fp8_scale
        plain = t.as_subclass(torch.Tensor)
        converted[name] = plain
        if scale is _UNIT:
            continue
        if scale is _MIXED or (scale.numel() != 1 and (plain.dim() == 0 or plain.shape[0] != scale.numel())):
            unknown = True
            continue
        factor = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, *([1] * (plain.dim() - 1)))
        if is_fp8(plain):
            out[name] = factor
        else:
            converted[name] = plain * factor.to(plain.dtype)
    return None if unknown else out


class Fp8UpcastHook(LayerwiseCastingHook):
    """During its module's forward pass, the module's fp8 parameters are upcast copies (times their
    scale); afterwards the parameters are the stored fp8 tensors again, unchanged."""

    def __init__(self, names: tuple[str, ...], compute_dtype: torch.dtype) -> None:
        super().__init__(FP8_DTYPES[0], compute_dtype, non_blocking=False)
        self.names = names

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        return module  # (diffusers' hook casts the module to its storage dtype here)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        stored: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        try:
            for name in self.names:
                param = module._parameters[name]
                assert param is not None
                up = param.data.to(self.compute_dtype)
                scale = module._buffers.get(_SCALE_BUFFER + name)
                if scale is not None:
                    up = up * scale.to(self.compute_dtype)
                stored.append((param, param.data))
                param.data = up
            forward: Any = self.fn_ref.original_forward  # (diffusers types it None: set once the hook is registered)
            return forward(*args, **kwargs)
        finally:
            for param, data in stored:
                param.data = data

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        return output


def keep_fp8(model: torch.nn.Module, scales: dict[str, torch.Tensor], compute_dtype: torch.dtype,
             upcast: Callable[[str], bool] = lambda name: False) -> int:
    """Hook every module of ``model`` that holds fp8 parameters (see the module's docstring); ``scales``
    by parameter name. The scales become (non-persistent) buffers of their modules, so they move with
    the model. The modules whose name ``upcast`` picks are upcast instead, times their scale, as the
    fold does: layers whose weight dtype the model reads outside their forward (T5's ``wo``, Qwen2.5-VL's
    vision tower). Returns how
    many parameters stay fp8."""
    kept = 0
    for prefix, module in model.named_modules():
        names = tuple(n for n, p in module._parameters.items() if p is not None and is_fp8(p))
        if not names:
            continue
        for name in names:
            scale = scales.get(f"{prefix}.{name}" if prefix else name)
            param = module._parameters[name]
            assert param is not None
            if upcast(prefix):
                up = param.data.to(compute_dtype)
                param.data = up * scale.to(up.device, compute_dtype) if scale is not None else up
            elif scale is not None:
                module.register_buffer(_SCALE_BUFFER + name, scale.to(param.device), persistent=False)
        names = tuple(n for n in names if is_fp8(module._parameters[n]))  # type: ignore[arg-type]
        if not names:
            continue
        HookRegistry.check_if_exists_or_initialize(module).register_hook(
            Fp8UpcastHook(names, compute_dtype), _LAYERWISE_CASTING_HOOK)
        kept += len(names)
    return kept
