"""The `flux` starter bundle, installed alone, converts to a complete FluxPipeline folder: `install --bundle flux`
against the local Hugging Face server, which serves tiny stand-ins under the catalogue's repo ids (BFL's single-file
transformer and ae.safetensors, comfyanonymous' clip_l.safetensors, InvokeAI's T5-XXL folder: text_encoder_2/ beside
tokenizer_2/, a SentencePiece-style tokenizer made here), then `modelbus convert` on the worker; diffusers loads the
folder offline and runs it. A bundle whose T5 folder lacks its tokenizer is refused in one line naming what to
install, with nothing recorded or left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file, save_file
from transformers import T5Config, T5EncoderModel

from modelbus.services.catalog import load_catalog
from modelbus.services.client import ModelBusClient
from tests.fixtures import loadable, transformer_files
from tests.install.conftest import Bus
from tests.modeldata.companions import (
    CLIP_L_WIDTH,
    add,
    assert_refused,
    run_cli,
    t5_tokenizer,
    wait_for_hash_worker,
    write_clip_l_file,
    write_vae_file,
)

TIMEOUT = "600"
T5_REPO, T5_SUB = load_catalog().starter("t5-xxl-encoder").source.split(":")  # type: ignore[union-attr]
# the tiny transformer's widths: pooled CLIP-L (pooled_projection_dim: the width SD-3's tiny file leaves its CLIP-L
# too) and T5 (joint_attention_dim)
CLIP_WIDTH, WIDTH = CLIP_L_WIDTH, 32
CLIP_VOCAB = 49408  # the shipped CLIP tokenizer's: the pipeline's token ids index this encoder's embedding


@pytest.fixture(scope="module")
def hub_files(bus: Bus, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The bundle's stand-ins under their real repo ids; the T5 repo first without its tokenizer."""
    tmp = tmp_path_factory.mktemp("flux-bundle")
    bfl = tmp / "bfl"
    bfl.mkdir()
    state = transformer_files.flux_transformer_state(guidance=False, pooled=CLIP_WIDTH)  # schnell: no guidance embedding
    transformer_files.write_state(bfl / "flux1-schnell.safetensors", loadable.flux_to_bfl(state))
    vae = write_vae_file(bfl / "ae.safetensors")
    bus.hub.add_repo("black-forest-labs/FLUX.1-schnell", bfl)
    comfy = tmp / "comfy"
    comfy.mkdir()
    clip = write_clip_l_file(comfy / "clip_l.safetensors", hidden=CLIP_WIDTH, vocab=CLIP_VOCAB, positions=77)
    bus.hub.add_repo("comfyanonymous/flux_text_encoders", comfy)
    torch.manual_seed(16)
    t5 = T5EncoderModel(T5Config(**{**loadable.T5_CFG, "d_model": WIDTH, "vocab_size": 64})).eval()
    t5.save_pretrained(tmp / "invoke" / T5_SUB / "text_encoder_2")
    bus.hub.add_repo(T5_REPO, tmp / "invoke")
    return {"tmp": tmp, "transformer": state, "vae": vae, "clip": clip, "t5": t5}


@pytest.fixture(autouse=True)
def _hash_worker_up(bus: Bus) -> None:
    wait_for_hash_worker(bus)


def _install(*args: str) -> dict[str, str]:
    """starter name -> the key of its record, once every job completed."""
    done = json.loads(run_cli("install", *args, "--wait", "--json", "--timeout", TIMEOUT).stdout)
    assert all(e.get("installed") or e["job"]["state"] == "completed" for e in done), done
    return {e["starter"]: e.get("installed") or e["job"]["key"] for e in done}


def _same_weights(model: torch.nn.Module, expected: torch.nn.Module) -> bool:
    got, want = model.state_dict(), expected.state_dict()
    return set(got) == set(want) and all(torch.equal(v.float(), want[k].half().float()) for k, v in got.items())


