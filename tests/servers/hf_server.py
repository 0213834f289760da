"""A server that speaks the Hugging Face Hub HTTP API for repos made on disk at test time.

    with HFServer() as hub:
        commit = hub.add_repo("acme/tiny-sd", folder)        # every file under folder
        snapshot_download("acme/tiny-sd", endpoint=hub.url)  # the real client works against it

Endpoints: ``/api/models/{repo}[/revision/{rev}]`` (``siblings`` with size and LFS sha256 when
``blobs=true``), ``/api/models/{repo}/tree/{rev}[/{path}]`` (``recursive``), and GET/HEAD
``/{repo}/resolve/{rev}/{path}`` with Range, ``ETag``, ``X-Repo-Commit``, ``X-Linked-Etag`` and
``X-Linked-Size``. Weight files and files over 100 KiB are LFS files, as on the hub.
``set_fault(repo, path, Fault(...))`` makes the next downloads of one file fail (``status``) or stall
(``stall_after``/``stall_seconds``), as the file server's faults do.
CLI: ``python -m tests.servers hf owner/repo=DIR ... [--port N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .base import BackgroundServer, BaseHandler, ServedFile
from .file_server import Fault, Faults

LFS_SUFFIXES = {".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf", ".onnx", ".msgpack", ".h5"}
LFS_MIN_SIZE = 100 << 10


@dataclass
class RepoFileEntry:
    path: str
    disk: Path
    size: int
    blob_id: str  # git blob sha1, as the hub reports it
    sha256: str | None  # set for LFS files


@dataclass
class Repo:
    repo_id: str
    commit: str
    files: dict[str, RepoFileEntry]
    card: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    revisions: set[str] = field(default_factory=lambda: {"main"})


def _git_blob_sha1(data_path: Path, size: int) -> str:
    h = hashlib.sha1(f"blob {size}\0".encode())
    with data_path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


class HFServer(BackgroundServer):
    def __init__(self, host: str = "127.0.0.1", port: int = 0, require_token: str | None = None) -> None:
        super().__init__(host, port)
        self.repos: dict[str, Repo] = {}
        self.require_token = require_token
        self.faults = Faults()  # by (repo id, file path)
        self._rlock = threading.Lock()

    def set_fault(self, repo_id: str, path: str, fault: Fault | None) -> None:
        """The next downloads of ``path`` in ``repo_id`` meet ``fault`` (None: served as they are again)."""
        self.faults.set((repo_id, path), fault)

    def add_repo(self, repo_id: str, folder: Path, *, card: dict[str, Any] | None = None,
                 tags: list[str] | None = None) -> str:
        """Publish every file under ``folder`` as repo ``repo_id`` at revision main; returns the commit."""
        files: dict[str, RepoFileEntry] = {}
        commit_hash = hashlib.sha1(repo_id.encode())
        for disk in sorted(Path(folder).rglob("*")):
            if not disk.is_file():
                continue
            rel = disk.relative_to(folder).as_posix()
            size = disk.stat().st_size
            lfs = disk.suffix.lower() in LFS_SUFFIXES or size >= LFS_MIN_SIZE
            entry = RepoFileEntry(rel, disk, size, _git_blob_sha1(disk, size), _sha256(disk) if lfs else None)
            files[rel] = entry
            commit_hash.update(f"{rel}:{entry.blob_id}".encode())
        repo = Repo(repo_id, commit_hash.hexdigest(), files, dict(card or {}), list(tags or []))
        with self._rlock:
            self.repos[repo_id] = repo
        return repo.commit

    # -- JSON views --------------------------------------------------------------------------
    def _sibling(self, e: RepoFileEntry, blobs: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"rfilename": e.path}
        if blobs:
            out.update(size=e.size, blobId=e.blob_id)
            if e.sha256:
                out["lfs"] = {"sha256": e.sha256, "size": e.size, "pointerSize": 134}
        return out

    def _info(self, repo: Repo, blobs: bool) -> dict[str, Any]:
        author = repo.repo_id.split("/", 1)[0]
        return {
            "_id": repo.commit[:24], "id": repo.repo_id, "modelId": repo.repo_id, "author": author,
            "sha": repo.commit, "lastModified": "2024-01-01T00:00:00.000Z", "private": False,
            "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": repo.tags,
            "cardData": repo.card, "library_name": "diffusers" if "model_index.json" in repo.files else None,
            "siblings": [self._sibling(e, blobs) for e in repo.files.values()],
            "createdAt": "2024-01-01T00:00:00.000Z",
        }

    def _tree(self, repo: Repo, path: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        out: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for e in repo.files.values():
            if not e.path.startswith(prefix):
                continue
            rest = e.path[len(prefix):]
            parts = rest.split("/")
            for i in range(1, len(parts)):
                d = prefix + "/".join(parts[:i])
                if (recursive or i == 1) and d not in dirs:
                    dirs.add(d)
                    out.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0,
                                "path": d})
            if recursive or len(parts) == 1:
                item: dict[str, Any] = {"type": "file", "oid": e.blob_id, "size": e.size, "path": e.path}
                if e.sha256:
                    item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": 134}
                out.append(item)
        return out

    # -- routing -----------------------------------------------------------------------------
    def handle(self, h: BaseHandler) -> None:
        split = urlsplit(h.path)
        path = unquote(split.path)
        query = parse_qs(split.query)
        if self.require_token and h.headers.get("Authorization") != f"Bearer {self.require_token}":
            h.send_json(401, {"error": "Invalid credentials"}, {"X-Error-Code": "RepoNotFound"})
            return
        if path.startswith("/api/models/"):
            self._api(h, path[len("/api/models/"):], query)
        else:
            self._resolve(h, path.lstrip("/"))

    def _find(self, h: BaseHandler, repo_id: str, rev: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            h.send_json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return None
        if rev not in repo.revisions and rev != repo.commit:
            h.send_json(404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"})
            return None
        return repo

    def _api(self, h: BaseHandler, rest: str, query: dict[str, list[str]]) -> None:
        parts = rest.split("/")
        repo_id = "/".join(parts[:2])
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        if len(parts) == 2:
            if (repo := self._find(h, repo_id, "main")) is not None:
                h.send_json(200, self._info(repo, blobs))
        elif len(parts) >= 4 and parts[2] == "revision":
            if (repo := self._find(h, repo_id, "/".join(parts[3:]))) is not None:
                h.send_json(200, self._info(repo, blobs))
        elif len(parts) >= 4 and parts[2] == "tree":
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            if (repo := self._find(h, repo_id, parts[3])) is not None:
                h.send_json(200, self._tree(repo, "/".join(parts[4:]), recursive))
        else:
            h.send_json(404, {"error": "not found"})

    def _resolve(self, h: BaseHandler, rest: str) -> None:
        parts = rest.split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            h.send_json(404, {"error": "not found"}, {"X-Error-Code": "EntryNotFound"})
            return
        repo = self._find(h, "/".join(parts[:2]), parts[3])
        if repo is None:
            return
        entry = repo.files.get("/".join(parts[4:]))
        fault = self.faults.take((repo.repo_id, "/".join(parts[4:])))
        if fault is not None and fault.status is not None:
            h.send_json(fault.status, {"error": "the server is having a bad day"})
            return
        if entry is None:
            h.send_json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            return
        etag = f'"{entry.sha256 or entry.blob_id}"'
        served = ServedFile(path=entry.disk, etag_value=etag, extra_headers={
            "X-Repo-Commit": repo.commit, "X-Linked-Etag": etag, "X-Linked-Size": str(entry.size)})
        f = fault or Fault()
        h.send_file(served, drop_after=f.drop_after, stall_after=f.stall_after, stall_seconds=f.stall_seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="serve folders as Hugging Face repos")
    parser.add_argument("repos", nargs="+", help="owner/repo=DIR")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate", type=int, default=None, help="bytes/s per response body (default: unpaced)")
    args = parser.parse_args(argv)
    server = HFServer(args.host, args.port)
    server.rate = args.rate
    for spec in args.repos:
        repo_id, _, folder = spec.partition("=")
        server.add_repo(repo_id, Path(folder))
    server.serve_until_interrupted()


if __name__ == "__main__":
    main()
