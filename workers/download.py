"""The download queue's job: fetch one file of an install into the job's staging folder.

The fetch is resumable: the bytes on disk and their range state (``.part``/``.part.json``) survive a
killed worker, and the retry (on any worker sharing the models directory) continues where it stopped.
A cancel flag set in Redis stops the transfer within a second; a failure sets it too, so the other
files of the same install stop instead of downloading for nothing.

The run holds the RQ job's lease (workers.lease) and checks it before every write; the partial file is
locked while written (services.download.partial): a run given up for dead that wakes up again stops
without writing, and never shares the file with the re-run.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from modelbus.events.logs import get_logger
from modelbus.events.schema import InstallFileDownloaded
from modelbus.services.download.cancel import Cancellation
from modelbus.services.download.errors import DownloadCancelled
from modelbus.services.download.fetch import FetchOptions, FileRequest, fetch_file
from modelbus.services.download.partial import remove_partial
from modelbus.services.download.security import credential_for
from modelbus.services.hfcache import repo_of_url, take_from_cache
from modelbus.services.install.jobs import InstallStatus, load_job, transition, unless_ended
from modelbus.services.install.placement import staging_dir
from modelbus.services.install.progress import ProgressBoard, ProgressReporter
from modelbus.services.install.steps import (
    CancelWatcher,
    describe,
    error_name,
    fail_job,
    is_final,
    set_cancel_flag,
)
from modelbus.workers.context import WorkerContext, current
from modelbus.workers.errors import LeaseLostError
from modelbus.workers.install import give_up, http_client, not_for, retries_left
from modelbus.workers.lease import current as current_lease
from modelbus.workers.lease import for_current_job

log = get_logger(__name__)


def run_download(job_id: str, index: int, url: str, name: str | None = None, size: int | None = None,
                 sha256: str | None = None, folder: str | None = None, access_token: str | None = None,
                 attempt: int = 0) -> str:
    context = current()
    with for_current_job(context.store.client, context.store.keys, context.worker_id) as lease:
        if lease is not None and lease.done_before:
            return load_job(context.store, job_id).status.value  # delivered again: it already ran
        cancellation = Cancellation()
        if lease is not None:
            cancellation.guard(lease.fence)
            lease.on_lost(lambda: cancellation.stop("abort"))
        return _download(context, cancellation, job_id, index, url, name, size, sha256, folder, access_token,
                         attempt)


def _download(context: WorkerContext, cancellation: Cancellation, job_id: str, index: int, url: str,
              name: str | None, size: int | None, sha256: str | None, folder: str | None,
              access_token: str | None, attempt: int = 0) -> str:
    store, config = context.store, context.config
    job = load_job(store, job_id)
    skip = not_for(job, attempt)
    if skip is not None:
        return skip
    dest_dir = staging_dir(config, job_id) / (folder or "")
    file_name = None
    if name:
        relative = PurePosixPath(name)
        dest_dir, file_name = dest_dir / relative.parent, relative.name
    request = FileRequest(url=url, dest_dir=dest_dir, name=file_name, size=size, sha256=sha256,
                          credential=credential_for(url, config, access_token))
    board = ProgressBoard(store.client, store.keys)
    shown = name or PurePosixPath(urlsplit(url).path).name or None  # what the job's view calls it
    if sha256 and file_name and take_from_cache(sha256, size, dest_dir / file_name, repo_of_url(url)):
        done = (dest_dir / file_name).stat().st_size  # the Hugging Face cache held it (services.hfcache)
        board.set_file(job_id, str(index), done, done, shown)
        _record_file(context, job_id, folder, name, done, sha256, attempt)
        return str(dest_dir / file_name)
    reporter = ProgressReporter(board, store, job_id, str(index), name=shown)
    final: list[Path] = []
    try:
        with http_client(config) as client, CancelWatcher(store.client, store.keys, job_id, cancellation,
                                                          pause_id=job.run_id):
            path = fetch_file(client, request, FetchOptions.from_config(config), cancellation, reporter,
                              on_path=final.append)
    except LeaseLostError:
        log.warning("install_download_superseded", job=job_id, url=url)
        raise  # the partial file is the new run's now: leave it be
    except DownloadCancelled:
        lease = current_lease()
        if lease is not None and lease.lost:
            log.warning("install_download_superseded", job=job_id, url=url)
            raise LeaseLostError(f"install {job_id}: the download of {url} was taken over by another run") from None
        if cancellation.reason == "pause":
            log.info("install_download_paused", job=job_id, url=url)  # the partial file stays for the resume
            return InstallStatus.PAUSED.value
        _drop_partial(final)
        log.info("install_download_cancelled", job=job_id, url=url)
        return InstallStatus.CANCELLED.value
    except Exception as exc:
        if not is_final(exc, retries_left()):
            log.warning("install_download_retry", job=job_id, url=url, error=describe(exc))
            raise  # the partial file stays: the retry resumes from it
        _drop_partial(final)
        fail_job(store, job_id, error_name(exc), describe(exc))
        set_cancel_flag(store.client, store.keys, job_id)
        give_up(exc)
    done = path.stat().st_size
    board.set_file(job_id, str(index), done, done, shown)
    _record_file(context, job_id, folder, name, done, sha256, attempt)
    log.info("install_file_downloaded", job=job_id, path=str(path), bytes=done)
    return str(path)


def _record_file(context: WorkerContext, job_id: str, folder: str | None, name: str | None, size: int,
                 sha256: str | None, attempt: int) -> None:
    """A file of a multi-file install is whole and verified: in the log, so that a restart keeps it."""
    if folder is None or not name:
        return  # the one file of a single-file install: nothing to keep when it fails
    transition(context.store, job_id, unless_ended(lambda j: InstallFileDownloaded(
        aggregate_id=job_id, file=name, size=size, sha256=sha256, attempt=attempt, correlation_id=job_id)))


def _drop_partial(final: list[Path]) -> None:
    if final:
        remove_partial(final[-1])
