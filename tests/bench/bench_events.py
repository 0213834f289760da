"""Event store throughput and latency against raw redis-py in the same run."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import orjson
import redis

from modelbus.events.schema import ModelAdded
from modelbus.events.store import RedisEventStore
from tests.bench.common import bench_redis, percentiles, rate, ratio_line, scale

CONFIG = {"name": "bench", "path": "/models/x.safetensors", "base_model": "sd-1", "model_type": "lora",
          "model_format": "lycoris", "hash": "blake3:" + "0" * 64, "tags": ["a", "b"]}


def main() -> None:
    with bench_redis() as url:
        raw = redis.Redis.from_url(url)
        print(f"redis-py parser: {'hiredis' if redis.utils.HIREDIS_AVAILABLE else 'python'}")
        n = scale(5000)
        store = RedisEventStore.from_url(url, f"bench-{uuid.uuid4().hex[:6]}")
        events = [ModelAdded(aggregate_id=f"m{i}", config={**CONFIG, "key": f"m{i}"}) for i in range(n)]
        body = orjson.dumps(CONFIG)

        def ours_single() -> None:
            for e in events:
                store.append([e], expected_version=0)

        def raw_single() -> None:
            for i in range(n):
                raw.xadd("bench:raw", {"type": "ModelAdded", "agg": f"m{i}", "body": body})

        ratio_line("single appends/s (Lua) vs raw XADD", rate(n, ours_single), rate(n, raw_single), "ev/s", ">= 0.5x")

        batch = 100
        store2 = RedisEventStore.from_url(url, f"bench-{uuid.uuid4().hex[:6]}")
        groups = [[ModelAdded(aggregate_id=f"b{g}", config={**CONFIG, "key": f"b{g}"}) for _ in range(batch)]
                  for g in range(n // batch)]

        def ours_batched() -> None:
            for group in groups:
                store2.append(group)

        def raw_pipelined() -> None:
            for g in range(n // batch):
                pipe = raw.pipeline(transaction=False)
                for _ in range(batch):
                    pipe.xadd("bench:raw2", {"type": "ModelAdded", "agg": f"b{g}", "body": body})
                pipe.execute()

        ratio_line(f"batched appends/s ({batch}/call) vs pipelined XADD", rate(n, ours_batched),
                   rate(n, raw_pipelined), "ev/s", ">= 0.5x")

        count = {"n": 0}

        def ours_replay() -> None:
            for _ in store.read_all():
                count["n"] += 1

        def raw_replay() -> None:
            last = "-"
            while True:
                entries = raw.xrange("bench:raw", min=last if last == "-" else f"({last}", count=1000)
                if not entries:
                    return
                for _, fields in entries:
                    orjson.loads(fields[b"body"])
                last = entries[-1][0].decode()

        ratio_line("replay into a projection vs XRANGE+orjson", rate(n, ours_replay), rate(n, raw_replay),
                   "ev/s", ">= 0.5x")

        samples: list[float] = []
        sent: dict[str, float] = {}
        ready = threading.Event()
        stop = threading.Event()
        rounds = scale(500)

        def subscriber() -> None:
            ready.set()
            for stored in store.subscribe(since="$", block_ms=100, stop=stop.is_set):
                samples.append(time.perf_counter() - sent[stored.event.aggregate_id])
                if len(samples) >= rounds:
                    stop.set()

        thread = threading.Thread(target=subscriber)
        thread.start()
        ready.wait()
        time.sleep(0.3)
        for i in range(rounds):
            key = f"lat{i}"
            sent[key] = time.perf_counter()
            store.append([ModelAdded(aggregate_id=key, config={**CONFIG, "key": key})])
            time.sleep(0.002)
        thread.join(timeout=30)
        p50, p99 = percentiles(samples)
        print(f"{'append-to-subscriber latency':<48} p50 {p50 * 1000:.3f} ms  p99 {p99 * 1000:.3f} ms  (goal p50 < 2 ms)")


if __name__ == "__main__":
    main()
