"""Transformers of the 2025-2026 families load offline through the load service: diffusers folders
(their own configs) and single files (the record's config: a shipped name or a config path), in the
diffusers layout, ComfyUI's prefixed one and, through diffusers' conversion, the original one. Tiny
real models: every loaded weight is compared with the one written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from modelbus.services.load import InvalidModelException, ModelLoadService
from modelbus.services.load.dit import transformer_config
from modelbus.services.load.kit import LoadRequest
from modelbus.services.probe import probe
from modelbus.services.records.enums import SubModelType
from tests.fixtures import transformer_files as tf

TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "wan-2.1": ("WanTransformer3DModel", {"patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 8,
                "in_channels": 4, "out_channels": 4, "text_dim": 16, "freq_dim": 16, "ffn_dim": 32, "num_layers": 1,
                "rope_max_seq_len": 32}),
    "qwen-image": ("QwenImageTransformer2DModel", {"patch_size": 2, "in_channels": 16, "out_channels": 4,
                   "num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 16,
                   "axes_dims_rope": [2, 2, 4]}),
    "qwen-image-2.1": ("QwenImage21Transformer2DModel", {"patch_size": 1, "in_channels": 16, "out_channels": 16,
                       "num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2, "context_in_dim": 16,
                       "axes_dims_rope": [2, 2, 4]}),
    "z-image": ("ZImageTransformer2DModel", {"all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 4,
                "dim": 32, "n_layers": 1, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "cap_feat_dim": 16,
                "axes_dims": [4, 6, 6], "axes_lens": [32, 32, 32]}),
}  # fmt: skip


def _tiny(base: str) -> torch.nn.Module:
    import diffusers

    cls, config = TINY[base]
    torch.manual_seed(0)
    return getattr(diffusers, cls)(**config)  # type: ignore[no-any-return]


def _fp16(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().half().float() for k, v in model.state_dict().items()}


def _same(model: Any, want: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def _fuse_gate_up(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's Qwen-Image 2.1 layout: SwiGLU gate and up projections in one ``gate_up`` (gate first)."""
    out = dict(state)
    for k in [k for k in state if k.endswith("img_mlp.gate_layer.weight")]:
        out[k.replace("gate_layer", "gate_up")] = torch.cat([out.pop(k), out.pop(k.replace("gate_layer", "proj"))])
    return out


Layout = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
CASES: dict[str, tuple[str, str, Layout]] = {
    "wan-diffusers": ("wan-2.1", "", dict),
    "wan-comfy-prefix": ("wan-2.1", "model.diffusion_model.", dict),
    "qwen-image-comfy": ("qwen-image", "model.diffusion_model.", dict),
    "qwen-image-transformer-prefix": ("qwen-image", "transformer.", dict),
    "qwen-image-2.1-comfy-fused": ("qwen-image-2.1", "model.diffusion_model.", _fuse_gate_up),
    "z-image-diffusers": ("z-image", "", dict),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_single_file_transformer(service: ModelLoadService, config: Any, add: Any, case: str) -> None:
    base, prefix, layout = CASES[case]
    model = _tiny(base)
    folder = config.models_path / f"{case}-config"
    model.save_config(folder)  # type: ignore[attr-defined]
    tf.write_state(config.models_path / f"{case}.safetensors", layout(dict(model.state_dict())), prefix)
    key = add(f"{case}.safetensors", "main", "checkpoint", base=base, config=str(folder))
    with service.get_model(key, SubModelType.Transformer) as loaded:
        assert type(loaded).__name__ == TINY[base][0]
        _same(loaded, _fp16(model))
    with pytest.raises(InvalidModelException, match="holds only the transformer"):
        service.get_model(key, SubModelType.Vae)


def test_config_errors_name_the_problem(service: ModelLoadService, config: Any, add: Any) -> None:
    model = _tiny("wan-2.1")
    for name in ("wan.safetensors", "wan2.safetensors", "wan3.safetensors"):  # one record per path
        tf.write_state(config.models_path / name, dict(model.state_dict()))
    no_config = add("wan.safetensors", "main", "checkpoint", base="wan-2.1")
    with pytest.raises(InvalidModelException, match="needs a config"):
        service.get_model(no_config, SubModelType.Transformer)
    bad = add("wan2.safetensors", "main", "checkpoint", base="wan-2.1", config="wan-9.9")
    with pytest.raises(InvalidModelException, match="neither a shipped config.*wan-2.1-t2v-14b"):
        service.get_model(bad, SubModelType.Transformer)
    (config.models_path / "qwen-config").mkdir()
    _tiny("qwen-image").save_config(config.models_path / "qwen-config")  # type: ignore[attr-defined]
    wrong = add("wan3.safetensors", "main", "checkpoint", base="wan-2.1", config=str(config.models_path / "qwen-config"))
    with pytest.raises(InvalidModelException, match="QwenImageTransformer2DModel file lacks"):
        service.get_model(wrong, SubModelType.Transformer)


def test_shipped_configs_are_the_ones_identification_records(tmp_path: Path) -> None:
    """Every config_path the dit rules record resolves to a shipped config the loader builds."""
    from tests.probe.test_identify_dit import LAYOUTS

    class Rec:
        def __init__(self, name: str) -> None:
            self.config, self.base_model = name, "wan-2.1"

    names = {e["config_path"] for _, e in LAYOUTS.values() if e.get("config_path") and
             not str(e["config_path"]).startswith("flux-")}  # FLUX.1's are flux.py's flavours
    for name in sorted(names):
        req = LoadRequest(Rec(name), tmp_path / "x.safetensors", SubModelType.Transformer, torch.device("cpu"),
                          torch.float32)
        assert transformer_config(req)["_class_name"].endswith("Model"), name


def _pipeline(path: Path, base: str, cls: str) -> Path:
    model = _tiny(base)
    model.save_pretrained(path / "transformer")  # type: ignore[attr-defined]
    index = {"_class_name": cls, "transformer": ["diffusers", TINY[base][0]]}
    (path / "model_index.json").write_text(json.dumps(index))
    return path


@pytest.mark.parametrize(("base", "cls"), [("wan-2.1", "WanPipeline"), ("qwen-image", "QwenImagePipeline"),
                                           ("z-image", "ZImagePipeline")])
def test_diffusers_folder_transformer(service: ModelLoadService, config: Any, add: Any, base: str, cls: str) -> None:
    path = _pipeline(config.models_path / f"{base}-pipe", base, cls)
    key = add(path.name, "main", "diffusers", base=base)
    with service.get_model(key, SubModelType.Transformer) as loaded:
        assert type(loaded).__name__ == TINY[base][0]
        want = {k: v.detach().float() for k, v in _tiny(base).state_dict().items()}
        got = loaded.state_dict()
        assert got.keys() == want.keys() and all(torch.allclose(got[k].float(), want[k]) for k in want)


def test_tiny_folder_of_a_known_class_but_unpublished_size_is_refused_clearly(config: Any) -> None:
    path = _pipeline(config.models_path / "wan-tiny", "wan-2.1", "WanPipeline")
    with pytest.raises(Exception, match="width 16 and 4 input channels, which matches no published Wan"):
        probe(path)
