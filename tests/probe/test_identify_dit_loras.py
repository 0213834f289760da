"""LoRAs of FLUX.2, Qwen-Image, Wan and Chroma in the trainers' layouts (PEFT/diffusers, ai-toolkit /
diffusion-pipe / ComfyUI, kohya / musubi-tuner) are identified with their base from the names and widths of
the layers they adapt; the layers are the real modules of the diffusers classes built from the shipped
configs (full size, data regions sparse). Where the layers fit several bases, the probe names them.

``LORA_LAYOUTS`` is the table the README's accuracy table reports.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modelbus.services.probe import probe
from tests.fixtures import dit_loras as dl
from tests.fixtures.dit_files import assert_cannot_tell, assert_fields, write_sparse

Builder = Callable[[Path], Path]


def _attention(layers: dl.Widths) -> dl.Widths:
    """What diffusers' training scripts adapt by default: the attention projections alone."""
    return {k: v for k, v in layers.items() if ".attn" in k and not k.endswith("qkv_mlp_proj")}


def diffusers_names(config: str, layout: dl.Layout, pick: Callable[[dl.Widths], dl.Widths] = dict,
                    prefix: str | None = None, **kw: Any) -> Builder:
    return lambda p: dl.write_lora_file(p, pick(dl.shipped_layers(config)), layout, prefix, **kw)


def original_names(family: str, config: str, layout: dl.Layout, pick: Callable[[dl.Widths], dl.Widths] = dict,
                   **kw: Any) -> Builder:
    return lambda p: dl.write_lora_file(p, dl.original_widths(family, pick(dl.shipped_layers(config))), layout, **kw)


def _lightning(path: Path) -> Path:
    """lightx2v's Qwen-Image-Lightning: diffusers' names, no prefix, kohya's down/up."""
    shapes = dl.lora_shapes(dl.shipped_layers("qwen-image"), "peft", prefix="")
    return write_sparse(path, {k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v
                               for k, v in shapes.items()})  # fmt: skip


def lora(base: str) -> dict[str, Any]:
    return {"model_type": "lora", "model_format": "lycoris", "base_model": base}


