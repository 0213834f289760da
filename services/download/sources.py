"""Parse a source string into a typed source: a URL, a Hugging Face repo, or a Civitai model.

    https://host/path/file.safetensors         -> URLSource
    owner/repo   owner/repo:subfolder          -> HFSource (revision and variant given apart)
    https://huggingface.co/owner/repo          -> HFSource
    civitai:123   civitai:123@456              -> CivitaiSource (model 123, version 456)
    https://civitai.com/models/123?modelVersionId=456, .../api/download/models/456 -> CivitaiSource
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from .errors import SourceSyntaxError

_REPO = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?::(?P<sub>[\w.\-/]+))?$")
_CIVITAI = re.compile(r"^civitai:(?P<model>\d+)?(?:@(?P<version>\d+))?$", re.IGNORECASE)
_CIVITAI_HOSTS = ("civitai.com", "www.civitai.com", "civitai.green")


@dataclass(frozen=True)
class URLSource:
    url: str

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class HFSource:
    repo_id: str
    subfolder: str | None = None
    revision: str = "main"
    variant: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f":{self.subfolder}" if self.subfolder else "")

    @property
    def folder_name(self) -> str:
        name = self.repo_id.split("/", 1)[1]
        return f"{name}_{self.subfolder.replace('/', '_')}" if self.subfolder else name


@dataclass(frozen=True)
class CivitaiSource:
    model_id: int | None = None
    version_id: int | None = None
    base_model: str | None = None

    def __str__(self) -> str:
        text = f"civitai:{self.model_id or ''}"
        return text + (f"@{self.version_id}" if self.version_id else "")


Source = URLSource | HFSource | CivitaiSource


def parse_source(
    text: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    base_model: str | None = None,
    civitai_api: str | None = None,
) -> Source:
    """Classify ``text``; raises :class:`SourceSyntaxError` naming what was expected."""
    try:
        return _parse_source(text, revision=revision, variant=variant, base_model=base_model,
                             civitai_api=civitai_api)
    except ValueError as exc:  # urlsplit on a broken IPv6 host, int() of an absurdly long id...
        if isinstance(exc, SourceSyntaxError):
            raise
        raise SourceSyntaxError(f"{(text or '')[:200]!r} is not a valid download source: {exc}") from exc


def _parse_source(text: str, *, revision: str | None, variant: str | None, base_model: str | None,
                  civitai_api: str | None) -> Source:
    text = (text or "").strip()
    if not text:
        raise SourceSyntaxError("empty download source")
    if m := _CIVITAI.match(text):
        if not m.group("model") and not m.group("version"):
            raise SourceSyntaxError(f"{text!r}: expected civitai:<modelId> or civitai:<modelId>@<versionId>")
        return CivitaiSource(_int(m.group("model")), _int(m.group("version")), base_model)
    if "://" in text:
        return _from_url(text, revision=revision, variant=variant, base_model=base_model, civitai_api=civitai_api)
    if m := _REPO.match(text):
        sub = (m.group("sub") or "").strip("/") or None
        if sub and any(part in ("", ".", "..") for part in sub.split("/")):
            raise SourceSyntaxError(f"{text!r}: the subfolder must not contain '.' or '..' components")
        return HFSource(m.group("repo"), sub, revision or "main", variant)
    raise SourceSyntaxError(
        f"{text!r} is not a download source: expected an http(s) URL, a Hugging Face repo id "
        "'owner/repo[:subfolder]', or 'civitai:<modelId>[@<versionId>]'"
    )


def _int(value: str | None) -> int | None:
    return int(value) if value else None


def _from_url(
    url: str, *, revision: str | None, variant: str | None, base_model: str | None, civitai_api: str | None
) -> Source:
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise SourceSyntaxError(f"{url!r}: only http(s) URLs with a host can be downloaded")
    host = parts.hostname.lower()
    civitai_hosts = set(_CIVITAI_HOSTS)
    if civitai_api:
        civitai_hosts.add((urlsplit(civitai_api).hostname or "").lower())
    if host in civitai_hosts:
        civitai = _civitai_url(parts.path, parse_qs(parts.query), base_model)
        if civitai is not None:
            return civitai
    if host in ("huggingface.co", "www.huggingface.co"):
        segments = [s for s in parts.path.split("/") if s]
        if len(segments) == 2:
            return HFSource(f"{segments[0]}/{segments[1]}", None, revision or "main", variant)
    return URLSource(url)


def _civitai_url(path: str, query: dict[str, list[str]], base_model: str | None) -> CivitaiSource | None:
    if m := re.match(r"^/api/download/models/(\d+)", path):
        return CivitaiSource(None, int(m.group(1)), base_model)
    if m := re.match(r"^/models/(\d+)", path):
        version = query.get("modelVersionId", [None])[0]
        return CivitaiSource(int(m.group(1)), _int(version) if version and version.isdigit() else None, base_model)
    return None
