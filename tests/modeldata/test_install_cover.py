"""The first cover comes with the install: Civitai's preview image, fetched by the worker that records the
model (through the CLI and the API, against the local Civitai server); a broken preview fails nothing."""

from __future__ import annotations

import io
import json
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from modelbus.services.api import create_app
from modelbus.services.cli import app as cli_app
from tests.fixtures import make_lora_kohya
from tests.install.conftest import Bus

TIMEOUT = 240.0


def _civitai_lora(bus: Bus, tmp_path: Path, model_id: int, rank: int) -> None:
    data = make_lora_kohya(tmp_path / f"lora{model_id}.safetensors", rank=rank).read_bytes()
    bus.civitai.add_model(model_id, f"Civitai LoRA {model_id}", type="LORA", versions=[{
        "id": model_id * 10, "name": "v1", "baseModel": "SD 1.5",
        "files": [{"name": f"lora{model_id}.safetensors", "content": data, "primary": True}]}])


def test_a_civitai_install_brings_its_preview_as_the_cover(bus: Bus, tmp_path: Path) -> None:
    _civitai_lora(bus, tmp_path, 5101, rank=6)
    result = CliRunner().invoke(cli_app, ["install", "civitai:5101", "--wait", "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr, bus.worker_log())
    key = json.loads(result.stdout)["key"]
    shown = json.loads(CliRunner().invoke(cli_app, ["show", key, "--json"]).stdout)
    assert shown["cover"]["source"] == f"{bus.civitai.url}/images/51010.jpeg"
    assert (shown["cover"]["width"], shown["cover"]["height"]) == (384, 512)  # 768x1024 fitted in 512
    with TestClient(create_app(bus.config)) as http:
        got = http.get(f"/api/v2/models/i/{key}/cover", headers={"Host": "127.0.0.1"})
        assert got.status_code == 200
        with Image.open(io.BytesIO(got.content)) as image:
            assert image.format == "WEBP" and image.size == (384, 512)


def test_a_broken_preview_leaves_the_install_alone(bus: Bus, tmp_path: Path) -> None:
    _civitai_lora(bus, tmp_path, 5102, rank=10)
    bus.civitai.images[51020] = b"<html>not an image</html>"
    with TestClient(create_app(bus.config)) as http:
        job = http.post("/api/v2/models/install", json={"source": "civitai:5102"}, headers={"Host": "127.0.0.1"}).json()
        client = http.app.state.client  # (one record store per process: see services/records/backends.py)
        done = client.wait(job["id"], timeout=TIMEOUT)
        assert done["state"] == "completed", (done, bus.worker_log())
        model = client.get_model(done["key"])
        assert model.cover is None and model.thumbnail_url
    assert "cover_fetch_failed" in bus.worker_log()
