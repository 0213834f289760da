"""A file server with Range, ETag/Last-Modified and fault injection.

    with FileServer() as srv:
        url = srv.add_file("model.safetensors", data)
        srv.set_fault("model.safetensors", Fault(drop_after=1000, times=1))
        srv.add_redirect("old.bin", other_server.url + "/model.safetensors")

Faults (each applies to the next ``times`` requests of the path, or always when ``times`` is None):
``status`` (e.g. 500, or 503 with ``retry_after``), ``drop_after`` (close after N body bytes),
``stall_after``/``stall_seconds`` (pause mid-body), ``length_delta`` (declare a wrong
Content-Length), ``ignore_range`` (answer 200 to ranges), ``html_login`` (a 200 HTML login page).
Server-wide: ``require_token`` (401 without ``Authorization: Bearer <token>``) and
``reject_authorization`` (400 to any request that carries Authorization, as presigned-URL hosts do).

CLI: ``python -m tests.servers file DIR [--port N]`` serves the files of DIR.
"""

from __future__ import annotations

import argparse
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .base import BackgroundServer, BaseHandler, ServedFile

LOGIN_PAGE = b"<!DOCTYPE html><html><head><title>Log in</title></head><body>Please log in</body></html>"


@dataclass
class Fault:
    status: int | None = None
    retry_after: str | None = None
    drop_after: int | None = None
    stall_after: int | None = None
    stall_seconds: float = 5.0
    length_delta: int = 0
    ignore_range: bool = False
    ignore_if_range: bool = False  # serve the Range asked for even when If-Range no longer matches
    html_login: bool = False
    times: int | None = 1


class Faults:
    """Faults by key (a path, or what a server names a file by), each taken by the next ``times`` requests."""

    def __init__(self) -> None:
        self._faults: dict[object, Fault] = {}
        self._lock = threading.Lock()

    def set(self, key: object, fault: Fault | None) -> None:
        with self._lock:
            if fault is None:
                self._faults.pop(key, None)
            else:
                self._faults[key] = fault

    def take(self, key: object) -> Fault | None:
        with self._lock:
            fault = self._faults.get(key)
            if fault is None:
                return None
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self._faults[key]
            return fault


class FileServer(BackgroundServer):
    def __init__(self, root: Path | None = None, host: str = "127.0.0.1", port: int = 0,
                 require_token: str | None = None, reject_authorization: bool = False) -> None:
        super().__init__(host, port)
        self.files: dict[str, ServedFile] = {}
        self.redirects: dict[str, tuple[str, int]] = {}
        self.faults = Faults()
        self.require_token = require_token
        self.reject_authorization = reject_authorization
        self._flock = threading.Lock()
        if root is not None:
            for path in sorted(Path(root).rglob("*")):
                if path.is_file():
                    self.add_file(path.relative_to(root).as_posix(), path)

    # -- content -----------------------------------------------------------------------------
    def add_file(self, name: str, content: bytes | Path, *, content_type: str = "application/octet-stream",
                 disposition: str | None = None, headers: dict[str, str] | None = None) -> str:
        """Serve ``content`` at ``/<name>``; returns its URL."""
        name = name.lstrip("/")
        served = ServedFile(data=content if isinstance(content, bytes) else None,
                            path=None if isinstance(content, bytes) else Path(content),
                            content_type=content_type, disposition=disposition,
                            extra_headers=dict(headers or {}))
        with self._flock:
            old = self.files.get(name)
            if old is not None:
                served.version = old.version + 1  # new validators: ETag and Last-Modified change
            self.files[name] = served
        return self.url_for(name)

    def add_redirect(self, name: str, target: str, status: int = 302) -> str:
        """``/<name>`` answers ``status`` with Location ``target`` (absolute, or a path here)."""
        self.redirects[name.lstrip("/")] = (target, status)
        return self.url_for(name)

    def set_fault(self, name: str, fault: Fault | None) -> None:
        self.faults.set(name.lstrip("/"), fault)

    def url_for(self, name: str) -> str:
        return f"{self.url}/{name.lstrip('/')}"

    def _take_fault(self, name: str) -> Fault | None:
        return self.faults.take(name)

    # -- serving -----------------------------------------------------------------------------
    def handle(self, h: BaseHandler) -> None:
        name = unquote(urlsplit(h.path).path).lstrip("/")
        if name == "__stats":  # for benchmarks that run the server in another process
            h.send_json(200, {"bytes_sent": self.bytes_sent, "requests": len(self.requests)})
            return
        if name == "__reset":
            self.reset_log()
            h.send_json(200, {"ok": True})
            return
        auth = h.headers.get("Authorization")
        if self.reject_authorization and auth:
            h.send_body(400, b"this host does not accept an Authorization header")
            return
        if self.require_token and auth != f"Bearer {self.require_token}":
            h.send_body(401, b'{"error": "unauthorized"}', "application/json")
            return
        if name in self.redirects:
            target, status = self.redirects[name]
            h.send_body(status, b"", headers={"Location": target})
            return
        served = self.files.get(name)
        if served is None:
            h.send_body(404, b"not found")
            return
        fault = self._take_fault(name)
        if fault is not None and fault.html_login:
            h.send_body(200, LOGIN_PAGE, "text/html; charset=utf-8")
            return
        if fault is not None and fault.status is not None:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            h.send_body(fault.status, b"server error", headers=headers)
            return
        f = fault or Fault()
        h.send_file(served, ignore_range=f.ignore_range, drop_after=f.drop_after, stall_after=f.stall_after,
                    stall_seconds=f.stall_seconds, length_delta=f.length_delta, ignore_if_range=f.ignore_if_range)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="serve a folder over HTTP with Range and ETag")
    parser.add_argument("root", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    FileServer(args.root, args.host, args.port).serve_until_interrupted()


if __name__ == "__main__":
    main()
