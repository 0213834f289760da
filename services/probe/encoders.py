"""Single files of the 2025-2026 families' other parts: Wan's causal 3-D VAE (also Qwen-Image's), the UMT5
encoder of Wan, and Qwen2.5-VL, the text encoder of Qwen-Image.

- The Wan VAE is stored under Wan-AI's names (``Wan2.1_VAE.pth``, ComfyUI's ``wan_2.1_vae.safetensors``:
  ``decoder.conv1``, ``decoder.middle.0.residual.0.gamma``) or diffusers' (``decoder.conv_in``,
  ``decoder.mid_block.resnets.0.norm1.gamma``); its convolutions are 3-D (5-dim weights), and the decoder's
  first one takes the latent channels: 16 for Wan 2.1 (and the Wan 2.2 A14B models, which use it), 48 for
  Wan 2.2's TI2V VAE. Qwen-Image's VAE is Wan 2.1's architecture with a fine-tuned decoder: the same
  tensors, so only the name or metadata tells them apart.
- UMT5 (``umt5_xxl_fp16.safetensors``, transformers' names) differs from T5 by a relative position bias in
  every layer, not the first alone; Wan-AI's own file (``models_t5_umt5-xxl-enc-bf16.pth``) names it
  ``blocks.N.pos_embedding``.
- Qwen2.5-VL (``qwen_2.5_vl_7b.safetensors``): a vision tower (``visual.blocks``, ``visual.merger``) whose
  blocks have SwiGLU MLPs (``mlp.gate_proj``; Qwen2-VL's have ``fc1``), beside a Qwen2 language model; the
  7B model (3584 wide) is the one Qwen-Image's transformer reads (``txt_norm`` over 3584).
- Qwen3 (``qwen_3_4b.safetensors``, ``qwen_3_8b.safetensors``): a language model whose attention normalises
  its queries and keys (``self_attn.q_norm``; Qwen2's has biases instead); Qwen3-4B (2560 wide) is Z-Image's
  and FLUX.2 Klein 4B's text encoder (Z-Image's ``cap_feat_dim``, Klein 4B's joint width 3 x 2560), Qwen3-8B
  (4096) Klein 9B's (3 x 4096).
- Mistral Small 3.x (``mistral_3_small_flux2_bf16.safetensors``), FLUX.2 dev's text encoder (joint width
  3 x 5120): a Llama-style language model (no biases, no query norm) with Mistral's 131,072-token vocabulary,
  5120 wide with a 32,768-wide MLP (Mistral Nemo, also 5120 wide, has 14,336), alone (ComfyUI's file) or
  with its Pixtral vision tower (transformers' ``Mistral3ForConditionalGeneration``).

Each names the config shipped for it (``services/configs/transformers/<name>``), which the loader builds.
"""

from __future__ import annotations

from modelbus.services.probe.errors import UnrecognizedFilesError
from modelbus.services.probe.result import ProbeResult, compatible_bases
from modelbus.services.probe.tensor_index import TensorIndex
from modelbus.services.records.enums import BaseModelType as Base
from modelbus.services.records.enums import ModelFormat, ModelType

_WAN_VAE = (("decoder.middle.0.residual.0.gamma", "decoder.conv1.weight"),  # Wan-AI's names
            ("decoder.mid_block.resnets.0.norm1.gamma", "decoder.conv_in.weight"))  # diffusers'  # fmt: skip
_QWEN_VL_WIDTHS = {3584: (Base.QwenImage, "qwen2.5-vl-7b")}  # Qwen2.5-VL-7B
# Qwen3 width -> (base, shipped config, what it is)
_QWEN3_WIDTHS = {2560: (Base.ZImage, "qwen3-4b", "Qwen3-4B (Z-Image's and FLUX.2 Klein 4B's text encoder)"),
                 4096: (Base.Flux2, "qwen3-8b", "Qwen3-8B (FLUX.2 Klein 9B's text encoder)")}  # fmt: skip
_MISTRAL_VOCAB = 131072  # Mistral's Tekken tokenizer (Nemo, Small 3.x)
_MISTRAL_SMALL = (5120, 32768)  # width, MLP width
# where a language model's layers sit: alone (ComfyUI), under CausalLM's ``model.``, inside transformers 4's
# and 5's vision-language wrappers
_LM_PREFIXES = ("", "model.", "language_model.model.", "model.language_model.")


def _result(model_type: ModelType, base: Base, notes: str | None = None, config: str | None = None) -> ProbeResult:
    return ProbeResult(model_type=model_type, model_format=ModelFormat.Checkpoint, base_model=base,
                       compatible_bases=compatible_bases(model_type, base), notes=notes,
                       config_path=config)  # fmt: skip


def _language_model(index: TensorIndex) -> str | None:
    """The prefix of a Llama-style language model's layers (embeddings and a first attention layer)."""
    return next((p for p in _LM_PREFIXES if f"{p}embed_tokens.weight" in index.shapes
                 and f"{p}layers.0.self_attn.q_proj.weight" in index.shapes), None)  # fmt: skip


def _layers(index: TensorIndex, prefix: str) -> int:
    return sum(1 for k in index.shapes if k.startswith(f"{prefix}layers.") and k.endswith(".self_attn.q_proj.weight"))


def _hint(index: TensorIndex, *words: str) -> bool:
    text = " ".join([index.path.name, *index.metadata.values()]).lower()
    return any(w in text for w in words)


