"""SigLIP image encoders and LLaVA-style vision-language models saved by transformers (tiny configs,
random weights) are identified by their folders' configs and load through the load service as the classes
their configs name, with the weights they were saved with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, SiglipVisionConfig

from modelbus.services.load import ModelLoadService
from modelbus.services.probe import probe


def _siglip() -> torch.nn.Module:
    return transformers.SiglipVisionModel(SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8))


def _llava() -> torch.nn.Module:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=128)
    return transformers.LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                                  image_token_index=100))


@pytest.mark.parametrize(("build", "model_type"), [(_siglip, "siglip"), (_llava, "llava_onevision")])
def test_vision_folder_loads(service: ModelLoadService, config: Any, add: Any, build: Any, model_type: str) -> None:
    torch.manual_seed(0)
    saved = build().eval()
    folder: Path = config.models_path / model_type
    saved.save_pretrained(folder)
    found = probe(folder)
    assert (found.model_type, found.model_format) == (model_type, "diffusers")
    key = add(folder.name, model_type, "diffusers", base="any")
    with service.get_model(key) as model:
        assert type(model) is type(saved)
        got, want = model.state_dict(), saved.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
