"""What a later attempt of a repo install takes over from the staging folder of an earlier one.

Each download step of a multi-file install records the file it fetched whole and verified
(``InstallFileDownloaded``: path, size, sha256). A job that fails in its downloads keeps those files in
its staging folder (only the partial files go); the restart names them (``InstallRestarted.kept_files``)
and the first run of its install step downloads only the planned files that are not kept, as they
were recorded, with the size and sha256 the new plan publishes. Everything else in the folder is
removed before the downloads start: files the plan no longer names (the repo moved on), files it
does not keep (fetched again), and partial files of unplanned names. A job that failed later (its
downloads were done), or was cancelled, keeps nothing.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from modelbus.events.logs import get_logger
from modelbus.services.config import AppConfig
from modelbus.services.install.jobs import InstallJob, InstallStatus
from modelbus.services.install.placement import partial_files, remove_tree, staging_dir
from modelbus.services.install.sources import PlannedFile

log = get_logger(__name__)

_PARTIAL_SUFFIXES = (".part.json", ".part.tmp", ".part")


def keepable(job: InstallJob) -> list[str]:
    """The files a restart of ``job`` keeps: those it downloaded whole before it failed in its downloads."""
    if job.status is not InstallStatus.ERROR or job.download_path is not None:
        return []
    return sorted(job.downloaded)


def clean_after_failure(config: AppConfig, job: InstallJob) -> None:
    """Empty a failed or cancelled job's staging folder, except the whole files a restart may keep."""
    folder = staging_dir(config, job.id)
    if job.status is InstallStatus.CANCELLED or job.download_path is not None or not job.downloaded:
        remove_tree(folder)
        return
    for partial in partial_files(folder):
        partial.unlink(missing_ok=True)
    log.info("install_files_kept", job=job.id, files=len(job.downloaded))


def take_over(config: AppConfig, job: InstallJob, folder: str, files: list[PlannedFile], tidy: bool = True) -> set[str]:
    """The planned files (by name) this attempt need not download, after the staging folder was cleared
    of everything else it will not use (see the module's docstring). ``tidy=False`` (a retry of the
    attempt's first step, whose downloads may be writing) only names them and removes nothing."""
    root = staging_dir(config, job.id) / folder
    planned = {f.name: f for f in files if f.name}
    kept: set[str] = set()
    if not root.is_dir():
        return kept
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        rel = path.relative_to(root).as_posix()
        name = _unpartial(rel)
        if name != rel:  # a partial file: a planned one resumes from it
            if name not in planned and tidy:
                path.unlink(missing_ok=True)
            continue
        if _still_good(path, planned.get(rel), job.downloaded.get(rel)):
            kept.add(rel)
        elif tidy:
            path.unlink(missing_ok=True)
    log.info("install_staging_taken_over", job=job.id, attempt=job.attempt, kept=len(kept),
             to_fetch=len(planned) - len(kept))
    return kept


def _still_good(path: Path, planned: PlannedFile | None, recorded: tuple[int, str | None] | None) -> bool:
    """Whether the staged ``path`` is the planned file as its download recorded it (size, sha256)."""
    if planned is None or recorded is None or path.is_symlink():
        return False
    size, sha256 = recorded
    if path.stat().st_size != size or (planned.size is not None and planned.size != size):
        return False
    return planned.sha256 is None or (sha256 is not None and sha256.lower() == planned.sha256.lower())


def _unpartial(rel: str) -> str:
    name = PurePosixPath(rel).name
    for suffix in _PARTIAL_SUFFIXES:
        if name.endswith(suffix):
            return rel[: -len(suffix)]
    return rel
