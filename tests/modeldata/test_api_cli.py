"""Per-model data end to end: the HTTP API (in process and a real uvicorn on 127.0.0.1), the CLI, both
clients; bad input for each gets a clear error and changes nothing."""

from __future__ import annotations

import asyncio
import io
import json
import select
import socket
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from modelbus.services.client import AsyncModelBusClient, ModelBusClient
from modelbus.services.config import AppConfig
from tests.client.conftest import model_config, put_file
from tests.modeldata import images
from tests.modeldata.concurrency import run_at_once

MAIN, VAE, LORA = "main-1", "vae-1", "lora-1"


@pytest.fixture()
def seeded(app_config: AppConfig) -> ModelBusClient:
    client = ModelBusClient(app_config)
    for name in ("main.safetensors", "vae.safetensors", "lora.safetensors"):
        put_file(app_config, name)
    client.add_model(MAIN, model_config("main", "main.safetensors"))
    client.add_model(VAE, model_config("vae", "vae.safetensors", model_type="vae"))
    client.add_model(LORA, model_config("lora", "lora.safetensors", model_type="lora", model_format="lycoris"))
    yield client
    client.close()


def _state(client: ModelBusClient) -> dict[str, Any]:
    """What a refused request must leave alone: every record and the log's length."""
    return {"records": [m.model_dump(mode="json") for m in client.list_models()],
            "log": client.store.head(), "covers": sorted(client.redis.keys("*cover*"))}


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in text, text
    return lines[0]


# --- API -----------------------------------------------------------------------------------------

def test_api_settings_links_and_bad_input(http: TestClient, seeded: ModelBusClient) -> None:
    base = "/api/v2/models/i"
    r = http.patch(f"{base}/{MAIN}/settings", json={"settings": {"steps": 30, "cfg_scale": 6.5, "vae": VAE}})
    assert r.status_code == 200 and r.json()["default_settings"]["steps"] == 30
    assert http.get(f"{base}/{MAIN}").json()["default_settings"] == {
        "vae": VAE, "steps": 30, "cfg_scale": 6.5, "scheduler": None, "width": None, "height": None,
        "clip_skip": None, "guidance": None}
    r = http.patch(f"{base}/{LORA}/settings", json={"trigger_phrases": ["neon city", " neon  city "]})
    assert r.status_code == 200 and r.json()["trigger_phrases"] == ["neon city"]
    before = _state(seeded)
    for body, words in (({"settings": {"steps": -3}}, "steps=-3"), ({"settings": {"steps": "x"}}, "steps='x'"),
                        ({"settings": {"vae": "gone"}}, "no model has this key"),
                        ({"settings": {"colour": 1}}, "not a default setting")):
        r = http.patch(f"{base}/{MAIN}/settings", json=body)
        assert r.status_code == 422 and words in r.json()["error"]["message"], r.text
    assert http.patch(f"{base}/nope/settings", json={"settings": {"steps": 3}}).status_code == 404
    assert http.patch(f"{base}/{MAIN}", json={"links": [{"key": VAE, "relation": "uses"}]}).status_code == 422
    assert _state(seeded) == before

    assert http.put(f"{base}/{LORA}/links/{MAIN}").status_code == 200
    assert http.put(f"{base}/{MAIN}/links/{VAE}").status_code == 200
    assert http.get(f"{base}/{MAIN}/links").json() == {
        "links": [{"key": VAE, "relation": "uses"}], "linked_from": [{"key": LORA, "relation": "for"}]}
    before = _state(seeded)
    r = http.put(f"{base}/{LORA}/links/missing-model")
    assert r.status_code == 404 and "no model has this key" in r.json()["error"]["message"]
    assert http.put(f"{base}/{LORA}/links/{MAIN}?relation=sideways").status_code == 422
    assert http.put(f"{base}/{LORA}/links/{LORA}").status_code == 422
    assert http.delete(f"{base}/{VAE}/links/{MAIN}").status_code == 404
    assert _state(seeded) == before
    assert http.delete(f"{base}/{MAIN}/links/{VAE}").status_code == 200
    assert http.get(f"{base}/{VAE}/links").json() == {"links": [], "linked_from": []}
    assert http.delete(f"{base}/{MAIN}").status_code == 200  # its links go with it
    assert http.get(f"{base}/{LORA}").json()["links"] == []


