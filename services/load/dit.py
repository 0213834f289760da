"""Single-file transformers of the 2025-2026 families (FLUX.2, Chroma, Qwen-Image, Wan, Z-Image,
HiDream, Lumina 2, Sana, LTX-Video, LTX-2, HunyuanVideo), in the diffusers layout or the original /
ComfyUI one, loaded offline.

The architecture comes from a config, never from the network: the record's ``config`` names a config
shipped in ``services/configs/diffusers/<name>/transformer/config.json`` (what identification records),
or is the path of a diffusers config (a ``config.json``, or a folder holding one, directly or under
``transformer/``), absolute or under the models directory. Original-layout names are turned into
diffusers' by diffusers' own single-file conversions (``diffusers.loaders.single_file_utils``); a
file already in diffusers' names only loses its ``model.diffusion_model.``/``transformer.`` prefix.
The other submodels (VAE, text encoders) are companion models: a single file holds only the transformer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders import single_file_utils as sfu

from modelbus.events.logs import get_logger
from modelbus.services.load.errors import InvalidModelException
from modelbus.services.load.fp8 import keep_fp8
from modelbus.services.load.kit import (
    CONFIGS_DIR,
    DENOISER_SUBMODELS,
    Loaded,
    LoadRequest,
    base_of,
    build_from,
    kept_scales,
    read_checkpoint,
    read_json,
    read_kept,
    resolve_class,
)
from modelbus.services.load.safetensors_fast import empty_model

log = get_logger(__name__)

#: the bases this module loads single files of
DIT_BASES = ("chroma", "flux2", "qwen-image", "qwen-image-2.1", "wan-2.1", "wan-2.2", "z-image", "hidream",
             "lumina-2", "sana", "ltx-video", "ltx-2", "hunyuan-video", "hunyuan-video-1.5")  # fmt: skip
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
Convert = Callable[..., dict[str, torch.Tensor]]
# transformer class -> diffusers' conversion of its original names (None: the original names are diffusers')
_CONVERSIONS: dict[str, Convert | None] = {
    "ChromaTransformer2DModel": sfu.convert_chroma_transformer_checkpoint_to_diffusers,
    "Flux2Transformer2DModel": sfu.convert_flux2_transformer_checkpoint_to_diffusers,
    "QwenImageTransformer2DModel": None,
    "QwenImage21Transformer2DModel": sfu.convert_qwen_image21_transformer_checkpoint_to_diffusers,
    "WanTransformer3DModel": sfu.convert_wan_transformer_to_diffusers,
    "ZImageTransformer2DModel": sfu.convert_z_image_transformer_checkpoint_to_diffusers,
    "HiDreamImageTransformer2DModel": sfu.convert_hidream_transformer_to_diffusers,
    "Lumina2Transformer2DModel": sfu.convert_lumina2_to_diffusers,
    "SanaTransformer2DModel": sfu.convert_sana_transformer_to_diffusers,
    "LTXVideoTransformer3DModel": sfu.convert_ltx_transformer_checkpoint_to_diffusers,
    "LTX2VideoTransformer3DModel": sfu.convert_ltx2_transformer_to_diffusers,
    "HunyuanVideoTransformer3DModel": sfu.convert_hunyuan_video_transformer_to_diffusers,
    "HunyuanVideo15Transformer3DModel": None,
}


def transformer_config(req: LoadRequest) -> dict[str, Any]:
    """The diffusers config of the record's transformer (see the module's docstring)."""
    name = getattr(req.record, "config", None)
    if not name:
        raise InvalidModelException(f"{req.location}: a {base_of(req.record)} transformer file needs a config: "
                                    "set the record's config to a shipped one or a diffusers config path")  # fmt: skip
    shipped = CONFIGS_DIR / "diffusers" / str(name) / "transformer" / "config.json"
    given = Path(str(name)) if Path(str(name)).is_absolute() else req.location.parent / str(name)
    for candidate in (shipped, given, given / "config.json", given / "transformer" / "config.json"):
        if candidate.is_file() and candidate.suffix == ".json":
            config = read_json(candidate)
            if config.get("_class_name") not in _CONVERSIONS:
                raise InvalidModelException(f"{candidate}: config of a {config.get('_class_name')!r}, not one of "
                                            f"the transformers this loader builds ({', '.join(_CONVERSIONS)})")
            return config
    raise InvalidModelException(f"{req.location}: config {name!r} is neither a shipped config "
                                f"({', '.join(sorted(p.name for p in (CONFIGS_DIR / 'diffusers').iterdir()))}) "
                                "nor a diffusers config file or folder")  # fmt: skip


def to_diffusers_names(tensors: dict[str, torch.Tensor], cls_name: str, expected: set[str],
                       where: Path) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
            break
    if expected <= tensors.keys():
        return {k: tensors[k] for k in expected}
    convert = _CONVERSIONS.get(cls_name)
    if convert is None:
        missing = sorted(expected - tensors.keys())
        raise InvalidModelException(f"{where}: {cls_name} file lacks {len(missing)} tensors, e.g. {missing[:3]}")
    try:
        converted = convert(dict(tensors))
    except (KeyError, ValueError, RuntimeError) as exc:
        raise InvalidModelException(f"{where}: not a {cls_name} in its original layout either: {exc!r}") from exc
    missing = sorted(expected - converted.keys())
    if missing:
        raise InvalidModelException(f"{where}: {cls_name} file, once converted, lacks {len(missing)} tensors, "
                                    f"e.g. {missing[:3]}")  # fmt: skip
    return {k: converted[k] for k in expected}


def load_dit_checkpoint(req: LoadRequest) -> Loaded:
    base = base_of(req.record)
    if req.submodel is None or req.submodel.value not in DENOISER_SUBMODELS:
        asked = req.submodel.value if req.submodel is not None else "no submodel"
        raise InvalidModelException(
            f"{req.location}: a {base} single file holds only the transformer ({asked} asked): load its "
            "VAE and text encoders from their own records")  # fmt: skip
    config = transformer_config(req)
    cls = resolve_class("diffusers", str(config["_class_name"]))
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}

    def make() -> torch.nn.Module:
        return cls.from_config(kwargs)  # type: ignore[attr-defined, no-any-return]

    expected = set(empty_model(make).state_dict())
    kept = read_kept(req, lambda k: True)
    tensors, buffer = (kept[0], kept[1]) if kept is not None else read_checkpoint(req, lambda k: True)
    tensors = to_diffusers_names(tensors, cls.__name__, expected, req.location)
    scales = kept_scales(kept, tensors)
    if scales is None:
        log.info("fp8_kept_fallback", path=str(req.location), reason="the conversion leaves a scale untold")
        return load_dit_checkpoint(replace(req, fp8_storage=False))
    loaded = build_from(make, tensors, req, buffer, f"{base} transformer")
    if kept is not None:
        keep_fp8(loaded.model, scales, req.dtype)
    return loaded
