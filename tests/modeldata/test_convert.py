"""`modelbus convert`: a single-file SD-1 checkpoint becomes a diffusers folder on a worker of the hash queue,
under the same key with a new hash, whose weights are the checkpoint's; what cannot be converted is refused
before any worker is asked, and nothing changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from modelbus.services.api import create_app
from modelbus.services.cli import app as cli_app
from modelbus.services.client import ModelBusClient
from tests.fixtures import loadable, make_lora_kohya
from tests.install.conftest import Bus
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
    with ModelBusClient(bus.config) as client:
        assert client.store.head() == head
