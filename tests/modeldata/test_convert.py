"""`modelbus convert`: a single-file SD-1, FLUX.1 or SD-3 checkpoint becomes a complete diffusers folder on a worker
of the hash queue (diffusers' pipeline loads it), under the same key with a new hash, whose weights are the
checkpoint's (an SD-3 file's bundled VAE and text encoders too) and, for what the file lacks, those of the installed
companion models (tests/modeldata/companions.py); what cannot be converted is refused before any worker is asked,
and nothing changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UNet2DConditionModel,
)
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextModelWithProjection, T5EncoderModel
from typer.testing import CliRunner

from modelbus.services.api import create_app
from modelbus.services.cli import app as cli_app
from modelbus.services.client import ModelBusClient
from tests.fixtures import loadable, make_lora_kohya, transformer_files
from tests.install.conftest import Bus
from tests.modeldata.companions import CLIP_L_WIDTH, install_companions
from tests.waiting import wait_until

TIMEOUT = "600"


def _cli(*args: str, code: int = 0):  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(cli_app, list(args))
    assert result.exit_code == code, (args, result.stdout, result.stderr)
    return result


def _add_checkpoint(bus: Bus, key: str, seed: int) -> dict[str, torch.nn.Module]:
    models_dir = bus.config.models_path
    models_dir.mkdir(parents=True, exist_ok=True)
    models = loadable.write_sd1_checkpoint(models_dir / f"{key}.safetensors", seed=seed, dtype=torch.float32)
    yaml_path = loadable.write_original_yaml(bus.root / f"{key}-inference.yaml")
    with ModelBusClient(bus.config) as client:
        client.add_model(key, {"name": key, "model_type": "main", "model_format": "checkpoint", "base_model": "sd-1",
                               "path": f"{key}.safetensors", "config": str(yaml_path)})
    return models


@pytest.fixture(scope="module", autouse=True)
def companions(bus: Bus) -> dict[str, torch.nn.Module]:
    """The companion models this module's FLUX.1 and SD-3 conversions take what their files lack from."""
    return install_companions(bus)


@pytest.fixture(autouse=True)
def _hash_worker_up(bus: Bus) -> None:
    """The module's worker has registered (it starts with the module: a conversion needs it serving)."""
    with ModelBusClient(bus.config) as client:
        wait_until(lambda: any("hash" in w.queues for w in client.workers()), 120, "a worker on the hash queue",
                   bus.worker_log)


def test_convert_a_checkpoint_to_a_diffusers_folder(bus: Bus) -> None:
    models = _add_checkpoint(bus, "tiny-ckpt", seed=1)
    before = json.loads(_cli("show", "tiny-ckpt", "--json").stdout)
    done = json.loads(_cli("convert", "tiny-ckpt", "--json", "--timeout", TIMEOUT).stdout)
    assert done["key"] == "tiny-ckpt" and done["model_format"] == "diffusers" and done["original_removed"]
    after = json.loads(_cli("show", "tiny-ckpt", "--json").stdout)
    assert after["model_format"] == "diffusers" and after["hash"] != before["hash"] and "config" not in after
    folder = bus.config.model_path(after["path"])
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert not bus.config.model_path(before["path"]).exists()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    expected = models["unet"].state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in unet.state_dict().items())
    history = [e["type"] for e in json.loads(_cli("history", "tiny-ckpt", "--json").stdout)]
    assert history[-1] == "ModelUpdated"


def test_keep_original_and_the_api(bus: Bus) -> None:
    _add_checkpoint(bus, "kept-ckpt", seed=2)
    with TestClient(create_app(bus.config)) as http:
        r = http.post("/api/v2/models/i/kept-ckpt/convert", json={"keep_original": True, "timeout": 600},
                      headers={"Host": "127.0.0.1"})
        assert r.status_code == 200, r.text
        assert not r.json()["original_removed"] and Path(r.json()["original"]).is_file()


