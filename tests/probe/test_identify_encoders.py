"""VAEs and text encoders of the 2025-2026 families (Wan 2.1/2.2 VAE, Qwen-Image's VAE, FLUX.2's VAE, UMT5,
Qwen2.5-VL, Qwen3, Mistral Small 3.1) are recorded with their type and base, as single files (full size from
the real classes on the meta device, the language models' from the configs shipped in
``services/configs/transformers``; data regions sparse) and as folders.

``ENCODER_LAYOUTS`` is the table the README's accuracy table reports.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modelbus.services.probe import probe
from tests.fixtures.dit_files import assert_cannot_tell, assert_fields, write_sparse

Builder = Callable[[Path], Path]
WAN22_VAE = {"base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "is_residual": True, "in_channels": 12,
             "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16}  # fmt: skip
UMT5_XXL = {"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
            "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False}  # fmt: skip
QWEN25_VL_7B = {"text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                                "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064},
                "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                                  "out_hidden_size": 3584}}  # fmt: skip
# Wan-AI's VAE names -> diffusers' (the pairs diffusers' convert_wan_vae_to_diffusers maps)
WAN_VAE_ORIGINAL = {
    "encoder.conv1.weight": "encoder.conv_in.weight", "decoder.conv1.weight": "decoder.conv_in.weight",
    "conv1.weight": "quant_conv.weight", "conv2.weight": "post_quant_conv.weight",
    "encoder.middle.0.residual.0.gamma": "encoder.mid_block.resnets.0.norm1.gamma",
    "decoder.middle.0.residual.0.gamma": "decoder.mid_block.resnets.0.norm1.gamma",
    "decoder.middle.1.to_qkv.weight": "decoder.mid_block.attentions.0.to_qkv.weight",
    "encoder.head.2.weight": "encoder.conv_out.weight", "decoder.head.2.weight": "decoder.conv_out.weight",
}  # fmt: skip


def _meta_state(build: Callable[[], Any]) -> dict[str, tuple[int, ...]]:
    import torch

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def diffusers_vae(cls: str, **config: Any) -> dict[str, tuple[int, ...]]:
    import diffusers

    return _meta_state(lambda: getattr(diffusers, cls)(**config))


def wan_vae_original(**config: Any) -> dict[str, tuple[int, ...]]:
    full = diffusers_vae("AutoencoderKLWan", **config)
    return {orig: full[new] for orig, new in WAN_VAE_ORIGINAL.items()}


def umt5(wan_names: bool = False) -> dict[str, tuple[int, ...]]:
    import transformers

    shapes = _meta_state(lambda: transformers.UMT5EncoderModel(transformers.UMT5Config(**UMT5_XXL)))
    if wan_names:  # Wan-AI's models_t5_umt5-xxl-enc-bf16.pth: every tensor under its wan/modules/t5.py name
        from tests.fixtures.transformer_files import to_wan_t5_names

        return to_wan_t5_names(shapes)
    return shapes


def t5_xxl() -> dict[str, tuple[int, ...]]:
    import transformers

    config = {**UMT5_XXL, "vocab_size": 32128}
    return _meta_state(lambda: transformers.T5EncoderModel(transformers.T5Config(**config)))


def qwen25_vl(transformers4_names: bool = False) -> dict[str, tuple[int, ...]]:
    import transformers

    shapes = _meta_state(lambda: transformers.Qwen2_5_VLForConditionalGeneration(
        transformers.Qwen2_5_VLConfig(**QWEN25_VL_7B)))
    if transformers4_names:  # ComfyUI's qwen_2.5_vl_7b.safetensors
        shapes = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
                  for k, v in shapes.items()}  # fmt: skip
    return shapes


def shipped_llm(name: str, drop: tuple[str, ...] = (), text_only: bool = False,
                transformers4: bool = False) -> dict[str, tuple[int, ...]]:
    """The weights' shapes of a shipped transformers config's class (``drop``: names left out, such as the
    head a text-encoder file omits; ``text_only``: a vision-language model's language model alone, in its
    causal-LM names, as ComfyUI stores Mistral; ``transformers4``: Mistral3's transformers 4 names)."""
    import transformers

    from modelbus.services.load.text_encoders import SHIPPED, _build_config

    raw = json.loads((SHIPPED / name / "config.json").read_text())
    config = _build_config(raw)
    if text_only:
        shapes = _meta_state(lambda: transformers.MistralForCausalLM(config.text_config))
    else:
        shapes = _meta_state(lambda: getattr(transformers, raw["architectures"][0])(config))
    if transformers4:
        shapes = {k.replace("model.language_model.", "language_model.model.").replace("model.vision_tower.", "vision_tower.")
                  .replace("model.multi_modal_projector.", "multi_modal_projector.")
                  .replace("lm_head.", "language_model.lm_head."): v for k, v in shapes.items()}  # fmt: skip
    return {k: v for k, v in shapes.items() if not k.startswith(drop)}


def _file(make: Callable[[], dict[str, tuple[int, ...]]], **kw: Any) -> Builder:
    return lambda p: write_sparse(p, make(), **kw)


def _comfy_fp8(shapes: dict[str, tuple[int, ...]], path: Path, scaled: bool) -> Path:
    """``shapes`` as ComfyUI's fp8 files store them: 2-D weights F8_E4M3 (the embeddings too), each beside an
    F32 ``<layer>.scale_weight`` of one number and a ``scaled_fp8`` marker when scaled; the rest bf16."""
    out: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for name, shape in shapes.items():
        out[name] = shape
        if len(shape) == 2:
            dtypes[name] = "F8_E4M3"
            if scaled and "embed" not in name and not name.startswith("shared."):
                out[name.removesuffix(".weight") + ".scale_weight"] = ()
                dtypes[name.removesuffix(".weight") + ".scale_weight"] = "F32"
    if scaled:
        out["scaled_fp8"], dtypes["scaled_fp8"] = (0,), "F8_E4M3"
    return write_sparse(path, out, dtype=dtypes)


def _fp8(precision: str = "fp8_e4m3fn", scaled: bool = True) -> dict[str, Any]:
    return {"precision": precision, "quantization": "fp8_scaled" if scaled else None}


def _expect(model_type: str, base: str, compatible: list[str] | None = None, fmt: str = "checkpoint") -> dict[str, Any]:
    return {"model_type": model_type, "model_format": fmt, "base_model": base, "compatible_bases": compatible or []}


ENCODER_LAYOUTS: dict[str, tuple[Builder, dict[str, Any]]] = {
    # Wan 2.1 VAE (also Wan 2.2 A14B's), Qwen-Image's (the same tensors: by name), Wan 2.2's 48-channel VAE
    "wan_2.1_vae.safetensors": (_file(wan_vae_original), _expect("vae", "wan-2.1", ["wan-2.2"])),
    "Wan2.1_VAE-diffusers.safetensors": (_file(lambda: diffusers_vae("AutoencoderKLWan")),
                                         _expect("vae", "wan-2.1", ["wan-2.2"])),
    "qwen_image_vae.safetensors": (_file(wan_vae_original), _expect("vae", "qwen-image")),
    "vae.safetensors": (_file(lambda: diffusers_vae("AutoencoderKLQwenImage"),
                              metadata={"modelspec.title": "Qwen-Image VAE"}), _expect("vae", "qwen-image")),
    "wan2.2_vae.safetensors": (_file(lambda: wan_vae_original(**WAN22_VAE)), _expect("vae", "wan-2.2")),
    "ti2v-vae-diffusers.safetensors": (_file(lambda: diffusers_vae("AutoencoderKLWan", **WAN22_VAE)),
                                       _expect("vae", "wan-2.2")),
    # FLUX.2's VAE: 32 latent channels
    "flux2-vae.safetensors": (_file(lambda: diffusers_vae("AutoencoderKLFlux2")), _expect("vae", "flux2")),
    # UMT5 (Wan's text encoder), T5-XXL stays any
    "umt5_xxl_fp16.safetensors": (_file(umt5), _expect("t5_encoder", "wan-2.1", ["wan-2.2"])),
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": (lambda p: _comfy_fp8(umt5(), p, scaled=True),
                                               _expect("t5_encoder", "wan-2.1", ["wan-2.2"]) | _fp8()),
    "models_t5_umt5-xxl-enc-bf16.safetensors": (_file(lambda: umt5(wan_names=True)),
                                                _expect("t5_encoder", "wan-2.1", ["wan-2.2"])),
    "t5xxl_fp16.safetensors": (_file(t5_xxl), _expect("t5_encoder", "any")),
    # comfyanonymous/flux_text_encoders' fp8 T5-XXL, plain and scaled
    "t5xxl_fp8_e4m3fn.safetensors": (lambda p: _comfy_fp8(t5_xxl(), p, scaled=False),
                                     _expect("t5_encoder", "any") | _fp8(scaled=False)),
    "t5xxl_fp8_e4m3fn_scaled.safetensors": (lambda p: _comfy_fp8(t5_xxl(), p, scaled=True),
                                            _expect("t5_encoder", "any") | _fp8()),
    # Qwen2.5-VL-7B, Qwen-Image's text encoder (and HunyuanVideo 1.5's)
    "qwen_2.5_vl_7b.safetensors": (_file(lambda: qwen25_vl(True)),
                                   _expect("qwen2_5_vl", "qwen-image", ["hunyuan-video-1.5"]) | {"config_path": "qwen2.5-vl-7b"}),
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": (lambda p: _comfy_fp8(qwen25_vl(True), p, scaled=True),
                                              _expect("qwen2_5_vl", "qwen-image", ["hunyuan-video-1.5"]) | _fp8()),
    "qwen2.5-vl-7b-transformers5.safetensors": (_file(qwen25_vl),
                                                _expect("qwen2_5_vl", "qwen-image", ["hunyuan-video-1.5"])),
    # Qwen3-4B (Z-Image's, FLUX.2 Klein 4B's text encoder; its head is its embeddings), Qwen3-8B (Klein 9B's)
    "qwen_3_4b.safetensors": (_file(lambda: shipped_llm("qwen3-4b", drop=("lm_head.",))),
                              _expect("qwen3_encoder", "z-image", ["flux2"]) | {"config_path": "qwen3-4b"}),
    "qwen_3_4b_fp8_mixed.safetensors": (_file(lambda: shipped_llm("qwen3-4b", drop=("lm_head.",)), dtype="F8_E4M3"),
                                        _expect("qwen3_encoder", "z-image", ["flux2"]) | {"precision": "fp8_e4m3fn"}),
    "qwen_3_8b.safetensors": (_file(lambda: shipped_llm("qwen3-8b")),
                              _expect("qwen3_encoder", "flux2") | {"config_path": "qwen3-8b"}),
    "Qwen3-8B-no-head.safetensors": (_file(lambda: shipped_llm("qwen3-8b", drop=("lm_head.",))),
                                     _expect("qwen3_encoder", "flux2")),
    # Mistral Small 3.1 (FLUX.2 dev's): ComfyUI's language model alone, transformers 5's and 4's whole model
    "mistral_3_small_flux2_bf16.safetensors": (_file(lambda: shipped_llm("mistral-small-3.1-24b", drop=("lm_head.",),
                                                                         text_only=True)),
                                               _expect("mistral_encoder", "flux2") | {"config_path": "mistral-small-3.1-24b"}),
    "mistral-small-3.1-transformers5.safetensors": (_file(lambda: shipped_llm("mistral-small-3.1-24b")),
                                                    _expect("mistral_encoder", "flux2")),
    "mistral-small-3.1-transformers4.safetensors": (_file(lambda: shipped_llm("mistral-small-3.1-24b", transformers4=True)),
                                                    _expect("mistral_encoder", "flux2")),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ENCODER_LAYOUTS))
