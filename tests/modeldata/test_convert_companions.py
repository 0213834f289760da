"""`modelbus convert` of a file that lacks parts of its pipeline (FLUX.1: all but the transformer; SD-3: T5's
tokenizer at least) when no installed model can give them: refused in one line naming each missing part and what to
install, with nothing written, recorded or removed; a companion that does not load is passed over for the next."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from tests.fixtures import loadable, transformer_files
from tests.install.conftest import Bus
from tests.modeldata.companions import (
    CLIP_L_WIDTH,
    add,
    assert_refused,
    run_cli,
    wait_for_hash_worker,
    write_clip_l_file,
    write_t5_folder,
    write_vae_file,
)

TIMEOUT = "600"


@pytest.fixture(autouse=True)
def _hash_worker_up(bus: Bus) -> None:
    wait_for_hash_worker(bus)


_cli = run_cli
_refused = assert_refused


def _flux_file(bus: Bus, key: str) -> Path:
    bus.config.models_path.mkdir(parents=True, exist_ok=True)
    path = bus.config.models_path / f"{key}.safetensors"
    transformer_files.write_state(path, loadable.flux_to_bfl(transformer_files.flux_transformer_state(pooled=CLIP_L_WIDTH)))
    add(bus, key, "main", "checkpoint", "flux", path)
    return path


def test_missing_companions_are_named_broken_ones_passed_over_and_nothing_changes(bus: Bus) -> None:
    models = bus.config.models_path
    path = _flux_file(bus, "lonely-flux")
    refused = _refused(bus, "lonely-flux", path)
    assert "none is installed for vae, text_encoder, text_encoder_2, tokenizer_2" in refused
    assert "--starter flux-vae" in refused and "--starter t5-xxl-encoder" in refused

    # a T5 encoder file gives text_encoder_2 but no tokenizer; a VAE and an SD-1 checkpoint give the rest
    loadable.write_t5_encoder(models / "t5-file.safetensors")
    add(bus, "t5-file", "t5_encoder", "checkpoint", "any", models / "t5-file.safetensors")
    write_vae_file(models / "ae.safetensors")
    add(bus, "ae", "vae", "checkpoint", "flux", models / "ae.safetensors")
    loadable.write_sd1_checkpoint(models / "sd1.safetensors", dtype=torch.float32)
    add(bus, "sd1", "main", "checkpoint", "sd-1", models / "sd1.safetensors",
        config=str(loadable.write_original_yaml(bus.root / "sd1.yaml")))
    refused = _refused(bus, "lonely-flux", path)
    assert "none is installed for tokenizer_2 (install for tokenizer_2, a T5 tokenizer" in refused

    # an SD-3 file with everything bundled still lacks T5's tokenizer; one that does not load gives none
    sd3 = models / "bundled-sd3.safetensors"
    loadable.write_sd3_checkpoint(sd3, bundle=True, prefix="model.diffusion_model.")
    add(bus, "bundled-sd3", "main", "checkpoint", "sd-3", sd3)
    assert "none is installed for tokenizer_3" in _refused(bus, "bundled-sd3", sd3)
    write_t5_folder(models / "bad-tokenizer")
    (models / "bad-tokenizer" / "tokenizer.json").write_text("{ not json")
    add(bus, "bad-tokenizer", "t5_encoder", "t5_encoder", "any", models / "bad-tokenizer")
    refused = _refused(bus, "bundled-sd3", sd3)
    assert "no installed companion gives tokenizer_3: bad-tokenizer (bad-tokenizer):" in refused

    # broken candidates first (by name) are passed over for the good ones
    (models / "a-broken-vae.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    add(bus, "a-broken-vae", "vae", "checkpoint", "flux", models / "a-broken-vae.safetensors")
    write_t5_folder(models / "a-broken-t5")  # its tokenizer is fine, its weights are not
    (models / "a-broken-t5" / "model.safetensors").write_bytes(b"not safetensors at all")
    add(bus, "a-broken-t5", "t5_encoder", "t5_encoder", "any", models / "a-broken-t5")
    done = json.loads(_cli("convert", "lonely-flux", "--json", "--timeout", TIMEOUT).stdout)
    assert done["companions"] == {"vae": "ae", "text_encoder": "sd1", "text_encoder_2": "bad-tokenizer",
                                  "tokenizer_2": "a-broken-t5"}
    assert done["original_removed"] and not path.exists()
    assert "companion_passed_over" in bus.worker_log()


def test_a_clip_text_encoder_of_the_wrong_width_is_passed_over_and_named(bus: Bus) -> None:
    """A CLIP-G recorded as clip_embed is no CLIP-L: FLUX.1 takes a CLIP as wide as its transformer pools
    (pooled_projection_dim), SD-3 one as wide as its pooled width less its CLIP-G's. The wrong one is passed over
    for the next (here a CLIP-L folder in InvokeAI's layout); when none fits, the refusal names each candidate's
    width and the one wanted, nothing changed."""
    models = bus.config.models_path
    models.mkdir(parents=True, exist_ok=True)
    write_vae_file(models / "w-vae.safetensors")
    add(bus, "w-vae", "vae", "checkpoint", "flux", models / "w-vae.safetensors")
    write_t5_folder(models / "w-t5")
    add(bus, "w-t5", "t5_encoder", "t5_encoder", "any", models / "w-t5")
    wide = 2 * CLIP_L_WIDTH  # this tiny world's CLIP-G: named to come first among the clip_embed candidates
    write_clip_l_file(models / "w-clip-g.safetensors", seed=21, hidden=wide)
    # ... and one that would not even load (no final norm): its header tells its width, so it is never built
    whole = load_file(str(models / "w-clip-g.safetensors"))
    save_file({k: v for k, v in whole.items() if "final_layer_norm" not in k}, str(models / "w-clip-g.safetensors"))
    add(bus, "w-clip-g", "clip_embed", "checkpoint", "any", models / "w-clip-g.safetensors")
    torch.manual_seed(22)  # the CLIP-L as a folder, in InvokeAI's layout (text_encoder/ beside tokenizer/)
    clip_l = CLIPTextModel(CLIPTextConfig(**loadable.CLIP_CFG)).eval()
    clip_l.save_pretrained(models / "w-clip-l" / "text_encoder")
    (models / "w-clip-l" / "tokenizer").mkdir()
    (models / "w-clip-l" / "tokenizer" / "tokenizer_config.json").write_text("{}")
    add(bus, "w-clip-l", "clip_embed", "diffusers", "any", models / "w-clip-l")

    # a FLUX file pooling a width no installed CLIP has: refused, each candidate's width named
    odd = models / "w-flux-48.safetensors"
    transformer_files.write_state(odd, loadable.flux_to_bfl(transformer_files.flux_transformer_state(pooled=48)))
    add(bus, "w-flux-48", "main", "checkpoint", "flux", odd)
    refused = _refused(bus, "w-flux-48", odd)
    assert "no installed companion gives text_encoder: " in refused, refused
    assert (f"w-clip-g (w-clip-g): a CLIP text encoder {wide} wide, and FluxPipeline's text_encoder must be 48 wide "
            "(its transformer's pooled_projection_dim is 48)") in refused, refused
    assert f"w-clip-l (w-clip-l): a CLIP text encoder {CLIP_L_WIDTH} wide" in refused, refused

    # FLUX pooling CLIP-L's width: the CLIP-G is passed over for the CLIP-L
    path = _flux_file(bus, "w-flux")
    done = json.loads(_cli("convert", "w-flux", "--json", "--timeout", TIMEOUT).stdout)
    assert done["companions"]["text_encoder"] == "w-clip-l", done
    folder = bus.config.model_path(done["path"])
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    assert encoder.config.hidden_size == CLIP_L_WIDTH
    want = {k.removeprefix("text_model."): v for k, v in clip_l.state_dict().items() if not k.startswith("text_proj")}
    got = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    assert got.keys() == want.keys() and all(torch.equal(v.float(), want[k].half().float()) for k, v in got.items())
    assert not path.exists()

    # SD-3 bundling all but CLIP-L: its CLIP-G's width leaves the CLIP-L's; the wide one is passed over
    sd3 = models / "w-sd3.safetensors"
    loadable.write_sd3_checkpoint(sd3, bundle=True, prefix="model.diffusion_model.")
    save_file({k: v for k, v in load_file(str(sd3)).items() if not k.startswith("text_encoders.clip_l.")}, str(sd3))
    add(bus, "w-sd3", "main", "checkpoint", "sd-3", sd3)
    done = json.loads(_cli("convert", "w-sd3", "--json", "--timeout", TIMEOUT).stdout)
    assert done["companions"]["text_encoder"] == "w-clip-l", done
    assert "companion_passed_over" in bus.worker_log()
