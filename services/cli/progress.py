"""Live progress in the terminal, driven by the events the workers publish: one bar per downloaded
file (``install_progress``), a status line for the job's steps, a spinner for loads."""

from __future__ import annotations

import threading
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from modelbus.events.jobs import InstallJobView
from modelbus.events.schema import (
    LOAD_EVENT_KINDS,
    Event,
    InstallCancelled,
    InstallCompleted,
    InstallDownloaded,
    InstallFailed,
    InstallPaused,
    InstallProgress,
    InstallRestarted,
    InstallResumed,
    InstallStarted,
    ModelFetchCompleted,
    ModelFetchFailed,
    ModelFetchProgress,
    ModelFetchStarted,
    ModelLoadCompleted,
    ModelLoadFailed,
    ModelLoadStarted,
)
from modelbus.services.client import Cursor, ModelBusClient, WaitTimeoutError

STEP_TEXT: dict[type[Event], str] = {
    InstallStarted: "working", InstallDownloaded: "downloaded; hashing and probing", InstallCompleted: "installed",
    InstallFailed: "failed", InstallCancelled: "cancelled", InstallPaused: "paused (modelbus jobs resume JOB)",
    InstallResumed: "resumed", InstallRestarted: "restarted"}
ENDS = (InstallCompleted, InstallFailed, InstallCancelled)
JOB_EVENTS = (InstallProgress.model_fields["kind"].default, *(cls.model_fields["type"].default for cls in STEP_TEXT))
FETCH_EVENTS = (ModelFetchStarted, ModelFetchProgress, ModelFetchCompleted, ModelFetchFailed)
LOAD_EVENTS = (*LOAD_EVENT_KINDS, *(cls.model_fields["kind"].default for cls in FETCH_EVENTS))


class _FileColumn(DownloadColumn):
    """Bytes of a file's bar; nothing on the job's status line (a count of steps, not of bytes)."""

    def render(self, task: Any) -> Any:
        return "" if task.fields.get("status") else super().render(task)


class _SpeedColumn(TransferSpeedColumn):
    def render(self, task: Any) -> Any:
        return "" if task.fields.get("status") else super().render(task)


def head(client: ModelBusClient) -> str:
    """The resume token of 'now': a subscription from it misses nothing that happens afterwards."""
    store = client.store
    return str(Cursor(store.head("events"), store.head("activity")))


def follow_install(client: ModelBusClient, job: InstallJobView, since: str, console: Console,
                   timeout: float | None = None) -> InstallJobView:
    """Show the job's progress until it ends; returns its final state."""
    job_id = job.id
    if job.terminal:
        return job
    deadline = None if timeout is None else time.monotonic() + timeout
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), _FileColumn(), _SpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        status = progress.add_task(f"[bold]{job.source}[/] waiting for a worker", total=None, status=True)
        files: dict[str, TaskID] = {}
        names: dict[str, str] = {}  # a file's id in the events -> its name in the job (read once per new file)
        # (imported here: a reading command must not import the install package; an install imports it anyway)
        from modelbus.services.install.progress import ProgressBoard
        board = ProgressBoard(client.redis, client.store.keys)
        stop = lambda: deadline is not None and time.monotonic() > deadline
        for delivered in client.subscribe(JOB_EVENTS, since, stop=stop, block_ms=250):
            event = delivered.event
            if event.aggregate_id != job_id and event.correlation_id != job_id:
                continue
            if isinstance(event, InstallProgress):
                payload = event.payload
                file = payload.file or "download"
                if file not in files:
                    if file not in names:
                        names.update(board.names(job_id))
                    files[file] = progress.add_task(f"  {names.get(file, file)}", total=payload.total_bytes)
                progress.update(files[file], completed=payload.bytes, total=payload.total_bytes)
                continue
            step = STEP_TEXT.get(type(event))
            if step is None:
                continue
            progress.update(status, description=f"[bold]{job.source}[/] {step}")
            if isinstance(event, ENDS):
                progress.update(status, total=1, completed=1)
                break
    final = client.job(job_id)
    if not final.terminal:
        raise WaitTimeoutError(f"install job {job_id} is still {final.state} after {timeout:g}s "
                               f"(it goes on; follow it with: modelbus jobs)")
    return final


class LoadStatus:
    """A spinner whose text follows the load events of one model while ``client.load`` blocks."""

    def __init__(self, client: ModelBusClient, key: str, console: Console) -> None:
        self.client, self.key, self.console = client, key, console
        self.since = head(client)
        self.stopped = threading.Event()
        self.ended = threading.Event()  # the watcher saw this load's last event
        self.seen: list[str] = []

    def run(self, call: Any) -> Any:
        with self.console.status(f"loading {self.key}: queued") as status:
            def watch() -> None:
                for d in self.client.subscribe(LOAD_EVENTS, self.since, stop=self.stopped.is_set, block_ms=200):
                    event = d.event
                    if isinstance(event, ModelLoadStarted | ModelLoadCompleted | ModelLoadFailed) \
                            and event.payload.model_key == self.key:
                        self.seen.append(event.kind)
                        if not isinstance(event, ModelLoadStarted):
                            self.ended.set()
                        worker = event.payload.worker or ""
                        status.update(f"loading {self.key}: {event.kind.removeprefix('model_load_')} on {worker}")
                    elif isinstance(event, FETCH_EVENTS) and event.payload.model_key == self.key:
                        self.seen.append(event.kind)  # a host without the model's files fetches them first
                        done = getattr(event.payload, "bytes", None) or 0  # (started and failed carry no bytes)
                        total = getattr(event.payload, "total_bytes", None) or 0
                        of = f" {done / (1 << 20):.0f} of {total / (1 << 20):.0f} MiB" if total else ""
                        status.update(f"loading {self.key}: {event.kind.removeprefix('model_')}{of}")

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            try:
                return call()
            finally:
                # the answer can come before the watcher has read the events that led to it
                self.ended.wait(2)
                self.stopped.set()
                watcher.join(2)