def test_encoder_layout_identified(tmp_path: Path, name: str) -> None:
    builder, expected = ENCODER_LAYOUTS[name]
    assert_fields(probe(builder(tmp_path / name)), expected, name)


def test_the_wan_vae_names_are_those_diffusers_converts() -> None:
    import torch
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    original = wan_vae_original()
    converted = convert_wan_vae_to_diffusers({k: torch.empty(s, device="meta") for k, s in original.items()})
    full = diffusers_vae("AutoencoderKLWan")
    assert {k: tuple(v.shape) for k, v in converted.items()} == {new: full[new] for new in WAN_VAE_ORIGINAL.values()}


def test_a_16_channel_wan_vae_without_a_name_names_both_bases(tmp_path: Path) -> None:
    path = write_sparse(tmp_path / "ae.safetensors", diffusers_vae("AutoencoderKLWan"))
    assert_cannot_tell(path, ["wan-2.1", "qwen-image"], {"model_type": "vae", "model_format": "checkpoint"})


def test_qwen2_vl_is_not_qwen25_vl(tmp_path: Path) -> None:
    from modelbus.services.probe import UnrecognizedFilesError

    shapes = {k.replace(".mlp.gate_proj.", ".mlp.fc1."): v for k, v in qwen25_vl(True).items()
              if ".mlp.up_proj." not in k or not k.startswith("visual.")}  # fmt: skip
    with pytest.raises(UnrecognizedFilesError, match="Qwen2-VL"):
        probe(write_sparse(tmp_path / "qwen2-vl.safetensors", shapes))


