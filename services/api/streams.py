"""Seats for event streams, counted in Redis so that the per-client limit holds for the whole API.

The API may run as several processes on one socket (``MODELBUS_API_WORKERS``); a client's streams land
on any of them, so each process counting its own would let a client hold the limit once per process.
A stream takes a *seat*: a member of the sorted set ``{ns}:api:streams:<client address>`` scored by its
expiry in Redis server time. Taking one is one script (drop lapsed seats, count, add), so two processes
never both take the last seat. The process holding seats renews them every ``SEAT_TTL / 3`` seconds; the
seats of a process that was killed lapse after ``SEAT_TTL`` and free their places by themselves.

When Redis does not answer, the process counts its own streams only (a stream needs Redis anyway to
deliver anything): the limit is then per process until Redis is back.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis

from modelbus.events.errors import Unavailable
from modelbus.events.keys import Keys
from modelbus.events.logs import get_logger

log = get_logger(__name__)

SEAT_TTL = 30.0  # s a seat lives unless its process renews it
RENEW_EVERY = SEAT_TTL / 3

# KEYS[1] the client's set; ARGV limit, seat, ttl ms -> -1 when taken, else how many seats are held
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[1]) then return held end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return -1
"""
# KEYS the clients' sets, ARGV[1] ttl ms, ARGV[2..] the seat in each (a seat that lapsed while Redis was
# away is taken again: its stream is still open)
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
"""


class StreamSeats:
    """One API process's view of the streams its clients hold, on Redis shared by every API process."""

    def __init__(self, connect: Callable[[], redis.Redis], keys: Keys, limit: int) -> None:
        """``connect`` gives the API's Redis connection when a seat is asked for (the API starts without
        Redis; a call that finds it down raises a RedisError or a ModelbusError of kind Unavailable)."""
        self.connect, self.keys, self.limit = connect, keys, limit
        self._mine: dict[str, str] = {}  # seat -> client address
        self._local: Counter[str] = Counter()
        self._renewing: asyncio.Task[None] | None = None
        self._scripts: dict[tuple[int, str], Any] = {}

    async def take(self, client: str) -> tuple[str | None, int]:
        """A seat for one more stream of ``client``: (seat, 0), or (None, streams held) at the limit."""
        if self._local[client] >= self.limit:
            return None, self._local[client]
        seat = uuid.uuid4().hex
        try:
            held = int(await asyncio.to_thread(self._script, _TAKE, [self.keys.api_streams(client)],
                                               [self.limit, seat, int(SEAT_TTL * 1000)]))
        except (redis.RedisError, Unavailable) as exc:  # counted by this process alone until Redis is back
            log.warning("stream_seats_unavailable", error=str(exc))
            held = -1
        if held >= 0:
            return None, held
        self._mine[seat] = client
        self._local[client] += 1
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.create_task(self._renew_while_held())
        return seat, 0

    async def give_back(self, seat: str) -> None:
        client = self._mine.pop(seat, None)
        if client is None:
            return
        self._local[client] -= 1
        if self._local[client] <= 0:
            del self._local[client]
        try:
            await asyncio.to_thread(lambda: self.connect().zrem(self.keys.api_streams(client), seat))
        except (redis.RedisError, Unavailable) as exc:  # the seat lapses by itself
            log.warning("stream_seat_not_returned", error=str(exc))

    async def _renew_while_held(self) -> None:
        while self._mine:
            await asyncio.sleep(RENEW_EVERY)
            seats = list(self._mine.items())
            if not seats:
                return
            try:
                await asyncio.to_thread(self._script, _RENEW, [self.keys.api_streams(c) for _, c in seats],
                                        [int(SEAT_TTL * 1000), *(s for s, _ in seats)])
            except (redis.RedisError, Unavailable) as exc:  # again next round; seats may lapse meanwhile
                log.warning("stream_seats_not_renewed", error=str(exc))

    def _script(self, source: str, keys: list[str], args: list[Any]) -> Any:
        connection = self.connect()
        script = self._scripts.get((id(connection), source))
        if script is None:
            script = self._scripts[(id(connection), source)] = connection.register_script(source)
        return script(keys=keys, args=args)
