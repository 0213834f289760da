"""Live progress of install jobs: bytes per file in a Redis hash, reports on the activity stream.

Progress is operational state, not history: it would flood the never-trimmed log. Each file of a
job writes its own fields (``b:<file>`` done, ``t:<file>`` total, ``n:<file>`` its name), so download
workers on several machines never overwrite each other, and the job's bytes are their sum.
"""

from __future__ import annotations

import time
from pathlib import Path

import redis

from modelbus.events.errors import EventStoreError
from modelbus.events.keys import Keys
from modelbus.events.logs import get_logger
from modelbus.events.schema import InstallProgress, InstallProgressPayload
from modelbus.events.store import EventStore
from modelbus.services.install.defaults import PROGRESS_INTERVAL, PROGRESS_TTL

log = get_logger(__name__)

FileBytes = tuple[str, int, int | None]  # a file of a job: its name, bytes done, its size when known


class ProgressBoard:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def set_total(self, job_id: str, total_bytes: int | None) -> None:
        key = self.keys.job(job_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, "total", int(total_bytes or 0))
        pipe.expire(key, PROGRESS_TTL)
        pipe.execute()

    def set_file(self, job_id: str, file: str, done: int, total: int | None, name: str | None = None) -> None:
        key = self.keys.job(job_id)
        fields: dict[str | bytes, bytes | float | int | str] = {f"b:{file}": done}
        if name:
            fields[f"n:{file}"] = name
        if total is not None:
            fields[f"t:{file}"] = total
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, mapping=fields)  # one command for the file's fields (every progress tick writes them)
        pipe.expire(key, PROGRESS_TTL)
        pipe.execute()

    def read(self, job_id: str) -> tuple[int, int]:
        """(bytes done, total bytes) of a job; the total is the plan's, else the sum of known file sizes."""
        done, total, _ = self.snapshot(job_id)
        return done, total

    def snapshot(self, job_id: str) -> tuple[int, int, list[FileBytes]]:
        """:meth:`read`, and each file's (name, bytes done, size or None), by name (a file reported without
        one goes by its id): one round trip."""
        raw = self.client.hgetall(self.keys.job(job_id))
        done = total_files = 0
        planned = 0
        files: dict[str, list[int | None]] = {}
        names: dict[str, str] = {}
        for name, value in raw.items():
            field = name.decode() if isinstance(name, bytes) else str(name)
            if field.startswith("b:"):
                done += int(value)
                files.setdefault(field[2:], [0, None])[0] = int(value)
            elif field.startswith("t:"):
                total_files += int(value)
                files.setdefault(field[2:], [0, None])[1] = int(value)
            elif field.startswith("n:"):
                names[field[2:]] = value.decode() if isinstance(value, bytes) else str(value)
            elif field == "total":
                planned = int(value)
        per_file = sorted((names.get(f, f), int(b or 0), t) for f, (b, t) in files.items())
        return done, planned or total_files, per_file

    def names(self, job_id: str) -> dict[str, str]:
        """What the job's view calls each file, by the id its ``install_progress`` events carry."""
        raw = self.client.hgetall(self.keys.job(job_id))
        return {k[2:]: (v.decode() if isinstance(v, bytes) else str(v))
                for k, v in ((k.decode() if isinstance(k, bytes) else str(k), v) for k, v in raw.items())
                if k.startswith("n:")}

    def set_placed(self, job_id: str, path: Path) -> None:
        """Where a job is moving its model: a retry after a death mid-move finds it there."""
        self.client.hset(self.keys.job(job_id), "placed", str(path))

    def placed(self, job_id: str) -> Path | None:
        raw = self.client.hget(self.keys.job(job_id), "placed")
        return Path(raw.decode() if isinstance(raw, bytes) else raw) if raw else None

    def clear(self, job_id: str) -> None:
        self.client.delete(self.keys.job(job_id))


class ProgressReporter:
    """Throttled progress of one file of one job: the board, and an ``install_progress`` activity."""

    def __init__(self, board: ProgressBoard, store: EventStore, job_id: str, file: str,
                 interval: float = PROGRESS_INTERVAL, name: str | None = None) -> None:
        self.board, self.store, self.job_id, self.file = board, store, job_id, file
        self.name = name  # what the job's view calls the file (``file`` is its id within the job)
        self.interval = interval
        self._last = 0.0
        self._sent: tuple[int, int | None] | None = None  # the last figures reported

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        finished = total is not None and done >= total
        if (not finished and now - self._last < self.interval) or (done, total) == self._sent:
            return  # (the end of a file is often reported twice: by the copy loop and by its caller)
        self._last = now
        try:
            self.board.set_file(self.job_id, self.file, done, total, self.name)
            self.store.publish(InstallProgress(aggregate_id=self.job_id, correlation_id=self.job_id,
                                               payload=InstallProgressPayload(job_id=self.job_id, file=self.file,
                                                                              bytes=done, total_bytes=total)))
            self._sent = (done, total)
        except (redis.RedisError, EventStoreError) as exc:  # advisory: a report lost while Redis is away
            log.warning("install_progress_not_reported", job=self.job_id, error=str(exc))  # must not end the copy
