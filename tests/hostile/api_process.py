"""The API in a process of its own (``python -m uvicorn modelbus.services.api:create_app --factory``, as ``modelbus up``
runs it), so that a test can measure what a request costs it (resident memory, via psutil), and a client
that streams a body far larger than any limit, generated as it is sent, reading the answer as soon as
the server gives one."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from tests.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
PIECE = 1 << 20  # bytes sent per write


@dataclass
class ApiProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def api_process(env: dict[str, str], logs: Path, **settings: str) -> Iterator[ApiProcess]:
    """The API on a free port with ``env`` (the test's modelbus_env) and ``settings`` as its only
    ``MODELBUS_API_*`` variables (whatever the shell exports)."""
    port = _free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("MODELBUS_API_")}
    full.update(env)
    full.update({f"MODELBUS_API_{k.upper()}": v for k, v in settings.items()})
    log = logs / f"api-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "modelbus.services.api:create_app", "--factory",
                                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                cwd=REPO_ROOT, env=full, stdout=out, stderr=subprocess.STDOUT)
    api = ApiProcess(proc, port, log)
    try:
        wait_until(lambda: proc.poll() is None and httpx.get(f"{api.url}/healthz", timeout=5).status_code,
                   240, "the API to answer /healthz", api.log_tail, ignore=(httpx.HTTPError,))
        yield api
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class PeakRss(threading.Thread):
    """Samples a process's resident memory until stopped; ``peak`` is the largest sample."""

    def __init__(self, api: ApiProcess) -> None:
        super().__init__(daemon=True)
        self.api = api
        self.peak = api.rss()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.01):
            try:
                self.peak = max(self.peak, self.api.rss())
            except psutil.Error:
                return

    def __enter__(self) -> PeakRss:  # noqa: PYI034
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.join(5)


@dataclass
class Sent:
    status: int | None  # None: the server closed without an answer
    sent: int           # body bytes the server took before it answered
    head: str           # the response's status line and headers


def send_body(api: ApiProcess, method: str, path: str, total: int, *, chunked: bool = False,
              headers: dict[str, str] | None = None) -> Sent:
    """Send ``total`` bytes of a JSON body (generated piece by piece, never held whole), stopping as soon
    as the server answers or closes; then read its status line."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{api.port}", "Content-Type: application/json"]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=30)
    try:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sent = _stream(sock, total, chunked)
        return _answer(sock, sent)
    finally:
        sock.close()


def _pieces(total: int, chunked: bool) -> Iterator[bytes]:
    prefix = b'{"source": "'
    left = total
    first = True
    while left > 0:
        size = min(PIECE, left)
        data = (prefix + b"a" * (size - len(prefix))) if first else b"a" * size
        first = False
        left -= size
        yield (b"%x\r\n" % len(data) + data + b"\r\n") if chunked else data
    if chunked:
        yield b"0\r\n\r\n"


def _stream(sock: socket.socket, total: int, chunked: bool) -> int:
    sent = 0
    for piece in _pieces(total, chunked):
        view = memoryview(piece)
        while view:
            readable, writable, _ = select.select([sock], [sock], [], 60)
            if readable:  # an answer (or a close) before the body was all sent
                return sent
            if not writable:
                return sent
            try:
                n = sock.send(view)
            except (BrokenPipeError, ConnectionResetError):
                return sent
            sent += n
            view = view[n:]
    return sent


def _answer(sock: socket.socket, sent: int) -> Sent:
    sock.settimeout(300)  # today's code reads the whole body before it answers
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                break
            data += more
    except (ConnectionResetError, TimeoutError):
        pass
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    parts = head.split(" ", 2)
    status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    return Sent(status, sent, head)
