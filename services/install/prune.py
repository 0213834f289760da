"""Pruning the models directory: deleting what no record owns (what ``sync`` would find unrecorded), and
the folders that leaves empty.

A record's path is its own, all of it: the one file of a single-file model, everything inside a folder
model (also what its manifest does not list: ``verify`` reports those as extra). Also kept: the staging
folder (installs and paused downloads), where a running install is placing its model, and modelbus's own
files when they live inside the models directory (database, legacy YAML, blob cache, import area, Redis
data). The order of the reads makes a concurrent install safe: the directory is listed first, then the
running jobs' destinations, then the records (a model placed before the listing is either still a
running job's destination or already a record).

Prune also runs the staging janitor (:mod:`.staging`): staging folders older than ``MODELBUS_STAGING_TTL``
that no running job uses are reclaimed, and the report carries the staging figures (``staging``).

When a record's files are gone, nothing is pruned: the directory may be incomplete (a disk that is not
mounted), and what looks unowned may be a moved model. The refusal names the records.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modelbus.events.errors import Conflict
from modelbus.events.logs import get_logger
from modelbus.events.schema import ModelsDirPruned
from modelbus.services.config import AppConfig
from modelbus.services.install.defaults import STAGING_DIR
from modelbus.services.install.errors import InstallError
from modelbus.services.install.jobs import load_job
from modelbus.services.install.placement import staging_root
from modelbus.services.install.progress import ProgressBoard
from modelbus.services.install.roots import import_area
from modelbus.services.install.staging import StagingReport, reclaim

log = get_logger(__name__)

PRUNE_AGGREGATE = "@models-dir"  # (no model key or job id has an '@')
SHOWN_MISSING = 10


class PruneRefusedError(InstallError, Conflict):
    """Records whose files are missing: the models directory may be incomplete, so nothing is pruned."""


@dataclass
class PruneReport:
    files: list[str] = field(default_factory=list)    # relative to the models directory
    folders: list[str] = field(default_factory=list)
    bytes: int = 0
    dry_run: bool = False
    staging: StagingReport = field(default_factory=StagingReport)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _real(path: str | Path) -> str:
    return os.path.realpath(path)


def _inside(path: str, kept: Iterable[str]) -> bool:
    return any(path == k or path.startswith(k.rstrip(os.sep) + os.sep) for k in kept)


def _listing(models: Path) -> tuple[list[str], list[str]]:
    """Every file (a symlink counts as one: never followed) and folder under ``models``, staging left out."""
    files: list[str] = []
    folders: list[str] = []
    staging = str(models / STAGING_DIR)
    for dirpath, dirnames, filenames in os.walk(models):
        walk = []
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                files.append(full)
            elif full != staging:
                walk.append(d)
                folders.append(full)
        dirnames[:] = walk
        files += [os.path.join(dirpath, f) for f in filenames]
    return files, folders


def _own_files(config: AppConfig) -> list[str]:
    """modelbus's own files and folders, wherever the configuration puts them."""
    return [_real(p) for p in (config.db_path, config.conf_path, config.cache_path, import_area(config),
                               config.root / "redis", staging_root(config))]


def _placing(store: Any) -> list[str]:
    """Where running install jobs are moving their models (read after the listing: see the module doc)."""
    board = ProgressBoard(store.client, store.keys)
    out = []
    for raw in store.client.zrange(store.keys.jobs, 0, -1):
        job_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        placed = board.placed(job_id)
        if placed is not None and not load_job(store, job_id).terminal:
            out.append(_real(placed))
    return out


def _missing_refusal(missing: list[str]) -> PruneRefusedError:
    shown = ", ".join(missing[:SHOWN_MISSING])
    if len(missing) > SHOWN_MISSING:
        shown += f" and {len(missing) - SHOWN_MISSING} more"
    return PruneRefusedError(
        f"nothing pruned: {len(missing)} record(s) have no files: {shown}; the models directory may be incomplete "
        "(a disk not mounted?): repair them (modelbus verify --repair) or remove them (modelbus rm) first")


def plan_prune(config: AppConfig, store: Any, records: Any) -> tuple[PruneReport, dict[str, int], list[str]]:
    """(report, absolute file -> size, absolute folders deepest first) of what a prune would delete; refuses
    (PruneRefusedError) while a record's files are missing."""
    models = config.models_path
    if not models.is_dir():
        return PruneReport(), {}, []
    files, folders = _listing(models)
    kept = _own_files(config) + _placing(store)
    missing = []
    for record in records.all_models():  # (read last: see the module doc)
        path = config.model_path(record.path)
        if not os.path.lexists(path):
            missing.append(f"{record.key} ({record.path})")
        kept += [_real(path), os.path.abspath(path)]
    if missing:
        raise _missing_refusal(missing)
    # a file goes when neither it nor (for a regular file) what it really is lies in a kept path
    doomed = {f: _size(f) for f in files
              if not _inside(f, kept) and (os.path.islink(f) or not _inside(_real(f), kept))}
    left = [f for f in files if f not in doomed]
    empty = [folder for folder in sorted(folders, key=len, reverse=True)  # deepest first
             if not _inside(folder, kept) and not _inside(_real(folder), kept)
             and not any(_inside(k, [folder]) for k in kept) and not any(_inside(f, [folder]) for f in left)]
    report = PruneReport(files=sorted(os.path.relpath(f, models) for f in doomed),
                         folders=sorted(os.path.relpath(f, models) for f in empty), bytes=sum(doomed.values()))
    return report, doomed, empty


def _size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def prune(config: AppConfig, store: Any, records: Any, dry_run: bool = False) -> PruneReport:
    """Delete what :func:`plan_prune` found (unless ``dry_run``) and record it (``ModelsDirPruned``)."""
    report, files, folders = plan_prune(config, store, records)
    report.dry_run = dry_run
    report.staging = reclaim(config, store, dry_run)
    if dry_run or not (files or folders):
        return report
    models = config.models_path
    deleted: dict[str, int] = {}
    for f, size in files.items():
        try:
            os.unlink(f)
        except FileNotFoundError:
            continue
        deleted[f] = size
    removed = []
    for folder in folders:  # deepest first
        try:
            os.rmdir(folder)
        except OSError:
            continue  # not empty any more (something arrived meanwhile): it stays
        removed.append(folder)
    report.files = sorted(os.path.relpath(f, models) for f in deleted)
    report.folders = sorted(os.path.relpath(f, models) for f in removed)
    report.bytes = sum(deleted.values())
    store.append([ModelsDirPruned(aggregate_id=PRUNE_AGGREGATE, files=tuple(report.files),
                                  folders=tuple(report.folders), bytes=report.bytes)])
    log.info("models_dir_pruned", files=len(report.files), folders=len(report.folders), bytes=report.bytes)
    return report
