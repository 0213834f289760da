"""Every blob store (a directory, S3 on a real HTTP endpoint) keeps the same rule: a blob is visible
under its name only whole, and only when its bytes hash to that name."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import blake3
import pytest

from modelbus.events.schema import FileEntry
from modelbus.services.store import (
    BlobCorruptError,
    BlobMissingError,
    BlobStore,
    StoreConfigError,
    file_digest,
)
from modelbus.services.store.maintenance import collect_garbage
from modelbus.services.store.publish import publish
from modelbus.services.store.s3 import S3BlobStore
from tests.servers.s3_server import S3Server
from tests.waiting import wait_until

BIG = 12 << 20 | 12345  # three parts and a tail


def _blob(tmp_path: Path, size: int, name: str = "blob.bin") -> tuple[Path, str]:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path, file_digest(path)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".partial", ".parts")))


@pytest.mark.parametrize("size", [0, 1000, BIG])
def test_put_then_fetch_round_trip(blob_store: BlobStore, tmp_path: Path, size: int) -> None:
    path, digest = _blob(tmp_path, size)
    assert blob_store.missing([(digest, size)]) == [digest]
    blob_store.put(digest, path)
    assert blob_store.size_of(digest) == size
    assert blob_store.missing([(digest, size)]) == []
    assert [(b.digest, b.size) for b in blob_store.digests()] == [(digest, size)]
    seen: list[int] = []
    dest = tmp_path / "cache" / digest
    blob_store.fetch(digest, size, dest, progress=seen.append)
    assert dest.read_bytes() == path.read_bytes()
    assert sum(seen) == size
    assert _leftovers(dest.parent) == []


def test_put_refuses_bytes_that_do_not_hash_to_the_name(blob_store: BlobStore, tmp_path: Path) -> None:
    for size in (1000, BIG):
        path, _ = _blob(tmp_path, size)
        wrong = blake3.blake3(b"something else").hexdigest()
        with pytest.raises(BlobCorruptError, match="does not hash"):
            blob_store.put(wrong, path)
        assert blob_store.size_of(wrong) is None
    assert list(blob_store.digests()) == []


def test_a_blob_of_the_wrong_size_counts_as_missing(blob_store: BlobStore, tmp_path: Path) -> None:
    path, digest = _blob(tmp_path, 1000)
    blob_store.put(digest, path)
    assert blob_store.missing([(digest, 999)]) == [digest]


def test_fetch_refuses_a_corrupt_blob_and_leaves_nothing(blob_store: BlobStore, tmp_path: Path,
                                                         s3_server: S3Server) -> None:
    path, digest = _blob(tmp_path, BIG)
    blob_store.put(digest, path)
    flipped = bytearray(path.read_bytes())
    flipped[BIG // 2] ^= 0xFF
    if isinstance(blob_store, S3BlobStore):  # someone overwrote the object behind our back
        s3_server.client().put_object(Bucket=blob_store.bucket, Key=blob_store.key(digest), Body=bytes(flipped))
    else:
        (blob_store.blobs / digest).write_bytes(bytes(flipped))
    dest = tmp_path / "cache" / digest
    with pytest.raises(BlobCorruptError, match="does not hash to its name"):
        blob_store.fetch(digest, BIG, dest)
    assert not dest.exists()
    assert _leftovers(dest.parent) == []


def test_fetch_of_a_missing_blob_names_it(blob_store: BlobStore, tmp_path: Path) -> None:
    digest = blake3.blake3(b"never stored").hexdigest()
    with pytest.raises(BlobMissingError, match=digest):
        blob_store.fetch(digest, 10, tmp_path / "cache" / digest)
    assert not (tmp_path / "cache" / digest).exists()


def test_a_stopped_fetch_resumes_with_the_parts_it_lacks(blob_store: BlobStore, tmp_path: Path) -> None:
    path, digest = _blob(tmp_path, BIG)
    blob_store.put(digest, path)
    dest = tmp_path / "cache" / digest
    parts = dest.parent / f".{digest}.parts"

    class Killed(Exception):
        pass

    def stop_after_a_part() -> None:
        if parts.exists() and parts.read_text():
            raise Killed

    with pytest.raises(Killed):
        blob_store.fetch(digest, BIG, dest, check=stop_after_a_part)
    assert not dest.exists()
    assert _leftovers(dest.parent) == [f".{digest}.partial", f".{digest}.parts"]
    size = blob_store.part_size
    kept = sum(min(BIG, (i + 1) * size) - i * size for i in map(int, parts.read_text().split()))
    resumed: list[int] = []
    blob_store.fetch(digest, BIG, dest, progress=resumed.append)
    assert dest.read_bytes() == path.read_bytes()
    assert resumed[0] == kept > 0  # the first report: the parts already there, not fetched again
    assert sum(resumed) == BIG
    assert _leftovers(dest.parent) == []


def test_two_fetches_of_one_blob_at_once_download_it_once(blob_store: BlobStore, tmp_path: Path) -> None:
    path, digest = _blob(tmp_path, BIG)
    blob_store.put(digest, path)
    dest = tmp_path / "cache" / digest
    moved: list[int] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            blob_store.fetch(digest, BIG, dest, progress=moved.append)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(moved) == BIG
    assert dest.read_bytes() == path.read_bytes()


def test_a_blob_name_must_be_a_blake3_digest(blob_store: BlobStore, tmp_path: Path) -> None:
    for bad in ("../../etc/passwd", "ABC", "0" * 63, "g" * 64):
        with pytest.raises(StoreConfigError, match="not a BLAKE3"):
            blob_store.size_of(bad)


def test_publishing_touches_an_old_blob_so_gc_spares_it(blob_store: BlobStore, tmp_path: Path) -> None:
    path, digest = _blob(tmp_path, 1000)
    blob_store.put(digest, path)
    entry = FileEntry(path=path.name, size=1000, blake3=digest)
    before = blob_store.stat(digest)
    assert before is not None
    assert publish(blob_store, tmp_path, [entry]) == 0  # present and young: neither sent nor touched
    assert blob_store.stat(digest) == before

    def touched() -> bool:  # stale by the caller's clock: refreshed (S3 keeps whole seconds: poll)
        assert publish(blob_store, tmp_path, [entry], refresh_before=time.time() + 1) == 0
        after = blob_store.stat(digest)
        return after is not None and after.modified > before.modified and after.size == 1000

    wait_until(touched, 15, "the blob's last write to move", interval=0.3)
    assert collect_garbage(blob_store, keep=set(), dry_run=True, grace=0.0).removed == [digest]
