"""A page of the listing (``search_page`` / ``RecordProjection.page``): the SQL, YAML and memory projections
filter, order and cut identically, and agree with the plain Python listing (filter every record, sort by
``(name.lower(), key)``, slice) for any data, including names equal but for case and non-ASCII names."""

from __future__ import annotations

import itertools
import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelbus.events.codec import EventBody
from modelbus.events.store import BodyBatch, InMemoryEventStore
from modelbus.services.config import AppConfig
from modelbus.services.records import ModelRecordServiceBase, ModelRecordServiceSQL
from modelbus.services.records.enums import BaseModelType, ModelType
from modelbus.services.records.errors import InvalidModelConfigException
from modelbus.services.records.memory_projection import MemoryProjection
from modelbus.services.records.models import ModelConfigBase
from modelbus.services.records.projection import RecordProjection
from modelbus.services.records.sql_projection import SQLProjection
from modelbus.services.records.yaml_projection import YamlProjection

from .conftest import BACKENDS, ServiceFactory, main_config, vae_config

Page = tuple[int, list[str]]


def reference(models: Sequence[ModelConfigBase], name: str | None = None, base: str | None = None,
              type_: str | None = None, tags: Sequence[str] = (), offset: int = 0, limit: int = 100) -> Page:
    """The listing as it was computed before the projections paged: everything, then Python."""
    found = [m for m in models
             if (name is None or m.name == name) and (type_ is None or m.model_type.value == type_)
             and (base is None or base in [b.value for b in (m.base_model, *m.compatible_bases)])
             and set(tags) <= set(m.tags)]
    found.sort(key=lambda m: (m.name.lower(), m.key))
    return len(found), [m.key for m in found[offset:offset + limit]]


@pytest.fixture()
def trio(make_service: ServiceFactory) -> list[ModelRecordServiceBase]:
    """One log, read by a service of each backend (the first one writes)."""
    log = InMemoryEventStore()
    return [make_service(backend, log) for backend in BACKENDS]


def pages(services: Sequence[ModelRecordServiceBase], name: str | None = None, base: str | None = None,
          type_: str | None = None, tags: Sequence[str] = (), offset: int = 0, limit: int = 100) -> Page:
    got = []
    for service in services:
        total, page = service.search_page(name, base, type_, tags, offset=offset, limit=limit)
        got.append((total, [m.key for m in page]))
    assert got[1:] == got[:-1], f"backends {BACKENDS} disagree on {name, base, type_, tags, offset, limit}: {got}"
    expected = reference(services[0].all_models(), name, base, type_, tags, offset, limit)
    assert got[0] == expected
    return got[0]


def _seed(writer: ModelRecordServiceBase) -> None:
    records: list[tuple[str, dict[str, Any]]] = [
        ("k00", main_config(name="alpha", path="p00", tags=["a", "b"])),
        ("k01", main_config(name="Alpha", path="p01", tags=["a"], base_model="sdxl")),
        ("k02", main_config(name="ALPHA", path="p02", tags=["b"])),
        ("k03", vae_config(name="alpha", path="p03", tags=["a", "b", "c"], compatible_bases=["sd-2"])),
        ("k04", vae_config(name="beta", path="p04", base_model="sd-2")),
        ("k05", main_config(name="émile", path="p05", tags=["a"])),
        ("k06", main_config(name="Émile", path="p06", tags=["a", "b"], base_model="sdxl")),
        ("k07", vae_config(name="zeta", path="p07", tags=["c"], compatible_bases=["sd-2", "sdxl"])),
        ("k08", main_config(name="_under", path="p08")),
        ("k09", main_config(name="Zeta", path="p09", tags=["b"])),
        ("k10", vae_config(name="straße", path="p10", tags=["a"])),
        ("k11", vae_config(name="STRASSE", path="p11", tags=["a"])),
    ]
    for key, config in records:
        writer.add_model(key, config)


def test_backends_agree_across_filters_offsets_and_limits(trio: list[ModelRecordServiceBase]) -> None:
    _seed(trio[0])
    assert pages(trio)[0] == 12
    names = (None, "alpha", "Alpha", "émile", "missing")
    bases = (None, "sd-1", "sd-2", "sdxl")  # sd-2 and sdxl: also through compatible bases
    types = (None, "main", "vae")
    tag_sets: tuple[tuple[str, ...], ...] = ((), ("a",), ("a", "b"), ("b", "a", "a"), ("missing",), ("a", "missing"))
    for name, base, type_, tags in itertools.product(names, bases, types, tag_sets):
        total, _ = pages(trio, name, base, type_, tags)
        for offset, limit in ((0, 0), (0, 1), (1, 2), (total - 1, 1), (total, 5), (total + 10, 1)):
            if offset >= 0:
                pages(trio, name, base, type_, tags, offset, limit)


