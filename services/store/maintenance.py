"""Keeping the store honest: ``push`` (upload an existing shared-directory deployment's models),
``verify`` (re-hash blobs, all or a sample) and ``collect_garbage`` (remove blobs no record references).

Garbage collection spares blobs younger than ``defaults.GC_GRACE``: an install uploads before it records, so a
fresh unreferenced blob may belong to a record about to be appended.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from modelbus.events.schema import FileEntry
from modelbus.services.store import defaults
from modelbus.services.store.blobs import BlobStore
from modelbus.services.store.errors import BlobMissingError
from modelbus.services.store.publish import model_base, publish


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)
    bytes: int = 0
    kept: int = 0
    young: int = 0
    dry_run: bool = False


@dataclass
class VerifyReport:
    checked: int = 0
    bad: list[str] = field(default_factory=list)       # blobs whose bytes do not hash to their name
    missing: list[str] = field(default_factory=list)   # referenced by a record, absent from the store


def referenced(manifests: Iterable[Sequence[FileEntry]]) -> set[str]:
    return {entry.blake3 for files in manifests for entry in files}


def collect_garbage(store: BlobStore, keep: set[str], dry_run: bool = False,
                    grace: float = defaults.GC_GRACE) -> GcReport:
    report = GcReport(dry_run=dry_run)
    now = time.time()
    for blob in list(store.digests()):
        if blob.digest in keep:
            report.kept += 1
        elif now - blob.modified < grace:
            report.young += 1
        else:
            report.removed.append(blob.digest)
            report.bytes += blob.size
            if not dry_run:
                store.delete(blob.digest)
    return report


def blob_hash(store: BlobStore, digest: str, size: int) -> str:
    """The BLAKE3 of a stored blob's bytes, streamed (nothing written to disk)."""
    hasher = blake3.blake3()
    for start in range(0, size, defaults.PART_SIZE):
        for chunk in store.read_range(digest, start, min(size, start + defaults.PART_SIZE)):
            hasher.update(chunk)
    return hasher.hexdigest()


def verify(store: BlobStore, wanted: set[str], sample: int | None = None) -> VerifyReport:
    """Re-hash the store's blobs (``sample``: that many, at random); also name referenced ones it lacks."""
    blobs = list(store.digests())
    present = {b.digest for b in blobs}
    report = VerifyReport(missing=sorted(wanted - present))
    chosen = random.sample(blobs, min(sample, len(blobs))) if sample is not None else blobs
    for blob in chosen:
        try:
            ok = blob_hash(store, blob.digest, blob.size) == blob.digest
        except BlobMissingError:  # deleted while we listed
            continue
        report.checked += 1
        if not ok:
            report.bad.append(blob.digest)
    return report


def push(store: BlobStore, models: Iterable[tuple[Path, Sequence[FileEntry]]]) -> tuple[int, int]:
    """Upload the blobs of models in a models directory; (models pushed, bytes sent)."""
    count = sent = 0
    for path, files in models:
        sent += publish(store, model_base(path), files)
        count += 1
    return count, sent
