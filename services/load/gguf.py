"""GGUF transformers (city96's FLUX, Qwen-Image, Wan... files) loaded with diffusers' GGUF support.

The weights stay quantized in memory (diffusers' ``GGUFParameter``) and are dequantized layer by layer
as the model runs (``GGUFLinear``), so the cache holds the quantized size. The architecture's config
comes from the file for FLUX (its header's shapes, read through the FLUX loader's own conversion) and
from the record's config for the other families (see :mod:`.dit`).

The load is the flat loaders' (:mod:`.safetensors_fast`), not diffusers' ``from_single_file`` (which
copies tensor by tensor out of a memory map, then moves each to the device): a GGUF file's tensors lie
in one data region, so that region is read in one go into one buffer on the target device (the pinned
pipeline to CUDA, parallel ``preadv`` into recycled host memory on the CPU), and each tensor is a view
of it: a quantized one, its blocks' bytes (rows of bytes, as the ``gguf`` reader gives them) wrapped as
a ``GGUFParameter`` of its type; F32/F16 ones as they are. The model is a clone of the meta skeleton
(:mod:`.skeleton`), its ``nn.Linear`` layers whose weight is quantized turned into diffusers'
``GGUFLinear``, and the result is what ``from_single_file`` with a ``GGUFQuantizationConfig`` gives:
the same conversion of the original names, unquantized tensors cast to the compute dtype (float32 in
the modules the class keeps in float32, whose quantized weights are dequantized then), the same
parameters, bytes and quantization types (``tests/load/test_gguf_load.py`` compares the two).

Kept quantized, every forward pass dequantizes each layer's weight again (diffusers' ``GGUFLinear``: in
torch ops, or with ``DIFFUSERS_GGUF_CUDA_KERNELS`` a kernel fetched from the Hub, still dequantize then
matmul), which is why it runs slower than an unquantized model. ``MODELBUS_GGUF_DEQUANTIZE``
(``req.gguf_dequantize``) dequantizes once, as the file loads, into plain ``nn.Linear`` layers: what
diffusers' ``model.dequantize()`` gives, an unquantized model's speed for its memory.
"""

from __future__ import annotations

from typing import Any

import torch

from modelbus.services.load.dit import to_diffusers_names, transformer_config
from modelbus.services.load.errors import InvalidModelException
from modelbus.services.load.flux import flux_diffusers_state, flux_transformer_config
from modelbus.services.load.kit import (
    DENOISER_SUBMODELS,
    Loaded,
    LoadRequest,
    base_of,
    live_buffer,
    resolve_class,
)
from modelbus.services.load.safetensors_fast import assign_weights, empty_model, read_span
from modelbus.services.load.skeleton import skeleton_model, state_keys
from modelbus.services.probe.errors import ProbeError
from modelbus.services.probe.gguf_file import GGUFHeader, read_gguf_header

# the types diffusers keeps as plain tensors (every other type is a GGUFParameter, as in its loader)
_PLAIN = {"F32": torch.float32, "F16": torch.float16}
_NAMES = {dtype: name for name, dtype in _PLAIN.items()}


def _header(req: LoadRequest) -> GGUFHeader:
    try:
        return read_gguf_header(req.location)
    except (ProbeError, OSError) as exc:
        raise InvalidModelException(str(exc)) from exc


def gguf_config(req: LoadRequest, header: GGUFHeader | None = None) -> dict[str, Any]:
    if base_of(req.record) != "flux":
        return transformer_config(req)
    header = header or _header(req)
    meta = {name: torch.empty(t[0], device="meta") for name, t in header.tensors.items()}
    sd = flux_diffusers_state(meta, req.location)
    return {"_class_name": "FluxTransformer2DModel", **flux_transformer_config(sd, req.location)}