def test_the_order_is_python_lower_then_key(trio: list[ModelRecordServiceBase]) -> None:
    _seed(trio[0])
    # equal lowered names fall back to the key: "Émile" (k06) lowers to "émile" (k05), where SQLite's
    # NOCASE (ASCII only) would put "É" first
    expected = ["k08", "k00", "k01", "k02", "k03", "k04", "k11", "k10", "k07", "k09", "k05", "k06"]
    assert pages(trio) == (12, expected)
    assert pages(trio, offset=5, limit=4) == (12, expected[5:9])
    assert pages(trio, tags=["a"]) == (7, ["k00", "k01", "k03", "k11", "k10", "k05", "k06"])


def test_pages_follow_renames_updates_and_removals(trio: list[ModelRecordServiceBase]) -> None:
    writer = trio[0]
    _seed(writer)
    writer.rename_model("k08", "omega")  # from first to the middle
    writer.rename_model("k06", "Aardvark")  # from last to first
    writer.del_model("k02")
    writer.del_model("k09")
    writer.update_model("k04", {"tags": ["a", "b"], "base_model": "sdxl"})
    writer.update_model("k00", {"tags": []})
    assert pages(trio)[1][:3] == ["k06", "k00", "k01"]
    assert pages(trio, tags=["a", "b"]) == (3, ["k06", "k03", "k04"])
    assert pages(trio, base="sdxl") == (4, ["k06", "k01", "k04", "k07"])
    assert pages(trio, "alpha") == (2, ["k00", "k03"])
    writer.add_model("k02", main_config(name="alpha", path="p02b", tags=["a", "b"]))  # a key back again
    assert pages(trio, "alpha", tags=["b"]) == (2, ["k02", "k03"])
    for offset in range(0, 12, 3):
        pages(trio, offset=offset, limit=3)


def test_bad_paging_is_refused(trio: list[ModelRecordServiceBase]) -> None:
    _seed(trio[0])
    for service in trio:
        with pytest.raises(InvalidModelConfigException, match="offset=-1: must be an integer >= 0"):
            service.search_page(offset=-1)
        with pytest.raises(InvalidModelConfigException, match="limit=-1: must be an integer >= 0"):
            service.search_page(limit=-1)
        with pytest.raises(ValueError, match="offset=-2: must be >= 0"):
            service.projection.page(None, None, None, (), -2, 10)
        with pytest.raises(InvalidModelConfigException, match="base_model='sd-9'"):
            service.search_page(base_model="sd-9")


def test_a_schema_2_file_is_rebuilt_with_the_order_column(root: Path, config: AppConfig,
                                                          make_service: ServiceFactory) -> None:
    log = InMemoryEventStore()
    writer = make_service("memory", log)
    _seed(writer)
    sql = make_service("sql", log)
    assert pages([writer, sql])[0] == 12
    sql.close()
    # the layout before the order column: no sort_name, no index on it (nor the listing values), schema 2
    conn = sqlite3.connect(root / "records.db")
    for order in ("", "_size", "_added", "_modified"):
        conn.execute(f"DROP INDEX model_records_order{order}")
    for column in ("sort_name", "size", "added", "modified"):
        conn.execute(f"ALTER TABLE model_records DROP COLUMN {column}")
    conn.execute("UPDATE model_record_meta SET value = '2' WHERE name = 'schema'")
    conn.commit()
    conn.close()
    reopened = ModelRecordServiceSQL.from_db_file(root / "records.db", log, config=config)
    try:
        assert pages([writer, reopened], tags=["a"]) == (7, ["k00", "k01", "k03", "k11", "k10", "k05", "k06"])
    finally:
        reopened.close()


def test_a_page_holds_copies_and_parses_only_itself(trio: list[ModelRecordServiceBase]) -> None:
    _seed(trio[0])
    for service in trio:
        projection = service.projection
        service.search_page(limit=1)  # catches up (the writer's own adds may sit in its cache)
        projection._cache.clear()
        total, page = service.search_page(offset=3, limit=2)
        assert total == 12 and sorted(projection._cache) == sorted(m.key for m in page)
        page[0].tags.append("changed")
        assert "changed" not in service.search_page(offset=3, limit=1)[1][0].tags


# --- random data against the reference ------------------------------------------------------------------

KEYS = [f"k{i}" for i in range(8)]
NAMES = st.text(alphabet="aAbBzZéÉßİı_0", min_size=1, max_size=3)
BASES = ["sd-1", "sd-2", "sdxl"]
TAGS = ["x", "y", "z"]
KINDS = [("main", "checkpoint"), ("vae", "checkpoint"), ("lora", "lycoris")]


