"""A worker on several install queues takes the later step of a started install before the first
step of a new one (workers.runner.LISTEN_ORDER)."""

from __future__ import annotations

import redis
from rq import Queue

from modelbus.events.keys import Keys
from modelbus.workers.runner import build_worker


def test_a_queued_hash_step_is_taken_before_a_queued_install(redis_url: str, namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    keys = Keys(namespace)
    install = Queue(keys.queue("install"), connection=client).enqueue("builtins.print", "new install")
    hashing = Queue(keys.queue("hash"), connection=client).enqueue("builtins.print", "started install")
    worker = build_worker(client, namespace, ["install", "download", "hash"], name="order-test")
    assert worker.queue_names() == [keys.queue("hash"), keys.queue("download"), keys.queue("install")]
    taken = Queue.dequeue_any(worker.queues, None, connection=client)
    assert taken is not None and taken[0].id == hashing.id
    assert install.get_status(refresh=True).value == "queued"
