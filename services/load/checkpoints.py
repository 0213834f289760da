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

import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxTransformer2DModel,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from services.load.cache import Loaded
from services.load.errors import InvalidModelException, SubmodelRequiredError
from services.load.loaders import (
    LoadRequest,
    block_count,
    build_t5_encoder,
    fit_keys,
    live_buffer,
    read_json,
    resolve_class,
    shape_of,
)
from services.load.safetensors_fast import assign_weights, empty_model
from services.load.weights import read_state_dict
from services.records.enums import SubModelType

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("first_stage_model.", "vae.")
CLIP_PREFIXES = {"sd-1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPENCLIP_PREFIXES = {"sd-2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model.",
                     "sdxl-refiner": "conditioner.embedders.0.model."}
_DEFAULT_YAML = {"sd-1": "v1-inference.yaml", "sd-2": "v2-inference-v.yaml", "sdxl": "sd_xl_base.yaml",
                 "sdxl-refiner": "sd_xl_refiner.yaml"}


def _base(record: Any) -> str:
    value = getattr(record.base_model, "value", record.base_model)
    return "sd-1" if value == "any" else str(value)


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
    base = _base(record)
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


def _quiet(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():  # diffusers warns that image_size is deprecated: we pass it on purpose
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _read(req: LoadRequest, select: Callable[[str], bool]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    if not req.location.is_file():
        raise InvalidModelException(f"{req.location}: a checkpoint must be a single file")
    state = read_state_dict([req.location], req.device, req.dtype, select)
    return state.tensors, state.buffer


def _build(cls: Callable[[], torch.nn.Module], tensors: dict[str, torch.Tensor], req: LoadRequest,
           buffer: torch.Tensor | None, what: str) -> Loaded:
    model = empty_model(cls)
    assign_weights(model, tensors, req.device, f"{req.location} ({what})")
    return Loaded(model, buffer)


def unet_config(orig: dict[str, Any], base: str) -> dict[str, Any]:
    """The diffusers UNet config of an original YAML.

    diffusers tells SDXL's size-and-crop embedding (``text_time``) from a class projection by the
    context width alone (2048 or 1280); the base model says it whatever the width, as for a small
    model, so it decides. SDXL's time-id embedding width (256) is part of the architecture."""
    config: dict[str, Any] = _quiet(sfu.create_unet_diffusers_config_from_ldm, orig, {},
                                    image_size=_image_size(orig))
    if base in ("sdxl", "sdxl-refiner") and config.get("class_embed_type") == "projection":
        config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)
    return config


def load_unet(req: LoadRequest, orig: dict[str, Any]) -> Loaded:
    tensors, buffer = _read(req, lambda k: k.startswith(UNET_PREFIX))
    if not tensors:
        raise InvalidModelException(f"{req.location}: no UNet weights ({UNET_PREFIX}*)")
    config = unet_config(orig, _base(req.record))
    converted = _quiet(sfu.convert_ldm_unet_checkpoint, tensors, config)
    return _build(lambda: UNet2DConditionModel.from_config(config), converted, req, buffer, "unet")


def load_vae(req: LoadRequest, orig: dict[str, Any], whole_file: bool = False) -> Loaded:
    select = (lambda k: True) if whole_file else (lambda k: k.startswith(VAE_PREFIXES))
    tensors, buffer = _read(req, select)
    if not tensors:
        raise InvalidModelException(f"{req.location}: no VAE weights ({'|'.join(VAE_PREFIXES)}*)")
    config = _quiet(sfu.create_vae_diffusers_config_from_ldm, orig, tensors, image_size=_image_size(orig))
    converted = _quiet(sfu.convert_ldm_vae_checkpoint, tensors, config)
    return _build(lambda: AutoencoderKL.from_config(config), converted, req, buffer, "vae")


def _layers(keys: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.search(pattern, k))}
    return max(found) + 1 if found else 0


