"""The record service's writes of per-model data: settings, trigger phrases, links, covers.

Each write checks its input against the record it finds (a VAE setting names a VAE, a link's target
exists, settings go to main models...) and appends one event of the model's aggregate at the version
it read, retrying a lost race as every record write does; a write that changes nothing appends
nothing. The events and the fold are in services.records.extras.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from modelbus.events.logs import get_logger
from modelbus.events.schema import Event, ModelCoverChanged, ModelLinked, ModelSettingsChanged, ModelUnlinked
from modelbus.services.records.errors import FieldError, InvalidModelConfigException, UnknownModelException
from modelbus.services.records.extras import (
    MAX_LINKS,
    RELATIONS,
    SETTINGS_TYPES,
    TRIGGER_TYPES,
    Cover,
    clean_phrases,
    settings_errors,
)
from modelbus.services.records.models import ModelConfigBase
from modelbus.services.records.projection import RecordProjection

log = get_logger(__name__)


class LinkNotFound(UnknownModelException):
    """An unlink of a link that is not there."""


def _invalid(context: str, field: str, value: Any, why: str) -> InvalidModelConfigException:
    return InvalidModelConfigException([FieldError(field, value, why)], context)


def default_relation(model: ModelConfigBase) -> str:
    """The relation a link from ``model`` has unless told: a pipeline uses, everything else is for."""
    return "uses" if model.model_type.value in RELATIONS["uses"] and model.model_type.value != "ip_adapter" \
        else "for"


class _Records(Protocol):
    """What the mixin needs of ModelRecordServiceBase (its self type: no import of the service)."""

    projection: RecordProjection

    def _current(self, key: str) -> ModelConfigBase: ...
    def _append(self, event: Event) -> Any: ...
    def _retry(self, attempt: Callable[[], Any], key: str) -> Any: ...
    def _sync_for_read(self) -> None: ...
    def sync(self) -> str: ...
    def get_model(self, key: str) -> ModelConfigBase: ...
    def unlink(self, key: str, target: str, *, reason: str | None = None,
               correlation_id: str | None = None) -> ModelConfigBase: ...
    def linked_from(self, key: str) -> list[tuple[str, str]]: ...
    def _check_vae(self, model: ModelConfigBase, vae_key: str) -> None: ...
    def replace_cover(self, key: str, cover: Cover | None, *,
                      correlation_id: str | None = None) -> tuple[ModelConfigBase, Cover | None]: ...


class ModelDataWrites:
    """Mixed into ModelRecordServiceBase (which provides ``_current``, ``_append``, ``_retry``...)."""

    def set_settings(self: _Records, key: str, settings: Mapping[str, Any] | None = None,
                     trigger_phrases: Sequence[str] | None = None, *, replace: bool = False,
                     correlation_id: str | None = None) -> ModelConfigBase:
        """Change default settings (sparse: a None value clears that field; ``replace``: the whole set)
        and/or set the trigger phrases (the whole list)."""
        if settings is not None and not isinstance(settings, Mapping):
            raise _invalid("invalid default settings", "settings", settings, "must be an object")
        phrases = None
        if trigger_phrases is not None:
            try:
                phrases = clean_phrases(list(trigger_phrases) if not isinstance(trigger_phrases, str)
                                        else trigger_phrases)
            except ValueError as exc:
                raise _invalid("invalid trigger phrases", "trigger_phrases", trigger_phrases, str(exc)) from None

        def attempt() -> ModelConfigBase | None:
            current = self._current(key)
            kind = current.model_type.value
            new_settings = None
            if settings is not None:
                if kind not in SETTINGS_TYPES:
                    raise _invalid("invalid default settings", "settings", dict(settings),
                                   f"a {kind} model has no default settings (only {', '.join(SETTINGS_TYPES)})")
                old = current.default_settings.model_dump(exclude_none=True) if current.default_settings else {}
                merged = dict(settings) if replace else {**old, **settings}
                merged = {k: v for k, v in merged.items() if v is not None}
                problems = settings_errors(merged)
                if problems:
                    raise InvalidModelConfigException([FieldError(*p) for p in problems], "invalid default settings")
                if merged.get("vae") is not None:
                    self._check_vae(current, merged["vae"])
                new_settings = merged if merged != old else None
            if phrases is not None and kind not in TRIGGER_TYPES:
                raise _invalid("invalid trigger phrases", "trigger_phrases", phrases,
                               f"a {kind} model has no trigger phrases (only {', '.join(TRIGGER_TYPES)})")
            new_phrases = phrases if phrases is not None and phrases != current.trigger_phrases else None
            if new_settings is None and new_phrases is None:
                return current
            event = ModelSettingsChanged(aggregate_id=key, settings=new_settings,
                                         trigger_phrases=None if new_phrases is None else tuple(new_phrases),
                                         correlation_id=correlation_id)
            if self._append(event) is None:
                return None
            log.debug("model_settings_changed", key=key)
            return self.get_model(key)
        return self._retry(attempt, key)  # type: ignore[no-any-return]

    def _check_vae(self: _Records, model: ModelConfigBase, vae_key: str) -> None:
        found = self.projection.get(vae_key)
        if found is None:
            raise _invalid("invalid default settings", "vae", vae_key, "no model has this key")
        if found.model_type.value != "vae":
            raise _invalid("invalid default settings", "vae", vae_key, f"is a {found.model_type.value} model, not a vae")
        if not found.serves(model.base_model):
            raise _invalid("invalid default settings", "vae", vae_key,
                           f"is a {found.base_model.value} VAE; this model is {model.base_model.value}")

    def link(self: _Records, key: str, target: str, relation: str | None = None, *,
             correlation_id: str | None = None) -> ModelConfigBase:
        """Relate ``key`` to ``target`` (which must exist): a LoRA ``for`` a main model, a pipeline that
        ``uses`` a VAE... Linking again with the same relation changes nothing."""
        if target == key:
            raise _invalid("invalid link", "target", target, "a model cannot be linked to itself")

        def attempt() -> ModelConfigBase | None:
            current = self._current(key)
            if self.projection.get(target) is None:
                self.sync()
                if self.projection.get(target) is None:
                    raise UnknownModelException(f"cannot link {key} to {target!r}: no model has this key")
            rel = relation or default_relation(current)
            kind = current.model_type.value
            if rel not in RELATIONS:
                raise _invalid("invalid link", "relation", rel, "must be one of " + ", ".join(RELATIONS))
            if kind not in RELATIONS[rel]:
                raise _invalid("invalid link", "relation", rel, f"a {kind} model cannot be linked as {rel!r}")
            if any(link.key == target and link.relation == rel for link in current.links):
                return current
            if len(current.links) >= MAX_LINKS:
                raise _invalid("invalid link", "links", len(current.links), f"at most {MAX_LINKS} links")
            event = ModelLinked(aggregate_id=key, target=target, relation=rel, correlation_id=correlation_id)
            if self._append(event) is None:
                return None
            log.debug("model_linked", key=key, target=target, relation=rel)
            return self.get_model(key)
        return self._retry(attempt, key)  # type: ignore[no-any-return]

    def unlink(self: _Records, key: str, target: str, *, reason: str | None = None,
               correlation_id: str | None = None) -> ModelConfigBase:
        def attempt() -> ModelConfigBase | None:
            current = self._current(key)
            if not any(link.key == target for link in current.links):
                raise LinkNotFound(f"model {key} is not linked to {target!r}")
            event = ModelUnlinked(aggregate_id=key, target=target, reason=reason, correlation_id=correlation_id)
            if self._append(event) is None:
                return None
            return self.get_model(key)
        return self._retry(attempt, key)  # type: ignore[no-any-return]

    def linked_from(self: _Records, key: str) -> list[tuple[str, str]]:
        """(key, relation) of every model that links to ``key``."""
        self._sync_for_read()
        return sorted((m.key, link.relation) for m in self.projection.search(None, None, None, copy=False)
                      for link in m.links if link.key == key)

    def drop_links_to(self: _Records, key: str, correlation_id: str | None = None) -> None:
        """After ``key`` was removed: unlink it from every model that linked to it."""
        for source, _ in self.linked_from(key):
            try:
                self.unlink(source, key, reason="removed", correlation_id=correlation_id)
            except UnknownModelException:  # (the source went too, or another process unlinked it first)
                continue

    def set_cover(self: _Records, key: str, cover: Cover | None, *,
                  correlation_id: str | None = None) -> ModelConfigBase:
        """Record ``cover`` (its bytes are already stored: services.covers), or no cover."""
        return self.replace_cover(key, cover, correlation_id=correlation_id)[0]

    def replace_cover(self: _Records, key: str, cover: Cover | None, *,
                      correlation_id: str | None = None) -> tuple[ModelConfigBase, Cover | None]:
        """:meth:`set_cover`, and the cover the record had just before (whose bytes the caller may drop:
        the one this write replaced, even when another writer changed it since the caller looked)."""
        def attempt() -> tuple[ModelConfigBase, Cover | None] | None:
            current = self._current(key)
            if current.cover == cover:
                return current, None
            event = ModelCoverChanged(aggregate_id=key, cover=None if cover is None else cover.model_dump(),
                                      correlation_id=correlation_id)
            if self._append(event) is None:
                return None
            return self.get_model(key), current.cover
        return self._retry(attempt, key)  # type: ignore[no-any-return]
