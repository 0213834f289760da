"""The cache's size estimate of a single-file ControlNet: a ControlNet 1.0 file carries the whole SD
model beside ``control_model.*``, and only the ControlNet's tensors are loaded, so only they count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.load import checkpoints
from services.load.estimate import estimate_bytes
from services.load.loaders import LoadRequest
from services.load.safetensors_fast import read_header
from tests.load import builders


def _estimate(store: Any, key: str, path: Path, dtype: torch.dtype) -> int:
    return estimate_bytes(LoadRequest(store.get_model(key), path, None, torch.device("cpu"), dtype))


def _model_bytes(model: Any, dtype: torch.dtype) -> int:
    return sum(t.numel() * dtype.itemsize for t in model.state_dict().values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_controlnet_with_a_whole_sd_model_counts_the_controlnet_only(config: Any, add: Any, store: Any,
                                                                      dtype: torch.dtype) -> None:
    models = config.models_path
    ref = builders.write_controlnet(models / "cn.safetensors", builders.CONTROLNET_CFG, True)
    builders.write_checkpoint(models / "sd.safetensors", dtype=torch.float32)
    save_file(load_file(str(models / "sd.safetensors")) | load_file(str(models / "cn.safetensors")),
              str(models / "full.safetensors"))
    yaml_path = builders.write_original_yaml(config.root / "tiny.yaml")
    key = add("full.safetensors", "controlnet", "checkpoint", config=str(yaml_path))
    estimate = _estimate(store, key, models / "full.safetensors", dtype)
    assert estimate == _model_bytes(ref, dtype)
    whole = sum(e.nbytes for e in read_header(models / "full.safetensors").entries.values())
    assert whole > 2 * estimate  # what was counted before: the SD model too
    # and what the load reads is what was estimated
    request = LoadRequest(store.get_model(key), models / "full.safetensors", None, torch.device("cpu"), dtype)
    loaded = checkpoints.load_controlnet_checkpoint(request)
    assert _model_bytes(loaded.model, dtype) == estimate


def test_controlnet_in_diffusers_names_counts_the_whole_file(config: Any, add: Any, store: Any) -> None:
    ref = builders.write_controlnet(config.models_path / "cn.safetensors", builders.CONTROLNET_CFG, False)
    key = add("cn.safetensors", "controlnet", "checkpoint")
    assert _estimate(store, key, config.models_path / "cn.safetensors", torch.float32) == _model_bytes(
        ref, torch.float32)
