"""The download queue service: a priority queue served by a pool of threads.

Lower ``priority`` numbers run first; equal priorities run in submission order. Each job reports
to its callbacks and, through ``publisher(event_type, payload)``, to the activity stream. A
running job stops within a second when cancelled or paused from any thread (see cancel.py);
``stop()`` pauses running jobs and keeps their partial files, so a later run resumes them.
"""

from __future__ import annotations

import itertools
import queue
import shutil
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import httpx

from modelbus.events.logs import get_logger
from modelbus.services.config import AppConfig

from .cancel import Cancellation
from .civitai import resolve_civitai
from .errors import DestinationExistsError, DownloadCancelled, DownloadError, RetriesExhaustedError
from .fetch import check_free_space, fetch_file
from .huggingface import resolve_repo
from .job import CallbackName, DownloadJob, DownloadJobStatus, JobCallback, RemoteFile, shared_path
from .network import download_client
from .options import FetchOptions, FileRequest
from .partial import remove_partial
from .security import credential_for
from .sources import CivitaiSource, HFSource, URLSource, parse_source

log = get_logger(__name__)

Publisher = Callable[[str, dict[str, Any]], None]
_STOP = object()


class DownloadQueueService:
    def __init__(
        self,
        max_parallel_dl: int = 5,
        config: AppConfig | None = None,
        publisher: Publisher | None = None,
        *,
        options: FetchOptions | None = None,
    ) -> None:
        self.config = config or AppConfig.load()
        self.max_parallel_dl = max_parallel_dl
        self.publisher = publisher
        self.options = options or FetchOptions.from_config(self.config)
        self._jobs: dict[int, DownloadJob] = {}
        self._ids = itertools.count(1)
        self._seq = itertools.count()
        self._queue: queue.PriorityQueue[tuple[float, int, Any]] = queue.PriorityQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._threads:
                return
            self._client = download_client(
                allow_private=self.options.allow_private, proxy=self.options.proxy,
                timeout=httpx.Timeout(self.options.connect_timeout, read=self.options.stall_timeout),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
                headers={"User-Agent": "modelbus-downloader/0.1"}, hf_endpoint=self.config.hf_endpoint,
            )
            self._threads = [
                threading.Thread(target=self._worker, name=f"download-{i}", daemon=True)
                for i in range(self.max_parallel_dl)
            ]
            for t in self._threads:
                t.start()

    def stop(self) -> None:
        """Pause running jobs (their partial files stay for a resume) and end the worker threads."""
        with self._lock:
            threads, self._threads = self._threads, []
        for job in self.list_jobs():
            if job.status == DownloadJobStatus.RUNNING:
                job.cancellation.stop("pause")
        for _ in threads:
            self._queue.put((float("-inf"), next(self._seq), _STOP))
        for t in threads:
            t.join()
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- submitting -----------------------------------------------------------------------------
    def download(
        self,
        source: str,
        dest: str | Path,
        priority: int = 10,
        access_token: str | None = None,
        sha256: str | None = None,
        on_start: JobCallback | None = None,
        on_progress: JobCallback | None = None,
        on_complete: JobCallback | None = None,
        on_error: JobCallback | None = None,
        on_cancelled: JobCallback | None = None,
        *,
        revision: str | None = None,
        variant: str | None = None,
        base_model: str | None = None,
    ) -> DownloadJob:
        """Queue a URL, Hugging Face repo or Civitai model for download into the folder ``dest``."""
        options = {"revision": revision, "variant": variant, "base_model": base_model}
        parse_source(str(source), civitai_api=self.config.civitai_api, **options)  # bad source: fail now
        folder = Path(dest).expanduser().absolute()  # download_path is absolute, whatever the cwd does later
        job = DownloadJob(source=str(source), dest=folder, priority=priority, access_token=access_token,
                          sha256=sha256.lower() if sha256 else None, options=options,
                          on_start=on_start, on_progress=on_progress, on_complete=on_complete,
                          on_error=on_error, on_cancelled=on_cancelled)
        return self._submit(job)

    def multifile_download(
        self,
        parts: Sequence[RemoteFile | dict[str, Any]],
        dest: str | Path,
        priority: int = 10,
        access_token: str | None = None,
        on_start: JobCallback | None = None,
        on_progress: JobCallback | None = None,
        on_complete: JobCallback | None = None,
        on_error: JobCallback | None = None,
        on_cancelled: JobCallback | None = None,
    ) -> DownloadJob:
        """Queue several files; each part's relative path (no absolute or '..') is kept under ``dest``."""
        files = [p if isinstance(p, RemoteFile) else RemoteFile(**p) for p in parts]
        if not files:
            raise ValueError("multifile_download needs at least one part")
        source = files[0].url if len(files) == 1 else f"{files[0].url} (+{len(files) - 1} files)"
        folder = Path(dest).expanduser().absolute()  # where the files go, whatever the cwd does later
        job = DownloadJob(source=source, dest=folder, priority=priority, access_token=access_token,
                          files=files, on_start=on_start, on_progress=on_progress, on_complete=on_complete,
                          on_error=on_error, on_cancelled=on_cancelled)
        job.download_path = shared_path(folder, files)
        return self._submit(job)

    def _submit(self, job: DownloadJob) -> DownloadJob:
        with self._lock:
            job.id = next(self._ids)
            self._jobs[job.id] = job
        self._queue.put((job.priority, next(self._seq), job))
        return job

    # -- inspecting and controlling ------------------------------------------------------------
    def list_jobs(self) -> list[DownloadJob]:
        with self._lock:
            return list(self._jobs.values())

    def id_to_job(self, id: int) -> DownloadJob:
        with self._lock:
            try:
                return self._jobs[id]
            except KeyError:
                raise KeyError(f"no download job with id {id}") from None

    def cancel_job(self, job: DownloadJob) -> None:
        """Cancel ``job``: a running one stops within a second; its partial files are removed."""
        with job._lock:
            status = job.status
            if status == DownloadJobStatus.RUNNING:
                job.cancellation.stop("cancel")
                return
            if status not in (DownloadJobStatus.WAITING, DownloadJobStatus.PAUSED):
                return
            job.settle(DownloadJobStatus.CANCELLED)
        self._remove_partials(job)
        self._announce(job, "download_cancelled", "on_cancelled")

    def cancel_all_jobs(self) -> None:
        for job in self.list_jobs():
            self.cancel_job(job)

    def pause_job(self, job: DownloadJob) -> None:
        """Stop ``job`` but keep its partial files; :meth:`resume_job` continues where it stopped."""
        with job._lock:
            if job.status == DownloadJobStatus.RUNNING:
                job.cancellation.stop("pause")
                return
            if job.status != DownloadJobStatus.WAITING:
                return
            job.settle(DownloadJobStatus.PAUSED)
        self._announce(job, "download_paused", None)

    def resume_job(self, job: DownloadJob) -> None:
        with job._lock:
            if job.status != DownloadJobStatus.PAUSED:
                return
            job.status = DownloadJobStatus.WAITING
            job._settled.clear()
        self._queue.put((job.priority, next(self._seq), job))

    def prune_jobs(self) -> None:
        """Forget jobs that completed, failed or were cancelled."""
        with self._lock:
            self._jobs = {i: j for i, j in self._jobs.items() if not j.in_terminal_state}

    def wait_for_job(self, job: DownloadJob, timeout: float | None = None) -> DownloadJob:
        if not job.wait(timeout):
            raise TimeoutError(f"download job {job.id} still {job.status.value} after {timeout} s")
        return job

    def join(self) -> None:
        """Wait until every queued job has run (completed, failed, cancelled or paused)."""
        if not self._threads:
            raise RuntimeError("the download queue is not started: call start() first")
        self._queue.join()

    # -- running --------------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            _, _, item = self._queue.get()
            try:
                if item is _STOP:
                    return
                self._run(item)
            except Exception as exc:  # a bug of ours in one job must not take the thread with it
                log.exception("download.worker_error", job=item.id)
                if not item.in_terminal_state:
                    item.settle(DownloadJobStatus.ERROR, exc)
            finally:
                self._queue.task_done()

    def _run(self, job: DownloadJob) -> None:
        with job._lock:
            if job.status != DownloadJobStatus.WAITING:
                return  # cancelled or paused while it waited
            job.begin_run()
        self._announce(job, "download_started", "on_start")
        try:
            self._execute(job)
        except DownloadCancelled:
            if job.cancellation.reason == "pause":
                job.settle(DownloadJobStatus.PAUSED)
                self._announce(job, "download_paused", None)
            else:
                self._remove_partials(job)
                job.settle(DownloadJobStatus.CANCELLED)
                self._announce(job, "download_cancelled", "on_cancelled")
        except Exception as exc:  # every failure becomes the job's error state, never a dead thread
            if not isinstance(exc, DownloadError):
                log.exception("download.unexpected_error", job=job.id)
            if not isinstance(exc, (RetriesExhaustedError, DestinationExistsError)):
                self._remove_partials(job)  # a flaky network keeps its bytes for a retry
            job.settle(DownloadJobStatus.ERROR, exc)
            self._announce(job, "download_error", "on_error")
        else:
            job.settle(DownloadJobStatus.COMPLETED)
            self._announce(job, "download_complete", "on_complete")

    def _execute(self, job: DownloadJob) -> None:
        assert self._client is not None
        if job.files is not None:
            self._fetch_many(job, job.files, job.dest)
            return
        cfg = self.config
        source = parse_source(job.source, civitai_api=cfg.civitai_api, **job.options)
        if isinstance(source, URLSource):
            cred = credential_for(source.url, cfg, job.access_token)
            req = FileRequest(source.url, job.dest, sha256=job.sha256, credential=cred, expect_model=True)
            job.download_path = self._fetch_one(job, req, key="")
        elif isinstance(source, HFSource):
            cred = credential_for(cfg.hf_endpoint, cfg, job.access_token)
            plan = resolve_repo(self._client, source, cfg.hf_endpoint, cred, self.options.allow_private)
            job.metadata = plan.metadata
            self._fetch_repo(job, plan.files, job.dest / plan.folder_name)
        elif isinstance(source, CivitaiSource):
            cred = credential_for(cfg.civitai_api, cfg, job.access_token)
            cplan = resolve_civitai(self._client, source, cfg.civitai_api, cred, self.options.allow_private)
            job.metadata = cplan.metadata
            req = FileRequest(cplan.url, job.dest, name=cplan.filename, size=cplan.size,
                              sha256=job.sha256 or cplan.sha256, credential=cred, expect_model=True)
            job.download_path = self._fetch_one(job, req, key="")

    def _fetch_one(self, job: DownloadJob, req: FileRequest, key: str, cancel: Cancellation | None = None) -> Path:
        assert self._client is not None

        def progress(done: int, total: int | None) -> None:
            if job.update_file(key or req.url, done, total):
                self._announce(job, "download_progress", "on_progress")

        def on_path(final: Path) -> None:
            with job._lock:
                job.partials.append(final)
                if job.files is None and not key:
                    job.download_path = final

        return fetch_file(self._client, req, self.options, cancel or job.cancellation, progress, on_path)

    def _fetch_many(self, job: DownloadJob, files: list[RemoteFile], folder: Path) -> None:
        """Fetch files in parallel; the first real failure stops the others."""
        cred_url = files[0].url
        cred = credential_for(cred_url, self.config, job.access_token)
        for f in files:
            job.update_file(f.path, 0, f.size)
        if all(f.size is not None for f in files):  # the whole set, before any file begins
            check_free_space(folder, sum(f.size or 0 for f in files) + self.options.disk_reserve,
                             f"{len(files)} files")
        group = Cancellation(job.cancellation)
        with ThreadPoolExecutor(max(1, min(self.max_parallel_dl, len(files))), thread_name_prefix="dl-file") as pool:
            futures = []
            for f in files:
                target = folder / f.path
                req = FileRequest(f.url, target.parent, name=target.name, size=f.size, sha256=f.sha256,
                                  credential=cred if cred and cred.applies_to(f.url) else None)
                futures.append(pool.submit(self._fetch_one, job, req, f.path, group))
            errors = []
            for fut in futures:
                exc = fut.exception()
                if exc is not None:
                    errors.append(exc)
                    group.stop("abort")
        job.cancellation.check()
        real = [e for e in errors if not isinstance(e, DownloadCancelled)]
        if real or errors:
            raise (real or errors)[0]

    def _fetch_repo(self, job: DownloadJob, files: list[RemoteFile], final: Path) -> None:
        """A repo goes to ``<name>.part/`` and is renamed into place when every file is there."""
        job.download_path = final
        if final.exists():
            if all((final / f.path).is_file() and (f.size is None or (final / f.path).stat().st_size == f.size)
                   for f in files):
                return  # a retried job whose first run finished
            raise DestinationExistsError(f"{final} already exists")
        staging = final.with_name(final.name + ".part")
        with job._lock:
            job.partials.append(staging)
        self._fetch_many(job, files, staging)
        staging.rename(final)

    def _remove_partials(self, job: DownloadJob) -> None:
        with job._lock:
            paths = list(job.partials)
        for p in paths:
            if p.name.endswith(".part") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                remove_partial(p)

    def _announce(self, job: DownloadJob, event: str, callback: CallbackName | None) -> None:
        """Tell the job's callback and the publisher. Their failures are the caller's, not the
        download's: each callback's first failure is logged once and kept on the job
        (``callback_errors``); the download's outcome and the worker thread are untouched."""
        func = getattr(job, callback) if callback is not None else None
        if func is not None:
            try:
                func(job)
            except Exception as exc:
                if job.note_callback_error(callback, exc):  # type: ignore[arg-type]
                    log.exception("download.callback_failed", job=job.id, callback=callback, on=event)
        if self.publisher is not None:
            try:
                self.publisher(event, job.payload())
            except Exception:  # a lost event must not kill the download
                log.exception("download.publish_failed", job=job.id, on=event)
