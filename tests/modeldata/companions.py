"""What the conversion tests share: the companion models, made at test time and registered as records (what a
FLUX.1 or SD-3 file lacks: a VAE file, a T5 encoder folder with its tokenizer, the CLIP-L of an SD-1 checkpoint,
an SD-3 all-in-one file), the wait for the hash worker a conversion runs on, and the CLI in process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)
from typer.testing import CliRunner, Result

from modelbus.services.cli import app as cli_app
from modelbus.services.client import ModelBusClient
from tests.fixtures import loadable
from tests.install.conftest import Bus
from tests.waiting import wait_until

#: the tiny CLIP-L's width (the SD-1 checkpoint's, the SD-3 file's): a tiny FLUX transformer converted with these
#: companions pools that wide (``flux_transformer_state(pooled=CLIP_L_WIDTH)``), as FLUX.1 pools CLIP-L's 768
CLIP_L_WIDTH = int(loadable.CLIP_CFG["hidden_size"])
_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue")


def t5_tokenizer() -> T5TokenizerFast:
    """A tiny SentencePiece-style (Unigram, metaspace) T5 tokenizer, as T5's own is shaped."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0 - i) for i, w in enumerate(_WORDS)] + [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)


def write_t5_folder(folder: Path, seed: int = 11, with_tokenizer: bool = True) -> T5EncoderModel:
    """A T5 encoder saved by transformers, its tokenizer's files beside it (as a T5 encoder repo holds them)."""
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(**loadable.T5_CFG)).eval()
    model.save_pretrained(folder)
    if with_tokenizer:
        t5_tokenizer().save_pretrained(folder)
    return model


def write_clip_l_file(path: Path, seed: int = 15, projection: bool = True, prefix: str = "", hidden: int = 64,
                      vocab: int = 16, positions: int = 8) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A CLIP text encoder alone in one fp16 file, under transformers' ``text_model.*`` names (with its
    ``text_projection``, as comfyanonymous' clip_l.safetensors) behind ``prefix`` (SD's ``transformer.``)."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(**{**loadable.CLIP_CFG, "hidden_size": hidden, "vocab_size": vocab,
                               "max_position_embeddings": positions, "projection_dim": hidden})
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
    state = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
             for k, v in model.state_dict().items()}  # (transformers 5's CLIPTextModel has no text_model. level)
    loadable._save(path, {prefix + k: v for k, v in state.items()}, torch.float16)
    return model


def write_vae_file(path: Path, seed: int = 12) -> AutoencoderKL:
    """A 16-channel VAE alone in one file under LDM's bare names, as BFL's ae.safetensors is."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**loadable.SD3_VAE_CFG).eval()
    ldm = loadable._vae_to_ldm(vae.state_dict(), 2, 1)
    prefix = next(p for p in ("first_stage_model.", "vae.") if any(k.startswith(p) for k in ldm))
    loadable._save(path, {k.removeprefix(prefix): v for k, v in ldm.items()}, torch.float32)
    return vae


def add(bus: Bus, key: str, model_type: str, model_format: str, base: str, path: Path, **extra: Any) -> None:
    with ModelBusClient(bus.config) as client:
        client.add_model(key, {"name": key, "model_type": model_type, "model_format": model_format,
                               "base_model": base, "path": str(path.relative_to(bus.config.models_path)), **extra})


def install_companions(bus: Bus, sd3_donor: bool = True) -> dict[str, torch.nn.Module]:
    """The companions a FLUX.1 file (VAE, CLIP-L, T5 and its tokenizer) and an SD-3 file (T5's tokenizer; with
    ``sd3_donor`` an all-in-one SD-3 file for the rest) lack; returns the models they hold, by the part they give."""
    models_dir = bus.config.models_path / "companions"
    models_dir.mkdir(parents=True, exist_ok=True)
    t5 = write_t5_folder(models_dir / "t5-encoder")
    add(bus, "t5-encoder", "t5_encoder", "t5_encoder", "any", models_dir / "t5-encoder")
    vae = write_vae_file(models_dir / "flux-ae.safetensors")
    add(bus, "flux-vae", "vae", "checkpoint", "flux", models_dir / "flux-ae.safetensors")
    sd1 = loadable.write_sd1_checkpoint(models_dir / "clip-donor.safetensors", seed=13, dtype=torch.float32)
    yaml_path = loadable.write_original_yaml(bus.root / "clip-donor.yaml")
    add(bus, "clip-donor", "main", "checkpoint", "sd-1", models_dir / "clip-donor.safetensors", config=str(yaml_path))
    out: dict[str, torch.nn.Module] = {"flux:vae": vae, "flux:text_encoder": sd1["text_encoder"],
                                       "flux:text_encoder_2": t5, "sd3:text_encoder_3": t5}
    if sd3_donor:
        donor = loadable.write_sd3_checkpoint(models_dir / "sd3-donor.safetensors", bundle=True, seed=14,
                                              dtype=torch.float32)
        add(bus, "sd3-donor", "main", "checkpoint", "sd-3", models_dir / "sd3-donor.safetensors")
        out |= {f"sd3:{part}": donor[part] for part in ("vae", "text_encoder", "text_encoder_2")}
    return out


def wait_for_hash_worker(bus: Bus) -> None:
    """The module's worker has registered (it starts with the module: a conversion needs it serving)."""
    with ModelBusClient(bus.config) as client:
        wait_until(lambda: any("hash" in w.queues for w in client.workers()), 120, "a worker on the hash queue",
                   bus.worker_log)


def run_cli(*args: str, code: int = 0) -> Result:
    result = CliRunner().invoke(cli_app, list(args))
    assert result.exit_code == code, (args, result.stdout, result.stderr)
    return result


def assert_refused(bus: Bus, key: str, path: Path, timeout: str = "600") -> str:
    """The one-line refusal of converting ``key`` (exit code 2); nothing of it changed: no event appended, the
    record and its file as they were, no folder placed or left in staging."""
    with ModelBusClient(bus.config) as client:
        head, before = client.store.head(), path.read_bytes()
    refused = run_cli("convert", key, "--timeout", timeout, code=2).stderr.strip()
    assert len(refused.splitlines()) == 1, refused
    with ModelBusClient(bus.config) as client:
        assert client.store.head() == head and client.get_model(key).model_format.value == "checkpoint"
    assert path.read_bytes() == before  # the original untouched
    assert not [p for p in bus.config.models_path.rglob(f"{path.stem}*") if p != path]  # no folder placed
    staging = bus.config.models_path / ".staging"
    assert not staging.exists() or not any(staging.iterdir())  # nor left in staging
    return refused
