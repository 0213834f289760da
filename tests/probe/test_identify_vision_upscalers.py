"""Upscalers (Spandrel's architectures, by their key patterns), SigLIP encoders and LLaVA-style VLMs get
their own types. Loading upscalers is not implemented: Spandrel needs torchvision, which does not import
beside this torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelbus.services.probe import probe
from tests.fixtures.dit_files import write_sparse

UPSCALERS = {
    "4x-UltraSharp.pth.safetensors": {"model.0.weight": (64, 3, 3, 3), "model.1.sub.0.RDB1.conv1.0.weight": (32, 64, 3, 3)},
    "RealESRGAN_x4plus.safetensors": {"params_ema.conv_first.weight": (64, 3, 3, 3),
                                      "params_ema.body.0.rdb1.conv1.weight": (32, 64, 3, 3)},
    "SwinIR_4x.safetensors": {"conv_first.weight": (180, 3, 3, 3),
                              "layers.0.residual_group.blocks.0.attn.relative_position_bias_table": (225, 6)},
    "HAT_SRx4.safetensors": {"conv_first.weight": (180, 3, 3, 3),
                             "layers.0.residual_group.blocks.0.conv_block.cab.0.weight": (60, 180, 3, 3),
                             "layers.0.residual_group.blocks.0.attn.relative_position_bias_table": (225, 6)},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(UPSCALERS))
def test_upscaler_identified(tmp_path: Path, name: str) -> None:
    result = probe(write_sparse(tmp_path / name, UPSCALERS[name]))
    assert (result.model_type, result.model_format, result.base_model) == ("spandrel_image_to_image", "checkpoint", "any")
    assert result.notes is not None and result.notes.endswith("image-to-image network")


def test_siglip_file_is_not_clip(tmp_path: Path) -> None:
    siglip = write_sparse(tmp_path / "siglip.safetensors", {
        "vision_model.embeddings.patch_embedding.weight": (1152, 3, 14, 14), "vision_model.head.probe": (1, 1, 1152)})
    clip = write_sparse(tmp_path / "clip.safetensors", {
        "vision_model.embeddings.patch_embedding.weight": (1024, 3, 14, 14),
        "vision_model.embeddings.class_embedding": (1024,)})
    assert probe(siglip).model_type == "siglip" and probe(clip).model_type == "clip_vision"


@pytest.mark.parametrize(("arch", "kind"), [("SiglipVisionModel", "siglip"),
                                            ("LlavaOnevisionForConditionalGeneration", "llava_onevision"),
                                            ("LlavaForConditionalGeneration", "llava_onevision")])
def test_vision_folders(tmp_path: Path, arch: str, kind: str) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": [arch]}))
    result = probe(tmp_path / "m")
    assert (result.model_type, result.model_format) == (kind, "diffusers")
