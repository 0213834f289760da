"""Civitai: choose a model version and its primary file, and gather the version's metadata.

API (base URL ``AppConfig.civitai_api``): ``/api/v1/models/{id}`` lists versions newest first;
``/api/v1/model-versions/{id}`` is one version; files come from ``/api/download/models/{versionId}``,
which answers 307 to a presigned URL on another host (transport.py drops our token there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from .errors import MetadataError, RemoteError, TokenRequiredError
from .metadata import ModelMetadata
from .names import sanitize_filename
from .security import Credential
from .sources import CivitaiSource
from .transport import get_json


@dataclass
class CivitaiPlan:
    url: str
    filename: str
    size: int | None
    sha256: str | None
    metadata: ModelMetadata


def resolve_civitai(
    client: httpx.Client, source: CivitaiSource, api: str, credential: Credential | None, allow_private: bool
) -> CivitaiPlan:
    api = api.rstrip("/")
    model, version, model_id = _model_and_version(_Fetcher(client, api, credential, allow_private), source)
    file = choose_file(version)
    version_id = int(version["id"])
    url = file.get("downloadUrl") or version.get("downloadUrl") or f"{api}/api/download/models/{version_id}"
    size_kb = file.get("sizeKB")
    return CivitaiPlan(
        url=str(url),
        filename=sanitize_filename(str(file.get("name") or f"civitai-{version_id}.safetensors")),
        size=int(size_kb * 1024) if isinstance(size_kb, (int, float)) else None,
        sha256=(file.get("hashes") or {}).get("SHA256"),
        metadata=_metadata(model, version, file, source, model_id, api),
    )


def _model_and_version(fetch: _Fetcher, source: CivitaiSource) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    """(the model, the version ``source`` names or an install of the model takes, the model's id)."""
    if source.version_id is not None:
        version = fetch.json(f"/api/v1/model-versions/{source.version_id}", f"version {source.version_id}")
        model_id = source.model_id or version.get("modelId")
        model = fetch.json(f"/api/v1/models/{model_id}", f"model {model_id}") if model_id else {}
        return model, version, model_id
    model = fetch.json(f"/api/v1/models/{source.model_id}", f"model {source.model_id}")
    return model, choose_version(model, source.base_model), source.model_id


def metadata_by_hash(
    client: httpx.Client, sha256: str, api: str, credential: Credential | None, allow_private: bool
) -> ModelMetadata:
    """The Civitai metadata of a file known by its sha256 (``/api/v1/model-versions/by-hash``)."""
    fetch = _Fetcher(client, api.rstrip("/"), credential, allow_private)
    version = fetch.json(f"/api/v1/model-versions/by-hash/{sha256}", f"file with sha256 {sha256}")
    model_id = version.get("modelId")
    model = fetch.json(f"/api/v1/models/{model_id}", f"model {model_id}") if model_id else {}
    wanted = sha256.upper()
    file = next((f for f in version.get("files") or []
                 if wanted in {str(h).upper() for h in (f.get("hashes") or {}).values()}), None)
    source = CivitaiSource(model_id, int(version["id"]))
    return _metadata(model, version, file or choose_file(version), source, model_id, api.rstrip("/"))


class _Fetcher:
    def __init__(self, client: httpx.Client, api: str, credential: Credential | None, allow_private: bool) -> None:
        self.client, self.api, self.credential, self.allow_private = client, api, credential, allow_private

    def json(self, path: str, what: str) -> dict[str, Any]:
        url = self.api + path
        try:
            status, body = get_json(self.client, url, credential=self.credential, allow_private=self.allow_private)
        except httpx.HTTPError as exc:
            raise RemoteError(f"Civitai API at {url} failed: {exc!r}") from exc
        if status in (401, 403):
            raise TokenRequiredError(f"Civitai {what}: HTTP {status}: a login is needed; set CIVITAI_TOKEN", status)
        if status == 404:
            raise MetadataError(f"Civitai {what} does not exist (HTTP 404)")
        if status >= 400 or not isinstance(body, dict):
            raise RemoteError(f"Civitai API answered HTTP {status} for {url}", status)
        return body


def _norm(base: str) -> str:
    return "".join(ch for ch in base.lower() if ch.isalnum())


def choose_version(model: dict[str, Any], base_model: str | None) -> dict[str, Any]:
    """The newest version, or the newest whose base model matches ``base_model`` (e.g. 'SDXL')."""
    versions: list[dict[str, Any]] = list(model.get("modelVersions") or [])
    if not versions:
        raise MetadataError(f"Civitai model {model.get('id')} has no versions")
    # newest first: by publish/creation time when given, else the API's own order (newest first)
    versions.sort(key=lambda v: str(v.get("publishedAt") or v.get("createdAt") or ""), reverse=True)
    if base_model is None:
        return versions[0]
    want = _norm(base_model)
    matching = [v for v in versions if _norm(str(v.get("baseModel", ""))).startswith(want)]
    if not matching:
        bases = sorted({str(v.get("baseModel")) for v in versions})
        raise MetadataError(f"Civitai model {model.get('id')} has no version for base model {base_model!r}; "
                            f"it has: {', '.join(bases)}")
    return matching[0]


def choose_file(version: dict[str, Any]) -> dict[str, Any]:
    """The primary model file, preferring safetensors, then fp16, then pruned."""
    files = [f for f in version.get("files") or [] if f.get("type", "Model") == "Model"]
    if not files:
        raise MetadataError(f"Civitai version {version.get('id')} has no model file")

    def rank(f: dict[str, Any]) -> tuple[bool, bool, bool, bool]:
        meta = f.get("metadata") or {}
        return (
            bool(f.get("primary")),
            str(meta.get("format", "")).lower() == "safetensor" or str(f.get("name", "")).endswith(".safetensors"),
            str(meta.get("fp", "")).lower() == "fp16",
            str(meta.get("size", "")).lower() == "pruned",
        )

    return max(files, key=rank)


def _metadata(model: dict[str, Any], version: dict[str, Any], file: dict[str, Any], source: CivitaiSource,
              model_id: int | None, api: str) -> ModelMetadata:
    images = version.get("images") or []
    thumbnail = next((i.get("url") for i in images if i.get("url")), None)
    tags = [t if isinstance(t, str) else str(t.get("name")) for t in model.get("tags") or []]
    creator = model.get("creator") or {}
    site = "https://civitai.com" if "civitai.com" in api else api
    return ModelMetadata(
        source=str(source),
        name=model.get("name") or (version.get("model") or {}).get("name"),
        author=creator.get("username"),
        description=version.get("description") or model.get("description"),
        tags=tags,
        thumbnail_url=thumbnail,
        source_url=f"{site}/models/{model_id}?modelVersionId={version['id']}" if model_id else None,
        model_id=model_id,
        version_id=int(version["id"]),
        version_name=version.get("name"),
        base_model=version.get("baseModel"),
        trained_words=list(version.get("trainedWords") or []),
        allow_commercial_use=model.get("allowCommercialUse"),
        allow_derivatives=model.get("allowDerivatives"),
        allow_no_credit=model.get("allowNoCredit"),
        allow_different_license=model.get("allowDifferentLicense"),
        nsfw=model.get("nsfw"),
        hashes={k: str(v) for k, v in (file.get("hashes") or {}).items()},
        extra={"model_type": model.get("type"), "file_name": file.get("name")},
    )


def list_versions(
    client: httpx.Client, source: CivitaiSource, api: str, credential: Credential | None, allow_private: bool
) -> dict[str, Any]:
    """A Civitai model's versions (or the one ``source`` names) with their files, newest first; ``chosen``
    marks the file an install takes, and ``chosen`` on a version the one an install of the model takes."""
    model, default, _ = _model_and_version(_Fetcher(client, api.rstrip("/"), credential, allow_private), source)
    versions = [default] if source.version_id is not None else sorted(
        model.get("modelVersions") or [], reverse=True,
        key=lambda v: str(v.get("publishedAt") or v.get("createdAt") or ""))
    out = []
    for version in versions:
        try:
            picked = choose_file(version)
        except MetadataError:
            picked = None
        files = []
        for f in version.get("files") or []:
            size_kb = f.get("sizeKB")
            files.append({"name": str(f.get("name") or ""), "type": f.get("type", "Model"),
                          "size": int(size_kb * 1024) if isinstance(size_kb, (int, float)) else None,
                          "primary": bool(f.get("primary")), "sha256": (f.get("hashes") or {}).get("SHA256"),
                          "chosen": f is picked})
        out.append({"id": version.get("id"), "name": version.get("name"), "base_model": version.get("baseModel"),
                    "published_at": version.get("publishedAt") or version.get("createdAt"),
                    "chosen": version.get("id") == default.get("id"), "files": files})
    return {"model_id": model.get("id"), "name": model.get("name"), "type": model.get("type"), "versions": out}
