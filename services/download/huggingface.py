"""Hugging Face repos: list files (with sizes and LFS sha256), choose which to fetch, build URLs.

The list comes from ``GET {endpoint}/api/models/{repo}/revision/{rev}?blobs=true`` (the tree
endpoint when sizes are missing). Files are fetched from ``/{repo}/resolve/{commit}/{path}`` at
the resolved commit, so that a branch moving during the download cannot mix two revisions.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote

import httpx

from .errors import MetadataError, RemoteError, TokenRequiredError
from .job import RemoteFile
from .metadata import ModelMetadata
from .security import Credential
from .sources import HFSource
from .transport import get_json, open_stream

WEIGHT_SUFFIXES = {".safetensors", ".bin", ".ckpt", ".pt", ".pth"}
SKIP_SUFFIXES = {".md", ".gitattributes", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".msgpack", ".h5",
                 ".ot", ".onnx", ".onnx_data", ".pb", ".tflite", ".mlmodel"}
_SHARD = re.compile(r"^(?P<variant>.*?)-?\d{5}-of-\d{5}$")


@dataclass
class RepoPlan:
    repo_id: str
    commit: str
    folder_name: str
    files: list[RemoteFile]
    metadata: ModelMetadata


@dataclass
class RepoListing:
    """Every file of a repo at one commit (``entries``: path -> the API's entry), and the files an install
    would choose (``chosen``: under the subfolder, one variant, safetensors over .bin...)."""

    info: dict  # type: ignore[type-arg]
    commit: str
    entries: dict[str, dict]  # type: ignore[type-arg]
    chosen: list[str]


def list_repo(
    client: httpx.Client, source: HFSource, endpoint: str, credential: Credential | None, allow_private: bool
) -> RepoListing:
    endpoint = endpoint.rstrip("/")
    info = _api(client, f"{endpoint}/api/models/{source.repo_id}/revision/{quote(source.revision, safe='')}"
                "?blobs=true", source, credential, allow_private)
    commit = str(info.get("sha") or source.revision)
    siblings = info.get("siblings") or []
    if not isinstance(siblings, list):
        raise MetadataError(f"{source.repo_id}: the file list of the repo is not a list")
    if any("size" not in s for s in siblings):
        siblings = _tree(client, endpoint, source, commit, credential, allow_private)
    entries = {str(s["rfilename"]): s for s in siblings}
    model_index = _model_index(client, endpoint, source, commit, entries, credential, allow_private)
    return RepoListing(info, commit, entries, select_files(list(entries), source.subfolder, source.variant,
                                                           model_index))


def filter_files(paths: list[str], scoped: list[str], prefix: str, include: Sequence[str] = (),
                 exclude: Sequence[str] = ()) -> list[str]:
    """``include`` globs (on the path under the subfolder) choose among every file under it instead of the
    default choice ``paths``; ``exclude`` globs then leave files out."""
    rel = lambda p: p[len(prefix):]
    if include:
        paths = [p for p in scoped if any(fnmatch.fnmatchcase(rel(p), g) for g in include)]
    return sorted(p for p in paths if not any(fnmatch.fnmatchcase(rel(p), g) for g in exclude))


def resolve_repo(
    client: httpx.Client, source: HFSource, endpoint: str, credential: Credential | None, allow_private: bool,
    include: Sequence[str] = (), exclude: Sequence[str] = (),
) -> RepoPlan:
    endpoint = endpoint.rstrip("/")
    listing = list_repo(client, source, endpoint, credential, allow_private)
    info, commit, entries = listing.info, listing.commit, listing.entries
    prefix = f"{source.subfolder}/" if source.subfolder else ""
    chosen = listing.chosen
    if include or exclude:
        chosen = filter_files(chosen, [p for p in entries if p.startswith(prefix)], prefix, include, exclude)
    if not chosen:
        scope = f" under {source.subfolder!r}" if source.subfolder else ""
        globs = " matching --include/--exclude" if include or exclude else ""
        raise MetadataError(f"{source.repo_id}@{source.revision}: no model files found{scope}{globs}")
    files = []
    for name in chosen:
        entry = entries[name]
        lfs = entry.get("lfs") or {}
        files.append(RemoteFile(
            url=f"{endpoint}/{source.repo_id}/resolve/{commit}/{quote(name)}",
            path=name[len(prefix):],
            size=entry.get("size"),
            sha256=lfs.get("sha256") or lfs.get("oid"),
        ))
    return RepoPlan(source.repo_id, commit, source.folder_name, files, _metadata(info, source, endpoint, commit))


def _api(client: httpx.Client, url: str, source: HFSource, credential: Credential | None,
         allow_private: bool) -> dict:  # type: ignore[type-arg]
    try:
        status, body = get_json(client, url, credential=credential, allow_private=allow_private)
    except httpx.HTTPError as exc:
        raise RemoteError(f"Hugging Face API at {url} failed: {exc!r}") from exc
    if status in (401, 403):
        raise TokenRequiredError(f"{source.repo_id}: HTTP {status}: the repo is private or gated; set HF_TOKEN",
                                 status)
    if status == 404:
        raise MetadataError(f"{source.repo_id}: no such repo or revision {source.revision!r} (HTTP 404)")
    if status >= 400 or not isinstance(body, dict):
        raise RemoteError(f"Hugging Face API answered HTTP {status} for {url}", status)
    return body


def _tree(client: httpx.Client, endpoint: str, source: HFSource, commit: str, credential: Credential | None,
          allow_private: bool) -> list[dict]:  # type: ignore[type-arg]
    url = f"{endpoint}/api/models/{source.repo_id}/tree/{commit}?recursive=true"
    out = []
    while url:
        response = open_stream(client, url, credential=credential, allow_private=allow_private)
        try:
            response.read()
            if response.status_code >= 400:
                raise RemoteError(f"Hugging Face tree API answered HTTP {response.status_code}", response.status_code)
            page = response.json()
            url = response.links.get("next", {}).get("url", "")
        finally:
            response.close()
        out += [{"rfilename": e["path"], "size": e.get("size"), "lfs": e.get("lfs")}
                for e in page if e.get("type") == "file"]
    return out


def _model_index(client: httpx.Client, endpoint: str, source: HFSource, commit: str, entries: dict,  # type: ignore[type-arg]
                 credential: Credential | None, allow_private: bool) -> dict | None:  # type: ignore[type-arg]
    name = f"{source.subfolder}/model_index.json" if source.subfolder else "model_index.json"
    if name not in entries:
        return None
    url = f"{endpoint}/{source.repo_id}/resolve/{commit}/{quote(name)}"
    status, body = get_json(client, url, credential=credential, allow_private=allow_private)
    if status >= 400 or not isinstance(body, dict):
        raise MetadataError(f"{source.repo_id}: model_index.json is unreadable (HTTP {status})")
    return body


def _weight_key(name: str) -> tuple[str, str | None] | None:
    """(format, variant) of a weight or weight-index file name, None for other files."""
    parts = name.split(".")
    if name.endswith(".json") and ".index" in name:  # x.safetensors.index.fp16.json
        i = parts.index("index")
        fmt = parts[i - 1] if i >= 1 else ""
        variant = parts[i + 1] if len(parts) > i + 2 else None
        return ("safetensors" if fmt == "safetensors" else "bin"), variant
    suffix = "." + parts[-1] if len(parts) > 1 else ""
    if suffix not in WEIGHT_SUFFIXES:
        return None
    variant = None
    if len(parts) > 2:
        m = _SHARD.match(parts[-2])
        variant = (m.group("variant") or None) if m else parts[-2]
    return ("safetensors" if suffix == ".safetensors" else "bin"), variant


def select_files(paths: list[str], subfolder: str | None, variant: str | None,
                 model_index: dict | None) -> list[str]:  # type: ignore[type-arg]
    """The files worth downloading: scope, diffusers folders, one variant, safetensors over .bin."""
    prefix = f"{subfolder}/" if subfolder else ""
    scoped = [p for p in paths if p.startswith(prefix)]
    rel = {p: p[len(prefix):] for p in scoped}
    keep = [p for p in scoped if PurePosixPath(p).suffix.lower() not in SKIP_SUFFIXES
            and not PurePosixPath(p).name.startswith(".")]
    if model_index is not None:
        # a component set to [null, null] (e.g. a removed safety_checker) is not part of the pipeline
        folders = {k for k, v in model_index.items()
                   if isinstance(v, list) and v and v[0] is not None and not k.startswith("_")}
        keep = [p for p in keep if rel[p] == "model_index.json" or rel[p].split("/", 1)[0] in folders]
    by_dir: dict[str, list[str]] = {}
    for p in keep:
        by_dir.setdefault(str(PurePosixPath(p).parent), []).append(p)
    chosen: list[str] = []
    for files in by_dir.values():
        chosen += _pick_weights(files, variant)
    return sorted(chosen)


def _pick_weights(files: list[str], variant: str | None) -> list[str]:
    keys = {f: _weight_key(PurePosixPath(f).name) for f in files}
    weights = {f: k for f, k in keys.items() if k is not None}
    if not weights:
        return files
    variants = {k[1] for k in weights.values()}
    if variant in variants:
        want_variant = variant
    elif None in variants:
        want_variant = None
    else:
        want_variant = min(v for v in variants if v)
    formats = {k[0] for k in weights.values() if k[1] == want_variant}
    want_format = "safetensors" if "safetensors" in formats else "bin"
    return [f for f in files if keys[f] is None or keys[f] == (want_format, want_variant)]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def thumbnail_url(info: dict, source: HFSource, endpoint: str, commit: str) -> str | None:  # type: ignore[type-arg]
    """The image that stands for a repo, when it has one. The hub has no thumbnail field for models: its
    model page shows the card's gallery (``cardData.widget[].output.url``, written by diffusers' training
    scripts and most LoRA repos), else the card embeds images kept as files of the repo (SDXL base's
    ``01.png``, FLUX.1-dev's ``dev_grid.jpg``). The first gallery image, else the first image file at the
    top of the repo (of the subfolder installed); a relative path is a file of the repo at ``commit``."""
    card = info.get("cardData")
    widget = card.get("widget") if isinstance(card, dict) else None
    for item in widget if isinstance(widget, list) else [widget]:
        output = item.get("output") if isinstance(item, dict) else None
        url = output.get("url") if isinstance(output, dict) else None
        if isinstance(url, str) and url.strip() and PurePosixPath(url.split("?")[0]).suffix.lower() in IMAGE_SUFFIXES:
            url = url.strip()
            if url.startswith(("https://", "http://")):
                return url
            path = url.removeprefix("./").lstrip("/")
            if ".." not in PurePosixPath(path).parts:
                return f"{endpoint}/{source.repo_id}/resolve/{commit}/{quote(path)}"
    prefix = f"{source.subfolder}/" if source.subfolder else ""
    listed = info.get("siblings")
    siblings: list[Any] = listed if isinstance(listed, list) else []
    images = sorted(name for s in siblings if isinstance(s, dict) and isinstance(name := s.get("rfilename"), str)
                    and name.startswith(prefix) and "/" not in name[len(prefix):]
                    and PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES)
    return f"{endpoint}/{source.repo_id}/resolve/{commit}/{quote(images[0])}" if images else None


def _metadata(info: dict, source: HFSource, endpoint: str, commit: str) -> ModelMetadata:  # type: ignore[type-arg]
    card = info.get("cardData") or {}
    license_ = card.get("license") if isinstance(card, dict) else None
    tags = [str(t) for t in info.get("tags") or []]
    if license_ is None:
        license_ = next((t.split(":", 1)[1] for t in tags if t.startswith("license:")), None)
    return ModelMetadata(
        source=str(source),
        name=source.folder_name,
        author=info.get("author") or source.repo_id.split("/", 1)[0],
        description=(card.get("description") if isinstance(card, dict) else None) or info.get("description"),
        license=str(license_) if license_ else None,
        tags=tags,
        source_url=f"{endpoint}/{source.repo_id}",
        thumbnail_url=thumbnail_url(info, source, endpoint, commit),
        repo_id=source.repo_id,
        revision=commit,
        extra={"pipeline_tag": info.get("pipeline_tag")} if info.get("pipeline_tag") else {},
    )
