"""``modelbus store push|verify|gc`` in-process against a real Redis and the S3 test server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelbus.services.cli import app
from modelbus.services.config import AppConfig
from modelbus.services.install import ModelInstallService
from modelbus.services.store import file_digest, open_store, parse_store_url
from modelbus.services.store.s3 import S3BlobStore
from tests.fixtures.model_files import make_lora_kohya, make_vae_checkpoint
from tests.servers.s3_server import S3Server


def _cli(*args: str, code: int = 0) -> dict:  # type: ignore[type-arg]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == code, (args, result.stdout, result.stderr)
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _register(path: Path) -> str:
    service = ModelInstallService(AppConfig.load())
    try:
        return service.register_path(path)
    finally:
        service.record_store.close()


@pytest.fixture()
def s3_env(modelbus_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, s3_server: S3Server, s3_url: str) -> str:
    monkeypatch.setenv("MODELBUS_S3_ENDPOINT_URL", s3_server.url)
    monkeypatch.setenv("MODELBUS_STORE_URL", s3_url)
    monkeypatch.setenv("MODELBUS_IMPORT_ROOTS", str(Path(modelbus_env["MODELBUS_ROOT"])))
    return s3_url


def test_push_uploads_a_shared_deployment(s3_env: str, monkeypatch: pytest.MonkeyPatch, modelbus_env: dict[str, str],
                                          s3_server: S3Server) -> None:
    monkeypatch.setenv("MODELBUS_STORE_URL", "shared")
    model = make_lora_kohya(Path(modelbus_env["MODELBUS_ROOT"]) / "old_lora.safetensors")
    _register(model)
    monkeypatch.setenv("MODELBUS_STORE_URL", s3_env)
    store = open_store(AppConfig.load())
    assert store is not None and store.size_of(file_digest(model)) is None
    report = _cli("store", "push")
    assert report["models"] == 1 and report["bytes"] == model.stat().st_size
    assert store.size_of(file_digest(model)) == model.stat().st_size
    assert _cli("store", "push")["bytes"] == 0  # what the store holds is not sent again


def test_verify_names_a_corrupt_blob_and_gc_removes_only_unreferenced_ones(
        s3_env: str, modelbus_env: dict[str, str], s3_server: S3Server, tmp_path: Path) -> None:
    model = make_vae_checkpoint(Path(modelbus_env["MODELBUS_ROOT"]) / "kept_vae.safetensors")
    _register(model)  # with the store configured: uploaded before it is recorded
    kept = file_digest(model)
    stray = tmp_path / "stray.bin"
    stray.write_bytes(os.urandom(5000))
    store = S3BlobStore(parse_store_url(s3_env), endpoint_url=s3_server.url)
    store.put(file_digest(stray), stray)
    assert _cli("store", "verify") == {"checked": 2, "bad": [], "missing": []}

    dry = _cli("store", "gc", "--dry-run", "--grace", "0")
    assert dry["removed"] == [file_digest(stray)] and dry["kept"] == 1
    assert store.size_of(file_digest(stray)) == 5000
    assert _cli("store", "gc")["young"] == 1  # the default grace spares a fresh blob
    assert _cli("store", "gc", "--grace", "0")["removed"] == [file_digest(stray)]
    assert store.size_of(file_digest(stray)) is None and store.size_of(kept) == model.stat().st_size

    s3_server.client().put_object(Bucket=store.bucket, Key=store.key(kept), Body=b"rotten")
    assert _cli("store", "verify", code=1)["bad"] == [kept]


def test_store_commands_need_a_store(modelbus_env: dict[str, str]) -> None:
    result = CliRunner().invoke(app, ["store", "gc"])
    assert result.exit_code == 2 and "MODELBUS_STORE_URL" in result.stderr


@pytest.mark.parametrize("command", ["worker", "up"])
def test_a_bad_store_option_is_refused_before_anything_starts(command: str, modelbus_env: dict[str, str]) -> None:
    result = CliRunner().invoke(app, [command, "--store", "gs://elsewhere/models"])
    assert result.exit_code == 2 and "use 'shared', s3://bucket/prefix" in result.stderr
    assert os.environ.get("MODELBUS_STORE_URL") == "shared"
