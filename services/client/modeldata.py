"""The client's per-model data calls: settings and trigger phrases, links, covers (mixed into
ModelBusClient; AsyncModelBusClient wraps the names in :data:`MODELDATA_METHODS`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import redis

from modelbus.services.convert import check_convertible
from modelbus.services.covers import MAX_COVER_BYTES, CoverTooLarge, NotAnImage
from modelbus.services.records import ModelConfigBase
from modelbus.services.records.extras import Cover

if TYPE_CHECKING:
    from modelbus.events.jobs import InstallJobView
    from modelbus.events.store import RedisEventStore
    from modelbus.services.config import AppConfig
    from modelbus.services.covers.storage import CoverStore

MODELDATA_METHODS = ("set_settings", "link", "unlink", "links", "set_cover", "get_cover", "delete_cover", "starters",
                     "install_starters", "convert")
CONVERT_FUNCTION = "modelbus.workers.convert.run_convert"
CONVERT_TIMEOUT = 3600.0  # s a caller waits for a conversion by default (a full SDXL file takes minutes)


def read_image_file(path: str | Path) -> bytes:
    """The bytes of a local image, refused by size before it is read."""
    path = Path(path).expanduser()
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise NotAnImage(f"{path} is not a file")
        if size > MAX_COVER_BYTES:
            raise CoverTooLarge(f"{path} is {size} bytes, over the cover limit of {MAX_COVER_BYTES} bytes")
        with path.open("rb") as f:
            return f.read(MAX_COVER_BYTES + 1)
    except OSError as exc:
        raise NotAnImage(f"cannot read {path}: {exc.strerror or exc}") from None


class _Client(Protocol):
    """What the mixin needs of ModelBusClient (its self type: no import of the client)."""

    config: AppConfig

    @property
    def store(self) -> RedisEventStore: ...
    @property
    def redis(self) -> redis.Redis: ...
    def _locked(self, call: Callable[[Any], Any]) -> Any: ...
    def get_model(self, key: str) -> ModelConfigBase: ...
    def _covers(self) -> CoverStore: ...
    def list_models(self) -> list[ModelConfigBase]: ...
    def install(self, source: str, *, hand_over: bool = True, **options: Any) -> InstallJobView: ...
    def starters(self) -> dict[str, Any]: ...


class ModelDataCalls:
    def set_settings(self: _Client, key: str, settings: Mapping[str, Any] | None = None,
                     trigger_phrases: Sequence[str] | None = None, *, replace: bool = False) -> ModelConfigBase:
        """Change a main model's default settings (sparse; None clears a field; ``replace``: the whole
        set) and/or a model's trigger phrases (the whole list)."""
        return self._locked(  # type: ignore[no-any-return]
            lambda r: r.set_settings(key, settings, trigger_phrases, replace=replace))

    def link(self: _Client, key: str, target: str, relation: str | None = None) -> ModelConfigBase:
        """Relate ``key`` to the existing model ``target`` (relation ``for`` or ``uses``; by default what
        the model's type implies)."""
        return self._locked(lambda r: r.link(key, target, relation))  # type: ignore[no-any-return]

    def unlink(self: _Client, key: str, target: str) -> ModelConfigBase:
        return self._locked(lambda r: r.unlink(key, target))  # type: ignore[no-any-return]

    def links(self: _Client, key: str) -> dict[str, list[dict[str, str]]]:
        """Both sides: the models ``key`` links to, and those linking to it."""
        model = self.get_model(key)
        linked_from = self._locked(lambda r: r.linked_from(key))
        return {"links": [link.model_dump() for link in model.links],
                "linked_from": [{"key": k, "relation": rel} for k, rel in linked_from]}

    def _covers(self: _Client) -> CoverStore:
        from modelbus.services.covers.storage import CoverStore
        return CoverStore(self.redis, self.store.keys, self.config.root)

    def set_cover(self: _Client, key: str, image: bytes | str | Path, *,
                  source: str | None = None) -> ModelConfigBase:
        """Make a PNG, JPEG or WebP image (bytes, or a local file) the model's cover, as a WebP thumbnail."""
        from modelbus.services.covers.images import make_thumbnail  # (Pillow, on first use)
        if not isinstance(image, bytes):
            source = source or str(image)
            image = read_image_file(image)
        current = self.get_model(key)  # an unknown key fails before any work
        thumb = make_thumbnail(image, f"the cover for {key}")
        covers = self._covers()
        digest = covers.put(key, thumb.webp)
        cover = Cover(blake3=digest, width=thumb.width, height=thumb.height, bytes=len(thumb.webp),
                      source=(source or "upload")[:2048])
        try:
            updated, replaced = self._locked(lambda r: r.replace_cover(key, cover))
        except BaseException:
            if current.cover is None or current.cover.blake3 != digest:
                covers.drop(key, digest)
            raise
        if replaced is not None and replaced.blake3 != digest:
            covers.drop(key, replaced.blake3)  # the bytes of the cover this write replaced (no one else's)
        return updated  # type: ignore[no-any-return]

    def get_cover(self: _Client, key: str) -> bytes:
        """The cover's WebP bytes; NotFound when the model has none."""
        from modelbus.services.covers.storage import CoverMissing
        model = self.get_model(key)
        if model.cover is None:
            raise CoverMissing(f"model {key} has no cover")
        return self._covers().read(key, model.cover.blake3)

    def delete_cover(self: _Client, key: str) -> ModelConfigBase:
        from modelbus.services.covers.storage import CoverMissing
        model = self.get_model(key)
        if model.cover is None:
            raise CoverMissing(f"model {key} has no cover")
        updated, replaced = self._locked(lambda r: r.replace_cover(key, None))
        if replaced is not None:
            self._covers().drop(key, replaced.blake3)
        return updated  # type: ignore[no-any-return]

    # --- starter models (services.catalog) ---------------------------------------------------------

    def starters(self: _Client) -> dict[str, Any]:
        """The catalogue: each starter with the key of its installed record (or None), and the bundles."""
        from modelbus.services.catalog import load_catalog  # (YAML and its models: only for these two calls)
        catalog = load_catalog()
        models = self.list_models()
        return {
            "models": [{**s.model_dump(mode="json"), "source": s.install_source(self.config.hf_endpoint),
                        "installed": next((m.key for m in models if s.installed_by(m)), None)}
                       for s in catalog.models],
            "bundles": [b.model_dump(mode="json") for b in catalog.bundles],
        }

    def install_starters(self: _Client, names: Sequence[str] = (), bundle: str | None = None,
                         **options: Any) -> list[dict[str, Any]]:
        """Install starters (and a bundle's members) with their dependencies, dependencies first; one
        entry per starter: ``{"starter", "job"}``, or ``{"starter", "installed": key}`` for one already there."""
        from modelbus.services.catalog import NoStarterGiven, load_catalog
        catalog = load_catalog()
        wanted = [*(catalog.bundle(bundle).models if bundle else ()), *names]
        if not wanted:
            raise NoStarterGiven("name a starter model or a bundle (see `modelbus starters`)")
        order = catalog.with_dependencies(wanted)  # an unknown name fails before anything is published
        installed = {s["name"]: s["installed"] for s in self.starters()["models"]}
        out: list[dict[str, Any]] = []
        for starter in order:
            if installed.get(starter.name):
                out.append({"starter": starter.name, "installed": installed[starter.name]})
                continue
            extra = {"variant": starter.variant} if starter.variant else {}
            job = self.install(starter.install_source(self.config.hf_endpoint), **{**extra, **options})
            out.append({"starter": starter.name, "job": job})
        return out

    # --- conversion (services.convert, on a worker of the hash queue) ---------------------------------

    def convert(self: _Client, key: str, *, keep_original: bool = False, timeout: float | None = None) -> dict[str, Any]:
        """Convert a single-file main checkpoint into a diffusers folder, recorded under the same key;
        the original file is deleted unless ``keep_original``. A model that cannot be converted is
        refused here, before any worker is asked."""
        from modelbus.services.client import on_worker
        check_convertible(self.get_model(key))
        return on_worker.run_on_worker(self.redis, self.store.keys, CONVERT_FUNCTION, (key, keep_original),
                                       CONVERT_TIMEOUT if timeout is None else timeout)
