"""`modelbus convert` of fp8 single files of SD-1, SD-2, SDXL, SD-3 and SD-3.5 (FLUX's are in test_convert): a plain
e4m3fn file becomes a bf16 diffusers folder holding the file's values exactly (each upcast once), a ComfyUI
fp8_scaled one has its scales folded into the denoiser's weights and carries no scale or marker tensor."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from modelbus.services.client import ModelBusClient
from tests.fixtures import loadable
from tests.install.conftest import Bus
from tests.modeldata.companions import install_companions, run_cli, wait_for_hash_worker

TIMEOUT = "600"
SCALE = 0.037  # one scale for every scaled weight: what the folder holds is then known per tensor
DENOISER = ("model.diffusion_model.",)

#: base -> (write the float32 checkpoint, write its inference YAML, the parts and their classes)
Writer = Callable[[Path], dict[str, torch.nn.Module]]
CASES: dict[str, tuple[Writer, Callable[[Path], Path], dict[str, type]]] = {
    "sd-1": (lambda p: loadable.write_sd1_checkpoint(p, dtype=torch.float32), loadable.write_original_yaml,
             {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}),
    "sd-2": (lambda p: loadable.write_sd2_checkpoint(p, dtype=torch.float32), loadable.write_sd2_yaml,
             {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}),
    "sdxl": (lambda p: loadable.write_sdxl_checkpoint(p, dtype=torch.float32), loadable.write_sdxl_yaml,
             {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
              "text_encoder_2": CLIPTextModelWithProjection}),
}


@pytest.fixture(autouse=True)
def _hash_worker_up(bus: Bus) -> None:
    wait_for_hash_worker(bus)


_cli = run_cli


def as_fp8_file(tensors: dict[str, torch.Tensor], scaled_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """As ComfyUI ships fp8 files: matrices in float8_e4m3fn, vectors (norms, biases) in bf16. ``scaled_prefixes``:
    the weights under them are stored as ``weight / SCALE`` with a ``scale_weight`` beside each, and the file
    gets the ``scaled_fp8`` marker (ComfyUI's fp8_scaled)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not value.is_floating_point():
            out[key] = value
        elif value.dim() < 2:
            out[key] = value.to(torch.bfloat16)
        elif key.startswith(scaled_prefixes) and key.endswith(".weight"):
            out[key] = (value.float() / SCALE).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + "scale_weight"] = torch.tensor([SCALE], dtype=torch.float32)
        else:
            out[key] = value.to(torch.float8_e4m3fn)
    if scaled_prefixes:
        out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    return {k: v.contiguous() for k, v in out.items()}


def expected_weights(model: torch.nn.Module, scaled: bool) -> dict[str, torch.Tensor]:
    """What the folder must hold of a part whose weights the file stored as :func:`as_fp8_file` does: renaming,
    slicing and transposing (what a conversion does to names) commute with these elementwise roundings."""
    out = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            out[key] = value
        elif value.dim() < 2:
            out[key] = value.to(torch.bfloat16)
        elif scaled and key.endswith(".weight"):  # folded in bf16, as the loader folds: fp8 upcast, times the scale
            out[key] = (value.float() / SCALE).to(torch.float8_e4m3fn).to(torch.bfloat16) \
                * torch.tensor(SCALE).to(torch.bfloat16)
        else:
            out[key] = value.to(torch.float8_e4m3fn).to(torch.bfloat16)
    return out


def same(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> list[str]:
    """The tensors of ``model`` that are not ``expected``'s, bit for bit."""
    got = model.state_dict()
    assert set(got) == set(expected)
    return [k for k, v in got.items() if not torch.equal(v, expected[k])]


def folder_tensor_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for file in folder.rglob("*.safetensors"):
        with safe_open(file, "pt") as weights:
            held = list(weights.keys())  # (a safetensors file is not iterable)
            names |= set(held)
            assert {weights.get_slice(k).get_dtype() for k in held} <= {"BF16", "I64"}, file
    return names


@pytest.mark.parametrize("scaled", [False, True], ids=["e4m3fn", "fp8_scaled"])
@pytest.mark.parametrize("base", sorted(CASES))
def test_convert_an_fp8_checkpoint(bus: Bus, base: str, scaled: bool) -> None:
    write, write_yaml, parts = CASES[base]
    key = f"fp8-{base}-{'scaled' if scaled else 'plain'}"
    models_dir = bus.config.models_path
    models_dir.mkdir(parents=True, exist_ok=True)
    file = models_dir / f"{key}.safetensors"
    models = write(file)
    save_file(as_fp8_file(load_file(str(file)), DENOISER if scaled else ()), str(file))
    yaml_path = write_yaml(bus.root / f"{key}.yaml")
    with ModelBusClient(bus.config) as client:
        client.add_model(key, {"name": key, "model_type": "main", "model_format": "checkpoint", "base_model": base,
                               "path": file.name, "config": str(yaml_path)})
    done = json.loads(_cli("convert", key, "--json", "--timeout", TIMEOUT).stdout)
    assert done["model_format"] == "diffusers" and done["original_removed"]
    folder = bus.config.model_path(done["path"])
    names = folder_tensor_names(folder)  # every weight bf16: fp8 upcast once, nothing kept in fp8
    assert not any(n.endswith(("scale_weight", "scaled_fp8")) for n in names)
    for part, cls in parts.items():
        loaded = cls.from_pretrained(folder / part, local_files_only=True)
        wrong = same(loaded, expected_weights(models[part], scaled and part == "unet"))
        assert wrong == [], (part, wrong[:5])


SD3_PARTS = {"transformer": SD3Transformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModelWithProjection,
             "text_encoder_2": CLIPTextModelWithProjection, "text_encoder_3": T5EncoderModel}


@pytest.fixture(scope="module")
def t5_tokenizer_companion(bus: Bus) -> None:
    """No single file carries T5's tokenizer: an installed T5 encoder folder gives it to the SD-3 folders."""
    install_companions(bus, sd3_donor=False)


@pytest.mark.parametrize("scaled", [False, True], ids=["e4m3fn", "fp8_scaled"])
@pytest.mark.parametrize("base", ["sd-3", "sd-3.5-medium"])
def test_convert_an_fp8_sd3_checkpoint(bus: Bus, t5_tokenizer_companion: None, base: str, scaled: bool) -> None:
    key = f"fp8-{base}-{'scaled' if scaled else 'plain'}"
    file = bus.config.models_path / f"{key}.safetensors"
    # an all-in-one file (transformer, VAE, CLIP-L, CLIP-G, T5-XXL), as Stability's and ComfyUI's
    models = loadable.write_sd3_checkpoint(file, medium=base != "sd-3", bundle=True, prefix="model.diffusion_model.",
                                           dtype=torch.float32)
    save_file(as_fp8_file(load_file(str(file)), DENOISER if scaled else ()), str(file))
    with ModelBusClient(bus.config) as client:
        client.add_model(key, {"name": key, "model_type": "main", "model_format": "checkpoint", "base_model": base,
                               "path": file.name})
    done = json.loads(_cli("convert", key, "--json", "--timeout", TIMEOUT).stdout)
    assert done["companions"] == {"tokenizer_3": "t5-encoder"}
    folder = bus.config.model_path(done["path"])
    names = folder_tensor_names(folder)
    assert not any(n.endswith(("scale_weight", "scaled_fp8")) for n in names)
    for part, cls in SD3_PARTS.items():
        loaded = cls.from_pretrained(folder / part, local_files_only=True)
        wrong = same(loaded, expected_weights(models[part], scaled and part == "transformer"))
        assert wrong == [], (part, wrong[:5])
    StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)