def _clip_config(shipped: Path, hidden: int, vocab: int, positions: int, layers: int, inter: int,
                 projection: int | None = None) -> CLIPTextConfig:
    base = read_json(shipped / "config.json") if (shipped / "config.json").is_file() else {}
    base.update(hidden_size=hidden, vocab_size=vocab, max_position_embeddings=positions, num_hidden_layers=layers,
                intermediate_size=inter, num_attention_heads=max(1, hidden // 64))
    if projection is not None:
        base["projection_dim"] = projection
    return CLIPTextConfig(**{k: v for k, v in base.items() if k not in ("architectures", "transformers_version")})


def load_clip_text_encoder(req: LoadRequest, prefix: str, shipped: Path) -> Loaded:
    tensors, buffer = _read(req, lambda k: k.startswith(prefix))
    converted = sfu.convert_ldm_clip_checkpoint(tensors, remove_prefix=prefix)
    try:
        vocab, hidden = converted["text_model.embeddings.token_embedding.weight"].shape
        positions = converted["text_model.embeddings.position_embedding.weight"].shape[0]
        inter = converted["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise InvalidModelException(f"{req.location}: no CLIP text encoder under {prefix}* ({exc})") from exc
    layers = _layers(list(converted), r"text_model\.encoder\.layers\.(\d+)\.")
    config = _clip_config(shipped, hidden, vocab, positions, layers, inter)
    model = empty_model(lambda: CLIPTextModel(config))
    assign_weights(model, fit_keys(model, converted), req.device, f"{req.location} (text_encoder)")
    return Loaded(model, buffer)


def load_open_clip_text_encoder(req: LoadRequest, prefix: str, shipped: Path, *, with_projection: bool,
                                drop_last_layer: bool) -> Loaded:
    tensors, buffer = _read(req, lambda k: k.startswith(prefix))
    try:
        vocab, hidden = tensors[prefix + "token_embedding.weight"].shape
        positions = tensors[prefix + "positional_embedding"].shape[0]
        inter = tensors[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as exc:
        raise InvalidModelException(f"{req.location}: no OpenCLIP text encoder under {prefix}* ({exc})") from exc
    layers = _layers(list(tensors), r"transformer\.resblocks\.(\d+)\.") - (1 if drop_last_layer else 0)
    proj = tensors.get(prefix + "text_projection")
    config = _clip_config(shipped, hidden, vocab, positions, layers, inter,
                          int(proj.shape[1]) if proj is not None else None)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    skeleton = empty_model(lambda: cls(config))
    converted = sfu.convert_open_clip_checkpoint(skeleton, tensors, prefix=prefix)
    assign_weights(skeleton, fit_keys(skeleton, converted), req.device, f"{req.location} (open_clip text encoder)")
    return Loaded(skeleton, buffer)


def load_scheduler(req: LoadRequest, orig: dict[str, Any]) -> Loaded:
    config = read_json(CONFIGS_DIR / "diffusers" / _base(req.record) / "scheduler" / "scheduler_config.json")
    config["prediction_type"] = "v_prediction" if orig["model"]["params"].get("parameterization") == "v" else "epsilon"
    return Loaded(resolve_class("diffusers", config["_class_name"]).from_config(config))  # type: ignore[attr-defined]


def load_tokenizer(req: LoadRequest) -> Loaded:
    """CLIP's BPE tokenizer, shipped with the project (single files carry none). OpenAI CLIP (SD-1,
    SDXL's first encoder) pads with the end token; the OpenCLIP encoders (SD-2, SDXL's second) with '!'."""
    folder = CONFIGS_DIR / "tokenizers" / "clip-vit-large-patch14"
    if not (folder / "vocab.json").is_file():
        raise InvalidModelException(f"{req.location}: the CLIP tokenizer files are missing from {folder}")
    open_clip = req.submodel == SubModelType.Tokenizer2 or _base(req.record) == "sd-2"
    if open_clip:
        return Loaded(CLIPTokenizer.from_pretrained(folder, local_files_only=True, pad_token="!"))
    return Loaded(CLIPTokenizer.from_pretrained(folder, local_files_only=True))


def load_main_checkpoint(req: LoadRequest) -> Loaded:
    base = _base(req.record)
    if req.submodel is None:
        denoiser = SubModelType.Transformer if base in ("flux", "sd-3") else SubModelType.UNet
        raise SubmodelRequiredError(f"model {req.record.key} is a main model: name a submodel "
                                    f"({denoiser.value}, vae, ...)")
    sub = req.submodel
    if base == "flux":
        return load_flux_checkpoint(req)
    if base == "sd-3":
        return load_sd3_checkpoint(req)
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
    base = _base(req.record)
    if base == "flux":
        return load_flux_controlnet(req)
    if base == "sd-3":
        return load_sd3_controlnet(req)
    config = controlnet_config(original_config(req.record), base)
    tensors, buffer = _read(req, is_controlnet_key)
    if not any(k.startswith((sfu.LDM_CONTROLNET_KEY, "time_embed.", "time_embedding.")) for k in tensors):
        raise InvalidModelException(f"{req.location}: no ControlNet weights (control_model.*, or a ControlNetModel's)")
    converted = _quiet(sfu.convert_controlnet_checkpoint, tensors, config)
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
    return _build(lambda: ControlNetModel.from_config(config), converted, req, buffer, "controlnet")


# ---- FLUX and SD-3: transformers, and the ControlNets that copy their blocks ----
# what an all-in-one FLUX or SD-3 file holds beside its transformer (ComfyUI's and Stability's
# bundles): not read for the transformer
NOT_FLUX_TRANSFORMER = ("vae.", "first_stage_model.", "text_encoders.", "cond_stage_model.", "conditioner.")
# the submodels a FLUX or SD-3 file's transformer is served as: "unet" stays an alias of
# "transformer", as it was served before SubModelType had a transformer
DENOISER_SUBMODELS = (SubModelType.Transformer.value, SubModelType.UNet.value)
_BFL_FLUX_WIDTH = 3072  # FLUX.1's hidden width, which diffusers' conversion of BFL's layout assumes
_BFL_FUSED = re.compile(r"single_blocks\.(\d+)\.linear1\.(weight|bias)")


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary embedding widths per axis (index, row, column). RoPE has no weights to read them
    from: FLUX.1 splits its 128-wide heads (16, 56, 56); other widths keep those proportions, rounded
    down to even widths on the image axes."""
    image = (7 * head_dim // 16) // 2 * 2
    return head_dim - 2 * image, image, image


def _prefix_of(tensors: dict[str, torch.Tensor], leaf: str) -> str | None:
    found = [k[: -len(leaf)] for k in tensors if k == leaf or k.endswith("." + leaf)]
    return min(found, key=len) if found else None


def _mmdit_config(sd: dict[str, torch.Tensor], where: Path, what: str) -> dict[str, Any]:
    """What FLUX transformers and FLUX ControlNets share: widths, blocks and heads (FLUX normalises
    queries per head, so the norm's width is the head's), the text and pooled-text widths."""
    inner, in_channels = shape_of(sd, "x_embedder.weight", where, what)
    head = shape_of(sd, "transformer_blocks.0.attn.norm_q.weight", where, what)[0]
    if inner % head:
        raise InvalidModelException(f"{where}: {what} width {inner} is not a multiple of its head width {head}")
    return {"patch_size": 1, "in_channels": in_channels, "attention_head_dim": head,
            "num_attention_heads": inner // head,
            "num_layers": block_count(sd, r"transformer_blocks\.(\d+)\."),
            "num_single_layers": block_count(sd, r"single_transformer_blocks\.(\d+)\."),
            "joint_attention_dim": shape_of(sd, "context_embedder.weight", where, what)[1],
            "pooled_projection_dim": shape_of(sd, "time_text_embed.text_embedder.linear_1.weight", where, what)[1],
            "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in sd,
            "axes_dims_rope": rope_axes(head)}


def flux_transformer_config(sd: dict[str, torch.Tensor], where: Path) -> dict[str, Any]:
    """``FluxTransformer2DModel``'s config from diffusers-named weights: dev embeds the guidance
    scale (schnell not), Fill takes 384 input features; the output is the latent's 64 (patch 1)."""
    what = "FLUX transformer"
    return _mmdit_config(sd, where, what) | {"out_channels": shape_of(sd, "proj_out.weight", where, what)[0]}


def _from_bfl(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """BFL's layout (``double_blocks``/``single_blocks``) renamed by diffusers' own conversion.

    That conversion splits each single block's fused q/k/v/MLP projection (``linear1``) at FLUX.1's
    widths. For another width it is handed placeholders of FLUX.1's size (on the meta device: no
    memory), and the real projections are split here, at the width of the file."""
    tensors = {k.removeprefix(UNET_PREFIX): v for k, v in tensors.items()}
    width = shape_of(tensors, "img_in.weight", where, "BFL-layout FLUX transformer")[0]
    fused = {k: v for k, v in tensors.items() if _BFL_FUSED.fullmatch(k)}
    for key, value in fused.items():
        if value.shape[0] != 7 * width:
            raise InvalidModelException(f"{where}: {key} has {value.shape[0]} rows; FLUX fuses q, k, v and "
                                        f"its 4x MLP there: {7 * width} for width {width}")
    if width != _BFL_FLUX_WIDTH:
        tensors |= {k: torch.empty((7 * _BFL_FLUX_WIDTH, *v.shape[1:]), device="meta") for k, v in fused.items()}
    try:
        converted: dict[str, torch.Tensor] = sfu.convert_flux_transformer_checkpoint_to_diffusers(tensors)
    except (KeyError, IndexError) as exc:  # a tensor missing; no single blocks at all
        raise InvalidModelException(f"{where}: incomplete BFL-layout FLUX transformer: no tensor {exc}") from exc
    if width != _BFL_FLUX_WIDTH:
        names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        for key, value in fused.items():
            block, kind = cast(re.Match[str], _BFL_FUSED.fullmatch(key)).groups()
            for name, part in zip(names, torch.split(value, [width, width, width, 4 * width]), strict=True):
                converted[f"single_transformer_blocks.{block}.{name}.{kind}"] = part
    return converted


def flux_diffusers_state(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """A FLUX transformer's weights under diffusers' names, from BFL's layout or diffusers' own
    (possibly under a prefix such as ``transformer.`` or ``model.diffusion_model.``)."""
    if any(k.removeprefix(UNET_PREFIX).startswith("double_blocks.") for k in tensors):
        return _from_bfl(tensors, where)
    prefix = _prefix_of(tensors, "context_embedder.weight")
    if prefix is None or not any(k.startswith(prefix + "transformer_blocks.") for k in tensors):
        raise InvalidModelException(f"{where}: no FLUX transformer weights (BFL double_blocks.*, or diffusers "
                                    "transformer_blocks.* with a context_embedder)")
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_flux_checkpoint(req: LoadRequest) -> Loaded:
    """A FLUX.1 transformer from one file, in BFL's layout or diffusers'."""
    sub = cast(SubModelType, req.submodel)
    if sub.value not in DENOISER_SUBMODELS:
        raise InvalidModelException(f"{req.location}: a FLUX checkpoint holds the transformer alone; load it as "
                                    f"the {SubModelType.Transformer.value} submodel (its VAE and text encoders are "
                                    f"models of their own), not as {sub.value}")
    return _load_transformer(req, flux_diffusers_state, flux_transformer_config, FluxTransformer2DModel,
                             "FLUX transformer")


def _load_transformer(req: LoadRequest, to_diffusers: Callable[[dict[str, torch.Tensor], Path], dict[str, torch.Tensor]],
                      configure: Callable[[dict[str, torch.Tensor], Path], dict[str, Any]], cls: Any, what: str
                      ) -> Loaded:
    """A transformer denoiser from one file: its tensors (bundled parts unread), converted to diffusers'
    names, a config derived from their shapes, the weights assigned in place."""
    tensors, buffer = _read(req, lambda k: not k.startswith(NOT_FLUX_TRANSFORMER))
    converted = to_diffusers(tensors, req.location)
    config = configure(converted, req.location)
    model = empty_model(lambda: cls.from_config(config))
    assign_weights(model, converted, req.device, f"{req.location} ({what})")
    return Loaded(model, live_buffer(model, buffer))


def load_flux_controlnet(req: LoadRequest) -> Loaded:
    """A ``FluxControlNetModel`` (InstantX, Shakker-Labs: diffusers' names) from one file: a Union
    ControlNet embeds its modes, some encode the hint image themselves (``input_hint_block``)."""
    tensors, buffer = _read(req, lambda k: True)
    if any(k.startswith("double_blocks.") for k in tensors):
        raise InvalidModelException(f"{req.location}: FLUX ControlNet in XLabs' layout (BFL double_blocks.*, "
                                    "input_hint_block): diffusers has no conversion of it, so it does not load")
    if "controlnet_x_embedder.weight" not in tensors:
        raise InvalidModelException(f"{req.location}: no FLUX ControlNet weights (controlnet_x_embedder, "
                                    "controlnet_blocks.*)")
    what = "FLUX ControlNet"
    config = _mmdit_config(tensors, req.location, what)
    if "controlnet_mode_embedder.weight" in tensors:
        config["num_mode"] = shape_of(tensors, "controlnet_mode_embedder.weight", req.location, what)[0]
    if any(k.startswith("input_hint_block.") for k in tensors):
        hint = shape_of(tensors, "input_hint_block.conv_out.weight", req.location, what)
        config["conditioning_embedding_channels"] = hint[0]
    model = empty_model(lambda: FluxControlNetModel.from_config(config))
    assign_weights(model, tensors, req.device, f"{req.location} ({what})")
    return Loaded(model, buffer)


# SD-3's heads are 64 wide in every release, and only a per-head norm (SD-3.5) would show it; a
# narrower model (a test's) takes the largest width dividing both
_SD3_HEAD = 64


def _sd3_blocks(sd: dict[str, torch.Tensor], inner: int, where: Path, what: str) -> dict[str, Any]:
    """What SD-3 transformers and ControlNets share: blocks and heads. SD-3.5 normalises queries
    per head (RMS; a layer norm would have a bias), so the norm's width is the head's; its medium
    model's MMDiT-X blocks add a second, image-only attention (``attn2``)."""
    norm = "transformer_blocks.0.attn.norm_q.weight"
    head = shape_of(sd, norm, where, what)[0] if norm in sd else math.gcd(inner, _SD3_HEAD)
    if inner % head:
        raise InvalidModelException(f"{where}: {what} width {inner} is not a multiple of its head width {head}")
    layers = block_count(sd, r"transformer_blocks\.(\d+)\.")
    return {"attention_head_dim": head, "num_attention_heads": inner // head, "num_layers": layers,
            "dual_attention_layers": tuple(i for i in range(layers)
                                           if f"transformer_blocks.{i}.attn2.to_q.weight" in sd),
            "qk_norm": None if norm not in sd else "layer_norm" if norm.replace("weight", "bias") in sd else "rms_norm"}


def sd3_controlnet_config(sd: dict[str, torch.Tensor], where: Path) -> dict[str, Any]:
    """``SD3ControlNetModel``'s config from diffusers-named weights. SD-3's ControlNets patchify the
    latent and text like the transformer; SD-3.5 large's keep only the control latent's patchifier
    and blocks without a text stream. Extra control channels (inpainting) widen ``pos_embed_input``."""
    what = "SD-3 ControlNet"
    inner, control_in, patch, _ = shape_of(sd, "pos_embed_input.proj.weight", where, what)
    pos_embed = sd.get("pos_embed.pos_embed")
    latent_in = shape_of(sd, "pos_embed.proj.weight", where, what)[1] if "pos_embed.proj.weight" in sd else control_in
    text = shape_of(sd, "context_embedder.weight", where, what) if "context_embedder.weight" in sd else None
    config: dict[str, Any] = _sd3_blocks(sd, inner, where, what) | {
        "patch_size": patch, "in_channels": latent_in, "out_channels": latent_in,
        "extra_conditioning_channels": control_in - latent_in,
        "pooled_projection_dim": shape_of(sd, "time_text_embed.text_embedder.linear_1.weight", where, what)[1],
        "joint_attention_dim": text[1] if text else None, "caption_projection_dim": text[0] if text else inner,
        "use_pos_embed": "pos_embed.proj.weight" in sd,
        # SD-3.5 large's ControlNets take the pooled text the transformer gets, not zeros
        "force_zeros_for_pooled_projection": text is not None}
    if "pos_embed.proj.weight" not in sd:
        config["pos_embed_type"] = None
    elif pos_embed is not None:  # the sin-cos table is stored: its side is the largest patch grid
        config["pos_embed_max_size"] = math.isqrt(int(pos_embed.shape[1]))
    return config


def load_sd3_controlnet(req: LoadRequest) -> Loaded:
    """An ``SD3ControlNetModel`` from one file in diffusers' layout."""
    tensors, buffer = _read(req, lambda k: True)
    if "x_embedder.proj.weight" in tensors or any(".attn.qkv." in k for k in tensors):
        raise InvalidModelException(f"{req.location}: SD-3 ControlNet in Stability's layout (x_embedder, fused "
                                    "attn.qkv): diffusers has no conversion of it in the library, so it does not load")
    if "pos_embed_input.proj.weight" not in tensors:
        raise InvalidModelException(f"{req.location}: no SD-3 ControlNet weights (pos_embed_input, "
                                    "controlnet_blocks.*)")
    config = sd3_controlnet_config(tensors, req.location)
    model = empty_model(lambda: SD3ControlNetModel.from_config(config))
    assign_weights(model, tensors, req.device, f"{req.location} (SD-3 ControlNet)")
    return Loaded(model, buffer)


# ---- SD-3 / SD-3.5 main files: the transformer, and the VAE and text encoders a bundle carries ----
# the text encoders of Stability's and ComfyUI's all-in-one files (HF CLIP names under these), with
# the shipped configs whose architecture they share (SDXL's CLIP-L and OpenCLIP bigG)
SD3_CLIP_PREFIXES = {SubModelType.TextEncoder: "text_encoders.clip_l.transformer.",
                     SubModelType.TextEncoder2: "text_encoders.clip_g.transformer."}
_SD3_CLIPS = {SubModelType.TextEncoder: ("CLIP-L", CONFIGS_DIR / "diffusers" / "sdxl" / "text_encoder"),
              SubModelType.TextEncoder2: ("CLIP-G", CONFIGS_DIR / "diffusers" / "sdxl" / "text_encoder_2")}
SD3_T5_PREFIX = "text_encoders.t5xxl.transformer."  # HF T5EncoderModel names under it
# what no weight records: the default latent side (1024 pixels), and the VAE's latent statistics
# and group norms, the same in every SD-3 and SD-3.5 release
_SD3_SAMPLE_SIZE = 128
_SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609, "sample_size": 1024, "norm_num_groups": 32,
            "force_upcast": True}
_SD3_SHIFT = 3.0  # the flow-matching schedule's timestep shift SD-3 and SD-3.5 were trained with


def sd3_diffusers_state(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """An SD-3 transformer's weights under diffusers' names: Stability's layout (``joint_blocks``,
    fused q/k/v, under ``model.diffusion_model.`` or bare) through diffusers' own conversion, or
    diffusers' layout under any prefix."""
    if any(k.removeprefix(UNET_PREFIX).startswith("joint_blocks.") for k in tensors):
        try:  # the conversion pops what it renames: it gets a dict of its own
            converted: dict[str, torch.Tensor] = sfu.convert_sd3_transformer_checkpoint_to_diffusers(dict(tensors))
        except (KeyError, IndexError) as exc:
            raise InvalidModelException(f"{where}: incomplete SAI-layout SD-3 transformer: no tensor {exc}") from exc
        return converted
    prefix = _prefix_of(tensors, "context_embedder.weight")
    if (prefix is None or prefix + "pos_embed.proj.weight" not in tensors
            or not any(k.startswith(prefix + "transformer_blocks.") for k in tensors)):
        raise InvalidModelException(f"{where}: no SD-3 transformer weights (Stability's joint_blocks.*, or diffusers' "
                                    "transformer_blocks.* with a context_embedder and a pos_embed.proj patchifier)")
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def sd3_transformer_config(sd: dict[str, torch.Tensor], where: Path) -> dict[str, Any]:
    """``SD3Transformer2DModel``'s config from diffusers-named weights: the patchifier gives the
    width, input channels and patch; the stored sin-cos table the largest patch grid; the text
    projection the T5 width and the caption width; the pooled-text embedder the CLIPs' joint width."""
    what = "SD-3 transformer"
    inner, in_channels, patch, _ = shape_of(sd, "pos_embed.proj.weight", where, what)
    table = shape_of(sd, "pos_embed.pos_embed", where, what)
    grid = table[1] if len(table) == 3 else 0  # (1, patches, width)
    side = math.isqrt(grid)
    if not grid or side * side != grid:
        raise InvalidModelException(f"{where}: {what} positional table of shape {table} is no square grid of patches")
    caption, text = shape_of(sd, "context_embedder.weight", where, what)
    out = shape_of(sd, "proj_out.weight", where, what)[0]
    if out % (patch * patch):
        raise InvalidModelException(f"{where}: {what} output width {out} is not a whole number of {patch}x{patch} patches")
    return _sd3_blocks(sd, inner, where, what) | {
        "sample_size": _SD3_SAMPLE_SIZE, "patch_size": patch, "in_channels": in_channels,
        "out_channels": out // (patch * patch), "pos_embed_max_size": side, "joint_attention_dim": text,
        "caption_projection_dim": caption,
        "pooled_projection_dim": shape_of(sd, "time_text_embed.text_embedder.linear_1.weight", where, what)[1]}


def load_sd3_transformer(req: LoadRequest) -> Loaded:
    return _load_transformer(req, sd3_diffusers_state, sd3_transformer_config, SD3Transformer2DModel,
                             "SD-3 transformer")


def _bundled(req: LoadRequest, what: str, prefixes: tuple[str, ...]) -> tuple[dict[str, torch.Tensor],
                                                                             torch.Tensor | None]:
    tensors, buffer = _read(req, lambda k: k.startswith(prefixes))
    if not tensors:
        raise InvalidModelException(f"{req.location}: this SD-3 checkpoint bundles no {what} ({'|'.join(prefixes)}*): "
                                    "load it from a model of its own")
    return tensors, buffer


def sd3_vae_config(sd: dict[str, torch.Tensor], where: Path) -> dict[str, Any]:
    """``AutoencoderKL``'s config from LDM-named VAE weights (prefix removed): widths per level from
    each level's first block, 16 latent channels from the decoder's input, no quant convolutions."""
    what = "SD-3 VAE"
    levels = block_count(sd, r"encoder\.down\.(\d+)\.")
    return _SD3_VAE | {
        "in_channels": shape_of(sd, "encoder.conv_in.weight", where, what)[1],
        "out_channels": shape_of(sd, "decoder.conv_out.weight", where, what)[0],
        "latent_channels": shape_of(sd, "decoder.conv_in.weight", where, what)[1],
        "block_out_channels": [shape_of(sd, f"encoder.down.{i}.block.0.conv2.weight", where, what)[0]
                               for i in range(levels)],
        "layers_per_block": block_count(sd, r"encoder\.down\.0\.block\.(\d+)\."),
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "use_quant_conv": "quant_conv.weight" in sd, "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": any(k.startswith("encoder.mid.attn_1.") for k in sd)}


def load_sd3_vae(req: LoadRequest) -> Loaded:
    tensors, buffer = _bundled(req, "VAE", VAE_PREFIXES)
    prefix = next(p for p in VAE_PREFIXES if any(k.startswith(p) for k in tensors))
    config = sd3_vae_config({k.removeprefix(prefix): v for k, v in tensors.items()}, req.location)
    converted = _quiet(sfu.convert_ldm_vae_checkpoint, tensors, config)
    return _build(lambda: AutoencoderKL.from_config(config), converted, req, buffer, "SD-3 VAE")


def load_sd3_text_encoder(req: LoadRequest, sub: SubModelType) -> Loaded:
    """A bundled CLIP as ``CLIPTextModelWithProjection`` (the pipeline pools both through their
    projections). CLIP-L's projection is missing from some bundles: SD-3's reference code starts it
    as the identity, and diffusers' single-file loader gives it that too."""
    name, shipped = _SD3_CLIPS[sub]
    prefix = SD3_CLIP_PREFIXES[sub]
    tensors, buffer = _bundled(req, f"{name} text encoder", (prefix,))
    converted = sfu.convert_ldm_clip_checkpoint(tensors, prefix)
    flat = {k.removeprefix("text_model."): v for k, v in converted.items()}  # the shapes, with or without the level
    what = f"{name} text encoder"
    vocab, hidden = shape_of(flat, "embeddings.token_embedding.weight", req.location, what)
    positions = shape_of(flat, "embeddings.position_embedding.weight", req.location, what)[0]
    inter = shape_of(flat, "encoder.layers.0.mlp.fc1.weight", req.location, what)[0]
    if "text_projection.weight" not in converted:
        converted["text_projection.weight"] = torch.eye(hidden, device=req.device, dtype=req.dtype)
    config = _clip_config(shipped, hidden, vocab, positions, block_count(flat, r"encoder\.layers\.(\d+)\."), inter,
                          int(converted["text_projection.weight"].shape[0]))
    model = empty_model(lambda: CLIPTextModelWithProjection(config))
    assign_weights(model, fit_keys(model, converted), req.device, f"{req.location} ({what})")
    return Loaded(model, live_buffer(model, buffer))


def load_sd3_t5_encoder(req: LoadRequest) -> Loaded:
    """The bundled T5-XXL as a ``T5EncoderModel``, by the T5 single-file loader's own build."""
    what = "T5 text encoder"
    tensors, buffer = _bundled(req, what, (SD3_T5_PREFIX,))
    return build_t5_encoder(req, {k.removeprefix(SD3_T5_PREFIX): v for k, v in tensors.items()}, buffer,
                            f"SD-3 {what}")


def load_sd3_checkpoint(req: LoadRequest) -> Loaded:
    """A submodel of an SD-3 / SD-3.5 file: its transformer (as ``transformer``, or ``unet`` as
    before), and what a bundle carries (VAE, CLIP-L, CLIP-G, T5-XXL); the CLIP tokenizers and the
    scheduler ship with the project. T5's tokenizer does not: it is not served."""
    sub = cast(SubModelType, req.submodel)
    if sub.value in DENOISER_SUBMODELS:
        return load_sd3_transformer(req)
    if sub in (SubModelType.Vae, SubModelType.VaeDecoder, SubModelType.VaeEncoder):
        return load_sd3_vae(req)
    if sub in SD3_CLIP_PREFIXES:
        return load_sd3_text_encoder(req, sub)
    if sub == SubModelType.TextEncoder3:
        return load_sd3_t5_encoder(req)
    if sub == SubModelType.Tokenizer3:
        raise InvalidModelException(f"{req.location}: an SD-3 checkpoint carries no T5 tokenizer ({sub.value}) and "
                                    "none ships with the project (nothing is downloaded): load it from a diffusers "
                                    "SD-3 folder's tokenizer_3")
    if sub in (SubModelType.Tokenizer, SubModelType.Tokenizer2):
        return load_tokenizer(req)
    if sub == SubModelType.Scheduler:
        return Loaded(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=_SD3_SHIFT))
    raise InvalidModelException(f"{req.location}: an sd-3 checkpoint has no {sub.value} submodel")
