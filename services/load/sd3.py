"""SD-3 / SD-3.5 from single files: the transformer, what an all-in-one file bundles (VAE, CLIP-L, CLIP-G,
T5-XXL) and the ControlNets; configs from the weights' shapes, tokenizers and scheduler shipped."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3ControlNetModel,
    SD3Transformer2DModel,
)
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextModelWithProjection

from modelbus.services.load.errors import InvalidModelException
from modelbus.services.load.kit import (
    CONFIGS_DIR,
    DENOISER_SUBMODELS,
    UNET_PREFIX,
    VAE_PREFIXES,
    Loaded,
    LoadRequest,
    base_of,
    block_count,
    build_from,
    clip_config,
    fit_keys,
    live_buffer,
    load_tokenizer,
    load_transformer,
    prefix_of,
    quiet,
    read_checkpoint,
    shape_of,
)
from modelbus.services.load.loaders import build_t5_encoder
from modelbus.services.load.safetensors_fast import assign_weights, empty_model
from modelbus.services.records.enums import SubModelType

# SD-3's heads are 64 wide in every release, and only a per-head norm (SD-3.5) would show it; a
# narrower model (a test's) takes the largest width dividing both
_SD3_HEAD = 64
#: the bases whose single files this module loads (the SD-3.5 sizes are their own bases)
SD3_BASES = ("sd-3", "sd-3.5-medium", "sd-3.5-large")


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
    tensors, buffer = read_checkpoint(req, lambda k: True)
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
    prefix = prefix_of(tensors, "context_embedder.weight")
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
    return load_transformer(req, sd3_diffusers_state, sd3_transformer_config, SD3Transformer2DModel,
                             "SD-3 transformer")


def _bundled(req: LoadRequest, what: str, prefixes: tuple[str, ...]) -> tuple[dict[str, torch.Tensor],
                                                                             torch.Tensor | None]:
    tensors, buffer = read_checkpoint(req, lambda k: k.startswith(prefixes))
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
    converted = quiet(sfu.convert_ldm_vae_checkpoint, tensors, config)
    return build_from(lambda: AutoencoderKL.from_config(config), converted, req, buffer, "SD-3 VAE")


#: the latent statistics of the 16-channel VAEs of the MMDiT families (the weights do not record them)
MMDIT_VAE_LATENTS = {"flux": {"scaling_factor": 0.3611, "shift_factor": 0.1159},
                     **{base: {"scaling_factor": _SD3_VAE["scaling_factor"], "shift_factor": _SD3_VAE["shift_factor"]}
                        for base in SD3_BASES}}


def load_mmdit_vae_file(req: LoadRequest) -> Loaded:
    """A VAE file of its own of FLUX.1 (BFL's ``ae.safetensors``) or SD-3: LDM names, bare or under a VAE prefix;
    the config from the weights' shapes, the latent statistics of the family."""
    tensors, buffer = read_checkpoint(req, lambda k: True)
    prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in tensors)), "")
    bare = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    if "decoder.conv_in.weight" not in bare:
        raise InvalidModelException(f"{req.location}: no VAE weights (LDM names: encoder.*, decoder.conv_in...)")
    config = sd3_vae_config(bare, req.location) | MMDIT_VAE_LATENTS[base_of(req.record)]
    converted = quiet(sfu.convert_ldm_vae_checkpoint, bare, config)
    return build_from(lambda: AutoencoderKL.from_config(config), converted, req, buffer, "VAE")


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
    config = clip_config(shipped, hidden, vocab, positions, block_count(flat, r"encoder\.layers\.(\d+)\."), inter,
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
