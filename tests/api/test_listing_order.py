"""``GET /api/v2/models?order_by=...&direction=...``: the listing sorted (by a config field, the installed
size or a date), stable across pages; a bad sort field is a 422 naming it."""

from __future__ import annotations

import time
from datetime import datetime

from fastapi.testclient import TestClient

from modelbus.events.schema import FileEntry
from modelbus.services.client import ModelBusClient
from modelbus.services.config import AppConfig
from tests.client.conftest import model_config, put_file
from tests.waiting import wait_until

SEED = [("k0", "Zed", "sd-1"), ("k1", "amber", "sdxl"), ("k2", "Mid", "sd-2"), ("k3", "mid", "sdxl")]


def _seed(app_config: AppConfig) -> None:
    client = ModelBusClient(app_config)
    for key, name, base in SEED:
        put_file(app_config, f"{key}.safetensors")
        client.add_model(key, model_config(name, f"{key}.safetensors", base_model=base))


def _keys(http: TestClient, **params: object) -> list[str]:
    answer = http.get("/api/v2/models", params=params)
    assert answer.status_code == 200, answer.text
    return [m["key"] for m in answer.json()["items"]]


def test_order_and_direction(http: TestClient, app_config: AppConfig) -> None:
    _seed(app_config)
    assert _keys(http) == ["k1", "k2", "k3", "k0"]  # by name (case-blind), then key: the default
    assert _keys(http, direction="desc") == ["k0", "k3", "k2", "k1"]
    assert _keys(http, order_by="base") == ["k0", "k2", "k1", "k3"]  # sd-1, sd-2, sdxl (amber, mid)
    by_base_desc = _keys(http, order_by="base", direction="desc")
    assert by_base_desc == ["k3", "k1", "k2", "k0"]
    pages = [_keys(http, order_by="base", direction="desc", offset=o, limit=1) for o in range(len(SEED))]
    assert [k for page in pages for k in page] == by_base_desc  # stable across pages


def test_a_bad_order_is_a_422_naming_it(http: TestClient, app_config: AppConfig) -> None:
    _seed(app_config)
    for params in ({"order_by": "weight"}, {"direction": "sideways"}):
        bad = http.get("/api/v2/models", params=params)
        assert bad.status_code == 422
        assert bad.json()["error"]["details"][0]["field"] == f"query.{next(iter(params))}"


def _next_millisecond() -> None:
    # every write so far lies in an earlier millisecond of the log's clock (this machine's) than the next
    now = time.time() * 1000
    wait_until(lambda: time.time() * 1000 > now + 1, 10, "the clock to move on", interval=0.001)


def test_order_by_size_and_dates(http: TestClient, app_config: AppConfig) -> None:
    client = ModelBusClient(app_config)
    sizes = {"k0": 500, "k1": 20, "k2": 500, "k3": 3000}  # k0 and k2 tie: then by name (Mid before Zed)
    for key, name, base in SEED:
        put_file(app_config, f"{key}.safetensors")
        client.records.add_model(key, model_config(name, f"{key}.safetensors", base_model=base),
                                 files=[FileEntry(path=f"{key}.safetensors", size=sizes[key], blake3="0" * 64)])
        _next_millisecond()
    assert _keys(http, order_by="size") == ["k1", "k2", "k0", "k3"]
    assert _keys(http, order_by="size", direction="desc") == ["k3", "k0", "k2", "k1"]
    pages = [_keys(http, order_by="size", offset=o, limit=3) for o in (0, 3)]
    assert pages == [["k1", "k2", "k0"], ["k3"]]  # stable across pages
    assert _keys(http, order_by="added") == ["k0", "k1", "k2", "k3"]
    assert _keys(http, order_by="added", direction="desc") == ["k3", "k2", "k1", "k0"]
    renamed = http.post("/api/v2/models/i/k1/rename", json={"name": "amber two"})
    assert renamed.status_code == 200, renamed.text
    assert _keys(http, order_by="modified", direction="desc") == ["k1", "k3", "k2", "k0"]  # a rename modifies
    assert _keys(http, order_by="added") == ["k0", "k1", "k2", "k3"]  # but adds nothing
    page = http.get("/api/v2/models", params={"order_by": "added"}).json()
    listing = page["listing"]  # the values the page was sorted by, per item
    assert [listing[m["key"]]["size"] for m in page["items"]] == [sizes[k] for k in ("k0", "k1", "k2", "k3")]
    added = [datetime.fromisoformat(listing[m["key"]]["added"]) for m in page["items"]]
    assert added == sorted(added) and all(a.tzinfo is not None for a in added)
    assert listing["k3"]["modified"] == listing["k3"]["added"] < listing["k1"]["modified"]  # (renamed last)
