"""The Hugging Face cache: files it holds are taken from it (hard link or copy, verified, the cache left as it
was), HF_HUB_OFFLINE installs from it alone, `scan $HF_HOME/hub` names snapshots by repo id, and the token
file of `hf auth login` is used when HF_TOKEN is unset. The cache is made by the real huggingface_hub client
(in a subprocess, online against the local hub) from the local Hugging Face server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from modelbus.services import hfcache
from modelbus.services.api import create_app
from modelbus.services.api.routes.lifecycle import RemoteListing
from modelbus.services.cli import app as cli_app
from modelbus.services.client import ModelBusClient
from modelbus.services.client.aio import AsyncModelBusClient
from modelbus.services.config import AppConfig
from modelbus.services.covers.fetch import fetch_image
from modelbus.services.download.errors import HFOfflineError
from tests.fixtures import make_vae_diffusers
from tests.install.conftest import Bus, _bus

TIMEOUT = 240.0
HOST = {"Host": "127.0.0.1"}
REPO = "acme/cached-vae"
SCANNED = "acme/scanned-vae"  # (a twin of REPO's model would be a duplicate: its config differs)


def _fill_cache(hub_url: str, cache: Path, repo: str) -> Path:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODELBUS_"))}
    code = ("import sys, huggingface_hub; print(huggingface_hub.snapshot_download("
            f"{repo!r}, endpoint={hub_url!r}, cache_dir={str(cache)!r}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cached(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Bus, Path]]:
    """A bus whose worker sees a Hugging Face cache (HF_HOME) holding REPO."""
    tmp = tmp_path_factory.mktemp("hfcache")
    home = tmp / "hf-home"
    for bus in _bus(redis_url, tmp, start_workers=0, extra_env={"HF_HOME": str(home), "HF_TOKEN_PATH": ""}):
        bus.hub.add_repo(REPO, make_vae_diffusers(tmp / "vae"))
        other = make_vae_diffusers(tmp / "vae2")
        config = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**config, "_name_or_path": SCANNED}))
        bus.hub.add_repo(SCANNED, other)
        for repo in (REPO, SCANNED):
            _fill_cache(bus.hub.url, home / "hub", repo)
        bus.start_worker()
        yield bus, home


def _run(*args: str, code: int = 0):  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(cli_app, list(args))
    assert result.exit_code == code, (args, result.stdout, result.stderr)
    return result


def _blob_bytes(home: Path) -> dict[str, bytes]:
    blobs = home / "hub" / f"models--{REPO.replace('/', '--')}" / "blobs"
    return {p.name: p.read_bytes() for p in sorted(blobs.iterdir())}


def test_an_install_takes_what_the_cache_holds(cached: tuple[Bus, Path]) -> None:
    bus, home = cached
    before = _blob_bytes(home)
    weights = next(n for n in bus.hub.repos[REPO].files if n.endswith(".safetensors"))
    asked_before = len([r for r in bus.hub.requests if r.path.endswith(weights)])
    done = json.loads(_run("install", REPO, "--wait", "--json", "--timeout", str(TIMEOUT)).stdout)
    assert done["state"] == "completed", (done, bus.worker_log())
    assert [r for r in bus.hub.requests if r.path.endswith(weights)][asked_before:] == []  # never downloaded
    assert "hf_cache_hit" in bus.worker_log()
    with ModelBusClient(bus.config) as client:
        model = client.get_model(done["key"])
        installed = bus.config.model_path(model.path) / weights
    sha = bus.hub.repos[REPO].files[weights].sha256
    blob = home / "hub" / f"models--{REPO.replace('/', '--')}" / "blobs" / str(sha)
    assert installed.read_bytes() == blob.read_bytes()
    assert os.path.samefile(installed, blob) or installed.stat().st_ino != blob.stat().st_ino  # a link or a copy
    assert _blob_bytes(home) == before  # the cache is as it was


def test_scan_of_the_hub_cache_names_snapshots_by_repo_id(cached: tuple[Bus, Path]) -> None:
    bus, home = cached
    added = json.loads(_run("scan", str(home / "hub"), "--json").stdout)["added"]
    with ModelBusClient(bus.config) as client:
        names = {client.get_model(k).name for k in added}
    assert SCANNED in names and not any(len(n) == 40 for n in names)  # not a commit hash


def test_offline_installs_come_from_the_cache_alone(redis_url: str, tmp_path: Path,
                                                   cached: tuple[Bus, Path]) -> None:
    first, home = cached  # (its hub published what the cache holds)
    env = {"HF_HOME": str(home), "MODELBUS_HF_OFFLINE": "1"}
    for bus in _bus(redis_url, tmp_path, start_workers=1, extra_env=env):
        bus.hub.add_repo("acme/not-cached", make_vae_diffusers(tmp_path / "other"))
        asked = len(bus.hub.requests)
        missing = _run("install", "acme/not-cached", "--wait", "--timeout", str(TIMEOUT), code=1)
        assert "is not in the Hugging Face cache" in missing.stderr and "MODELBUS_HF_OFFLINE=1" in missing.stderr
        assert len([line for line in missing.stderr.splitlines() if line.startswith("error:")]) == 1
        done = json.loads(_run("install", REPO, "--wait", "--json", "--timeout", str(TIMEOUT)).stdout)
        assert done["state"] == "completed", (done, bus.worker_log())
        # browsing: the cache's snapshot, every file with its size (and an LFS file's sha256, its blob's name)
        listed = json.loads(_run("ls-remote", REPO, "--json").stdout)
        published = first.hub.repos[REPO].files
        weights = next(n for n in published if n.endswith(".safetensors"))
        entry = next(f for f in listed["files"] if f["path"] == weights)
        assert listed["offline"] and entry["size"] == published[weights].size
        assert entry["sha256"] == published[weights].sha256
        for command in (("ls-remote", "acme/not-cached"), ("install", "acme/not-cached", "--dry-run")):
            refused = _run(*command, code=2).stderr.strip()
            assert len(refused.splitlines()) == 1 and "acme/not-cached" in refused
            assert "not in the Hugging Face cache" in refused and "MODELBUS_HF_OFFLINE=1" in refused
        # a file's URL: the cache's copy of it, or a refusal naming it
        url = f"{bus.hub.url}/{SCANNED}/resolve/main/{weights}"
        by_url = json.loads(_run("install", url, "--wait", "--json", "--timeout", str(TIMEOUT)).stdout)
        assert by_url["state"] == "completed", (by_url, bus.worker_log())
        gone = _run("install", f"{bus.hub.url}/{SCANNED}/resolve/main/nothing.safetensors", "--wait", "--timeout",
                    str(TIMEOUT), code=1).stderr.strip()
        assert "nothing.safetensors is not in the Hugging Face cache" in gone
        assert len([line for line in gone.splitlines() if line.startswith("error:")]) == 1
        # a thumbnail (or any request the download client would send there) is refused before it is sent
        with pytest.raises(HFOfflineError, match="MODELBUS_HF_OFFLINE=1 forbids network access to Hugging Face"):
            fetch_image(bus.config, f"{bus.hub.url}/{REPO}/resolve/main/cover.png")
        # the API: the same cached listing, the same refusal of what the cache lacks
        with TestClient(create_app(bus.config)) as http:
            api = http.get("/api/v2/models/remote", params={"source": REPO}, headers=HOST)
            assert api.status_code == 200 and RemoteListing.model_validate(api.json()).offline, api.text
            assert api.json()["files"] == listed["files"]
            plan = http.post("/api/v2/models/install/plan", json={"source": "acme/not-cached"}, headers=HOST)
            assert plan.status_code == 422 and "not in the Hugging Face cache" in plan.json()["error"]["message"]
        assert len(bus.hub.requests) == asked  # not one request to the hub
        with ModelBusClient(bus.config) as client:
            assert sorted(m.key for m in client.list_models()) == sorted([done["key"], by_url["key"]])
            assert client.get_model(by_url["key"]).path.endswith(weights)  # the file's name, not its blob's


@pytest.mark.parametrize(("hub_offline", "own", "public", "mirror"), [
    ("1", None, "HF_HUB_OFFLINE=1", None),  # the libraries' flag: the public Hub only (a mirror is the operator's)
    ("1", "0", None, None),  # MODELBUS_HF_OFFLINE overrides it either way
    (None, "1", "MODELBUS_HF_OFFLINE=1", "MODELBUS_HF_OFFLINE=1"),
    ("0", "1", "MODELBUS_HF_OFFLINE=1", "MODELBUS_HF_OFFLINE=1"),
    (None, None, None, None),
])
def test_which_variable_makes_hugging_face_offline(monkeypatch: pytest.MonkeyPatch, hub_offline: str | None,
                                                   own: str | None, public: str | None, mirror: str | None) -> None:
    for name, value in (("HF_HUB_OFFLINE", hub_offline), ("MODELBUS_HF_OFFLINE", own)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    endpoint = "http://mirror.example:8080"
    for url in ("https://huggingface.co/api/models/a/b", "https://cdn-lfs.huggingface.co/x", "https://hf.co/a/b"):
        assert hfcache.offline_for_url(url, endpoint) == public
    assert hfcache.offline_for_url(f"{endpoint}/a/b/resolve/main/x", endpoint) == mirror
    assert hfcache.offline_for_url("https://civitai.com/api/v1/models/1", endpoint) is None
    assert hfcache.offline_for_url("https://nothuggingface.co/x", endpoint) is None


def test_hf_hub_cache_names_the_cache_over_hf_home(cached: tuple[Bus, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_CACHE (and its old name) places the cache itself: browsing offline reads that one, not HF_HOME's."""
    _, home = cached
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))  # holds no cache
    monkeypatch.setenv("MODELBUS_HF_OFFLINE", "1")
    missing = _run("ls-remote", REPO, code=2).stderr
    assert str(tmp_path / "elsewhere" / "hub") in missing and "not in the Hugging Face cache" in missing
    for name in ("HUGGINGFACE_HUB_CACHE", "HF_HUB_CACHE"):
        monkeypatch.setenv(name, str(home / "hub"))
        assert hfcache.hub_cache() == home / "hub"
        assert json.loads(_run("ls-remote", REPO, "--json").stdout)["repo_id"] == REPO
        monkeypatch.delenv(name)

    async def browse() -> dict[str, object]:  # the async client, the same call
        async with AsyncModelBusClient(AppConfig.load()) as client:
            return await client.ls_remote(REPO)  # type: ignore[attr-defined,no-any-return]
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    assert asyncio.run(browse())["offline"] is True


def test_a_public_hub_url_under_hf_hub_offline_is_refused_before_any_connection(
        modelbus_env: dict[str, str]) -> None:
    from modelbus.services.config import AppConfig
    config = AppConfig.load()
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(HFOfflineError, match=r"not calling huggingface.co .*HF_HUB_OFFLINE=1"):
        fetch_image(config, "https://huggingface.co/acme/x/resolve/main/cover.png")  # (no network here: no DNS)


def test_the_login_token_file_is_used_when_hf_token_is_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    assert AppConfig.load(root=tmp_path).hf_token is None
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "token").write_text("hf_fromlogin\n")
    config = AppConfig.load(root=tmp_path)
    assert config.hf_token == "hf_fromlogin" and "hf_fromlogin" in config.secret_values
    monkeypatch.setenv("HF_TOKEN", "hf_fromenv")
    assert AppConfig.load(root=tmp_path).hf_token == "hf_fromenv"
