"""How many bytes a load will take, read from safetensors headers before anything is loaded.

The cache uses it to make room (or refuse a model that can never fit) before loading; 0 means
"unknown" (pickles), and the exact size measured after the load is checked again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from modelbus.services.load.checkpoints import CLIP_PREFIXES, OPENCLIP_PREFIXES, is_controlnet_key
from modelbus.services.load.dit import DIT_BASES
from modelbus.services.load.errors import LoadError
from modelbus.services.load.flux import flux_diffusers_state
from modelbus.services.load.fp8 import FP8_DTYPES, is_scale
from modelbus.services.load.kit import (
    DENOISER_SUBMODELS,
    NOT_FLUX_TRANSFORMER,
    UNET_PREFIX,
    VAE_PREFIXES,
    LoadRequest,
)
from modelbus.services.load.safetensors_fast import read_header
from modelbus.services.load.sd3 import SD3_CLIP_PREFIXES, SD3_T5_PREFIX, sd3_diffusers_state
from modelbus.services.load.weights import weight_files
from modelbus.services.records.enums import ModelFormat, ModelType, SubModelType


def _itemsize(stored: torch.dtype, dtype: torch.dtype, keep_fp8: bool) -> int:
    """Bytes an element stored as ``stored`` takes once loaded in ``dtype`` (fp8 kept as it is, if asked)."""
    if not stored.is_floating_point or (keep_fp8 and stored in FP8_DTYPES):
        return stored.itemsize
    return dtype.itemsize


def _header_bytes(files: list[Path], dtype: torch.dtype, select: Callable[[str], bool] | None = None,
                  keep_fp8: bool = False) -> int:
    total = 0
    for f in files:
        if f.suffix != ".safetensors":
            return 0
        for e in read_header(f).entries.values():
            if select is None or select(e.name):
                total += e.nbytes // e.dtype.itemsize * _itemsize(e.dtype, dtype, keep_fp8)
    return total


Convert = Callable[[dict[str, torch.Tensor], Path], dict[str, torch.Tensor]]
# the loaders' conversions of a transformer file to diffusers' names, by base model
_TRANSFORMER_STATES: dict[str, Convert] = {"flux": flux_diffusers_state, "sd-3": sd3_diffusers_state,
                                           "sd-3.5-medium": sd3_diffusers_state, "sd-3.5-large": sd3_diffusers_state}


def _transformer_bytes(path: Path, dtype: torch.dtype, convert: Convert, keep_fp8: bool = False) -> int:
    """The transformer's tensors of a FLUX or SD-3 file, whatever its layout (BFL's, Stability's or
    diffusers', with or without a ``model.diffusion_model.``/``transformer.`` prefix, alone or in a
    bundle): the loader's own selection and conversion run on meta tensors of the header's shapes,
    so what is counted is what the loaded model holds."""
    if path.suffix != ".safetensors":
        return 0
    entries = read_header(path).entries.values()
    meta = {e.name: torch.empty(e.shape, dtype=e.dtype, device="meta") for e in entries
            if not e.name.startswith(NOT_FLUX_TRANSFORMER)}
    converted = convert(meta, path)
    return sum(t.numel() * _itemsize(t.dtype, dtype, keep_fp8) for t in converted.values())


def _checkpoint_prefixes(sub: SubModelType | None, base: str) -> tuple[str, ...] | None:
    if sub == SubModelType.UNet:
        return (UNET_PREFIX,)
    if sub in (SubModelType.Vae, SubModelType.VaeDecoder, SubModelType.VaeEncoder):
        return VAE_PREFIXES
    if base.startswith("sd-3"):  # the CLIP-L, CLIP-G or T5 of a bundle; a tokenizer or scheduler reads nothing
        if sub == SubModelType.TextEncoder3:
            return (SD3_T5_PREFIX,)
        return (SD3_CLIP_PREFIXES[sub],) if sub in SD3_CLIP_PREFIXES else None
    if sub in (SubModelType.TextEncoder, SubModelType.TextEncoder2):
        return tuple(CLIP_PREFIXES.values()) + tuple(OPENCLIP_PREFIXES.values())
    return None


def estimate_bytes(req: LoadRequest) -> int:
    """Bytes of the (sub)model's tensors in the target dtype; 0 when it cannot be told cheaply."""
    try:
        loc, fmt = req.location, ModelFormat(req.record.model_format)
        if fmt == ModelFormat.GGUF:  # kept quantized in memory: the quantized size
            return gguf_bytes(loc, req.dtype if req.gguf_dequantize else None)
        if ModelType(req.record.model_type) == ModelType.Main and fmt == ModelFormat.Diffusers:
            if req.submodel in (None, SubModelType.Scheduler, SubModelType.Tokenizer, SubModelType.Tokenizer2,
                                SubModelType.Tokenizer3):
                return 0
            folder = loc / ("vae" if req.submodel in (SubModelType.VaeDecoder, SubModelType.VaeEncoder)
                            else req.submodel.value)
            return _header_bytes(weight_files(folder, req.dtype), req.dtype) if folder.is_dir() else 0
        if loc.is_dir():
            return _header_bytes(weight_files(loc, req.dtype), req.dtype)
        if ModelType(req.record.model_type) == ModelType.Main:
            base = str(getattr(req.record.base_model, "value", req.record.base_model))
            denoiser = req.submodel is not None and req.submodel.value in DENOISER_SUBMODELS
            if base in _TRANSFORMER_STATES and denoiser:
                return _transformer_bytes(loc, req.dtype, _TRANSFORMER_STATES[base], req.fp8_storage)
            if base in DIT_BASES:  # the file holds the transformer alone (fp8 scales: buffers of a kept load only)
                select = None if req.fp8_storage else (lambda k: not is_scale(k))
                return _header_bytes([loc], req.dtype, select, req.fp8_storage) if denoiser else 0
            if base == "flux":
                return 0  # a FLUX file has no other submodel: the load refuses it
            prefixes = _checkpoint_prefixes(req.submodel, base)
            if prefixes is None:
                return 0
            return _header_bytes([loc], req.dtype, lambda k: k.startswith(prefixes))
        if ModelType(req.record.model_type) == ModelType.ControlNet:
            # ControlNet 1.0 files carry a whole SD model beside ``control_model.*``, which the load skips
            return _header_bytes([loc], req.dtype, is_controlnet_key)
        return _header_bytes([loc], req.dtype)
    except (OSError, ValueError, LoadError):
        return 0  # the load itself reports what is wrong with the files


def gguf_bytes(path: Path, dequantized: torch.dtype | None = None) -> int:
    """The tensors' bytes of a GGUF file as stored (quantized), or ``dequantized`` to a dtype, from its header."""
    from modelbus.services.probe import ProbeError
    from modelbus.services.probe.gguf_file import read_gguf_header

    try:
        header = read_gguf_header(path)
    except ProbeError:
        return 0  # the load itself reports what is wrong with the file
    if dequantized is None:
        return header.data_bytes()
    return sum(math.prod(shape) for shape, _, _, _ in header.tensors.values()) * dequantized.itemsize
