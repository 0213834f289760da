"""What an install source names, and how to fetch it: a local path, or remote files with metadata.

    /abs/path, ./rel, ~/x          -> LocalPlan (must exist)
    http(s) URL                    -> RemotePlan, one file named by the server
    owner/repo[:subfolder]         -> RemotePlan, the repo's chosen files under one folder
    civitai:<id>[@<version>], civitai.com URLs -> RemotePlan, the version's primary file

Parsing is cheap and offline (done when a command is submitted, to find a source already being
installed); resolving a remote source asks the Hugging Face / Civitai API (done by the install worker).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from modelbus.services import hfcache
from modelbus.services.config import AppConfig
from modelbus.services.download.civitai import resolve_civitai
from modelbus.services.download.errors import SourceSyntaxError
from modelbus.services.download.huggingface import resolve_repo
from modelbus.services.download.metadata import ModelMetadata
from modelbus.services.download.security import credential_for
from modelbus.services.download.sources import CivitaiSource, HFSource, Source, URLSource, parse_source
from modelbus.services.install.errors import InvalidSourceError
from modelbus.services.install.roots import check_local_source

_PATHLIKE = re.compile(r"^(/|\.{1,2}[/\\]|~|[A-Za-z]:[/\\])")


@dataclass(frozen=True)
class PlannedFile:
    """One file to download: its URL, its path under the model's folder (None: the server names it)."""

    url: str
    name: str | None = None
    size: int | None = None
    sha256: str | None = None


@dataclass
class LocalPlan:
    path: Path


@dataclass
class RemotePlan:
    files: list[PlannedFile]
    folder: str | None  # the model is this folder of the staging dir; None: the one file downloaded
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int | None:
        sizes = [f.size for f in self.files]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)


Plan = LocalPlan | RemotePlan


def looks_like_path(text: str) -> bool:
    return bool(_PATHLIKE.match(text)) or os.path.exists(os.path.expanduser(text))


def normalize_source(text: str, config: AppConfig, options: dict[str, Any] | None = None) -> str:
    """A canonical spelling of a source, so that two commands for one source can be told apart from two
    sources. Unparseable text is kept as given: the job will fail with the parser's message."""
    text = (text or "").strip()
    if looks_like_path(text):
        return str(Path(os.path.expanduser(text)).resolve())
    try:
        return str(_parse(text, config, options or {}))
    except SourceSyntaxError:
        return text


def _parse(text: str, config: AppConfig, options: dict[str, Any]) -> Source:
    return parse_source(text, revision=options.get("revision"), variant=options.get("variant"),
                        base_model=options.get("base_model_hint"), civitai_api=config.civitai_api)


parse_source_text = _parse  # (browsing asks what a source names, as an install does)


def resolve(text: str, config: AppConfig, options: dict[str, Any], http: Callable[[], httpx.Client],
            access_token: str | None = None) -> Plan:
    """Turn a source into a plan; raises InvalidSourceError or the download family's errors.

    ``http`` makes the HTTP client, only for the sources that ask an API (a client is not free).
    """
    text = (text or "").strip()
    if not text:
        raise InvalidSourceError("empty install source")
    if looks_like_path(text):
        path = check_local_source(Path(os.path.expanduser(text)).absolute(), config)
        if not os.path.exists(path):
            raise InvalidSourceError(f"no such file or folder: {path}")
        if not (os.path.isfile(path) or os.path.isdir(path)):
            raise InvalidSourceError(f"not a regular file or folder: {path}")
        return LocalPlan(path.resolve())
    try:
        source = _parse(text, config, options)
    except SourceSyntaxError as exc:
        raise InvalidSourceError(str(exc)) from exc
    allow_private = config.allow_private_downloads
    if isinstance(source, URLSource):
        offline = hfcache.offline_for_url(source.url, config.hf_endpoint)
        if offline is not None:  # a Hugging Face file's URL: the cache's copy, or a clear refusal
            cached = hfcache.cached_file(source.url)
            if cached is None:
                raise InvalidSourceError(f"{source.url} is not in the Hugging Face cache at {hfcache.hub_cache()}, "
                                         f"and {offline} forbids downloading it")
            return LocalPlan(cached)
        sha256 = options.get("sha256")
        return RemotePlan([PlannedFile(source.url, sha256=str(sha256).lower() if sha256 else None)], None,
                          {"source": text, "source_url": source.url})
    if isinstance(source, HFSource):
        endpoint = config.hf_endpoint
        offline = hfcache.offline_reason(endpoint)
        if offline is not None:  # no network: the Hugging Face cache's snapshot, copied like a folder
            snapshot = hfcache.cached_snapshot(source.repo_id, source.revision, source.subfolder)
            if snapshot is None:
                raise InvalidSourceError(f"{source} (revision {source.revision}) is not in the Hugging Face cache at "
                                         f"{hfcache.hub_cache()}, and {offline} forbids downloading it")
            return LocalPlan(snapshot)
        with http() as client:
            repo = resolve_repo(client, source, endpoint, credential_for(endpoint, config, access_token),
                                allow_private, include=globs(options, "include"), exclude=globs(options, "exclude"))
        files = [PlannedFile(f.url, f.path, f.size, f.sha256) for f in repo.files]
        metadata = _metadata_dict(repo.metadata)
        if len(files) == 1 and "/" not in (files[0].name or "/") and not _is_folder_layout(files[0].name):
            return RemotePlan(files, None, metadata)  # a single-file repo: the file is the model
        return RemotePlan(files, repo.folder_name, metadata)
    if isinstance(source, CivitaiSource):
        api = config.civitai_api
        with http() as client:
            civitai = resolve_civitai(client, source, api, credential_for(api, config, access_token), allow_private)
        return RemotePlan([PlannedFile(civitai.url, civitai.filename, civitai.size, civitai.sha256)], None,
                          _metadata_dict(civitai.metadata))
    raise InvalidSourceError(f"unsupported source {text!r}")  # pragma: no cover - parse_source is exhaustive


