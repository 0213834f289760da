"""LoRAs of FLUX.2, Qwen-Image, Wan and Chroma load through the load service in the names of the diffusers
transformer it loads for their base (PEFT's ``transformer.<module>.lora_A/B.weight``), from each trainer's
layout. Tiny real models: every converted pair names a Linear of the model at its widths, and the update it
makes (``B @ A``, kohya's alpha folded in) is the one the file's layout describes (BFL's fused ``qkv`` split
into its three projections)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from modelbus.services.load import InvalidModelException, ModelLoadService
from tests.fixtures import dit_loras as dl

RANK = 2
TINY: dict[str, dict[str, Any]] = {
    "flux2": {"_class_name": "Flux2Transformer2DModel", "patch_size": 1, "in_channels": 8, "num_layers": 2,
              "num_single_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 16,
              "timestep_guidance_channels": 16, "mlp_ratio": 3.0, "axes_dims_rope": [2, 2, 2, 2]},
    "qwen-image": {"_class_name": "QwenImageTransformer2DModel", "patch_size": 2, "in_channels": 16,
                   "out_channels": 4, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
                   "joint_attention_dim": 16, "axes_dims_rope": [2, 2, 4]},
    "qwen-image-2.1": {"_class_name": "QwenImage21Transformer2DModel", "patch_size": 1, "in_channels": 16,
                       "out_channels": 16, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
                       "context_in_dim": 16, "axes_dims_rope": [2, 2, 4]},
    "wan-2.1": {"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 2,
                "attention_head_dim": 8, "in_channels": 4, "out_channels": 4, "text_dim": 16, "freq_dim": 16,
                "ffn_dim": 32, "num_layers": 2, "rope_max_seq_len": 32, "image_dim": 16},
    "chroma": {"_class_name": "ChromaTransformer2DModel", "patch_size": 1, "in_channels": 8, "num_layers": 1,
               "num_single_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 16,
               "axes_dims_rope": [2, 2, 4], "approximator_num_channels": 8, "approximator_hidden_dim": 16,
               "approximator_layers": 1},
    "z-image": {"_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1],
                "in_channels": 4, "dim": 32, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2,
                "cap_feat_dim": 16, "axes_dims": [4, 6, 6], "axes_lens": [32, 32, 32]},
    "lumina-2": {"_class_name": "Lumina2Transformer2DModel", "sample_size": 8, "patch_size": 2, "in_channels": 4,
                 "hidden_size": 32, "num_layers": 1, "num_refiner_layers": 1, "num_attention_heads": 2, "num_kv_heads": 1,
                 "multiple_of": 16, "axes_dim_rope": [4, 6, 6], "axes_lens": [32, 32, 32], "cap_feat_dim": 16},
    "ltx-video": {"_class_name": "LTXVideoTransformer3DModel", "in_channels": 8, "out_channels": 8,
                  "num_attention_heads": 2, "attention_head_dim": 8, "cross_attention_dim": 16, "num_layers": 2,
                  "caption_channels": 16},
    "ltx-2": {"_class_name": "LTX2VideoTransformer3DModel", "in_channels": 8, "out_channels": 8,
              "num_attention_heads": 2, "attention_head_dim": 8, "cross_attention_dim": 16, "audio_in_channels": 8,
              "audio_out_channels": 8, "audio_num_attention_heads": 2, "audio_attention_head_dim": 4,
              "audio_cross_attention_dim": 8, "num_layers": 2, "caption_channels": 16},
    "hidream": {"_class_name": "HiDreamImageTransformer2DModel", "patch_size": 2, "in_channels": 4, "num_layers": 1,
                "num_single_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2, "caption_channels": [16, 8],
                "text_emb_dim": 8, "num_routed_experts": 2, "num_activated_experts": 1, "axes_dims_rope": [4, 4],
                "llama_layers": [0, 1]},
    "sana": {"_class_name": "SanaTransformer2DModel", "in_channels": 4, "out_channels": 4, "num_attention_heads": 2,
             "attention_head_dim": 8, "num_layers": 2, "num_cross_attention_heads": 2, "cross_attention_head_dim": 8,
             "cross_attention_dim": 16, "caption_channels": 16, "sample_size": 8},
}  # fmt: skip
_FAMILY = {"flux2": "flux2", "wan-2.1": "wan"}  # bases whose trainers also write the original names


def _write(root: Path, base: str, layout: dl.Layout, original: bool, alpha: float) -> tuple[str, dict[str, Any]]:
    """The LoRA file, and the update each diffusers module gets from it (B @ A, scaled, per module)."""
    layers = dl.linear_layers(TINY[base])
    names = dl.original_names(_FAMILY[base], layers) if original else {m: (m, -1) for m in layers}
    widths = dl.original_widths(_FAMILY[base], layers) if original else layers
    tensors = dl.lora_tensors(widths, layout, rank=RANK, alpha=alpha)
    scale = alpha / RANK if layout == "kohya" else 1.0
    expected: dict[str, torch.Tensor] = {}
    down, up = (".lora_down.weight", ".lora_up.weight") if layout == "kohya" else (".lora_A.weight", ".lora_B.weight")
    for module, (orig, third) in names.items():
        stem = {"peft": "transformer.", "aitk": "diffusion_model."}[layout] + orig if layout != "kohya" else (
            "lora_unet_" + orig.replace(".", "_"))
        b = tensors[stem + up]
        if third >= 0:
            b = b.chunk(3, dim=0)[third]
        expected[module] = scale * (b @ tensors[stem + down])
    name = f"{base}-{layout}{'-original' if original else ''}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / name))
    return name, expected


CASES = [
    ("flux2", "peft", False), ("flux2", "aitk", True), ("flux2", "kohya", True),
    ("qwen-image", "peft", False), ("qwen-image", "aitk", False), ("qwen-image", "kohya", False),
    ("qwen-image-2.1", "peft", False), ("qwen-image-2.1", "aitk", False), ("qwen-image-2.1", "kohya", False),
    ("wan-2.1", "peft", False), ("wan-2.1", "aitk", True), ("wan-2.1", "kohya", True),
    ("chroma", "peft", False), ("z-image", "peft", False), ("z-image", "aitk", False), ("z-image", "kohya", False),
    ("lumina-2", "peft", False), ("ltx-video", "peft", False), ("ltx-video", "aitk", False), ("ltx-2", "peft", False),
    ("ltx-2", "aitk", False), ("hidream", "peft", False), ("hidream", "aitk", False), ("sana", "peft", False),
]  # fmt: skip


@pytest.mark.parametrize(("base", "layout", "original"), CASES)
def test_lora_loads_in_the_transformers_names(service: ModelLoadService, add: Any, config: Any, base: str,
                                              layout: dl.Layout, original: bool) -> None:
    import diffusers

    name, expected = _write(config.models_path, base, layout, original, alpha=1.0)
    with service.get_model(add(name, "lora", "lycoris", base=base)) as state:
        loaded = dict(state)
    model_config = dict(TINY[base])
    with torch.device("meta"):
        model = getattr(diffusers, model_config.pop("_class_name"))(**model_config)
    modules = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}
    for key, a in loaded.items():
        assert key.startswith("transformer.") and key.endswith((".lora_A.weight", ".lora_B.weight")), key
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        linear = modules.get(module)
        assert isinstance(linear, torch.nn.Linear), f"{key}: no Linear {module} in {type(model).__name__}"
        b = loaded[key.replace(".lora_A.", ".lora_B.")]
        assert a.shape[1] == linear.in_features and b.shape[0] == linear.out_features, key
        got[module] = b.float() @ a.float()
    assert expected and got.keys() == expected.keys()
    for module, delta in expected.items():
        torch.testing.assert_close(got[module], delta, rtol=1e-3, atol=1e-4, msg=module)


def test_kohya_alpha_is_folded_in(service: ModelLoadService, add: Any, config: Any) -> None:
    name, expected = _write(config.models_path, "wan-2.1", "kohya", True, alpha=0.5)
    with service.get_model(add(name, "lora", "lycoris", base="wan-2.1")) as state:
        key = next(k for k in state if k.endswith(".lora_A.weight"))
        module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        delta = state[key.replace(".lora_A.", ".lora_B.")].float() @ state[key].float()
    torch.testing.assert_close(delta, expected[module], rtol=1e-3, atol=1e-4)


def test_lora_of_another_family_is_refused_naming_it(service: ModelLoadService, add: Any, config: Any) -> None:
    """A Wan LoRA recorded as FLUX.2's: diffusers' FLUX.2 conversion cannot place its layers."""
    name, _ = _write(config.models_path, "wan-2.1", "aitk", True, alpha=1.0)
    with pytest.raises(InvalidModelException, match=r"wan-2\.1-aitk-original\.safetensors: a flux2 LoRA whose layers"):
        service.get_model(add(name, "lora", "lycoris", base="flux2"))


def test_flux2_lokr_loads_on_the_transformers_modules(service: ModelLoadService, add: Any, config: Any) -> None:
    """LyCORIS LoKr (``lycoris_<module>.lokr_w1``...), which diffusers converts for FLUX.2: kron(w1, w2_a @ w2_b)
    has the shape of the module's weight."""
    import diffusers

    layers = dl.linear_layers(TINY["flux2"])
    save_file({k: v.contiguous() for k, v in dl.lora_tensors(layers, "lokr", rank=RANK).items()},
              str(config.models_path / "klein-lokr.safetensors"))
    with service.get_model(add("klein-lokr.safetensors", "lora", "lycoris", base="flux2")) as state:
        loaded = dict(state)
    model_config = dict(TINY["flux2"])
    with torch.device("meta"):
        modules = dict(getattr(diffusers, model_config.pop("_class_name"))(**model_config).named_modules())
    stems = {k.removeprefix("transformer.").removesuffix(".lokr_w1") for k in loaded if k.endswith(".lokr_w1")}
    assert stems == set(layers)
    for stem in stems:
        w1 = loaded[f"transformer.{stem}.lokr_w1"]
        w2 = loaded[f"transformer.{stem}.lokr_w2_a"] @ loaded[f"transformer.{stem}.lokr_w2_b"]
        assert torch.kron(w1, w2).shape == modules[stem].weight.shape, stem


