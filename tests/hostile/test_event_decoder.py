"""Malformed entries in the event log: the decoder refuses each with EventDecodeError (never another
exception), and every reader reports and skips them and carries on with the valid events around them.

The entries are written with a raw XADD, as a buggy or hostile client with access to Redis would."""

from __future__ import annotations

import threading
import time
from typing import Any

import orjson
import redis
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelbus.events.codec import decode, encode
from modelbus.events.errors import EventDecodeError
from modelbus.events.projection import ProjectionRunner
from modelbus.events.schema import EVENT_TYPES, Event, InstallFailed, ModelAdded, ModelRenamed
from modelbus.events.store import RedisEventStore, StoredEvent
from tests.record_configs import record_config

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
NAMES = ("type", "v", "agg", "ver", "time", "corr", "id", "body")

# --- the decoder, fuzzed -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
raw_values = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=40).map(str.encode),
    st.sampled_from([b"", b"0", b"-1", b"1", b"2", b"999999999999999999999999", b"1e3", b"nan", b"\xff\xfe",
                     b"9" * 5000, b"2024-01-01T00:00:00+00:00", b"2024-13-45T99:99:99", b"null", b"[]",
                     b"{}", b'{"config": {}}', b'"str"', b"[" * 2000, b"ModelAdded", b"Activity"]),
    json_values.map(orjson.dumps),
)


def _valid_fields(event: Event) -> dict[bytes, bytes]:
    fields = {k.encode(): v for k, v in encode(event).items()}
    fields[b"ver"] = b"1"
    return fields


@st.composite
def mutated_entries(draw: st.DrawFn) -> dict[Any, Any]:
    """A valid entry with fields dropped, replaced, or added; or an entry made from scratch."""
    base = draw(st.sampled_from([
        ModelAdded(aggregate_id="k", config={"name": "x"}),
        ModelRenamed(aggregate_id="k", old_name="a", new_name="b"),
        InstallFailed(aggregate_id="j", error_type="E", error="boom"),
    ]))
    fields: dict[Any, Any] = _valid_fields(base)
    if draw(st.booleans()):
        fields = {}
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=4)):
        fields.pop(name.encode(), None)
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=4)):
        fields[name.encode()] = draw(raw_values)
    if draw(st.booleans()):
        fields[b"type"] = draw(st.sampled_from(sorted(EVENT_TYPES)).map(str.encode))
    if draw(st.booleans()):
        fields[b"body"] = orjson.dumps(draw(st.dictionaries(st.text(max_size=12), json_values, max_size=5)))
    extra = draw(st.dictionaries(st.binary(max_size=8), raw_values, max_size=3))
    fields.update(extra)
    if draw(st.booleans()):  # redis-py with decode_responses=True hands out str, not bytes
        fields = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}
    return fields


@FUZZ
@given(fields=mutated_entries())
def test_decoder_raises_only_event_decode_error(fields: dict[Any, Any]) -> None:
    try:
        event = decode("1-0", fields)
    except EventDecodeError as exc:
        assert exc.position == "1-0" and exc.reason
    else:
        assert isinstance(event, Event) and event.type in EVENT_TYPES


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(NAMES).map(str.encode) | st.binary(max_size=6), raw_values,
                              max_size=10))
def test_decoder_on_random_field_sets(fields: dict[bytes, bytes]) -> None:
    try:
        decode("7-3", fields)
    except EventDecodeError as exc:
        assert "7-3" in str(exc)


def test_a_valid_entry_still_decodes() -> None:
    event = ModelAdded(aggregate_id="k", config={"name": "x"})
    assert decode("1-0", _valid_fields(event)).config == {"name": "x"}  # type: ignore[attr-defined]


# --- readers facing injected entries -------------------------------------------------------------

MALFORMED: list[dict[str, Any]] = [
    {"type": "NoSuchEvent", "v": "1", "agg": "x", "time": "2024-01-01T00:00:00+00:00", "id": "e", "body": "{}"},
    {"type": "ModelAdded", "v": "99", "agg": "x", "time": "2024-01-01T00:00:00+00:00", "id": "e", "body": "{}"},
    {"type": "ModelAdded", "v": "1", "agg": "x", "time": "2024-01-01T00:00:00+00:00", "id": "e",
     "body": "{not json"},
    {"type": "ModelAdded", "v": "1", "agg": "x", "time": "yesterday", "id": "e", "body": '{"config": {}}'},
    {"type": "ModelAdded", "v": "one"},
    {"garbage": b"\xff\xfe\x00"},
    {"type": "ModelAdded", "v": "1", "agg": "x", "time": "2024-01-01T00:00:00+00:00", "id": "e",
     "body": '{"config": "not a dict"}'},
    {"type": "ModelAdded", "v": "1", "agg": "x", "time": "2024-01-01T00:00:00+00:00", "id": "e",
     "body": "[1, 2]"},
]


def _inject(client: redis.Redis, key: str, entries: list[dict[str, Any]]) -> list[str]:
    return [client.xadd(key, e).decode() for e in entries]  # type: ignore[union-attr]


def _interleave(store: RedisEventStore, client: redis.Redis) -> tuple[list[str], list[str]]:
    """Valid appends with malformed entries between them; (valid positions, malformed positions)."""
    valid, bad = [], []
    for n, entry in enumerate(MALFORMED):
        valid += store.append([ModelAdded(aggregate_id=f"m{n}", config=record_config(f"m{n}"))]).positions
        bad += _inject(client, store.keys.events, [entry])
    valid += store.append([ModelAdded(aggregate_id="last", config=record_config("last"))]).positions
    return valid, bad


