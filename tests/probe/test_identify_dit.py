"""Every layout of the 2025-2026 families, at full size (sparse files), identified with the right
(type, base, format, variant, config); where the files cannot tell, the probe says so naming the candidates.

``LAYOUTS`` is the table the README's accuracy table reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modelbus.services.probe import probe
from tests.fixtures import dit_files as d
from tests.fixtures.model_files import flux_checkpoint_shapes, sd3_checkpoint_shapes

Builder = Callable[[Path], Path]
U = "model.diffusion_model."


def diffusers(name: str, prefix: str = "", **changes: Any) -> Builder:
    return lambda p: d.write_sparse(p, d.prefixed(d.meta_shapes(name, **changes), prefix))


def shapes(make: Callable[[], dict[str, tuple[int, ...]]], prefix: str = "", **kw: Any) -> Builder:
    return lambda p: d.write_sparse(p, d.prefixed(make(), prefix), **kw)


def main(base: str, variant: str = "normal", config: str | None = None, fmt: str = "checkpoint") -> dict[str, Any]:
    return {"model_type": "main", "model_format": fmt, "base_model": base, "variant": variant, "config_path": config}


def wan(config: str, prefix: str = U, **kw: Any) -> Builder:
    return shapes(lambda: d.wan_original_shapes(config), prefix, **kw)


def wan_main(config: str) -> dict[str, Any]:
    """``wan-2.2-i2v-a14b``: base ``wan-2.2``, variant ``i2v``."""
    return main(config[:7], config.split("-")[2], config)


def _sd35(large: bool, layers: int) -> dict[str, tuple[int, ...]]:
    """Stability's SD-3.5 names: 2432-wide large, or medium's MMDiT-X blocks with ``attn2``."""
    w = 2432 if large else 1536
    out = {k.replace("(1536", "("): v for k, v in sd3_checkpoint_shapes().items() if not k.startswith(U)}
    out |= {U + "x_embedder.proj.weight": (w, 16, 2, 2), U + "context_embedder.weight": (w, 4096),
            U + f"joint_blocks.{layers - 1}.x_block.mlp.fc1.weight": (4 * w, w),
            U + "joint_blocks.0.x_block.attn.ln_q.weight": (64,)}  # fmt: skip
    if not large:
        out[U + "joint_blocks.0.x_block.attn2.qkv.weight"] = (3 * w, w)
    return out


def _flux1(flavour: str = "dev", in_features: int = 64) -> dict[str, tuple[int, ...]]:
    return {**flux_checkpoint_shapes(flavour), "img_in.weight": (3072, in_features)}


LAYOUTS: dict[str, tuple[Builder, dict[str, Any]]] = {
    # SD-3.5: medium and large are their own bases; SD-3 medium stays sd-3
    "sd3.5_large.safetensors": (shapes(lambda: _sd35(True, 38)), main("sd-3.5-large")),
    "sd3.5_medium.safetensors": (shapes(lambda: _sd35(False, 24)), main("sd-3.5-medium")),
    "sd3_medium.safetensors": (shapes(sd3_checkpoint_shapes), main("sd-3")),
    # FLUX.1 variants (BFL layout; diffusers layouts in test_identify_transformers)
    "flux1-fill-dev.safetensors": (shapes(lambda: _flux1(in_features=384)), main("flux", "inpaint", "flux-dev")),
    "flux1-canny-dev.safetensors": (shapes(lambda: _flux1(in_features=128)), main("flux", "control", "flux-dev")),
    "flux1-depth-dev.safetensors": (shapes(lambda: _flux1(in_features=128), U), main("flux", "control", "flux-dev")),
    "flux1-kontext-dev.safetensors": (shapes(_flux1), main("flux", "kontext", "flux-dev")),
    "kontext-by-metadata.safetensors": (shapes(_flux1, metadata={"modelspec.title": "FLUX.1 Kontext [dev]"}),
                                        main("flux", "kontext", "flux-dev")),
    "flux1-dev.safetensors": (shapes(_flux1), main("flux", "normal", "flux-dev")),
    "flux1-redux-dev.safetensors": (shapes(lambda: {"redux_up.weight": (12288, 1152), "redux_up.bias": (12288,),
                                                    "redux_down.weight": (4096, 12288), "redux_down.bias": (4096,)}),
                                    {"model_type": "flux_redux", "model_format": "checkpoint", "base_model": "flux"}),
    # Chroma: its own base
    "chroma-diffusers.safetensors": (diffusers("chroma"), main("chroma", config="chroma")),
    "chroma-unlocked-v50.safetensors": (shapes(d.chroma_original_shapes), main("chroma", config="chroma")),
    "chroma-comfy.safetensors": (shapes(d.chroma_original_shapes, U), main("chroma", config="chroma")),
    # FLUX.2
    "flux2-dev-diffusers.safetensors": (diffusers("flux2-dev"), main("flux2", config="flux2-dev")),
    "flux2-dev.safetensors": (shapes(d.flux2_bfl_shapes), main("flux2", config="flux2-dev")),
    "flux2-dev-comfy.safetensors": (shapes(d.flux2_bfl_shapes, U), main("flux2", config="flux2-dev")),
    "flux2-klein-4b.safetensors": (shapes(lambda: d.flux2_bfl_shapes("flux2-klein-4b")),
                                   main("flux2", config="flux2-klein-4b")),
    "flux2-klein-9b-diffusers.safetensors": (diffusers("flux2-klein-9b"), main("flux2", config="flux2-klein-9b")),
    # Qwen-Image, -Edit, 2.1
    "qwen-image-diffusers.safetensors": (diffusers("qwen-image"), main("qwen-image", config="qwen-image")),
    "qwen_image_bf16.safetensors": (shapes(d.qwen_image_comfy_shapes, U), main("qwen-image", config="qwen-image")),
    "qwen_image_edit_2509_bf16.safetensors": (shapes(d.qwen_image_comfy_shapes, U),
                                              main("qwen-image", "edit", "qwen-image")),
    "qwen-image-2.1-diffusers.safetensors": (diffusers("qwen-image-2.1"), main("qwen-image-2.1", config="qwen-image-2.1")),
    "qwen_image_2.1_comfy.safetensors": (shapes(lambda: d.qwen_image_comfy_shapes("qwen-image-2.1"), U),
                                         main("qwen-image-2.1", config="qwen-image-2.1")),
    # Wan 2.1 / 2.2
    "wan2.1-t2v-1.3b-diffusers.safetensors": (diffusers("wan-2.1-t2v-1.3b"), wan_main("wan-2.1-t2v-1.3b")),
    "wan2.1_t2v_1.3B_bf16.safetensors": (wan("wan-2.1-t2v-1.3b"), wan_main("wan-2.1-t2v-1.3b")),
    "wan2.1_t2v_14B_bf16.safetensors": (wan("wan-2.1-t2v-14b"), wan_main("wan-2.1-t2v-14b")),
    "wan2.1-i2v-14b-diffusers.safetensors": (diffusers("wan-2.1-i2v-14b"), wan_main("wan-2.1-i2v-14b")),
    "wan2.1_i2v_480p_14B_bf16.safetensors": (wan("wan-2.1-i2v-14b", ""), wan_main("wan-2.1-i2v-14b")),
    "wan2.2_t2v_high_noise_14B_fp16.safetensors": (wan("wan-2.2-t2v-a14b"), wan_main("wan-2.2-t2v-a14b")),
    "diffusion_pytorch_model.safetensors": (wan("wan-2.2-t2v-a14b", "", metadata={
        "modelspec.architecture": "wan2.2-t2v-a14b"}), wan_main("wan-2.2-t2v-a14b")),
    "wan2.2-i2v-a14b-diffusers.safetensors": (diffusers("wan-2.2-i2v-a14b"), wan_main("wan-2.2-i2v-a14b")),
    "wan2.2_i2v_low_noise_14B.safetensors": (wan("wan-2.2-i2v-a14b"), wan_main("wan-2.2-i2v-a14b")),
    "wan2.2_ti2v_5B_fp16.safetensors": (wan("wan-2.2-ti2v-5b"), wan_main("wan-2.2-ti2v-5b")),
    "wan2.2-ti2v-5b-diffusers.safetensors": (diffusers("wan-2.2-ti2v-5b"), wan_main("wan-2.2-ti2v-5b")),
    # Z-Image, Lumina 2, HiDream, Sana
    "z-image-turbo-diffusers.safetensors": (diffusers("z-image-turbo"), main("z-image", config="z-image-turbo")),
    "z_image_turbo_bf16.safetensors": (shapes(d.z_image_original_shapes, U), main("z-image", config="z-image-turbo")),
    "lumina-2-diffusers.safetensors": (diffusers("lumina-2"), main("lumina-2", config="lumina-2")),
    "lumina_2_model_bf16.safetensors": (shapes(d.lumina2_original_shapes, U), main("lumina-2", config="lumina-2")),
    "hidream-i1-diffusers.safetensors": (diffusers("hidream-i1"), main("hidream", config="hidream-i1")),
    "hidream_i1_full_comfy.safetensors": (shapes(d.hidream_original_shapes, U), main("hidream", config="hidream-i1")),
    "hidream_i1_full.safetensors": (shapes(d.hidream_original_shapes), main("hidream", config="hidream-i1")),
    "sana-1600m-diffusers.safetensors": (diffusers("sana-1600m"), main("sana", config="sana-1600m")),
    "sana-600m-diffusers.safetensors": (diffusers("sana-600m"), main("sana", config="sana-600m")),
    "Sana_1600M_1024px.safetensors": (shapes(d.sana_original_shapes), main("sana", config="sana-1600m")),
    # LTX-Video, LTX-2, HunyuanVideo, HunyuanVideo 1.5
    "ltx-video-2b-diffusers.safetensors": (diffusers("ltx-video-2b"), main("ltx-video", "ti2v", "ltx-video-2b")),
    "ltx-video-13b-diffusers.safetensors": (diffusers("ltx-video-13b"), main("ltx-video", "ti2v", "ltx-video-13b")),
    "ltx-video-2b-v0.9.5.safetensors": (shapes(d.ltx_original_shapes, U), main("ltx-video", "ti2v", "ltx-video-2b")),
    "ltx-2-diffusers.safetensors": (diffusers("ltx-2"), main("ltx-2", config="ltx-2")),
    "ltx-2-19b-dev.safetensors": (shapes(d.ltx2_original_shapes, U), main("ltx-2", config="ltx-2")),
    "hunyuan-video-diffusers.safetensors": (diffusers("hunyuan-video"), main("hunyuan-video", "t2v", "hunyuan-video")),
    "hunyuan_video_720_bf16.safetensors": (shapes(d.hunyuan_video_original_shapes), main("hunyuan-video", "t2v",
                                                                                          "hunyuan-video")),
    "hunyuan-video-i2v-diffusers.safetensors": (diffusers("hunyuan-video-i2v"),
                                                main("hunyuan-video", "i2v", "hunyuan-video-i2v")),
    "hunyuan_video_i2v_720p.safetensors": (shapes(lambda: d.hunyuan_video_original_shapes(33), U),
                                           main("hunyuan-video", "i2v", "hunyuan-video-i2v")),
    "hunyuan-video-1.5-diffusers.safetensors": (diffusers("hunyuan-video-1.5"),
                                                main("hunyuan-video-1.5", "ti2v", "hunyuan-video-1.5")),
}  # fmt: skip

# where two bases have the same shapes and nothing else tells: the candidates are named
CANNOT_TELL: dict[str, tuple[Builder, list[str]]] = {
    "wan-14b-t2v.safetensors": (shapes(lambda: d.wan_original_shapes("wan-2.1-t2v-14b")), ["wan-2.1", "wan-2.2"]),
    "wan-14b-t2v-diffusers.safetensors": (diffusers("wan-2.1-t2v-14b"), ["wan-2.1", "wan-2.2"]),
}


def _check(got: dict[str, Any], expected: dict[str, Any], name: str) -> None:
    for field, value in expected.items():
        assert got[field] == value, f"{name}: {field} = {got[field]!r}, expected {value!r}"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_identified(tmp_path: Path, name: str) -> None:
    builder, expected = LAYOUTS[name]
    _check(probe(builder(tmp_path / name)).model_dump(mode="json"), expected, name)


@pytest.mark.parametrize("name", sorted(CANNOT_TELL))
def test_same_shapes_cannot_tell(tmp_path: Path, name: str) -> None:
    builder, candidates = CANNOT_TELL[name]
    d.assert_cannot_tell(builder(tmp_path / name), candidates, {"model_type": "main", "model_format": "checkpoint"})


ORACLE = {  # layout -> the model type diffusers' own single-file detection gives it
    "chroma-unlocked-v50.safetensors": "chroma", "flux2-dev.safetensors": "flux-2-dev",
    "wan2.1_t2v_14B_bf16.safetensors": "wan-t2v-14B", "wan2.1_t2v_1.3B_bf16.safetensors": "wan-t2v-1.3B",
    "wan2.1_i2v_480p_14B_bf16.safetensors": "wan-i2v-14B", "z_image_turbo_bf16.safetensors": "z-image-turbo",
    "lumina_2_model_bf16.safetensors": "lumina2", "hidream_i1_full.safetensors": "hidream",
    "Sana_1600M_1024px.safetensors": "sana", "ltx-video-2b-v0.9.5.safetensors": "ltx-video",
    "hunyuan_video_720_bf16.safetensors": "hunyuan-video",
    "qwen_image_2.1_comfy.safetensors": "qwen-image-2.1",
}  # fmt: skip
# not LTX-2: its original names include LTX-Video's patchify_proj, which diffusers' detection tests first


@pytest.mark.parametrize("name", sorted(ORACLE))
def test_original_layouts_are_what_diffusers_detects(tmp_path: Path, name: str) -> None:
    """The original layouts written here are the ones diffusers' single-file loader recognises."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from modelbus.services.probe import read_tensor_index

    path = LAYOUTS[name][0](tmp_path / name)
    import torch

    fake = {k: torch.empty(s, device="meta") for k, s in read_tensor_index(path).shapes.items()}
    assert infer_diffusers_model_type(fake) == ORACLE[name]


