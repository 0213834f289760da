"""The fold every projection shares: path resolution and the newest-first replay of a batch."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from modelbus.events.codec import EventBody
from modelbus.events.store import BodyBatch
from modelbus.services.records.fold import resolve_path
from modelbus.services.records.memory_projection import MemoryProjection

segments = st.lists(st.sampled_from(["", ".", "..", "a", ".a", "..b", "~", "x y", "é"]), min_size=1, max_size=6)


@settings(max_examples=500, deadline=None)
@given(parts=segments, leading=st.sampled_from(["/", "//", "", "~/", "./"]), trailing=st.sampled_from(["", "/"]))
def test_resolve_path_matches_normpath(parts: list[str], leading: str, trailing: str) -> None:
    path = leading + "/".join(parts) + trailing
    expected = os.path.normpath(os.path.join("/models", os.path.expanduser(path)))
    assert resolve_path(path, Path("/models")) == expected


def _entry(n: int, type_name: str, key: str, version: int, body: dict[str, object] | bytes) -> EventBody:
    import orjson
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return EventBody(f"1-{n}", type_name, key, version, f"e{n}", raw)


def _config(name: str) -> dict[str, object]:
    return {"key": "k", "name": name, "model_type": "lora", "model_format": "lycoris", "base_model": "sd-1",
            "path": "/m/k.safetensors", "hash": "h"}


def _apply(projection: MemoryProjection, entries: list[EventBody]) -> None:
    projection.apply_bodies(BodyBatch(entries, entries[-1].position, entries[-1].event_id))


def test_newest_replacing_event_decides_and_later_renames_apply() -> None:
    projection = MemoryProjection()
    _apply(projection, [
        _entry(1, "ModelAdded", "k", 1, {"config": _config("a")}),
        _entry(2, "ModelRenamed", "k", 2, {"old_name": "a", "new_name": "b"}),
        _entry(3, "ModelUpdated", "k", 3, {"changes": {}, "config": _config("c")}),
        _entry(4, "ModelRenamed", "k", 4, {"old_name": "c", "new_name": "d"}),
        _entry(5, "ModelRenamed", "k", 5, {"old_name": "d", "new_name": "e"}),
    ])
    assert projection.table.states["k"]["name"] == "e" and projection.table.versions["k"] == 5
    # a rename alone changes the stored state; a removal ends it, whatever renames come after
    _apply(projection, [_entry(6, "ModelRenamed", "k", 6, {"old_name": "e", "new_name": "f"})])
    assert projection.table.states["k"]["name"] == "f"
    _apply(projection, [_entry(7, "ModelRemoved", "k", 7, {}),
                        _entry(8, "ModelRenamed", "k", 8, {"old_name": "f", "new_name": "g"})])
    assert "k" not in projection.table.states and projection.table.versions["k"] == 8


def test_a_broken_newest_body_falls_back_to_the_one_before() -> None:
    projection = MemoryProjection()
    _apply(projection, [
        _entry(1, "ModelAdded", "k", 1, {"config": _config("a")}),
        _entry(2, "ModelUpdated", "k", 2, b"{not json"),
        _entry(3, "ModelUpdated", "k", 3, {"changes": {}, "config": "not a dict"}),
        _entry(4, "ModelRenamed", "k", 4, {"new_name": 7}),
    ])
    assert projection.table.states["k"]["name"] == "a"
