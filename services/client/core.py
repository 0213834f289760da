"""ModelBusClient: the one implementation of every user-facing operation.

It talks to Redis directly (the event store, RQ queues, worker heartbeats) and reads records from a
projection it keeps up to date. The HTTP API and the CLI are thin layers over it, and
``AsyncModelBusClient`` wraps it for asyncio, so each operation is written exactly once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import redis

from modelbus.events.errors import StoreUnavailableError
from modelbus.events.keys import QUEUES
from modelbus.events.logs import get_logger
from modelbus.events.store import QuarantineEntry, RedisEventStore, StoredEvent
from modelbus.services.client import defaults
from modelbus.services.client.errors import UnavailableError
from modelbus.services.client.modeldata import ModelDataCalls
from modelbus.services.client.subscription import Delivered, Subscription, read_history
from modelbus.services.config import AppConfig
from modelbus.services.records import ModelConfigBase, ModelRecordServiceBase
from modelbus.services.records.projection import Listing

if TYPE_CHECKING:  # (the job and worker views: imported where used, not by a CLI ``list``)
    from modelbus.events.jobs import InstallJobView, LoadOutcome, ScanOutcome, SyncOutcome, UnloadOutcome
    from modelbus.events.workers import WorkerInfo
    from modelbus.services.client.gpu import GpuLoads
    from modelbus.services.client.installs import Installs

log = get_logger(__name__)


class ModelBusClient(ModelDataCalls):
    """Publish commands and read state. Thread-safe; open it once and share it."""

    def __init__(self, config: AppConfig | None = None, *, store: RedisEventStore | None = None,
                 retry_deadline: float | None = None) -> None:
        """``retry_deadline``: how long a call retries a Redis that went away before failing with
        UnavailableError (the event store's default is long; a server wants to answer 503 quickly)."""
        self.config = config if config is not None else AppConfig.load()
        self._store = store
        self._retry_deadline = retry_deadline
        self._records: ModelRecordServiceBase | None = None
        self._lock = threading.RLock()
        self._installs: Installs | None = None

    # --- plumbing -------------------------------------------------------------------------------

    @property
    def store(self) -> RedisEventStore:
        """The event store, opened on first use (so that building a client never blocks on Redis)."""
        with self._lock:
            if self._store is None:
                try:
                    self._store = RedisEventStore.from_config(self.config)
                except (StoreUnavailableError, redis.RedisError) as exc:
                    raise UnavailableError(str(exc)) from exc
                if self._retry_deadline is not None:
                    self._store.retry_deadline = self._retry_deadline
            return self._store

    @property
    def records(self) -> ModelRecordServiceBase:
        with self._lock:
            if self._records is None:
                self._records = ModelRecordServiceBase.open(self.config, event_store=self.store)
            return self._records

    @property
    def redis(self) -> redis.Redis:
        return self.store.client

    @property
    def installs(self) -> Installs:
        """Install commands and jobs (services.client.installs), imported and built on first use: reading
        records never pays for the install service's imports (a CLI ``list`` starts at once)."""
        from modelbus.services.client.installs import Installs  # (torch comes with the install service)
        records = self.records
        with self._lock:
            if self._installs is None:
                self._installs = Installs(self.config, self.store, records)
            return self._installs

    @property
    def gpu(self) -> GpuLoads:
        """Loads and unloads on the GPU workers (services.client.gpu)."""
        from modelbus.services.client.gpu import GpuLoads  # (RQ and routing: only for GPU work)
        return GpuLoads(self.redis, self.config.namespace)

    def close(self) -> None:
        with self._lock:
            if self._records is not None:
                self._records.close()
                self._records = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _locked(self, call: Callable[[ModelRecordServiceBase], Any]) -> Any:
        # one projection connection for the whole client: its reads and catch-ups take turns
        records = self.records
        with self._lock:
            return call(records)

    # --- records ----------------------------------------------------------------------------------

    def list_models(self, name: str | None = None, base: str | None = None, type: str | None = None,
                    tag: str | Iterable[str] | None = None, *, order_by: str = "name",
                    direction: str = "asc", format: str | None = None,
                    quantization: str | None = None) -> list[ModelConfigBase]:
        """Models matching every filter given (all models when none is), ordered by ``order_by`` (name,
        type, base, format, size, added, modified) in ``direction`` (asc, desc). ``format`` (gguf,
        checkpoint...) and ``quantization`` (Q4_K, nf4, fp8_scaled; case-insensitive) filter on those record fields."""
        tags = [tag] if isinstance(tag, str) else list(tag or [])
        found = self._locked(lambda r: r.search_by_name(name, base, type, order_by=order_by, direction=direction))
        if tags:
            found = [m for m in found if set(tags) <= set(m.tags or [])]
        return _storage_filtered(found, format, quantization)

    def list_models_page(self, name: str | None = None, base: str | None = None, type: str | None = None,
                         tag: str | Iterable[str] | None = None, *, offset: int = 0, limit: int = 100,
                         order_by: str = "name", direction: str = "asc", format: str | None = None,
                         contains: str | None = None,
                         quantization: str | None = None) -> tuple[int, list[ModelConfigBase]]:
        """One page of :meth:`list_models`, in the same order, and the number of matches (``format``: of
        that model format; ``contains``: a name holding it, any case; ``quantization``: as list_models)."""
        tags = [tag] if isinstance(tag, str) else list(tag or [])
        if quantization is not None:  # filtered here, then cut: same order as the store's
            found = self.list_models(name, base, type, tags, order_by=order_by, direction=direction, format=format,
                                     quantization=quantization)
            if contains:
                found = [m for m in found if contains.lower() in m.name.lower()]
            return len(found), found[offset:offset + limit]
        return self._locked(  # type: ignore[no-any-return]
            lambda r: r.search_page(name, base, type, tags, offset=offset, limit=limit, order_by=order_by,
                                    direction=direction, model_format=format, name_contains=contains))

    def listing(self, keys: Iterable[str]) -> dict[str, Listing]:
        """Each recorded key's size (the bytes of its install's manifest) and when the log recorded its
        add and its last change (Unix ms): what ``order_by`` size, added and modified sort by."""
        wanted = list(keys)
        return self._locked(lambda r: r.listing(wanted))  # type: ignore[no-any-return]

    def get_model(self, key: str) -> ModelConfigBase:
        return self._locked(lambda r: r.get_model(key))  # type: ignore[no-any-return]

    def add_model(self, key: str, config: ModelConfigBase | Mapping[str, Any]) -> ModelConfigBase:
        """Register a model whose files are already in place (installs go through :meth:`install`)."""
        return self._locked(lambda r: r.add_model(key, config))  # type: ignore[no-any-return]

    def update_model(self, key: str, changes: ModelConfigBase | Mapping[str, Any]) -> ModelConfigBase:
        """Change fields of a record; a new ``path`` is checked and hashed again (see ModelInstallService)."""
        if not isinstance(changes, Mapping) or "path" in changes:
            return self._locked(lambda r: self.installs.update_path(key, changes))  # type: ignore[no-any-return]
        return self._locked(lambda r: r.update_model(key, changes))  # type: ignore[no-any-return]

    def rename_model(self, key: str, new_name: str) -> ModelConfigBase:
        return self._locked(lambda r: r.rename_model(key, new_name))  # type: ignore[no-any-return]

    def delete_model(self, key: str, delete_files: bool = False) -> ModelConfigBase:
        """Remove the record; with ``delete_files`` also the files recorded at its install (see
        services.install.ownership: never another model's). Returns the record as it was."""
        model = self.get_model(key)
        if delete_files:
            self._locked(lambda r: self.installs.delete(key))
        else:
            self._locked(lambda r: r.del_model(key))
        from modelbus.services.install.manifest import recorded_manifest  # (only deletes need these)
        from modelbus.services.store.release import release_model_blobs
        self._locked(lambda r: release_model_blobs(self.config, r, key, lambda k: recorded_manifest(r.history(k))))
        if model.cover is not None:
            self._covers().drop(key, model.cover.blake3)
        return model

    def history(self, key: str) -> list[StoredEvent]:
        return self._locked(lambda r: r.history(key))  # type: ignore[no-any-return]

    def rebuild_records(self) -> Any:
        from modelbus.services.records.rebuild import rebuild
        return self._locked(lambda r: rebuild(service=r))

    def import_yaml(self, path: str | Path) -> Any:
        from modelbus.services.records.legacy import import_legacy_yaml
        return self._locked(lambda r: import_legacy_yaml(Path(path), r))

    # --- installs, loads ----------------------------------------------------------------------------

    def install(self, source: str, *, hand_over: bool = True, **options: Any) -> InstallJobView:
        """Publish an install command and return the job at once (``wait()`` follows it).

        A local file outside the import roots is handed over by this process (linked or copied into the
        import area with the caller's permissions); ``hand_over=False`` (the HTTP API) refuses it instead."""
        return self.installs.install(source, hand_over=hand_over, **options)

    def job(self, job_id: str) -> InstallJobView:
        return self.installs.job(job_id)

    def jobs(self) -> list[InstallJobView]:
        return self.installs.jobs()

    def cancel(self, job_id: str) -> InstallJobView:
        return self.installs.cancel(job_id)

    def wait(self, job: str | InstallJobView | Mapping[str, Any], timeout: float | None = None) -> InstallJobView:
        """Block until the install job ends (completed, failed or cancelled); returns its final state."""
        return self.installs.wait(job, timeout)

    def scan(self, path: str | Path, *, on_worker: bool = False, timeout: float | None = None,
             import_roots_only: bool = False) -> ScanOutcome:
        """Register every model found under ``path`` where it is; ``{"added": [keys]}``.

        In this process the caller's own permissions read the files (``import_roots_only``: only inside
        the import roots). With ``on_worker`` a worker of the hash queue does it (the API's way: it never
        reads model files itself), within ``timeout`` seconds, and the folder must lie inside the roots."""
        if on_worker:
            from modelbus.events.jobs import ScanOutcome
            from modelbus.services.client import on_worker as on_worker_  # (the install service's settings)
            return ScanOutcome.model_validate(on_worker_.run_on_worker(
                self.redis, self.store.keys, on_worker_.SCAN_FUNCTION, (str(path),), timeout))
        return self.installs.scan(Path(path), import_roots_only)

    def sync(self, *, on_worker: bool = False, timeout: float | None = None) -> SyncOutcome:
        """Register unrecorded models in the models dir; report records whose files are gone (``on_worker``:
        as for :meth:`scan`)."""
        if on_worker:
            from modelbus.events.jobs import SyncOutcome
            from modelbus.services.client import on_worker as on_worker_
            return SyncOutcome.model_validate(on_worker_.run_on_worker(
                self.redis, self.store.keys, on_worker_.SYNC_FUNCTION, (), timeout))
        return self.installs.sync()

    def load(self, key: str, submodel: str | None = None, worker: str | None = None,
             wait: bool = True, timeout: float | None = None) -> LoadOutcome:
        """Load a model on a GPU worker (the one already holding it, unless ``worker`` is given); with
        ``wait``, return after the worker's ``model_load_completed`` with what it reported."""
        record = self.get_model(key)  # an unknown key fails here, not on a worker
        return self.gpu.load(key, submodel, worker, wait, timeout, model_format=record.model_format)

    def unload(self, key: str, worker: str | None = None) -> UnloadOutcome:
        return self.gpu.unload(key, worker)

    # --- events -------------------------------------------------------------------------------------

    def subscribe(self, types: Iterable[str] | None = None, since: str = "$", *,
                  stop: Callable[[], bool] | None = None, block_ms: int | None = None,
                  reconnect_timeout: float | None = None) -> Iterator[Delivered]:
        """New events of both streams, in order; resumes from its last delivery after Redis drops.

        ``since="$"`` means events after this call (not after the first ``next()``)."""
        kwargs: dict[str, Any] = {"types": types, "since": since, "stop": stop,
                                  "reconnect_timeout": reconnect_timeout}
        if block_ms is not None:
            kwargs["block_ms"] = block_ms
        return iter(Subscription(self.store, **kwargs).start())

    def events(self, types: Iterable[str] | None = None, since: str = "0", limit: int = 1000) -> list[Delivered]:
        """Past events after ``since``, oldest first, without waiting for new ones."""
        return read_history(self.store, types=types, since=since, limit=limit)

    def quarantined(self) -> list[QuarantineEntry]:
        """Entries of the log that every reader refused and skipped (events.validation), in the order
        they were refused."""
        out: list[QuarantineEntry] = []
        while batch := self._redis_call(partial(self.store.quarantined, out[-1].id if out else "0-0")):
            out += batch
        return out

    def quarantine_count(self) -> int:
        return self._redis_call(self.store.quarantine_count)  # type: ignore[no-any-return]

    # --- workers, queues, health --------------------------------------------------------------------

    def workers(self, include_dead: bool = False) -> list[WorkerInfo]:
        """Workers with their queues, device and cache contents, from their heartbeats (``model_dump()``: JSON)."""
        from modelbus.events.workers import list_workers
        found = self._redis_call(lambda: list_workers(self.redis, self.store.keys, time.time(),
                                                      defaults.WORKER_ALIVE_SECONDS))
        return [w for w in found if w.alive or include_dead]

    def queue_lengths(self) -> dict[str, int]:
        from rq import Queue
        keys = self.store.keys

        def count(name: str) -> int:
            return int(Queue(keys.queue(name), connection=self.redis).count)
        return {name: self._redis_call(partial(count, name)) for name in QUEUES}

    def ping(self) -> float:
        """Round-trip time to Redis in seconds; raises UnavailableError when it does not answer."""
        started = time.perf_counter()
        self._redis_call(self.redis.ping)
        return time.perf_counter() - started

    def _redis_call(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError, StoreUnavailableError) as exc:
            raise UnavailableError(f"Redis unreachable: {exc}") from exc

    # --- finding models, job control, health (services.client.lookup, services.client.lifecycle) ----------

    def find_model(self, ref: str) -> ModelConfigBase:
        """The model ``ref`` names: its key, a unique key prefix, or a unique name (several: AmbiguousModelError)."""
        from modelbus.services.client.lookup import find
        return find(self._locked(lambda r: r.all_models()), ref)

    def models_by_hash(self, hash: str) -> list[ModelConfigBase]:
        """Every model with this content hash (``blake3:<hex>``; forced copies share one)."""
        from modelbus.services.client.lookup import by_hash
        return by_hash(self._locked(lambda r: r.all_models()), hash)

    def pause(self, job_id: str) -> InstallJobView:
        """Pause a waiting or downloading install job: its downloads stop and keep their partial files."""
        return self.installs.pause(job_id)

    def resume(self, job_id: str) -> InstallJobView:
        """Resume a paused install job: its downloads continue where they stopped (HTTP ranges)."""
        return self.installs.resume(job_id)

    def restart(self, job_id: str, *, from_scratch: bool = False) -> InstallJobView:
        """Run a failed or cancelled install job again. The files a failed repo install downloaded whole and
        verified are kept (``kept_files``): only the failed and missing ones are fetched; ``from_scratch``
        fetches every file again."""
        return self.installs.restart(job_id, from_scratch=from_scratch)

    def verify(self, keys: Iterable[str] = (), *, repair: bool = False,
               on_progress: Callable[[int, int, dict[str, Any]], None] | None = None,
               timeout: float | None = None) -> dict[str, Any]:
        """Re-hash installed files against the recorded ones on the hash workers (all models, or those
        ``keys`` name: keys, prefixes, names); ``repair`` downloads broken models again from their source.
        ``{"models": [per-model report], "summary": counts, "healthy": bool}``."""
        from modelbus.services.client import lifecycle
        return lifecycle.verify(self, list(keys), repair=repair, on_progress=on_progress, timeout=timeout)

    def prune(self, *, dry_run: bool = False, timeout: float | None = None) -> dict[str, Any]:
        """Delete the files in the models directory that no record owns, and empty folders (on a hash worker;
        refused while a record's files are missing). ``{"files", "folders", "bytes", "dry_run"}``."""
        from modelbus.services.client import lifecycle
        return lifecycle.prune(self, dry_run=dry_run, timeout=timeout)

    def ls_remote(self, source: str, revision: str | None = None, access_token: str | None = None) -> dict[str, Any]:
        """The files (with sizes, and which an install picks) of a Hugging Face repo ``owner/repo[:subfolder]``,
        or the versions and files of a Civitai model ``civitai:MODEL[@VERSION]``."""
        from modelbus.services.client import lifecycle
        return lifecycle.ls_remote(self, source, revision, access_token)

    def plan_install(self, source: str, *, hand_over: bool = True, **options: Any) -> dict[str, Any]:
        """What ``install(source, **options)`` would download (files, sizes) and where; nothing is queued."""
        from modelbus.services.client import lifecycle
        return lifecycle.plan_install(self, source, hand_over=hand_over, **options)


def _storage_filtered(found: list[Any], fmt: str | None, quantization: str | None) -> list[Any]:
    """Records of format ``fmt`` and quantization ``quantization`` (case-insensitive), where given."""
    if fmt is not None:
        want = str(getattr(fmt, "value", fmt))
        found = [m for m in found if m.model_format.value == want]
    if quantization is not None:
        found = [m for m in found if (m.quantization or "").lower() == quantization.lower()]
    return found
