"""Importing a legacy InvokeAI models.yaml: readable entries become ModelAdded events, the rest are
reported with their reason; a second import adds nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelbus.events.store import InMemoryEventStore
from modelbus.services.config import AppConfig
from modelbus.services.hashing import model_key
from modelbus.services.records import (
    LoRALycorisConfig,
    MainCheckpointConfig,
    MainDiffusersConfig,
    ModelRecordServiceSQL,
    TextualInversionFileConfig,
)
from modelbus.services.records.legacy import LegacyImportError, import_legacy_yaml


def _models(root: Path) -> Path:
    models = root / "models"
    ckpt = models / "sd-1/main/tiny.safetensors"
    ckpt.parent.mkdir(parents=True)
    # real key names, tiny shapes
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(ckpt))
    lora = models / "sd-1/lora/tiny-lora.safetensors"
    lora.parent.mkdir(parents=True)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 4)}, str(lora))
    folder = models / "sd-1/main/tiny-diffusers"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(folder / "unet/diffusion_pytorch_model.safetensors"))
    return models


LEGACY = """
__metadata__:
  version: 3.0.0
sd-1/main/tiny:
  path: sd-1/main/tiny.safetensors
  description: a tiny checkpoint
  format: checkpoint
  variant: normal
  config: configs/stable-diffusion/v1-inference.yaml
  vae: sd-1/vae/some-vae.safetensors
sd-1/main/tiny-diffusers:
  path: sd-1/main/tiny-diffusers
  description: a tiny diffusers folder
  format: diffusers
  variant: normal
sd-1/lora/tiny-lora:
  path: sd-1/lora/tiny-lora.safetensors
sd-1/embedding/gone:
  path: /nowhere/gone.pt
  recommended: true
sd-9/main/bad-base:
  path: x.safetensors
sd-1/main/bad-variant:
  path: y.safetensors
  format: checkpoint
  variant: sideways
sd-1/main/bad-format:
  path: z
  format: lycoris
not-three-parts:
  path: q
sd-1/main/no-path:
  description: nothing else
"""


@pytest.fixture()
def service(root: Path, config: AppConfig) -> ModelRecordServiceSQL:
    return ModelRecordServiceSQL.from_db_file(root / "r.db", InMemoryEventStore(), config=config)


def test_import_legacy_models_yaml(root: Path, service: ModelRecordServiceSQL, tmp_path: Path) -> None:
    models = _models(root)
    legacy = tmp_path / "models.yaml"
    legacy.write_text(LEGACY)
    report = import_legacy_yaml(legacy, service)

    imported = dict(report.imported)
    assert set(imported) == {"sd-1/main/tiny", "sd-1/main/tiny-diffusers", "sd-1/lora/tiny-lora", "sd-1/embedding/gone"}
    # keys are the imohash of the files when they are there, random otherwise
    assert imported["sd-1/main/tiny"] == model_key(models / "sd-1/main/tiny.safetensors")
    assert imported["sd-1/main/tiny-diffusers"] == model_key(models / "sd-1/main/tiny-diffusers")
    assert len(imported["sd-1/embedding/gone"]) == 32

    tiny = service.get_model(imported["sd-1/main/tiny"])
    assert isinstance(tiny, MainCheckpointConfig)
    assert (tiny.name, tiny.description, tiny.vae) == ("tiny", "a tiny checkpoint", "sd-1/vae/some-vae.safetensors")
    assert tiny.config == "configs/stable-diffusion/v1-inference.yaml"
    assert isinstance(service.get_model(imported["sd-1/main/tiny-diffusers"]), MainDiffusersConfig)
    assert isinstance(service.get_model(imported["sd-1/lora/tiny-lora"]), LoRALycorisConfig)  # format guessed
    assert isinstance(service.get_model(imported["sd-1/embedding/gone"]), TextualInversionFileConfig)
    assert ("sd-1/embedding/gone", "field recommended=True dropped (not kept by TextualInversionFileConfig)") \
        in report.notes

    reasons = dict(report.skipped)
    assert set(reasons) == {"sd-9/main/bad-base", "sd-1/main/bad-variant", "sd-1/main/bad-format",
                            "not-three-parts", "sd-1/main/no-path"}
    assert "unknown base model 'sd-9'" in reasons["sd-9/main/bad-base"]
    assert "variant='sideways'" in reasons["sd-1/main/bad-variant"]
    assert "format 'lycoris' is not a format of model type 'main'" in reasons["sd-1/main/bad-format"]
    assert "base/type/name" in reasons["not-three-parts"]
    assert "no path" in reasons["sd-1/main/no-path"]
    assert not report.ok


def test_second_import_adds_nothing(root: Path, service: ModelRecordServiceSQL, tmp_path: Path) -> None:
    _models(root)
    legacy = tmp_path / "models.yaml"
    legacy.write_text(LEGACY)
    first = import_legacy_yaml(legacy, service)
    head = service.event_store.head()
    second = import_legacy_yaml(legacy, service)
    assert second.imported == [] and service.event_store.head() == head
    assert {e for e, r in second.skipped if r.startswith("already recorded")} == {e for e, _ in first.imported}


def test_unreadable_files_are_clear_errors(service: ModelRecordServiceSQL, tmp_path: Path) -> None:
    with pytest.raises(LegacyImportError, match="cannot read"):
        import_legacy_yaml(tmp_path / "absent.yaml", service)
    bad = tmp_path / "bad.yaml"
    bad.write_text("sd-1/main/x: [unclosed\n")
    with pytest.raises(LegacyImportError, match="malformed YAML"):
        import_legacy_yaml(bad, service)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(LegacyImportError, match="expected a mapping"):
        import_legacy_yaml(listed, service)
    assert service.event_store.head() == "0-0"
