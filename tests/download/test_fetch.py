"""One-file downloads through the service against a real file server with real faults."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from modelbus.services.config import AppConfig
from modelbus.services.download import DownloadJobStatus, DownloadQueueService
from tests.servers import Fault, FileServer

from .conftest import Events, fast_options

DATA = os.urandom(600_000)  # > 2 * 64 KiB parts: fetched as 4 parallel ranges
SHA = hashlib.sha256(DATA).hexdigest()


def _run(service: DownloadQueueService, url: str, dest: Path, **kw: object):  # type: ignore[no-untyped-def]
    job = service.download(url, dest, **kw)  # type: ignore[arg-type]
    return service.wait_for_job(job, timeout=30)


def test_download_names_file_from_content_disposition_and_reports_events(
    service: DownloadQueueService, file_server: FileServer, tmp_path: Path, events: Events
) -> None:
    url = file_server.add_file("dl/123", DATA, disposition="attachment; filename=\"../../etc/My Model.safetensors\"")
    job = _run(service, url, tmp_path, sha256=SHA)
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    assert job.download_path == tmp_path / "My Model.safetensors"
    assert job.download_path.read_bytes() == DATA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["My Model.safetensors"]  # no .part/.json left
    assert job.bytes == job.total_bytes == len(DATA)
    types = events.types()
    assert types[0] == "download_started" and types[-1] == "download_complete"
    final = events.items[-1][1]
    assert final["id"] == job.id and final["bytes"] == len(DATA) and final["path"] == str(job.download_path)
    ranges = [r.headers.get("Range", "") for r in file_server.requests]
    # the probe's body serves the first range; three more ranges run at once
    assert sorted(ranges) == ["bytes=0-", "bytes=150000-299999", "bytes=300000-449999", "bytes=450000-599999"]


def test_name_from_url_when_no_disposition(service: DownloadQueueService, file_server: FileServer,
                                           tmp_path: Path) -> None:
    file_server.add_file("models/tiny lora.safetensors", DATA[:1000])
    url = file_server.url + "/models/tiny%20lora.safetensors"
    job = _run(service, url, tmp_path)
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    assert job.download_path == tmp_path / "tiny lora.safetensors"


@pytest.mark.parametrize("fault", [
    Fault(drop_after=50_000, times=3),
    Fault(status=500, times=2),
    Fault(stall_after=10_000, stall_seconds=3, times=2),
    Fault(length_delta=1000, times=1),
], ids=["dropped", "500", "stall", "wrong-length"])
def test_faults_are_retried_and_file_is_whole(service: DownloadQueueService, file_server: FileServer,
                                              tmp_path: Path, fault: Fault) -> None:
    url = file_server.add_file("m.safetensors", DATA)
    file_server.set_fault("m.safetensors", fault)
    job = _run(service, url, tmp_path, sha256=SHA)
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    assert (tmp_path / "m.safetensors").read_bytes() == DATA


def test_retry_after_is_honoured(service: DownloadQueueService, file_server: FileServer, tmp_path: Path) -> None:
    url = file_server.add_file("m.safetensors", DATA)
    file_server.set_fault("m.safetensors", Fault(status=503, retry_after="1", times=1))
    job = _run(service, url, tmp_path)
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    first, second = file_server.requests[0], file_server.requests[1]
    assert first.headers.get("Range") == second.headers.get("Range") == "bytes=0-"


def test_retries_are_bounded(service: DownloadQueueService, file_server: FileServer, tmp_path: Path,
                             events: Events) -> None:
    url = file_server.add_file("m.safetensors", DATA)
    file_server.set_fault("m.safetensors", Fault(status=502, times=None))
    job = _run(service, url, tmp_path)
    assert job.status == DownloadJobStatus.ERROR
    assert job.error_type == "RetriesExhaustedError" and "HTTP 502" in (job.error or "")
    assert len(file_server.requests) == 4  # 1 + download_retries (3)
    assert events.types()[-1] == "download_error"


def test_unauthorized_says_token_needed(service: DownloadQueueService, tmp_path: Path) -> None:
    with FileServer(require_token="s3cret") as srv:
        url = srv.add_file("private.safetensors", DATA)
        job = _run(service, url, tmp_path)
        assert job.status == DownloadJobStatus.ERROR and job.error_type == "TokenRequiredError"
        assert "token" in (job.error or "")
        assert list(tmp_path.iterdir()) == []
        ok = _run(service, url, tmp_path, access_token="s3cret")
        assert ok.status == DownloadJobStatus.COMPLETED, ok.error


def test_html_login_page_is_not_saved_as_a_model(service: DownloadQueueService, file_server: FileServer,
                                                 tmp_path: Path) -> None:
    url = file_server.add_file("m.safetensors", DATA)
    file_server.set_fault("m.safetensors", Fault(html_login=True, times=1))
    job = _run(service, url, tmp_path)
    assert job.status == DownloadJobStatus.ERROR and job.error_type == "TokenRequiredError"
    assert list(tmp_path.iterdir()) == []


def test_html_body_with_binary_content_type_is_refused(service: DownloadQueueService, file_server: FileServer,
                                                       tmp_path: Path) -> None:
    url = file_server.add_file("m.safetensors", b"<!DOCTYPE html><html>log in</html>")
    job = _run(service, url, tmp_path)
    assert job.error_type == "TokenRequiredError"
    assert list(tmp_path.iterdir()) == []


def test_sha256_mismatch_removes_file(service: DownloadQueueService, file_server: FileServer,
                                      tmp_path: Path) -> None:
    url = file_server.add_file("m.safetensors", DATA)
    job = _run(service, url, tmp_path, sha256="0" * 64)
    assert job.status == DownloadJobStatus.ERROR and job.error_type == "IntegrityError"
    assert list(tmp_path.iterdir()) == []


def test_redirect_chain_to_other_origin_drops_token(service: DownloadQueueService, file_server: FileServer,
                                                    tmp_path: Path) -> None:
    with FileServer(require_token="tok") as origin, FileServer(reject_authorization=True) as cdn:
        cdn.add_file("blob/m.safetensors", DATA)
        # origin (needs the token) -> same origin hop -> another port -> another host name
        origin.add_redirect("a", "/b", 302)
        origin.add_redirect("b", cdn.url_on("localhost") + "/c", 307)
        cdn.add_redirect("c", cdn.url + "/blob/m.safetensors", 301)
        job = _run(service, origin.url + "/a", tmp_path, access_token="tok", sha256=SHA)
        assert job.status == DownloadJobStatus.COMPLETED, job.error
        assert all("Authorization" not in r.headers for r in cdn.requests)
        assert all(r.headers.get("Authorization") == "Bearer tok" for r in origin.requests)


def test_private_addresses_refused_unless_allowed(dl_config: AppConfig, file_server: FileServer,
                                                  tmp_path: Path) -> None:
    cfg = dl_config.model_copy(update={"allow_private_downloads": False})
    url = file_server.add_file("m.safetensors", DATA)
    with DownloadQueueService(1, cfg, options=fast_options(cfg)) as svc:
        job = svc.wait_for_job(svc.download(url, tmp_path), timeout=10)
    assert job.error_type == "UnsafeURLError" and "MODELBUS_ALLOW_PRIVATE_DOWNLOADS" in (job.error or "")
    assert file_server.requests == []


def test_redirect_to_private_address_refused(dl_config: AppConfig, file_server: FileServer,
                                             tmp_path: Path) -> None:
    # the first hop is allowed by the pattern-free check only for private=True; use a public-looking
    # literal that redirects: we check the redirect hop itself by starting on an allowed origin
    from modelbus.services.download.errors import UnsafeURLError
    from modelbus.services.download.security import check_url

    # names are checked when connecting, against the addresses connected to (tests/hostile/test_download_ssrf.py)
    for bad in ("http://127.0.0.1/x", "http://10.1.2.3/x", "http://[::1]/x", "http://169.254.169.254/",
                "http://127.0.0.1.:8080/x", "ftp://example.com/x", "file:///etc/passwd"):
        with pytest.raises(UnsafeURLError):
            check_url(bad, allow_private=False)
    check_url("http://127.0.0.1/x", allow_private=True)


def test_no_disk_space_is_an_error_before_any_write(dl_config: AppConfig, file_server: FileServer,
                                                    tmp_path: Path) -> None:
    url = file_server.add_file("m.safetensors", DATA)
    with DownloadQueueService(1, dl_config, options=fast_options(dl_config, disk_reserve=1 << 60)) as svc:
        job = svc.wait_for_job(svc.download(url, tmp_path), timeout=10)
    assert job.error_type == "InsufficientSpaceError" and "disk space" in (job.error or "")
    assert list(tmp_path.iterdir()) == []


def test_existing_identical_file_completes_without_body(service: DownloadQueueService,
                                                        file_server: FileServer, tmp_path: Path) -> None:
    url = file_server.add_file("m.safetensors", DATA)
    (tmp_path / "m.safetensors").write_bytes(DATA)
    job = _run(service, url, tmp_path, sha256=SHA)
    assert job.status == DownloadJobStatus.COMPLETED
    (tmp_path / "m.safetensors").write_bytes(b"other")
    job = _run(service, url, tmp_path)
    assert job.error_type == "DestinationExistsError"
    assert (tmp_path / "m.safetensors").read_bytes() == b"other"
