"""A download job: what to fetch, where, its state, and its throttled progress reports."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from .cancel import Cancellation
from .metadata import ModelMetadata
from .names import safe_relative_path


class DownloadJobStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    ERROR = "error"


TERMINAL = {DownloadJobStatus.COMPLETED, DownloadJobStatus.CANCELLED, DownloadJobStatus.ERROR}

JobCallback = Callable[["DownloadJob"], None]
CallbackName = Literal["on_start", "on_progress", "on_complete", "on_error", "on_cancelled"]

# progress events: at most one per this many seconds and per this fraction of the total
PROGRESS_MIN_INTERVAL = 0.1
PROGRESS_MIN_STEP = 0.01


@dataclass(frozen=True)
class RemoteFile:
    """One file of a multi-file download: where it comes from and its path under the destination."""

    url: str
    path: str
    size: int | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", safe_relative_path(self.path).as_posix())


def shared_path(dest: Path, files: Sequence[RemoteFile]) -> Path:
    """Where a multi-file download lands: the one file itself, or the deepest folder all parts share
    (``dest/<repo-name>`` when every part sits in one repo's folder, else ``dest``)."""
    if len(files) == 1:
        return dest / files[0].path
    common = os.path.commonpath([PurePosixPath(f.path).parent.as_posix() for f in files])
    return dest / common if common not in ("", ".") else dest


@dataclass
class FileProgress:
    path: str
    bytes: int = 0
    total_bytes: int | None = None


@dataclass(eq=False)
class DownloadJob:
    source: str
    dest: Path
    priority: int = 10
    id: int = -1
    access_token: str | None = field(default=None, repr=False)
    sha256: str | None = None
    status: DownloadJobStatus = DownloadJobStatus.WAITING
    download_path: Path | None = None
    bytes: int = 0
    total_bytes: int | None = None
    error_type: str | None = None
    error: str | None = None
    metadata: ModelMetadata | None = None
    files: list[RemoteFile] | None = None  # set for multifile_download
    parts: dict[str, FileProgress] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # revision, variant, base_model
    rate: float = 0.0
    # callback name -> "ErrorType: message" of its first failure (a callback never changes the outcome)
    callback_errors: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    on_start: JobCallback | None = field(default=None, repr=False)
    on_progress: JobCallback | None = field(default=None, repr=False)
    on_complete: JobCallback | None = field(default=None, repr=False)
    on_error: JobCallback | None = field(default=None, repr=False)
    on_cancelled: JobCallback | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.dest = Path(self.dest)
        self._lock = threading.RLock()
        self._settled = threading.Event()
        self._cancel = Cancellation()
        self._last_emit = 0.0
        self._last_fraction = -1.0
        self._run_start_bytes = 0
        self._run_start_time = 0.0
        self.partials: list[Path] = []  # final paths of files begun: their .part files go on cancel

    # -- state --------------------------------------------------------------------------------
    @property
    def in_terminal_state(self) -> bool:
        return self.status in TERMINAL

    @property
    def cancellation(self) -> Cancellation:
        return self._cancel

    def begin_run(self) -> None:
        with self._lock:
            self._cancel = Cancellation()
            self._settled.clear()
            self.status = DownloadJobStatus.RUNNING
            self.started_at = time.time()
            self._run_start_bytes = self.bytes
            self._run_start_time = time.monotonic()
            self._last_emit = 0.0
            self._last_fraction = -1.0

    def settle(self, status: DownloadJobStatus, error: BaseException | None = None) -> None:
        with self._lock:
            self.status = status
            if error is not None:
                self.error_type = type(error).__name__
                self.error = str(error) or type(error).__name__
            if status in TERMINAL:
                self.finished_at = time.time()
        self._settled.set()

    def note_callback_error(self, callback: CallbackName, error: Exception) -> bool:
        """Keep a callback's first failure; True when it is the first (the one to log)."""
        with self._lock:
            if callback in self.callback_errors:
                return False
            self.callback_errors[callback] = f"{type(error).__name__}: {error}"
            return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job completes, fails, is cancelled or paused; False on timeout."""
        return self._settled.wait(timeout)

    # -- progress -----------------------------------------------------------------------------
    def update_file(self, path: str, done: int, total: int | None) -> bool:
        """Record one file's progress; True when a progress report is due (throttled)."""
        with self._lock:
            part = self.parts.setdefault(path, FileProgress(path))
            part.bytes, part.total_bytes = done, total
            self.bytes = sum(p.bytes for p in self.parts.values())
            totals = [p.total_bytes for p in self.parts.values()]
            if self.files is None or len(self.parts) == len(self.files):
                self.total_bytes = None if any(t is None for t in totals) else sum(totals)  # type: ignore[arg-type]
            elapsed = time.monotonic() - self._run_start_time
            if elapsed > 0:
                self.rate = (self.bytes - self._run_start_bytes) / elapsed
            return self._report_due()

    def _report_due(self) -> bool:
        now = time.monotonic()
        if now - self._last_emit < PROGRESS_MIN_INTERVAL:
            return False
        if self.total_bytes:
            fraction = self.bytes / self.total_bytes
            if fraction - self._last_fraction < PROGRESS_MIN_STEP and fraction < 1.0:
                return False
            self._last_fraction = fraction
        self._last_emit = now
        return True

    def payload(self) -> dict[str, Any]:
        """The body of this job's events on the activity stream."""
        with self._lock:
            body: dict[str, Any] = {
                "id": self.id,
                "source": self.source,
                "path": str(self.download_path) if self.download_path else None,
                "status": self.status.value,
                "bytes": self.bytes,
                "total_bytes": self.total_bytes,
                "rate": round(self.rate, 1),
            }
            if self.files is not None or len(self.parts) > 1:
                body["parts"] = [
                    {"path": p.path, "bytes": p.bytes, "total_bytes": p.total_bytes} for p in self.parts.values()
                ]
            if self.status == DownloadJobStatus.ERROR:
                body["error_type"], body["error"] = self.error_type, self.error
            if self.callback_errors:
                body["callback_errors"] = dict(self.callback_errors)
            return body
