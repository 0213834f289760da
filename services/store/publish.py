"""Publishing a model to the store: upload the blobs it lacks, then confirm it holds every one.

The install calls :func:`publish` after hashing and before it appends ``ModelAdded``, so a record never
names a blob the store does not hold whole. Blobs go up several at a time (each in parallel parts);
a blob another model already uploaded (a shared VAE) is not sent again.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from events.schema import FileEntry
from services.store import defaults, open_store
from services.store.blobs import BlobStore
from services.store.errors import StoreUnavailableError

log = structlog.get_logger(__name__)


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


def publish(store: BlobStore, base: Path, files: Sequence[FileEntry]) -> int:
    """Upload the blobs of ``files`` (relative to ``base``) the store lacks; returns the bytes sent.

    Raises StoreUnavailableError when the store cannot take them, BlobCorruptError when a file no
    longer hashes to its manifest entry; either way nothing half-uploaded is visible."""
    entries = {f.blake3: f for f in files}
    missing = store.missing((digest, f.size) for digest, f in entries.items())

    def put(digest: str) -> None:
        store.put(digest, base / entries[digest].path)

    with ThreadPoolExecutor(defaults.BLOB_THREADS, thread_name_prefix="blob-put") as pool:
        list(pool.map(put, missing))
    still = store.missing((digest, f.size) for digest, f in entries.items())
    if still:
        raise StoreUnavailableError(f"model store {store.url} still lacks {len(still)} blob(s) after the upload, "
                                    f"e.g. {still[0]}")
    sent = sum(entries[d].size for d in missing)
    log.info("model_published", store=store.url, blobs=len(entries), uploaded=len(missing), bytes=sent)
    return sent
