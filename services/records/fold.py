"""How model events change a record: the one fold every projection, the history and time travel share.

A record's state is its config as a JSON dict, or ``None`` once removed. Events of other aggregates
kinds (installs...) leave records alone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from modelbus.events.schema import (
    Event,
    ModelAdded,
    ModelCoverChanged,
    ModelLinked,
    ModelRemoved,
    ModelRenamed,
    ModelSettingsChanged,
    ModelUnlinked,
    ModelUpdated,
)
from modelbus.events.store import StoredEvent, position_key
from modelbus.services.records.extras import PATCH_TYPES, patch

MODEL_EVENTS = (ModelAdded, ModelUpdated, ModelRenamed, ModelRemoved, ModelSettingsChanged, ModelLinked, ModelUnlinked,
                ModelCoverChanged)
PATH_CLAIM_PREFIX = "model-path:"

State = dict[str, Any] | None


MODEL_EVENT_TYPES = frozenset(cls.model_fields["type"].default for cls in MODEL_EVENTS)
#: events that change a record they find (so a projection must read the stored state first)
READS_STATE = frozenset({"ModelRenamed", *PATCH_TYPES})


def is_model_event(event: Event) -> bool:
    return isinstance(event, MODEL_EVENTS)


def step(state: State, type_name: str, body: Mapping[str, Any]) -> State:
    """The record after one event, given as its type and body: the one fold of every projection, replay
    and time travel. ValueError when the body lacks what its type needs (a hand-written entry)."""
    if type_name == "ModelAdded" or type_name == "ModelUpdated":
        config = body.get("config")
        if not isinstance(config, dict):
            raise ValueError(f"{type_name} without a config object")
        return dict(config)
    if type_name == "ModelRenamed":
        new_name = body.get("new_name")
        if not isinstance(new_name, str):
            raise ValueError("ModelRenamed without a new_name string")
        # a rename of a record we never saw stays unseen (nothing to rename)
        return None if state is None else {**state, "name": new_name}
    if type_name == "ModelRemoved":
        return None
    if type_name in PATCH_TYPES:
        return patch(state, type_name, body)
    return state


def next_state(state: State, event: Event) -> State:
    # a pydantic model keeps its fields in __dict__: the event's body, without a copy
    return step(state, event.type, event.__dict__)


def fold(events: Iterable[StoredEvent], *, position: str | None = None, time: datetime | None = None) -> State:
    """Replay one aggregate's events, stopping after ``position`` and/or ``time`` when given."""
    limit = position_key(position) if position is not None else None
    state: State = None
    for stored in events:
        if limit is not None and position_key(stored.position) > limit:
            break
        if time is not None and _aware(stored.event.time) > _aware(time):
            break
        state = next_state(state, stored.event)
    return state


def _aware(moment: datetime) -> datetime:
    # naive datetimes are taken as local time, the way a user typing one means it
    return moment if moment.tzinfo is not None else moment.astimezone()


# an absolute path normpath leaves alone: no empty, "." or ".." segment, no trailing slash ("//x" is
# kept by normpath too, but rare enough to take the slow path)
_NORMAL_ABSOLUTE = re.compile(r"/|(?:/(?!\.\.?(?:/|\Z))[^/]+)+")


def resolve_path(path: str, models_dir: Path | None) -> str:
    """Where a record's path points: relative paths live under ``models_dir`` (the spec's rule).

    Only the text is normalised (no symlinks followed), so the result does not depend on what happens
    to exist on the disk of whichever process writes.
    """
    if path[:1] == "/" and _NORMAL_ABSOLUTE.fullmatch(path) is not None:
        return path  # what normpath would return: the common case, in every replayed event
    p = os.path.expanduser(path)
    if not os.path.isabs(p) and models_dir is not None:
        p = os.path.join(str(models_dir), p)
    return os.path.normpath(p)


def path_claim(resolved: str) -> str:
    """The unique-field name that gives one model exclusive use of a path."""
    return PATH_CLAIM_PREFIX + resolved
