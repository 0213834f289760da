"""The first cover comes with the install: Civitai's preview image, or a Hugging Face repo's card image (its
gallery, else the first image file at its top), fetched by the worker that records the model (through the
CLI and the API, against the local Civitai and Hugging Face servers); a broken or oversized image fails
nothing, and the fetch goes through the download client's private-address guard."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from modelbus.services.api import create_app
from modelbus.services.cli import app as cli_app
from modelbus.services.covers.fetch import fetch_image
from modelbus.services.covers.limits import MAX_COVER_BYTES
from modelbus.services.download.errors import RemoteError, UnsafeURLError
from tests.fixtures import make_lora_kohya
from tests.install.conftest import Bus, _bus
from tests.modeldata.images import jpeg, png
from tests.servers.file_server import Fault
from tests.servers.hf_server import HFServer

TIMEOUT = 240.0
COVER_FETCH_TIMEOUT = 5  # the workers' time for a preview image, all of it (a slow image ends past it)


@pytest.fixture(scope="module")
def bus(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    yield from _bus(redis_url, tmp_path_factory.mktemp("cover-bus"), start_workers=1,
                    extra_env={"MODELBUS_COVER_FETCH_TIMEOUT": str(COVER_FETCH_TIMEOUT)})


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


def _hf_lora(bus: Bus, tmp_path: Path, repo: str, rank: int, images: dict[str, bytes],
             card: dict[str, object] | None = None) -> str:
    """A Hugging Face repo of one LoRA file and ``images`` beside it; returns its commit."""
    folder = tmp_path / repo.split("/")[1]
    make_lora_kohya(folder / f"lora_{rank}.safetensors", rank=rank)
    for name, data in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return bus.hub.add_repo(repo, folder, card=card)


def _install(bus: Bus, source: str) -> dict[str, object]:
    result = CliRunner().invoke(cli_app, ["install", source, "--wait", "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr, bus.worker_log())
    key = json.loads(result.stdout)["key"]
    return json.loads(CliRunner().invoke(cli_app, ["show", key, "--json"]).stdout)  # type: ignore[no-any-return]


def test_a_hugging_face_install_brings_its_card_image_as_the_cover(bus: Bus, tmp_path: Path) -> None:
    # the card's gallery (widget outputs, as the hub's model page shows it) comes first
    commit = _hf_lora(bus, tmp_path, "acme/cover-gallery", 14, {"images/sample.png": png(768, 1024), "aaa.jpg": jpeg()},
                      card={"widget": [{"text": "a cat", "output": {"url": "images/sample.png"}}]})
    shown = _install(bus, "acme/cover-gallery")
    assert shown["cover"]["source"] == f"{bus.hub.url}/acme/cover-gallery/resolve/{commit}/images/sample.png"
    assert (shown["cover"]["width"], shown["cover"]["height"]) == (384, 512)
    with TestClient(create_app(bus.config)) as http:
        got = http.get(f"/api/v2/models/i/{shown['key']}/cover", headers={"Host": "127.0.0.1"})
        with Image.open(io.BytesIO(got.content)) as image:
            assert got.status_code == 200 and image.format == "WEBP" and image.size == (384, 512)
    # no gallery: the first image file at the top of the repo (as SDXL base's 01.png, FLUX.1-dev's dev_grid.jpg)
    commit = _hf_lora(bus, tmp_path, "acme/cover-grid", 15, {"grid.jpg": jpeg(300, 900), "zz.png": png(),
                                                             "samples/a.png": png()})
    shown = _install(bus, "acme/cover-grid")
    assert shown["cover"]["source"] == f"{bus.hub.url}/acme/cover-grid/resolve/{commit}/grid.jpg"
    assert shown["cover"]["height"] == 512
    # a repo without images: no cover, no request for one
    _hf_lora(bus, tmp_path, "acme/cover-none", 16, {})
    shown = _install(bus, "acme/cover-none")
    assert shown["cover"] is None and shown["thumbnail_url"] is None


def test_a_bad_hugging_face_image_leaves_the_install_alone(bus: Bus, tmp_path: Path) -> None:
    big = b"\x89PNG\r\n\x1a\n" + bytes(MAX_COVER_BYTES)  # over the limit: its download stops at the limit
    for rank, name, data in ((17, "preview.png", b"<html>not an image</html>"), (18, "huge.png", big)):
        _hf_lora(bus, tmp_path, f"acme/cover-bad-{rank}", rank, {name: data})
        with TestClient(create_app(bus.config)) as http:
            job = http.post("/api/v2/models/install", json={"source": f"acme/cover-bad-{rank}"},
                            headers={"Host": "127.0.0.1"}).json()
            done = http.app.state.client.wait(job["id"], timeout=TIMEOUT)
            assert done["state"] == "completed", (done, bus.worker_log())
            model = http.app.state.client.get_model(done["key"])
            assert model.cover is None and model.thumbnail_url.endswith(name)
    # an image whose server pauses past the fetch's time (though never as long as a read's timeout)
    _hf_lora(bus, tmp_path, "acme/cover-slow", 19, {"slow.png": png(400, 400)})
    bus.hub.set_fault("acme/cover-slow", "slow.png", Fault(stall_after=200, stall_seconds=2 * COVER_FETCH_TIMEOUT))
    shown = _install(bus, "acme/cover-slow")
    assert shown["cover"] is None and shown["thumbnail_url"].endswith("slow.png")
    log = "".join(p.read_text(errors="replace") for p in bus.logs.glob("*.log"))
    assert "is not a PNG, JPEG or WebP image" in log and f"over the cover limit of {MAX_COVER_BYTES}" in log
    assert f"took longer than {COVER_FETCH_TIMEOUT} s to send" in log


def test_the_image_is_fetched_through_the_download_guard(bus: Bus) -> None:
    guarded = bus.config.model_copy(update={"allow_private_downloads": False})
    with pytest.raises(UnsafeURLError):
        fetch_image(guarded, f"{bus.hub.url}/acme/cover-gallery/resolve/main/images/sample.png")


def test_a_gated_repo_image_takes_the_hub_token_and_no_other_host_gets_it(bus: Bus, tmp_path: Path) -> None:
    image = png(64, 64)
    (tmp_path / "gated").mkdir()
    (tmp_path / "gated" / "cover.png").write_bytes(image)
    with HFServer(require_token="hub-s3cret") as gated:
        gated.add_repo("acme/gated", tmp_path / "gated")
        url = f"{gated.url}/acme/gated/resolve/main/cover.png"
        with_token = bus.config.model_copy(update={"hf_endpoint": gated.url, "hf_token": "hub-s3cret"})
        assert fetch_image(with_token, url) == image
        with pytest.raises(RemoteError, match="401"):  # a token configured for another host is not sent here
            fetch_image(bus.config.model_copy(update={"hf_token": "hub-s3cret"}), url)