def _shipped_config(name: str) -> dict[str, Any]:
    from modelbus.services.load.text_encoders import SHIPPED

    return json.loads((SHIPPED / name / "config.json").read_text())  # type: ignore[no-any-return]


FOLDERS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "Wan2.1-T2V-1.3B-Diffusers-vae": ({"_class_name": "AutoencoderKLWan", "z_dim": 16},
                                      _expect("vae", "wan-2.1", ["wan-2.2"], "diffusers")),
    "Wan2.2-TI2V-5B-Diffusers-vae": ({"_class_name": "AutoencoderKLWan", **WAN22_VAE},
                                     _expect("vae", "wan-2.2", fmt="diffusers")),
    "Qwen-Image-vae": ({"_class_name": "AutoencoderKLQwenImage", "z_dim": 16}, _expect("vae", "qwen-image", fmt="diffusers")),
    "FLUX.2-dev-vae": ({"_class_name": "AutoencoderKLFlux2", "latent_channels": 32}, _expect("vae", "flux2", fmt="diffusers")),
    "Wan2.1-text_encoder": ({"architectures": ["UMT5EncoderModel"], **UMT5_XXL},
                            _expect("t5_encoder", "wan-2.1", ["wan-2.2"], "t5_encoder")),
    "Qwen-Image-text_encoder": ({"architectures": ["Qwen2_5_VLForConditionalGeneration"], **QWEN25_VL_7B},
                                _expect("qwen2_5_vl", "qwen-image", ["hunyuan-video-1.5"], "diffusers")),
    "Z-Image-Turbo-text_encoder": (_shipped_config("qwen3-4b"), _expect("qwen3_encoder", "z-image", ["flux2"], "diffusers")),
    "FLUX.2-klein-9B-text_encoder": (_shipped_config("qwen3-8b"), _expect("qwen3_encoder", "flux2", fmt="diffusers")),
    "FLUX.2-dev-text_encoder": (_shipped_config("mistral-small-3.1-24b"), _expect("mistral_encoder", "flux2", fmt="diffusers")),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_encoder_folder_identified(tmp_path: Path, name: str) -> None:
    config, expected = FOLDERS[name]
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(config))
    assert_fields(probe(tmp_path / name), expected, name)


