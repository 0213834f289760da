"""The in-memory projection (and the table the YAML projection keeps in memory between rewrites)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelbus.events.store import BodyBatch
from modelbus.services.records.enums import BaseModelType, ModelFormat, ModelType
from modelbus.services.records.fold import State
from modelbus.services.records.models import ModelConfigBase
from modelbus.services.records.projection import (
    Changes,
    RecordProjection,
    check_page,
    config_from_state,
    fresh_entries,
    order_key,
)


class RecordTable:
    """Records as JSON dicts with a name index; what both dict-backed projections share."""

    def __init__(self) -> None:
        self.states: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, int] = {}
        self.by_name: dict[str, set[str]] = {}
        self.checkpoint = "0-0"
        self.last_event_id: str | None = None

    def load(self, states: dict[str, dict[str, Any]], versions: dict[str, int], checkpoint: str,
             last_event_id: str | None) -> None:
        self.states, self.versions, self.checkpoint = dict(states), dict(versions), checkpoint
        self.last_event_id = last_event_id
        self.by_name = {}
        for key, state in self.states.items():
            self.by_name.setdefault(state["name"], set()).add(key)

    def change(self, changes: Changes, checkpoint: str, last_event_id: str | None) -> None:
        for key, (state, version) in changes.items():
            old = self.states.pop(key, None)
            if old is not None:
                self.by_name.get(old["name"], set()).discard(key)
            if state is not None:
                self.states[key] = state
                self.by_name.setdefault(state["name"], set()).add(key)
            self.versions[key] = version
        self.checkpoint, self.last_event_id = checkpoint, last_event_id


class DictProjection(RecordProjection):
    """Queries over a :class:`RecordTable`; subclasses decide where the table is kept."""

    def __init__(self, models_dir: Path | None = None, lock: Any = None) -> None:
        super().__init__(models_dir, lock)
        self.table = RecordTable()

    def _load_state(self, key: str) -> State:
        return self.table.states.get(key)

    def version_of(self, key: str) -> int:
        with self.lock:
            return self.table.versions.get(key, 0)

    def _stored_version(self, key: str) -> int:
        return self.table.versions.get(key, 0)

    def _configs(self, keys: Sequence[str], copy: bool = True) -> list[ModelConfigBase]:
        out = [c for c in (self.get(k, copy) for k in keys) if c is not None]
        out.sort(key=lambda c: (c.name, c.key))
        return out

    def _matching(self, name: str | None, base: BaseModelType | None, model_type: ModelType | None,
                  tags: Sequence[str] = ()) -> list[str]:
        """The keys of the records a search (and every one of ``tags``) finds, in no order."""
        wanted = set(tags)
        keys = self.table.by_name.get(name, set()) if name is not None else self.table.states.keys()
        found = []
        for key in keys:
            state = self.table.states[key]
            if model_type is not None and state["model_type"] != model_type.value:
                continue
            if base is not None and base.value != state["base_model"] \
                    and base.value not in (state.get("compatible_bases") or ()):
                continue
            if wanted and not wanted <= set(state.get("tags") or ()):
                continue
            found.append(key)
        return found

    def search(self, name: str | None, base: BaseModelType | None, model_type: ModelType | None,
               copy: bool = True) -> list[ModelConfigBase]:
        with self.lock:
            return self._configs(self._matching(name, base, model_type), copy)

    def page(self, name: str | None, base: BaseModelType | None, model_type: ModelType | None,
             tags: Sequence[str], offset: int, limit: int, order_by: str = "name",
             descending: bool = False, *, model_format: ModelFormat | None = None,
             name_contains: str | None = None) -> tuple[int, list[ModelConfigBase]]:
        check_page(offset, limit)
        with self.lock:
            found = self._matching(name, base, model_type, tags)
            states = self.table.states
            if model_format is not None:
                found = [k for k in found if states[k]["model_format"] == model_format.value]
            if name_contains:
                needle = name_contains.lower()  # listing_order's lowering, as the SQL side's sort_name
                found = [k for k in found if needle in states[k]["name"].lower()]
            # sorted on the stored states: only the page's records are parsed
            found.sort(key=lambda k: order_key(states[k], k, order_by), reverse=descending)
            return len(found), [c for c in (self.get(k) for k in found[offset:offset + limit]) if c is not None]

    def by_path(self, path: str) -> list[ModelConfigBase]:
        with self.lock:
            resolved = self.resolve(path)
            return self._configs([k for k, s in self.table.states.items()
                                  if s["path"] == path or self.resolve(s["path"]) == resolved])

    def by_tags(self, tags: Sequence[str]) -> list[ModelConfigBase]:
        with self.lock:
            return self._configs(self._matching(None, None, None, tags))

    def count(self) -> int:
        with self.lock:
            return len(self.table.states)

    def checkpoint(self) -> str:
        return self.table.checkpoint

    def last_event_id(self) -> str | None:
        return self.table.last_event_id


class MemoryProjection(DictProjection):
    """Lives and dies with the process; rebuilt from the log at every start."""

    def _commit(self, batch: BodyBatch) -> None:
        fresh = fresh_entries(batch, self.table.checkpoint)
        if fresh is not None:
            self.table.change(self.fold_batch(fresh), batch.position, batch.event_id)

    def reset(self) -> None:
        with self.lock:
            self.table = RecordTable()
            self._cache.clear()


__all__ = ["DictProjection", "MemoryProjection", "RecordTable", "config_from_state"]
