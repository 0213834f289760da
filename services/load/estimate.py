"""How many bytes a load will take, read from safetensors headers before anything is loaded.

The cache uses it to make room (or refuse a model that can never fit) before loading; 0 means
"unknown" (pickles), and the exact size measured after the load is checked again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from services.load.checkpoints import (
    CLIP_PREFIXES,
    OPENCLIP_PREFIXES,
    UNET_PREFIX,
    VAE_PREFIXES,
    is_controlnet_key,
)
from services.load.errors import LoadError
from services.load.loaders import LoadRequest
from services.load.safetensors_fast import read_header
from services.load.weights import weight_files
from services.records.enums import ModelFormat, ModelType, SubModelType


def _header_bytes(files: list[Path], dtype: torch.dtype, select: Callable[[str], bool] | None = None) -> int:
    total = 0
    for f in files:
        if f.suffix != ".safetensors":
            return 0
        for e in read_header(f).entries.values():
            if select is None or select(e.name):
                size = dtype.itemsize if e.dtype.is_floating_point else e.dtype.itemsize
                total += e.nbytes // e.dtype.itemsize * size
    return total


def _checkpoint_prefixes(sub: SubModelType | None) -> tuple[str, ...] | None:
    if sub == SubModelType.UNet:
        return (UNET_PREFIX,)
    if sub in (SubModelType.Vae, SubModelType.VaeDecoder, SubModelType.VaeEncoder):
        return VAE_PREFIXES
    if sub in (SubModelType.TextEncoder, SubModelType.TextEncoder2):
        return tuple(CLIP_PREFIXES.values()) + tuple(OPENCLIP_PREFIXES.values())
    return None


def estimate_bytes(req: LoadRequest) -> int:
    """Bytes of the (sub)model's tensors in the target dtype; 0 when it cannot be told cheaply."""
    try:
        loc, fmt = req.location, ModelFormat(req.record.model_format)
        if ModelType(req.record.model_type) == ModelType.Main and fmt == ModelFormat.Diffusers:
            if req.submodel in (None, SubModelType.Scheduler, SubModelType.Tokenizer, SubModelType.Tokenizer2):
                return 0
            folder = loc / ("vae" if req.submodel in (SubModelType.VaeDecoder, SubModelType.VaeEncoder)
                            else req.submodel.value)
            return _header_bytes(weight_files(folder, req.dtype), req.dtype) if folder.is_dir() else 0
        if loc.is_dir():
            return _header_bytes(weight_files(loc, req.dtype), req.dtype)
        if ModelType(req.record.model_type) == ModelType.Main:
            prefixes = _checkpoint_prefixes(req.submodel)
            if prefixes is None:
                return 0
            return _header_bytes([loc], req.dtype, lambda k: k.startswith(prefixes))
        if ModelType(req.record.model_type) == ModelType.ControlNet:
            # ControlNet 1.0 files carry a whole SD model beside ``control_model.*``, which the load skips
            return _header_bytes([loc], req.dtype, is_controlnet_key)
        return _header_bytes([loc], req.dtype)
    except (OSError, ValueError, LoadError):
        return 0  # the load itself reports what is wrong with the files