def test_other_language_models_are_not_taken_for_encoders(tmp_path: Path) -> None:
    """A Qwen2 language model (query biases, no query norm) and a Llama (another vocabulary) are not text encoders
    of a known family; a Mistral-vocabulary model of other widths (Mistral Nemo) is recorded without a base."""
    from modelbus.services.probe import UnrecognizedFilesError

    def llm(vocab: int, width: int, mlp: int, qk_norm: bool, bias: bool) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, width), "model.norm.weight": (width,)}
        for n in range(2):
            p = f"model.layers.{n}."
            shapes |= {p + "self_attn.q_proj.weight": (4096, width), p + "self_attn.k_proj.weight": (1024, width),
                       p + "mlp.gate_proj.weight": (mlp, width), p + "input_layernorm.weight": (width,)}  # fmt: skip
            shapes |= {p + "self_attn.q_norm.weight": (128,)} if qk_norm else {}
            shapes |= {p + "self_attn.q_proj.bias": (4096,)} if bias else {}
        return shapes

    for name, shapes in {"qwen2.5-7b.safetensors": llm(152064, 3584, 18944, False, True),
                         "llama-3-8b.safetensors": llm(128256, 4096, 14336, False, False)}.items():
        with pytest.raises(UnrecognizedFilesError, match="not a model this version recognises"):
            probe(write_sparse(tmp_path / name, shapes))
    nemo = probe(write_sparse(tmp_path / "mistral-nemo.safetensors", llm(131072, 5120, 14336, False, False)))
    assert (nemo.model_type, nemo.base_model) == ("mistral_encoder", "any")
    assert "width 5120, MLP 14336" in str(nemo.notes)
    qwen3 = probe(write_sparse(tmp_path / "qwen3-1.7b.safetensors", llm(151936, 2048, 6144, True, False)))
    assert (qwen3.model_type, qwen3.base_model, qwen3.config_path) == ("qwen3_encoder", "any", None)
