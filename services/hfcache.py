"""The Hugging Face cache the ``hf`` CLI and huggingface_hub keep, read (never changed) by modelbus.

Where it is: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub`` (``HF_HOME``
defaults to ``~/.cache/huggingface``; ``XDG_CACHE_HOME`` moves that). Its layout:
``models--<owner>--<name>/blobs/<etag>`` holds each file once (an LFS file's etag is its sha256),
``snapshots/<commit>/<path>`` are symlinks to those blobs, ``refs/<branch>`` the commit of a branch.

An install of a repo file whose sha256 the cache holds takes the blob from there: a hard link when the
cache is on the same file system, else a copy, and it is checked against the sha256 before it counts
(a blob that does not match is left alone and the file is downloaded). The user's cache is never moved
or written. ``hf auth login``'s token file (``HF_TOKEN_PATH``, else ``HF_HOME/token``) is used when
``HF_TOKEN`` is unset (services.config).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from modelbus.events.logs import get_logger

log = get_logger(__name__)

READ_SIZE = 8 << 20


def hf_home() -> Path:
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface"


def hub_cache() -> Path:
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(cache).expanduser() if cache else hf_home() / "hub"


def token_file() -> Path:
    path = os.environ.get("HF_TOKEN_PATH")
    return Path(path).expanduser() if path else hf_home() / "token"


def read_token() -> str | None:
    """The token ``hf auth login`` saved, or None."""
    try:
        token = token_file().read_text().strip()
    except OSError:
        return None
    return token or None


def repo_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def find_blob(sha256: str, repo_id: str | None = None, cache: Path | None = None) -> Path | None:
    """The cache's blob of an LFS file by its sha256 (in ``repo_id``'s folder first, then any repo's)."""
    cache = cache or hub_cache()
    if not sha256 or not all(c in "0123456789abcdef" for c in sha256.lower()) or not cache.is_dir():
        return None
    candidates = [cache / repo_folder(repo_id) / "blobs" / sha256] if repo_id else []
    candidates += sorted(cache.glob(f"models--*/blobs/{sha256}"))
    return next((c for c in candidates if c.is_file() and not c.is_symlink()), None)


