"""A partial download whose file changed on the server starts again from zero, cleanly, in each of the
four ways the server can say so: 416 for the saved offset, a new ETag, a new Last-Modified (no ETag
saved), and a 206 carrying a new ETag from a server that ignores If-Range."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from modelbus.services.download import DownloadJobStatus, DownloadQueueService, RemoteFile
from tests.servers import Fault, FileServer

OLD = os.urandom(800_000)
HAVE = 300_000


def _leave_partial(folder: Path, url: str, *, total: int, etag: str | None, last_modified: str | None) -> None:
    """What a worker killed after HAVE bytes of OLD leaves behind (one range, its validators saved)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "x.bin.part").write_bytes(OLD[:HAVE])
    (folder / "x.bin.part.json").write_text(json.dumps({
        "url": url, "total": total, "etag": etag, "last_modified": last_modified, "version": 1,
        "ranges": [{"start": 0, "end": total, "done": HAVE}]}))


def _resume(service: DownloadQueueService, url: str, dest: Path) -> None:
    job = service.wait_for_job(service.multifile_download([RemoteFile(url, "x.bin")], dest), timeout=30)
    assert job.status == DownloadJobStatus.COMPLETED, job.error


@pytest.mark.parametrize("how", ["416", "etag", "last_modified", "if_range_ignored"])
def test_a_changed_file_restarts_from_zero(how: str, service: DownloadQueueService, file_server: FileServer,
                                           tmp_path: Path) -> None:
    url = file_server.add_file("x.bin", OLD)
    old = httpx.head(url).headers
    new = os.urandom(200_000 if how == "416" else len(OLD))
    file_server.add_file("x.bin", new)  # the file changes: new ETag and Last-Modified
    now = httpx.head(url).headers
    assert now["etag"] != old["etag"] and now["last-modified"] != old["last-modified"]
    if how == "416":  # validators still match, but the file is now shorter than what we hold
        _leave_partial(tmp_path, url, total=len(OLD), etag=now["etag"], last_modified=now["last-modified"])
    elif how == "last_modified":
        _leave_partial(tmp_path, url, total=len(OLD), etag=None, last_modified=old["last-modified"])
    else:
        _leave_partial(tmp_path, url, total=len(OLD), etag=old["etag"], last_modified=old["last-modified"])
    if how == "if_range_ignored":
        file_server.set_fault("x.bin", Fault(ignore_if_range=True, times=None))
    file_server.reset_log()

    _resume(service, url, tmp_path)

    assert (tmp_path / "x.bin").read_bytes() == new  # never old bytes spliced with new ones
    assert sorted(os.listdir(tmp_path)) == ["x.bin"]  # no partial file or state left behind
    first = file_server.requests[0].headers
    assert first["Range"] == f"bytes={HAVE}-"  # it did try to resume...
    expected_validator = old["last-modified"] if how == "last_modified" else (
        now["etag"] if how == "416" else old["etag"])
    assert first["If-Range"] == expected_validator
    starts = [r.headers.get("Range", "") for r in file_server.requests[1:]]
    if how in ("416", "if_range_ignored"):  # ...and then asked again from the first byte
        assert starts and starts[0] in ("bytes=0-", "")
    assert file_server.bytes_sent >= len(new)