def test_the_async_client_converts_and_refuses(bus: Bus) -> None:
    """AsyncModelBusClient.convert: the same conversion on the worker, and the same refusal before any
    worker is asked (a LoRA is not a checkpoint; nothing appended)."""
    import asyncio

    from modelbus.services.client import AsyncModelBusClient
    from modelbus.services.convert import NotConvertible

    _add_checkpoint(bus, "async-ckpt", seed=3)
    lora = make_lora_kohya(bus.config.models_path / "async-lora.safetensors", rank=3)
    with ModelBusClient(bus.config) as client:
        client.add_model("async-lora", {"name": "al", "model_type": "lora", "model_format": "lycoris",
                                        "base_model": "sd-1", "path": lora.name})

    async def run() -> tuple[dict[str, object], str, str, str]:
        async with AsyncModelBusClient(bus.config) as client:
            done = await client.convert("async-ckpt", keep_original=True, timeout=600)
            head = client.sync.store.head()
            with pytest.raises(NotConvertible) as refused:
                await client.convert("async-lora")
            return done, head, client.sync.store.head(), str(refused.value)

    try:
        done, head, head_after, refusal = asyncio.run(run())
    finally:  # the converted SD-1 folder would be a CLIP-L companion of this module's later FLUX conversions
        with ModelBusClient(bus.config) as client:
            client.delete_model("async-ckpt", delete_files=True)
            client.delete_model("async-lora", delete_files=True)
    assert done["key"] == "async-ckpt" and done["model_format"] == "diffusers" and not done["original_removed"]
    assert Path(str(done["original"])).is_file()
    assert "not a single-file main checkpoint" in refusal and head_after == head


@pytest.mark.parametrize("what", ["lora", "diffusers", "missing"])
def test_what_cannot_be_converted_is_refused_and_nothing_changes(bus: Bus, tmp_path: Path, what: str) -> None:
    if what == "missing":
        assert "unknown model key" in _cli("convert", "no-such-model", code=3).stderr
        return
    if what == "lora":
        path = make_lora_kohya(bus.config.models_path / "conv-lora.safetensors", rank=3)
        record = {"name": "l", "model_type": "lora", "model_format": "lycoris", "base_model": "sd-1",
                  "path": path.name}
    else:
        (bus.config.models_path / "conv-folder").mkdir(exist_ok=True)
        record = {"name": "d", "model_type": "main", "model_format": "diffusers", "base_model": "sd-1",
                  "path": "conv-folder"}
    with ModelBusClient(bus.config) as client:
        client.add_model(f"conv-{what}", record)
        head = client.store.head()
    refused = _cli("convert", f"conv-{what}", code=2)
    assert "not a single-file main checkpoint" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    with TestClient(create_app(bus.config)) as http:  # the API: the same refusal, a 422 naming it
        r = http.post(f"/api/v2/models/i/conv-{what}/convert", json={}, headers={"Host": "127.0.0.1"})
        assert r.status_code == 422 and "not a single-file main checkpoint" in r.json()["error"]["message"], r.text
    with ModelBusClient(bus.config) as client:
        assert client.store.head() == head


def _add(bus: Bus, key: str, base: str, file: str) -> None:
    with ModelBusClient(bus.config) as client:
        client.add_model(key, {"name": key, "model_type": "main", "model_format": "checkpoint", "base_model": base,
                               "path": file})