def take_from_cache(sha256: str, size: int | None, dest: Path, repo_id: str | None = None) -> bool:
    """Put the cached blob of ``sha256`` at ``dest`` (hard link, else copy), verified; False when the
    cache does not hold it (or holds something else under its name)."""
    blob = find_blob(sha256, repo_id)
    if blob is None or (size is not None and blob.stat().st_size != size):
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.hfcache")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(blob, tmp)
            how = "hard link"
        except OSError:
            shutil.copyfile(blob, tmp)
            how = "copy"
        if _sha256(tmp) != sha256.lower():
            log.warning("hf_cache_blob_mismatch", blob=str(blob))
            tmp.unlink(missing_ok=True)
            return False
        os.replace(tmp, dest)
    except OSError as exc:
        log.warning("hf_cache_unusable", blob=str(blob), error=str(exc))
        tmp.unlink(missing_ok=True)
        return False
    log.info("hf_cache_hit", blob=str(blob), dest=str(dest), how=how)
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(READ_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def snapshot_repo(path: Path) -> str | None:
    """``owner/name`` (and ``:subfolder``) when ``path`` is inside a cache snapshot, else None."""
    parts = path.absolute().parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots" and "--" in parts[i][8:]:
            repo = parts[i][len("models--"):].replace("--", "/", 1)
            sub = "/".join(parts[i + 3:])
            return repo + (f":{sub}" if sub else "")
    return None


def snapshot_blobs(path: Path) -> Path | None:
    """The ``blobs`` folder the symlinks of a snapshot at or above ``path`` may point into."""
    parts = path.absolute().parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            return Path(*parts[: i + 1]) / "blobs"
    return None


def repo_of_url(url: str) -> str | None:
    """``owner/name`` of a ``.../<owner>/<name>/resolve/<rev>/<path>`` URL, else None."""
    from urllib.parse import urlsplit
    parts = [p for p in urlsplit(url).path.split("/") if p]
    if len(parts) >= 5 and parts[2] == "resolve":
        return f"{parts[0]}/{parts[1]}"
    return None


PUBLIC_HUB = "https://huggingface.co"
_TRUE = ("1", "true", "yes", "on")


#: the public Hub's hosts (the site, its short name, and their subdomains: the LFS and Xet CDNs)
PUBLIC_HOSTS = ("huggingface.co", "hf.co")


def _flag(name: str) -> bool | None:
    value = os.environ.get(name)
    return value.strip().lower() in _TRUE if value is not None and value.strip() else None


def offline(hf_endpoint: str) -> bool:
    """Whether Hugging Face installs must come from the cache alone: ``MODELBUS_HF_OFFLINE`` when set,
    else ``HF_HUB_OFFLINE`` for the public Hub (a mirror configured with MODELBUS_HF_ENDPOINT is the
    operator's own server, which HF_HUB_OFFLINE, set for the libraries, does not forbid)."""
    return offline_reason(hf_endpoint) is not None


def offline_reason(hf_endpoint: str) -> str | None:
    """The variable that makes ``hf_endpoint`` offline (``HF_HUB_OFFLINE=1``, ``MODELBUS_HF_OFFLINE=1``), or None."""
    own = _flag("MODELBUS_HF_OFFLINE")
    if own is not None:
        return "MODELBUS_HF_OFFLINE=1" if own else None
    if _flag("HF_HUB_OFFLINE") and hf_endpoint.rstrip("/") == PUBLIC_HUB:
        return "HF_HUB_OFFLINE=1"
    return None


def _is_public_host(host: str) -> bool:
    host = host.lower().rstrip(".")
    return any(host == h or host.endswith("." + h) for h in PUBLIC_HOSTS)


def offline_for_url(url: str, hf_endpoint: str) -> str | None:
    """The variable that forbids calling ``url`` (any request: downloads, listings, metadata, thumbnails), or
    None: a public Hub host under ``HF_HUB_OFFLINE`` (unless ``MODELBUS_HF_OFFLINE=0``), the public Hub or the
    configured endpoint's host under ``MODELBUS_HF_OFFLINE=1``."""
    from urllib.parse import urlsplit
    host = (urlsplit(url).hostname or "").lower()
    endpoint_host = (urlsplit(hf_endpoint).hostname or "").lower()
    own = _flag("MODELBUS_HF_OFFLINE")
    if own is not None:
        return "MODELBUS_HF_OFFLINE=1" if own and (_is_public_host(host) or host == endpoint_host) else None
    return "HF_HUB_OFFLINE=1" if _flag("HF_HUB_OFFLINE") and _is_public_host(host) else None


def cached_file(url: str, cache: Path | None = None) -> Path | None:
    """The cache's copy of a ``.../<owner>/<name>/resolve/<rev>/<path>`` URL's file, or None."""
    from urllib.parse import unquote, urlsplit
    parts = [unquote(p) for p in urlsplit(url).path.split("/") if p]
    if len(parts) < 5 or parts[2] != "resolve" or any(p in ("", ".", "..") for p in parts):
        return None
    snapshot = cached_snapshot(f"{parts[0]}/{parts[1]}", parts[3], None, cache)
    if snapshot is None:
        return None
    path = snapshot.joinpath(*parts[4:])
    return path if path.is_file() else None


def cached_snapshot(repo_id: str, revision: str, subfolder: str | None, cache: Path | None = None) -> Path | None:
    """The cache's snapshot folder of ``repo_id`` at ``revision`` (a branch or a commit), or None."""
    folder = (cache or hub_cache()) / repo_folder(repo_id)
    commit = revision
    try:
        commit = (folder / "refs" / revision).read_text().strip()
    except OSError:
        pass
    if not commit or "/" in commit or commit.startswith("."):
        return None
    snapshot = folder / "snapshots" / commit
    if subfolder:
        snapshot = snapshot / subfolder
    return snapshot if snapshot.is_dir() else None
