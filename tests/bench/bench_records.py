"""Record service speed against raw Redis/SQLite baselines measured in the same run.

    get_model p50 (goal < 50 us)                  vs a raw SQLite primary-key SELECT + JSON parse
    search_by_name over 10,000 models (< 5 ms)    vs the raw indexed SELECT
    add_model/s (>= 0.4x)                         vs raw single XADDs
    rebuild of 100,000 events into SQLite (>= 0.3x) vs raw XRANGE batches + orjson.loads

MODELBUS_BENCH_SCALE scales every count (the defaults keep the run near a minute on 2 cores).
"""

from __future__ import annotations

import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import orjson
import redis

from modelbus.events.codec import encode, encode_body
from modelbus.events.logs import configure_logging
from modelbus.events.schema import ModelAdded, ModelRenamed, ModelUpdated
from modelbus.events.scripts import APPEND
from modelbus.events.store import InMemoryEventStore, RedisEventStore
from modelbus.services.config import AppConfig
from modelbus.services.records import ModelRecordServiceSQL
from tests.bench.common import bench_redis, paired_rates, percentiles, rate, ratio_line, scale


def _config(i: int) -> dict[str, object]:
    return {"key": f"k{i}", "hash": f"k{i}", "name": f"model-{i % 2500}", "model_type": "lora",
            "model_format": "lycoris", "base_model": ("sd-1", "sdxl")[i % 2], "path": f"/models/m{i}.safetensors",
            "tags": ["bench", f"t{i % 7}"], "compatible_bases": ["sd-2"] if i % 2 == 0 else []}


