"""Single-file Stable Diffusion checkpoints (original LDM key names), converted without a hub.

The model's shape comes from an original-format inference YAML (the record's ``config``, else the
one shipped for its base model in ``services/configs/stable-diffusion``); text-encoder sizes are
read from the checkpoint's own tensor shapes over the configs in ``services/configs/diffusers``.
Only the tensors of the requested submodel are read from the file (one pass over their ranges);
diffusers' ``single_file_utils`` functions rename them to diffusers keys.

Transformer-era files (FLUX and SD-3 transformers, their ControlNets) carry no original config:
theirs is read from the tensors' names and shapes (blocks from their indices, widths from the
shapes), so any size loads, the published ones and tiny ones alike. So are the VAE, CLIP and T5
text encoders that SD-3's all-in-one files bundle.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    UNet2DConditionModel,
)
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from modelbus.services.load.dit import DIT_BASES, load_dit_checkpoint
from modelbus.services.load.errors import InvalidModelException, SubmodelRequiredError
from modelbus.services.load.family_vaes import PUBLISHED, load_family_vae
from modelbus.services.load.flux import load_flux_checkpoint, load_flux_controlnet
from modelbus.services.load.kit import (
    CONFIGS_DIR,
    UNET_PREFIX,
    VAE_PREFIXES,
    Loaded,
    LoadRequest,
    base_of,
    build_from,
    clip_config,
    fit_keys,
    load_tokenizer,
    quiet,
    read_checkpoint,
    read_json,
    resolve_class,
)
from modelbus.services.load.safetensors_fast import assign_weights, empty_model
from modelbus.services.load.sd3 import (
    MMDIT_VAE_LATENTS,
    SD3_BASES,
    load_mmdit_vae_file,
    load_sd3_checkpoint,
    load_sd3_controlnet,
)
from modelbus.services.records.enums import SubModelType

CLIP_PREFIXES = {"sd-1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}


OPENCLIP_PREFIXES = {"sd-2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model.",
                     "sdxl-refiner": "conditioner.embedders.0.model."}


_DEFAULT_YAML = {"sd-1": "v1-inference.yaml", "sd-2": "v2-inference-v.yaml", "sdxl": "sd_xl_base.yaml",
                 "sdxl-refiner": "sd_xl_refiner.yaml"}


def original_config_path(record: Any) -> Path:
    """The record's original-format YAML (absolute, or relative to the shipped configs), else the default."""
    configured = getattr(record, "config", None)
    if configured:
        p = Path(configured).expanduser()
        candidates = [p] if p.is_absolute() else [CONFIGS_DIR / p, CONFIGS_DIR / Path(*p.parts[1:])]
        for c in candidates:
            if c.is_file():
                return c
        raise InvalidModelException(f"config {configured!r} of model {record.key} not found in {CONFIGS_DIR}")
    base = base_of(record)
    name = _DEFAULT_YAML.get(base)
    if name is None:
        raise InvalidModelException(f"no shipped configuration for {base} checkpoints")
    if base == "sd-1" and str(getattr(getattr(record, "variant", None), "value", "")) == "inpaint":
        name = "v1-inpainting-inference.yaml"
    return CONFIGS_DIR / "stable-diffusion" / name


def original_config(record: Any) -> dict[str, Any]:
    path = original_config_path(record)
    try:
        data = yaml.safe_load(path.read_text())
        data["model"]["params"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise InvalidModelException(f"{path}: not an original inference configuration: {exc}") from exc
    return data  # type: ignore[no-any-return]


def _image_size(orig: dict[str, Any]) -> int:
    params = orig["model"]["params"]
    factor = 2 ** (len(params["first_stage_config"]["params"]["ddconfig"]["ch_mult"]) - 1)
    return int(params.get("image_size", 128)) * factor


def unet_config(orig: dict[str, Any], base: str) -> dict[str, Any]:
    """The diffusers UNet config of an original YAML.

    diffusers tells SDXL's size-and-crop embedding (``text_time``) from a class projection by the
    context width alone (2048 or 1280); the base model says it whatever the width, as for a small
    model, so it decides. SDXL's time-id embedding width (256) is part of the architecture."""
    config: dict[str, Any] = quiet(sfu.create_unet_diffusers_config_from_ldm, orig, {},
                                    image_size=_image_size(orig))
    if base in ("sdxl", "sdxl-refiner") and config.get("class_embed_type") == "projection":
        config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)
    return config


def load_unet(req: LoadRequest, orig: dict[str, Any]) -> Loaded:
    tensors, buffer = read_checkpoint(req, lambda k: k.startswith(UNET_PREFIX))
    if not tensors:
        raise InvalidModelException(f"{req.location}: no UNet weights ({UNET_PREFIX}*)")
    config = unet_config(orig, base_of(req.record))
    converted = quiet(sfu.convert_ldm_unet_checkpoint, tensors, config)
    return build_from(lambda: UNet2DConditionModel.from_config(config), converted, req, buffer, "unet")


