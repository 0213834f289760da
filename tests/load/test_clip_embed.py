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
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from modelbus.events.errors import ModelbusError
from modelbus.services.load import InvalidModelException, ModelLoadService
from modelbus.services.probe import probe
from modelbus.services.records import CLIPEmbedCheckpointConfig, CLIPEmbedDiffusersConfig
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


def _clip_text(projection: bool, hidden: int = 64, seed: int = 31) -> CLIPTextModel | CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(**{**loadable.CLIP_CFG, "hidden_size": hidden, "projection_dim": hidden})
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


@pytest.mark.parametrize(("projection", "layout"), [(False, "alone"), (True, "alone"), (False, "invokeai")])
def test_a_clip_text_encoder_folder_is_identified_recorded_and_loaded(
        service: ModelLoadService, add: Any, config: Any, projection: bool, layout: str) -> None:
    """A transformers CLIPTextModel(WithProjection) folder (config.json naming the class), alone or in InvokeAI's
    layout (text_encoder/ beside tokenizer/, as its clip-vit-large-patch14 text encoder folders): clip_embed,
    format diffusers, named by its width, loaded as the class its config names, every weight as written."""
    folder = config.models_path / f"clip-text-{layout}-{projection}"
    written = _clip_text(projection)
    written.save_pretrained(folder / "text_encoder" if layout == "invokeai" else folder)
    if layout == "invokeai":
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "tokenizer_config.json").write_text("{}")
    found = probe(folder)
    assert (found.model_type.value, found.model_format.value, found.base_model.value, found.notes) == \
        ("clip_embed", "diffusers", "any", "CLIP text encoder of width 64")
    data = {"name": "clip", "model_type": "clip_embed", "model_format": "diffusers", "base_model": "any",
            "path": folder.name}
    assert type(parse_config(data, key="k")) is CLIPEmbedDiffusersConfig
    with service.get_model(add(folder.name, "clip_embed", "diffusers", base="any")) as model:
        assert type(model) is type(written)
        got, want = model.state_dict(), written.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k].float(), v.float()) for k, v in want.items())


def _config_alone(folder: Path, cls: str, hidden: int) -> None:
    """The config.json ``save_pretrained`` writes (identification reads it alone: no weights needed)."""
    config = CLIPTextConfig(**{**loadable.CLIP_CFG, "hidden_size": hidden, "projection_dim": hidden})
    config.architectures = [cls]
    config.save_pretrained(folder)


def test_a_clip_l_folder_is_named_and_a_folder_of_another_class_is_not_taken(tmp_path: Path) -> None:
    _config_alone(tmp_path / "clip-l", "CLIPTextModel", 768)
    assert probe(tmp_path / "clip-l").notes == "CLIP-L text encoder"
    _config_alone(tmp_path / "clip-g" / "text_encoder", "CLIPTextModelWithProjection", 1280)
    assert probe(tmp_path / "clip-g").notes == "CLIP-G text encoder"
    (tmp_path / "bert" / "text_encoder").mkdir(parents=True)
    (tmp_path / "bert" / "text_encoder" / "config.json").write_text('{"architectures": ["BertModel"]}')
    with pytest.raises(ModelbusError, match="no known model layout"):
        probe(tmp_path / "bert")