LORA_LAYOUTS: dict[str, tuple[Builder, dict[str, Any]]] = {
    # FLUX.2 dev and Klein: diffusers' names (PEFT), BFL's (ai-toolkit's diffusion_model., kohya's lora_unet_)
    "flux2-dev-peft.safetensors": (diffusers_names("flux2-dev", "peft"), lora("flux2")),
    "flux2-dev-attention-peft.safetensors": (diffusers_names("flux2-dev", "peft", _attention), lora("flux2")),
    "flux2-dev-aitoolkit.safetensors": (original_names("flux2", "flux2-dev", "aitk"), lora("flux2")),
    "flux2-dev-kohya.safetensors": (original_names("flux2", "flux2-dev", "kohya"), lora("flux2")),
    "klein-4b-peft.safetensors": (diffusers_names("flux2-klein-4b", "peft"), lora("flux2")),
    "my-style-aitoolkit.safetensors": (original_names("flux2", "flux2-klein-4b", "aitk"), lora("flux2")),
    "my-style-kohya.safetensors": (original_names("flux2", "flux2-klein-4b", "kohya"), lora("flux2")),
    "klein-9b-aitoolkit.safetensors": (original_names("flux2", "flux2-klein-9b", "aitk"), lora("flux2")),
    "k9-attention-peft.safetensors": (diffusers_names("flux2-klein-9b", "peft", _attention), lora("flux2")),
    # Qwen-Image: PEFT, ai-toolkit (diffusers' names under diffusion_model.), kohya / musubi-tuner
    "qwen-peft.safetensors": (diffusers_names("qwen-image", "peft"), lora("qwen-image")),
    "style-attention-peft.safetensors": (diffusers_names("qwen-image", "peft", _attention), lora("qwen-image")),
    "qwen-aitoolkit.safetensors": (diffusers_names("qwen-image", "aitk"), lora("qwen-image")),
    "qwen-musubi.safetensors": (diffusers_names("qwen-image", "kohya"), lora("qwen-image")),
    "Qwen-Image-Lightning-8steps.safetensors": (_lightning, lora("qwen-image")),
    "qwen-2.1-peft.safetensors": (diffusers_names("qwen-image-2.1", "peft"), lora("qwen-image-2.1")),
    "q21-attention.safetensors": (diffusers_names("qwen-image-2.1", "peft", _attention), lora("qwen-image-2.1")),
    # Wan: diffusion-pipe / ComfyUI (original names under diffusion_model.), musubi-tuner, PEFT
    "wan-1.3b-diffusion-pipe.safetensors": (original_names("wan", "wan-2.1-t2v-1.3b", "aitk"), lora("wan-2.1")),
    "wan-1.3b-musubi.safetensors": (original_names("wan", "wan-2.1-t2v-1.3b", "kohya"), lora("wan-2.1")),
    "wan-1.3b-peft.safetensors": (diffusers_names("wan-2.1-t2v-1.3b", "peft"), lora("wan-2.1")),
    "i2v-14b-diffusion-pipe.safetensors": (original_names("wan", "wan-2.1-i2v-14b", "aitk"), lora("wan-2.1")),
    "i2v-14b-peft.safetensors": (diffusers_names("wan-2.1-i2v-14b", "peft"), lora("wan-2.1")),
    "ti2v-5b-musubi.safetensors": (original_names("wan", "wan-2.2-ti2v-5b", "kohya"), lora("wan-2.2")),
    "wan2.2_t2v_high_noise_lora.safetensors": (original_names("wan", "wan-2.2-t2v-a14b", "aitk"), lora("wan-2.2")),
    "wan2.1_t2v_14b_lora.safetensors": (original_names("wan", "wan-2.1-t2v-14b", "kohya"), lora("wan-2.1")),
    "t2v-14b-musubi.safetensors": (original_names("wan", "wan-2.1-t2v-14b", "kohya",
                                                  metadata={"ss_base_model_version": "wan2.1_t2v_14B"}), lora("wan-2.1")),
    # LyCORIS: LoKr (FLUX.2 Klein's trainers ship it), LoHa
    "klein-4b-lokr.safetensors": (diffusers_names("flux2-klein-4b", "lokr"), lora("flux2")),
    "bfl-names-lokr.safetensors": (original_names("flux2", "flux2-klein-4b", "lokr"), lora("flux2")),
    "qwen-loha.safetensors": (diffusers_names("qwen-image", "loha"), lora("qwen-image")),
    "wan-5b-lokr.safetensors": (original_names("wan", "wan-2.2-ti2v-5b", "lokr"), lora("wan-2.2")),
    # HunyuanVideo: FLUX.1's layers, 20/40 blocks (it was recorded as FLUX before); musubi-tuner's own names
    "hunyuan-peft.safetensors": (diffusers_names("hunyuan-video", "peft"), lora("hunyuan-video")),
    "hv-double-only-aitoolkit.safetensors": (diffusers_names(
        "hunyuan-video", "aitk", lambda ls: {k: v for k, v in ls.items() if k.startswith("transformer_blocks.")}),
        lora("hunyuan-video")),
    "hv-musubi.safetensors": (lambda p: dl.write_lora_file(p, {
        "double_blocks.0.img_attn_qkv": (3072, 9216), "double_blocks.0.img_mod.linear": (3072, 18432),
        "single_blocks.0.linear1": (3072, 21504), "single_blocks.0.modulation.linear": (3072, 9216)}, "kohya"),
        lora("hunyuan-video")),
    # Z-Image (Turbo's LoRAs are many), Lumina 2
    "z-image-peft.safetensors": (diffusers_names("z-image-turbo", "peft"), lora("z-image")),
    "z-image-aitoolkit.safetensors": (diffusers_names("z-image-turbo", "aitk"),
                                      lora("z-image")),
    "zit-kohya.safetensors": (diffusers_names("z-image-turbo", "kohya"),
                              lora("z-image")),
    "lumina-2-peft.safetensors": (diffusers_names("lumina-2", "peft"), lora("lumina-2")),
    # LTX-Video 2B / 13B, LTX-2 (LTX's trainer, ai-toolkit and diffusion-pipe write diffusers' names under
    # diffusion_model.; kohya / musubi-tuner lora_unet_); a 4096-wide video-only LoRA by name, LTX-2's audio layers
    "ltxv-2b-trainer.safetensors": (diffusers_names("ltx-video-2b", "aitk"), lora("ltx-video")),
    "ltxv-2b-peft.safetensors": (diffusers_names("ltx-video-2b", "peft"), lora("ltx-video")),
    "ltxv-2b-kohya.safetensors": (diffusers_names("ltx-video-2b", "kohya"), lora("ltx-video")),
    "ltxv-13b-0.9.8-style.safetensors": (diffusers_names("ltx-video-13b", "aitk"), lora("ltx-video")),
    "ltx-2-trainer.safetensors": (diffusers_names("ltx-2", "aitk"), lora("ltx-2")),
    "ltx-2-kohya.safetensors": (diffusers_names("ltx-2", "kohya"), lora("ltx-2")),
    "ltx-2-video-attention-peft.safetensors": (diffusers_names(
        "ltx-2", "peft", lambda ls: {k: v for k, v in ls.items() if ".attn1." in k or ".attn2." in k}), lora("ltx-2")),
    # HiDream-I1: its own block names in every trainer's layout
    "hidream-aitoolkit.safetensors": (diffusers_names("hidream-i1", "aitk"), lora("hidream")),
    "hidream-peft.safetensors": (diffusers_names("hidream-i1", "peft"), lora("hidream")),
    "hidream-kohya.safetensors": (diffusers_names("hidream-i1", "kohya"), lora("hidream")),
    "hidream-attention-peft.safetensors": (diffusers_names("hidream-i1", "peft", _attention), lora("hidream")),
    # Sana 600M / 1600M (diffusers' training script: PEFT)
    "sana-600m-peft.safetensors": (diffusers_names("sana-600m", "peft"), lora("sana")),
    "sana-1600m-kohya.safetensors": (diffusers_names("sana-1600m", "kohya"), lora("sana")),
    # Chroma: its guidance approximator, or its name; FLUX.1's layers alone are FLUX.1's
    "chroma-approximator-peft.safetensors": (lambda p: dl.write_lora_file(
        p, dl.linear_layers(dl.shipped_config("chroma"), blocks_only=False), "peft"), lora("chroma")),
    "chroma-style-peft.safetensors": (diffusers_names("chroma", "peft"), lora("chroma")),
    "unnamed-peft.safetensors": (diffusers_names("chroma", "peft"), lora("flux")),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(LORA_LAYOUTS))
