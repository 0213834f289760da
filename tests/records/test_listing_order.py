"""Listing order (``order_by`` name/type/base/format/size/added/modified, ``direction`` asc/desc) on every
backend: the page order equals the plain Python sort, and pages cut from it neither overlap nor skip."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import yaml

from modelbus.events.schema import FileEntry
from modelbus.events.store import EventStore, position_key
from modelbus.services.records import InvalidModelConfigException, ModelConfigBase, ModelRecordServiceBase
from modelbus.services.records.projection import ORDER_FIELDS
from tests.records.conftest import ServiceFactory, set_older_layout
from tests.waiting import wait_until

MODELS = [  # (key, name, type, format, base): ties on every field, names equal but for case
    ("k1", "Beta", "lora", "lycoris", "sdxl"),
    ("k2", "alpha", "vae", "checkpoint", "sd-1"),
    ("k3", "beta", "main", "checkpoint", "sd-2"),
    ("k4", "Ärger", "lora", "diffusers", "sd-1"),
    ("k5", "alpha", "main", "diffusers", "sdxl"),
    ("k6", "zeta", "vae", "diffusers", "sd-2"),
    ("k7", "Alpha", "embedding", "embedding_file", "sd-1"),
]
FIELD = {"name": 1, "type": 2, "format": 3, "base": 4}


def _seed(service: ModelRecordServiceBase) -> None:
    for key, name, type_, fmt, base in MODELS:
        service.add_model(key, {"name": name, "model_type": type_, "model_format": fmt, "base_model": base,
                                "path": f"{base}/{type_}/{key}"})


def _expected(order_by: str, direction: str) -> list[str]:
    def sort_key(m: tuple[str, ...]) -> tuple[str, str, str]:
        first = m[1].lower() if order_by == "name" else m[FIELD[order_by]]
        return first, m[1].lower(), m[0]
    return [m[0] for m in sorted(MODELS, key=sort_key, reverse=direction == "desc")]


def _keys(found: list[ModelConfigBase]) -> list[str]:
    return [c.key for c in found]


CONFIG_ORDERS = [o for o in ORDER_FIELDS if o in FIELD]


@pytest.mark.parametrize(("order_by", "direction"), list(itertools.product(CONFIG_ORDERS, ("asc", "desc"))))
def test_every_order_and_direction(service: ModelRecordServiceBase, order_by: str, direction: str) -> None:
    _seed(service)
    expected = _expected(order_by, direction)
    total, whole = service.search_page(order_by=order_by, direction=direction, limit=100)
    assert total == len(MODELS) and _keys(whole) == expected
    pages = [service.search_page(order_by=order_by, direction=direction, offset=o, limit=2)[1]
             for o in range(0, len(MODELS), 2)]
    assert [k for page in pages for k in _keys(page)] == expected  # stable across pages
    assert _keys(service.search_by_name(order_by=order_by, direction=direction)) == expected
    assert _keys(service.all_models(order_by=order_by, direction=direction)) == expected


def test_order_with_filters(service: ModelRecordServiceBase) -> None:
    _seed(service)
    _, found = service.search_page(model_type="lora", order_by="base", direction="desc")
    assert _keys(found) == ["k1", "k4"]  # sdxl before sd-1
    assert _keys(service.search_by_name("alpha", order_by="type")) == ["k5", "k2"]  # main before vae


@pytest.mark.parametrize(("field", "kwargs"), [("order_by", {"order_by": "weight"}), ("order_by", {"order_by": ""}),
                                               ("direction", {"direction": "up"}),
                                               ("direction", {"order_by": "name", "direction": "DESC "})])
def test_an_unknown_order_is_refused_by_name(service: ModelRecordServiceBase, field: str,
                                             kwargs: dict[str, str]) -> None:
    _seed(service)
    for call in (service.search_page, service.search_by_name, service.all_models):
        with pytest.raises(InvalidModelConfigException, match=f"{field}="):
            call(**kwargs)


# --- size and dates: the listing values the projection keeps beside each config ---------------------

SIZES = {"k1": 300, "k2": 100, "k3": 300, "k4": 0, "k5": 50, "k6": 100, "k7": 7}  # ties on purpose


def _files(total: int) -> list[FileEntry]:
    # a manifest of two files whose sizes add up to ``total`` (none for 0: a record without a manifest)
    return [FileEntry(path="a.bin", size=total - total // 3, blake3="0" * 64),
            FileEntry(path="b.bin", size=total // 3, blake3="1" * 64)] if total else []


def _next_millisecond() -> None:
    """Wait until the clock is past the millisecond of every write so far (the log's positions, on this
    machine's clock), so the next write is recorded at a later moment than each earlier one."""
    now = time.time() * 1000
    wait_until(lambda: time.time() * 1000 > now + 1, 10, "the clock to move on", interval=0.001)


def _seed_listing(service: ModelRecordServiceBase, spaced: bool = False) -> None:
    """The models with manifests of SIZES; with ``spaced``, each added at its own millisecond (else
    several share one, and their dates tie)."""
    for key, name, type_, fmt, base in MODELS:
        service.add_model(key, {"name": name, "model_type": type_, "model_format": fmt, "base_model": base,
                                "path": f"{base}/{type_}/{key}"}, files=_files(SIZES[key]))
        if spaced:
            _next_millisecond()
    _next_millisecond()
    service.update_model("k1", {"description": "changed last but one"})  # first added, now modified late
    service.rename_model("k4", "Ärger again")
    _next_millisecond()
    service.update_model("k2", {"path": "sd-1/vae/moved"}, files=_files(1000))  # a new manifest: a new size


def _listing_expected(service: ModelRecordServiceBase, order_by: str, direction: str) -> list[str]:
    """The order computed from the log itself: sizes from the manifests, dates from the positions."""
    def values(key: str) -> tuple[int, str]:
        history = service.history(key)
        if order_by == "size":
            manifests = [s.event.files for s in history if getattr(s.event, "files", None) is not None]
            return sum(f.size for f in manifests[-1]), service.get_model(key).name.lower()
        moment = history[0] if order_by == "added" else history[-1]
        return position_key(moment.position)[0], service.get_model(key).name.lower()
    return sorted(SIZES, key=lambda k: (*values(k), k), reverse=direction == "desc")


@pytest.mark.parametrize(("order_by", "direction"),
                         list(itertools.product(("size", "added", "modified"), ("asc", "desc"))))
def test_size_and_date_orders(service: ModelRecordServiceBase, order_by: str, direction: str) -> None:
    _seed_listing(service)
    expected = _listing_expected(service, order_by, direction)
    total, whole = service.search_page(order_by=order_by, direction=direction, limit=100)
    assert total == len(MODELS) and _keys(whole) == expected
    for size in (1, 2, 3):  # stable across pages of every size
        pages = [service.search_page(order_by=order_by, direction=direction, offset=o, limit=size)[1]
                 for o in range(0, len(MODELS), size)]
        assert [k for page in pages for k in _keys(page)] == expected
    assert _keys(service.search_by_name(order_by=order_by, direction=direction)) == expected
    assert _keys(service.all_models(order_by=order_by, direction=direction)) == expected


def test_size_and_dates_follow_the_writes(service: ModelRecordServiceBase) -> None:
    _seed_listing(service, spaced=True)
    by = {o: _keys(service.all_models(order_by=o)) for o in ("size", "added", "modified")}
    assert by["size"][-1] == "k2" and by["size"][0] == "k4"  # the new manifest counts, no manifest is 0
    assert by["added"] == [k for k, *_ in MODELS]  # the order they were added in, whatever the writes after
    assert by["modified"][-1] == "k2"
    assert by["modified"].index("k1") > by["modified"].index("k7")  # an update moves a record's date on
    assert by["modified"].index("k4") > by["modified"].index("k7")  # so does a rename
    _, found = service.search_page(model_type="vae", order_by="size", direction="desc")
    assert _keys(found) == ["k2", "k6"]  # with a filter
    assert _keys(service.search_by_name("alpha", order_by="added", direction="desc")) == ["k5", "k2"]


@pytest.mark.parametrize("suffix", [".db", ".yaml"])
def test_an_older_store_gains_the_listing_values_from_the_log(
        make_service: ServiceFactory, root: Path, log_store: EventStore, suffix: str) -> None:
    """A store written before the listing values existed (SQL schema 3, YAML schema 1) is rebuilt from
    the log once on open, and then sorts by them."""
    backend = "sql" if suffix == ".db" else "file"
    first = make_service(backend, log_store, name="old")
    _seed_listing(first)
    expected = _listing_expected(first, "size", "asc")
    first.close()
    set_older_layout(root / f"old{suffix}", 3 if suffix == ".db" else 1,
                     "UPDATE model_records SET size = 0, added = 0, modified = 0",
                     lambda data: data["__metadata__"].pop("listing"))
    again = make_service(backend, log_store, name="old")
    assert _keys(again.all_models(order_by="size")) == expected
    again.close()
    reopened = make_service(backend, log_store, name="old")  # current now: opened without a rebuild
    assert reopened.projection.stale is False
    assert _keys(reopened.all_models(order_by="size")) == expected


def test_the_yaml_file_keeps_the_listing_values_in_its_header(make_service: ServiceFactory, root: Path,
                                                              log_store: EventStore) -> None:
    service = make_service("file", log_store)
    _seed_listing(service)
    data = yaml.safe_load((root / "records.yaml").read_text())
    assert data["__metadata__"]["listing"]["k2"][0] == 1000
    assert all("__listing__" not in body for k, body in data.items() if k != "__metadata__")


def test_the_listing_values_of_each_record(service: ModelRecordServiceBase) -> None:
    _seed_listing(service)
    keys = [k for k, *_ in MODELS]
    values = service.listing([*keys, "no-such-key", "k1"])
    assert list(values) == keys  # the keys asked for that have a record, once each, in the order asked
    for key in keys:
        history = service.history(key)
        manifests = [s.event.files for s in history if getattr(s.event, "files", None) is not None]
        assert values[key].size == sum(f.size for f in manifests[-1])
        assert values[key].added == position_key(history[0].position)[0]
        assert values[key].modified == position_key(history[-1].position)[0]
    assert values["k2"].size == 1000 and values["k4"].size == 0
    service.del_model("k3")
    assert "k3" not in service.listing(keys)
