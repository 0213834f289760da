"""Every family is identified from files built with its real key names and shapes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modelbus.services.probe import ProbeResult, probe
from tests import fixtures as fx

SD = "configs/stable-diffusion/"
Builder = Callable[[Path], Path]

# (builder, expected fields); unspecified fields must be None / [] (checked below)
FILE_CASES: dict[str, tuple[Builder, dict[str, Any]]] = {
    "sd1.safetensors": (fx.make_sd1_checkpoint, {
        "model_type": "main", "model_format": "checkpoint", "base_model": "sd-1", "variant": "normal",
        "prediction_type": "epsilon", "upcast_attention": False, "config_path": SD + "v1-inference.yaml"}),
    "sd1.ckpt": (fx.make_sd1_checkpoint, {
        "model_type": "main", "model_format": "checkpoint", "base_model": "sd-1", "variant": "normal",
        "prediction_type": "epsilon", "upcast_attention": False, "config_path": SD + "v1-inference.yaml"}),
    "sd1-inpaint.safetensors": (lambda p: fx.make_sd1_checkpoint(p, "inpaint"), {
        "model_type": "main", "model_format": "checkpoint", "base_model": "sd-1", "variant": "inpaint",
        "prediction_type": "epsilon", "upcast_attention": False, "config_path": SD + "v1-inpainting-inference.yaml"}),
    "sd2-768-v.safetensors": (fx.make_sd2_checkpoint, {
        "model_type": "main", "model_format": "checkpoint", "base_model": "sd-2", "variant": "normal",
        "prediction_type": "v_prediction", "upcast_attention": True, "config_path": SD + "v2-inference-v.yaml"}),
    "sd2-768-v.ckpt": (fx.make_sd2_checkpoint, {
        "model_type": "main", "model_format": "checkpoint", "base_model": "sd-2", "variant": "normal",
        "prediction_type": "v_prediction", "upcast_attention": True, "config_path": SD + "v2-inference-v.yaml"}),
    "sd2-base.safetensors": (lambda p: fx.make_sd2_checkpoint(p, "epsilon"), {
        "model_type": "main", "model_format": "checkpoint", "base_model": "sd-2", "variant": "normal",
        "prediction_type": "epsilon", "upcast_attention": False, "config_path": SD + "v2-inference.yaml"}),
    "sd2-base.ckpt": (lambda p: fx.make_sd2_checkpoint(p, "epsilon"), {
        "model_type": "main", "model_format": "checkpoint", "base_model": "sd-2", "variant": "normal",
        "prediction_type": "epsilon", "upcast_attention": False, "config_path": SD + "v2-inference.yaml"}),
    "sd2-depth.safetensors": (lambda p: fx.make_sd2_checkpoint(p, "epsilon", "depth"), {
        "model_type": "main", "model_format": "checkpoint", "base_model": "sd-2", "variant": "depth",
        "prediction_type": "epsilon", "upcast_attention": False, "config_path": SD + "v2-midas-inference.yaml"}),
    "sdxl.safetensors": (fx.make_sdxl_checkpoint, {
        "model_type": "main", "model_format": "checkpoint", "base_model": "sdxl", "variant": "normal",
        "prediction_type": "epsilon", "upcast_attention": False, "config_path": SD + "sd_xl_base.yaml"}),
    "sdxl-inpaint.safetensors": (lambda p: fx.make_sdxl_checkpoint(p, "inpaint"), {
        "model_type": "main", "model_format": "checkpoint", "base_model": "sdxl", "variant": "inpaint",
        "prediction_type": "epsilon", "upcast_attention": False, "config_path": SD + "sd_xl_inpaint.yaml"}),
    "refiner.safetensors": (fx.make_sdxl_refiner_checkpoint, {
        "model_type": "main", "model_format": "checkpoint", "base_model": "sdxl-refiner", "variant": "normal",
        "prediction_type": "epsilon", "upcast_attention": False, "config_path": SD + "sd_xl_refiner.yaml"}),
    "sd3_medium.safetensors": (fx.make_sd3_checkpoint, {
        "model_type": "main", "model_format": "checkpoint", "base_model": "sd-3", "variant": "normal"}),
    "flux1-dev.safetensors": (fx.make_flux_checkpoint, {
        "model_type": "main", "model_format": "checkpoint", "base_model": "flux", "variant": "normal", "config_path": "flux-dev"}),
    "flux1-schnell.safetensors": (lambda p: fx.make_flux_checkpoint(p, "schnell", comfy_prefix=True), {
        "model_type": "main", "model_format": "checkpoint", "base_model": "flux", "variant": "normal",
        "config_path": "flux-schnell"}),
    "flux1-fill-dev.safetensors": (lambda p: fx.make_flux_checkpoint(p, fill=True), {
        "model_type": "main", "model_format": "checkpoint", "base_model": "flux", "variant": "inpaint", "config_path": "flux-dev"}),
    "vae-ft-mse.safetensors": (fx.make_vae_checkpoint, {
        "model_type": "vae", "model_format": "checkpoint", "base_model": "sd-1", "compatible_bases": ["sd-2"]}),
    "vae-ft-mse.pt": (fx.make_vae_checkpoint, {
        "model_type": "vae", "model_format": "checkpoint", "base_model": "sd-1", "compatible_bases": ["sd-2"]}),
    "sdxl_vae.safetensors": (lambda p: fx.make_vae_checkpoint(p, "sdxl"), {
        "model_type": "vae", "model_format": "checkpoint", "base_model": "sdxl", "compatible_bases": ["sdxl-refiner"]}),
    "ae.safetensors": (lambda p: fx.make_vae_checkpoint(p, "flux"), {
        "model_type": "vae", "model_format": "checkpoint", "base_model": "flux"}),
    "sd3_vae.safetensors": (lambda p: fx.make_vae_checkpoint(p, "sd-3"), {
        "model_type": "vae", "model_format": "checkpoint", "base_model": "sd-3"}),
    "kohya-sd1.safetensors": (fx.make_lora_kohya, {"model_type": "lora", "model_format": "lycoris", "base_model": "sd-1"}),
    "kohya-sd2.safetensors": (lambda p: fx.make_lora_kohya(p, "sd-2"), {
        "model_type": "lora", "model_format": "lycoris", "base_model": "sd-2"}),
    "kohya-sdxl.safetensors": (lambda p: fx.make_lora_kohya(p, "sdxl"), {
        "model_type": "lora", "model_format": "lycoris", "base_model": "sdxl"}),
    "kohya-flux.safetensors": (lambda p: fx.make_lora_kohya(p, "flux"), {
        "model_type": "lora", "model_format": "lycoris", "base_model": "flux"}),
    "kohya-sd1.ckpt": (fx.make_lora_kohya, {"model_type": "lora", "model_format": "lycoris", "base_model": "sd-1"}),
    "peft-sd1.safetensors": (fx.make_lora_diffusers, {
        "model_type": "lora", "model_format": "lycoris", "base_model": "sd-1"}),
    "peft-sdxl.safetensors": (lambda p: fx.make_lora_diffusers(p, "sdxl"), {
        "model_type": "lora", "model_format": "lycoris", "base_model": "sdxl"}),
    "peft-flux.safetensors": (lambda p: fx.make_lora_diffusers(p, "flux"), {
        "model_type": "lora", "model_format": "lycoris", "base_model": "flux"}),
    "lokr-sd1.safetensors": (fx.make_lora_lokr, {"model_type": "lora", "model_format": "lycoris", "base_model": "sd-1"}),
    "lokr-sd2.safetensors": (lambda p: fx.make_lora_lokr(p, "sd-2"), {
        "model_type": "lora", "model_format": "lycoris", "base_model": "sd-2"}),
    "lokr-sdxl.safetensors": (lambda p: fx.make_lora_lokr(p, "sdxl"), {
        "model_type": "lora", "model_format": "lycoris", "base_model": "sdxl"}),
    "ti-a1111.pt": (fx.make_textual_inversion, {
        "model_type": "embedding", "model_format": "embedding_file", "base_model": "sd-1"}),
    "ti-sd2.safetensors": (lambda p: fx.make_textual_inversion(p, "sd-2", "safetensors"), {
        "model_type": "embedding", "model_format": "embedding_file", "base_model": "sd-2"}),
    "ti-sdxl.safetensors": (lambda p: fx.make_textual_inversion(p, "sdxl", "safetensors"), {
        "model_type": "embedding", "model_format": "embedding_file", "base_model": "sdxl"}),
    "learned_embeds.bin": (lambda p: fx.make_textual_inversion(p, fmt="bin"), {
        "model_type": "embedding", "model_format": "embedding_file", "base_model": "sd-1"}),
    "control_sd15_canny.pth": (fx.make_controlnet_checkpoint, {
        "model_type": "controlnet", "model_format": "checkpoint", "base_model": "sd-1",
        "config_path": "configs/controlnet/cldm_v15.yaml"}),
    "control_v21.safetensors": (lambda p: fx.make_controlnet_checkpoint(p, "sd-2"), {
        "model_type": "controlnet", "model_format": "checkpoint", "base_model": "sd-2",
        "config_path": "configs/controlnet/cldm_v21.yaml"}),
    "controlnet-sdxl.safetensors": (lambda p: fx.make_controlnet_checkpoint(p, "sdxl"), {
        "model_type": "controlnet", "model_format": "checkpoint", "base_model": "sdxl"}),
    "ip-adapter_sd15.safetensors": (fx.make_ip_adapter, {
        "model_type": "ip_adapter", "model_format": "checkpoint", "base_model": "sd-1"}),
    "ip-adapter_sdxl.bin": (lambda p: fx.make_ip_adapter(p, "sdxl"), {
        "model_type": "ip_adapter", "model_format": "checkpoint", "base_model": "sdxl"}),
    "t5xxl_fp16.safetensors": (fx.make_t5_encoder_checkpoint, {
        "model_type": "t5_encoder", "model_format": "checkpoint", "base_model": "any"}),
    "clip_vision_h.safetensors": (fx.make_clip_vision_checkpoint, {
        "model_type": "clip_vision", "model_format": "checkpoint", "base_model": "any"}),
}  # fmt: skip


def _check(result: ProbeResult, expected: dict[str, Any], name: str) -> None:
    got = result.model_dump(mode="json")
    defaults = {"variant": None, "prediction_type": None, "upcast_attention": None,
                "compatible_bases": [], "config_path": None}  # fmt: skip
    for field, value in (defaults | expected).items():
        assert got[field] == value, f"{name}: {field} = {got[field]!r}, expected {value!r}"


@pytest.mark.parametrize("name", sorted(FILE_CASES))
def test_single_file_families(tmp_path: Path, name: str) -> None:
    builder, expected = FILE_CASES[name]
    path = builder(tmp_path / name)
    result = probe(path)
    _check(result, expected, name)
    assert result.name == Path(name).stem


FOLDER_CASES: dict[str, tuple[Builder, dict[str, Any]]] = {
    "sd3-diffusers": (lambda p: fx.make_tiny_transformer_pipeline(p, "sd-3"), {
        "model_type": "main", "model_format": "diffusers", "base_model": "sd-3", "variant": "normal"}),
    "flux-diffusers": (lambda p: fx.make_tiny_transformer_pipeline(p, "flux"), {
        "model_type": "main", "model_format": "diffusers", "base_model": "flux", "variant": "normal"}),
    "vae-sdxl": (lambda p: fx.make_vae_diffusers(p, "sdxl"), {
        "model_type": "vae", "model_format": "diffusers", "base_model": "sdxl", "compatible_bases": ["sdxl-refiner"]}),
    "vae-sd1": (fx.make_vae_diffusers, {
        "model_type": "vae", "model_format": "diffusers", "base_model": "sd-1", "compatible_bases": ["sd-2"]}),
    "vae-flux": (lambda p: fx.make_vae_diffusers(p, "flux"), {
        "model_type": "vae", "model_format": "diffusers", "base_model": "flux"}),
    "vae-sd3": (lambda p: fx.make_vae_diffusers(p, "sd-3"), {
        "model_type": "vae", "model_format": "diffusers", "base_model": "sd-3"}),
    "controlnet-sd1": (fx.make_controlnet_diffusers, {
        "model_type": "controlnet", "model_format": "diffusers", "base_model": "sd-1"}),
    "controlnet-sd2": (lambda p: fx.make_controlnet_diffusers(p, "sd-2"), {
        "model_type": "controlnet", "model_format": "diffusers", "base_model": "sd-2"}),
    "t2i-sd1": (fx.make_t2i_adapter, {"model_type": "t2i_adapter", "model_format": "diffusers", "base_model": "sd-1"}),
    "t2i-sdxl": (lambda p: fx.make_t2i_adapter(p, "sdxl"), {
        "model_type": "t2i_adapter", "model_format": "diffusers", "base_model": "sdxl"}),
    "clip-vision": (fx.make_clip_vision, {"model_type": "clip_vision", "model_format": "diffusers", "base_model": "any"}),
    "t5": (fx.make_t5_encoder, {"model_type": "t5_encoder", "model_format": "t5_encoder", "base_model": "any"}),
    "t5-invokeai": (lambda p: fx.make_t5_encoder(p, "invokeai"), {
        "model_type": "t5_encoder", "model_format": "t5_encoder", "base_model": "any"}),
    "lora-peft-folder": (lambda p: fx.make_lora_diffusers(p, "sdxl", folder=True), {
        "model_type": "lora", "model_format": "diffusers", "base_model": "sdxl"}),
    "ti-folder": (lambda p: fx.make_textual_inversion(p, fmt="folder"), {
        "model_type": "embedding", "model_format": "embedding_folder", "base_model": "sd-1"}),
    "ip-adapter-folder": (lambda p: fx.make_ip_adapter(p, folder=True), {
        "model_type": "ip_adapter", "model_format": "invokeai", "base_model": "sd-1"}),
    "ip-adapter-sdxl-folder": (lambda p: fx.make_ip_adapter(p, "sdxl", folder=True), {
        "model_type": "ip_adapter", "model_format": "invokeai", "base_model": "sdxl"}),
    "onnx-sd1": (fx.make_onnx_pipeline, {
        "model_type": "onnx", "model_format": "onnx", "base_model": "sd-1", "variant": "normal",
        "prediction_type": "epsilon", "upcast_attention": False}),
    "onnx-sd2-v": (lambda p: fx.make_onnx_pipeline(p, "sd-2", "v_prediction"), {
        "model_type": "onnx", "model_format": "onnx", "base_model": "sd-2", "variant": "normal",
        "prediction_type": "v_prediction", "upcast_attention": True}),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FOLDER_CASES))
def test_folder_families(tmp_path: Path, name: str) -> None:
    builder, expected = FOLDER_CASES[name]
    path = builder(tmp_path / name)
    result = probe(path)
    _check(result, expected, name)
    assert result.name == name


@pytest.fixture(scope="module")
def sd_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {
        "sd1": fx.make_tiny_sd_diffusers(root / "sd1"),
        "sd1-inpaint": fx.make_tiny_sd_diffusers(root / "sd1-inpaint", variant="inpaint"),
        "sd2-v": fx.make_tiny_sd_diffusers(
            root / "sd2-v", "sd-2", prediction_type="v_prediction", upcast_attention=True
        ),
        "sd2-eps": fx.make_tiny_sd_diffusers(root / "sd2-eps", "sd-2"),
        "sdxl": fx.make_tiny_sdxl_diffusers(root / "sdxl"),
        "sdxl-refiner": fx.make_tiny_sdxl_diffusers(root / "sdxl-refiner", refiner=True),
    }


PIPELINE_CASES: dict[str, dict[str, Any]] = {
    "sd1": {"base_model": "sd-1", "variant": "normal", "prediction_type": "epsilon", "upcast_attention": False},
    "sd1-inpaint": {"base_model": "sd-1", "variant": "inpaint", "prediction_type": "epsilon", "upcast_attention": False},
    "sd2-v": {"base_model": "sd-2", "variant": "normal", "prediction_type": "v_prediction", "upcast_attention": True},
    "sd2-eps": {"base_model": "sd-2", "variant": "normal", "prediction_type": "epsilon", "upcast_attention": False},
    "sdxl": {"base_model": "sdxl", "variant": "normal", "prediction_type": "epsilon", "upcast_attention": False},
    "sdxl-refiner": {
        "base_model": "sdxl-refiner", "variant": "normal", "prediction_type": "epsilon", "upcast_attention": False,
    },
}


@pytest.mark.parametrize("name", sorted(PIPELINE_CASES))
def test_diffusers_pipelines(sd_pipelines: dict[str, Path], name: str) -> None:
    result = probe(sd_pipelines[name])
    _check(result, {"model_type": "main", "model_format": "diffusers"} | PIPELINE_CASES[name], name)


def test_as_config_fields_of_a_main_checkpoint(tmp_path: Path) -> None:
    fields = probe(fx.make_sd2_checkpoint(tmp_path / "sd2.safetensors")).as_config_fields()
    assert fields == {
        "model_type": "main", "model_format": "checkpoint", "base_model": "sd-2", "compatible_bases": [],
        "variant": "normal", "prediction_type": "v_prediction", "upcast_attention": True,
        "config": "configs/stable-diffusion/v2-inference-v.yaml", "precision": "fp16",
    }  # fmt: skip


def test_as_config_fields_of_a_lora_and_a_vae(tmp_path: Path) -> None:
    lora = probe(fx.make_lora_kohya(tmp_path / "l.safetensors")).as_config_fields()
    assert lora == {"model_type": "lora", "model_format": "lycoris", "base_model": "sd-1", "compatible_bases": [],
                    "precision": "fp16"}
    vae = probe(fx.make_vae_checkpoint(tmp_path / "v.safetensors")).as_config_fields()
    assert vae["compatible_bases"] == ["sd-2"] and "variant" not in vae


def test_v_prediction_sdxl_marker_tensor(tmp_path: Path) -> None:
    from tests.fixtures.model_files import sdxl_checkpoint_shapes, write_safetensors

    path = write_safetensors(tmp_path / "noob-vpred.safetensors", {**sdxl_checkpoint_shapes(), "v_pred": ()})
    result = probe(path)
    assert (result.base_model, result.prediction_type) == ("sdxl", "v_prediction")


def test_sd2_prediction_from_a_sidecar_yaml(tmp_path: Path) -> None:
    from tests.fixtures.model_files import sd2_checkpoint_shapes, write_safetensors

    eps = write_safetensors(tmp_path / "custom.safetensors", sd2_checkpoint_shapes())  # no metadata
    assert probe(eps).prediction_type == "v_prediction"  # the common 768-v model by default
    (tmp_path / "custom.yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    assert probe(eps).prediction_type == "epsilon"
    (tmp_path / "custom.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert probe(eps).prediction_type == "v_prediction"


def test_probe_reads_only_headers(tmp_path: Path) -> None:
    """A 3 GiB sparse safetensors file is identified from its header: no weights are read."""
    path = fx.make_sparse_safetensors(tmp_path / "huge.safetensors", 3 << 30)
    assert path.stat().st_size == 3 << 30
    assert fx.file_size_on_disk(path) < 1 << 20
    assert probe(path).base_model == "sd-1"