def test_metadata_that_disagrees_is_noted_and_the_tensors_win(tmp_path: Path) -> None:
    path = d.write_sparse(tmp_path / "model.safetensors", d.wan_original_shapes("wan-2.2-ti2v-5b"),
                          metadata={"modelspec.architecture": "flux-1-dev"})
    result = probe(path)
    assert (result.base_model, result.config_path) == ("wan-2.2", "wan-2.2-ti2v-5b")
    assert result.notes is not None and "flux" in result.notes and "wan-2.2" in result.notes
    assert "notes" in result.as_config_fields()
    agreeing = d.write_sparse(tmp_path / "agree.safetensors", d.wan_original_shapes("wan-2.2-ti2v-5b"),
                              metadata={"modelspec.architecture": "wan2.2-ti2v-5b"})
    assert probe(agreeing).notes is None


def test_largest_layout_is_identified_from_its_header_alone(tmp_path: Path) -> None:
    """FLUX.2 dev's diffusers layout (32B parameters, 64 GB as bf16) costs a few KB of disk."""
    path = LAYOUTS["flux2-dev-diffusers.safetensors"][0](tmp_path / "flux2-dev-diffusers.safetensors")
    assert path.stat().st_size > 60e9 and path.stat().st_blocks * 512 < 1 << 20
    started = time.perf_counter()
    assert probe(path).base_model == "flux2"
    print(f"identified {path.stat().st_size / 1e9:.0f} GB in {time.perf_counter() - started:.3f}s")


