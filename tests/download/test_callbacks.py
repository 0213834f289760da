"""A caller's callback that raises: logged once with the job id, kept on the job, and nothing else.

Each queue here has ONE worker thread, so the download queued after the bad one completing shows
that the thread survived the callback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from modelbus.services.config import AppConfig
from modelbus.services.download import DownloadJob, DownloadJobStatus, DownloadQueueService
from tests.servers import Fault, FileServer
from tests.waiting import wait_until

from .conftest import fast_options

DATA = os.urandom(3 << 20)


class Boom(RuntimeError):
    pass


class Raising:
    """A callback that counts its calls and raises every time."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, job: DownloadJob) -> None:
        self.calls += 1
        raise Boom(f"callback broke on call {self.calls}")


def _failures(logs: list[dict[str, Any]], job: DownloadJob) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "download.callback_failed" and e.get("job") == job.id]


def _next_download_runs(svc: DownloadQueueService, file_server: FileServer, dest: Path) -> None:
    url = file_server.add_file("next.safetensors", DATA[:5000])
    nxt = svc.wait_for_job(svc.download(url, dest), timeout=30)
    assert nxt.status == DownloadJobStatus.COMPLETED, nxt.error
    assert (dest / "next.safetensors").read_bytes() == DATA[:5000]


@pytest.mark.parametrize("kind", ["on_start", "on_progress", "on_complete"])
def test_a_raising_callback_leaves_a_good_download_good(kind: str, dl_config: AppConfig, file_server: FileServer,
                                                         tmp_path: Path) -> None:
    url = file_server.add_file("m.safetensors", DATA)
    bad = Raising()
    svc = DownloadQueueService(1, dl_config, options=fast_options(dl_config))
    with svc, structlog.testing.capture_logs() as logs:
        job = svc.wait_for_job(svc.download(url, tmp_path / "a", **{kind: bad}), timeout=30)
        assert job.status == DownloadJobStatus.COMPLETED, job.error
        assert (tmp_path / "a" / "m.safetensors").read_bytes() == DATA
        _next_download_runs(svc, file_server, tmp_path / "b")
    assert bad.calls >= 1
    assert job.error is None and list(job.callback_errors) == [kind]
    assert job.callback_errors[kind].startswith("Boom: callback broke on call 1")
    [logged] = _failures(logs, job)  # once, however often a progress callback raised
    assert logged["callback"] == kind and logged["log_level"] == "error"


def test_a_raising_on_error_keeps_the_real_error(dl_config: AppConfig, file_server: FileServer,
                                                 tmp_path: Path) -> None:
    bad = Raising()
    svc = DownloadQueueService(1, dl_config, options=fast_options(dl_config))
    with svc, structlog.testing.capture_logs() as logs:
        job = svc.wait_for_job(svc.download(file_server.url_for("missing.safetensors"), tmp_path / "a",
                                            on_error=bad), timeout=30)
        _next_download_runs(svc, file_server, tmp_path / "b")
    assert job.status == DownloadJobStatus.ERROR and bad.calls == 1
    assert job.error_type != "Boom" and "404" in (job.error or "")
    assert list(job.callback_errors) == ["on_error"] and len(_failures(logs, job)) == 1


@pytest.mark.parametrize("when", ["running", "waiting"])
def test_a_raising_on_cancelled_still_cancels(when: str, dl_config: AppConfig, file_server: FileServer,
                                              tmp_path: Path) -> None:
    url = file_server.add_file("m.safetensors", DATA)
    # every request stalls after 50 kB for 60 s: only the cancel ends the running download
    file_server.set_fault("m.safetensors", Fault(stall_after=50_000, stall_seconds=60, times=None))
    bad = Raising()
    svc = DownloadQueueService(1, dl_config, options=fast_options(dl_config, stall_timeout=60))
    with svc, structlog.testing.capture_logs() as logs:
        if when == "waiting":
            blocker = svc.download(url, tmp_path / "blocker")  # holds the one thread
            wait_until(lambda: blocker.bytes > 0, 30, "the first download to start")
        job = svc.download(url, tmp_path / "a", on_cancelled=bad)
        if when == "running":
            wait_until(lambda: job.bytes > 0, 30, "the download to start")
        svc.cancel_job(job)  # a waiting job's callback runs right here: it must not raise to us
        svc.wait_for_job(job, timeout=30)
        if when == "waiting":
            svc.cancel_job(blocker)
            svc.wait_for_job(blocker, timeout=30)
        file_server.set_fault("m.safetensors", None)
        _next_download_runs(svc, file_server, tmp_path / "b")
    assert job.status == DownloadJobStatus.CANCELLED and bad.calls == 1
    assert list(job.callback_errors) == ["on_cancelled"] and len(_failures(logs, job)) == 1
    assert not (tmp_path / "a").exists() or list((tmp_path / "a").iterdir()) == []


def test_a_raising_publisher_changes_nothing(dl_config: AppConfig, file_server: FileServer, tmp_path: Path) -> None:
    url = file_server.add_file("m.safetensors", DATA)
    calls: list[str] = []

    def publisher(event: str, payload: dict[str, Any]) -> None:
        calls.append(event)
        raise Boom("the activity stream is gone")

    svc = DownloadQueueService(1, dl_config, publisher, options=fast_options(dl_config))
    with svc:
        job = svc.wait_for_job(svc.download(url, tmp_path / "a"), timeout=30)
        _next_download_runs(svc, file_server, tmp_path / "b")
    assert job.status == DownloadJobStatus.COMPLETED, job.error
    assert "download_started" in calls and "download_complete" in calls


def test_callback_errors_reach_the_activity_payload(dl_config: AppConfig, file_server: FileServer,
                                                    tmp_path: Path) -> None:
    url = file_server.add_file("m.safetensors", DATA[:5000])
    seen: list[tuple[str, dict[str, Any]]] = []
    svc = DownloadQueueService(1, dl_config, lambda e, p: seen.append((e, p)), options=fast_options(dl_config))
    bad: Callable[[DownloadJob], None] = Raising()
    with svc:
        svc.wait_for_job(svc.download(url, tmp_path, on_start=bad), timeout=30)
    [(_, done)] = [(e, p) for e, p in seen if e == "download_complete"]
    assert done["status"] == "completed" and list(done["callback_errors"]) == ["on_start"]
