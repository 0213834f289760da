"""Civitai models from the local Civitai server: version and file choice, 307 to a CDN, tokens."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelbus.services.config import AppConfig
from modelbus.services.download import DownloadJobStatus, DownloadQueueService
from modelbus.services.download.civitai import choose_file
from tests.servers import CivitaiServer

from .conftest import fast_options

OLD = os.urandom(3000)
SD15 = os.urandom(70_000)
SDXL = os.urandom(50_000)
PICKLE = os.urandom(2000)


@pytest.fixture()
def civ(civitai_server: CivitaiServer) -> CivitaiServer:
    civitai_server.add_model(101, "Tiny LoRA", type="LORA", tags=["style", "anime"], versions=[
        {"id": 1003, "name": "xl", "baseModel": "SDXL 1.0", "createdAt": "2024-03-01T00:00:00Z",
         "files": [{"name": "tiny_xl.safetensors", "content": SDXL, "primary": True}]},
        {"id": 1002, "name": "v2", "baseModel": "SD 1.5", "createdAt": "2024-02-01T00:00:00Z",
         "trainedWords": ["tinystyle"], "description": "<p>second</p>",
         "files": [{"name": "tiny_v2.ckpt", "content": PICKLE, "primary": False},
                   {"name": "tiny_v2.safetensors", "content": SD15, "primary": True}]},
        {"id": 1001, "name": "v1", "baseModel": "SD 1.5", "createdAt": "2024-01-01T00:00:00Z",
         "files": [{"name": "tiny_v1.safetensors", "content": OLD, "primary": True}]},
    ])
    return civitai_server


@pytest.fixture()
def civ_service(dl_config: AppConfig, civ: CivitaiServer):  # type: ignore[no-untyped-def]
    cfg = dl_config.model_copy(update={"civitai_api": civ.url})
    with DownloadQueueService(2, cfg, options=fast_options(cfg)) as svc:
        yield svc


def test_newest_version_by_default(civ_service: DownloadQueueService, civ: CivitaiServer, tmp_path: Path) -> None:
    job = civ_service.wait_for_job(civ_service.download("civitai:101", tmp_path), timeout=30)
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    assert job.download_path == tmp_path / "tiny_xl.safetensors"
    assert job.download_path.read_bytes() == SDXL
    assert job.metadata is not None and job.metadata.version_id == 1003 and job.metadata.base_model == "SDXL 1.0"


def test_newest_for_base_model_with_metadata(civ_service: DownloadQueueService, civ: CivitaiServer,
                                             tmp_path: Path) -> None:
    job = civ_service.wait_for_job(civ_service.download("civitai:101", tmp_path, base_model="sd1.5"), timeout=30)
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    assert job.download_path is not None and job.download_path.read_bytes() == SD15
    meta = job.metadata
    assert meta is not None
    assert (meta.name, meta.version_name, meta.version_id, meta.model_id) == ("Tiny LoRA", "v2", 1002, 101)
    assert meta.trained_words == ["tinystyle"] and meta.description == "<p>second</p>"
    assert meta.tags == ["style", "anime"] and meta.thumbnail_url and meta.author == "tester"
    assert meta.allow_commercial_use == ["Image"] and meta.allow_derivatives is True
    assert meta.hashes["SHA256"] == hashlib.sha256(SD15).hexdigest().upper()
    none = civ_service.wait_for_job(civ_service.download("civitai:101", tmp_path, base_model="Flux"), timeout=30)
    assert none.error_type == "MetadataError" and "SDXL 1.0" in (none.error or "")


def test_explicit_version_and_url_forms(civ_service: DownloadQueueService, civ: CivitaiServer,
                                        tmp_path: Path) -> None:
    for i, source in enumerate(["civitai:101@1001", f"{civ.url}/models/101?modelVersionId=1001",
                                f"{civ.url}/api/download/models/1001"]):
        job = civ_service.wait_for_job(civ_service.download(source, tmp_path / str(i)), timeout=30)
        assert job.status == DownloadJobStatus.COMPLETED, (source, job.error)
        assert (tmp_path / str(i) / "tiny_v1.safetensors").read_bytes() == OLD


def test_token_goes_to_api_host_only(dl_config: AppConfig, civ: CivitaiServer, tmp_path: Path) -> None:
    civ.login_required.add(1002)
    cfg = dl_config.model_copy(update={"civitai_api": civ.url})
    with DownloadQueueService(1, cfg, options=fast_options(cfg)) as svc:
        job = svc.wait_for_job(svc.download("civitai:101@1002", tmp_path), timeout=30)
        assert job.error_type == "TokenRequiredError" and list(tmp_path.iterdir()) == []
    civ.reset_log()
    civ.cdn.reset_log()
    cfg = cfg.model_copy(update={"civitai_token": civ.token})
    with DownloadQueueService(1, cfg, options=fast_options(cfg)) as svc:
        job = svc.wait_for_job(svc.download("civitai:101@1002", tmp_path), timeout=30)
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    downloads = [r for r in civ.requests if r.path.startswith("/api/download/")]
    assert downloads and all(r.headers.get("Authorization") == f"Bearer {civ.token}" for r in downloads)
    assert civ.cdn.requests and all("Authorization" not in r.headers for r in civ.cdn.requests)


def test_published_hash_is_verified(civ_service: DownloadQueueService, civitai_server: CivitaiServer,
                                    tmp_path: Path) -> None:
    civitai_server.add_model(7, "Liar", versions=[{"id": 70, "files": [
        {"name": "liar.safetensors", "content": SD15, "primary": True, "sha256": "AB" * 32}]}])
    job = civ_service.wait_for_job(civ_service.download("civitai:7", tmp_path), timeout=30)
    assert job.error_type == "IntegrityError" and list(tmp_path.iterdir()) == []


def test_server_by_hash_endpoint(civ: CivitaiServer) -> None:
    digest = hashlib.sha256(SD15).hexdigest()
    assert httpx.get(f"{civ.url}/api/v1/model-versions/by-hash/{digest}").json()["id"] == 1002
    assert httpx.get(f"{civ.url}/api/v1/model-versions/by-hash/{digest[:10]}").json()["id"] == 1002
    assert httpx.get(f"{civ.url}/api/v1/model-versions/by-hash/deadbeef").status_code == 404


def test_choose_file_preferences() -> None:
    def f(name: str, primary: bool = False, fmt: str = "SafeTensor", fp: str = "fp32",
          size: str = "full") -> dict[str, Any]:
        return {"name": name, "type": "Model", "primary": primary, "metadata": {"format": fmt, "fp": fp, "size": size}}

    version: dict[str, Any] = {"id": 1, "files": [f("a.ckpt", fmt="PickleTensor"), f("b.safetensors"), f("c.safetensors", fp="fp16"),
                                  f("d.safetensors", fp="fp16", size="pruned"), {**f("e.zip"), "type": "Training Data"}]}
    assert choose_file(version)["name"] == "d.safetensors"
    version["files"].append(f("p.ckpt", primary=True, fmt="PickleTensor"))
    assert choose_file(version)["name"] == "p.ckpt"


def test_metadata_by_hash(civ: CivitaiServer, dl_config: AppConfig) -> None:
    from modelbus.services.download.civitai import metadata_by_hash
    from modelbus.services.download.errors import MetadataError

    with httpx.Client() as client:
        meta = metadata_by_hash(client, hashlib.sha256(PICKLE).hexdigest(), civ.url, None, True)
        assert (meta.model_id, meta.version_id, meta.extra["file_name"]) == (101, 1002, "tiny_v2.ckpt")
        with pytest.raises(MetadataError, match="404"):
            metadata_by_hash(client, "0" * 64, civ.url, None, True)