def test_the_flux_bundle_converts_to_a_pipeline_once_its_t5_holds_its_tokenizer(
        bus: Bus, hub_files: dict[str, object]) -> None:
    keys = _install("--bundle", "flux")
    assert list(keys) == ["flux-vae", "t5-xxl-encoder", "clip-l-encoder", "flux.1-schnell"]
    with ModelBusClient(bus.config) as client:
        types = {name: client.get_model(key).model_type.value for name, key in keys.items()}
        flux = client.get_model(keys["flux.1-schnell"])
    assert types == {"flux-vae": "vae", "t5-xxl-encoder": "t5_encoder", "clip-l-encoder": "clip_embed",
                     "flux.1-schnell": "main"}
    original = bus.config.model_path(flux.path)

    # the T5 folder without its tokenizer: refused, naming the part and the starter that gives it
    refused = assert_refused(bus, flux.key, original, TIMEOUT)
    assert "none is installed for tokenizer_2 " in refused and "--starter t5-xxl-encoder" in refused, refused

    # the repo as InvokeAI publishes it, tokenizer_2/ beside text_encoder_2/: reinstalled, the bundle converts
    tmp = hub_files["tmp"]
    assert isinstance(tmp, Path)
    t5_tokenizer().save_pretrained(tmp / "invoke" / T5_SUB / "tokenizer_2")
    bus.hub.add_repo(T5_REPO, tmp / "invoke")
    run_cli("rm", keys["t5-xxl-encoder"], "--delete-files")
    keys |= _install("--starter", "t5-xxl-encoder")
    done = json.loads(run_cli("convert", flux.key, "--json", "--timeout", TIMEOUT).stdout)
    assert done["companions"] == {"vae": keys["flux-vae"], "text_encoder": keys["clip-l-encoder"],
                                  "text_encoder_2": keys["t5-xxl-encoder"], "tokenizer_2": keys["t5-xxl-encoder"]}
    assert done["key"] == flux.key and done["model_format"] == "diffusers" and not original.exists()
    folder = bus.config.model_path(done["path"])
    index = json.loads((folder / "model_index.json").read_text())
    assert {part for part, spec in index.items() if not part.startswith("_") and spec[0]} == {
        "transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"}

    # a loadable, runnable pipeline, offline, holding the bundle's weights
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"  # clip_l's projection dropped: FLUX takes none
    clip = hub_files["clip"]
    assert isinstance(clip, torch.nn.Module)
    want = {k.removeprefix("text_model."): v for k, v in clip.state_dict().items() if not k.startswith("text_proj")}
    got = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
    assert set(got) == set(want) and all(torch.equal(v, want[k].half().float()) for k, v in got.items())
    for part in ("vae", "t5"):
        expected = hub_files[part]
        assert isinstance(expected, torch.nn.Module)
        assert _same_weights(pipe.vae if part == "vae" else pipe.text_encoder_2, expected), part
    assert pipe.tokenizer_2("a photo of a cat").input_ids[-1] == pipe.tokenizer_2.eos_token_id
    image = pipe("a photo of a red cat", num_inference_steps=1, height=16, width=16, guidance_scale=0.0,
                 max_sequence_length=16, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())


@pytest.mark.parametrize("projection", [True, False], ids=["clip-l-projection", "bare-clip-l"])
def test_the_bundles_clip_l_and_t5_tokenizer_complete_an_sd3_file(bus: Bus, hub_files: dict[str, object],
                                                                   projection: bool) -> None:
    """An SD-3 file bundling all but CLIP-L takes a clip_embed file (the bundle's, with its projection; or one
    without, whose projection starts as the identity) and the bundle's T5 tokenizer."""
    tmp = hub_files["tmp"]
    assert isinstance(tmp, Path)
    if not (tmp / "invoke" / T5_SUB / "tokenizer_2").is_dir():  # (this test alone: the T5 repo as InvokeAI's)
        t5_tokenizer().save_pretrained(tmp / "invoke" / T5_SUB / "tokenizer_2")
        bus.hub.add_repo(T5_REPO, tmp / "invoke")
    keys = _install("--starter", "clip-l-encoder") | _install("--starter", "t5-xxl-encoder")
    clip = hub_files["clip"]
    if not projection:  # named to come before the bundle's (candidates of a source go by name)
        clip = write_clip_l_file(bus.config.models_path / "a-bare-clip-l.safetensors", projection=False, seed=17)
        add(bus, "a-bare-clip-l", "clip_embed", "checkpoint", "any", bus.config.models_path / "a-bare-clip-l.safetensors")
        keys["clip-l-encoder"] = "a-bare-clip-l"
    key = f"sd3-no-clip-l-{projection}"
    path = bus.config.models_path / f"{key}.safetensors"
    models = loadable.write_sd3_checkpoint(path, bundle=True, prefix="model.diffusion_model.")
    save_file({k: v for k, v in load_file(str(path)).items() if not k.startswith("text_encoders.clip_l.")}, str(path))
    add(bus, key, "main", "checkpoint", "sd-3", path)
    done = json.loads(run_cli("convert", key, "--json", "--timeout", TIMEOUT).stdout)
    assert done["companions"] == {"text_encoder": keys["clip-l-encoder"], "tokenizer_3": keys["t5-xxl-encoder"]}
    folder = bus.config.model_path(done["path"])
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModelWithProjection"
    assert isinstance(clip, torch.nn.Module)
    if projection:
        assert _same_weights(pipe.text_encoder, clip)
    else:
        hidden = pipe.text_encoder.config.hidden_size
        assert torch.equal(pipe.text_encoder.text_projection.weight, torch.eye(hidden))
        got = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()
               if not k.startswith("text_projection.")}
        want = {k.removeprefix("text_model."): v for k, v in clip.state_dict().items()}
        assert got.keys() == want.keys() and all(torch.equal(v, want[k].half().float()) for k, v in got.items())
    assert _same_weights(pipe.text_encoder_2, models["text_encoder_2"])
    assert pipe.tokenizer_3("a photo of a cat").input_ids[-1] == pipe.tokenizer_3.eos_token_id
