"""GGUF transformers (written with the gguf package, full size over a hole) are identified with their
family and quantization; truncated files, unknown quantization types and language models are refused
saying what was found."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modelbus.services.install.recording import record_class
from modelbus.services.probe import CorruptModelError, UnrecognizedFilesError, probe
from modelbus.services.probe.gguf_file import read_gguf_header
from tests.fixtures import dit_files as d
from tests.fixtures import gguf_files as g
from tests.fixtures.model_files import flux_checkpoint_shapes

Builder = Callable[[Path], Path]


def _flux(flavour: str = "dev") -> dict[str, tuple[int, ...]]:
    return flux_checkpoint_shapes(flavour)


GGUF_LAYOUTS: dict[str, tuple[Builder, dict[str, Any]]] = {
    "flux1-dev-Q8_0.gguf": (lambda p: g.write_gguf(p, _flux(), "Q8_0"),
                            {"base_model": "flux", "variant": "normal", "config_path": "flux-dev", "quantization": "Q8_0"}),
    "flux1-schnell-Q4_0.gguf": (lambda p: g.write_gguf(p, _flux("schnell"), "Q4_0"),
                                {"base_model": "flux", "config_path": "flux-schnell", "quantization": "Q4_0"}),
    "flux1-dev-Q4_K_S.gguf": (lambda p: g.write_gguf(p, _flux(), "Q4_K"), {"base_model": "flux", "quantization": "Q4_K"}),
    "flux1-kontext-dev-Q5_K_M.gguf": (lambda p: g.write_gguf(p, _flux(), "Q5_K"),
                                      {"base_model": "flux", "variant": "kontext", "quantization": "Q5_K"}),
    "flux1-fill-dev-Q6_K.gguf": (lambda p: g.write_gguf(p, {**_flux(), "img_in.weight": (3072, 384)}, "Q6_K"),
                                 {"base_model": "flux", "variant": "inpaint", "quantization": "Q6_K"}),
    "qwen-image-Q4_K_M.gguf": (lambda p: g.write_gguf(p, d.qwen_image_comfy_shapes(), "Q4_K", "qwen_image"),
                               {"base_model": "qwen-image", "config_path": "qwen-image", "quantization": "Q4_K"}),
    "Qwen_Image_Edit-Q8_0.gguf": (lambda p: g.write_gguf(p, d.qwen_image_comfy_shapes(), "Q8_0", "qwen_image"),
                                  {"base_model": "qwen-image", "variant": "edit", "quantization": "Q8_0"}),
    "wan2.1-t2v-14b-Q6_K.gguf": (lambda p: g.write_gguf(p, d.wan_original_shapes("wan-2.1-t2v-14b"), "Q6_K", "wan"),
                                 {"base_model": "wan-2.1", "variant": "t2v", "quantization": "Q6_K"}),
    "Wan2.2-I2V-A14B-HighNoise-Q4_K_M.gguf": (
        lambda p: g.write_gguf(p, d.wan_original_shapes("wan-2.2-i2v-a14b"), "Q4_K", "wan"),
        {"base_model": "wan-2.2", "variant": "i2v", "config_path": "wan-2.2-i2v-a14b", "quantization": "Q4_K"}),
    "chroma-unlocked-v50-Q8_0.gguf": (lambda p: g.write_gguf(p, d.chroma_original_shapes(), "Q8_0"),
                                      {"base_model": "chroma", "quantization": "Q8_0"}),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(GGUF_LAYOUTS))
def test_gguf_identified_with_its_quantization(tmp_path: Path, name: str) -> None:
    builder, expected = GGUF_LAYOUTS[name]
    result = probe(builder(tmp_path / name))
    got = result.model_dump(mode="json")
    for field, value in ({"model_type": "main", "model_format": "gguf"} | expected).items():
        assert got[field] == value, f"{name}: {field} = {got[field]!r}, expected {value!r}"
    assert record_class(result).__name__ == "MainGGUFConfig"
    assert result.as_config_fields()["quantization"] == expected["quantization"]


def test_mixed_quantization_is_noted(tmp_path: Path) -> None:
    shapes = _flux()
    path = g.write_gguf(tmp_path / "flux-mixed.gguf", shapes, "Q4_K",
                        types={"double_blocks.0.img_mod.lin.bias": "F16"})  # fmt: skip
    result = probe(path)
    assert result.quantization == "Q4_K" and result.notes and "F32" in result.notes


def test_architecture_that_disagrees_with_the_tensors_is_noted(tmp_path: Path) -> None:
    """general.architecture names a family (city96's converters write it): the tensors win, the record says so."""
    claims_wan = probe(g.write_gguf(tmp_path / "model-Q8_0.gguf", _flux(), "Q8_0", "wan"))
    assert (claims_wan.base_model, claims_wan.model_format) == ("flux", "gguf")
    assert claims_wan.notes is not None and "general.architecture='wan'" in claims_wan.notes
    assert "wan-2.1/wan-2.2" in claims_wan.notes and "flux's" in claims_wan.notes
    agrees = probe(g.write_gguf(tmp_path / "wan22-Q8_0.gguf", d.wan_original_shapes("wan-2.2-ti2v-5b"), "Q8_0", "wan"))
    assert agrees.base_model == "wan-2.2" and agrees.notes is None


def test_full_size_header_costs_no_disk(tmp_path: Path) -> None:
    path = g.write_gguf(tmp_path / "flux1-dev-Q8_0.gguf", _flux(), "Q8_0")
    header = read_gguf_header(path)
    assert header.data_bytes() <= path.stat().st_size and path.stat().st_blocks * 512 < 1 << 20
    assert header.tensors["img_in.weight"][0] == (3072, 64)  # torch order


def test_llm_gguf_is_refused_naming_what_it_is(tmp_path: Path) -> None:
    path = g.write_gguf(tmp_path / "llama-2-7b.Q4_K_M.gguf", g.llm_shapes(), "Q4_K", "llama",
                        metadata={"tokenizer.ggml.model": "llama", "general.name": "LLaMA v2"})  # fmt: skip
    with pytest.raises(UnrecognizedFilesError, match=r"language model \(architecture 'llama', 4 blocks, a tokenizer\)"):
        probe(path)


def test_text_encoder_gguf_is_refused(tmp_path: Path) -> None:
    path = g.write_gguf(tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf",
                        {"enc.blk.0.attn_q.weight": (4096, 4096), "token_embd.weight": (32128, 4096)}, "Q8_0", "t5encoder")
    with pytest.raises(UnrecognizedFilesError, match="text encoder.*t5encoder"):
        probe(path)


def test_truncated_gguf_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    path = g.write_gguf(tmp_path / "flux1-dev-Q8_0.gguf", _flux(), "Q8_0")
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    with pytest.raises(CorruptModelError, match=r"truncated GGUF: tensor '.*' \(.*\) ends at byte \d+, the file has"):
        probe(path)
    with path.open("r+b") as fh:
        fh.truncate(100)  # inside the metadata
    with pytest.raises(CorruptModelError, match="truncated GGUF header"):
        probe(path)


def test_unknown_quantization_type_is_refused(tmp_path: Path) -> None:
    path = g.write_gguf(tmp_path / "flux1-dev-Q8_0.gguf", _flux(), "Q8_0")
    g.set_tensor_type(path, "img_in.weight", 99)
    with pytest.raises(CorruptModelError, match=r"'img_in.weight' has unknown quantization type 99 \(known: F32"):
        probe(path)


def test_gguf_of_no_known_family(tmp_path: Path) -> None:
    path = g.write_gguf(tmp_path / "mystery.gguf", {"a.weight": (256, 256)}, "Q8_0", "mystery")
    with pytest.raises(UnrecognizedFilesError, match="not a model this version recognises.*GGUF file, architecture 'mystery'"):
        probe(path)


def test_not_gguf_at_all(tmp_path: Path) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 60)
    with pytest.raises(UnrecognizedFilesError, match="GGUF magic"):
        probe(path)


def test_gguf_cannot_tell_keeps_the_format(tmp_path: Path) -> None:
    path = g.write_gguf(tmp_path / "wan-14b-Q8_0.gguf", d.wan_original_shapes("wan-2.1-t2v-14b"), "Q8_0", "wan")
    with pytest.raises(UnrecognizedFilesError, match="cannot tell") as info:
        probe(path)
    assert info.value.partial == {"model_type": "main", "model_format": "gguf"}
    assert probe(path, {"base_model": "wan-2.2"}).model_format == "gguf"
