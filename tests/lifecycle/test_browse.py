"""``modelbus ls-remote`` (Hugging Face repos and Civitai models, CLI and API) and ``install --include
--exclude --dry-run``: the files with their sizes, exactly what an install would fetch and where; a dry
run downloads and queues nothing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from modelbus.services.api.routes.lifecycle import InstallPlan, RemoteListing
from modelbus.services.client import AsyncModelBusClient
from tests.fixtures.model_files import make_lora_diffusers, make_lora_kohya
from tests.install.conftest import Bus
from tests.lifecycle.conftest import TIMEOUT, Cli, cli_json


def _repo(bus: Bus, tmp_path: Path, repo_id: str) -> Path:
    folder = make_lora_diffusers(tmp_path / "repo", base="sdxl", folder=True)
    (folder / "README.md").write_text("a card")
    (folder / "extra").mkdir()
    make_lora_kohya(folder / "extra" / "other.safetensors", rank=3)
    (folder / "extra" / "notes.txt").write_text("notes")
    bus.hub.add_repo(repo_id, folder)
    return folder


def test_ls_remote_lists_a_repo_with_sizes_and_the_files_an_install_takes(bus: Bus, cli: Cli, http: TestClient,
                                                                           tmp_path: Path) -> None:
    folder = _repo(bus, tmp_path, "acme/browse-lora")
    listed = cli_json(cli, "ls-remote", "acme/browse-lora")
    sizes = {f["path"]: f["size"] for f in listed["files"]}
    assert sizes == {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    chosen = {f["path"] for f in listed["files"] if f["chosen"]}
    assert "pytorch_lora_weights.safetensors" in chosen and "README.md" not in chosen
    assert "pytorch_lora_weights.safetensors" in cli("ls-remote", "acme/browse-lora").stdout
    sub = cli_json(cli, "ls-remote", "acme/browse-lora:extra")
    assert {f["path"] for f in sub["files"]} == {"other.safetensors", "notes.txt"}
    api = http.get("/api/v2/models/remote", params={"source": "acme/browse-lora:extra"}).json()
    assert api["files"] == sub["files"]
    assert RemoteListing.model_validate(api).repo_id == "acme/browse-lora"  # the answer is what OpenAPI documents


def test_ls_remote_lists_civitai_versions(bus: Bus, cli: Cli, http: TestClient, tmp_path: Path) -> None:
    data = make_lora_kohya(tmp_path / "civ.safetensors", rank=4).read_bytes()
    bus.civitai.add_model(7101, "Browse LoRA", type="LORA", versions=[
        {"id": 71011, "name": "v1", "baseModel": "SD 1.5", "createdAt": "2024-01-01T00:00:00Z",
         "files": [{"name": "old.safetensors", "content": data, "primary": True}]},
        {"id": 71012, "name": "v2", "baseModel": "SD 1.5", "createdAt": "2024-06-01T00:00:00Z",
         "files": [{"name": "new.safetensors", "content": data + b"", "primary": True}]},
    ])
    found = cli_json(cli, "ls-remote", "civitai:7101")
    assert [v["id"] for v in found["versions"]] == [71012, 71011]
    assert found["versions"][0]["chosen"] and not found["versions"][1]["chosen"]
    assert found["versions"][0]["files"][0]["name"] == "new.safetensors"
    assert found["versions"][0]["files"][0]["size"] is not None
    one = http.get("/api/v2/models/remote", params={"source": "civitai:7101@71011"}).json()
    assert [v["id"] for v in one["versions"]] == [71011]
    assert RemoteListing.model_validate(one).kind == "civitai" and RemoteListing.model_validate(found).versions
    assert "Browse LoRA" in cli("ls-remote", "civitai:7101").stdout


def test_install_dry_run_with_globs_shows_exactly_what_an_install_fetches(bus: Bus, cli: Cli, http: TestClient,
                                                                          tmp_path: Path) -> None:
    folder = _repo(bus, tmp_path, "acme/glob-lora")
    jobs = len(cli_json(cli, "jobs"))
    requests = len(bus.hub.requests)
    plan = cli_json(cli, "install", "acme/glob-lora", "--dry-run", "--include", "*.safetensors",
                    "--exclude", "extra/*")
    assert [f["path"] for f in plan["files"]] == ["pytorch_lora_weights.safetensors"]
    assert plan["files"][0]["size"] == (folder / "pytorch_lora_weights.safetensors").stat().st_size
    assert plan["folder"] == "glob-lora" and "glob-lora" in plan["destination"]
    every = cli_json(cli, "install", "acme/glob-lora", "--dry-run", "--include", "**")
    assert {f["path"] for f in every["files"]} == {"README.md", "pytorch_lora_weights.safetensors",
                                                   "extra/other.safetensors", "extra/notes.txt"}
    shown = cli("install", "acme/glob-lora", "--dry-run").stdout
    assert "dry run" in shown and "would install into" in shown
    api = http.post("/api/v2/models/install/plan", json={"source": "acme/glob-lora", "include": ["*.safetensors"],
                                                          "exclude": ["extra/*"]})
    assert api.status_code == 200 and api.json()["files"] == plan["files"]
    assert InstallPlan.model_validate(api.json()).folder == "glob-lora"  # the answer is what OpenAPI documents

    async def planned() -> dict[str, Any]:  # the async client, the same plan
        async with AsyncModelBusClient(bus.config) as aclient:
            return await aclient.plan_install(  # type: ignore[attr-defined,no-any-return]
                "acme/glob-lora", include=["*.safetensors"], exclude=["extra/*"])
    assert asyncio.run(planned())["files"] == plan["files"]
    assert len(cli_json(cli, "jobs")) == jobs  # nothing queued
    assert not any("/resolve/" in r.path for r in bus.hub.requests[requests:])  # nothing downloaded
    # the globs reach a real install: only the chosen file is downloaded
    job = cli_json(cli, "install", "acme/glob-lora", "--include", "*.safetensors", "--exclude", "extra/*",
                   "--wait", "--timeout", str(TIMEOUT))
    assert job["state"] == "completed", job
    installed = bus.config.model_path(json.loads(cli("show", job["key"], "--json").stdout)["path"])
    assert sorted(p.name for p in installed.rglob("*") if p.is_file()) == ["pytorch_lora_weights.safetensors"]


def test_browse_refusals(bus: Bus, cli: Cli, http: TestClient, tmp_path: Path) -> None:
    assert "neither" in cli("ls-remote", "https://example.invalid/x.safetensors", code=2).stderr
    assert cli("ls-remote", "acme/no-such-repo", code=1).stderr.startswith("error: ")
    assert http.get("/api/v2/models/remote", params={"source": "acme/no-such-repo"}).status_code == 502
    assert "Hugging Face repo" in cli("install", "https://example.invalid/a.safetensors", "--include", "*",
                                      "--dry-run", code=2).stderr
    _repo(bus, tmp_path, "acme/empty-glob")
    nothing = cli("install", "acme/empty-glob", "--dry-run", "--include", "*.gguf", code=1)
    assert "matching --include/--exclude" in nothing.stderr
    assert http.post("/api/v2/models/install/plan", json={"source": "acme/x", "include": [""]}).status_code == 422
    assert http.get("/api/v2/models/remote", params={"source": "civitai:7101", "revision": "main"}).status_code == 422
