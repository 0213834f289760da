"""``multifile_download`` says where the files went: the folder they share, or the one file, absolute."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelbus.services.download import DownloadJobStatus, DownloadQueueService, RemoteFile
from tests.servers import FileServer

DATA = os.urandom(200_000)


def _serve(file_server: FileServer, names: list[str]) -> list[RemoteFile]:
    return [RemoteFile(file_server.add_file(f"src/{n}", DATA + n.encode()), n) for n in names]


def test_a_repo_lands_in_its_folder(service: DownloadQueueService, file_server: FileServer, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["tiny-sd/model_index.json", "tiny-sd/unet/diffusion_pytorch_model.safetensors",
             "tiny-sd/vae/config.json"]
    monkeypatch.chdir(tmp_path)
    job = service.multifile_download(_serve(file_server, names), "models")  # relative, as callers pass it
    assert job.download_path == tmp_path / "models" / "tiny-sd" and job.download_path.is_absolute()
    monkeypatch.chdir("/")  # the files still go where download_path said
    service.wait_for_job(job, timeout=30)
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    for n in names:
        assert (job.download_path / n.removeprefix("tiny-sd/")).read_bytes() == DATA + n.encode()


def test_one_part_is_the_file_itself(service: DownloadQueueService, file_server: FileServer, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    job = service.wait_for_job(service.multifile_download(_serve(file_server, ["sub/m.safetensors"]), "dl"),
                               timeout=30)
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    assert job.download_path == tmp_path / "dl" / "sub" / "m.safetensors"
    assert job.download_path.read_bytes() == DATA + b"sub/m.safetensors"


@pytest.mark.parametrize(("names", "shared"), [
    (["config.json", "unet/model.safetensors"], ""),
    (["a/b/x.bin", "a/y.bin"], "a"),
    (["a/x.bin", "b/y.bin"], ""),
])
def test_parts_in_different_folders_share_their_common_one(names: list[str], shared: str,
                                                           service: DownloadQueueService, file_server: FileServer,
                                                           tmp_path: Path) -> None:
    job = service.wait_for_job(service.multifile_download(_serve(file_server, names), tmp_path), timeout=30)
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    assert job.download_path == (tmp_path / shared if shared else tmp_path)
    assert all((tmp_path / n).is_file() for n in names)


def test_a_single_download_reports_an_absolute_path_too(service: DownloadQueueService, file_server: FileServer,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = file_server.add_file("src/one.safetensors", DATA)
    monkeypatch.chdir(tmp_path)
    job = service.download(url, "dl")  # relative, resolved when queued
    monkeypatch.chdir("/")
    service.wait_for_job(job, timeout=30)
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    assert job.download_path == tmp_path / "dl" / "one.safetensors" and job.download_path.read_bytes() == DATA