def test_lora_layout_identified(tmp_path: Path, name: str) -> None:
    builder, expected = LORA_LAYOUTS[name]
    assert_fields(probe(builder(tmp_path / name)), expected, name)


def _first_blocks(n: int) -> Callable[[dl.Widths], dl.Widths]:
    return lambda layers: {k: v for k, v in _attention(layers).items()
                           if k.startswith("transformer_blocks.") and int(k.split(".")[1]) < n}  # fmt: skip


CANNOT_TELL: dict[str, tuple[Builder, list[str]]] = {
    # the attention of a few joint blocks, 3072 wide: FLUX.1, Chroma, FLUX.2 Klein 4B and Qwen-Image alike
    "lora.safetensors": (diffusers_names("qwen-image", "peft", _first_blocks(4)),
                         ["flux", "chroma", "flux2", "qwen-image"]),
    "twenty-blocks.safetensors": (diffusers_names("qwen-image", "peft", _first_blocks(20)),
                                  ["hunyuan-video", "qwen-image"]),
    "attn-only-aitoolkit.safetensors": (original_names("flux2", "flux2-klein-4b", "aitk", _attention),
                                        ["flux", "chroma", "flux2"]),
    "video-lora.safetensors": (original_names("wan", "wan-2.2-i2v-a14b", "aitk"), ["wan-2.1", "wan-2.2"]),
}


