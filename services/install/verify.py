"""Verifying an installed model against what its install recorded, and finding who is writing to a file.

Each file of the manifest (services.install.manifest) is looked at: gone (``missing``), of another size or
BLAKE3 (``changed``), open for writing by a process on this host or changed while it was being read
(``busy``: no verdict, verify it again once the writer is done), else ``ok``. Files inside a folder model
that the manifest does not list are ``extra`` (reported, never a failure). A record from before manifests
(none recorded) is checked as a whole against its content hash.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import blake3

from modelbus.events.schema import FileEntry
from modelbus.services.config import AppConfig
from modelbus.services.hashing import HashingError, content_hash
from modelbus.services.install.manifest import Manifest, manifest_base, resolve_manifest
from modelbus.services.records import ModelConfigBase
from modelbus.services.stopping import checkpoint

CHUNK = 8 << 20
OK, CHANGED, MISSING, BUSY = "ok", "changed", "missing", "busy"


@dataclass
class ModelCheck:
    """What :func:`verify_model` found for one model (``as_dict``: JSON)."""

    key: str
    name: str
    path: str
    status: str = OK  # the worst of its files: missing, changed, busy, ok
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def settle(self) -> ModelCheck:
        self.status = MISSING if self.missing else CHANGED if self.changed else BUSY if self.busy else OK
        return self


def writers(paths: Iterable[Path]) -> dict[str, int]:
    """Which of ``paths`` a process on this host holds open for writing: real path -> a pid (Linux /proc;
    processes this user may not look into are not seen, and elsewhere nothing is)."""
    wanted = {os.path.realpath(p) for p in paths}
    found: dict[str, int] = {}
    if not wanted or not os.path.isdir("/proc"):
        return found
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target not in wanted:
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    flags = next((int(line.split()[1], 8) for line in info if line.startswith("flags:")), 0)
            except (OSError, ValueError):
                continue
            if flags & (os.O_WRONLY | os.O_RDWR):
                found[target] = int(pid)
    return found


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _blake3(path: Path) -> str:
    hasher = blake3.blake3()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            checkpoint()  # a stopped job stops between two chunks (services.stopping)
            hasher.update(chunk)
    return hasher.hexdigest()


def _check_file(check: ModelCheck, entry: FileEntry, target: Path, busy: dict[str, int]) -> None:
    before = _stat(target)
    if before is None or not os.path.isfile(target):
        check.missing.append(entry.path)
        return
    pid = busy.get(os.path.realpath(target))
    if pid is not None:
        check.busy.append(f"{entry.path} (open for writing by process {pid})")
        return
    if before[0] != entry.size:
        check.changed.append(entry.path)
        return
    try:
        digest = _blake3(target)
    except OSError as exc:
        check.missing.append(f"{entry.path} ({exc.strerror or exc})")
        return
    if _stat(target) != before:
        check.busy.append(f"{entry.path} (changed while it was being read)")
    elif digest != entry.blake3:
        check.changed.append(entry.path)
    check.bytes += entry.size


def _extra(base: Path, path: Path, files: Manifest) -> list[str]:
    """Non-hidden files inside a folder model that its manifest does not list."""
    if base != path or not os.path.isdir(path):
        return []
    listed = {e.path for e in files}
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = Path(dirpath, name).relative_to(path).as_posix()
            if rel not in listed:
                out.append(rel)
    return out


def verify_model(config: AppConfig, record: ModelConfigBase, files: Manifest) -> ModelCheck:
    """Check one model's files against its recorded manifest (or, with none recorded, its content hash)."""
    path = config.model_path(record.path)
    check = ModelCheck(key=record.key, name=record.name, path=str(path), files=len(files))
    if not files:
        return _check_whole(check, path, record.hash).settle()
    targets = resolve_manifest(path, files)
    busy = writers(targets)
    for entry, target in zip(files, targets, strict=True):
        _check_file(check, entry, target, busy)
    check.extra = _extra(manifest_base(path, files), path, files)
    return check.settle()


def _check_whole(check: ModelCheck, path: Path, recorded: str | None) -> ModelCheck:
    if not path.exists():
        check.missing.append(path.name)
        return check
    try:
        digest = content_hash(path)
    except HashingError as exc:
        check.error = str(exc)
        check.changed.append(path.name)
        return check
    if recorded and digest != recorded:
        check.changed.append(path.name)
    return check
