"""The queue: priorities, cancel/pause/resume from other threads, resume across processes, multi-file."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from modelbus.services.config import AppConfig
from modelbus.services.download import DownloadJobStatus, DownloadQueueService, RemoteFile, UnsafePathError
from tests.servers import Fault, FileServer

from .conftest import Events, fast_options

DATA = os.urandom(800_000)
REPO_ROOT = Path(__file__).resolve().parents[2]


def _wait_until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_priority_order(dl_config: AppConfig, file_server: FileServer, tmp_path: Path) -> None:
    url = file_server.add_file("m.safetensors", DATA[:1000])
    svc = DownloadQueueService(1, dl_config, options=fast_options(dl_config))
    started: list[int] = []
    for prio in (20, 5, 10):
        svc.download(url, tmp_path / str(prio), priority=prio, on_start=lambda j: started.append(j.priority))
    svc.start()
    try:
        svc.join()
    finally:
        svc.stop()
    assert started == [5, 10, 20]
    assert [j.status for j in svc.list_jobs()] == [DownloadJobStatus.COMPLETED] * 3
    svc.prune_jobs()
    assert svc.list_jobs() == []


def test_cancel_running_job_from_another_thread(service: DownloadQueueService, file_server: FileServer,
                                                tmp_path: Path, events: Events) -> None:
    url = file_server.add_file("m.safetensors", DATA)
    # every request stalls after 50 kB for 60 s, longer than any timeout: only a cancel ends it
    file_server.set_fault("m.safetensors", Fault(stall_after=50_000, stall_seconds=60, times=None))
    svc = DownloadQueueService(1, service.config, options=fast_options(service.config, stall_timeout=60))
    with svc:
        job = svc.download(url, tmp_path)
        _wait_until(lambda: job.bytes > 0)
        svc.cancel_job(job)
        svc.wait_for_job(job, timeout=5)  # generous bound; the cancel itself shuts the sockets down
    assert job.status == DownloadJobStatus.CANCELLED
    assert list(tmp_path.iterdir()) == []


def test_cancel_waiting_job(dl_config: AppConfig, file_server: FileServer, tmp_path: Path) -> None:
    url = file_server.add_file("m.safetensors", DATA[:1000])
    svc = DownloadQueueService(1, dl_config, options=fast_options(dl_config))
    cancelled: list[int] = []
    job = svc.download(url, tmp_path, on_cancelled=lambda j: cancelled.append(j.id))
    svc.cancel_job(job)
    with svc:
        svc.join()
    assert job.status == DownloadJobStatus.CANCELLED and cancelled == [job.id]
    assert file_server.requests == []


def _range_starts(srv: FileServer) -> list[int]:
    out = []
    for r in srv.requests:
        rng = r.headers.get("Range", "")
        if rng.startswith("bytes="):
            out.append(int(rng[6:].split("-")[0]))
    return out


def test_pause_keeps_partial_and_resume_continues(service: DownloadQueueService, file_server: FileServer,
                                                  tmp_path: Path, events: Events) -> None:
    url = file_server.add_file("m.safetensors", DATA)
    file_server.set_fault("m.safetensors", Fault(stall_after=60_000, stall_seconds=60, times=None))
    svc = DownloadQueueService(1, service.config, events, options=fast_options(service.config, stall_timeout=60))
    with svc:
        job = svc.download(url, tmp_path)
        _wait_until(lambda: job.bytes >= 4 * 60_000)
        svc.pause_job(job)
        svc.wait_for_job(job, timeout=5)
        assert job.status == DownloadJobStatus.PAUSED
        assert (tmp_path / "m.safetensors.part").is_file() and (tmp_path / "m.safetensors.part.json").is_file()
        file_server.set_fault("m.safetensors", None)
        file_server.reset_log()
        svc.resume_job(job)
        _wait_until(lambda: job.status == DownloadJobStatus.COMPLETED)
    assert (tmp_path / "m.safetensors").read_bytes() == DATA
    starts = _range_starts(file_server)[1:]  # after the probe, each range continues where it stopped
    assert starts and all(s % 200_000 >= 60_000 for s in starts)
    assert "download_paused" in events.types()


def test_stopped_service_resumes_in_a_new_one(dl_config: AppConfig, file_server: FileServer,
                                              tmp_path: Path) -> None:
    url = file_server.add_file("m.safetensors", DATA)
    file_server.set_fault("m.safetensors", Fault(stall_after=100_000, stall_seconds=60, times=None))
    opts = fast_options(dl_config, stall_timeout=60)
    first = DownloadQueueService(2, dl_config, options=opts)
    first.start()
    job = first.download(url, tmp_path)
    _wait_until(lambda: job.bytes >= 400_000)
    first.stop()
    assert job.status == DownloadJobStatus.PAUSED
    file_server.set_fault("m.safetensors", None)
    file_server.reset_log()
    with DownloadQueueService(2, dl_config, options=opts) as second:
        again = second.wait_for_job(second.download(url, tmp_path), timeout=20)
    assert again.status == DownloadJobStatus.COMPLETED, again.error
    assert (tmp_path / "m.safetensors").read_bytes() == DATA
    assert all(s % 200_000 >= 100_000 for s in _range_starts(file_server)[1:])


_CHILD = """
import sys
from pathlib import Path
from modelbus.services.config import AppConfig
from modelbus.services.download import DownloadQueueService, FetchOptions
cfg = AppConfig.load(allow_private_downloads=True, download_stall_timeout=60)
with DownloadQueueService(1, cfg, options=FetchOptions.from_config(cfg, min_part_size=64 << 10,
                                                                   state_interval=0.05)) as svc:
    svc.wait_for_job(svc.download(sys.argv[1], Path(sys.argv[2])))
