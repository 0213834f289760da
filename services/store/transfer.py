"""Fetching one blob: parallel ranged reads into a hidden partial file, BLAKE3 verified as parts arrive.

The rule: the destination appears (one rename) only when every byte is there and the whole hashes to
the blob's name. Parts are written with ``pwrite`` by a pool of threads while this thread hashes the
file's completed prefix in order, so verifying overlaps the download instead of following it. The
part numbers already written are appended to a ``.parts`` file beside the partial one, so a fetch
killed half-way resumes with the parts it lacks (the resumed bytes are hashed like the rest, so a
torn part is caught). One fetch of a blob runs at a time per destination (an ``flock``); a second
process waits for it and then finds the blob there.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import blake3

from modelbus.events.logs import get_logger
from modelbus.services.store import defaults
from modelbus.services.store.errors import BlobCorruptError, CacheFullError, StoreError, TransferStopped

log = get_logger(__name__)

Progress = Callable[[int], None]                   # hears each number of bytes that arrived
ReadRange = Callable[[int, int], Iterator[bytes]]  # bytes [start, end) of the blob, in chunks


@contextmanager
def blob_lock(dest: Path) -> Iterator[None]:
    """Exclusive, per destination, across processes: released when the holder exits or dies."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest.parent / f".{dest.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def fetch_verified(read_range: ReadRange, digest: str, size: int, dest: Path, *,
                   part_size: int = defaults.PART_SIZE, threads: int = defaults.TRANSFER_THREADS,
                   progress: Progress | None = None, check: Callable[[], None] | None = None) -> None:
    """Bring blob ``digest`` (``size`` bytes) to ``dest``; see the module docstring for the rules."""
    with blob_lock(dest):
        if dest.exists():
            return  # fetched by someone else while we waited
        _Fetch(read_range, digest, size, dest, part_size, threads, progress, check).run()


class _Fetch:
    def __init__(self, read_range: ReadRange, digest: str, size: int, dest: Path, part_size: int,
                 threads: int, progress: Progress | None, check: Callable[[], None] | None) -> None:
        self.read_range, self.digest, self.size, self.dest = read_range, digest, size, dest
        self.part_size, self.threads = part_size, threads
        self.progress, self.check = progress, check
        self.partial = dest.parent / f".{dest.name}.partial"
        self.parts_file = dest.parent / f".{dest.name}.parts"
        self.count = max(1, -(-size // part_size))
        self.done: set[int] = set()
        self.cond = threading.Condition()
        self.error: BaseException | None = None

    def run(self) -> None:
        self.done = self._resumable()
        resumed = len(self.done)
        try:
            fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _translate(exc, self.dest) from exc
        try:
            self._fill(fd)
            if self._hash(fd) != self.digest:
                self._discard()
                raise BlobCorruptError(f"blob {self.digest} does not hash to its name (refused, removed)")
        except CacheFullError:
            self._discard()
            raise
        finally:
            os.close(fd)
        os.replace(self.partial, self.dest)
        self.parts_file.unlink(missing_ok=True)
        if resumed:
            log.info("blob_fetch_resumed", digest=self.digest, size=self.size, parts=self.count, resumed_parts=resumed)

    def _resumable(self) -> set[int]:
        """The parts a killed fetch already wrote, when its partial file is the right size."""
        try:
            if self.partial.stat().st_size != self.size:
                raise FileNotFoundError
            lines = self.parts_file.read_text().split()
        except (FileNotFoundError, ValueError):
            self._discard()
            return set()
        return {int(x) for x in lines if x.isdigit() and int(x) < self.count}

    def _discard(self) -> None:
        self.partial.unlink(missing_ok=True)
        self.parts_file.unlink(missing_ok=True)

    def _fill(self, fd: int) -> None:
        try:
            if os.fstat(fd).st_size != self.size:
                os.ftruncate(fd, 0)
                if self.size:
                    os.posix_fallocate(fd, 0, self.size)  # a full disk shows now, not half-way
        except OSError as exc:
            raise _translate(exc, self.dest) from exc
        if self.progress and self.done:
            self.progress(sum(self._bounds(i)[1] - self._bounds(i)[0] for i in self.done))
        self._parts_fd = os.open(self.parts_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="blob-part")
        for index in range(self.count):
            if index not in self.done:
                self._pool.submit(self._part, fd, index)

    def _bounds(self, index: int) -> tuple[int, int]:
        start = index * self.part_size
        return start, min(self.size, start + self.part_size)

    def _part(self, fd: int, index: int) -> None:
        start, end = self._bounds(index)
        try:
            offset = start
            if end > start:
                for chunk in self.read_range(start, end):
                    if self.error is not None:
                        raise TransferStopped
                    if offset + len(chunk) > end:
                        raise BlobCorruptError(f"blob {self.digest}: the store sent more than asked for")
                    os.pwrite(fd, chunk, offset)
                    offset += len(chunk)
                    if self.progress:
                        self.progress(len(chunk))
                    if self.check:
                        self.check()
            if offset != end:
                raise BlobCorruptError(f"blob {self.digest}: truncated (part {index} ended at {offset} of {end})")
            os.write(self._parts_fd, f"{index}\n".encode())
        except TransferStopped:
            return
        except OSError as exc:
            self._fail(_translate(exc, self.dest))
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the hashing thread, which raises it
            self._fail(exc)
            return
        with self.cond:
            self.done.add(index)
            self.cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = exc
            self.cond.notify_all()

    def _hash(self, fd: int) -> str:
        hasher = blake3.blake3()
        try:
            for index in range(self.count):
                with self.cond:
                    while index not in self.done and self.error is None:
                        self.cond.wait()
                    if self.error is not None:
                        raise self.error
                start, end = self._bounds(index)
                while start < end:
                    block = os.pread(fd, min(defaults.HASH_BLOCK, end - start), start)
                    if not block:
                        raise BlobCorruptError(f"blob {self.digest}: partial file shorter than its parts")
                    hasher.update(block)
                    start += len(block)
        finally:
            if self.error is None and len(self.done) < self.count:
                self._fail(TransferStopped())
            self._pool.shutdown(wait=True)
            os.close(self._parts_fd)
        return hasher.hexdigest()


def _translate(exc: OSError, dest: Path) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CacheFullError(f"no space left for {dest.name} in {dest.parent}")
    return StoreError(f"cannot write {dest}: {exc.strerror or exc}")