def read_gguf_tensors(req: LoadRequest, header: GGUFHeader | None = None
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every tensor of the file as a view of one buffer on ``req.device`` (see the module docstring),
    and that buffer. A type diffusers cannot dequantize is refused, naming the tensor."""
    import gguf
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, GGUFParameter

    header = header or _header(req)
    supported = {t.name for t in SUPPORTED_GGUF_QUANT_TYPES}
    for name, (shape, qtype, _, _) in header.tensors.items():
        if qtype not in _PLAIN and qtype not in supported:
            raise InvalidModelException(
                f"{req.location}: GGUF tensor {name!r} {shape} is {qtype}, which diffusers' GGUF support cannot "
                f"dequantize (it does {', '.join(sorted(supported | set(_PLAIN)))})")  # fmt: skip
    length = max((offset + nbytes for _, _, offset, nbytes in header.tensors.values()), default=0)
    buffer = read_span(req.location, header.data_start, length, req.device)
    tensors: dict[str, torch.Tensor] = {}
    for name, (shape, qtype, offset, nbytes) in header.tensors.items():
        raw = buffer[offset:offset + nbytes]
        if qtype in _PLAIN:
            tensors[name] = raw.view(_PLAIN[qtype]).view(shape)
            continue
        kind = gguf.GGMLQuantizationType[qtype]
        block, type_size = gguf.GGML_QUANT_SIZES[kind]
        rows = (*shape[:-1], shape[-1] // block * type_size) if shape else (nbytes,)
        tensors[name] = GGUFParameter(raw.view(rows), quant_type=kind)
    return tensors, buffer


def _excluded(name: str, modules: list[str]) -> bool:
    return any(m in name.split(".") for m in modules)


def prepare_gguf_model(model: torch.nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                       where: str, dequantize: bool = False) -> dict[str, torch.Tensor]:
    """Make ``model`` (a meta-built clone) and ``tensors`` (diffusers' names) what diffusers' GGUF load
    makes of them: ``nn.Linear`` layers whose weight is quantized become ``GGUFLinear`` (computing in
    ``dtype``), except under the modules the class keeps in float32; unquantized floating tensors are
    cast to ``dtype`` (float32 there) and quantized ones there dequantized to float32. Every shape is
    checked against the model's first: a disagreement is refused, naming the tensor. ``dequantize``:
    every quantized weight is dequantized now, to ``dtype`` (float32 in those modules), and the layers
    stay ``nn.Linear``: what diffusers' ``model.dequantize()`` makes of its GGUF load."""
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter, dequantize_gguf_tensor

    keep = list(getattr(type(model), "_keep_in_fp32_modules", None) or [])
    out: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        quantized = isinstance(tensors.get(dot + "weight"), GGUFParameter)
        if quantized and not dequantize and isinstance(module, torch.nn.Linear) and not _excluded(prefix, keep):
            # diffusers builds a GGUFLinear in its place; the clone's own module object becomes one (the
            # attributes GGUFLinear's __init__ adds to nn.Linear's), which costs no build
            linear: Any = module
            linear.source_cls, linear.__class__ = type(module), GGUFLinear
            linear.compute_dtype, linear.device = dtype, None
        persistent = [n for n in module._buffers if n not in module._non_persistent_buffers_set]
        for name, old in [*module._parameters.items(), *((n, module._buffers[n]) for n in persistent)]:
            key = dot + name
            value: Any = tensors.get(key)
            if old is None or value is None or key in out:
                continue
            quantized = isinstance(value, GGUFParameter)
            shape = tuple(value.quant_shape) if quantized else tuple(value.shape)
            if shape != tuple(old.shape):
                kind = value.quant_type.name if quantized else _NAMES.get(value.dtype, str(value.dtype))
                raise InvalidModelException(
                    f"{where}: GGUF tensor {key} ({kind}) has shape {list(shape)}, the {type(model).__name__} of "
                    f"its config has {list(old.shape)} there: the file and the config disagree")  # fmt: skip
            if quantized and (dequantize or _excluded(key, keep)):
                value = dequantize_gguf_tensor(value).to(torch.float32 if _excluded(key, keep) else dtype)
            elif not quantized and value.is_floating_point():
                value = value.to(torch.float32 if _excluded(key, keep) else dtype)
            out[key] = value
    return out


def load_gguf_main(req: LoadRequest) -> Loaded:
    from diffusers import GGUFQuantizationConfig
    from diffusers.quantizers.gguf import GGUFQuantizer

    if req.submodel is None or req.submodel.value not in DENOISER_SUBMODELS:
        raise InvalidModelException(f"{req.location}: a GGUF file holds only a transformer: load it as the "
                                    "transformer submodel")  # fmt: skip
    header = _header(req)
    config = gguf_config(req, header)
    cls: Any = resolve_class("diffusers", str(config["_class_name"]))
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    # one meta build per (class, config) in the process, cloned for later loads (services.load.skeleton)
    model = skeleton_model(cls, kwargs, lambda: empty_model(lambda: cls.from_config(kwargs)))
    expected = set(state_keys(model) or model.state_dict())
    tensors, buffer = read_gguf_tensors(req, header)
    if base_of(req.record) == "flux":
        converted = flux_diffusers_state(tensors, req.location)
    else:
        converted = to_diffusers_names(tensors, cls.__name__, expected, req.location)
    what = f"{req.location} (GGUF {cls.__name__})"
    prepared = prepare_gguf_model(model, converted, req.dtype, what, dequantize=req.gguf_dequantize)
    del tensors, converted
    assign_weights(model, prepared, req.device, what)
    if not req.gguf_dequantize:
        quantized: Any = model
        quantized.hf_quantizer = GGUFQuantizer(GGUFQuantizationConfig(compute_dtype=req.dtype))  # as from_single_file
    return Loaded(model, live_buffer(model, buffer))