def test_lokr_of_a_family_diffusers_does_not_convert_is_refused(service: ModelLoadService, add: Any,
                                                                config: Any) -> None:
    layers = dl.original_widths("wan", dl.linear_layers(TINY["wan-2.1"]))
    save_file({k: v.contiguous() for k, v in dl.lora_tensors(layers, "lokr", rank=RANK).items()},
              str(config.models_path / "wan-lokr.safetensors"))
    with pytest.raises(InvalidModelException, match=r"wan-lokr\.safetensors: a wan-2\.1 LoRA in a layout diffusers "
                                                     r"does not convert for this family \(\d+ tensors name no "
                                                     r"module of its transformer, e\.g\. "):
        service.get_model(add("wan-lokr.safetensors", "lora", "lycoris", base="wan-2.1"))


@pytest.mark.parametrize("base", ["ltx-video", "hidream"])
def test_kohya_layout_of_a_family_diffusers_converts_from_its_trainers_only_is_refused(
        service: ModelLoadService, add: Any, config: Any, base: str) -> None:
    """LTX's and HiDream's trainers write diffusers' names (under ``diffusion_model.``); diffusers converts those
    and not kohya's ``lora_unet_`` names, so such a file is refused naming a tensor rather than passed through."""
    name, _ = _write(config.models_path, base, "kohya", False, alpha=1.0)
    with pytest.raises(InvalidModelException, match=rf"a {base} LoRA in a layout diffusers does not convert.*lora_unet_"):
        service.get_model(add(name, "lora", "lycoris", base=base))
