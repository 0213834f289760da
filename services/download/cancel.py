"""Stopping a running download from another thread within a second.

Setting a flag is not enough: a thread blocked in ``recv`` on a stalled server only looks at the
flag when the read timeout fires (the stall timeout, tens of seconds). So the streams a download
reads are registered here, and stopping shuts their sockets down, which wakes the blocked read
at once. Children let one file's parallel ranges stop together when one of them fails.

Guards (:meth:`Cancellation.guard`) are checks that must pass before every write, such as the job's
lease (workers.lease): a guard raises to stop the writer, or blocks until writing is safe again.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import httpx

from .errors import DownloadCancelled

StopReason = Literal["cancel", "pause", "abort"]


class Cancellation:
    def __init__(self, parent: Cancellation | None = None) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._children: list[Cancellation] = []
        self._guards: list[Callable[[], None]] = []
        self.reason: StopReason | None = None
        self._parent = parent
        if parent is not None:
            with parent._lock:
                parent._children.append(self)
            if parent.stopped:
                self.stop(parent.reason or "cancel")

    @property
    def stopped(self) -> bool:
        return self._event.is_set()

    def stop(self, reason: StopReason = "cancel") -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
            self._event.set()
            sockets = list(self._sockets)
            children = list(self._children)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its reader: nothing left to wake
        for child in children:
            child.stop(reason)

    def guard(self, check: Callable[[], None]) -> None:
        """Run ``check`` before every write of this cancellation's downloads (and its children's)."""
        self._guards.append(check)

    def fence(self) -> None:
        """The guards only (no cancel check): what a write that must happen even on a pause calls."""
        for check in self._guards:
            check()
        if self._parent is not None:
            self._parent.fence()

    def check(self) -> None:
        if self._event.is_set():
            raise DownloadCancelled(self.reason or "cancel")
        self.fence()

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds`` unless stopped first (then raise DownloadCancelled)."""
        if self._event.wait(max(0.0, seconds)):
            raise DownloadCancelled(self.reason or "cancel")

    @contextmanager
    def watching(self, response: httpx.Response) -> Iterator[None]:
        """Register the socket under ``response`` so that :meth:`stop` can wake a blocked read."""
        sock = _socket_of(response)
        if sock is not None:
            with self._lock:
                self._sockets.add(sock)
        try:
            if self._event.is_set():
                raise DownloadCancelled(self.reason or "cancel")
            yield
        finally:
            if sock is not None:
                with self._lock:
                    self._sockets.discard(sock)


def _socket_of(response: httpx.Response) -> socket.socket | None:
    stream = response.extensions.get("network_stream")
    if stream is None:
        return None
    sock = stream.get_extra_info("socket")
    return sock if isinstance(sock, socket.socket) else None