def probe_video_vae(index: TensorIndex) -> ProbeResult | None:
    conv = next((index.shape(c) for marker, c in _WAN_VAE if marker in index.shapes), None)
    if conv is None or len(conv) != 5:
        return None
    latent = conv[1]
    if latent == 48:
        return _result(ModelType.Vae, Base.Wan22, "Wan 2.2 VAE (48 latent channels, TI2V 5B)")
    if latent != 16:
        raise UnrecognizedFilesError(f"{index.path}: Wan-style 3-D VAE with {latent} latent channels "
                                     "(known: 16 Wan 2.1 / Qwen-Image, 48 Wan 2.2); pass base_model explicitly")
    if _hint(index, "qwen"):
        return _result(ModelType.Vae, Base.QwenImage, "Qwen-Image VAE (Wan 2.1's architecture)")
    if _hint(index, "wan"):
        return _result(ModelType.Vae, Base.Wan21, "Wan 2.1 VAE (16 latent channels)")
    raise UnrecognizedFilesError(
        f"{index.path}: cannot tell: a 16-channel Wan-style 3-D VAE of wan-2.1 or qwen-image (Qwen-Image's VAE has "
        "Wan 2.1's tensors); the file name and metadata do not say which; pass base_model explicitly (wan-2.1, "
        "qwen-image)"
    )


def probe_umt5(index: TensorIndex) -> ProbeResult | None:
    transformers_names = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in index.shapes
    wan_names = "token_embedding.weight" in index.shapes and "blocks.1.pos_embedding.embedding.weight" in index.shapes
    if not (transformers_names or wan_names):
        return None
    layout = "transformers' names" if transformers_names else "Wan-AI's names (blocks.N.attn)"
    return _result(ModelType.T5Encoder, Base.Wan21, f"UMT5 encoder (Wan's text encoder), {layout}")


def probe_qwen25_vl(index: TensorIndex) -> ProbeResult | None:
    """transformers 4's names (``visual.``, ``model.layers``) and 5's (``model.visual.``,
    ``model.language_model.``)."""
    prefix = next((p for p in ("", "model.") if f"{p}visual.blocks.0.attn.qkv.weight" in index.shapes
                   and index.has_prefix(f"{p}visual.merger.")), None)  # fmt: skip
    if prefix is None:
        return None
    if f"{prefix}visual.blocks.0.mlp.gate_proj.weight" not in index.shapes:
        raise UnrecognizedFilesError(f"{index.path}: a Qwen2-VL model (vision blocks with fc1/fc2 MLPs), not the "
                                     "Qwen2.5-VL that Qwen-Image encodes with")  # fmt: skip
    embed = index.shape("model.embed_tokens.weight") or index.shape("model.language_model.embed_tokens.weight")
    width = embed[1] if embed and len(embed) == 2 else None
    base, config = _QWEN_VL_WIDTHS.get(width or 0, (Base.Any, None))
    notes = None if base is not Base.Any else f"Qwen2.5-VL of width {width} (Qwen-Image reads the 7B's 3584)"
    return _result(ModelType.Qwen25VL, base, notes, config)


def probe_qwen3(index: TensorIndex) -> ProbeResult | None:
    prefix = _language_model(index)
    if prefix is None or f"{prefix}layers.0.self_attn.q_norm.weight" not in index.shapes \
            or index.has_prefix("visual.", "model.visual."):
        return None
    width = index.shape(f"{prefix}embed_tokens.weight")[1]  # type: ignore[index]
    layers = _layers(index, prefix)
    if width not in _QWEN3_WIDTHS:
        return _result(ModelType.Qwen3Encoder, Base.Any, f"Qwen3 language model of width {width}, {layers} layers "
                       "(Z-Image and FLUX.2 Klein 4B read Qwen3-4B's 2560, Klein 9B Qwen3-8B's 4096)")  # fmt: skip
    base, config, what = _QWEN3_WIDTHS[width]
    return _result(ModelType.Qwen3Encoder, base, f"{what}, {layers} layers", config)


def probe_mistral(index: TensorIndex) -> ProbeResult | None:
    prefix = _language_model(index)
    if prefix is None or f"{prefix}layers.0.self_attn.q_norm.weight" in index.shapes \
            or f"{prefix}layers.0.self_attn.q_proj.bias" in index.shapes:
        return None
    vocab, width = index.shape(f"{prefix}embed_tokens.weight")  # type: ignore[misc]
    if vocab != _MISTRAL_VOCAB:
        return None  # a Llama-style model of another family: not an encoder of a family we know
    mlp = index.shape(f"{prefix}layers.0.mlp.gate_proj.weight")
    layers = _layers(index, prefix)
    vision = " with its Pixtral vision tower" if index.has_prefix("vision_tower.", "model.vision_tower.") else ""
    if (width, mlp[0] if mlp else None) == _MISTRAL_SMALL:
        return _result(ModelType.MistralEncoder, Base.Flux2, f"Mistral Small 3.x, {layers} layers{vision} "
                       "(FLUX.2 dev's text encoder)", "mistral-small-3.1-24b")  # fmt: skip
    return _result(ModelType.MistralEncoder, Base.Any, f"Mistral-vocabulary language model of width {width}, MLP "
                   f"{mlp[0] if mlp else '?'}, {layers} layers{vision} (FLUX.2 dev reads Mistral Small 3.x: 5120, "
                   "MLP 32768)")  # fmt: skip
