"""The client's bridge to the install service and the GPU routing: it holds them, turns their results
into plain dicts (what the API and the CLI print), and translates their errors into the client's."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from rq.job import Job

from events.errors import StoreUnavailableError
from services import routing
from services.client.errors import CLIENT_ERRORS, InvalidRequestError, UnavailableError
from services.install import InstallError, InstallJob, InstallStatus, ModelInstallService
from services.install.commands import InstallCommand, submit, submit_handing_over

if TYPE_CHECKING:
    from services.client.core import ModelBusClient

T = TypeVar("T")
UNLOAD_TIMEOUT = 60.0
SECRET_OPTIONS = frozenset({"access_token", "claim"})  # never shown back to a caller


def job_id_of(job: str | InstallJob | Mapping[str, Any]) -> str:
    if isinstance(job, str):
        return job
    if isinstance(job, InstallJob):
        return job.id
    found = job.get("id")
    if not found:
        raise InvalidRequestError(f"not an install job: {dict(job)!r}")
    return str(found)


def job_dict(job: InstallJob) -> dict[str, Any]:
    """An install job as JSON-ready data; ``state`` is the status (the spec's name for it)."""
    return {"id": job.id, "source": job.source, "state": job.status.value, "bytes": job.bytes,
            "total_bytes": job.total_bytes, "key": job.key, "config": job.config,
            "error_type": job.error_type, "error": job.error,
            "options": {k: v for k, v in job.options.items() if k not in SECRET_OPTIONS},
            "created_at": job.created_at.isoformat() if job.created_at else None,
            "updated_at": job.updated_at.isoformat() if job.updated_at else None}


@contextmanager
def _translated() -> Iterator[None]:
    """Install and routing errors, as the client's of the same kind (conflicts pass as they are)."""
    try:
        yield
    except (InstallError, routing.RoutingError, StoreUnavailableError) as exc:
        translated = CLIENT_ERRORS.get(exc.kind)
        if translated is None:
            raise
        raise translated(str(exc)) from exc


class Features:
    def __init__(self, client: ModelBusClient) -> None:
        self.client = client
        self._install: ModelInstallService | None = None
        self._lock = threading.Lock()

    @property
    def installer(self) -> ModelInstallService:
        with self._lock:
            if self._install is None:
                self._install = ModelInstallService(self.client.config, store=self.client.records,
                                                    event_store=self.client.store)
            return self._install

    def _call(self, fn: Callable[[], T]) -> T:
        with _translated():
            return fn()

    # --- installs -----------------------------------------------------------------------------

    def install(self, source: str, *, hand_over: bool = True, **options: Any) -> dict[str, Any]:
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
        installer = self.installer
        command = InstallCommand(source, opts, command_id, token)
        publish = submit_handing_over if hand_over else submit
        job_id = self._call(lambda: publish(installer.event_store, self.client.config, command))
        if job_id != command_id:  # a repeated command, or a source already being installed: that job
            return self.job(job_id)
        # a new job is waiting: say so without reading it back (publishing stays one append + one enqueue)
        return {"id": job_id, "source": source, "state": InstallStatus.WAITING.value, "bytes": 0, "total_bytes": 0,
                "key": None, "config": None, "error_type": None, "error": None,
                "options": {k: v for k, v in opts.items() if k not in SECRET_OPTIONS},
                "created_at": None, "updated_at": None}

    def job(self, job_id: str) -> dict[str, Any]:
        return job_dict(self._call(lambda: self.installer.get_job_by_id(job_id)))

    def jobs(self) -> list[dict[str, Any]]:
        return [job_dict(j) for j in self._call(self.installer.list_jobs)]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return job_dict(self._call(lambda: self.installer.cancel_job(job_id)))

    def wait(self, job: str | InstallJob | Mapping[str, Any], timeout: float | None) -> dict[str, Any]:
        job_id = job_id_of(job)
        return job_dict(self._call(lambda: self.installer.wait_for_job(job_id, timeout)))

    def delete(self, key: str) -> None:
        """The record and the files it owns (services.install.ownership)."""
        self._call(lambda: self.installer.delete(key))

    def update_path(self, key: str, changes: Any) -> Any:
        return self._call(lambda: self.installer.update_model(key, changes))

    def scan(self, path: Path) -> dict[str, Any]:
        return {"added": self._call(lambda: self.installer.scan_directory(path))}

    def sync(self) -> dict[str, Any]:
        return dataclasses.asdict(self._call(self.installer.sync_models_dir))

    # --- loads --------------------------------------------------------------------------------

    def _gpu_workers(self) -> list[dict[str, Any]]:
        return [s for s in routing.worker_states(self.client.redis, self.client.config.namespace)
                if "gpu" in s.get("queues", [])]

    def _enqueue(self, func: str, args: tuple[Any, ...], worker: str | None) -> Job:
        """Enqueue a GPU job on a worker's own queue (None: the shared ``gpu`` queue).

        The choice of worker is routing's."""
        return routing.enqueue_on(self.client.redis, self.client.config.namespace, func, args, worker)

    def load(self, key: str, submodel: str | None, worker: str | None, wait: bool,
             timeout: float | None) -> dict[str, Any]:
        gpu = self._gpu_workers()
        if wait and not gpu:
            # waiting on a queue nobody reads would only time out: say why now
            raise UnavailableError("no GPU worker is running (start one: modelbus worker --queues gpu)")
        with _translated():
            if not wait:
                target = routing.choose_gpu_worker(gpu, key, worker)
                job = self._enqueue(routing.LOAD_JOB, (key, submodel), target)
                return {"key": key, "state": "queued", "job_id": job.id, "submodel": submodel}
            job, result = routing.run_gpu_job(
                self.client.redis, self.client.config.namespace, routing.LOAD_JOB, (key, submodel),
                model_key=key, worker=worker,
                timeout=timeout if timeout is not None else routing.GPU_JOB_TIMEOUT)
        return {"key": key, "state": "loaded", "job_id": job.id, **result}

    def unload(self, key: str, worker: str | None) -> dict[str, Any]:
        with _translated():
            gpu = self._gpu_workers()
            targets = [routing.choose_gpu_worker(gpu, key, worker)] if worker else [w["id"] for w in gpu]
            jobs = [self._enqueue(routing.UNLOAD_JOB, (key,), t) for t in targets]
            results = [routing.wait_result(j, UNLOAD_TIMEOUT) for j in jobs]
        dropped = [r for r in results if r.get("dropped")]
        return {"key": key, "state": "unloaded" if dropped else "not_loaded",
                "workers": [r.get("worker") for r in dropped]}
