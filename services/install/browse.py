"""Browsing before installing: what a remote source holds, and exactly what an install of it would fetch.

    ls_remote("owner/repo[:sub]", revision=...)  every file under the (sub)folder, sizes, which an install picks
    ls_remote("civitai:<model>[@<version>]")     the model's versions with their files
    plan("owner/repo", {"include": [...]})        the files an install would download, their sizes, and where

Both ask only the Hugging Face / Civitai APIs (no file is downloaded).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from modelbus.services import hfcache
from modelbus.services.config import AppConfig
from modelbus.services.download.civitai import list_versions
from modelbus.services.download.errors import SourceSyntaxError
from modelbus.services.download.huggingface import list_repo
from modelbus.services.download.names import choose_filename
from modelbus.services.download.security import credential_for
from modelbus.services.download.sources import CivitaiSource, HFSource
from modelbus.services.install.errors import InvalidSourceError
from modelbus.services.install.placement import size_of
from modelbus.services.install.sources import LocalPlan, looks_like_path, parse_source_text, resolve

Http = Callable[[], httpx.Client]
WHERE = "models/<base>/<type>/{name} (base and type are identified once the files are here)"


def ls_remote(text: str, config: AppConfig, http: Http, revision: str | None = None,
              access_token: str | None = None) -> dict[str, Any]:
    text = (text or "").strip()
    try:
        source = None if looks_like_path(text) else parse_source_text(text, config, {"revision": revision})
    except SourceSyntaxError as exc:
        raise InvalidSourceError(str(exc)) from exc
    if isinstance(source, HFSource):
        endpoint = config.hf_endpoint
        offline = hfcache.offline_reason(endpoint)
        if offline is not None:
            return _cached_listing(source, offline)
        with http() as client:
            listing = list_repo(client, source, endpoint, credential_for(endpoint, config, access_token),
                                config.allow_private_downloads)
        prefix = f"{source.subfolder}/" if source.subfolder else ""
        chosen = set(listing.chosen)
        files = [{"path": name[len(prefix):], "size": entry.get("size"),
                  "sha256": (entry.get("lfs") or {}).get("sha256"), "chosen": name in chosen}
                 for name, entry in sorted(listing.entries.items()) if name.startswith(prefix)]
        if not files:
            raise InvalidSourceError(f"{source.repo_id}@{source.revision} has no files under {source.subfolder!r}")
        return {"kind": "huggingface", "repo_id": source.repo_id, "subfolder": source.subfolder,
                "revision": source.revision, "commit": listing.commit, "files": files,
                "total_bytes": sum(f["size"] or 0 for f in files),
                "chosen_bytes": sum(f["size"] or 0 for f in files if f["chosen"])}
    if isinstance(source, CivitaiSource):
        if revision is not None:
            raise InvalidSourceError("--revision is for Hugging Face repos; name a Civitai version as civitai:MODEL@VERSION")
        api = config.civitai_api
        with http() as client:
            found = list_versions(client, source, api, credential_for(api, config, access_token),
                                  config.allow_private_downloads)
        return {"kind": "civitai", **found}
    raise InvalidSourceError(f"ls-remote lists a Hugging Face repo (owner/repo[:subfolder]) or a Civitai model "
                             f"(civitai:MODEL[@VERSION]); {text[:200]!r} is neither")


def _cached_listing(source: HFSource, offline: str) -> dict[str, Any]:
    """What the Hugging Face cache holds of ``source`` (offline: no request is made); an install takes all of it."""
    snapshot = hfcache.cached_snapshot(source.repo_id, source.revision, source.subfolder)
    if snapshot is None:
        raise InvalidSourceError(f"{source} (revision {source.revision}) is not in the Hugging Face cache at "
                                 f"{hfcache.hub_cache()}, and {offline} forbids asking Hugging Face")
    files: list[dict[str, Any]] = []
    total = 0
    for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        target = path.resolve()  # a snapshot's entries link to blobs named by their etag (an LFS file's sha256)
        sha256 = target.name if len(target.name) == 64 and all(c in "0123456789abcdef" for c in target.name) else None
        size = path.stat().st_size
        total += size
        files.append({"path": path.relative_to(snapshot).as_posix(), "size": size, "sha256": sha256, "chosen": True})
    if not files:
        raise InvalidSourceError(f"{source.repo_id}@{source.revision} has no files under {source.subfolder!r} in "
                                 f"the Hugging Face cache at {hfcache.hub_cache()}")
    commit = snapshot.relative_to(hfcache.hub_cache() / hfcache.repo_folder(source.repo_id) / "snapshots").parts[0]
    return {"kind": "huggingface", "repo_id": source.repo_id, "subfolder": source.subfolder,
            "revision": source.revision, "commit": commit, "files": files, "total_bytes": total,
            "chosen_bytes": total, "offline": True}


def plan(text: str, config: AppConfig, options: dict[str, Any], http: Http, access_token: str | None = None,
         roots: bool = True) -> dict[str, Any]:
    """What an install of ``text`` with ``options`` would download, and where it would go (``roots=False``: a
    local path outside the import roots is the caller's own, handed over at the install)."""
    local = looks_like_path(text.strip()) and not roots
    resolved = LocalPlan(Path(text.strip()).expanduser().resolve()) if local else resolve(
        text, config, options, http, access_token)
    if isinstance(resolved, LocalPlan):
        path = resolved.path
        return {"source": text, "files": [{"path": path.name, "size": size_of(path), "url": None}],
                "total_bytes": size_of(path), "folder": None,
                "destination": str(path) if options.get("inplace") else WHERE.format(name=path.name)}
    files = [{"path": f.name or _url_name(f.url), "size": f.size, "url": f.url, "sha256": f.sha256}
             for f in resolved.files]
    name = resolved.folder or files[0]["path"]
    return {"source": text, "files": files, "total_bytes": resolved.total_bytes, "folder": resolved.folder,
            "destination": WHERE.format(name=name)}


def _url_name(url: str) -> str:
    return choose_filename(None, url)  # (the server's Content-Disposition may name it otherwise)
