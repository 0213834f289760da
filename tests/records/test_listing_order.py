"""Listing order (``order_by`` name/type/base/format, ``direction`` asc/desc) on every backend: the page
order equals the plain Python sort, and pages cut from it neither overlap nor skip."""

from __future__ import annotations

import itertools

import pytest

from modelbus.services.records import InvalidModelConfigException, ModelConfigBase, ModelRecordServiceBase
from modelbus.services.records.projection import ORDER_FIELDS

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


@pytest.mark.parametrize(("order_by", "direction"), list(itertools.product(ORDER_FIELDS, ("asc", "desc"))))
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


@pytest.mark.parametrize(("field", "kwargs"), [("order_by", {"order_by": "size"}), ("order_by", {"order_by": ""}),
                                               ("direction", {"direction": "up"}),
                                               ("direction", {"order_by": "name", "direction": "DESC "})])
def test_an_unknown_order_is_refused_by_name(service: ModelRecordServiceBase, field: str,
                                             kwargs: dict[str, str]) -> None:
    _seed(service)
    for call in (service.search_page, service.search_by_name, service.all_models):
        with pytest.raises(InvalidModelConfigException, match=f"{field}="):
            call(**kwargs)