"""


def test_resume_after_killed_process(dl_config: AppConfig, file_server: FileServer, tmp_path: Path,
                                     service: DownloadQueueService) -> None:
    url = file_server.add_file("m.safetensors", DATA)
    file_server.set_fault("m.safetensors", Fault(stall_after=150_000, stall_seconds=60, times=None))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MODELBUS_ROOT": str(tmp_path / "child")}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, url, str(tmp_path / "dl")], env=env, cwd=REPO_ROOT)
    state_file = tmp_path / "dl" / "m.safetensors.part.json"

    def saved() -> int:
        try:
            return sum(r["done"] for r in json.loads(state_file.read_text())["ranges"])
        except (OSError, ValueError, KeyError):
            return 0

    try:
        _wait_until(lambda: saved() >= 4 * 150_000, timeout=30)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    file_server.set_fault("m.safetensors", None)
    file_server.reset_log()
    job = service.wait_for_job(service.download(url, tmp_path / "dl"), timeout=20)
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    assert (tmp_path / "dl" / "m.safetensors").read_bytes() == DATA
    assert sorted(_range_starts(file_server)) == [0, 150_000, 350_000, 550_000, 750_000]


def test_changed_file_restarts_from_zero(dl_config: AppConfig, file_server: FileServer, tmp_path: Path,
                                         service: DownloadQueueService) -> None:
    url = file_server.add_file("m.safetensors", DATA)
    file_server.set_fault("m.safetensors", Fault(stall_after=100_000, stall_seconds=60, times=None))
    first = DownloadQueueService(1, dl_config, options=fast_options(dl_config, stall_timeout=60))
    first.start()
    job = first.download(url, tmp_path)
    _wait_until(lambda: job.bytes >= 400_000)
    first.stop()
    new = os.urandom(len(DATA))
    file_server.add_file("m.safetensors", new)  # new ETag and Last-Modified
    file_server.set_fault("m.safetensors", None)
    again = service.wait_for_job(service.download(url, tmp_path), timeout=20)
    assert again.status == DownloadJobStatus.COMPLETED, again.error
    assert (tmp_path / "m.safetensors").read_bytes() == new


def test_multifile_download(service: DownloadQueueService, file_server: FileServer, tmp_path: Path,
                            events: Events) -> None:
    a = file_server.add_file("r/a.json", b'{"a": 1}')
    b = file_server.add_file("r/b.safetensors", DATA)
    job = service.multifile_download(
        [RemoteFile(a, "config.json"), {"url": b, "path": "unet/model.safetensors", "size": len(DATA)}], tmp_path)
    service.wait_for_job(job, timeout=20)
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    assert (tmp_path / "config.json").read_bytes() == b'{"a": 1}'
    assert (tmp_path / "unet" / "model.safetensors").read_bytes() == DATA
    assert job.total_bytes == len(DATA) + 8
    done = events.items[-1][1]
    assert {p["path"] for p in done["parts"]} == {"config.json", "unet/model.safetensors"}


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.bin", "a/../../b", "C:\\x", ""])
def test_multifile_refuses_unsafe_paths(service: DownloadQueueService, tmp_path: Path, bad: str) -> None:
    with pytest.raises(UnsafePathError):
        service.multifile_download([RemoteFile("http://127.0.0.1:1/x", bad)], tmp_path)
    assert service.list_jobs() == []


def test_progress_events_are_throttled(service: DownloadQueueService, file_server: FileServer,
                                       tmp_path: Path, events: Events) -> None:
    url = file_server.add_file("big.safetensors", os.urandom(6 << 20))
    job = service.wait_for_job(service.download(url, tmp_path), timeout=30)
    assert job.status == DownloadJobStatus.COMPLETED
    progress = [p for e, p in events.items if e == "download_progress"]
    assert len(progress) <= 101
    assert all({"id", "source", "path", "bytes", "total_bytes", "rate"} <= p.keys() for p in progress)
    fractions = [p["bytes"] / p["total_bytes"] for p in progress]
    assert all(b - a >= 0.01 for a, b in itertools.pairwise(fractions))


def test_bad_source_is_refused_at_submit(service: DownloadQueueService, tmp_path: Path) -> None:
    from modelbus.services.download import SourceSyntaxError

    with pytest.raises(SourceSyntaxError, match="not a download source"):
        service.download("just some words", tmp_path)


def _leave_partial(folder: Path, name: str, url: str, data: bytes, have: int) -> None:
    """What a worker killed after ``have`` bytes of a one-range download leaves behind."""
    head = httpx.head(url)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.part").write_bytes(data[:have])
    (folder / f"{name}.part.json").write_text(json.dumps({
        "url": url, "total": len(data), "etag": head.headers["etag"],
        "last_modified": head.headers["last-modified"], "version": 1,
        "ranges": [{"start": 0, "end": len(data), "done": have}]}))


@pytest.mark.parametrize("have", [300_000, len(DATA)], ids=["half", "all-but-rename"])
def test_known_name_resumes_with_range_and_if_range(service: DownloadQueueService, file_server: FileServer,
                                                    tmp_path: Path, have: int) -> None:
    url = file_server.add_file("x.bin", DATA)
    _leave_partial(tmp_path, "x.bin", url, DATA, have)
    file_server.reset_log()
    job = service.wait_for_job(service.multifile_download([RemoteFile(url, "x.bin")], tmp_path), timeout=20)
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    assert (tmp_path / "x.bin").read_bytes() == DATA and sorted(os.listdir(tmp_path)) == ["x.bin"]
    [request] = file_server.requests  # one request: 206 for the rest, or 416 when nothing is missing
    assert request.headers["Range"] == f"bytes={have}-" and request.headers["If-Range"].startswith('"')
    assert file_server.bytes_sent == len(DATA) - have


def test_known_name_restarts_when_the_file_changed(service: DownloadQueueService, file_server: FileServer,
                                                   tmp_path: Path) -> None:
    url = file_server.add_file("x.bin", DATA)
    _leave_partial(tmp_path, "x.bin", url, DATA, 300_000)
    new = os.urandom(len(DATA))
    file_server.add_file("x.bin", new)  # If-Range no longer matches: the server answers 200
    job = service.wait_for_job(service.multifile_download([RemoteFile(url, "x.bin")], tmp_path), timeout=20)
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    assert (tmp_path / "x.bin").read_bytes() == new


def test_json_where_a_model_was_expected(service: DownloadQueueService, file_server: FileServer,
                                         tmp_path: Path) -> None:
    url = file_server.add_file("m.safetensors", b'{"error": "login"}', content_type="application/json")
    job = service.wait_for_job(service.download(url, tmp_path), timeout=20)
    assert job.error_type == "TokenRequiredError" and "application/json" in (job.error or "")
    assert list(tmp_path.iterdir()) == []


def test_public_api() -> None:
    import modelbus.services.download as api

    assert sorted(api.__all__) == api.__all__
    assert all(hasattr(api, name) for name in api.__all__)
    assert issubclass(api.TokenRequiredError, api.RemoteError) and issubclass(api.RemoteError, api.DownloadError)
