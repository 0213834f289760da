"""``show`` by a unique key prefix or name, ``show --hash`` and the API's find routes; ambiguity lists the
candidates and changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from tests.fixtures.model_files import make_lora_kohya
from tests.install.conftest import Bus
from tests.lifecycle.conftest import TIMEOUT, Cli, cli_json


def _install(cli: Cli, path: Path, *args: str) -> dict:  # type: ignore[type-arg]
    job = cli_json(cli, "install", str(path), "--wait", "--timeout", str(TIMEOUT), *args)
    assert job["state"] == "completed", job
    return job


def test_show_by_prefix_name_and_hash(bus: Bus, cli: Cli, http: TestClient, tmp_path: Path) -> None:
    first = _install(cli, make_lora_kohya(tmp_path / "findme.safetensors", rank=3), "--name", "find-me")
    key = first["key"]
    record = cli_json(cli, "show", key[:6])
    assert record["key"] == key
    assert cli_json(cli, "show", "find-me")["key"] == key
    table = cli("show", "find-me").stdout
    assert "find-me" in table and key in table
    by_hash = cli_json(cli, "show", "--hash", record["hash"])
    assert [m["key"] for m in by_hash] == [key]
    assert [m["key"] for m in http.get(f"/api/v2/models/by-hash/{record['hash']}").json()] == [key]
    assert http.get("/api/v2/models/find", params={"ref": key[:6]}).json()["key"] == key
    # a forced second copy: the same hash names both; the shared name is ambiguous
    copy = tmp_path / "findme2.safetensors"
    copy.write_bytes((tmp_path / "findme.safetensors").read_bytes())
    second = _install(cli, copy, "--force", "--name", "find-me")
    assert sorted(m["key"] for m in cli_json(cli, "show", "--hash", record["hash"])) == sorted([key, second["key"]])
    ambiguous = cli("show", "find-me", code=4)
    assert key in ambiguous.stderr and second["key"] in ambiguous.stderr
    assert len(ambiguous.stderr.strip().splitlines()) == 1
    answer = http.get("/api/v2/models/find", params={"ref": "find-me"})
    assert answer.status_code == 409 and key in answer.json()["error"]["message"]


def test_find_refusals(bus: Bus, cli: Cli, http: TestClient) -> None:
    assert "no model" in cli("show", "zzzz-no-such", code=3).stderr
    assert "not a BLAKE3 hash" in cli("show", "--hash", "blake3:xyz", code=2).stderr
    assert "sha256" in cli("show", "--hash", "sha256:" + "a" * 64, code=2).stderr
    assert "no model has the hash" in cli("show", "--hash", "blake3:" + "0" * 64, code=3).stderr
    cli("show", code=2)  # neither a reference nor --hash
    assert http.get("/api/v2/models/by-hash/blake3:" + "0" * 64).status_code == 404
    assert http.get("/api/v2/models/by-hash/blake3:nothex!").status_code == 422
    assert http.get("/api/v2/models/find", params={"ref": ""}).status_code == 422
    assert json.loads(http.get("/openapi.json").text)["paths"]["/api/v2/models/find"]["get"]["summary"]


def test_the_async_client_has_the_same_lifecycle_methods(bus: Bus, cli: Cli, http: TestClient, tmp_path: Path) -> None:
    import asyncio

    from modelbus.services.client import AsyncModelBusClient
    from modelbus.services.client.aio import ASYNC_METHODS
    from modelbus.services.install.errors import JobStateError

    job = _install(cli, make_lora_kohya(tmp_path / "async.safetensors", rank=15), "--name", "async-one")
    for name in ("find_model", "models_by_hash", "pause", "resume", "restart", "verify", "prune", "ls_remote",
                 "plan_install"):
        assert name in ASYNC_METHODS

    async def run() -> None:
        async with AsyncModelBusClient(bus.config) as client:
            found = await client.find_model("async-one")  # type: ignore[attr-defined]
            assert found.key == job["key"]
            assert [m.key for m in await client.models_by_hash(found.hash)] == [job["key"]]  # type: ignore[attr-defined]
            checked = await client.verify([job["key"]])  # type: ignore[attr-defined]
            assert checked["healthy"]
            try:
                await client.pause(job["id"])  # type: ignore[attr-defined]
            except JobStateError as exc:
                assert "completed" in str(exc)
            else:
                raise AssertionError("a finished job was paused")
    asyncio.run(run())
