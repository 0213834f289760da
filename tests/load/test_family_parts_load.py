"""The other parts of the 2025-2026 families load offline through the load service: UMT5 (Wan's text
encoder) from one file, the Wan, Qwen-Image and FLUX.2 VAEs from one file (diffusers' names and Wan-AI's,
converted by diffusers) and from folders, and Qwen2.5-VL from its folder. Tiny real models: every loaded
weight is compared with the one written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from modelbus.services.load import InvalidModelException, ModelLoadService
from modelbus.services.probe import probe
from tests.fixtures import transformer_files as tf
from tests.fixtures.loadable import T5_CFG
from tests.fixtures.wan_vae import wan_vae_original_key

VAES: dict[str, tuple[str, dict[str, Any]]] = {
    "wan-2.1": ("AutoencoderKLWan", {"base_dim": 8, "z_dim": 4}),
    "qwen-image": ("AutoencoderKLQwenImage", {"base_dim": 8, "z_dim": 4}),
    "flux2": ("AutoencoderKLFlux2", {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4,
                                     "norm_num_groups": 4, "down_block_types": ["DownEncoderBlock2D"] * 2,
                                     "up_block_types": ["UpDecoderBlock2D"] * 2}),
}  # fmt: skip


def _tiny_vae(base: str) -> torch.nn.Module:
    import diffusers

    cls, config = VAES[base]
    torch.manual_seed(0)
    return getattr(diffusers, cls)(**config).eval()  # type: ignore[no-any-return]


def _same(model: torch.nn.Module, want: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k].float(), v.float()), k


def _write_config(path: Path, base: str) -> str:
    cls, config = VAES[base]
    path.write_text(json.dumps({"_class_name": cls, **config}))
    return path.name


@pytest.mark.parametrize(("base", "wan_names"), [("wan-2.1", False), ("wan-2.1", True), ("qwen-image", True),
                                                 ("flux2", False)])
def test_vae_single_file(service: ModelLoadService, add: Any, config: Any, base: str, wan_names: bool) -> None:
    vae = _tiny_vae(base)
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    written = {wan_vae_original_key(k): v for k, v in state.items()} if wan_names else state
    save_file(written, str(config.models_path / f"{base}-vae.safetensors"))
    cfg = _write_config(config.models_path / f"{base}-vae.json", base)
    with service.get_model(add(f"{base}-vae.safetensors", "vae", "checkpoint", base=base, config=cfg)) as model:
        assert type(model).__name__ == VAES[base][0]
        _same(model, state)


def test_vae_file_of_another_architecture_is_refused(service: ModelLoadService, add: Any, config: Any) -> None:
    save_file({k: v.contiguous() for k, v in _tiny_vae("wan-2.1").state_dict().items()},
              str(config.models_path / "wan-vae.safetensors"))
    cfg = _write_config(config.models_path / "flux2-vae.json", "flux2")
    with pytest.raises(InvalidModelException, match=r"wan-vae\.safetensors: not a AutoencoderKLFlux2 of this config"):
        service.get_model(add("wan-vae.safetensors", "vae", "checkpoint", base="flux2", config=cfg))


@pytest.mark.parametrize("base", sorted(VAES))
def test_vae_folder(service: ModelLoadService, add: Any, config: Any, base: str) -> None:
    vae = _tiny_vae(base)
    vae.save_pretrained(config.models_path / f"{base}-vae")
    assert probe(config.models_path / f"{base}-vae").base_model == base
    with service.get_model(add(f"{base}-vae", "vae", "diffusers", base=base)) as model:
        _same(model, vae.state_dict())


def test_wan_vae_names_round_trip_through_diffusers_conversion() -> None:
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    state = _tiny_vae("wan-2.1").state_dict()
    original = {wan_vae_original_key(k): v for k, v in state.items()}
    assert len(original) == len(state) and convert_wan_vae_to_diffusers(dict(original)).keys() == state.keys()


def test_umt5_single_file(service: ModelLoadService, add: Any, config: Any) -> None:
    import transformers

    torch.manual_seed(5)
    umt5 = transformers.UMT5EncoderModel(transformers.UMT5Config(**T5_CFG)).eval()
    state = {k: v.contiguous() for k, v in umt5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(state, str(config.models_path / "umt5.safetensors"))
    found = probe(config.models_path / "umt5.safetensors")
    assert (found.model_type, found.base_model) == ("t5_encoder", "wan-2.1")
    with service.get_model(add("umt5.safetensors", "t5_encoder", "checkpoint", base="wan-2.1")) as model:
        assert isinstance(model, transformers.UMT5EncoderModel)
        _same(model, umt5.state_dict())
        ids = torch.tensor([[1, 2, 3, 4]])
        torch.testing.assert_close(model(ids).last_hidden_state, umt5(ids).last_hidden_state)


def test_qwen25_vl_folder(service: ModelLoadService, add: Any, config: Any) -> None:
    import transformers

    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": 64, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 16,
              "fullatt_block_indexes": [0]}  # fmt: skip
    torch.manual_seed(8)
    vlm = transformers.Qwen2_5_VLForConditionalGeneration(
        transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()
    vlm.save_pretrained(config.models_path / "qwen-vl")
    assert probe(config.models_path / "qwen-vl").model_type == "qwen2_5_vl"
    with service.get_model(add("qwen-vl", "qwen2_5_vl", "diffusers", base="any")) as model:
        assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
        _same(model, vlm.state_dict())


def test_without_a_config_the_published_vae_is_built(service: ModelLoadService, add: Any, config: Any) -> None:
    """No config on the record: the published Wan 2.1 VAE (96 wide), which a tiny file's shapes do not fit."""
    save_file({k: v.contiguous() for k, v in _tiny_vae("wan-2.1").state_dict().items()},
              str(config.models_path / "small-vae.safetensors"))
    refusal = r"small-vae\.safetensors: not the AutoencoderKLWan of the published config: \d+ tensors of another shape"
    with pytest.raises(InvalidModelException, match=refusal) as info:
        service.get_model(add("small-vae.safetensors", "vae", "checkpoint", base="wan-2.1"))
    assert "96" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_wan_ai_umt5_file_loads(service: ModelLoadService, add: Any, config: Any, suffix: str) -> None:
    """Wan-AI's own ``models_t5_umt5-xxl-enc-bf16.pth`` names (``blocks.N.attn.q``, ``ffn.gate.0``...)."""
    import transformers

    from tests.fixtures.model_files import write_torch

    torch.manual_seed(6)
    umt5 = transformers.UMT5EncoderModel(transformers.UMT5Config(**T5_CFG)).eval()
    wan = {k: v.contiguous() for k, v in tf.to_wan_t5_names(umt5.state_dict()).items()}
    assert len(wan) == len(umt5.state_dict()) - 1  # every weight but the tied embed_tokens, under Wan-AI's name
    path = config.models_path / f"models_t5_umt5-enc{suffix}"
    save_file(wan, str(path)) if suffix == ".safetensors" else write_torch(path, wan)
    found = probe(path)
    assert (found.model_type, found.base_model) == ("t5_encoder", "wan-2.1")
    with service.get_model(add(path.name, "t5_encoder", "checkpoint", base="wan-2.1")) as model:
        assert isinstance(model, transformers.UMT5EncoderModel)
        _same(model, umt5.state_dict())
        ids = torch.tensor([[1, 2, 3, 4]])
        torch.testing.assert_close(model(ids).last_hidden_state, umt5(ids).last_hidden_state)
    save_file({**wan, "blocks.0.attn.extra.weight": torch.zeros(2)}, str(config.models_path / "odd.safetensors"))
    with pytest.raises(InvalidModelException, match=r"blocks\.0\.attn\.extra\.weight is no tensor of Wan-AI's UMT5"):
        service.get_model(add("odd.safetensors", "t5_encoder", "checkpoint", base="wan-2.1"))
