"""GGUF transformers (city96's FLUX, Qwen-Image, Wan... files) loaded with diffusers' GGUF support.

The weights stay quantized in memory (diffusers' ``GGUFParameter``) and are dequantized layer by layer
as the model runs, so the cache holds the quantized size. The architecture's config comes from the file
for FLUX (its header's shapes, read through the FLUX loader's own conversion) and from the record's
config for the other families (see :mod:`.dit`); ``from_single_file`` reads it from a temporary folder
and never the network.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from modelbus.services.load.dit import transformer_config
from modelbus.services.load.errors import InvalidModelException
from modelbus.services.load.flux import flux_diffusers_state, flux_transformer_config
from modelbus.services.load.kit import DENOISER_SUBMODELS, Loaded, LoadRequest, base_of, resolve_class
from modelbus.services.probe.errors import ProbeError
from modelbus.services.probe.gguf_file import read_gguf_header


def gguf_config(req: LoadRequest) -> dict[str, Any]:
    if base_of(req.record) != "flux":
        return transformer_config(req)
    try:
        header = read_gguf_header(req.location)
    except ProbeError as exc:
        raise InvalidModelException(str(exc)) from exc
    meta = {name: torch.empty(t[0], device="meta") for name, t in header.tensors.items()}
    sd = flux_diffusers_state(meta, req.location)
    return {"_class_name": "FluxTransformer2DModel", **flux_transformer_config(sd, req.location)}


def load_gguf_main(req: LoadRequest) -> Loaded:
    from diffusers import GGUFQuantizationConfig

    if req.submodel is None or req.submodel.value not in DENOISER_SUBMODELS:
        raise InvalidModelException(f"{req.location}: a GGUF file holds only a transformer: load it as the "
                                    "transformer submodel")  # fmt: skip
    config = gguf_config(req)
    cls: Any = resolve_class("diffusers", str(config["_class_name"]))
    with tempfile.TemporaryDirectory(prefix="modelbus-gguf-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        try:
            model = cls.from_single_file(
                str(req.location), config=tmp, local_files_only=True, torch_dtype=req.dtype,
                quantization_config=GGUFQuantizationConfig(compute_dtype=req.dtype))  # fmt: skip
        except (ValueError, KeyError, RuntimeError, OSError, AttributeError, TypeError) as exc:
            raise InvalidModelException(f"{req.location}: diffusers cannot load this GGUF as a "
                                        f"{cls.__name__}: {exc}") from exc  # fmt: skip
    return Loaded(model.to(req.device).eval())
