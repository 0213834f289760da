"""What the user says wins; what cannot be identified says what was seen."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

import modelbus.services.probe as probe_pkg
from modelbus.services.probe import (
    CorruptModelError,
    InvalidOverrideError,
    ModelPathError,
    ProbeError,
    ProbeResult,
    UnrecognizedFilesError,
    probe,
)
from tests import fixtures as fx
from tests.fixtures.model_files import write_safetensors


def test_public_api() -> None:
    assert set(probe_pkg.__all__) >= {
        "probe", "ProbeResult", "ProbeError", "UnrecognizedFilesError", "UnsafeModelError", "CorruptModelError",
        "read_safetensors_header", "scan_pickle",
    }  # fmt: skip
    for name in probe_pkg.__all__:
        assert hasattr(probe_pkg, name), name
    for error in ("UnrecognizedFilesError", "UnsafeModelError", "CorruptModelError", "ModelPathError"):
        assert issubclass(getattr(probe_pkg, error), ProbeError)


def test_result_is_frozen(tmp_path: Path) -> None:
    result = probe(fx.make_lora_kohya(tmp_path / "l.safetensors"))
    with pytest.raises(ValidationError):
        result.base_model = "sdxl"  # type: ignore[misc]


def test_overrides_win_and_derived_fields_follow(tmp_path: Path) -> None:
    path = fx.make_sd1_checkpoint(tmp_path / "merge.safetensors")
    result = probe(path, {"base_model": "sd-2", "prediction_type": "v_prediction", "name": "My merge",
                          "description": "ignored: not an identification field"})  # fmt: skip
    assert result.base_model == "sd-2" and result.name == "My merge"
    assert result.config_path == "configs/stable-diffusion/v2-inference-v.yaml"
    assert result.upcast_attention is True
    explicit = probe(path, {"config": "configs/custom.yaml", "type": "main", "base": "sd-1"})
    assert explicit.config_path == "configs/custom.yaml"


def test_vae_compatibility_follows_an_overridden_base(tmp_path: Path) -> None:
    path = fx.make_vae_checkpoint(tmp_path / "vae.safetensors")
    assert probe(path).compatible_bases == ["sd-2"]
    assert probe(path, {"base_model": "sdxl"}).compatible_bases == ["sdxl-refiner"]


def test_unknown_file_says_what_was_seen(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "mystery.safetensors",
                             {"backbone.layer1.weight": (4, 4), "head.fc.weight": (2, 4), "head.fc.bias": (2,)})  # fmt: skip
    with pytest.raises(UnrecognizedFilesError) as info:
        probe(path)
    message = str(info.value)
    assert ".safetensors" in message and "3 tensors" in message and "backbone, head" in message


def test_unknown_file_accepted_with_type_base_and_format(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "mystery.safetensors", {"backbone.layer1.weight": (4, 4)})
    with pytest.raises(UnrecognizedFilesError):
        probe(path, {"model_type": "lora", "base_model": "sd-1"})  # format missing: still unknown
    result = probe(path, {"model_type": "lora", "base_model": "sd-1", "model_format": "lycoris"})
    assert (result.model_type, result.base_model, result.model_format) == ("lora", "sd-1", "lycoris")
    assert result.name == "mystery"


def test_invalid_override_values(tmp_path: Path) -> None:
    path = fx.make_lora_kohya(tmp_path / "l.safetensors")
    with pytest.raises(InvalidOverrideError, match="base_model='sd-9'"):
        probe(path, {"base_model": "sd-9"})


def test_unknown_base_width_asks_for_the_base(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "odd-lora.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 512),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": (320, 4),
    })  # fmt: skip
    with pytest.raises(UnrecognizedFilesError, match="width 512.*pass base_model"):
        probe(path)
    assert probe(path, {"base_model": "sd-1"}).model_type == "lora"


def test_unknown_folder_lists_its_entries(tmp_path: Path) -> None:
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "readme.md").write_text("hi")
    (folder / "weights").mkdir()
    with pytest.raises(UnrecognizedFilesError, match=r"2 entries \(readme.md, weights/\)"):
        probe(folder)


def test_unsupported_suffix_and_missing_path(tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07")
    with pytest.raises(UnrecognizedFilesError, match="unsupported file suffix '.onnx'"):
        probe(onnx)
    gguf = tmp_path / "model.gguf"  # GGUF is read now; four bytes of it are a truncated header
    gguf.write_bytes(b"GGUF")
    with pytest.raises(CorruptModelError, match="truncated GGUF header"):
        probe(gguf)
    with pytest.raises(ModelPathError, match="no such file"):
        probe(tmp_path / "missing.safetensors")


def test_corrupt_safetensors_and_json(tmp_path: Path) -> None:
    path = fx.make_sdxl_checkpoint(tmp_path / "sdxl.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptModelError, match="truncated"):
        probe(path, {"model_type": "main", "base_model": "sdxl", "model_format": "checkpoint"})
    folder = fx.make_vae_diffusers(tmp_path / "vae")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CorruptModelError, match="config.json: not valid JSON"):
        probe(folder)


def test_pipeline_without_unet_config(tmp_path: Path) -> None:
    folder = tmp_path / "broken-pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(UnrecognizedFilesError, match="without unet/config.json"):
        probe(folder)


def test_probe_result_round_trips(tmp_path: Path) -> None:
    result = probe(fx.make_sd2_checkpoint(tmp_path / "x.safetensors"))
    assert ProbeResult.model_validate_json(result.model_dump_json()) == result