def _bulk_log(client: redis.Redis, stream: str, n_events: int) -> int:
    """Write ``n_events`` model events straight into a stream (4 per model: add, update, rename, update)."""
    pipe = client.pipeline(transaction=False)
    written = 0
    for i in range(n_events // 4):
        config = _config(i)
        key = str(config["key"])
        renamed = {**config, "name": f"renamed-{i}"}
        events = [ModelAdded(aggregate_id=key, config=config),
                  ModelUpdated(aggregate_id=key, changes={"description": "d"}, config={**config, "description": "d"}),
                  ModelRenamed(aggregate_id=key, old_name=str(config["name"]), new_name=f"renamed-{i}"),
                  ModelUpdated(aggregate_id=key, changes={"author": "a"}, config={**renamed, "description": "d",
                                                                                "author": "a"})]
        for version, event in enumerate(events, 1):
            pipe.xadd(stream, {**encode(event), "ver": str(version).encode()})  # type: ignore[dict-item]
            written += 1
        if len(pipe) >= 2000:
            pipe.execute()
    pipe.execute()
    return written


def bench_reads(url: str, root: Path, config: AppConfig) -> None:
    n_models = scale(10_000)
    store = RedisEventStore.from_url(url, f"bench-r-{uuid.uuid4().hex[:6]}")
    _bulk_log(store.client, store.keys.events, n_models * 4)
    service = ModelRecordServiceSQL.from_db_file(root / "reads.db", store, config=config)
    assert service.projection.count() == n_models
    conn = sqlite3.connect(root / "reads.db")
    keys = [f"k{i}" for i in range(0, n_models, max(1, n_models // 2000))]

    def timed(fn, args) -> list[float]:  # type: ignore[no-untyped-def]
        samples = []
        for a in args:
            t = time.perf_counter()
            fn(a)
            samples.append(time.perf_counter() - t)
        return samples

    for k in keys[:200]:
        service.get_model(k)  # warm the cache as a long-running server would
    ours, _ = percentiles(timed(service.get_model, keys))
    raw, _ = percentiles(timed(lambda k: orjson.loads(conn.execute(
        "SELECT config FROM model_records WHERE key = ?", (k,)).fetchone()[0]), keys))
    ratio_line("get_model p50 (us, catch-up on Redis) vs raw SELECT", ours * 1e6, raw * 1e6, "us",
               "< 50 us", higher_is_better=False)
    projection_only, _ = percentiles(timed(service.projection.get, keys))
    ratio_line("  projection lookup only, p50 (us) vs raw SELECT", projection_only * 1e6, raw * 1e6, "us",
               higher_is_better=False)
    head_only, _ = percentiles(timed(lambda _: store.read(service.projection.checkpoint(), count=1), keys))
    print(f"  of which the catch-up round trip to Redis, p50: {head_only * 1e6:.1f} us")
    service.read_staleness = 1.0  # opt-in: reads may lag other processes by up to 1 s (never our own writes)
    relaxed, _ = percentiles(timed(service.get_model, keys))
    service.read_staleness = 0.0
    ratio_line("  get_model p50 with read_staleness=1s vs raw SELECT", relaxed * 1e6, raw * 1e6, "us",
               "< 50 us", higher_is_better=False)

    names = [f"renamed-{i}" for i in range(0, n_models, max(1, n_models // 500))]
    ours, _ = percentiles(timed(service.search_by_name, names))
    raw, _ = percentiles(timed(lambda n: [orjson.loads(r[0]) for r in conn.execute(
        "SELECT config FROM model_records WHERE name = ?", (n,))], names))
    ratio_line(f"search_by_name over {n_models} models p50 (us) vs raw SELECT", ours * 1e6, raw * 1e6, "us",
               "< 5 ms", higher_is_better=False)
    ours, _ = percentiles(timed(lambda b: service.search_by_name(f"renamed-{b}", base_model="sd-2"), range(200)))
    print(f"  search_by_name(name, base_model=compatible base) p50: {ours * 1e3:.3f} ms")
    service.close()


def bench_writes(url: str, root: Path, config: AppConfig) -> None:
    n, rounds = scale(2000), 5
    per_round = max(1, n // rounds)
    store = RedisEventStore.from_url(url, f"bench-w-{uuid.uuid4().hex[:6]}")
    service = ModelRecordServiceSQL.from_db_file(root / "writes.db", store, config=config)
    configs = [_config(i) for i in range(per_round * rounds)]

    cpu: dict[str, list[float]] = {"ours": [], "raw": []}  # this process's CPU per call, by round

    def ours(round_: int) -> None:
        started = time.process_time()
        for c in configs[round_ * per_round:(round_ + 1) * per_round]:
            service.add_model(str(c["key"]), c)
        cpu["ours"].append((time.process_time() - started) / per_round)

    body = orjson.dumps(configs[0])
    raw = redis.Redis.from_url(url)

    def baseline(round_: int) -> None:
        started = time.process_time()
        for i in range(round_ * per_round, (round_ + 1) * per_round):
            raw.xadd("bench:raw-add", {"type": "ModelAdded", "agg": f"k{i}", "body": body})
        cpu["raw"].append((time.process_time() - started) / per_round)

    mine, theirs = paired_rates((per_round, per_round), ours, baseline, rounds)
    ratio_line(f"add_model/s (SQLite projection) vs raw XADD, median of {rounds}", mine, theirs, "ops/s", ">= 0.4x")
    print(f"  client CPU per call, medians: add_model {statistics.median(cpu['ours']) * 1e6:.0f} us, raw XADD "
          f"{statistics.median(cpu['raw']) * 1e6:.0f} us (a busy machine moves these far less than the rates)")
    # the floor of the design: the append script alone (one EVALSHA, the events built beforehand)
    events = [ModelAdded(aggregate_id=str(c["key"]), config=c) for c in configs]
    floor = RedisEventStore.from_url(url, f"bench-f-{uuid.uuid4().hex[:6]}")

    def script_only(round_: int) -> None:
        for e in events[round_ * per_round:(round_ + 1) * per_round]:
            floor.client.execute_command("EVALSHA", floor._append_sha, len(floor._append_keys) + 1, *floor._append_keys,
                                         floor.keys.aggregate_index(e.aggregate_id), e.aggregate_id, 0, e.event_id, 1,
                                         e.type, e.schema_version, e.time.isoformat(), "", e.event_id, encode_body(e),
                                         1, f"path:{e.aggregate_id}", e.aggregate_id, 0)

    floor.client.script_load(APPEND)
    script, theirs = paired_rates((per_round, per_round), script_only, baseline, rounds)
    ratio_line("  the append script alone (EVALSHA) vs raw XADD", script, theirs, "ops/s")
    memory = InMemoryEventStore()
    mem_service = ModelRecordServiceSQL.from_db_file(root / "writes-mem.db", memory, config=config)
    per_s = rate(len(configs), lambda: [mem_service.add_model(str(c["key"]), c) for c in configs])  # type: ignore[func-returns-value]
    print(f"  add_model/s on the in-memory log (no network): {per_s:.0f}")
    service.close()
    mem_service.close()


def bench_rebuild(url: str, root: Path, config: AppConfig) -> None:
    n_events = scale(100_000)
    store = RedisEventStore.from_url(url, f"bench-b-{uuid.uuid4().hex[:6]}")
    _bulk_log(store.client, store.keys.events, n_events)
    client = store.client

    def baseline() -> None:
        after = "-"
        while True:
            entries = client.xrange(store.keys.events, min=after, count=1000)
            if not entries:
                return
            for _, fields in entries:
                orjson.loads(fields[b"body"])
            after = "(" + entries[-1][0].decode()

    service = ModelRecordServiceSQL.from_db_file(root / "rebuild.db", store, config=config)  # first replay
    rounds = 3
    ours, theirs = paired_rates((n_events, n_events), lambda _: service.rebuild() and None,
                                lambda _: baseline(), rounds)
    decode_only = rate(n_events, lambda: sum(1 for _ in store.read_all()) and None)
    print(f"  events/s of store.read alone (XRANGE + decoding into Event objects): {decode_only:.0f}")
    assert service.projection.count() == n_events // 4
    ratio_line(f"rebuild {n_events} events into SQLite (ev/s) vs XRANGE+orjson, median of {rounds}", ours, theirs,
               "ev/s", ">= 0.3x")
    service.close()


def main() -> None:
    configure_logging("json", "INFO")  # as a server runs: per-write debug lines filtered out
    root = Path(tempfile.mkdtemp(prefix="modelbus-bench-records-"))
    config = AppConfig.load(root=root)
    print(f"redis-py parser: {'hiredis' if redis.utils.HIREDIS_AVAILABLE else 'python'}")
    with bench_redis() as url:
        bench_reads(url, root, config)
        bench_writes(url, root, config)
        bench_rebuild(url, root, config)


if __name__ == "__main__":
    main()
