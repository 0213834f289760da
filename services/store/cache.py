"""A host's cache of store blobs, laid out as models by hard links (like huggingface_hub's
blobs/snapshots).

    <cache>/blobs/<hex>                  each blob once, verified (BLAKE3) when it was fetched
    <cache>/models/<key>/<name>[/...]    a model's files: hard links to its blobs
    <cache>/manifests/<key>.json         which blobs each laid-out model links
    <cache>/pins/<pid>.json              the blobs of the models a live process has loaded or is fetching

Rules: a model directory appears (one rename) only when every blob it links is here and whole.
The cache stays under its size limit by evicting least recently used blobs (a blob's mtime is touched
on each use), never one that a pinned model links; evicting a blob removes the model directories
that linked it. Layout changes (linking, eviction) run under one ``flock`` of the cache; fetching
runs outside it, one fetch per blob at a time (``transfer.blob_lock``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import orjson

from modelbus.events.logs import get_logger
from modelbus.events.schema import FileEntry
from modelbus.services.store import defaults
from modelbus.services.store.blobs import BlobStore, check_digest, file_digest
from modelbus.services.store.errors import BlobCorruptError, CacheFullError, StoreConfigError
from modelbus.services.store.transfer import Progress

log = get_logger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_single_file(name: str, files: Sequence[FileEntry]) -> bool:
    """A single-file model's manifest is one entry named like the model's file."""
    return len(files) == 1 and files[0].path == name


def held_models(root: Path) -> list[str]:
    """Keys of the models laid out in the cache at ``root`` (what the heartbeat publishes)."""
    return sorted(p.stem for p in (Path(root) / "manifests").glob("*.json"))


class HostCache:
    def __init__(self, root: Path, limit: int, store: BlobStore) -> None:
        self.root = Path(root)
        self.limit = limit
        self.store = store
        self.blobs, self.models = self.root / "blobs", self.root / "models"
        self.manifests, self.pins = self.root / "manifests", self.root / "pins"
        for folder in (self.blobs, self.models, self.manifests, self.pins):
            folder.mkdir(parents=True, exist_ok=True)
        self._verified: set[str] = set()  # models this process has hashed since it started
        self._loaded: set[str] = set()  # blobs of the models this process has loaded
        self._fetching: dict[str, set[str]] = {}  # key -> blobs, while being fetched

    # --- what is here ---------------------------------------------------------------------------

    def model_path(self, key: str, name: str) -> Path:
        return self.models / key / name

    def held(self) -> list[str]:
        return held_models(self.root)

    def usage(self) -> int:
        return sum(entry.stat().st_size for entry in os.scandir(self.blobs) if not entry.name.startswith("."))

    # --- bringing a model here ------------------------------------------------------------------

    def ensure(self, key: str, name: str, files: Sequence[FileEntry], progress: Progress | None = None,
               on_fetch: Callable[[int, int], None] | None = None) -> Path:
        """The local path of model ``key`` (``name``: its file or folder name), fetched if need be.

        ``on_fetch(blobs, bytes)`` hears what is about to be fetched (not called when nothing is)."""
        self._check(key, name, files)
        with self._pinned(key, {f.blake3 for f in files}):
            missing = self._plan(key, files)
            if missing:
                if on_fetch is not None:
                    on_fetch(len(missing), sum(f.size for f in missing))
                self._fetch_all(key, files, missing, progress)
            if key not in self._verified:  # what was just fetched was hashed as it arrived
                fetched = {f.blake3 for f in missing}
                self._verify([f for f in files if f.blake3 not in fetched], progress)
            path = self._lay_out(key, name, files)
            self._verified.add(key)
            return path

    def _check(self, key: str, name: str, files: Sequence[FileEntry]) -> None:
        if not files:
            raise StoreConfigError(f"model {key} has no manifest (recorded before the model store): install it again")
        for entry in files:
            check_digest(entry.blake3)
            rel = PurePosixPath(entry.path)
            if rel.is_absolute() or any(part in ("", ".", "..") for part in rel.parts):
                raise StoreConfigError(f"model {key}: manifest entry {entry.path!r} is not a plain relative path")
        if "/" in name or name in ("", ".", ".."):
            raise StoreConfigError(f"model {key}: {name!r} is not a file or folder name")

    def _plan(self, key: str, files: Sequence[FileEntry]) -> list[FileEntry]:
        """The blobs to fetch; makes room for them first (CacheFullError when it cannot)."""
        with self._locked():
            wanted = {f.blake3: f for f in files}
            missing = [f for d, f in wanted.items() if not self._whole(d, f.size)]
            need = sum(f.size for f in missing)
            if need:
                self._make_room(need, keep=set(wanted))
            return missing

    def _whole(self, digest: str, size: int) -> bool:
        try:
            return (self.blobs / digest).stat().st_size == size
        except FileNotFoundError:
            return False

    def _fetch_all(self, key: str, files: Sequence[FileEntry], missing: list[FileEntry],
                   progress: Progress | None) -> None:
        def fetch(entry: FileEntry) -> None:
            for attempt in range(defaults.CORRUPT_REFETCHES + 1):
                try:
                    self._fetch_one(entry, progress, {f.blake3 for f in files})
                    return
                except BlobCorruptError:
                    if attempt == defaults.CORRUPT_REFETCHES:
                        raise
                    log.warning("blob_corrupt_refetch", digest=entry.blake3, model=key)

        with ThreadPoolExecutor(defaults.BLOB_THREADS, thread_name_prefix="blob-fetch") as pool:
            list(pool.map(fetch, missing))

    def _fetch_one(self, entry: FileEntry, progress: Progress | None, keep: set[str]) -> None:
        dest = self.blobs / entry.blake3
        try:
            self.store.fetch(entry.blake3, entry.size, dest, progress=progress)
        except CacheFullError:
            with self._locked():  # the disk filled under us (other files): evict what we can, once
                self._make_room(entry.size, keep=keep)
            self.store.fetch(entry.blake3, entry.size, dest, progress=progress)

    def _verify(self, files: Sequence[FileEntry], progress: Progress | None) -> None:
        """Hash the blobs that were here before this process used them: a corrupt copy is removed
        and fetched again (once); a copy that still does not hash so fails the load."""
        for entry in {f.blake3: f for f in files}.values():
            path = self.blobs / entry.blake3
            if file_digest(path) == entry.blake3:
                continue
            log.warning("cached_blob_corrupt", digest=entry.blake3)
            with self._locked():
                self._drop_blob(entry.blake3)
            self._fetch_one(entry, progress, set())
            if file_digest(path) != entry.blake3:
                with self._locked():
                    self._drop_blob(entry.blake3)
                raise BlobCorruptError(f"blob {entry.blake3} does not hash to its name (refused, removed)")

    def _lay_out(self, key: str, name: str, files: Sequence[FileEntry]) -> Path:
        with self._locked():
            target = self.model_path(key, name)
            manifest = self.manifests / f"{key}.json"
            if manifest.exists() and target.exists():
                self._touch(files)
                return target
            shutil.rmtree(self.models / key, ignore_errors=True)
            tmp = self.models / f".{key}.{uuid.uuid4().hex}"
            base = tmp if is_single_file(name, files) else tmp / name
            try:
                for entry in files:
                    link = base.joinpath(*PurePosixPath(entry.path).parts)
                    link.parent.mkdir(parents=True, exist_ok=True)
                    os.link(self.blobs / entry.blake3, link)
                os.replace(tmp, self.models / key)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise _full(exc, self.root) from exc
            _write_atomic(manifest, orjson.dumps(sorted({f.blake3 for f in files})))
            self._touch(files)
            return target

    def _touch(self, files: Sequence[FileEntry]) -> None:
        for digest in {f.blake3 for f in files}:
            os.utime(self.blobs / digest)

    # --- eviction -------------------------------------------------------------------------------

    def _make_room(self, need: int, keep: set[str]) -> None:
        """Evict least recently used, unpinned blobs until ``need`` more bytes fit (under the lock)."""
        if need > self.limit:
            raise CacheFullError(f"the host cache {self.root} holds at most {self.limit} bytes; "
                                 f"this model needs {need} more")
        protected = keep | self._pinned_blobs()
        used = self.usage()
        free = shutil.disk_usage(self.root).free
        blobs = sorted((e for e in os.scandir(self.blobs) if not e.name.startswith(".")),
                       key=lambda e: e.stat().st_mtime)
        for entry in blobs:
            if used + need <= self.limit and free > need:
                return
            if entry.name in protected:
                continue
            size = entry.stat().st_size
            self._drop_blob(entry.name)
            used -= size
            free += size
            log.info("cache_blob_evicted", digest=entry.name, size=size)
        if used + need > self.limit or free <= need:
            raise CacheFullError(f"the host cache {self.root} cannot make room for {need} bytes "
                                 f"({used} used of {self.limit}, {free} free on disk; the rest is in use)")

    def _drop_blob(self, digest: str) -> None:
        """Remove a blob and every laid-out model that links it (under the lock)."""
        for manifest in self.manifests.glob("*.json"):
            try:
                linked = orjson.loads(manifest.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                linked = []
            if digest in linked:
                manifest.unlink(missing_ok=True)
                shutil.rmtree(self.models / manifest.stem, ignore_errors=True)
        (self.blobs / digest).unlink(missing_ok=True)

    def remove_model(self, key: str) -> None:
        """Forget a deleted model's layout; its blobs go when evicted (lazily)."""
        with self._locked():
            (self.manifests / f"{key}.json").unlink(missing_ok=True)
            shutil.rmtree(self.models / key, ignore_errors=True)

    def forget_removed(self, recorded: Callable[[str], bool]) -> list[str]:
        """Lazily follow deletes: drop the layouts of cached models that are no longer ``recorded``, and
        the blobs only they linked (a blob another laid-out model links, or a live process pinned, stays).
        Returns the keys forgotten."""
        gone = [key for key in self.held() if not recorded(key)]
        if not gone:
            return []
        with self._locked():
            freed: set[str] = set()
            for key in gone:
                freed.update(self._linked(key))
                (self.manifests / f"{key}.json").unlink(missing_ok=True)
                shutil.rmtree(self.models / key, ignore_errors=True)
            still = set().union(*(self._linked(key) for key in self.held())) | self._pinned_blobs()
            for digest in freed - still:
                (self.blobs / digest).unlink(missing_ok=True)
        log.info("cache_removed_models_forgotten", models=len(gone), blobs=len(freed - still))
        return gone

    def _linked(self, key: str) -> set[str]:
        try:
            return set(orjson.loads((self.manifests / f"{key}.json").read_bytes()))
        except (OSError, orjson.JSONDecodeError):
            return set()

    # --- pins -----------------------------------------------------------------------------------

    def pin(self, keys: set[str]) -> None:
        """Say which models this process has loaded: their blobs are not evicted while it lives."""
        blobs: set[str] = set()
        for key in keys:
            try:
                blobs.update(orjson.loads((self.manifests / f"{key}.json").read_bytes()))
            except (OSError, orjson.JSONDecodeError):
                continue  # not from this cache (e.g. loaded before the store was configured)
        self._loaded = blobs
        self._write_pins()

    @contextmanager
    def _pinned(self, key: str, blobs: set[str]) -> Iterator[None]:
        self._fetching[key] = blobs
        self._write_pins()
        try:
            yield
        finally:
            self._fetching.pop(key, None)
            self._write_pins()

    def _write_pins(self) -> None:
        blobs = self._loaded.union(*self._fetching.values())
        _write_atomic(self.pins / f"{os.getpid()}.json", orjson.dumps(sorted(blobs)))

    def _pinned_blobs(self) -> set[str]:
        """The blobs every live process on this host has pinned (pins of dead processes are dropped)."""
        blobs: set[str] = set()
        for pin in self.pins.glob("*.json"):
            if not pin.stem.isdigit() or not _alive(int(pin.stem)):
                pin.unlink(missing_ok=True)
                continue
            try:
                blobs.update(orjson.loads(pin.read_bytes()))
            except (OSError, orjson.JSONDecodeError):
                continue
        return blobs

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _full(exc: OSError, root: Path) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CacheFullError(f"no space left in the host cache {root}")
    return exc
