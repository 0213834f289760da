"""Install outcomes: content already installed is success (the existing key, exit 0) unless --force; a URL
download checked against the caller's SHA-256 or BLAKE3 fails on a mismatch and leaves nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import blake3
from fastapi.testclient import TestClient

from modelbus.services.install.placement import staging_dir
from tests.fixtures.model_files import make_lora_kohya
from tests.install.conftest import Bus
from tests.lifecycle.conftest import TIMEOUT, Cli, cli_json
from tests.waiting import wait_until


def _files_under(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} if path.exists() else set()


def test_installing_installed_content_is_success_with_the_existing_key(bus: Bus, cli: Cli, http: TestClient,
                                                                        tmp_path: Path) -> None:
    source = make_lora_kohya(tmp_path / "again.safetensors", rank=6)
    first = cli_json(cli, "install", str(source), "--wait", "--timeout", str(TIMEOUT))
    assert first["state"] == "completed" and not first["already_installed"]
    copy = tmp_path / "again_copy.safetensors"
    copy.write_bytes(source.read_bytes())
    before = _files_under(bus.config.models_path)
    again = cli("install", str(copy), "--wait", "--timeout", str(TIMEOUT))
    assert f"already installed as {first['key']}" in again.stdout
    assert _files_under(bus.config.models_path) == before  # no second copy, no staging left
    # the API: the same source by URL completes the same way
    url = bus.files.add_file("files/again.safetensors", source.read_bytes())
    job = http.post("/api/v2/models/install", json={"source": url}).json()
    done = http.app.state.client.wait(job, timeout=TIMEOUT)  # type: ignore[attr-defined]
    assert done["state"] == "completed" and done["already_installed"] and done["key"] == first["key"]
    assert http.get(f"/api/v2/models/install/{job['id']}").json()["already_installed"] is True
    # --force asks for a second copy under a new key
    forced = cli_json(cli, "install", str(copy), "--force", "--wait", "--timeout", str(TIMEOUT))
    assert forced["state"] == "completed" and forced["key"] != first["key"] and not forced["already_installed"]


def test_expected_hashes_verify_a_url_download(bus: Bus, cli: Cli, http: TestClient, tmp_path: Path) -> None:
    data = make_lora_kohya(tmp_path / "hashed.safetensors", rank=10).read_bytes()
    url = bus.files.add_file("files/hashed.safetensors", data)
    wrong = "0" * 64
    before = _files_under(bus.config.models_path)
    failed = cli_json(cli, "install", url, "--sha256", wrong, "--wait", "--timeout", str(TIMEOUT), code=1)
    assert failed["state"] == "error" and "sha256" in failed["error"]
    # the hash step, which runs after the failed download, removes the staging folder
    wait_until(lambda: not staging_dir(bus.config, failed["id"]).exists(), TIMEOUT, "the staging folder removed")
    assert _files_under(bus.config.models_path) == before
    failed = cli_json(cli, "install", url, "--blake3", wrong, "--wait", "--timeout", str(TIMEOUT), code=1)
    assert failed["state"] == "error" and failed["error_type"] == "ExpectedHashError" and wrong in failed["error"]
    assert _files_under(bus.config.models_path) == before
    # the API and the client: the same check, the same failure, nothing left
    job = http.post("/api/v2/models/install", json={"source": url, "sha256": wrong})
    assert job.status_code == 202, job.text
    failed = http.app.state.client.wait(job.json(), timeout=TIMEOUT)  # type: ignore[attr-defined]
    assert failed["state"] == "error" and "sha256" in failed["error"], failed  # (checked as it downloads)
    wait_until(lambda: not staging_dir(bus.config, failed["id"]).exists(), TIMEOUT, "the staging folder removed")
    assert _files_under(bus.config.models_path) == before
    good = cli_json(cli, "install", url, "--sha256", hashlib.sha256(data).hexdigest().upper(),
                    "--blake3", blake3.blake3(data).hexdigest(), "--wait", "--timeout", str(TIMEOUT))
    assert good["state"] == "completed", good


def test_bad_expected_hashes_are_refused_before_anything_is_queued(bus: Bus, cli: Cli, http: TestClient,
                                                                   tmp_path: Path) -> None:
    jobs = len(cli_json(cli, "jobs"))
    bad = cli("install", "https://example.invalid/m.safetensors", "--sha256", "xyz", code=2)
    assert "64 hexadecimal digits" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    local = make_lora_kohya(tmp_path / "local.safetensors", rank=2)
    refused = cli("install", str(local), "--blake3", "a" * 64, code=2)
    assert "plain URL download" in refused.stderr
    assert http.post("/api/v2/models/install", json={"source": "owner/repo", "sha256": "a" * 64}).status_code == 422
    assert http.post("/api/v2/models/install", json={"source": "http://x.invalid/a", "sha256": "nothex"}).status_code == 422
    assert len(cli_json(cli, "jobs")) == jobs
