"""A model's manifest: the files it owns, as recorded at its install (relative path, size, BLAKE3).

The manifest is computed in the same pass that computes the record's content hash (each file is read
once), travels in the ``ModelAdded`` event (and in a ``ModelUpdated`` whose path moved), and is what a
delete removes and what a content-addressed store uploads. Entry paths are relative to the model's
*base*: the model's folder, or for a single file the folder holding it.

    model_manifest(path)               -> the manifest of the model at ``path`` (reads every byte)
    resolve_manifest(path, files)      -> each entry's absolute path, refusing entries that leave the base
    recorded_manifest(history)         -> the manifest the log holds for one model (empty: recorded before)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from modelbus.events.schema import FileEntry, ModelAdded, ModelUpdated
from modelbus.events.store import StoredEvent
from modelbus.services.hashing import HashingError, content_hash_and_files
from modelbus.services.install.errors import ModelIdentificationError, UnsafeManifestError

Manifest = tuple[FileEntry, ...]


def hash_and_manifest(path: Path, threads: int | None = None) -> tuple[str, Manifest]:
    """The record's content hash and the model's manifest, from one read of every file."""
    try:
        return content_hash_and_files(path, threads=threads)
    except HashingError as exc:
        raise ModelIdentificationError(str(exc)) from exc


def model_manifest(path: Path, threads: int | None = None) -> Manifest:
    """The manifest of the model at ``path`` (a file or a folder; hidden entries are not the model's)."""
    return hash_and_manifest(path, threads)[1]


def manifest_base(path: Path, files: Sequence[FileEntry]) -> Path:
    """The folder the entries are relative to: the model's folder, or the one holding its single file.

    When the path is gone from the disk, a manifest of one entry named like the path is a single file.
    """
    if os.path.isdir(path):  # (os.path: a name too long is "not there", not an error)
        return path
    if os.path.exists(path) or (len(files) == 1 and files[0].path == path.name):
        return path.parent
    return path


def resolve_manifest(path: Path, files: Sequence[FileEntry]) -> list[Path]:
    """The absolute path of each entry, in order, for the model recorded at ``path`` (absolute).

    An entry that is absolute, holds ``..`` or reaches outside the base through a symlink is refused
    (a forged event): UnsafeManifestError names it.
    """
    base = manifest_base(path, files)
    real_base = os.path.realpath(base)
    out = []
    for entry in files:
        if base != path and entry.path != path.name:
            raise UnsafeManifestError(f"manifest entry {entry.path!r} is not the single file {path.name!r}")
        rel = PurePosixPath(entry.path)
        if rel.is_absolute() or not rel.parts or any(part in ("..", ".", "") for part in rel.parts):
            raise UnsafeManifestError(f"manifest entry {entry.path!r} is not a plain path inside {base}")
        target = base.joinpath(*rel.parts)
        if not _within(os.path.realpath(target), real_base):
            raise UnsafeManifestError(f"manifest entry {entry.path!r} leads outside {base}")
        out.append(target)
    return out


def recorded_manifest(history: Iterable[StoredEvent]) -> Manifest:
    """The manifest the log holds for one model: the latest ``ModelAdded`` or moving ``ModelUpdated``."""
    files: Manifest = ()
    for stored in history:
        event = stored.event
        found = event.files if isinstance(event, (ModelAdded, ModelUpdated)) else None
        if found is not None:
            files = found
    return files


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)
