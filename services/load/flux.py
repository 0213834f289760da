"""FLUX.1 from single files: the transformer (BFL's layout or diffusers') and the ControlNets that copy its
blocks; their configs are read from the weights' shapes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

import torch
from diffusers import (
    FluxControlNetModel,
    FluxTransformer2DModel,
)
from diffusers.loaders import single_file_utils as sfu

from modelbus.services.load.errors import InvalidModelException
from modelbus.services.load.kit import (
    DENOISER_SUBMODELS,
    UNET_PREFIX,
    Loaded,
    LoadRequest,
    block_count,
    load_transformer,
    prefix_of,
    read_checkpoint,
    shape_of,
)
from modelbus.services.load.safetensors_fast import assign_weights, empty_model
from modelbus.services.records.enums import SubModelType

_BFL_FLUX_WIDTH = 3072  # FLUX.1's hidden width, which diffusers' conversion of BFL's layout assumes


_BFL_FUSED = re.compile(r"single_blocks\.(\d+)\.linear1\.(weight|bias)")


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary embedding widths per axis (index, row, column). RoPE has no weights to read them
    from: FLUX.1 splits its 128-wide heads (16, 56, 56); other widths keep those proportions, rounded
    down to even widths on the image axes."""
    image = (7 * head_dim // 16) // 2 * 2
    return head_dim - 2 * image, image, image


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
    prefix = prefix_of(tensors, "context_embedder.weight")
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
    return load_transformer(req, flux_diffusers_state, flux_transformer_config, FluxTransformer2DModel,
                             "FLUX transformer")


def load_flux_controlnet(req: LoadRequest) -> Loaded:
    """A ``FluxControlNetModel`` (InstantX, Shakker-Labs: diffusers' names) from one file: a Union
    ControlNet embeds its modes, some encode the hint image themselves (``input_hint_block``)."""
    tensors, buffer = read_checkpoint(req, lambda k: True)
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
