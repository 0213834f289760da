"""Publishing a model to the store: upload the blobs it lacks, then confirm it holds every one.

The install calls :func:`publish` after hashing and before it appends ``ModelAdded``, so a record never
names a blob the store does not hold whole. Blobs go up several at a time (each in parallel parts);
a blob another model already uploaded (a shared VAE) is not sent again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from modelbus.events.logs import get_logger
from modelbus.events.schema import FileEntry
from modelbus.services.store import defaults, open_store
from modelbus.services.store.blobs import BlobStore
from modelbus.services.store.errors import BlobStoreUnavailableError

log = get_logger(__name__)


def model_base(path: Path) -> Path:
    """The folder a model's manifest is relative to: its folder, or the one holding its single file."""
    return path if path.is_dir() else path.parent


def publish_model(config: Any, path: Path, files: Sequence[FileEntry]) -> None:
    """Publish the model at ``path`` (``files``: its manifest) to the configured store, if there is one."""
    store = open_store(config)
    if store is not None:
        publish(store, model_base(path), files)


def renamed(files: tuple[FileEntry, ...], old: Path, new: Path) -> tuple[FileEntry, ...]:
    """A single file's manifest entry is its name: follow a rename when it was placed (``name_1``)."""
    if len(files) == 1 and files[0].path == old.name and new.name != old.name and not new.is_dir():
        return (files[0].model_copy(update={"path": new.name}),)
    return files


def publish(store: BlobStore, base: Path, files: Sequence[FileEntry], refresh_before: float | None = None) -> int:
    """Upload the blobs of ``files`` (relative to ``base``) the store lacks; returns the bytes sent.

    A blob the store already holds but last wrote before ``refresh_before`` (default: half the gc grace
    period ago) is touched, so that ``store gc`` (which
    spares young blobs) cannot remove it between this check and the record that will reference it.
    Raises BlobStoreUnavailableError when the store cannot take them, BlobCorruptError when a file no
    longer hashes to its manifest entry; either way nothing half-uploaded is visible."""
    entries = {f.blake3: f for f in files}
    with ThreadPoolExecutor(defaults.BLOB_THREADS, thread_name_prefix="blob-put") as pool:
        infos = dict(zip(entries, pool.map(store.stat, entries), strict=True))
        missing = [d for d, info in infos.items() if info is None or info.size != entries[d].size]
        old = time.time() - defaults.GC_GRACE / 2 if refresh_before is None else refresh_before
        stale = [d for d, info in infos.items() if d not in missing and info is not None and info.modified < old]
        list(pool.map(lambda d: store.put(d, base / entries[d].path), missing))
        list(pool.map(store.touch, stale))
    still = store.missing((digest, f.size) for digest, f in entries.items())
    if still:
        raise BlobStoreUnavailableError(f"model store {store.url} still lacks {len(still)} blob(s) after the upload, "
                                    f"e.g. {still[0]}")
    sent = sum(entries[d].size for d in missing)
    log.info("model_published", store=store.url, blobs=len(entries), uploaded=len(missing), refreshed=len(stale),
             bytes=sent)
    return sent
