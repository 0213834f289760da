"""A CLIP text encoder alone in one file (comfyanonymous' clip_l.safetensors: ``text_model.*`` with its projection;
SD's ``transformer.text_model.*``) is a ``clip_embed`` model: identified by its tensors, recorded, and loaded through
the load service as transformers' CLIPTextModel (WithProjection when the file has it) from the shipped CLIP-L
config; a whole CLIP model (image tower too) stays a clip_vision file. A T5 encoder folder in InvokeAI's layout
(text_encoder_2/ beside tokenizer_2/) loads through the service too. Every loaded weight is compared with the one
written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelbus.services.load import InvalidModelException, ModelLoadService
from modelbus.services.probe import probe
from modelbus.services.records import CLIPEmbedCheckpointConfig
from modelbus.services.records.parsing import parse_config
from tests.fixtures import loadable
from tests.modeldata.companions import t5_tokenizer, write_clip_l_file, write_t5_folder


def _same(model: torch.nn.Module, want: dict[str, torch.Tensor]) -> None:
    got = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    want = {k.removeprefix("text_model."): v for k, v in want.items()}
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k].float(), v.half().float()), k


@pytest.mark.parametrize(("projection", "prefix"), [(True, ""), (False, "transformer.")], ids=["comfy", "sd"])
def test_a_clip_text_encoder_file_is_identified_recorded_and_loaded(
        service: ModelLoadService, add: Any, config: Any, projection: bool, prefix: str) -> None:
    path = config.models_path / "clip_l.safetensors"
    written = write_clip_l_file(path, projection=projection, prefix=prefix)
    found = probe(path)
    assert (found.model_type.value, found.model_format.value, found.base_model.value) == \
        ("clip_embed", "checkpoint", "any")
    assert found.notes == "CLIP text encoder of width 64"
    data = {"name": "clip_l", "model_type": "clip_embed", "model_format": "checkpoint", "base_model": "any",
            "path": path.name}
    assert type(parse_config(data, key="k")) is CLIPEmbedCheckpointConfig
    with service.get_model(add(path.name, "clip_embed", "checkpoint", base="any")) as model:
        assert type(model).__name__ == ("CLIPTextModelWithProjection" if projection else "CLIPTextModel")
        _same(model, written.state_dict())


@pytest.mark.parametrize(("width", "named"), [(768, "CLIP-L text encoder"), (1280, "CLIP-G text encoder"),
                                              (1024, "CLIP text encoder of width 1024")], ids=["L", "G", "other"])
def test_a_clip_text_encoder_is_named_by_its_width(tmp_path: Path, width: int, named: str) -> None:
    """768: OpenAI's ViT-L/14 text tower (FLUX.1's and SD-3's CLIP-L); 1280: OpenCLIP bigG's (SDXL's and SD-3's
    CLIP-G, as SD-3's clip_g.safetensors holds it); in either layout, with or without the projection."""
    for prefix, projection in (("", True), ("transformer.", False)):
        path = tmp_path / f"clip-{prefix or 'comfy'}.safetensors"
        write_clip_l_file(path, hidden=width, vocab=16, prefix=prefix, projection=projection)
        found = probe(path)
        assert (found.model_type.value, found.base_model.value, found.notes) == ("clip_embed", "any", named), prefix


def test_a_whole_clip_model_stays_clip_vision(tmp_path: Path) -> None:
    write_clip_l_file(tmp_path / "clip_l.safetensors", hidden=768, vocab=16)  # OpenAI's ViT-L/14 text width
    vision = tmp_path / "vision.safetensors"
    loadable.write_clip_vision(vision)
    both = {**load_file(str(vision)), **load_file(str(tmp_path / "clip_l.safetensors"))}
    save_file(both, str(tmp_path / "clip.safetensors"))
    assert probe(tmp_path / "clip.safetensors").model_type.value == "clip_vision"


def test_a_clip_embed_record_of_no_clip_text_encoder_is_refused(service: ModelLoadService, add: Any,
                                                                config: Any) -> None:
    loadable.write_t5_encoder(config.models_path / "t5.safetensors")
    with pytest.raises(InvalidModelException, match=r"t5\.safetensors: not a complete CLIP text encoder"):
        service.get_model(add("t5.safetensors", "clip_embed", "checkpoint", base="any"))


def test_a_t5_folder_in_invokeais_layout_loads(service: ModelLoadService, add: Any, config: Any) -> None:
    folder = config.models_path / "t5-v1_1-xxl_bfloat16"
    written = write_t5_folder(folder / "text_encoder_2", with_tokenizer=False)
    t5_tokenizer().save_pretrained(folder / "tokenizer_2")
    assert probe(folder).model_type.value == "t5_encoder"
    with service.get_model(add(folder.name, "t5_encoder", "t5_encoder", base="any")) as model:
        assert type(model).__name__ == "T5EncoderModel"
        got = model.state_dict()
        assert all(torch.equal(got[k].float(), v.float()) for k, v in written.state_dict().items())
