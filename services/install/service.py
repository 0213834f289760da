"""ModelInstallService: the spec's ModelInstallServiceBase on the event log and the RQ queues.

Asynchronous installs (``heuristic_import``/``import_model``) are commands: an ``InstallRequested``
plus an RQ job; workers on any machine sharing the models directory and the Redis do the work, and
the job is read back from the log. ``register_path`` and ``install_path`` run in this process and
return the key (a local file needs no queue), through the same final step the hash workers use.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelbus.events.logs import get_logger
from modelbus.events.schema import InstallCancelled
from modelbus.events.store import RedisEventStore
from modelbus.services.config import AppConfig
from modelbus.services.install.commands import InstallCommand, submit_handing_over
from modelbus.services.install.defaults import WAIT_BLOCK_MS
from modelbus.services.install.errors import (
    DuplicateInstallError,
    InstallTimeoutError,
    InvalidModelPathError,
    InvalidSourceError,
    ModelIdentificationError,
    ModelPathConflictError,
)
from modelbus.services.install.finalize import FinalizeRequest, finalize, record_path
from modelbus.services.install.imports import discard_hand_over
from modelbus.services.install.jobs import (
    InstallJob,
    InstallStatus,
    live_job,
    live_jobs,
    load_job,
    transition,
    unless_ended,
)
from modelbus.services.install.manifest import hash_and_manifest, recorded_manifest
from modelbus.services.install.ownership import (
    DeleteReport,
    check_path_free,
    delete_model_files,
    other_paths,
    plan_delete,
)
from modelbus.services.install.placement import copy_into, remove_tree, source_files, staging_dir
from modelbus.services.install.progress import ProgressBoard
from modelbus.services.install.recording import given_key
from modelbus.services.install.roots import check_local_source
from modelbus.services.install.scan import find_models
from modelbus.services.install.steps import set_cancel_flag
from modelbus.services.records import ModelConfigBase, ModelRecordServiceBase, UnknownModelException
from modelbus.services.store import open_store
from modelbus.services.store.publish import publish_model
from modelbus.services.store.release import claimed

log = get_logger(__name__)

JobRef = InstallJob | str
#: why a found model is skipped by a scan or a sync (reported, not raised)
SKIPPED_MODELS = (DuplicateInstallError, ModelIdentificationError, ModelPathConflictError, InvalidModelPathError)


@dataclass
class SyncReport:
    """What ``sync_models_dir`` did: models it registered, records whose files are gone."""

    added: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why it was not registered


class ModelInstallService:
    def __init__(self, config: AppConfig, store: ModelRecordServiceBase | None = None, *,
                 event_store: RedisEventStore | None = None, download_queue: Any = None) -> None:
        self.config = config
        self.event_store = event_store or RedisEventStore.from_config(config)
        self.record_store = store or ModelRecordServiceBase.open(config, event_store=self.event_store)
        self.download_queue = download_queue  # kept for the spec's signature; workers do the downloads
        self.board = ProgressBoard(self.event_store.client, self.event_store.keys)

    # --- asynchronous installs ------------------------------------------------------------------

    def heuristic_import(self, source: str | Path, config: Mapping[str, Any] | None = None,
                         access_token: str | None = None, *, inplace: bool = False, force: bool = False,
                         command_id: str | None = None, **options: Any) -> InstallJob:
        """Install from a path, a URL, ``owner/repo[:subfolder]`` or a Civitai source (guessing which).

        ``config`` holds record fields and identification overrides (name, description, model_type,
        base_model...). ``inplace`` registers a local path where it is. ``force`` installs content
        already installed under a new key. A ``command_id`` seen before returns that command's job.
        """
        given_key(config or {})  # a bad chosen key is refused now, not by a worker later
        opts = {**options, "inplace": inplace, "force": force, "config": dict(config or {})}
        # this process reads the caller's own file (a local source outside the import roots is handed over)
        job_id = submit_handing_over(self.event_store, self.config,
                                     InstallCommand(str(source), opts, command_id, access_token))
        return self.get_job_by_id(job_id)

    def import_model(self, source: Any, config: Mapping[str, Any] | None = None,
                     access_token: str | None = None, **kwargs: Any) -> InstallJob:
        """The same for a typed source (Path, URLSource, HFSource, CivitaiSource) or a string."""
        return self.heuristic_import(str(source), config, access_token, **kwargs)

    # --- synchronous, in this process -------------------------------------------------------------

    def register_path(self, path: str | Path, config: Mapping[str, Any] | None = None, *,
                      force: bool = False) -> str:
        """Record the model at ``path`` where it is; returns its key."""
        model = self._existing(path)
        record = finalize(self.config, self.record_store, FinalizeRequest(
            path=model, inplace=True, user=dict(config or {}), source=str(model), force=force,
            threads=self.config.hash_threads))
        return record.key

    def install_path(self, path: str | Path, config: Mapping[str, Any] | None = None, *,
                     force: bool = False) -> str:
        """Copy the model at ``path`` into the models directory and record it; returns its key."""
        model = self._existing(path)
        staging = staging_dir(self.config, f"local-{uuid.uuid4().hex}")
        try:
            staged = copy_into(model, staging)
            record = finalize(self.config, self.record_store, FinalizeRequest(
                path=staged, inplace=False, user=dict(config or {}), source=str(model), force=force,
                threads=self.config.hash_threads))
        finally:
            remove_tree(staging)
        return record.key

    @staticmethod
    def _existing(path: str | Path) -> Path:
        model = Path(path).expanduser()
        try:
            exists, real = model.exists(), model.resolve()
        except (OSError, ValueError) as exc:  # a name too long, a NUL byte: the OS's refusal, named
            raise InvalidSourceError(f"not a usable path: {str(model)[:300]!r}: {exc}") from exc
        if not exists:
            raise InvalidSourceError(f"no such file or folder: {model}")
        return real

    # --- jobs -------------------------------------------------------------------------------------

    def get_job_by_id(self, job_id: str) -> InstallJob:
        return live_job(self.event_store, self.board, job_id)

    def list_jobs(self) -> list[InstallJob]:
        return live_jobs(self.event_store, self.board)

    def wait_for_job(self, job: JobRef, timeout: float | None = None) -> InstallJob:
        """Block until the job ends (completed, error or cancelled); returns it."""
        job_id = job if isinstance(job, str) else job.id
        deadline = None if timeout is None else time.monotonic() + timeout
        after = self.event_store.head()
        current = self.get_job_by_id(job_id)
        while not current.terminal:
            block_ms = WAIT_BLOCK_MS
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise InstallTimeoutError(
                        f"install job {job_id} is still {current.status.value} after {timeout:g} s")
                block_ms = max(1, min(block_ms, int(remaining * 1000)))
            batch = self.event_store.wait(after, "events", block_ms)
            if batch:
                after = batch[-1].position
            if not batch or any(s.event.aggregate_id == job_id for s in batch):
                current = load_job(self.event_store, job_id)  # (an ended job has no live bytes to read)
        return current

    def wait_for_installs(self, timeout: float | None = None) -> list[InstallJob]:
        """Block until every listed job has ended; returns them all."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for job in self.list_jobs():
            if not job.terminal:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                self.wait_for_job(job, left)
        return self.list_jobs()

    def cancel_job(self, job: JobRef) -> InstallJob:
        """Cancel a job that has not ended; its running steps stop within a second and clean up."""
        job_id = job if isinstance(job, str) else job.id
        before: list[InstallStatus] = []

        def cancel(j: InstallJob) -> InstallCancelled:
            before.append(j.status)
            return InstallCancelled(aggregate_id=job_id, reason="cancelled by request", correlation_id=job_id)
        current, appended = transition(self.event_store, job_id, unless_ended(cancel))
        if appended:
            set_cancel_flag(self.event_store.client, self.event_store.keys, job_id)
            if before[-1] is InstallStatus.PAUSED:
                remove_tree(staging_dir(self.config, job_id))  # no step of it runs: its partial files go now
            if current.status is InstallStatus.CANCELLED and not current.download_path:
                discard_hand_over(self.config, current.options)  # no step has begun with it (a worker may)
            log.info("install_cancelled", job=job_id)
        return current

    def prune_jobs(self) -> int:
        """Forget ended jobs in the job list (their events stay in the log), and the files a failed one kept
        for its restart (services.install.kept); returns how many."""
        pruned = 0
        for job in self.list_jobs():
            if job.terminal:
                self.event_store.client.zrem(self.event_store.keys.jobs, job.id)
                self.board.clear(job.id)
                remove_tree(staging_dir(self.config, job.id))
                pruned += 1
        return pruned

    # --- the models directory -----------------------------------------------------------------------

    def unregister(self, key: str) -> None:
        """Remove the record; the files stay."""
        self.record_store.del_model(key)

    def delete(self, key: str) -> DeleteReport:
        """Remove the record and the files it owns (services.install.ownership says which); a delete that
        cannot tell the model's files from another's is refused before anything changes."""
        record = self.record_store.get_model(key)
        files = recorded_manifest(self.record_store.history(key))
        others = other_paths(self.config, self.record_store.all_models(), key)
        plan_delete(self.config, record, files, others)
        self.record_store.del_model(key)
        report = delete_model_files(self.config, record, files, others, self.config.hash_threads)
        log.info("model_deleted", key=key, path=record.path, removed=len(report.removed), kept=report.kept)
        return report

    def update_model(self, key: str, changes: ModelConfigBase | Mapping[str, Any]) -> ModelConfigBase:
        """Change a record's fields (a sparse dict, or a whole config); a new ``path`` must exist, lie in
        an import root and be no other model's (not inside one, not holding one), and is hashed again:
        the new hash and manifest are recorded with it."""
        current = self.record_store.get_model(key)
        value = changes.path if isinstance(changes, ModelConfigBase) else changes.get("path", current.path)
        if not isinstance(value, str) or not value.strip() or "\x00" in value:
            raise InvalidModelPathError(f"path must be a non-empty string, got {value!r}")
        target = self.config.model_path(value)
        if target == self.config.model_path(current.path):
            return self.record_store.update_model(key, changes)
        real_target = check_local_source(target, self.config)
        if not (os.path.isfile(real_target) or os.path.isdir(real_target)):  # (these swallow ENAMETOOLONG)
            raise InvalidModelPathError(f"path {value!r}: no such file or folder ({target})")
        check_path_free(self.config, self.record_store.all_models(), real_target, key)
        source_files(real_target)
        digest, files = hash_and_manifest(real_target, self.config.hash_threads)
        with claimed(self.event_store, open_store(self.config), files):  # as at install (services.store.release)
            publish_model(self.config, real_target, files)  # no record names a blob the store lacks
            moved = {"path": record_path(self.config, real_target), "hash": digest}
            new = changes.model_copy(update=moved) if isinstance(changes, ModelConfigBase) else {**changes, **moved}
            return self.record_store.update_model(key, new, files=files)

    def scan_directory(self, path: str | Path, install: bool = False) -> list[str]:
        """Register (or, with ``install``, install) every model found under ``path``; returns new keys."""
        root = self._existing(path)
        keys = []
        for model in find_models(root):
            key = self._adopt(model, install)
            if key is not None:
                keys.append(key)
        return keys

    def sync_models_dir(self) -> SyncReport:
        """Register the models in the models directory that have no record; report records whose files
        are missing (they are not removed: a disk may just not be mounted)."""
        report = SyncReport()
        models = self.config.models_path
        for record in self.record_store.all_models():
            if not self.config.model_path(record.path).exists():
                report.missing.append(record.key)
        if models.is_dir():
            for model in find_models(models):
                try:
                    key = self._adopt(model, install=False, strict=True)
                except SKIPPED_MODELS as exc:
                    report.skipped[str(model)] = str(exc)
                    continue
                if key is not None:
                    report.added.append(key)
        if report.missing:
            log.warning("models_missing", keys=report.missing)
        return report

    def _adopt(self, model: Path, install: bool, strict: bool = False) -> str | None:
        """Register one found model unless a record already has its path; errors skip it (or raise)."""
        try:
            self.record_store.search_by_path(record_path(self.config, model))
            return None
        except UnknownModelException:
            pass
        try:
            return self.install_path(model) if install else self.register_path(model)
        except SKIPPED_MODELS as exc:
            if strict:
                raise
            log.warning("scan_skipped", path=str(model), error=str(exc))
            return None
