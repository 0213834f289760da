"""``modelbus verify [KEY...] [--repair]`` and ``POST /api/v2/models/verify``: files re-hashed on the hash
worker against their manifests; missing, changed, busy and extra files reported; a non-zero exit when any
is missing, changed or busy; a repair downloads the model's source again and puts back only what broke."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from modelbus.services.client import ModelBusClient
from tests.fixtures.model_files import make_lora_diffusers, make_lora_kohya
from tests.install.conftest import Bus
from tests.lifecycle.conftest import TIMEOUT, Cli, cli_json


def _client(http: TestClient) -> ModelBusClient:
    return http.app.state.client  # type: ignore[attr-defined,no-any-return]


def _installed(client: ModelBusClient, source: str) -> tuple[str, Path]:
    done = client.wait(client.install(source), timeout=TIMEOUT)
    assert done["state"] == "completed", done
    return done["key"], client.config.model_path(client.get_model(done["key"]).path)


def _by_key(result: dict) -> dict:  # type: ignore[type-arg]
    return {m["key"]: m for m in result["models"]}


def test_verify_reports_and_repairs(bus: Bus, cli: Cli, http: TestClient, tmp_path: Path) -> None:
    client = _client(http)
    data = make_lora_kohya(tmp_path / "v_url.safetensors", rank=12).read_bytes()
    url_key, url_file = _installed(client, bus.files.add_file("files/v_url.safetensors", data))
    local_key, local_file = _installed(client, str(make_lora_kohya(tmp_path / "v_local.safetensors", rank=13)))
    folder = make_lora_diffusers(tmp_path / "v_repo", base="sdxl", folder=True)
    bus.hub.add_repo("acme/verify-lora", folder)
    repo_key, repo_dir = _installed(client, "acme/verify-lora")
    recorded = client.get_model(url_key).model_dump(mode="json")
    healthy = cli_json(cli, "verify")
    assert healthy["healthy"] and healthy["summary"]["ok"] == 3
    assert "3 model(s) verified" in cli("verify").stdout
    # break them: a changed byte (same size), a deleted file, a file the folder model never had
    raw = bytearray(url_file.read_bytes())
    raw[-1] ^= 0xFF
    url_file.write_bytes(bytes(raw))
    local_file.unlink()
    (repo_dir / "notes.txt").write_text("mine")
    result = cli_json(cli, "verify", code=1)
    found = _by_key(result)
    assert found[url_key]["status"] == "changed" and found[url_key]["changed"] == [url_file.name]
    assert found[local_key]["status"] == "missing" and found[local_key]["missing"] == [local_file.name]
    assert found[repo_key]["status"] == "ok" and found[repo_key]["extra"] == ["notes.txt"]
    assert not result["healthy"]
    line = cli("verify", url_key[:8], code=1).stderr.strip()
    assert line.startswith("error: 1 model(s) not as recorded") and url_key in line
    # the API: the same answer, for the keys asked
    answer = http.post("/api/v2/models/verify", json={"keys": [url_key]}).json()
    assert [m["status"] for m in answer["models"]] == ["changed"]
    # --repair: the URL model is downloaded again and put back; the local one has no source to come from
    repaired = cli_json(cli, "verify", "--repair", code=1)
    found = _by_key(repaired)
    assert found[url_key]["status"] == "ok" and found[url_key]["repair"]["state"] == "completed"
    assert url_file.read_bytes() == data
    assert found[local_key]["status"] == "missing" and found[local_key]["repair"]["state"] == "skipped"
    assert "not installed from a URL" in found[local_key]["repair"]["error"]
    assert (repo_dir / "notes.txt").exists()  # extra files are reported, never touched
    assert client.get_model(url_key).model_dump(mode="json") == recorded  # the record is unchanged
    client.delete_model(local_key)
    assert cli_json(cli, "verify")["healthy"]


def test_verify_while_a_file_is_being_written(bus: Bus, cli: Cli, http: TestClient, tmp_path: Path) -> None:
    client = _client(http)
    key, path = _installed(client, str(make_lora_kohya(tmp_path / "v_busy.safetensors", rank=14)))
    before = path.read_bytes()
    with open(path, "r+b"):  # a writer holds it open: no verdict, and a repair leaves it alone
        result = cli_json(cli, "verify", key, "--repair", code=1)
        assert result["models"][0]["status"] == "busy" and "open for writing" in result["models"][0]["busy"][0]
        assert "repair" not in result["models"][0]
        assert "verify again when done" in cli("verify", key, code=1).stderr
        api = http.post("/api/v2/models/verify", json={"keys": [key], "repair": True})  # the API: the same verdict
        assert api.status_code == 200 and not api.json()["healthy"], api.text
        assert api.json()["models"][0]["status"] == "busy" and "repair" not in api.json()["models"][0]
    assert path.read_bytes() == before
    assert cli_json(cli, "verify", key)["healthy"]


def test_verify_refusals(bus: Bus, cli: Cli, http: TestClient) -> None:
    assert "no model" in cli("verify", "zz-no-such-model", code=3).stderr
    assert http.post("/api/v2/models/verify", json={"keys": ["zz-no-such-model"]}).status_code == 404
    assert http.post("/api/v2/models/verify", json={"repair": "yes please"}).status_code == 422
    assert http.post("/api/v2/models/verify", json={"timeout": -1}).status_code == 422
    assert http.post("/api/v2/models/verify", json={"keys": [""]}).status_code == 422