@pytest.mark.parametrize("name", sorted(CANNOT_TELL))
def test_lora_that_fits_several_bases_names_them(tmp_path: Path, name: str) -> None:
    builder, candidates = CANNOT_TELL[name]
    assert_cannot_tell(builder(tmp_path / name), candidates, {"model_type": "lora", "model_format": "lycoris"})


def test_the_name_decides_between_same_shape_bases(tmp_path: Path) -> None:
    qwen = diffusers_names("qwen-image", "peft", _first_blocks(4))(tmp_path / "qwen-image-style.safetensors")
    klein = original_names("flux2", "flux2-klein-4b", "aitk", _attention,
                           metadata={"modelspec.architecture": "flux-2-klein-4b/lora"})(tmp_path / "a.safetensors")
    assert (probe(qwen).base_model, probe(klein).base_model) == ("qwen-image", "flux2")


def test_a_flux_lora_of_layers_chroma_shares_says_so(tmp_path: Path) -> None:
    shared = probe(diffusers_names("chroma", "peft")(tmp_path / "unnamed-peft.safetensors"))
    assert shared.base_model == "flux" and shared.notes is not None and "Chroma" in shared.notes
    modulated = dl.shipped_layers("chroma") | {"transformer_blocks.0.norm1.linear": (3072, 18432)}
    flux1 = probe(dl.write_lora_file(tmp_path / "flux1.safetensors", modulated, "peft"))
    assert (flux1.base_model, flux1.notes) == ("flux", None)


def test_metadata_claiming_another_family_is_noted(tmp_path: Path) -> None:
    path = diffusers_names("qwen-image", "kohya", metadata={"ss_base_model_version": "flux1"})(tmp_path / "x.safetensors")
    result = probe(path)
    assert result.base_model == "qwen-image"
    assert result.notes is not None and "flux" in result.notes and "qwen-image" in result.notes


def test_diffusers_lora_folder(tmp_path: Path) -> None:
    """A folder of diffusers' training scripts (``pytorch_lora_weights.safetensors``) of a Wan LoRA."""
    folder = tmp_path / "wan-lora"
    diffusers_names("wan-2.2-ti2v-5b", "peft")(folder / "pytorch_lora_weights.safetensors")
    (folder / "README.md").write_text(json.dumps({"base_model": "Wan-AI/Wan2.2-TI2V-5B-Diffusers"}))
    result = probe(folder)
    assert (result.model_type, result.model_format, result.base_model) == ("lora", "diffusers", "wan-2.2")


def test_a_4096_wide_ltx_lora_without_audio_layers_names_both_bases(tmp_path: Path) -> None:
    path = dl.write_lora_file(tmp_path / "style.safetensors", dl.shipped_layers("ltx-video-13b"), "aitk")
    assert_cannot_tell(path, ["ltx-video", "ltx-2"], {"model_type": "lora", "model_format": "lycoris"})


def test_attn1_loras_of_other_widths_are_refused_naming_them(tmp_path: Path) -> None:
    """PixArt (1152 wide like Sana 600M, but with linear feed-forwards) and an unpublished LTX width."""
    from modelbus.services.probe import UnrecognizedFilesError

    pixart = {f"transformer_blocks.{n}.{m}": w for n in range(2) for m, w in
              (("attn1.to_q", (1152, 1152)), ("attn2.to_k", (1152, 1152)), ("ff.net.0.proj", (1152, 4608)))}
    with pytest.raises(UnrecognizedFilesError, match="width 1152 and linear feed-forwards.*Sana"):
        probe(dl.write_lora_file(tmp_path / "pixart.safetensors", pixart, "peft"))
    odd = {k: (3000, 3000) for k in ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn2.to_q")}
    with pytest.raises(UnrecognizedFilesError, match="width 3000, which matches no published LTX-Video"):
        probe(dl.write_lora_file(tmp_path / "odd.safetensors", odd, "peft"))