def test_api_cover_upload_get_delete(http: TestClient, seeded: ModelBusClient, app_config: AppConfig) -> None:
    url = f"/api/v2/models/i/{MAIN}/cover"
    assert http.get(url).status_code == 404
    r = http.put(url, content=images.png(1600, 1200), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    cover = r.json()["cover"]
    assert (cover["width"], cover["height"]) == (512, 384) and cover["source"] == "upload"
    got = http.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/webp"
    with Image.open(io.BytesIO(got.content)) as image:
        assert image.format == "WEBP" and image.size == (512, 384)
    host_copy = app_config.root / "covers" / f"{MAIN}.webp"
    assert host_copy.read_bytes() == got.content
    # a host without that file (another machine) serves it from Redis and keeps a copy
    host_copy.unlink()
    assert http.get(url).content == got.content and host_copy.exists()
    r = http.put(url, content=images.jpeg(), headers={"Content-Type": "image/jpeg"})  # a new cover replaces it
    assert r.status_code == 200 and r.json()["cover"]["height"] == 512
    assert len(seeded.redis.keys(f"*cover:{MAIN}:*")) == 1  # the old bytes are gone
    assert http.delete(url).status_code == 200
    assert http.get(url).status_code == 404 and not host_copy.exists()
    assert http.delete(url).status_code == 404


@pytest.mark.parametrize(("body", "kind", "status", "words"), [
    (b"this is not an image at all", "image/png", 422, "is not a PNG, JPEG or WebP image"),
    (images.truncated_png(), "image/png", 422, "is not a readable PNG image"),
    (images.bomb(), "image/png", 413, "decompression bomb"),
    (images.png(), "text/plain", 422, "not 'text/plain'"),
    (b"", "image/png", 422, "is not a PNG"),
])
def test_api_cover_refusals_change_nothing(http: TestClient, seeded: ModelBusClient, body: bytes, kind: str,
                                           status: int, words: str) -> None:
    before = _state(seeded)
    r = http.put(f"/api/v2/models/i/{MAIN}/cover", content=body, headers={"Content-Type": kind})
    assert r.status_code == status and words in r.json()["error"]["message"], r.text
    assert _state(seeded) == before
    assert http.put("/api/v2/models/i/nope/cover", content=images.png(),
                    headers={"Content-Type": "image/png"}).status_code == 404


def test_a_100_mb_cover_is_refused_before_it_is_sent(live_api: str, seeded: ModelBusClient) -> None:
    """A declared 100 MB body is answered 413 at once: the server reads none of it (we send none)."""
    before = _state(seeded)
    host, port = live_api.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"PUT /api/v2/models/i/{MAIN}/cover HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                  f"Content-Length: {100 * 1000 * 1000}\r\n\r\n".encode() + images.png()[:1000])
        answer = s.recv(65536).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer  # (the text is Starlette's: its limit wraps ours)
    assert _state(seeded) == before


def test_a_chunked_cover_is_cut_at_the_route_limit(live_api: str, seeded: ModelBusClient) -> None:
    """Without a declared length the route counts what arrives: 413 once it passes 20 MiB, long before
    the sender's 100 MB are through."""
    before = _state(seeded)
    host, port = live_api.removeprefix("http://").split(":")
    sent, answer = 0, b""
    block = b"\0" * (1 << 20)
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(f"PUT /api/v2/models/i/{MAIN}/cover HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        try:
            while sent < 100 * 1000 * 1000 and not select.select([s], [], [], 0)[0]:
                s.sendall(f"{len(block):x}\r\n".encode() + block + b"\r\n")
                sent += len(block)
        except OSError:
            pass  # the server closed the connection on us: it answered first
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert sent < 100 * 1000 * 1000
    assert _state(seeded) == before


def test_a_cover_over_the_global_body_limit_is_accepted(http: TestClient, seeded: ModelBusClient) -> None:
    big = images.png(4000, 3000)  # a plain image compresses well: a text chunk makes it 2 MiB
    big = big[:33] + _text_chunk(2 << 20) + big[33:]
    assert len(big) > seeded.config.api_max_body
    r = http.put(f"/api/v2/models/i/{MAIN}/cover", content=big, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text


def _text_chunk(size: int) -> bytes:
    import struct
    import zlib
    data = b"Comment\0" + b"x" * size
    return struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))


# --- CLI and the async client ----------------------------------------------------------------------

def test_cli_settings_links_covers(cli, seeded: ModelBusClient, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = json.loads(cli("settings", MAIN, "--steps", "30", "--scheduler", "dpmpp_2m_k", "--width", "768",
                         "--json").stdout)
    assert out["default_settings"]["steps"] == 30 and out["default_settings"]["width"] == 768
    cli("settings", MAIN, "--clear", "width")
    assert seeded.get_model(MAIN).default_settings.width is None  # type: ignore[union-attr]
    cli("settings", LORA, "--trigger", "glow", "--trigger", "city at night")
    shown = json.loads(cli("show", LORA, "--json").stdout)
    assert shown["trigger_phrases"] == ["glow", "city at night"]
    before = _state(seeded)
    assert "steps=0" in _one_line(cli("settings", MAIN, "--steps", "0", code=2).stderr)
    cli("settings", MAIN, "--steps", "many", code=2)  # not a number: typer's usage error
    assert "no default settings" in _one_line(cli("settings", LORA, "--steps", "3", code=2).stderr)
    assert "no model has this key" in _one_line(cli("link", LORA, "ghost", code=3).stderr)
    assert "unknown model key" in _one_line(cli("settings", "ghost", "--steps", "3", code=3).stderr)
    assert _state(seeded) == before

    cli("link", LORA, MAIN)
    assert json.loads(cli("show", MAIN, "--json").stdout)["linked_from"] == [{"key": LORA, "relation": "for"}]
    assert json.loads(cli("links", LORA, "--json").stdout)["links"] == [{"key": MAIN, "relation": "for"}]
    assert "lora-1" in cli("links", MAIN).stdout

    picture = tmp_path / "cover.png"
    picture.write_bytes(images.png(300, 300))
    assert "300x300 WebP" in cli("cover", "set", MAIN, str(picture)).stdout
    cli("cover", "get", MAIN, "-o", str(tmp_path / "out.webp"))
    assert (tmp_path / "out.webp").read_bytes()[8:12] == b"WEBP"
    before = _state(seeded)
    text = tmp_path / "notes.png"
    text.write_text("hello")
    assert "is not a PNG, JPEG or WebP image" in _one_line(cli("cover", "set", MAIN, str(text), code=2).stderr)
    huge = tmp_path / "huge.png"
    with huge.open("wb") as f:
        f.truncate(100 * 1000 * 1000)  # sparse: 100 MB that are never read
    assert "over the cover limit" in _one_line(cli("cover", "set", MAIN, str(huge), code=2).stderr)
    assert "cannot read" in _one_line(cli("cover", "set", MAIN, str(tmp_path / "none.png"), code=2).stderr)
    assert _state(seeded) == before

    cli("rm", MAIN)  # links and the cover go with the model
    assert seeded.get_model(LORA).links == [] and not seeded.redis.keys(f"*cover:{MAIN}:*")
    cli("cover", "get", MAIN, code=3)


def test_async_client_has_the_same_calls(seeded: ModelBusClient) -> None:
    async def run() -> None:
        async with AsyncModelBusClient(client=seeded) as aclient:
            model = await aclient.set_settings(MAIN, {"clip_skip": 2})
            assert model.default_settings.clip_skip == 2
            await aclient.link(LORA, MAIN)
            assert (await aclient.links(MAIN))["linked_from"] == [{"key": LORA, "relation": "for"}]
            await aclient.set_cover(LORA, images.png(64, 64))
            assert (await aclient.get_cover(LORA))[8:12] == b"WEBP"
            assert (await aclient.delete_cover(LORA)).cover is None
            assert (await aclient.unlink(LORA, MAIN)).links == []
            assert (await aclient.links(MAIN))["linked_from"] == []
    asyncio.run(run())
    # each change is an event in the log, on the model it changed
    assert [s.event.type for s in seeded.history(LORA)][1:] == ["ModelLinked", "ModelCoverChanged",
                                                                "ModelCoverChanged", "ModelUnlinked"]
    assert [s.event.type for s in seeded.history(MAIN)][1:] == ["ModelSettingsChanged"]
    assert not seeded.redis.keys(f"*cover:{LORA}:*")  # the deleted cover's bytes went with it


def test_concurrent_covers_leave_exactly_the_recorded_bytes(seeded: ModelBusClient) -> None:
    """Six writers set six covers at once: the record names one, and Redis holds that one's bytes only."""
    errors = run_at_once(lambda n: seeded.set_cover(MAIN, images.png(64 + n, 64, (n * 40, 10, 10))), 6)
    assert errors == []
    cover = seeded.get_model(MAIN).cover
    assert cover is not None
    assert [k.decode() for k in seeded.redis.keys(f"*cover:{MAIN}:*")] == [seeded.store.keys.cover(MAIN, cover.blake3)]
    assert seeded.get_cover(MAIN)[8:12] == b"WEBP"
