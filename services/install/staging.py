"""The staging janitor: reclaiming staging folders that nothing will use again.

Installs stage under ``<models>/.staging/<name>``: ``<job id>`` for a worker's install (its downloads and
copies), ``local-<hex>`` for an in-process local install, ``convert-<key>`` for a conversion. A step that ends
removes its folder (a job that failed in its downloads keeps the whole files a restart may take over); a
worker killed mid-install leaves it behind. The janitor (``prune``) reclaims a folder when

- nothing inside it changed for ``MODELBUS_STAGING_TTL`` (the newest modification time of the folder and of
  everything in it: a running download or copy keeps it young), and
- its job is not running: no live worker holds the lease of any step of the job's current attempt, and a
  job that has not ended has not moved (no event) within the TTL either.

Prune runs the janitor, and so does every worker of the install or hash queue once as it starts (a worker killed
mid-install is mostly followed by a new one on its host). Each reclaimed folder is an ``InstallStagingReclaimed`` event, appended before the folder goes: on the job's
aggregate at the version that was judged (a job that moved meanwhile is judged again, and kept), else on
``@staging``. A crash between the two leaves the folder for the next prune, which records it again.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelbus.events.logs import get_logger
from modelbus.events.schema import InstallStagingReclaimed
from modelbus.services.config import AppConfig
from modelbus.services.install.errors import UnknownJobError
from modelbus.services.install.jobs import InstallJob, load_job, transition
from modelbus.services.install.placement import STAGING_NAME, remove_tree, staging_root

log = get_logger(__name__)

STAGING_AGGREGATE = "@staging"  # (no model key or job id has an '@')
_GLOB_SPECIAL = str.maketrans({c: "\\" + c for c in "*?[]\\"})


@dataclass
class StagingFolder:
    name: str
    files: int
    bytes: int
    modified: float  # epoch seconds of the newest change inside it
    job: str | None = None  # the install job whose folder it is
    kept: str | None = None  # why it stays (None: reclaimable)


@dataclass
class StagingReport:
    """The staging folder's figures, and what the janitor reclaimed (or, in a dry run, would reclaim)."""

    count: int = 0
    bytes: int = 0
    oldest: str | None = None  # ISO time of the oldest folder's newest change
    ttl: float = 0.0
    reclaimable: list[str] = field(default_factory=list)
    reclaimable_bytes: int = 0
    reclaimed: list[str] = field(default_factory=list)
    reclaimed_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _measure(path: Path) -> tuple[int, int, float]:
    """(files, bytes, newest mtime) of a staging entry; symlinks are counted, never followed."""
    try:
        top = os.lstat(path)
    except OSError:
        return 0, 0, 0.0
    if not os.path.isdir(path) or os.path.islink(path):
        return 1, top.st_size, top.st_mtime
    files, size, newest = 0, 0, top.st_mtime
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue  # removed meanwhile
            newest = max(newest, st.st_mtime)
            if name in filenames or os.path.islink(os.path.join(dirpath, name)):
                files += 1
                size += st.st_size
    return files, size, newest


def _job(store: Any, name: str) -> InstallJob | None:
    if STAGING_NAME.fullmatch(name) is None:
        return None
    try:
        return load_job(store, name)
    except UnknownJobError:
        return None


def _leased(store: Any, job: InstallJob) -> bool:
    """Whether a live worker holds the lease of a step of the job's current attempt (install, downloads, hash)."""
    client = getattr(store, "client", None)
    if client is None:
        return False
    sec, usec = client.time()
    now_ms = int(sec) * 1000 + int(usec) // 1000
    pattern = store.keys.lease(job.run_id).translate(_GLOB_SPECIAL) + "*"
    for key in client.scan_iter(match=pattern, count=1000):
        holder, expires = client.hmget(key, "holder", "expires")
        if holder and int(expires or 0) > now_ms:
            return True
    return False


def _kept_because(store: Any, job: InstallJob | None, ttl: float, now: float) -> str | None:
    if job is None:
        return None
    if not job.terminal and job.updated_at is not None and now - job.updated_at.timestamp() < ttl:
        return f"job {job.id} is {job.status.value} (it moved within the TTL)"
    if _leased(store, job):
        return f"job {job.id} is running (a worker holds its lease)"
    return None


def survey(config: AppConfig, store: Any, now: float | None = None) -> list[StagingFolder]:
    """Every entry of the staging folder, oldest first, each with why it stays (``kept``) or None."""
    now = time.time() if now is None else now
    root = staging_root(config)
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return []
    out = []
    for name in names:
        files, size, modified = _measure(root / name)
        job = _job(store, name)
        folder = StagingFolder(name, files, size, modified, job.id if job else None)
        if now - modified < config.staging_ttl:
            folder.kept = "changed within the TTL"
        else:
            folder.kept = _kept_because(store, job, config.staging_ttl, now)
        out.append(folder)
    return sorted(out, key=lambda f: f.modified)


def figures(config: AppConfig, folders: list[StagingFolder]) -> StagingReport:
    doomed = [f for f in folders if f.kept is None]
    oldest = min((f.modified for f in folders), default=None)
    return StagingReport(count=len(folders), bytes=sum(f.bytes for f in folders), ttl=config.staging_ttl,
                         oldest=datetime.fromtimestamp(oldest, UTC).isoformat() if oldest is not None else None,
                         reclaimable=[f.name for f in doomed], reclaimable_bytes=sum(f.bytes for f in doomed))


def reclaim(config: AppConfig, store: Any, dry_run: bool = False, now: float | None = None) -> StagingReport:
    """Remove (unless ``dry_run``) and record every reclaimable staging folder; the figures before."""
    now = time.time() if now is None else now
    folders = survey(config, store, now)
    report = figures(config, folders)
    if dry_run:
        return report
    for folder in folders:
        if folder.kept is None and _reclaim_one(config, store, folder, now):
            report.reclaimed.append(folder.name)
            report.reclaimed_bytes += folder.bytes
    if report.reclaimed:
        log.info("staging_reclaimed", folders=len(report.reclaimed), bytes=report.reclaimed_bytes)
    return report


def _reclaim_one(config: AppConfig, store: Any, folder: StagingFolder, now: float) -> bool:
    aggregate = folder.job or STAGING_AGGREGATE
    # one id per folder as it is: two janitors at once (workers starting together) record it once
    event_id = hashlib.sha256(f"{aggregate}\0{folder.name}\0{folder.modified!r}".encode()).hexdigest()[:32]
    event = InstallStagingReclaimed(aggregate_id=aggregate, folder=folder.name, files=folder.files, bytes=folder.bytes,
                                    modified=datetime.fromtimestamp(folder.modified, UTC), correlation_id=folder.job,
                                    event_id=event_id)
    if folder.job is None:
        store.append([event], idempotency_key=event_id)
    else:
        def decide(job: InstallJob) -> InstallStagingReclaimed | None:
            return event if _kept_because(store, job, config.staging_ttl, now) is None else None
        _, appended = transition(store, folder.job, decide)
        if not appended:
            log.info("staging_kept", folder=folder.name, reason="its job moved meanwhile")
            return False
    remove_tree(staging_root(config) / folder.name)
    return True
