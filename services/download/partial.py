"""The partial file (``<name>.part``) and its range state (``<name>.part.json``).

The state names the URL, total size and validator (ETag or Last-Modified) of what is being
fetched, and, per range, how many bytes of it are on disk. A range's count is raised only after
its bytes were written, so after a kill the state never claims more than the file holds, and a
restarted process (another worker) resumes every range where it stopped.

Whoever writes a partial file holds an exclusive ``flock`` on it (:func:`lock_partial`), so two
writers (a re-run beside a run that was given up for dead, two jobs with one destination) never
write one file together: the second waits for the first, or gives up with PartialBusyError.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from modelbus.events.logs import get_logger

from .errors import PartialBusyError

log = get_logger(__name__)

STATE_VERSION = 1
WRITE_BEHIND = 8 << 20  # bytes a range writes before it asks the kernel to start writing them to disk
_SYNC_FILE_RANGE_WRITE = 2


@dataclass
class ByteRange:
    start: int
    end: int  # exclusive; -1 = until the end of a body of unknown length
    done: int = 0

    @property
    def length(self) -> int | None:
        return None if self.end < 0 else self.end - self.start

    @property
    def complete(self) -> bool:
        return self.length is not None and self.done >= self.length


@dataclass
class PartialState:
    url: str
    total: int | None
    etag: str | None
    last_modified: str | None
    ranges: list[ByteRange] = field(default_factory=list)
    version: int = STATE_VERSION

    @property
    def validator(self) -> str | None:
        """What If-Range may carry: a strong ETag, else Last-Modified."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    @property
    def done(self) -> int:
        return sum(r.done for r in self.ranges)

    def matches(self, other: PartialState) -> bool:
        """Same resource as before: a restart may trust the bytes already on disk."""
        return (
            self.url == other.url
            and self.total == other.total
            and self.validator is not None
            and self.validator == other.validator
        )


def same_validators(saved: PartialState, response: httpx.Response) -> bool:
    """Whether a 206 answer is of the resource the partial file holds: its ETag (else Last-Modified)
    equals the saved one. A server that ignores If-Range answers 206 for a changed file too."""
    etag = response.headers.get("etag")
    if saved.etag and etag:
        return etag == saved.etag
    modified = response.headers.get("last-modified")
    if saved.last_modified and modified:
        return modified == saved.last_modified
    return True  # nothing to compare: the server honoured If-Range or there was nothing to send


def part_path(final: Path) -> Path:
    return final.with_name(final.name + ".part")


def state_path(final: Path) -> Path:
    return final.with_name(final.name + ".part.json")


def split_ranges(total: int, parts: int) -> list[ByteRange]:
    size = -(-total // parts)
    return [ByteRange(start, min(total, start + size)) for start in range(0, total, size)]


def load_state(final: Path) -> PartialState | None:
    path = state_path(final)
    if not path.is_file() or not part_path(final).is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        if raw.get("version") != STATE_VERSION:
            return None
        ranges = [ByteRange(**r) for r in raw.pop("ranges")]
        state = PartialState(**raw, ranges=ranges)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("download.state_unreadable", path=str(path), error=str(exc))
        return None
    # never trust more bytes than the file holds (a single range is written in order)
    size = part_path(final).stat().st_size
    for r in state.ranges:
        r.done = max(0, min(r.done, size - r.start, r.length if r.length is not None else r.done))
    return state


def lock_partial(fd: int, path: Path, wait: float, check: Callable[[], None]) -> bool:
    """Take the exclusive lock of the partial file open as ``fd``, waiting up to ``wait`` s for another
    writer (calling ``check`` meanwhile). False when ``path`` is no longer that file (the other writer
    finished or removed it while we waited): start over. Raises PartialBusyError after ``wait``."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise PartialBusyError(f"{path.name} is being written by another download for more than "
                                       f"{wait:g} s") from None
            check()
            time.sleep(0.2)
    held = os.fstat(fd)
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


class StateWriter:
    """Saves the state atomically; called often from several range threads. ``fence`` runs before each
    save (the job's lease: a run that lost it writes no state either)."""

    def __init__(self, final: Path, state: PartialState, fence: Callable[[], None] | None = None) -> None:
        self.final = final
        self.state = state
        self.fence = fence
        self._lock = threading.Lock()

    def save(self) -> None:
        if self.fence is not None:
            self.fence()
        with self._lock:
            data = json.dumps(asdict(self.state))
            tmp = state_path(self.final).with_suffix(".tmp")
            tmp.write_text(data)
            os.replace(tmp, state_path(self.final))


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` to disk now, without waiting.

    The download's closing fsync then waits for the last few MiB instead of the whole file (on a
    disk slower than the network it was a quarter of the time). Linux's ``sync_file_range``; on
    other systems, or when it fails, nothing: the fsync still makes the file durable.
    """
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def remove_partial(final: Path) -> None:
    for path in (part_path(final), state_path(final), state_path(final).with_suffix(".tmp")):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
