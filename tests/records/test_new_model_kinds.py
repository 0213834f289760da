"""The 2025-2026 bases, types and formats, and the quantization/precision/notes fields, round-trip through
every backend (SQL, YAML, memory) and are found by base and type."""

from __future__ import annotations

from typing import Any

import pytest

from modelbus.services.records import ModelRecordServiceBase
from modelbus.services.records.enums import BaseModelType, ModelFormat, ModelType
from modelbus.services.records.models import CLASSES_BY_TAG, AnyModelConfigAdapter

NEW_BASES = ("sd-3.5-medium", "sd-3.5-large", "chroma", "flux2", "qwen-image", "qwen-image-2.1", "wan-2.1",
             "wan-2.2", "z-image", "hidream", "lumina-2", "sana", "ltx-video", "ltx-2", "hunyuan-video",
             "hunyuan-video-1.5")  # fmt: skip
NEW_KINDS: dict[str, dict[str, Any]] = {
    "main/gguf": {"base_model": "flux", "quantization": "Q4_K", "variant": "normal"},
    "main/bnb_quantized_nf4b": {"base_model": "flux", "quantization": "nf4"},
    "main/bnb_quantized_int8b": {"base_model": "flux", "quantization": "int8"},
    "flux_redux/checkpoint": {"base_model": "flux"},
    "spandrel_image_to_image/checkpoint": {"base_model": "any"},
    "siglip/diffusers": {"base_model": "any"},
    "siglip/checkpoint": {"base_model": "any"},
    "llava_onevision/diffusers": {"base_model": "any"},
    "qwen2_5_vl/diffusers": {"base_model": "qwen-image"},
    "qwen2_5_vl/checkpoint": {"base_model": "qwen-image", "precision": "fp8_e4m3fn", "config": "qwen2.5-vl-7b"},
    "qwen3_encoder/checkpoint": {"base_model": "z-image", "compatible_bases": ["flux2"], "config": "qwen3-4b"},
    "qwen3_encoder/diffusers": {"base_model": "flux2"},
    "mistral_encoder/checkpoint": {"base_model": "flux2", "config": "mistral-small-3.1-24b"},
    "mistral_encoder/diffusers": {"base_model": "flux2"},
    "t5_encoder/checkpoint": {"base_model": "wan-2.1", "compatible_bases": ["wan-2.2"], "notes": "UMT5-XXL"},
    "vae/checkpoint": {"base_model": "wan-2.2"},
}


def _record(i: int, tag: str, **fields: Any) -> dict[str, Any]:
    model_type, model_format = tag.split("/")
    return {"name": f"m{i}", "model_type": model_type, "model_format": model_format, "path": f"models/m{i}",
            **fields}


def test_every_new_value_is_an_enum_member_and_every_new_kind_a_record_class() -> None:
    assert set(NEW_BASES) <= {b.value for b in BaseModelType}
    assert set(NEW_KINDS) <= set(CLASSES_BY_TAG)
    for tag in NEW_KINDS:
        model_type, model_format = tag.split("/")
        ModelType(model_type), ModelFormat(model_format)


def test_new_kinds_and_bases_round_trip(service: ModelRecordServiceBase) -> None:
    added = {}
    for i, (tag, fields) in enumerate(NEW_KINDS.items()):
        added[f"k{i:02d}"] = _record(i, tag, **fields)
    for j, base in enumerate(NEW_BASES):
        added[f"b{j:02d}"] = _record(100 + j, "main/checkpoint", base_model=base, precision="fp8_e4m3fn",
                                     notes=f"metadata claims sdxl, tensors say {base}")  # fmt: skip
    for key, config in added.items():
        service.add_model(key, config)
    for key, config in added.items():
        got = service.get_model(key)
        assert got == AnyModelConfigAdapter.validate_python({**config, "key": key})
        assert got.model_dump(mode="json")["model_format"] == config["model_format"]
    assert service.get_model("k00").quantization == "Q4_K"
    assert service.get_model("b00").precision == "fp8_e4m3fn"
    for base in NEW_BASES:
        assert [m.base_model.value for m in service.search_by_name(base_model=base, model_type="main")] == [base]
    assert len(service.search_by_name(model_type="siglip")) == 2


@pytest.mark.parametrize("field", ["quantization", "precision", "notes"])
def test_new_fields_are_optional_text(field: str) -> None:
    cfg = AnyModelConfigAdapter.validate_python({**_record(0, "main/checkpoint", base_model="flux"), "key": "k"})
    assert getattr(cfg, field) is None
