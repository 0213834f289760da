"""Rules that identify a single model file from its tensor names and shapes.

Each rule is ``(TensorIndex) -> ProbeResult | None``: ``None`` means "not mine", a result means
identified, and :class:`UnknownModelError` means "mine, but the base cannot be told". The order of
:data:`FILE_RULES` matters: adapters (LoRA, textual inversion, IP-Adapter, ControlNet) come before
main models because they reuse main-model key names, and main models before VAEs because a main
checkpoint embeds its VAE.

The shapes read are those that differ between families: the width of the text conditioning seen
by cross-attention (SD-1 768, SD-2 1024, SDXL 2048, SDXL refiner 1280), the UNet's input
channels (4 normal, 9 inpaint, 5 depth), and the latent channels of a VAE (4, or 16 for SD-3/FLUX).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from services.probe.errors import UnknownModelError
from services.probe.result import (
    ProbeResult,
    compatible_bases,
    controlnet_config_path,
    legacy_config_path,
    upcast_for,
)
from services.probe.tensors import TensorIndex
from services.records.enums import (
    BaseModelType as Base,
)
from services.records.enums import (
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
)  # fmt: skip
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
    raise UnknownModelError(
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
    return _result(ModelType.Lora, ModelFormat.Lycoris, lora_base(index))


def lora_base(index: TensorIndex) -> Base:
    """Base of a LoRA in kohya, diffusers/PEFT or LyCORIS (LoHa, LoKr) naming."""
    if index.has_fragment("double_blocks", "single_blocks", "single_transformer_blocks"):
        return Base.Flux
    if index.has_fragment("joint_blocks", "context_block"):
        return Base.StableDiffusion3
    if index.has_fragment("transformer.transformer_blocks."):
        # diffusers naming is shared by FLUX and SD-3 transformers: FLUX is 3072 wide
        widths = {_lora_in_features(index, k) for k in index.shapes if ".attn.to_q." in k}
        return Base.Flux if 3072 in widths else Base.StableDiffusion3
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
        raise UnknownModelError(
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
    if not index.has_prefix("control_model.", "input_hint_block.", "zero_convs.", "controlnet_cond_embedding."):
        return None
    if index.has_fragment("controlnet_blocks.", "controlnet_single_blocks."):
        return None  # transformer (FLUX/SD-3) ControlNets: not a single-file format we read
    to_k = next((s for k, s in sorted(index.shapes.items()) if k.endswith("attn2.to_k.weight")), None)
    base = _base_from_context_dim(index, to_k[1] if to_k else None, "ControlNet")
    return _result(
        ModelType.ControlNet, ModelFormat.Checkpoint, base, config_path=controlnet_config_path(base)
    )


# ------------------------------------------------------------------------------ main models


def probe_main(index: TensorIndex) -> ProbeResult | None:
    flux = _probe_flux(index)
    if flux is not None:
        return flux
    if index.has_prefix(_UNET + "joint_blocks.", "joint_blocks."):
        return _result(ModelType.Main, ModelFormat.Checkpoint, Base.StableDiffusion3, variant=ModelVariantType.Normal)
    if not index.has_prefix(_UNET):
        return None
    return _probe_sd_unet(index)


def _probe_flux(index: TensorIndex) -> ProbeResult | None:
    prefix = _UNET if index.has_prefix(_UNET + "double_blocks.") else ""
    img_in = index.shape(prefix + "img_in.weight")
    if not index.has_prefix(prefix + "double_blocks.") or img_in is None or len(img_in) != 2:
        return None
    # FLUX Fill concatenates image, mask and masked image: 384 input features instead of 64
    variant = ModelVariantType.Inpaint if img_in[1] == 384 else ModelVariantType.Normal
    # only the guidance-distilled "dev" models embed the guidance scale
    flavour = "flux-dev" if index.has_prefix(prefix + "guidance_in.") else "flux-schnell"
    return _result(ModelType.Main, ModelFormat.Checkpoint, Base.Flux, variant=variant, config_path=flavour)


def _probe_sd_unet(index: TensorIndex) -> ProbeResult:
    sd_key = _UNET + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    xl_key = _UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    # SDXL's second block has no attention, so the SD-1/2 key is absent there
    to_k = index.shape(sd_key) or index.shape(xl_key)
    base = _base_from_context_dim(index, to_k[-1] if to_k else None, "Stable Diffusion main checkpoint")
    conv_in = index.shape(_UNET + "input_blocks.0.0.weight")
    channels = conv_in[1] if conv_in and len(conv_in) == 4 else None
    if channels not in _VARIANT_BY_IN_CHANNELS:
        raise UnknownModelError(
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
    else:
        raise UnknownModelError(f"{index.path}: VAE with {latent} latent channels (known: 4, 16)")
    return _result(ModelType.Vae, ModelFormat.Checkpoint, base)


def probe_t5_encoder(index: TensorIndex) -> ProbeResult | None:
    if not index.has_prefix("encoder.block.0.layer.0.SelfAttention."):
        return None
    return _result(ModelType.T5Encoder, ModelFormat.Checkpoint, Base.Any)


def probe_clip_vision(index: TensorIndex) -> ProbeResult | None:
    if "vision_model.embeddings.patch_embedding.weight" not in index.shapes:
        return None
    return _result(ModelType.CLIPVision, ModelFormat.Checkpoint, Base.Any)


FILE_RULES: tuple[Rule, ...] = (
    probe_lora,
    probe_textual_inversion,
    probe_ip_adapter,
    probe_controlnet,
    probe_main,
    probe_vae,
    probe_t5_encoder,
    probe_clip_vision,
)


# what a rule has established when it stops short of the base
_RULE_CLAIMS: dict[Rule, dict[str, object]] = {
    probe_lora: {"model_type": ModelType.Lora, "model_format": ModelFormat.Lycoris},
    probe_textual_inversion: {"model_type": ModelType.TextualInversion, "model_format": ModelFormat.EmbeddingFile},
    probe_ip_adapter: {"model_type": ModelType.IPAdapter, "model_format": ModelFormat.Checkpoint},
    probe_controlnet: {"model_type": ModelType.ControlNet, "model_format": ModelFormat.Checkpoint},
    probe_main: {"model_type": ModelType.Main, "model_format": ModelFormat.Checkpoint},
    probe_vae: {"model_type": ModelType.Vae, "model_format": ModelFormat.Checkpoint},
}


def identify_file(index: TensorIndex) -> ProbeResult:
    """Run the file rules in order; the first that claims the file decides."""
    for rule in FILE_RULES:
        try:
            result = rule(index)
        except UnknownModelError as exc:
            exc.partial = {**_RULE_CLAIMS.get(rule, {}), **exc.partial}
            raise
        if result is not None:
            return result
    raise UnknownModelError(f"{index.path}: not a model this version recognises: {index.describe()}")