def _same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    got = model.state_dict()
    return set(got) == set(expected) and all(torch.equal(v.float(), expected[k].float()) for k, v in got.items())


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_convert_a_flux_checkpoint(bus: Bus, companions: dict[str, torch.nn.Module], guidance: bool) -> None:
    key = f"tiny-flux-{'dev' if guidance else 'schnell'}"
    state = transformer_files.flux_transformer_state(guidance=guidance, pooled=CLIP_L_WIDTH)
    transformer_files.write_state(bus.config.models_path / f"{key}.safetensors", loadable.flux_to_bfl(state))
    _add(bus, key, "flux", f"{key}.safetensors")
    done = json.loads(_cli("convert", key, "--json", "--timeout", TIMEOUT).stdout)
    assert done["model_format"] == "diffusers" and done["original_removed"]
    given = done["companions"]
    # CLIP-L from the SD-1 checkpoint, or from a FLUX folder converted before (preferred; its CLIP-L is that one)
    assert given.pop("text_encoder") in ("clip-donor", "tiny-flux-dev")
    assert given == {"vae": "flux-vae", "text_encoder_2": "t5-encoder", "tokenizer_2": "t5-encoder"}
    folder = bus.config.model_path(done["path"])
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert index["tokenizer"][1] == "CLIPTokenizer" and index["tokenizer_2"][1].startswith("T5Tokenizer")
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)  # complete: diffusers loads the whole folder
    assert pipe.scheduler.config.use_dynamic_shifting is guidance  # dev's schedule, or schnell's
    assert pipe.tokenizer_2("a photo of a cat").input_ids[-1] == pipe.tokenizer_2.eos_token_id
    assert _same_weights(pipe.vae, {k: v.half() for k, v in companions["flux:vae"].state_dict().items()})
    assert _same_weights(pipe.text_encoder, {k: v.half() for k, v in
                                             companions["flux:text_encoder"].state_dict().items()})
    assert _same_weights(pipe.text_encoder_2, {k: v.half() for k, v in
                                               companions["flux:text_encoder_2"].state_dict().items()})
    transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", local_files_only=True)
    assert transformer.config.guidance_embeds is guidance
    assert _same_weights(transformer, {k: v.half() for k, v in state.items()})
    with safe_open(folder / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        names = list(weights.keys())  # (a safetensors file is not iterable)
        assert {weights.get_slice(k).get_dtype() for k in names} == {"F16"}  # the file's precision kept


def _as_fp8_file(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """As ComfyUI ships fp8 files: matrices in float8_e4m3fn, vectors (norms, biases) in bf16."""
    return {k: v.to(torch.float8_e4m3fn) if v.dim() >= 2 else v.to(torch.bfloat16) for k, v in tensors.items()}


def test_convert_an_fp8_flux_checkpoint_to_bf16(bus: Bus) -> None:
    state = transformer_files.flux_transformer_state(guidance=True, pooled=CLIP_L_WIDTH)
    bus.config.models_path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in _as_fp8_file(loadable.flux_to_bfl(state)).items()},
              str(bus.config.models_path / "fp8-flux.safetensors"))
    _add(bus, "fp8-flux", "flux", "fp8-flux.safetensors")
    done = json.loads(_cli("convert", "fp8-flux", "--json", "--timeout", TIMEOUT).stdout)
    folder = bus.config.model_path(done["path"])
    with safe_open(folder / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        names = list(weights.keys())  # (a safetensors file is not iterable)
        assert {weights.get_slice(k).get_dtype() for k in names} == {"BF16"}  # fp8 upcast, once
    transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", local_files_only=True)
    expected = {k: v.to(torch.bfloat16) for k, v in _as_fp8_file(state).items()}  # what the file held, exactly
    assert _same_weights(transformer, expected)


def test_convert_an_fp8_scaled_flux_checkpoint_folds_its_scales(bus: Bus) -> None:
    # ComfyUI's fp8_scaled: each matrix stored as weight / scale in fp8, its scale beside it, a marker tensor
    bfl = loadable.flux_to_bfl(transformer_files.flux_transformer_state(guidance=True, pooled=CLIP_L_WIDTH))
    scales = {k: v.abs().max().float() / 200 for k, v in bfl.items() if v.dim() >= 2}
    stored = {k: ((v.float() / scales[k]).to(torch.float8_e4m3fn) if k in scales else v.to(torch.bfloat16))
              for k, v in bfl.items()}
    file = {**stored, **{k[: -len("weight")] + "scale_weight": s.reshape(1) for k, s in scales.items()},
            "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    bus.config.models_path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in file.items()}, str(bus.config.models_path / "fp8s-flux.safetensors"))
    _add(bus, "fp8s-flux", "flux", "fp8s-flux.safetensors")
    done = json.loads(_cli("convert", "fp8s-flux", "--json", "--timeout", TIMEOUT).stdout)
    folder = bus.config.model_path(done["path"])
    with safe_open(folder / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        names = set(weights.keys())
    assert not any(n.endswith(("scale_weight", "scaled_fp8")) for n in names)  # folded, not carried over
    transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", local_files_only=True)
    assert names == set(transformer.state_dict())
    # a folded weight is the file's fp8 value times its scale (to bf16's rounding)
    folded = stored["img_in.weight"].float() * scales["img_in.weight"]
    assert torch.allclose(transformer.state_dict()["x_embedder.weight"].float(), folded, rtol=1e-2, atol=1e-3)


def test_a_flux_file_bundling_more_than_its_transformer_is_refused(bus: Bus) -> None:
    state = loadable.flux_to_bfl(transformer_files.flux_transformer_state(), "model.diffusion_model.")
    state["vae.decoder.conv_in.weight"] = torch.randn(8, 16, 3, 3)
    path = transformer_files.write_state(bus.config.models_path / "flux-bundle.safetensors", state)
    _add(bus, "flux-bundle", "flux", "flux-bundle.safetensors")
    with ModelBusClient(bus.config) as client:
        head = client.store.head()
    refused = _cli("convert", "flux-bundle", "--timeout", TIMEOUT, code=2).stderr
    assert "bundles more than a FLUX transformer (vae)" in refused and len(refused.strip().splitlines()) == 1
    with ModelBusClient(bus.config) as client:
        assert client.store.head() == head and client.get_model("flux-bundle").model_format.value == "checkpoint"
    assert path.is_file() and not list(bus.config.models_path.glob("flux/main/flux-bundle*"))


@pytest.mark.parametrize("bundle", [True, False])
def test_convert_an_sd3_checkpoint(bus: Bus, companions: dict[str, torch.nn.Module], bundle: bool) -> None:
    key = f"tiny-sd3-{'bundle' if bundle else 'alone'}"
    models = loadable.write_sd3_checkpoint(bus.config.models_path / f"{key}.safetensors", bundle=bundle,
                                           prefix="model.diffusion_model.", medium=not bundle)
    _add(bus, key, "sd-3" if bundle else "sd-3.5-medium", f"{key}.safetensors")
    with TestClient(create_app(bus.config)) as http:
        r = http.post(f"/api/v2/models/i/{key}/convert", json={"timeout": 600}, headers={"Host": "127.0.0.1"})
        assert r.status_code == 200, r.text
    folder = bus.config.model_path(r.json()["path"])
    given = r.json()["companions"]
    assert given == ({"tokenizer_3": "t5-encoder"} if bundle else
                     {"vae": "sd3-donor", "text_encoder": "sd3-donor", "text_encoder_2": "sd3-donor",
                      "text_encoder_3": "t5-encoder", "tokenizer_3": "t5-encoder"})
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["tokenizer_3"][1].startswith("T5Tokenizer")
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["tokenizer"] == index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
    bundled = {"vae": AutoencoderKL, "text_encoder": CLIPTextModelWithProjection,
               "text_encoder_2": CLIPTextModelWithProjection, "text_encoder_3": T5EncoderModel}
    for part, cls in bundled.items():
        assert index[part][1] == cls.__name__
        loaded = cls.from_pretrained(folder / part, local_files_only=True)
        if part in models:
            assert _same_weights(loaded, models[part].state_dict())
        else:  # a companion's, written in the file's precision (fp16)
            assert _same_weights(loaded, {k: v.half() for k, v in companions[f"sd3:{part}"].state_dict().items()}), part
    StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)  # complete: diffusers loads it whole
    transformer = SD3Transformer2DModel.from_pretrained(folder / "transformer", local_files_only=True)
    assert _same_weights(transformer, models["transformer"].state_dict())
