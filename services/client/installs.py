"""The client's side of the install service: it publishes install commands and reads jobs, turning jobs into
:class:`~modelbus.events.jobs.InstallJobView` (what the API and the CLI print) and the service's errors into
the client's (by kind).

Built from what it needs (the configuration, the event store and the record service), not from the client.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from modelbus.events.jobs import FileProgress, InstallJobView, ScanOutcome, SyncOutcome
from modelbus.events.store import RedisEventStore
from modelbus.services.client.errors import InvalidRequestError, translated
from modelbus.services.config import AppConfig
from modelbus.services.install.jobs import InstallJob, InstallStatus, live_job, live_jobs
from modelbus.services.install.progress import ProgressBoard
from modelbus.services.install.roots import check_local_source
from modelbus.services.records import ModelRecordServiceBase

if TYPE_CHECKING:
    from modelbus.services.install import ModelInstallService

T = TypeVar("T")
SECRET_OPTIONS = frozenset({"access_token", "claim"})  # never shown back to a caller


def job_id_of(job: str | InstallJob | InstallJobView | Mapping[str, Any]) -> str:
    if isinstance(job, str):
        return job
    if isinstance(job, InstallJob | InstallJobView):
        return job.id
    found = job.get("id")
    if not found:
        raise InvalidRequestError(f"not an install job: {dict(job)!r}")
    return str(found)


def _shown(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in SECRET_OPTIONS}


def job_view(job: InstallJob) -> InstallJobView:
    """What a caller sees of an install job (secrets left out)."""
    return InstallJobView(
        id=job.id, source=job.source, state=job.status.value, bytes=job.bytes, total_bytes=job.total_bytes,
        key=job.key, config=job.config, error_type=job.error_type, error=job.error, options=_shown(job.options),
        files=tuple(FileProgress(path=name, bytes=done, total_bytes=total) for name, done, total in job.files),
        created_at=job.created_at.isoformat() if job.created_at else None,
        updated_at=job.updated_at.isoformat() if job.updated_at else None,
        already_installed=job.already_installed, attempt=job.attempt,
        downloaded_files=tuple(sorted(job.downloaded)), kept_files=tuple(job.kept_files))


class Installs:
    def __init__(self, config: AppConfig, event_store: RedisEventStore, records: ModelRecordServiceBase) -> None:
        self.config = config
        self.event_store, self.records = event_store, records
        self.board = ProgressBoard(event_store.client, event_store.keys)
        self._installer: ModelInstallService | None = None

    @property
    def installer(self) -> ModelInstallService:
        """The install service, imported and built on first use: reading jobs needs only the job fold and the
        progress board, not the download, probe and cover stacks (``modelbus jobs`` starts at once)."""
        if self._installer is None:
            from modelbus.services.install import ModelInstallService
            self._installer = ModelInstallService(self.config, store=self.records, event_store=self.event_store)
        return self._installer

    def _call(self, fn: Callable[[], T]) -> T:
        with translated():
            return fn()

    def install(self, source: str, *, hand_over: bool = True, **options: Any) -> InstallJobView:
        if not isinstance(source, str) or not source.strip():
            raise InvalidRequestError("install needs a source: a path, a URL, a Hugging Face repo id or civitai:ID")
        config = options.pop("config", None)
        token = options.pop("access_token", None)
        command_id = options.pop("command_id", None) or uuid.uuid4().hex
        opts = {**options, "inplace": bool(options.get("inplace")), "force": bool(options.get("force")),
                "config": dict(config or {})}
        try:  # the options go into the log as JSON: refuse what cannot be stored before anything is written
            orjson.dumps(opts)
        except TypeError as exc:
            raise InvalidRequestError(f"install options must be plain JSON values: {exc}") from exc
        from modelbus.services.install.commands import InstallCommand, submit, submit_handing_over
        command = InstallCommand(source, opts, command_id, token)
        publish = submit_handing_over if hand_over else submit
        job_id = self._call(lambda: publish(self.event_store, self.config, command))
        if job_id != command_id:  # a repeated command, or a source already being installed: that job
            return self.job(job_id)
        # a new job is waiting: say so without reading it back (publishing stays one append + one enqueue)
        return InstallJobView(id=job_id, source=source, state=InstallStatus.WAITING.value, options=_shown(opts))

    def job(self, job_id: str) -> InstallJobView:
        return job_view(self._call(lambda: live_job(self.event_store, self.board, job_id)))

    def jobs(self) -> list[InstallJobView]:
        return [job_view(j) for j in self._call(lambda: live_jobs(self.event_store, self.board))]

    def cancel(self, job_id: str) -> InstallJobView:
        return job_view(self._call(lambda: self.installer.cancel_job(job_id)))

    def pause(self, job_id: str) -> InstallJobView:
        from modelbus.services.install import control
        return job_view(self._call(lambda: control.pause(self.event_store, job_id)))

    def resume(self, job_id: str) -> InstallJobView:
        from modelbus.services.install import control
        return job_view(self._call(lambda: control.resume(self.event_store, self.config, job_id)))

    def restart(self, job_id: str, *, from_scratch: bool = False) -> InstallJobView:
        from modelbus.services.install import control
        return job_view(self._call(lambda: control.restart(self.event_store, self.config, job_id,
                                                           from_scratch=from_scratch)))

    def wait(self, job: str | InstallJob | InstallJobView | Mapping[str, Any], timeout: float | None) -> InstallJobView:
        job_id = job_id_of(job)
        return job_view(self._call(lambda: self.installer.wait_for_job(job_id, timeout)))

    def delete(self, key: str) -> None:
        """The record and the files it owns (services.install.ownership)."""
        self._call(lambda: self.installer.delete(key))

    def update_path(self, key: str, changes: Any) -> Any:
        return self._call(lambda: self.installer.update_model(key, changes))

    def scan(self, path: Path, import_roots_only: bool = False) -> ScanOutcome:
        def run() -> list[str]:
            if import_roots_only:
                check_local_source(path, self.config)
            return self.installer.scan_directory(path)
        return ScanOutcome(added=tuple(self._call(run)))

    def sync(self) -> SyncOutcome:
        return SyncOutcome.model_validate(dataclasses.asdict(self._call(self.installer.sync_models_dir)))
