"""Starter models: the shipped catalogue, `modelbus starters`, `install --starter/--bundle` with dependencies,
through the CLI and the API, against stand-ins the local Hugging Face server serves under the real repo ids."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from typer.testing import CliRunner

from modelbus.services.api import create_app
from modelbus.services.api.routes.modeldata import StarterQueued, Starters
from modelbus.services.catalog import Catalog, load_catalog
from modelbus.services.cli import app as cli_app
from modelbus.services.client import AsyncModelBusClient, ModelBusClient
from tests.fixtures import (
    make_clip_vision,
    make_controlnet_diffusers,
    make_ip_adapter,
    make_tiny_sd_diffusers,
    make_vae_diffusers,
)
from tests.install.conftest import Bus

TIMEOUT = 300.0
HOST = {"Host": "127.0.0.1"}


def test_the_shipped_catalogue_holds_what_people_start_with() -> None:
    catalog = load_catalog()
    names = {s.name for s in catalog.models}
    assert {"sd-1.5", "sdxl-base", "sdxl-refiner", "sd-3.5-medium", "sd-3.5-large", "flux.1-schnell", "flux.1-dev",
            "flux-vae", "t5-xxl-encoder", "sdxl-vae-fp16-fix", "controlnet-canny-sd15", "ip-adapter-sd15"} <= names
    assert {b.name for b in catalog.bundles} == {"sd-1", "sdxl", "flux"}
    flux = [s.name for s in catalog.with_dependencies(catalog.bundle("flux").models)]
    assert flux == ["flux-vae", "t5-xxl-encoder", "clip-l-encoder", "flux.1-schnell"]  # dependencies first
    # what a FLUX.1 conversion takes besides the VAE: CLIP-L, and T5-XXL in a folder holding its tokenizer
    assert catalog.starter("clip-l-encoder").type.value == "clip_embed"
    assert catalog.starter("t5-xxl-encoder").source == "InvokeAI/t5-v1_1-xxl:bfloat16"
    assert catalog.starter("flux.1-schnell").install_source("http://hub") == \
        "http://hub/black-forest-labs/FLUX.1-schnell/resolve/main/flux1-schnell.safetensors"


@pytest.mark.parametrize(("data", "words"), [
    ({"models": [{"name": "a", "description": "", "source": "o/a", "type": "main", "base": "sd-1", "size": 1,
                  "dependencies": ["b"]}]}, "depends on unknown"),
    ({"models": [{"name": "a", "description": "", "source": "o/a", "type": "main", "base": "sd-1", "size": 1,
                  "dependencies": ["b"]},
                 {"name": "b", "description": "", "source": "o/b", "type": "vae", "base": "sd-1", "size": 1,
                  "dependencies": ["a"]}]}, "dependency cycle"),
    ({"models": [{"name": "a", "description": "", "type": "main", "base": "sd-1", "size": 1}]}, "exactly one of"),
    ({"models": [], "bundles": [{"name": "x", "description": "", "models": ["nope"]}]}, "names unknown"),
])
def test_a_broken_catalogue_is_refused(data: dict, words: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValidationError, match=words):
        Catalog.model_validate(data)


@pytest.fixture(scope="module")
def stand_ins(bus: Bus, tmp_path_factory: pytest.TempPathFactory) -> Bus:
    """Tiny models under the sd-1 bundle's repo ids (and h94/IP-Adapter's layout)."""
    tmp = tmp_path_factory.mktemp("starters")
    bus.hub.add_repo("stable-diffusion-v1-5/stable-diffusion-v1-5", make_tiny_sd_diffusers(tmp / "sd15"))
    bus.hub.add_repo("stabilityai/sd-vae-ft-mse", make_vae_diffusers(tmp / "vae"))
    bus.hub.add_repo("lllyasviel/control_v11p_sd15_canny", make_controlnet_diffusers(tmp / "canny"))
    depth = make_controlnet_diffusers(tmp / "depth")
    config = json.loads((depth / "config.json").read_text())
    (depth / "config.json").write_text(json.dumps({**config, "_name_or_path": "depth"}))  # not canny's twin
    bus.hub.add_repo("lllyasviel/control_v11f1p_sd15_depth", depth)
    h94 = tmp / "h94"
    make_clip_vision(h94 / "models" / "image_encoder")
    make_ip_adapter(h94 / "models" / "ip-adapter_sd15.safetensors")
    bus.hub.add_repo("h94/IP-Adapter", h94)
    return bus


def _cli(*args: str, code: int = 0):  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(cli_app, list(args))
    assert result.exit_code == code, (args, result.stdout, result.stderr)
    return result


def test_install_a_starter_with_its_dependency_then_the_bundle(stand_ins: Bus) -> None:
    result = _cli("install", "--starter", "ip-adapter-sd15", "--wait", "--json", "--timeout", str(TIMEOUT))
    done = json.loads(result.stdout)
    assert [e["starter"] for e in done] == ["ip-adapter-image-encoder", "ip-adapter-sd15"]
    assert all(e["job"]["state"] == "completed" for e in done), (done, stand_ins.worker_log())
    listed = {s["name"]: s for s in json.loads(_cli("starters", "--json").stdout)["models"]}
    assert listed["ip-adapter-sd15"]["installed"] == done[1]["job"]["key"]
    assert listed["ip-adapter-image-encoder"]["installed"] == done[0]["job"]["key"]
    assert listed["sd-1.5"]["installed"] is None
    with ModelBusClient(stand_ins.config) as client:
        assert client.get_model(done[1]["job"]["key"]).model_type.value == "ip_adapter"

    # the bundle over HTTP: what is there already is reported, the rest installed
    with TestClient(create_app(stand_ins.config)) as http:
        r = http.post("/api/v2/models/starters/install", json={"bundle": "sd-1"}, headers=HOST)
        assert r.status_code == 202, r.text
        entries = r.json()
        assert [StarterQueued.model_validate(e).starter for e in entries] == ["sd-1.5", "sd-vae-ft-mse", "controlnet-canny-sd15",
                                                   "controlnet-depth-sd15", "ip-adapter-image-encoder",
                                                   "ip-adapter-sd15"]
        assert entries[-1]["installed"] == done[1]["job"]["key"] and "job" not in entries[-1]
        client = http.app.state.client  # (one record store per process: see services/records/backends.py)
        for entry in entries:
            if "job" in entry:
                final = client.wait(entry["job"]["id"], timeout=TIMEOUT)
                assert final["state"] == "completed", (entry, final, stand_ins.worker_log())
        r = http.get("/api/v2/models/starters", headers=HOST)
        assert r.status_code == 200, r.text
        listed = {s["name"]: s for s in r.json()["models"]}
        assert Starters.model_validate(r.json()).bundles  # the answer is what OpenAPI documents
    assert all(listed[n]["installed"] for n in ("sd-1.5", "sd-vae-ft-mse", "controlnet-canny-sd15"))
    assert listed["sdxl-base"]["installed"] is None

    async def again() -> tuple[dict[str, Any], list[dict[str, Any]]]:  # the async client, the same calls
        async with AsyncModelBusClient(stand_ins.config) as aclient:
            return (await aclient.starters(),  # type: ignore[attr-defined]
                    await aclient.install_starters(["ip-adapter-sd15"]))  # type: ignore[attr-defined]
    shown, queued = asyncio.run(again())
    assert {s["name"]: s["installed"] for s in shown["models"]} == {n: s["installed"] for n, s in listed.items()}
    assert queued == [{"starter": "ip-adapter-image-encoder", "installed": listed["ip-adapter-image-encoder"]["installed"]},
                      {"starter": "ip-adapter-sd15", "installed": done[1]["job"]["key"]}]  # nothing queued again


def test_unknown_starters_and_bundles_are_refused_before_anything_starts(stand_ins: Bus) -> None:
    jobs = len(json.loads(_cli("jobs", "--json").stdout))
    assert "no starter model 'sd-9'" in _cli("install", "--starter", "sd-9", code=3).stderr
    assert "no starter bundle 'sd-2'" in _cli("install", "--bundle", "sd-2", code=3).stderr
    assert "not both" in _cli("install", "x/y", "--starter", "sd-1.5", code=2).stderr
    with TestClient(create_app(stand_ins.config)) as http:
        r = http.post("/api/v2/models/starters/install", json={"names": ["sd-1.5", "nope"]}, headers=HOST)
        assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    assert len(json.loads(_cli("jobs", "--json").stdout)) == jobs


def test_gated_starters_say_so(tmp_path: Path) -> None:
    gated = {s.name for s in load_catalog().models if s.gated}
    assert {"flux.1-dev", "sd-3.5-medium", "sd-3.5-large"} <= gated and "flux.1-schnell" not in gated
