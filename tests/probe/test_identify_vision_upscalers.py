"""Upscalers (Spandrel's architectures, by Spandrel's own key conditions, without Spandrel), SigLIP encoders
and LLaVA-style VLMs get their own types. These files are headers with the real names and shapes; the
networks themselves, built by Spandrel's classes and loaded through it, are in tests/upscalers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelbus.services.probe import probe
from tests.fixtures.dit_files import write_sparse

_RRDB = {"conv_first.weight": (64, 3, 3, 3), "body.0.rdb1.conv1.weight": (32, 64, 3, 3),
         "conv_body.weight": (64, 64, 3, 3), "conv_up1.weight": (64, 64, 3, 3), "conv_up2.weight": (64, 64, 3, 3),
         "conv_hr.weight": (64, 64, 3, 3), "conv_last.weight": (3, 64, 3, 3)}
_SWIN = {"conv_first.weight": (180, 3, 3, 3), "layers.0.residual_group.blocks.0.norm1.weight": (180,),
         "layers.0.residual_group.blocks.0.mlp.fc1.bias": (360,),
         "layers.0.residual_group.blocks.0.attn.relative_position_index": (64, 64),
         "layers.0.residual_group.blocks.0.attn.relative_position_bias_table": (225, 6)}
# file name -> (tensors, architecture, scale)
UPSCALERS = {
    "4x-UltraSharp.safetensors": ({"model.0.weight": (64, 3, 3, 3), "model.1.sub.0.RDB1.conv1.0.weight": (32, 64, 3, 3),
                                   "model.1.sub.23.weight": (64, 64, 3, 3), "model.3.weight": (64, 64, 3, 3),
                                   "model.6.weight": (64, 64, 3, 3), "model.8.weight": (64, 64, 3, 3),
                                   "model.10.weight": (3, 64, 3, 3)}, "ESRGAN", 4),
    "RealESRGAN_x4plus.safetensors": ({f"params_ema.{k}": v for k, v in _RRDB.items()}, "ESRGAN", 4),
    "RealESRGAN_x2plus.safetensors": ({**_RRDB, "conv_first.weight": (64, 12, 3, 3)}, "ESRGAN", 2),
    "realesr-general-x4v3.safetensors": ({"body.0.weight": (64, 3, 3, 3), "body.1.weight": (64,),
                                          "body.2.weight": (64, 64, 3, 3), "body.3.weight": (64,),
                                          "body.4.weight": (48, 64, 3, 3), "body.4.bias": (48,)}, "Compact", 4),
    "SwinIR_4x.safetensors": ({**_SWIN, "conv_before_upsample.0.weight": (64, 180, 3, 3),
                               "upsample.0.weight": (256, 64, 3, 3), "upsample.2.weight": (256, 64, 3, 3)}, "SwinIR", 4),
    "big-lama.safetensors": ({"model.model.1.bn_l.running_mean": (64,)}, "LaMa", 1),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(UPSCALERS))
def test_upscaler_identified(tmp_path: Path, name: str) -> None:
    tensors, arch, scale = UPSCALERS[name]
    result = probe(write_sparse(tmp_path / name, tensors))
    assert (result.model_type, result.model_format, result.base_model) == ("spandrel_image_to_image", "checkpoint", "any")
    assert (result.architecture, result.scale) == (arch, scale)
    assert result.as_config_fields()["architecture"] == arch and result.notes is not None


def test_a_network_spandrel_does_not_know_is_not_an_upscaler(tmp_path: Path) -> None:
    from modelbus.services.probe.errors import UnrecognizedFilesError

    with pytest.raises(UnrecognizedFilesError, match="not a model this version recognises"):
        probe(write_sparse(tmp_path / "classifier.safetensors", {"fc.weight": (10, 512), "conv1.weight": (64, 3, 7, 7)}))


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
