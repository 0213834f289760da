"""Rules that identify a single model file from its tensor names and shapes.

Each rule is ``(TensorIndex) -> ProbeResult | None``: ``None`` means "not mine", a result means
identified, and :class:`UnrecognizedFilesError` means "mine, but the base cannot be told". The order of
:data:`FILE_RULES` matters: adapters (LoRA, textual inversion, IP-Adapter, ControlNet, T2I-Adapter)
come before main models because they reuse main-model key names, and main models before VAEs
because a main checkpoint embeds its VAE.

The shapes read are those that differ between families: the width of the text conditioning seen
by cross-attention (SD-1 768, SD-2 1024, SDXL 2048, SDXL refiner 1280), the UNet's input
channels (4 normal, 9 inpaint, 5 depth), the latent channels of a VAE (4, or 16 for SD-3/FLUX),
the hidden width of a transformer LoRA (FLUX 3072, SD-3 1536/2432) and the pixel-unshuffled hint
channels of a T2I-Adapter (x64 for SD-1, x256 for SDXL).

FLUX and SD-3 transformers share their text-conditioning width (4096, T5-XXL), so they are told
apart by structure: the BFL layout names FLUX blocks ``double_blocks``/``single_blocks`` and the
SAI layout names SD-3 blocks ``joint_blocks``; in the diffusers layout both use
``transformer_blocks``, and FLUX alone has ``single_transformer_blocks`` and a linear
``x_embedder`` where SD-3 patchifies with the convolution ``pos_embed.proj``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from modelbus.services.probe import upscalers
from modelbus.services.probe.claims import with_claim_checked
from modelbus.services.probe.dit import probe_dit
from modelbus.services.probe.dit_loras import dit_lora_base, lora_notes
from modelbus.services.probe.encoders import (
    probe_mistral,
    probe_qwen3,
    probe_qwen25_vl,
    probe_umt5,
    probe_video_vae,
)
from modelbus.services.probe.errors import UnrecognizedFilesError
from modelbus.services.probe.result import (
    ProbeResult,
    compatible_bases,
    controlnet_config_path,
    legacy_config_path,
    upcast_for,
)
from modelbus.services.probe.storage import with_storage_facts
from modelbus.services.probe.tensors import TensorIndex
from modelbus.services.records.enums import (
    BaseModelType as Base,
)
from modelbus.services.records.enums import (
    ModelFormat,
    ModelType,
    ModelVariantType,
    SchedulerPredictionType,
)

Rule = Callable[[TensorIndex], ProbeResult | None]

_UNET = "model.diffusion_model."
_BASE_BY_CONTEXT_DIM = {
    768: Base.StableDiffusion1,
    1024: Base.StableDiffusion2,
    2048: Base.StableDiffusionXL,
    1280: Base.StableDiffusionXLRefiner,
}
_VARIANT_BY_IN_CHANNELS = {4: ModelVariantType.Normal, 9: ModelVariantType.Inpaint, 5: ModelVariantType.Depth}
_LORA_MARKERS = (
    ".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", "_lora.down.",
    ".lokr_w1", ".lokr_w2", ".hada_w1_a", ".hada_w2_a", ".lora_linear_layer.",
    ".processor.qkv_lora", ".processor.proj_lora",  # XLabs FLUX LoRAs
)  # fmt: skip
# the top-level blocks of a diffusers-layout transformer (PEFT ``transformer.transformer_blocks.0``,
# OneTrainer/kohya ``lora_transformer_transformer_blocks_0``); a UNet nests them under ``attentions``
_MMDIT_LORA_KEY = re.compile(r"^(?:transformer\.|base_model\.model\.|diffusion_model\.|lora_transformer_)?transformer_blocks[._]\d")
# input widths of the layers a transformer LoRA adapts: hidden and MLP widths
_FLUX_WIDTHS = frozenset({3072, 12288})
_SD3_WIDTHS = frozenset({1536, 6144, 2432, 9728})  # SD-3/3.5 medium, SD-3.5 large
_SD2_EPSILON_STEPS, _SD2_V_STEPS = "220000", "110000"  # global_step of the original SD-2 releases


def _result(
    model_type: ModelType, fmt: ModelFormat, base: Base, **fields: object
) -> ProbeResult:
    return ProbeResult(
        model_type=model_type,
        model_format=fmt,
        base_model=base,
        compatible_bases=compatible_bases(model_type, base),
        **fields,  # type: ignore[arg-type]
    )


def _base_from_context_dim(index: TensorIndex, dim: int | None, what: str) -> Base:
    if dim in _BASE_BY_CONTEXT_DIM:
        return _BASE_BY_CONTEXT_DIM[dim]
    raise UnrecognizedFilesError(
        f"{index.path}: looks like a {what}, but its text-conditioning width {dim} matches no known base "
        f"(768 sd-1, 1024 sd-2, 1280 sdxl-refiner, 2048 sdxl); pass base_model explicitly"
    )


def _hint(index: TensorIndex, *words: str) -> bool:
    """Whether the file name or its metadata mention one of ``words`` (for same-shape families)."""
    text = " ".join([index.path.name, *index.metadata.values()]).lower()
    return any(re.search(rf"(^|[^a-z0-9]){w}", text) for w in words)


# --------------------------------------------------------------------------------------- LoRA


def probe_lora(index: TensorIndex) -> ProbeResult | None:
    if not index.has_fragment(*_LORA_MARKERS):
        return None
    base = lora_base(index)
    return _result(ModelType.Lora, ModelFormat.Lycoris, base, notes=lora_notes(index, base))


def lora_base(index: TensorIndex) -> Base:
    """Base of a LoRA in kohya, diffusers/PEFT or LyCORIS (LoHa, LoKr) naming."""
    dit = dit_lora_base(index)
    if dit is not None:
        return dit
    if index.has_fragment("double_blocks", "single_blocks", "single_transformer_blocks"):
        return Base.Flux
    if index.has_fragment("joint_blocks", "context_block"):
        return _sd3_lora_base(index, list(index.shapes))
    mmdit = [k for k in index.shapes if _MMDIT_LORA_KEY.match(k)]
    if mmdit:
        return _mmdit_lora_base(index, mmdit)
    te1 = te2 = unet = None
    for key in sorted(index.shapes):
        width = _lora_in_features(index, key)
        if width is None:
            continue
        if ("attn2" in key and "to_k" in key) or "attn2_to_k" in key:
            unet = unet or width
        elif key.startswith(("lora_te2_", "text_encoder_2.")) and "k_proj" in key:
            te2 = te2 or width
        elif key.startswith(("lora_te_", "lora_te1_", "text_encoder.")) and "k_proj" in key:
            te1 = te1 or width
    if te1 is not None and te2 is not None:
        return _base_from_context_dim(index, te1 + te2, "SDXL LoRA")
    return _base_from_context_dim(index, unet or te1 or te2, "LoRA")


def _mmdit_lora_base(index: TensorIndex, keys: list[str]) -> Base:
    """FLUX or SD-3, for a LoRA of ``transformer_blocks`` only: the names are shared, the widths not."""
    widths = {w for k in keys if (w := _lora_in_features(index, k)) is not None}
    flux, sd3 = bool(widths & _FLUX_WIDTHS), bool(widths & _SD3_WIDTHS)
    if flux != sd3:
        return Base.Flux if flux else _sd3_lora_base(index, keys)
    raise UnrecognizedFilesError(
        f"{index.path}: LoRA of a diffusers-layout transformer (transformer_blocks.*) whose layer widths "
        f"{sorted(widths) or 'unknown'} tell neither FLUX (3072) nor SD-3 (1536, 2432); pass base_model explicitly"
    )


_SD35_LARGE_WIDTHS = frozenset({2432, 9728})


def _sd3_lora_base(index: TensorIndex, keys: list[str]) -> Base:
    """SD-3.5 large LoRAs are 2432 wide; SD-3 medium and SD-3.5 medium are both 1536 wide, and only a
    LoRA of SD-3.5 medium's extra attention (``attn2``) or the file's name/metadata tell them apart."""
    widths = {w for k in keys if (w := _lora_in_features(index, k)) is not None}
    if widths & _SD35_LARGE_WIDTHS:
        return Base.StableDiffusion35Large
    if any("attn2" in k for k in keys):
        return Base.StableDiffusion35Medium
    if _hint(index, "sd3.5", "sd35", "sd-3.5", "sd3_5", "stable-diffusion-3.5", "sd3.5m", "3.5-medium"):
        return Base.StableDiffusion35Medium
    if _hint(index, "sd3_medium", "sd3-medium", "stable-diffusion-3-medium", "sd3m"):
        return Base.StableDiffusion3
    raise UnrecognizedFilesError(
        f"{index.path}: cannot tell: a LoRA of a 1536-wide MMDiT, sd-3 (SD-3 medium) or sd-3.5-medium, which "
        "share their layer widths; it adapts no SD-3.5-only attn2 layer and its name and metadata do not say; "
        "pass base_model explicitly (sd-3, sd-3.5-medium)"
    )


def _lora_in_features(index: TensorIndex, key: str) -> int | None:
    """Input width of the layer a LoRA key adapts (the shape's second dim of the full update)."""
    shape = index.shapes[key]
    if key.endswith((".lora_down.weight", ".lora_A.weight", ".lora.down.weight", "_lora.down.weight")):
        return shape[1] if len(shape) >= 2 else None
    if key.endswith(".hada_w1_b"):
        return shape[1] if len(shape) == 2 else None
    if key.endswith(".lokr_w1"):
        # LoKr: W = kron(w1, w2) so in_features = w1.cols * w2.cols (w2 may be factored a @ b)
        stem = key[: -len(".lokr_w1")]
        w2 = index.shape(stem + ".lokr_w2") or index.shape(stem + ".lokr_w2_b")
        if len(shape) == 2 and w2 is not None and len(w2) >= 2:
            return shape[1] * w2[1]
    return None


# ------------------------------------------------------------------------- textual inversion


def probe_textual_inversion(index: TensorIndex) -> ProbeResult | None:
    shapes = index.shapes
    if "clip_l" in shapes and "clip_g" in shapes:
        return _ti(index, Base.StableDiffusionXL)
    for key in ("string_to_param.*", "emb_params"):
        if key in shapes:
            return _ti(index, _ti_base(index, shapes[key][-1]))
    # diffusers learned_embeds: {"<token>": [width]} - a handful of plain-named vectors
    if 0 < len(shapes) <= 8 and all("." not in k and 1 <= len(s) <= 2 for k, s in shapes.items()):
        widths = {s[-1] for s in shapes.values()}
        if len(widths) == 1 and (width := widths.pop()) in (768, 1024):
            return _ti(index, _ti_base(index, width))
    return None


def _ti(index: TensorIndex, base: Base) -> ProbeResult:
    return _result(ModelType.TextualInversion, ModelFormat.EmbeddingFile, base)


def _ti_base(index: TensorIndex, width: int) -> Base:
    bases = {768: Base.StableDiffusion1, 1024: Base.StableDiffusion2}
    if width not in bases:
        raise UnrecognizedFilesError(
            f"{index.path}: textual inversion with embedding width {width} (known: 768 sd-1, 1024 sd-2, "
            "clip_l+clip_g sdxl); pass base_model explicitly"
        )
    return bases[width]


# ------------------------------------------------------------------ IP-Adapter / ControlNet


def probe_ip_adapter(index: TensorIndex) -> ProbeResult | None:
    if not (index.has_prefix("image_proj.") and index.has_prefix("ip_adapter.")):
        return None
    to_k = next((s for k, s in sorted(index.shapes.items()) if k.endswith("to_k_ip.weight")), None)
    base = _base_from_context_dim(index, to_k[1] if to_k else None, "IP-Adapter")
    return _result(ModelType.IPAdapter, ModelFormat.Checkpoint, base)


def probe_controlnet(index: TensorIndex) -> ProbeResult | None:
    if index.has_prefix(*_TRANSFORMER_CONTROLNET):
        return _probe_transformer_controlnet(index)
    if not index.has_prefix("control_model.", "input_hint_block.", "zero_convs.", "controlnet_cond_embedding."):
        return None
    to_k = next((s for k, s in sorted(index.shapes.items()) if k.endswith("attn2.to_k.weight")), None)
    base = _base_from_context_dim(index, to_k[1] if to_k else None, "ControlNet")
    return _result(
        ModelType.ControlNet, ModelFormat.Checkpoint, base, config_path=controlnet_config_path(base)
    )


# per-block outputs added to the transformer's residual stream
_TRANSFORMER_CONTROLNET = ("controlnet_blocks.", "controlnet_single_blocks.", "single_controlnet_blocks.")
# FLUX: InstantX/Shakker (diffusers FluxControlNetModel), XLabs and MistoLine (BFL block names)
_FLUX_CONTROLNET = ("controlnet_x_embedder.", "single_transformer_blocks.", "controlnet_single_blocks.",
                    "single_controlnet_blocks.", "double_blocks.", "single_blocks.")  # fmt: skip


def _probe_transformer_controlnet(index: TensorIndex) -> ProbeResult:
    """FLUX or SD-3 ControlNet. SD-3 ones (diffusers SD3ControlNetModel and SAI's SD-3.5 files)
    patchify the control latent with a convolution, ``pos_embed_input.proj``; FLUX ones embed it
    linearly (``controlnet_x_embedder`` or XLabs' ``pos_embed_input``) and carry FLUX block names."""
    flux = index.has_prefix(*_FLUX_CONTROLNET)
    sd3 = _ndim(index, "pos_embed_input.proj.weight") == 4
    if flux == sd3:
        raise UnrecognizedFilesError(
            f"{index.path}: transformer ControlNet (controlnet_blocks.*) with "
            f"{'both' if flux else 'neither'} FLUX (controlnet_x_embedder, single/double blocks) "
            f"{'and' if flux else 'nor'} SD-3 (pos_embed_input.proj convolution) markers; pass base_model explicitly"
        )
    proj = index.shape("pos_embed_input.proj.weight")
    base = Base.Flux if flux else sd3_base(proj[0] if proj else None, False)
    return _result(ModelType.ControlNet, ModelFormat.Checkpoint, base, config_path=controlnet_config_path(base))


# ------------------------------------------------------------------------------ T2I-Adapter

# diffusers (``adapter.body.0.resnets.0.block1``), TencentARC's originals (``body.0.block1``) and
# the light adapter of the originals (``body.0.body.0.block1``)
_T2I_FIRST_BLOCK = re.compile(r"^(?:adapter\.)?body\.0\.(?:resnets\.0\.|body\.0\.)?block1\.weight$")
# the hint image (1 or 3 channels) is pixel-unshuffled to the UNet's first feature map:
# by 8 (x64 channels) for SD-1's 64x64 latents, by 16 (x256) for SDXL's downscale factor 16
_T2I_BASE_BY_HINT_CHANNELS = {64: Base.StableDiffusion1, 192: Base.StableDiffusion1,
                              256: Base.StableDiffusionXL, 768: Base.StableDiffusionXL}  # fmt: skip


def probe_t2i_adapter(index: TensorIndex) -> ProbeResult | None:
    if not any(_T2I_FIRST_BLOCK.match(k) for k in index.shapes):
        return None
    prefix = "adapter." if index.has_prefix("adapter.body.") else ""
    # full adapters open with conv_in, light adapters with their first block's in_conv
    first = index.shape(prefix + "conv_in.weight") or index.shape(prefix + "body.0.in_conv.weight")
    channels = first[1] if first and len(first) == 4 else None
    if channels not in _T2I_BASE_BY_HINT_CHANNELS:
        raise UnrecognizedFilesError(
            f"{index.path}: T2I-Adapter taking {channels} pixel-unshuffled hint channels "
            "(known: 64/192 sd-1, 256/768 sdxl); pass base_model explicitly"
        )
    return _result(ModelType.T2IAdapter, ModelFormat.Checkpoint, _T2I_BASE_BY_HINT_CHANNELS[channels])


# ------------------------------------------------------------------------------ main models


def probe_main(index: TensorIndex) -> ProbeResult | None:
    dit = probe_dit(index)
    if dit is not None:
        return dit
    flux = _probe_flux(index)
    if flux is not None:
        return flux
    if index.has_prefix(_UNET + "joint_blocks.", "joint_blocks."):
        p = _UNET if index.has_prefix(_UNET + "joint_blocks.") else ""
        proj = index.shape(p + "x_embedder.proj.weight")
        dual = index.has_prefix(p + "joint_blocks.0.x_block.attn2.")
        return _sd3_main(proj[0] if proj else None, dual)
    mmdit = _probe_diffusers_transformer(index)
    if mmdit is not None:
        return mmdit
    if not index.has_prefix(_UNET):
        return None
    return _probe_sd_unet(index)


def _probe_flux(index: TensorIndex) -> ProbeResult | None:
    prefix = _UNET if index.has_prefix(_UNET + "double_blocks.") else ""
    img_in = index.shape(prefix + "img_in.weight")
    if not index.has_prefix(prefix + "double_blocks.") or img_in is None or len(img_in) != 2:
        return None
    if not index.has_prefix(prefix + "vector_in."):
        raise UnrecognizedFilesError(
            f"{index.path}: FLUX-style transformer (double_blocks, img_in) without FLUX.1's pooled-CLIP "
            "vector_in, nor Chroma's distilled_guidance_layer or FLUX.2's shared modulations: an unknown derivative"
        )
    # only the guidance-distilled "dev" models embed the guidance scale
    flavour = "flux-dev" if index.has_prefix(prefix + "guidance_in.") else "flux-schnell"
    return _flux1(index, img_in[1], flavour)


# FLUX.1 input features (patchified latents and what is concatenated to them): Fill adds the mask and
# the masked image (384), Canny/Depth the control image's latents (128)
_FLUX_VARIANTS = {384: ModelVariantType.Inpaint, 128: ModelVariantType.Control}


def _flux1(index: TensorIndex, in_features: int, flavour: str) -> ProbeResult:
    """FLUX.1 and its variants. Kontext has dev's shapes (its reference image rides in the sequence), so
    only the file's name or metadata tell it; Canny and Depth differ only in weights."""
    variant = _FLUX_VARIANTS.get(in_features, ModelVariantType.Normal)
    notes = None
    if variant is ModelVariantType.Control:
        kind = "Canny" if _hint(index, "canny") else "Depth" if _hint(index, "depth") else "Canny or Depth"
        notes = f"FLUX.1 {kind} (control image concatenated to the latents: 128 input features)"
    elif variant is ModelVariantType.Normal and flavour == "flux-dev" and _hint(index, "kontext"):
        variant = ModelVariantType.Kontext
        notes = "FLUX.1 Kontext has FLUX.1 dev's shapes: the file name or metadata said Kontext"
    return _result(ModelType.Main, ModelFormat.Checkpoint, Base.Flux, variant=variant, config_path=flavour,
                   notes=notes)


def _probe_diffusers_transformer(index: TensorIndex) -> ProbeResult | None:
    """A FLUX.1 or SD-3 transformer saved in the diffusers layout (``FluxTransformer2DModel`` /
    ``SD3Transformer2DModel`` state dicts), possibly under a prefix."""
    p = _prefix_of(index, "context_embedder.weight")
    if p is None or not index.has_prefix(p + "transformer_blocks."):
        return None
    flux = index.has_prefix(p + "single_transformer_blocks.") or _ndim(index, p + "x_embedder.weight") == 2
    sd3 = _ndim(index, p + "pos_embed.proj.weight") == 4
    if flux == sd3:
        raise UnrecognizedFilesError(
            f"{index.path}: diffusers-layout transformer (transformer_blocks.*, context_embedder) with "
            f"{'both' if flux else 'neither'} FLUX (single_transformer_blocks, linear x_embedder) "
            f"{'and' if flux else 'nor'} SD-3 (pos_embed.proj convolution) markers; pass base_model explicitly"
        )
    if sd3:
        proj = index.shape(p + "pos_embed.proj.weight")
        return _sd3_main(proj[0] if proj else None, index.has_prefix(p + "transformer_blocks.0.attn2."))
    if not index.has_prefix(p + "time_text_embed.text_embedder."):
        raise UnrecognizedFilesError(
            f"{index.path}: FLUX-style diffusers transformer without FLUX.1's pooled-CLIP embedder "
            "(time_text_embed.text_embedder), nor Chroma's or FLUX.2's markers: an unknown derivative"
        )
    x_in = index.shape(p + "x_embedder.weight")
    flavour = "flux-dev" if index.has_prefix(p + "time_text_embed.guidance_embedder.") else "flux-schnell"
    return _flux1(index, x_in[-1] if x_in else 64, flavour)


def sd3_base(width: int | None, dual_attention: bool) -> Base:
    """SD-3.5 large is 2432 wide (38 blocks); SD-3.5 medium's MMDiT-X blocks add a second, image-only
    attention (``attn2``) that SD-3 medium, of the same 1536 width, has not."""
    if width == 2432:
        return Base.StableDiffusion35Large
    return Base.StableDiffusion35Medium if dual_attention else Base.StableDiffusion3


def _sd3_main(width: int | None, dual_attention: bool) -> ProbeResult:
    base = sd3_base(width, dual_attention)
    return _result(ModelType.Main, ModelFormat.Checkpoint, base, variant=ModelVariantType.Normal)


def _prefix_of(index: TensorIndex, leaf: str) -> str | None:
    """The prefix under which ``leaf`` is stored (``""``, ``model.diffusion_model.``...), if present."""
    found = [k[: -len(leaf)] for k in index.shapes if k == leaf or k.endswith("." + leaf)]
    return min(found, key=len) if found else None


def _ndim(index: TensorIndex, key: str) -> int | None:
    shape = index.shape(key)
    return None if shape is None else len(shape)


def _probe_sd_unet(index: TensorIndex) -> ProbeResult:
    sd_key = _UNET + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    xl_key = _UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    # SDXL's second block has no attention, so the SD-1/2 key is absent there
    to_k = index.shape(sd_key) or index.shape(xl_key)
    base = _base_from_context_dim(index, to_k[-1] if to_k else None, "Stable Diffusion main checkpoint")
    conv_in = index.shape(_UNET + "input_blocks.0.0.weight")
    channels = conv_in[1] if conv_in and len(conv_in) == 4 else None
    if channels not in _VARIANT_BY_IN_CHANNELS:
        raise UnrecognizedFilesError(
            f"{index.path}: {base.value} main checkpoint with {channels} UNet input channels "
            "(known: 4 normal, 9 inpaint, 5 depth); pass variant explicitly"
        )
    variant = _VARIANT_BY_IN_CHANNELS[channels]
    prediction = _prediction_type(index, base, variant)
    return _result(
        ModelType.Main,
        ModelFormat.Checkpoint,
        base,
        variant=variant,
        prediction_type=prediction,
        upcast_attention=upcast_for(base, prediction),
        config_path=legacy_config_path(base, variant, prediction),
    )


def _prediction_type(index: TensorIndex, base: Base, variant: ModelVariantType) -> SchedulerPredictionType:
    """Epsilon vs v-prediction: shapes cannot tell, so read what the file says about itself."""
    meta = {k.lower(): v.lower() for k, v in index.metadata.items()}
    declared = meta.get("modelspec.prediction_type") or meta.get("prediction_type")
    if declared:
        return SchedulerPredictionType.VPrediction if declared.startswith("v") else SchedulerPredictionType.Epsilon
    if "v_pred" in index.shapes:  # v-prediction SDXL fine-tunes carry this marker tensor
        return SchedulerPredictionType.VPrediction
    if base is Base.StableDiffusion2:
        step = meta.get("global_step")
        if step == _SD2_V_STEPS:
            return SchedulerPredictionType.VPrediction
        if step == _SD2_EPSILON_STEPS:
            return SchedulerPredictionType.Epsilon
        sidecar = _sidecar_parameterization(index)
        if sidecar is not None:
            return sidecar
        if variant is ModelVariantType.Normal:
            return SchedulerPredictionType.VPrediction  # the 768-v model is the common SD-2
    return SchedulerPredictionType.Epsilon


def _sidecar_parameterization(index: TensorIndex) -> SchedulerPredictionType | None:
    """A ``<stem>.yaml`` beside the checkpoint (A1111 convention) names its parameterization."""
    yaml_path = index.path.with_suffix(".yaml")
    try:
        text = yaml_path.read_text(errors="replace")
    except OSError:
        return None
    if re.search(r"parameterization:\s*['\"]?v['\"]?\s*$", text, re.MULTILINE):
        return SchedulerPredictionType.VPrediction
    return SchedulerPredictionType.Epsilon


# ------------------------------------------------------------------- VAE, encoders, vision


def probe_vae(index: TensorIndex) -> ProbeResult | None:
    decoder_in = index.shape("decoder.conv_in.weight")
    if not (index.has_prefix("encoder.conv_in.") and decoder_in and len(decoder_in) == 4):
        return None
    latent = decoder_in[1]
    if latent == 16:
        # SD-3 and FLUX autoencoders share the architecture; only the name tells them apart
        base = Base.StableDiffusion3 if _hint(index, "sd3", "sd-3", "stable-diffusion-3") else Base.Flux
    elif latent == 4:
        base = Base.StableDiffusionXL if _hint(index, "sdxl", "xl") else Base.StableDiffusion1
    elif latent == 32:  # FLUX.2's autoencoder (its latents batch-normed after a 2x2 patchify: ``bn``)
        base = Base.Flux2
    else:
        raise UnrecognizedFilesError(f"{index.path}: VAE with {latent} latent channels (known: 4, 16, 32)")
    return _result(ModelType.Vae, ModelFormat.Checkpoint, base)


def probe_flux_redux(index: TensorIndex) -> ProbeResult | None:
    """FLUX.1 Redux: two linear layers from SigLIP's 1152-wide features to T5's 4096-wide tokens."""
    if not ("redux_up.weight" in index.shapes and "redux_down.weight" in index.shapes):
        return None
    return _result(ModelType.FluxRedux, ModelFormat.Checkpoint, Base.Flux)


def probe_t5_encoder(index: TensorIndex) -> ProbeResult | None:
    if not index.has_prefix("encoder.block.0.layer.0.SelfAttention."):
        return None
    return _result(ModelType.T5Encoder, ModelFormat.Checkpoint, Base.Any)


def probe_clip_vision(index: TensorIndex) -> ProbeResult | None:
    if "vision_model.embeddings.patch_embedding.weight" not in index.shapes:
        return None
    # SigLIP pools with an attention probe (``head.probe``) and has no class token
    if "vision_model.head.probe" in index.shapes or "vision_model.embeddings.class_embedding" not in index.shapes \
            and index.has_prefix("vision_model.head."):
        return _result(ModelType.SigLIP, ModelFormat.Checkpoint, Base.Any)
    return _result(ModelType.CLIPVision, ModelFormat.Checkpoint, Base.Any)


#: where a CLIP text encoder alone keeps its layers: transformers' names (comfyanonymous' clip_l.safetensors),
#: or SD's ``transformer.``-prefixed ones
CLIP_EMBED_PREFIXES = ("", "transformer.")
#: a CLIP text tower's width -> what it is (OpenAI's ViT-L/14: FLUX.1's and SD-3's CLIP-L; OpenCLIP bigG)
_CLIP_EMBED_WIDTHS = {768: "CLIP-L text encoder", 1280: "CLIP-G text encoder"}


def probe_clip_embed(index: TensorIndex) -> ProbeResult | None:
    """A CLIP text encoder alone (no image tower: a whole CLIP model is a clip_vision file)."""
    prefix = next((p for p in CLIP_EMBED_PREFIXES if f"{p}text_model.embeddings.token_embedding.weight" in index.shapes
                   and index.has_prefix(f"{p}text_model.encoder.layers.0.")), None)
    if prefix is None or index.has_prefix("vision_model.", f"{prefix}vision_model."):
        return None
    width = (index.shape(f"{prefix}text_model.embeddings.token_embedding.weight") or (0, 0))[-1]
    return _result(ModelType.CLIPEmbed, ModelFormat.Checkpoint, Base.Any, notes=clip_embed_notes(width))


def clip_embed_notes(width: object) -> str:
    """What a CLIP text encoder of this width is (a file's or a folder's ``hidden_size``)."""
    return _CLIP_EMBED_WIDTHS.get(width if isinstance(width, int) else 0, f"CLIP text encoder of width {width}")


def probe_upscaler(index: TensorIndex) -> ProbeResult | None:
    """An image-to-image network Spandrel loads (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, LaMa...), told by
    Spandrel's own key conditions (:mod:`services.probe.upscalers`); the architecture and scale recorded."""
    found = upscalers.identify(index.shapes)
    if found is None:
        return None
    arch_id, name, scale = found
    purpose = upscalers.PURPOSES.get(arch_id, "image-to-image network")
    shown = f", {scale}x" if scale and scale > 1 else ""
    return _result(ModelType.SpandrelImageToImage, ModelFormat.Checkpoint, Base.Any, architecture=arch_id,
                   scale=scale, notes=f"{name} {purpose}{shown}")


FILE_RULES: tuple[Rule, ...] = (
    probe_lora,
    probe_textual_inversion,
    probe_ip_adapter,
    probe_controlnet,
    probe_t2i_adapter,
    probe_flux_redux,
    probe_main,
    probe_vae,
    probe_video_vae,
    probe_umt5,
    probe_t5_encoder,
    probe_qwen25_vl,
    probe_qwen3,
    probe_mistral,
    probe_clip_vision,
    probe_clip_embed,
    probe_upscaler,
)


# what a rule has established when it stops short of the base
_RULE_CLAIMS: dict[Rule, dict[str, object]] = {
    probe_lora: {"model_type": ModelType.Lora, "model_format": ModelFormat.Lycoris},
    probe_textual_inversion: {"model_type": ModelType.TextualInversion, "model_format": ModelFormat.EmbeddingFile},
    probe_ip_adapter: {"model_type": ModelType.IPAdapter, "model_format": ModelFormat.Checkpoint},
    probe_controlnet: {"model_type": ModelType.ControlNet, "model_format": ModelFormat.Checkpoint},
    probe_t2i_adapter: {"model_type": ModelType.T2IAdapter, "model_format": ModelFormat.Checkpoint},
    probe_main: {"model_type": ModelType.Main, "model_format": ModelFormat.Checkpoint},
    probe_vae: {"model_type": ModelType.Vae, "model_format": ModelFormat.Checkpoint},
    probe_video_vae: {"model_type": ModelType.Vae, "model_format": ModelFormat.Checkpoint},
}


def identify_file(index: TensorIndex) -> ProbeResult:
    """Run the file rules in order; the first that claims the file decides."""
    for rule in FILE_RULES:
        try:
            result = rule(index)
        except UnrecognizedFilesError as exc:
            exc.partial = {**_RULE_CLAIMS.get(rule, {}), **exc.partial}
            raise
        if result is not None:
            return with_storage_facts(index, with_claim_checked(index, result))
    raise UnrecognizedFilesError(f"{index.path}: not a model this version recognises: {index.describe()}")