def load_vae(req: LoadRequest, orig: dict[str, Any], whole_file: bool = False) -> Loaded:
    select = (lambda k: True) if whole_file else (lambda k: k.startswith(VAE_PREFIXES))
    tensors, buffer = read_checkpoint(req, select)
    if not tensors:
        raise InvalidModelException(f"{req.location}: no VAE weights ({'|'.join(VAE_PREFIXES)}*)")
    config = quiet(sfu.create_vae_diffusers_config_from_ldm, orig, tensors, image_size=_image_size(orig))
    converted = quiet(sfu.convert_ldm_vae_checkpoint, tensors, config)
    return build_from(lambda: AutoencoderKL.from_config(config), converted, req, buffer, "vae")


def _layers(keys: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.search(pattern, k))}
    return max(found) + 1 if found else 0


def load_clip_text_encoder(req: LoadRequest, prefix: str, shipped: Path) -> Loaded:
    tensors, buffer = read_checkpoint(req, lambda k: k.startswith(prefix))
    converted = sfu.convert_ldm_clip_checkpoint(tensors, remove_prefix=prefix)
    try:
        vocab, hidden = converted["text_model.embeddings.token_embedding.weight"].shape
        positions = converted["text_model.embeddings.position_embedding.weight"].shape[0]
        inter = converted["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise InvalidModelException(f"{req.location}: no CLIP text encoder under {prefix}* ({exc})") from exc
    layers = _layers(list(converted), r"text_model\.encoder\.layers\.(\d+)\.")
    config = clip_config(shipped, hidden, vocab, positions, layers, inter)
    model = empty_model(lambda: CLIPTextModel(config))
    assign_weights(model, fit_keys(model, converted), req.device, f"{req.location} (text_encoder)")
    return Loaded(model, buffer)


def load_open_clip_text_encoder(req: LoadRequest, prefix: str, shipped: Path, *, with_projection: bool,
                                drop_last_layer: bool) -> Loaded:
    tensors, buffer = read_checkpoint(req, lambda k: k.startswith(prefix))
    try:
        vocab, hidden = tensors[prefix + "token_embedding.weight"].shape
        positions = tensors[prefix + "positional_embedding"].shape[0]
        inter = tensors[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as exc:
        raise InvalidModelException(f"{req.location}: no OpenCLIP text encoder under {prefix}* ({exc})") from exc
    layers = _layers(list(tensors), r"transformer\.resblocks\.(\d+)\.") - (1 if drop_last_layer else 0)
    proj = tensors.get(prefix + "text_projection")
    config = clip_config(shipped, hidden, vocab, positions, layers, inter,
                          int(proj.shape[1]) if proj is not None else None)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    skeleton = empty_model(lambda: cls(config))
    converted = sfu.convert_open_clip_checkpoint(skeleton, tensors, prefix=prefix)
    assign_weights(skeleton, fit_keys(skeleton, converted), req.device, f"{req.location} (open_clip text encoder)")
    return Loaded(skeleton, buffer)


def load_scheduler(req: LoadRequest, orig: dict[str, Any]) -> Loaded:
    config = read_json(CONFIGS_DIR / "diffusers" / base_of(req.record) / "scheduler" / "scheduler_config.json")
    config["prediction_type"] = "v_prediction" if orig["model"]["params"].get("parameterization") == "v" else "epsilon"
    return Loaded(resolve_class("diffusers", config["_class_name"]).from_config(config))  # type: ignore[attr-defined]


def load_main_checkpoint(req: LoadRequest) -> Loaded:
    base = base_of(req.record)
    if req.submodel is None:
        denoiser = SubModelType.Transformer if base in ("flux", *SD3_BASES, *DIT_BASES) else SubModelType.UNet
        raise SubmodelRequiredError(f"model {req.record.key} is a main model: name a submodel "
                                    f"({denoiser.value}, vae, ...)")
    sub = req.submodel
    if base == "flux":
        return load_flux_checkpoint(req)
    if base in SD3_BASES:
        return load_sd3_checkpoint(req)
    if base in DIT_BASES:
        return load_dit_checkpoint(req)
    orig = original_config(req.record)
    shipped = CONFIGS_DIR / "diffusers" / base
    if sub == SubModelType.UNet:
        return load_unet(req, orig)
    if sub in (SubModelType.Vae, SubModelType.VaeDecoder, SubModelType.VaeEncoder):
        return load_vae(req, orig)
    if sub == SubModelType.Scheduler:
        return load_scheduler(req, orig)
    if sub in (SubModelType.Tokenizer, SubModelType.Tokenizer2):
        return load_tokenizer(req)
    if sub == SubModelType.TextEncoder and base in CLIP_PREFIXES:
        return load_clip_text_encoder(req, CLIP_PREFIXES[base], shipped / "text_encoder")
    if sub == SubModelType.TextEncoder and base == "sd-2":
        return load_open_clip_text_encoder(req, OPENCLIP_PREFIXES[base], shipped / "text_encoder",
                                           with_projection=False, drop_last_layer=True)
    if sub == SubModelType.TextEncoder2 and base in ("sdxl", "sdxl-refiner"):
        return load_open_clip_text_encoder(req, OPENCLIP_PREFIXES[base], shipped / "text_encoder_2",
                                           with_projection=True, drop_last_layer=False)
    raise InvalidModelException(f"{req.location}: a {base} checkpoint has no {sub.value} submodel")


def load_vae_checkpoint(req: LoadRequest) -> Loaded:
    if base_of(req.record) in PUBLISHED:  # Wan's, Qwen-Image's, FLUX.2's: diffusers classes of their own
        return load_family_vae(req)
    if base_of(req.record) in MMDIT_VAE_LATENTS:  # FLUX.1's and SD-3's: no original config, read from the weights
        return load_mmdit_vae_file(req)
    return load_vae(req, original_config(req.record), whole_file=True)


_CONTROLNET_KEYS = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block",
                    "cross_attention_dim", "attention_head_dim", "use_linear_projection", "class_embed_type",
                    "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                    "transformer_layers_per_block")


# the parts of a whole SD model that ControlNet 1.0 files carry beside ``control_model.*``
_NOT_CONTROLNET = (UNET_PREFIX, "first_stage_model.", "cond_stage_model.", "model_ema.")


_HINT = "controlnet_cond_embedding."


def controlnet_config(orig: dict[str, Any], base: str) -> dict[str, Any]:
    """The diffusers ControlNet config of an original YAML: the ``control_stage_config`` of a
    ControlNet one (cldm_v15.yaml...), else the UNet of a main model's (the ControlNet copies its encoder)."""
    params = orig["model"]["params"]
    control = (params.get("control_stage_config") or {}).get("params")
    if control:
        orig = {"model": {"params": {**params, "unet_config": {"params": {"out_channels": 4, **control}}}}}
    unet = unet_config(orig, base)
    return {k: unet[k] for k in _CONTROLNET_KEYS if k in unet} | {
        "conditioning_channels": int(control.get("hint_channels", 3)) if control else 3}


def is_controlnet_key(name: str) -> bool:
    """Whether a tensor of a ControlNet file belongs to the ControlNet (not to the SD model beside it)."""
    return name.startswith(sfu.LDM_CONTROLNET_KEY) or not name.startswith(_NOT_CONTROLNET)


def _hint_channels(converted: dict[str, torch.Tensor]) -> tuple[int, tuple[int, ...]] | None:
    """Input channels and widths of the hint encoder (conditioning_embedding_out_channels), from its weights."""
    conv_in = converted.get(_HINT + "conv_in.weight")
    if conv_in is None:
        return None
    blocks = sorted(int(m.group(1)) for k in converted if (m := re.fullmatch(rf"{_HINT}blocks\.(\d+)\.weight", k)))
    widths = [int(conv_in.shape[0])] + [int(converted[f"{_HINT}blocks.{i}.weight"].shape[0]) for i in blocks[1::2]]
    return int(conv_in.shape[1]), tuple(widths)


def load_controlnet_checkpoint(req: LoadRequest) -> Loaded:
    """A ControlNet from one file: original names (``control_model.*``, or unprefixed as some
    re-publications have them) or a diffusers ControlNetModel's. The shape comes from the YAML;
    the hint encoder's from the weights. FLUX and SD-3 ControlNets are transformers: see below."""
    base = base_of(req.record)
    if base == "flux":
        return load_flux_controlnet(req)
    if base in SD3_BASES:
        return load_sd3_controlnet(req)
    config = controlnet_config(original_config(req.record), base)
    tensors, buffer = read_checkpoint(req, is_controlnet_key)
    if not any(k.startswith((sfu.LDM_CONTROLNET_KEY, "time_embed.", "time_embedding.")) for k in tensors):
        raise InvalidModelException(f"{req.location}: no ControlNet weights (control_model.*, or a ControlNetModel's)")
    converted = quiet(sfu.convert_controlnet_checkpoint, tensors, config)
    if config.get("addition_embed_type") == "text_time":  # diffusers' conversion leaves SDXL's label_emb behind
        stripped = {k.removeprefix(sfu.LDM_CONTROLNET_KEY): v for k, v in tensors.items()}
        mapping = cast(dict[str, dict[str, dict[str, str]]], sfu.DIFFUSERS_TO_LDM_MAPPING)
        for new, old in mapping["controlnet"]["addition_embed_type"].items():
            if new not in converted and old in stripped:
                converted[new] = stripped[old]
    converted = {k: v for k, v in converted.items() if v is not None}  # the conversion maps absent keys to None
    hint = _hint_channels(converted)
    if hint is not None:
        config |= {"conditioning_channels": hint[0], "conditioning_embedding_out_channels": hint[1]}
    return build_from(lambda: ControlNetModel.from_config(config), converted, req, buffer, "controlnet")
