"""A threaded HTTP/1.1 server on 127.0.0.1 run in a background thread, and file serving with Range.

Every test server here is a :class:`BackgroundServer`: ``start()``/``stop()``, a context manager,
``.url`` (``http://127.0.0.1:<port>``), ``.bytes_sent`` (body bytes written, for "how much was
sent again" measurements) and ``.requests`` (a log of what clients asked for).
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
SEND_BLOCK = 4 << 20


@dataclass
class LoggedRequest:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class ServedFile:
    """A file body (on disk or in memory) with its validators."""

    data: bytes | None = None
    path: Path | None = None
    content_type: str = "application/octet-stream"
    disposition: str | None = None
    version: int = 0
    mtime: float = field(default=1_700_000_000.0)
    extra_headers: dict[str, str] = field(default_factory=dict)
    etag_value: str | None = None  # a fixed ETag (e.g. the LFS sha256 a Hugging Face server sends)

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else os.path.getsize(self.path)  # type: ignore[arg-type]

    @property
    def etag(self) -> str:
        if self.etag_value:
            return self.etag_value
        ident = f"{self.path or id(self)}:{self.size}:{self.version}:{self.mtime}"
        return '"' + hashlib.sha1(ident.encode()).hexdigest()[:20] + '"'

    @property
    def last_modified(self) -> str:
        return email.utils.formatdate(self.mtime + self.version, usegmt=True)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    owner: BackgroundServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # clients hanging up mid-body is what the fault tests do on purpose: nothing to report
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, OSError)):
            super().handle_error(request, client_address)


class BaseHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read .requests instead
        pass

    def setup(self) -> None:
        super().setup()
        self.server.owner._connection(+1)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._connection(-1)

    @property
    def owner(self) -> BackgroundServer:
        return self.server.owner

    def _dispatch(self) -> None:
        self.owner._log(LoggedRequest(self.command, self.path, dict(self.headers.items())))
        try:
            self.owner.handle(self)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = _dispatch
    do_HEAD = _dispatch

    # -- helpers for subclasses' handle() --------------------------------------------------
    def send_body(self, status: int, body: bytes, content_type: str = "text/plain",
                  headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            self.owner._count(len(body))

    def send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        import json

        self.send_body(status, json.dumps(obj).encode(), "application/json", headers)

    def send_file(self, f: ServedFile, *, headers: dict[str, str] | None = None, ignore_range: bool = False,
                  drop_after: int | None = None, stall_after: int | None = None, stall_seconds: float = 0,
                  length_delta: int = 0, ignore_if_range: bool = False) -> None:
        """Serve ``f`` honouring Range and If-Range, with optional faults in the body."""
        size = f.size
        start, end, status = 0, size, 200
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if rng and not ignore_range and (not if_range or ignore_if_range or if_range in (f.etag, f.last_modified)):
            m = _RANGE.match(rng.strip())
            if m and (m.group(1) or m.group(2)):
                a, b = m.group(1), m.group(2)
                if a:
                    start, end = int(a), (min(size, int(b) + 1) if b else size)
                else:
                    start, end = max(0, size - int(b)), size
                if start >= size or start >= end:
                    self.send_body(416, b"", headers={"Content-Range": f"bytes */{size}"})
                    return
                status = 206
        self.send_response(status)
        self.send_header("Content-Type", f.content_type)
        self.send_header("Content-Length", str(end - start + length_delta))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f.etag)
        self.send_header("Last-Modified", f.last_modified)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        if f.disposition:
            self.send_header("Content-Disposition", f.disposition)
        for k, v in {**f.extra_headers, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        limit = end
        if drop_after is not None:
            limit = min(end, start + drop_after)
        limit = min(limit, end + min(0, length_delta))
        self._write_range(f, start, limit, stall_after, stall_seconds)
        if limit < end or length_delta > 0:
            self.close_connection = True  # the declared length was not sent: drop the connection
            self.connection.shutdown(2)

    def _write_range(self, f: ServedFile, start: int, end: int, stall_after: int | None,
                     stall_seconds: float) -> None:
        self.owner._sending(+1)
        try:
            self._write_parts(f, start, end, stall_after, stall_seconds)
        finally:
            self.owner._sending(-1)

    def _write_parts(self, f: ServedFile, start: int, end: int, stall_after: int | None,
                     stall_seconds: float) -> None:
        pos = start
        if stall_after is not None:
            mid = min(end, start + stall_after)
            self._write_bytes(f, pos, mid)
            self.owner._stall(stall_seconds)
            pos = mid
        self._write_bytes(f, pos, end)

    def _write_bytes(self, f: ServedFile, start: int, end: int) -> None:
        if start >= end:
            return
        if self.owner.rate is not None:
            self._write_paced(f, start, end, self.owner.rate)
            return
        if f.data is not None:
            view = memoryview(f.data)
            for pos in range(start, end, SEND_BLOCK):
                chunk = view[pos:min(end, pos + SEND_BLOCK)]
                self.wfile.write(chunk)
                self.owner._count(len(chunk))
            return
        assert f.path is not None
        with open(f.path, "rb") as fh:
            pos = start
            while pos < end:
                # sendfile keeps the server from being the bottleneck of a benchmark
                sent = self.connection.sendfile(fh, pos, min(SEND_BLOCK, end - pos))
                if sent == 0:
                    return
                pos += sent
                self.owner._count(sent)

    def _write_paced(self, f: ServedFile, start: int, end: int, rate: int) -> None:
        """At most ``rate`` bytes/s on this response (a far server's per-connection throughput)."""
        began, block = time.monotonic(), max(1, min(SEND_BLOCK, rate // 20))
        for pos in range(start, end, block):
            n = min(end, pos + block) - pos
            if f.data is not None:
                chunk = bytes(memoryview(f.data)[pos:pos + n])
            else:
                assert f.path is not None
                with open(f.path, "rb") as fh:
                    fh.seek(pos)
                    chunk = fh.read(n)
            self.wfile.write(chunk)
            self.owner._count(len(chunk))
            ahead = began + (pos + n - start) / rate - time.monotonic()
            if ahead > 0:
                self.owner._stall(ahead)


class BackgroundServer:
    """Base of the test servers: a ThreadingHTTPServer in a daemon thread."""

    handler_class: type[BaseHandler] = BaseHandler

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.requests: list[LoggedRequest] = []
        self.bytes_sent = 0
        self.open_connections = 0  # client connections this server holds open right now
        self.sending = 0  # response bodies being sent right now
        self.peak_sending = 0  # the most bodies sent at once since the last reset_log()
        self.rate: int | None = None  # bytes/s per response body; None = as fast as it goes
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stalls = threading.Event()  # set on stop(): wakes stalled handlers

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> BackgroundServer:
        if self._server is not None:
            return self
        self._stalls.clear()
        self._server = _Server((self.host, self.port), self.handler_class)
        self._server.owner = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"{type(self).__name__}",
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stalls.set()
        self._server.shutdown()
        self._server.server_close()
        self._server = None

    def __enter__(self) -> Any:
        return self.start()

    def serve_until_interrupted(self) -> None:
        """Start, print the URL, and serve in the foreground until Ctrl-C (the servers' command lines)."""
        self.start()
        print(self.url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            self.stop()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url_on(self, host: str) -> str:
        """The same server under another host name (e.g. ``localhost``): another origin for tokens."""
        return f"http://{host}:{self.port}"

    def reset_log(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_sent = 0
            self.peak_sending = self.sending

    # -- for handlers ------------------------------------------------------------------------
    def handle(self, h: BaseHandler) -> None:
        h.send_body(404, b"not found")

    def _log(self, entry: LoggedRequest) -> None:
        with self._lock:
            self.requests.append(entry)

    def _connection(self, delta: int) -> None:
        with self._lock:
            self.open_connections += delta

    def _sending(self, delta: int) -> None:
        with self._lock:
            self.sending += delta
            self.peak_sending = max(self.peak_sending, self.sending)

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n

    def _stall(self, seconds: float) -> None:
        self._stalls.wait(seconds)