def _pipeline(cls: str, config: str, **extra: Any) -> Builder:
    """A diffusers pipeline folder: model_index.json and the transformer's config (the shipped one)."""
    import json

    def build(path: Path) -> Path:
        (path / "transformer").mkdir(parents=True)
        (path / "transformer" / "config.json").write_text(json.dumps(d.shipped_config(config)))
        index = {"_class_name": cls, "transformer": ["diffusers", d.shipped_config(config)["_class_name"]], **extra}
        (path / "model_index.json").write_text(json.dumps(index))
        return path

    return build


FOLDERS: dict[str, tuple[Builder, dict[str, Any]]] = {
    "Wan2.1-T2V-1.3B-Diffusers": (_pipeline("WanPipeline", "wan-2.1-t2v-1.3b"), wan_main("wan-2.1-t2v-1.3b")),
    "Wan2.1-I2V-14B-720P-Diffusers": (_pipeline("WanImageToVideoPipeline", "wan-2.1-i2v-14b"),
                                      wan_main("wan-2.1-i2v-14b")),
    "Wan2.2-T2V-A14B-Diffusers": (_pipeline("WanPipeline", "wan-2.2-t2v-a14b", transformer_2=["diffusers", "x"]),
                                  wan_main("wan-2.2-t2v-a14b")),
    "Wan2.2-TI2V-5B-Diffusers": (_pipeline("WanPipeline", "wan-2.2-ti2v-5b"), wan_main("wan-2.2-ti2v-5b")),
    "Qwen-Image": (_pipeline("QwenImagePipeline", "qwen-image"), main("qwen-image", config="qwen-image")),
    "Qwen-Image-Edit-2509": (_pipeline("QwenImageEditPlusPipeline", "qwen-image"), main("qwen-image", "edit", "qwen-image")),
    "FLUX.2-dev": (_pipeline("Flux2Pipeline", "flux2-dev"), main("flux2", config="flux2-dev")),
    "FLUX.2-klein-4B": (_pipeline("Flux2KleinPipeline", "flux2-klein-4b"), main("flux2", config="flux2-klein-4b")),
    "Chroma1-HD": (_pipeline("ChromaPipeline", "chroma"), main("chroma", config="chroma")),
    "Z-Image-Turbo": (_pipeline("ZImagePipeline", "z-image-turbo"), main("z-image", config="z-image-turbo")),
    "HiDream-I1-Full": (_pipeline("HiDreamImagePipeline", "hidream-i1"), main("hidream", config="hidream-i1")),
    "Lumina-Image-2.0": (_pipeline("Lumina2Pipeline", "lumina-2"), main("lumina-2", config="lumina-2")),
    "Sana_600M_1024px_diffusers": (_pipeline("SanaPipeline", "sana-600m"), main("sana", config="sana-600m")),
    "LTX-Video": (_pipeline("LTXPipeline", "ltx-video-2b"), main("ltx-video", "ti2v", "ltx-video-2b")),
    "LTX-2": (_pipeline("LTX2Pipeline", "ltx-2"), main("ltx-2", config="ltx-2")),
    "HunyuanVideo": (_pipeline("HunyuanVideoPipeline", "hunyuan-video"), main("hunyuan-video", "t2v", "hunyuan-video")),
    "HunyuanVideo-1.5-480p_i2v": (_pipeline("HunyuanVideo15ImageToVideoPipeline", "hunyuan-video-1.5"),
                                  main("hunyuan-video-1.5", "ti2v", "hunyuan-video-1.5")),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_diffusers_folder_identified(tmp_path: Path, name: str) -> None:
    builder, expected = FOLDERS[name]
    got = probe(builder(tmp_path / name)).model_dump(mode="json")
    _check(got, expected | {"model_format": "diffusers"}, name)


def test_wan_14b_folder_without_second_expert_is_2_1(tmp_path: Path) -> None:
    """Wan 2.2's A14B pipelines hold two experts (transformer_2); a single 14B transformer is 2.1's."""
    path = _pipeline("WanPipeline", "wan-2.1-t2v-14b")(tmp_path / "my-video-model")
    assert probe(path).base_model == "wan-2.1"