_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
FILE_GLOBS = ("include", "exclude")
MAX_GLOBS = 100


def globs(options: dict[str, Any], name: str) -> list[str]:
    value = options.get(name) or []
    return [value] if isinstance(value, str) else [str(g) for g in value]


def check_file_globs(text: str, config: AppConfig, options: dict[str, Any]) -> None:
    """``include``/``exclude``: lists of glob patterns (at most MAX_GLOBS), only for a Hugging Face repo."""
    given = [name for name in FILE_GLOBS if options.get(name)]
    if not given:
        return
    for name in given:
        value = options[name]
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or len(items) > MAX_GLOBS or not all(
                isinstance(g, str) and 0 < len(g) <= 512 and "\x00" not in g for g in items):
            raise InvalidSourceError(f"--{name} takes glob patterns (at most {MAX_GLOBS}, 1-512 characters each)")
    if not _names(text, config, options, HFSource):
        raise InvalidSourceError(f"--{given[0]} chooses files of a Hugging Face repo; {text[:200]!r} is not one")


def _names(text: str, config: AppConfig, options: dict[str, Any], kind: type[URLSource | HFSource]) -> bool:
    """Whether ``text`` names a remote source of this kind."""
    try:
        return not looks_like_path(text.strip()) and isinstance(_parse(text.strip(), config, options), kind)
    except SourceSyntaxError:
        return False


EXPECTED_HASHES = ("sha256", "blake3")


def check_expected_hashes(text: str, config: AppConfig, options: dict[str, Any]) -> None:
    """``sha256``/``blake3`` options: 64 hex digits each, and only for a plain URL download."""
    given = [name for name in EXPECTED_HASHES if options.get(name) is not None]
    if not given:
        return
    for name in given:
        value = options[name]
        if not isinstance(value, str) or not _HEX64.match(value):
            raise InvalidSourceError(f"--{name} must be 64 hexadecimal digits, got {str(value)[:80]!r}")
    if not _names(text, config, options, URLSource):
        raise InvalidSourceError(f"--{given[0]} verifies a plain URL download; {text[:200]!r} is not a URL")


# file names that only mean something inside their folder (diffusers/InvokeAI layouts)
_FOLDER_STEMS = {"pytorch_lora_weights", "learned_embeds", "ip_adapter", "diffusion_pytorch_model", "model",
                 "model_index", "config"}


def _is_folder_layout(name: str | None) -> bool:
    return bool(name) and Path(str(name)).stem in _FOLDER_STEMS


def _metadata_dict(metadata: ModelMetadata) -> dict[str, Any]:
    return metadata.model_dump(mode="json", exclude_none=True)


__all__ = ["LocalPlan", "Plan", "PlannedFile", "RemotePlan", "looks_like_path",
           "normalize_source", "resolve"]