def test_readers_skip_and_report_injected_entries(event_store: RedisEventStore) -> None:
    client = redis.Redis.from_url(event_store.url or "")
    valid, bad = _interleave(event_store, client)
    with structlog.testing.capture_logs() as logs:
        read = [s.position for s in event_store.read_all()]
    skipped = [entry["position"] for entry in logs if entry["event"] == "event_skipped"]
    print(f"\ninjected {len(bad)} malformed entries among {len(valid)} events; read_all returned "
          f"{len(read)}, reported {len(skipped)} skipped")
    assert read == valid
    assert skipped == bad and all(entry["reason"] for entry in logs if entry["event"] == "event_skipped")

    # a blocking subscriber from the start sees the same valid events, in order, then ends on request
    seen: list[str] = []
    for stored in event_store.subscribe(since="0-0", block_ms=100, stop=lambda: len(seen) >= len(valid)):
        seen.append(stored.position)
    assert seen == valid

    # a consumer group hands out the valid ones (the bad ones are never delivered, so never acked)
    event_store.ensure_group("g", start="0")
    got = event_store.read_group("g", "c1", count=1000)
    assert [s.position for s in got] == valid


def test_projection_and_record_service_carry_on_past_injected_entries(app_config: Any,
                                                                      event_store: RedisEventStore) -> None:
    from modelbus.services.records import ModelRecordServiceSQL

    client = redis.Redis.from_url(event_store.url or "")
    service = ModelRecordServiceSQL.from_db_file(app_config.root / "records.db", event_store, config=app_config)
    try:
        service.add_model("k1", _config("one"))
        _inject(client, event_store.keys.events, MALFORMED)
        service.add_model("k2", _config("two"))
        _inject(client, event_store.keys.events, MALFORMED[:3])
        service.rename_model("k1", "uno")
        assert sorted(m.name for m in service.all_models()) == ["two", "uno"]
        service.rebuild()
        assert sorted(m.name for m in service.all_models()) == ["two", "uno"]
        print(f"\nrecord service: {len(MALFORMED) + 3} malformed "
              "entries skipped; 2 models, 1 rename survived a rebuild")
    finally:
        service.close()


def _config(name: str) -> dict[str, Any]:
    return {"name": name, "model_type": "lora", "model_format": "lycoris", "base_model": "sd-1",
            "path": f"sd-1/lora/{name}.safetensors"}


# --- found by these tests: a long run of malformed entries hides the events after it -------------


class _Collect:
    def __init__(self) -> None:
        self.rows: list[StoredEvent] = []

    def checkpoint(self) -> str:
        return self.rows[-1].position if self.rows else "0-0"

    def apply(self, batch: Any) -> None:
        self.rows += list(batch)

    def reset(self) -> None:
        self.rows = []


def test_a_batch_of_malformed_entries_does_not_end_the_log(event_store: RedisEventStore) -> None:
    from modelbus.events import defaults

    client = redis.Redis.from_url(event_store.url or "")
    first = event_store.append([ModelAdded(aggregate_id="a", config=record_config("a"))]).positions
    pipe = client.pipeline(transaction=False)
    for _ in range(defaults.READ_BATCH + 10):
        pipe.xadd(event_store.keys.events, {"type": "Bogus", "v": "1"})
    pipe.execute()
    after = event_store.append([ModelAdded(aggregate_id="b", config=record_config("b"))]).positions
    projection = _Collect()
    ProjectionRunner(event_store, projection).catch_up()
    read = [s.position for s in event_store.read_all()]
    print(f"\n{defaults.READ_BATCH + 10} malformed entries in a row: read_all saw {len(read)} of 2 events")
    assert read == first + after
    assert [s.position for s in projection.rows] == first + after


def test_a_malformed_tail_does_not_make_subscribers_spin(event_store: RedisEventStore) -> None:
    client = redis.Redis.from_url(event_store.url or "")
    start = event_store.append([ModelAdded(aggregate_id="a", config=record_config("a"))]).positions[0]
    _inject(client, event_store.keys.events, MALFORMED[:1])

    def xreads() -> int:
        return int(client.info("commandstats").get("cmdstat_xread", {}).get("calls", 0))

    before = xreads()
    stop_at = threading.Event()
    timer = threading.Timer(1.0, stop_at.set)
    timer.start()
    got = list(event_store.subscribe(since=start, block_ms=250, stop=stop_at.is_set))
    calls = xreads() - before
    print(f"\nsubscriber parked on a malformed tail for 1 s with block_ms=250: {calls} XREAD calls")
    assert got == []
    # a blocking reader makes about 4 calls here; hundreds means it never blocked (other tests'
    # subscribers share this Redis, hence the generous bound: this counts calls, not time)
    assert calls < 100


def test_subscriber_gets_past_a_long_run_of_malformed_entries(event_store: RedisEventStore) -> None:
    from modelbus.events import defaults

    client = redis.Redis.from_url(event_store.url or "")
    start = event_store.append([ModelAdded(aggregate_id="a", config=record_config("a"))]).positions[0]
    pipe = client.pipeline(transaction=False)
    for _ in range(defaults.READ_BATCH + 10):
        pipe.xadd(event_store.keys.events, {"type": "Bogus", "v": "1"})
    pipe.execute()
    wanted = event_store.append([ModelAdded(aggregate_id="b", config=record_config("b"))]).positions
    deadline = time.monotonic() + 3
    got = [s.position for s in event_store.subscribe(
        since=start, block_ms=100, stop=lambda: time.monotonic() > deadline)][:1]
    assert got == wanted
