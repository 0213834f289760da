"""The language-model text encoders load from single files through the load service: Qwen3 (Z-Image, FLUX.2
Klein), Mistral Small 3.x (FLUX.2 dev) and Qwen2.5-VL (Qwen-Image), built from the record's config (a shipped
name, or a config path for the tiny real models here) in the layouts the files come in. Every loaded weight
is the one written, and the loaded encoder's hidden states are those of the model that wrote the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import save_file

from modelbus.services.load import InvalidModelException, ModelLoadService

QWEN3 = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64}
MISTRAL3 = {"text_config": {"model_type": "mistral", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                            "tie_word_embeddings": False},
            "vision_config": {"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "head_dim": 8, "image_size": 28, "patch_size": 14},
            "tie_word_embeddings": False}
QWEN25_VL = {"text_config": {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 2,
                             "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
             "vision_config": {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                               "out_hidden_size": 32, "fullatt_block_indexes": [0]}}  # fmt: skip


def _tiny(cls: str, model_type: str, config: dict[str, Any], folder: Path, tie: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = {"tie_word_embeddings": tie, **config}
    built = transformers.AutoConfig.for_model(model_type, **config)
    model = getattr(transformers, cls)(built).eval()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": [cls], "model_type": model_type, **config}))
    return model  # type: ignore[no-any-return]


def _write(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))
    return path


def _hidden(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-2]  # type: ignore[no-any-return]


IDS = torch.tensor([[1, 5, 9, 33, 2]])


@pytest.mark.parametrize("head", ["tied", "untied", "none"])
def test_qwen3_single_file(service: ModelLoadService, config: Any, add: Any, head: str) -> None:
    folder = config.models_path / f"qwen3-{head}-config"
    model = _tiny("Qwen3ForCausalLM", "qwen3", QWEN3, folder, tie=head == "tied")
    state = {k: v for k, v in model.state_dict().items() if not (head != "untied" and k == "lm_head.weight")}
    _write(config.models_path / f"qwen3-{head}.safetensors", state)
    key = add(f"qwen3-{head}.safetensors", "qwen3_encoder", "checkpoint", base="z-image", config=str(folder))
    with service.get_model(key) as loaded:
        # no head in the file (and none tied to the embeddings): the base model, which encodes the same
        assert type(loaded).__name__ == ("Qwen3Model" if head == "none" else "Qwen3ForCausalLM")
        got = loaded.state_dict()
        for k, v in state.items():
            assert torch.equal(got[k.removeprefix("model.") if head == "none" else k], v), k
        torch.testing.assert_close(_hidden(loaded, IDS), _hidden(model, IDS), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["comfyui-text-only", "transformers5", "transformers4"])
def test_mistral_single_file(service: ModelLoadService, config: Any, add: Any, layout: str) -> None:
    folder = config.models_path / f"mistral-{layout}-config"
    model = _tiny("Mistral3ForConditionalGeneration", "mistral3", MISTRAL3, folder)
    state = dict(model.state_dict())
    if layout == "comfyui-text-only":
        state = {k.replace("model.language_model.", "model."): v for k, v in state.items()
                 if k.startswith("model.language_model.")}
    elif layout == "transformers4":
        state = {k.replace("model.language_model.", "language_model.model.").replace("lm_head.", "language_model.lm_head.")
                 .replace("model.vision_tower.", "vision_tower.")
                 .replace("model.multi_modal_projector.", "multi_modal_projector."): v for k, v in state.items()}  # fmt: skip
    _write(config.models_path / f"mistral-{layout}.safetensors", state)
    key = add(f"mistral-{layout}.safetensors", "mistral_encoder", "checkpoint", base="flux2", config=str(folder))
    with service.get_model(key) as loaded:
        want = "MistralModel" if layout == "comfyui-text-only" else "Mistral3ForConditionalGeneration"
        assert type(loaded).__name__ == want
        assert sum(p.numel() for p in loaded.parameters()) == sum(v.numel() for v in state.values())
        torch.testing.assert_close(_hidden(loaded, IDS), _hidden(model, IDS), rtol=0, atol=0)


def test_qwen25_vl_single_file_in_comfyui_names(service: ModelLoadService, config: Any, add: Any) -> None:
    """ComfyUI's qwen_2.5_vl_7b.safetensors: transformers 4's names (``visual.``, ``model.layers``), no head."""
    folder = config.models_path / "qwen-vl-config"
    model = _tiny("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl", QWEN25_VL, folder)
    state = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
             for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    _write(config.models_path / "qwen_2.5_vl.safetensors", state)
    key = add("qwen_2.5_vl.safetensors", "qwen2_5_vl", "checkpoint", base="qwen-image", config=str(folder))
    with service.get_model(key) as loaded:
        assert type(loaded).__name__ == "Qwen2_5_VLModel"
        torch.testing.assert_close(_hidden(loaded, IDS), _hidden(model, IDS), rtol=0, atol=0)


def test_config_errors_name_the_problem(service: ModelLoadService, config: Any, add: Any) -> None:
    folder = config.models_path / "q-config"
    model = _tiny("Qwen3ForCausalLM", "qwen3", QWEN3, folder)
    for name in ("a.safetensors", "b.safetensors", "c.safetensors"):
        _write(config.models_path / name, dict(model.state_dict()))
    shipped = add("a.safetensors", "qwen3_encoder", "checkpoint", base="z-image", config="qwen3-4b")
    with pytest.raises(InvalidModelException, match="weights missing for Qwen3ForCausalLM|size mismatch"):
        service.get_model(shipped)  # the shipped Qwen3-4B config does not fit a 32-wide file
    unknown = add("b.safetensors", "qwen3_encoder", "checkpoint", base="z-image")
    with pytest.raises(InvalidModelException, match="32 wide needs a config.*qwen3-4b"):
        service.get_model(unknown)
    wrong = add("c.safetensors", "mistral_encoder", "checkpoint", base="flux2", config=str(folder))
    with pytest.raises(InvalidModelException, match="config of a Qwen3ForCausalLM, not a mistral_encoder"):
        service.get_model(wrong)