@st.composite
def configs(draw: st.DrawFn, key: str) -> dict[str, Any]:
    type_, format_ = draw(st.sampled_from(KINDS))
    return {"key": key, "name": draw(NAMES), "model_type": type_, "model_format": format_,
            "base_model": draw(st.sampled_from(BASES)), "path": f"/models/{key}",
            "compatible_bases": draw(st.lists(st.sampled_from(BASES), max_size=2)),
            "tags": draw(st.lists(st.sampled_from(TAGS), max_size=3))}


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[list[EventBody]], dict[str, dict[str, Any]]]:
    """Batches of events over a few keys, and the records they leave."""
    states: dict[str, dict[str, Any]] = {}
    versions = dict.fromkeys(KEYS, 0)
    entries: list[EventBody] = []
    body: dict[str, Any]
    for _ in range(draw(st.integers(0, 30))):
        key = draw(st.sampled_from(KEYS))
        if key not in states:
            type_, body = "ModelAdded", {"config": draw(configs(key))}
            states[key] = dict(body["config"])
        else:
            op = draw(st.sampled_from(["rename", "update", "remove"]))
            if op == "rename":
                new_name = draw(NAMES)
                type_, body = "ModelRenamed", {"old_name": states[key]["name"], "new_name": new_name}
                states[key]["name"] = new_name
            elif op == "update":
                config = draw(configs(key))
                type_, body = "ModelUpdated", {"changes": {}, "config": config}
                states[key] = dict(config)
            else:
                type_, body = "ModelRemoved", {}
                del states[key]
        versions[key] += 1
        n = len(entries) + 1
        entries.append(EventBody(f"1-{n}", type_, key, versions[key], f"e{n}", orjson.dumps(body)))
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(entries))), max_size=3)))
    batches = [entries[a:b] for a, b in itertools.pairwise([0, *cuts, len(entries)]) if entries[a:b]]
    return batches, states


def _state_reference(states: dict[str, dict[str, Any]], name: str | None, base: str | None, type_: str | None,
                     tags: Sequence[str], offset: int, limit: int) -> Page:
    found = [(s["name"].lower(), k) for k, s in states.items()
             if (name is None or s["name"] == name) and (type_ is None or s["model_type"] == type_)
             and (base is None or base == s["base_model"] or base in s["compatible_bases"])
             and set(tags) <= set(s["tags"])]
    found.sort()
    return len(found), [k for _, k in found[offset:offset + limit]]


def _projections(folder: Path) -> Iterator[RecordProjection]:
    yield SQLProjection(sqlite3.connect(":memory:"))
    yield YamlProjection(folder / "records.yaml")
    yield MemoryProjection()


@settings(max_examples=150, deadline=None)
@given(history=histories(), queries=st.lists(st.tuples(
    st.one_of(st.none(), NAMES), st.one_of(st.none(), st.sampled_from(BASES)),
    st.one_of(st.none(), st.sampled_from([t for t, _ in KINDS])), st.lists(st.sampled_from(TAGS), max_size=2),
    st.integers(0, 10), st.integers(0, 10)), min_size=1, max_size=8))
def test_random_pages_match_the_reference(
        history: tuple[list[list[EventBody]], dict[str, dict[str, Any]]],
        queries: list[tuple[str | None, str | None, str | None, list[str], int, int]]) -> None:
    batches, states = history
    with tempfile.TemporaryDirectory() as folder:
        projections = list(_projections(Path(folder)))
        try:
            for projection in projections:
                for batch in batches:
                    projection.apply_bodies(BodyBatch(batch, batch[-1].position, batch[-1].event_id))
            # names that are there, and the same in upper case
            named: list[tuple[str | None, str | None, str | None, list[str], int, int]] = [
                (n, None, None, [], 0, 10) for s in list(states.values())[:2] for n in (s["name"], s["name"].upper())]
            for name, base, type_, tags, offset, limit in [*queries, *named]:
                expected = _state_reference(states, name, base, type_, tags, offset, limit)
                for projection in projections:
                    total, page = projection.page(name, None if base is None else BaseModelType(base),
                                                  None if type_ is None else ModelType(type_), tags, offset, limit)
                    assert (total, [m.key for m in page]) == expected, type(projection).__name__
                    assert [m.name for m in page] == [states[m.key]["name"] for m in page]
        finally:
            for projection in projections:
                projection.close()


def test_a_page_filters_by_format_and_by_part_of_the_name(service: ModelRecordServiceBase) -> None:
    # every projection: the page's filters for the web page's search box and format menu
    def diffusers(name: str, path: str) -> dict[str, Any]:
        config = main_config(name=name, path=path, model_format="diffusers")
        del config["config"]  # a checkpoint's field
        return config
    service.add_model("k0", main_config(name="Ünïcode Portrait", path="p0"))
    service.add_model("k1", diffusers("landscape PORTRAIT", "p1"))
    service.add_model("k2", diffusers("city", "p2"))
    total, page = service.search_page(name_contains="portrait")
    assert total == 2 and [m.key for m in page] == ["k1", "k0"]  # any case; by name
    assert service.search_page(name_contains="ÜNÏ")[0] == 1  # Python's lowering on both sides
    assert [m.key for m in service.search_page(model_format="diffusers")[1]] == ["k2", "k1"]
    assert [m.key for m in service.search_page(model_format="diffusers", name_contains="rait")[1]] == ["k1"]
    assert service.search_page(name_contains="nowhere") == (0, [])
    with pytest.raises(InvalidModelConfigException, match="invalid search"):
        service.search_page(model_format="zip")
