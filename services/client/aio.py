"""AsyncModelBusClient: ModelBusClient for asyncio, generated from it rather than written twice.

Every public method of the sync client becomes a coroutine that runs it in a thread
(``asyncio.to_thread``); ``subscribe`` becomes an async iterator fed by one thread per
subscription, which stops within one blocking read after the iterator is closed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Self

from modelbus.services.client import defaults
from modelbus.services.client.core import ModelBusClient
from modelbus.services.client.modeldata import MODELDATA_METHODS
from modelbus.services.client.subscription import Delivered

# the sync methods exposed as coroutines; everything else stays on ``.sync``
ASYNC_METHODS = (
    "install", "wait", "job", "jobs", "cancel", "list_models", "list_models_page", "listing", "get_model", "add_model",
    "update_model", "rename_model", "delete_model", "history", "load", "unload", "workers", "events", "scan", "sync",
    "queue_lengths", "ping", "rebuild_records", "import_yaml", "close", "quarantined", "quarantine_count",
    "find_model", "models_by_hash", "pause", "resume", "restart", "verify", "prune", "ls_remote", "plan_install",
) + MODELDATA_METHODS

_DONE = object()


def _coroutine(name: str) -> Callable[..., Any]:
    method = getattr(ModelBusClient, name)

    @functools.wraps(method)
    async def call(self: AsyncModelBusClient, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(getattr(self.sync, name), *args, **kwargs)
    return call


class AsyncModelBusClient:
    """The same operations as :class:`ModelBusClient`, awaitable."""

    def __init__(self, config: Any = None, *, client: ModelBusClient | None = None, **kwargs: Any) -> None:
        self.sync = client if client is not None else ModelBusClient(config, **kwargs)

    @property
    def config(self) -> Any:
        return self.sync.config

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.sync.close)

    async def subscribe(self, types: Iterable[str] | None = None, since: str = "$", *,
                        block_ms: int = defaults.SSE_BLOCK_MS, reconnect_timeout: float | None = None,
                        ) -> AsyncIterator[Delivered]:
        """New events as an async iterator (see ModelBusClient.subscribe)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1000)
        stopped = threading.Event()

        def hand_over(item: Any) -> bool:
            """Put ``item`` on the queue, blocking this thread (not the loop) while the consumer is slow;
            False once the consumer has gone."""
            put = queue.put(item)
            try:
                future = asyncio.run_coroutine_threadsafe(put, loop)
            except RuntimeError:  # the loop is closed
                put.close()
                return False
            while not stopped.is_set():
                try:
                    future.result(timeout=0.5)
                    return True
                except concurrent.futures.TimeoutError:
                    continue
            future.cancel()
            return False

        def pump() -> None:
            try:
                for delivered in self.sync.subscribe(types, since, stop=stopped.is_set, block_ms=block_ms,
                                                     reconnect_timeout=reconnect_timeout):
                    if not hand_over(delivered):
                        return
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                hand_over(exc)
                return
            hand_over(_DONE)

        thread = threading.Thread(target=pump, name="modelbus-subscribe", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stopped.set()


for _name in ASYNC_METHODS:
    setattr(AsyncModelBusClient, _name, _coroutine(_name))
