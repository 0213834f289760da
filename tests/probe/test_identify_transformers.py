"""FLUX and SD-3 single files in every layout, their ControlNets and LoRAs, T2I-Adapter files and
Olive folders are identified; where the files cannot tell two bases apart, the probe says so."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modelbus.services.probe import ProbeResult, UnrecognizedFilesError, probe
from tests import fixtures as fx
from tests.fixtures import transformer_files as b
from tests.fixtures.model_files import U, flux_checkpoint_shapes, sd3_checkpoint_shapes, write_safetensors

Builder = Callable[[Path], Path]
MAIN, CN, T2I, LORA = (
    {"model_type": "main", "model_format": "checkpoint"},
    {"model_type": "controlnet", "model_format": "checkpoint"},
    {"model_type": "t2i_adapter", "model_format": "checkpoint"},
    {"model_type": "lora", "model_format": "lycoris"},
)
FLUX_DEV = MAIN | {"base_model": "flux", "variant": "normal", "config_path": "flux-dev"}
SD3 = MAIN | {"base_model": "sd-3", "variant": "normal"}


def _check(result: ProbeResult, expected: dict[str, Any], name: str) -> None:
    got = result.model_dump(mode="json")
    defaults: dict[str, Any] = {"variant": None, "prediction_type": None, "upcast_attention": None,
                "compatible_bases": [], "config_path": None}  # fmt: skip
    for field, value in (defaults | expected).items():
        assert got[field] == value, f"{name}: {field} = {got[field]!r}, expected {value!r}"


def _state(make: Callable[[], b.StateDict], prefix: str = "") -> Builder:
    return lambda p: b.write_state(p, make(), prefix)


def _shapes(make: Callable[[], dict[str, tuple[int, ...]]]) -> Builder:
    return lambda p: write_safetensors(p, make())


def _t2i(kind: b.T2IKind, in_channels: int = 3, original: bool = False) -> Builder:
    def build(path: Path) -> Path:
        state = b.t2i_adapter_state(kind, in_channels)
        return b.write_state(path, b.to_tencentarc_layout(state) if original else state)

    return build


CASES: dict[str, tuple[Builder, dict[str, Any]]] = {
    # 1. FLUX.1 transformers: BFL layout (already read) and diffusers layout
    "flux1-dev-bfl.safetensors": (fx.make_flux_checkpoint, FLUX_DEV),
    "flux1-dev-diffusers.safetensors": (b.make_flux_diffusers_file, FLUX_DEV),
    "flux1-dev-diffusers.pth": (b.make_flux_diffusers_file, FLUX_DEV),
    "flux1-schnell-diffusers.safetensors": (lambda p: b.make_flux_diffusers_file(p, "schnell"),
                                            FLUX_DEV | {"config_path": "flux-schnell"}),
    "flux1-fill-diffusers.safetensors": (lambda p: b.make_flux_diffusers_file(p, fill=True),
                                         FLUX_DEV | {"variant": "inpaint"}),
    "flux1-dev-diffusers-comfy.safetensors": (lambda p: b.make_flux_diffusers_file(p, prefix=U), FLUX_DEV),
    # FLUX LoRAs: kohya (BFL names), PEFT/diffusers, OneTrainer, XLabs
    "flux-kohya-proj.safetensors": (lambda p: b.make_lora(p, {
        "lora_unet_double_blocks_0_img_attn_proj": (3072, 3072)}, "kohya"), LORA | {"base_model": "flux"}),
    "flux-peft-single.safetensors": (lambda p: b.make_lora(p, {
        "transformer.single_transformer_blocks.0.attn.to_q": (3072, 3072)}, "peft"), LORA | {"base_model": "flux"}),
    "flux-peft-double-only.safetensors": (lambda p: b.make_lora(p, {
        "transformer.transformer_blocks.0.attn.to_q": (3072, 3072),
        "transformer.transformer_blocks.0.attn.add_k_proj": (3072, 3072)}, "peft"), LORA | {"base_model": "flux"}),
    "flux-peft-ff-only.safetensors": (lambda p: b.make_lora(p, {
        "transformer.transformer_blocks.0.ff.net.2": (12288, 3072)}, "peft"), LORA | {"base_model": "flux"}),
    "flux-onetrainer.safetensors": (lambda p: b.make_lora(p, {
        "lora_transformer_transformer_blocks_0_attn_to_q": (3072, 3072)}, "kohya"), LORA | {"base_model": "flux"}),
    "flux-xlabs.safetensors": (lambda p: b.make_lora(p, {
        "double_blocks.0.processor.qkv_lora1": (3072, 9216),
        "double_blocks.0.processor.proj_lora2": (3072, 3072)}, "xlabs"), LORA | {"base_model": "flux"}),
    # 2. SD-3 transformers: SAI layout with and without the ComfyUI prefix, diffusers layout
    "sd3-sai.safetensors": (fx.make_sd3_checkpoint, SD3),
    "sd3-sai-transformer-only.safetensors": (_shapes(lambda: {
        k.removeprefix(U): v for k, v in sd3_checkpoint_shapes().items() if k.startswith(U)}), SD3),
    "sd3-diffusers.safetensors": (b.make_sd3_diffusers_file, SD3),
    "sd35-medium-diffusers.safetensors": (lambda p: b.make_sd3_diffusers_file(p, dual_attention=True),
                                          SD3 | {"base_model": "sd-3.5-medium"}),
    "sd3-diffusers-comfy.safetensors": (lambda p: b.make_sd3_diffusers_file(p, prefix=U), SD3),
    "sd3-medium-peft.safetensors": (lambda p: b.make_lora(p, {
        "transformer.transformer_blocks.0.attn.to_q": (1536, 1536)}, "peft"), LORA | {"base_model": "sd-3"}),
    "sd35-medium-peft.safetensors": (lambda p: b.make_lora(p, {
        "transformer.transformer_blocks.0.attn.to_q": (1536, 1536)}, "peft"), LORA | {"base_model": "sd-3.5-medium"}),
    "lora-medium-attn2.safetensors": (lambda p: b.make_lora(p, {
        "transformer.transformer_blocks.0.attn2.to_q": (1536, 1536)}, "peft"), LORA | {"base_model": "sd-3.5-medium"}),
    "sd35-large-peft.safetensors": (lambda p: b.make_lora(p, {
        "transformer.transformer_blocks.0.attn.add_q_proj": (2432, 2432)}, "peft"), LORA | {"base_model": "sd-3.5-large"}),
    # 3. transformer ControlNets; UNet ControlNets as before
    "flux-controlnet-instantx.safetensors": (_state(b.flux_controlnet_state), CN | {"base_model": "flux"}),
    "flux-controlnet-no-single.safetensors": (_state(lambda: b.flux_controlnet_state(single_layers=0)),
                                              CN | {"base_model": "flux"}),
    "flux-controlnet-xlabs.safetensors": (_shapes(b.xlabs_flux_controlnet_shapes), CN | {"base_model": "flux"}),
    "sd3-controlnet.safetensors": (_state(b.sd3_controlnet_state), CN | {"base_model": "sd-3"}),
    "sd35-large-controlnet-diffusers.safetensors": (_state(lambda: b.sd3_controlnet_state(sd35_large=True)),
                                                    CN | {"base_model": "sd-3"}),
    "sd35-large-controlnet-sai.safetensors": (_shapes(b.sai_sd35_controlnet_shapes), CN | {"base_model": "sd-3"}),
    "sd35-large-controlnet-sai-2432.safetensors": (_shapes(lambda: {
        **b.sai_sd35_controlnet_shapes(), "pos_embed_input.proj.weight": (2432, 16, 2, 2)}),
        CN | {"base_model": "sd-3.5-large"}),
    "controlnet-unet-diffusers.safetensors": (_state(b.unet_controlnet_state), CN | {
        "base_model": "sd-1", "config_path": "configs/controlnet/cldm_v15.yaml"}),
    "control_sd15_canny.pth": (fx.make_controlnet_checkpoint, CN | {
        "base_model": "sd-1", "config_path": "configs/controlnet/cldm_v15.yaml"}),
    # 4. T2I-Adapters: diffusers state dicts and TencentARC originals
    "t2i-sd15-depth.safetensors": (_t2i("full_adapter"), T2I | {"base_model": "sd-1"}),
    "t2i-sd15-canny.safetensors": (_t2i("full_adapter", in_channels=1), T2I | {"base_model": "sd-1"}),
    "t2i-sdxl-lineart.safetensors": (_t2i("full_adapter_xl"), T2I | {"base_model": "sdxl"}),
    "t2i-sdxl-sketch.safetensors": (_t2i("full_adapter_xl", in_channels=1), T2I | {"base_model": "sdxl"}),
    "t2i-sd14-color-light.safetensors": (_t2i("light_adapter"), T2I | {"base_model": "sd-1"}),
    "t2iadapter_depth_sd14v1.pth": (_t2i("full_adapter", original=True), T2I | {"base_model": "sd-1"}),
    "t2iadapter_color_sd14v1.pth": (_t2i("light_adapter", original=True), T2I | {"base_model": "sd-1"}),
    "t2i-sdxl-original.safetensors": (_t2i("full_adapter_xl", original=True), T2I | {"base_model": "sdxl"}),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_transformer_era_files(tmp_path: Path, name: str) -> None:
    builder, expected = CASES[name]
    _check(probe(builder(tmp_path / name)), expected, name)


def test_flux_and_sd3_diffusers_layouts_share_names_but_not_markers() -> None:
    """What the rules rely on, read from the real classes: the conditioning names are shared,
    the FLUX-only and SD-3-only markers are not."""
    flux, sd3 = b.flux_transformer_state().keys(), b.sd3_transformer_state().keys()
    shared = {"context_embedder.weight", "transformer_blocks.0.attn.add_q_proj.weight",
              "time_text_embed.text_embedder.linear_1.weight"}  # fmt: skip
    assert shared <= flux & sd3
    assert "x_embedder.weight" in flux and not any(k.startswith("single_transformer_blocks.") for k in sd3)
    assert "pos_embed.proj.weight" in sd3 and "pos_embed.proj.weight" not in flux


CANNOT_TELL: dict[str, tuple[Builder, dict[str, Any], str]] = {
    # transformer_blocks and context_embedder only: FLUX and SD-3 both have them
    "mmdit-bare.safetensors": (_state(lambda: {
        k: v for k, v in b.flux_transformer_state().items()
        if k.startswith(("transformer_blocks.", "context_embedder.", "time_text_embed."))}),
        MAIN, "neither FLUX"),
    "controlnet-blocks-only.safetensors": (_shapes(lambda: {
        "controlnet_blocks.0.weight": (8, 8), "transformer_blocks.0.attn.to_q.weight": (8, 8)}),
        CN, "neither FLUX"),
    "controlnet-both.safetensors": (_state(lambda: {
        **b.flux_controlnet_state(), "pos_embed_input.proj.weight": b.sd3_controlnet_state()["pos_embed_input.proj.weight"]}),
        CN, "both FLUX"),
    # a LoRA of transformer_blocks whose widths are neither FLUX's nor SD-3's
    "mmdit-lora-odd-width.safetensors": (lambda p: b.make_lora(p, {
        "transformer.transformer_blocks.0.attn.to_q": (1024, 1024)}, "peft"), LORA, "neither FLUX"),
    # a 2-channel hint (128 = 2 x 8 x 8) matches no published adapter
    "t2i-odd-hint.safetensors": (_t2i("full_adapter", in_channels=2), T2I, "128 pixel-unshuffled"),
    # a FLUX-style transformer without FLUX.1's, Chroma's or FLUX.2's markers
    "flux-derivative-bfl.safetensors": (_shapes(lambda: {
        k: v for k, v in flux_checkpoint_shapes("schnell").items() if not k.startswith("vector_in.")}),
        MAIN, "unknown derivative"),
    "sd3-peft-1536.safetensors": (lambda p: b.make_lora(p, {
        "transformer.transformer_blocks.0.attn.to_q": (1536, 1536)}, "peft"), LORA, "cannot tell.*sd-3.5-medium"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CANNOT_TELL))
def test_cannot_tell_is_an_error_with_what_was_established(tmp_path: Path, name: str) -> None:
    builder, partial, words = CANNOT_TELL[name]
    path = builder(tmp_path / name)
    with pytest.raises(UnrecognizedFilesError, match=words) as info:
        probe(path)
    assert info.value.partial == partial
    # the user completes it with the base alone: type and format came from the files
    base = "sd-1" if partial is T2I else "flux"
    result = probe(path, {"base_model": base})
    assert (result.model_type, result.model_format, result.base_model) == (
        partial["model_type"], partial["model_format"], base)  # fmt: skip


OLIVE_CASES: dict[str, tuple[Builder, str]] = {
    "plain-export": (b.make_onnx_folder, "onnx"),
    "diffusers-external-weights": (lambda p: b.make_onnx_folder(p, "weights.pb"), "onnx"),
    "optimum-export": (lambda p: b.make_onnx_folder(p, "onnx_data", "ORTStableDiffusionPipeline"), "onnx"),
    "olive-external-weights": (lambda p: b.make_onnx_folder(p, "onnx.data"), "olive"),
    "olive-ort-pipeline": (lambda p: b.make_onnx_folder(p, "onnx.data", "ORTStableDiffusionPipeline"), "olive"),
    "olive-workflow-config": (lambda p: b.make_onnx_folder(p, "workflow"), "olive"),
    "olive-footprints": (lambda p: b.make_onnx_folder(p, "footprints"), "olive"),
}


@pytest.mark.parametrize("name", sorted(OLIVE_CASES))
def test_olive_or_plain_onnx(tmp_path: Path, name: str) -> None:
    builder, fmt = OLIVE_CASES[name]
    result = probe(builder(tmp_path / name))
    _check(result, {"model_type": "onnx", "model_format": fmt, "base_model": "sd-1", "variant": "normal",
                    "prediction_type": "epsilon", "upcast_attention": False}, name)  # fmt: skip


def test_olive_rule_ignores_json_that_is_no_workflow(tmp_path: Path) -> None:
    path = b.make_onnx_folder(tmp_path / "export")
    (path / "notes.json").write_text('{"passes": 3}')  # no input_model: not an Olive workflow
    (path / "broken.json").write_text("{not json")  # a broken side file is no reason to fail
    assert probe(path).model_format == "onnx"
