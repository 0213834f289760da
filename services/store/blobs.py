"""The blob store interface: content-addressed files, each named by the BLAKE3 of its bytes.

A store holds ``<prefix>/blobs/blake3/<hex>``. Its one rule: a blob is visible under its name only when
it is whole and its bytes hash to that name. ``put`` checks the bytes as it sends them and the stored
size and digest after; ``fetch`` writes into a hidden partial file, hashes it while the parts arrive
and renames it into place only when the digest matches. Implementations: :class:`FileBlobStore` (a
directory, e.g. on a shared disk) here and :class:`services.store.s3.S3BlobStore`.
"""

from __future__ import annotations

import os
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import blake3

from modelbus.services.store import defaults
from modelbus.services.store.errors import (
    BlobCorruptError,
    BlobMissingError,
    BlobStoreUnavailableError,
    StoreConfigError,
)
from modelbus.services.store.transfer import Progress, fetch_verified

_HEX = re.compile(r"^[0-9a-f]{64}$")


class BlobInfo(NamedTuple):
    digest: str
    size: int
    modified: float  # epoch seconds of the blob's last write


def check_digest(digest: str) -> str:
    """A blob name is 64 lowercase hex characters (a BLAKE3 digest); anything else is refused."""
    if not isinstance(digest, str) or not _HEX.match(digest):
        raise StoreConfigError(f"not a BLAKE3 hex digest: {digest!r}")
    return digest


def file_digest(path: Path) -> str:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if path.stat().st_size:
        hasher.update_mmap(path)
    return hasher.hexdigest()


class BlobStore(ABC):
    """Content-addressed blobs. Every method raises BlobStoreUnavailableError naming ``url`` when the store
    cannot be reached or refuses us."""

    url: str
    part_size: int = defaults.PART_SIZE  # one ranged read of a fetch (and one multipart part on S3)

    @abstractmethod
    def check(self) -> None:
        """Raise BlobStoreUnavailableError unless the store answers and we may read and write it."""

    @abstractmethod
    def stat(self, digest: str) -> BlobInfo | None:
        """A blob's size and last write, or None when the store lacks it."""

    @abstractmethod
    def touch(self, digest: str) -> None:
        """Make a blob's last write now (``store gc`` spares young blobs: see publish.py)."""

    def size_of(self, digest: str) -> int | None:
        info = self.stat(digest)
        return None if info is None else info.size

    @abstractmethod
    def put(self, digest: str, path: Path) -> None:
        """Store ``path`` as blob ``digest``; BlobCorruptError (and nothing stored) if it does not hash so."""

    @abstractmethod
    def read_range(self, digest: str, start: int, end: int) -> Iterator[bytes]:
        """The bytes ``[start, end)`` of a blob, in chunks. BlobMissingError when there is none."""

    @abstractmethod
    def delete(self, digest: str) -> None:
        """Remove a blob (nothing happens when it is not there)."""

    @abstractmethod
    def digests(self) -> Iterator[BlobInfo]:
        """Every blob in the store."""

    def missing(self, entries: Iterable[tuple[str, int]]) -> list[str]:
        """The digests of ``entries`` (digest, size) the store lacks, or holds with another size."""
        unique = dict(entries)
        with ThreadPoolExecutor(defaults.TRANSFER_THREADS) as pool:
            sizes = dict(zip(unique, pool.map(self.size_of, unique), strict=True))
        return [d for d, size in unique.items() if sizes[d] != size]

    def fetch(self, digest: str, size: int, dest: Path, progress: Progress | None = None,
              check: Callable[[], None] | None = None) -> None:
        """Download a blob to ``dest`` (parallel ranges, BLAKE3 verified as they arrive): ``dest`` appears
        only whole and verified. A partial file left by a killed fetch is resumed."""
        fetch_verified(lambda s, e: self.read_range(check_digest(digest), s, e), digest, size, dest,
                       part_size=self.part_size, progress=progress, check=check)


class FileBlobStore(BlobStore):
    """Blobs in a directory: ``<root>/blobs/blake3/<hex>``, written to a hidden temporary and renamed."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root}"
        self.blobs = self.root / defaults.BLOB_PREFIX

    def _path(self, digest: str) -> Path:
        return self.blobs / check_digest(digest)

    def check(self) -> None:
        try:
            self.blobs.mkdir(parents=True, exist_ok=True)
            probe = self.blobs / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise BlobStoreUnavailableError(f"model store {self.url} cannot be used: {exc.strerror or exc}") from exc

    def stat(self, digest: str) -> BlobInfo | None:
        try:
            stat = self._path(digest).stat()
        except FileNotFoundError:
            return None
        return BlobInfo(digest, stat.st_size, stat.st_mtime)

    def touch(self, digest: str) -> None:
        os.utime(self._path(digest))

    def put(self, digest: str, path: Path) -> None:
        target = self._path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{digest}.{uuid.uuid4().hex}.partial"
        try:
            hasher = blake3.blake3()
            with path.open("rb") as src, tmp.open("wb") as out:
                while block := src.read(defaults.HASH_BLOCK):
                    hasher.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            if hasher.hexdigest() != digest:
                raise BlobCorruptError(f"{path} does not hash to {digest}: not stored in {self.url}")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def read_range(self, digest: str, start: int, end: int) -> Iterator[bytes]:
        try:
            fh = self._path(digest).open("rb")
        except FileNotFoundError as exc:
            raise BlobMissingError(f"blob {digest} is not in the model store {self.url}") from exc
        with fh:
            fh.seek(start)
            left = end - start
            while left > 0 and (chunk := fh.read(min(left, defaults.STREAM_CHUNK))):
                left -= len(chunk)
                yield chunk

    def delete(self, digest: str) -> None:
        self._path(digest).unlink(missing_ok=True)

    def digests(self) -> Iterator[BlobInfo]:
        if not self.blobs.is_dir():
            return
        for entry in os.scandir(self.blobs):
            if _HEX.match(entry.name):
                stat = entry.stat()
                yield BlobInfo(entry.name, stat.st_size, stat.st_mtime)
