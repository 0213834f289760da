"""The cache's size estimate of single files that hold more than the model loaded from them: a
ControlNet 1.0 file carries the whole SD model beside ``control_model.*``, a FLUX file may bundle a
VAE and text encoders with its transformer; only the tensors the load keeps count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelbus.services.load import checkpoints
from modelbus.services.load.estimate import estimate_bytes
from modelbus.services.load.kit import LoadRequest
from modelbus.services.load.safetensors_fast import read_header
from modelbus.services.load.tensors import object_nbytes
from modelbus.services.records.enums import SubModelType
from tests.fixtures import loadable as builders
from tests.fixtures import transformer_files as probe


def _estimate(store: Any, key: str, path: Path, dtype: torch.dtype) -> int:
    return estimate_bytes(LoadRequest(store.get_model(key), path, None, torch.device("cpu"), dtype))


def _model_bytes(model: Any, dtype: torch.dtype) -> int:
    return sum(t.numel() * dtype.itemsize for t in model.state_dict().values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_controlnet_with_a_whole_sd_model_counts_the_controlnet_only(config: Any, add: Any, store: Any,
                                                                      dtype: torch.dtype) -> None:
    models = config.models_path
    ref = builders.write_controlnet(models / "cn.safetensors", builders.CONTROLNET_CFG, True)
    builders.write_sd1_checkpoint(models / "sd.safetensors", dtype=torch.float32)
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


# FLUX transformers come in BFL's layout or diffusers', with a prefix or none, alone or bundled
# with the parts that are models of their own (a VAE, text encoders): the estimate counts the
# transformer's tensors, which is what the load keeps
_FLUX_OTHERS = {"vae.decoder.conv_in.weight": (64, 16, 3, 3), "text_encoders.t5xxl.transformer.shared.weight": (256, 64),
                "text_encoder.text_model.embeddings.token_embedding.weight": (256, 64)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("layout", "prefix", "bundled"), [
    ("diffusers", "", False), ("diffusers", "transformer.", False), ("diffusers", "transformer.", True),
    ("bfl", "", False), ("bfl", "model.diffusion_model.", False), ("bfl", "model.diffusion_model.", True)])
def test_flux_transformer_counts_the_transformer(config: Any, add: Any, store: Any, layout: str, prefix: str,
                                                 bundled: bool, dtype: torch.dtype) -> None:
    state = probe.flux_transformer_state()
    stored = builders.flux_to_bfl(state, prefix) if layout == "bfl" else {prefix + k: v for k, v in state.items()}
    if bundled:
        torch.manual_seed(0)
        stored |= {k: torch.randn(shape) for k, shape in _FLUX_OTHERS.items()}
    probe.write_state(config.models_path / "flux.safetensors", stored)
    record = store.get_model(add("flux.safetensors", "main", "checkpoint", base="flux", config="flux-dev"))
    request = LoadRequest(record, config.models_path / "flux.safetensors", SubModelType.UNet, torch.device("cpu"), dtype)
    estimate = estimate_bytes(request)
    assert estimate == sum(t.numel() for t in state.values()) * dtype.itemsize > 0
    assert estimate == object_nbytes(checkpoints.load_main_checkpoint(request).model)
    vae = LoadRequest(record, request.location, SubModelType.Vae, torch.device("cpu"), dtype)
    assert estimate_bytes(vae) == 0  # a FLUX file has no other submodel: the load refuses it

