"""A server that speaks the Civitai API, with a second "CDN" server for presigned downloads.

    with CivitaiServer() as civ:
        civ.add_model(101, "Tiny LoRA", type="LORA", versions=[
            {"id": 1001, "name": "v1", "baseModel": "SD 1.5", "createdAt": "2024-01-01T00:00:00Z",
             "files": [{"name": "tiny.safetensors", "content": data, "primary": True}]},
        ])
        AppConfig(civitai_api=civ.url, ...)

Endpoints: ``/api/v1/models/{id}``, ``/api/v1/model-versions/{id}``,
``/api/v1/model-versions/by-hash/{hash}``, and ``/api/download/models/{versionId}[?file=<id>]``,
which answers 307 to ``civ.cdn`` (another port, so another origin); the CDN answers 400 to any
request that carries an Authorization header, as presigned-URL hosts do. Versions listed in
``login_required`` answer 401 at the download endpoint without ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .base import BackgroundServer, BaseHandler
from .file_server import FileServer


def _sha256(content: bytes | Path) -> str:
    data = content if isinstance(content, bytes) else Path(content).read_bytes()
    return hashlib.sha256(data).hexdigest().upper()


class CivitaiServer(BackgroundServer):
    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str = "civitai-test-token") -> None:
        super().__init__(host, port)
        self.cdn = FileServer(reject_authorization=True)
        self.token = token
        self.models: dict[int, dict[str, Any]] = {}
        self.versions: dict[int, dict[str, Any]] = {}
        self.login_required: set[int] = set()
        #: version id -> the bytes its preview image answers (default: a small JPEG made with Pillow)
        self.images: dict[int, bytes] = {}
        self._file_ids = iter(range(1, 1 << 30))
        self._mlock = threading.Lock()

    def start(self) -> CivitaiServer:
        self.cdn.start()
        super().start()
        return self

    def stop(self) -> None:
        super().stop()
        self.cdn.stop()

    def add_model(self, model_id: int, name: str, *, versions: list[dict[str, Any]], type: str = "Checkpoint",
                  tags: list[str] | None = None, creator: str = "tester", description: str = "",
                  **fields: Any) -> dict[str, Any]:
        """Publish a model; each version's files carry ``content`` (bytes or a Path) served by the CDN."""
        model = {
            "id": model_id, "name": name, "description": description, "type": type, "nsfw": False,
            "tags": list(tags or []), "creator": {"username": creator, "image": None},
            "allowNoCredit": True, "allowCommercialUse": ["Image"], "allowDerivatives": True,
            "allowDifferentLicense": False, **fields,
        }
        model["modelVersions"] = [self._version(model, v) for v in versions]
        with self._mlock:
            self.models[model_id] = model
            for v in model["modelVersions"]:
                self.versions[v["id"]] = v
        return model

    def _version(self, model: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
        vid = int(spec["id"])
        files = []
        for f in spec.get("files", []):
            file_id = next(self._file_ids)
            content = f["content"]
            size = len(content) if isinstance(content, bytes) else Path(content).stat().st_size
            self.cdn.add_file(f"files/{vid}/{file_id}/{f['name']}", content,
                              disposition=f'attachment; filename="{f["name"]}"')
            sha = f.get("sha256") or _sha256(content)
            files.append({
                "id": file_id, "name": f["name"], "sizeKB": size / 1024, "type": f.get("type", "Model"),
                "primary": bool(f.get("primary", False)),
                "metadata": {"format": f.get("format", "SafeTensor" if f["name"].endswith(".safetensors")
                                             else "PickleTensor"),
                             "fp": f.get("fp", "fp16"), "size": f.get("size", "pruned")},
                "hashes": {"SHA256": sha, "AutoV2": sha[:10]},
                "pickleScanResult": "Success", "virusScanResult": "Success",
                "downloadUrl": f"{self.url}/api/download/models/{vid}?file={file_id}",
            })
        return {
            "id": vid, "modelId": model["id"], "name": spec.get("name", f"v{vid}"),
            "createdAt": spec.get("createdAt", "2024-01-01T00:00:00.000Z"),
            "publishedAt": spec.get("publishedAt", spec.get("createdAt", "2024-01-01T00:00:00.000Z")),
            "baseModel": spec.get("baseModel", "SD 1.5"), "trainedWords": list(spec.get("trainedWords", [])),
            "description": spec.get("description", ""), "files": files,
            "images": [{"url": f"{self.url}/images/{vid}.jpeg", "nsfwLevel": 1}],
            "downloadUrl": f"{self.url}/api/download/models/{vid}",
            "model": {"name": model["name"], "type": model["type"], "nsfw": False},
        }

    # -- routing -----------------------------------------------------------------------------
    def handle(self, h: BaseHandler) -> None:
        split = urlsplit(h.path)
        path = unquote(split.path).rstrip("/")
        query = parse_qs(split.query)
        parts = path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "models"] and len(parts) == 4 and parts[3].isdigit():
            self._send(h, self.models.get(int(parts[3])), "Model")
        elif parts[:3] == ["api", "v1", "model-versions"] and len(parts) == 5 and parts[3] == "by-hash":
            self._send(h, self._by_hash(parts[4]), "Model version")
        elif parts[:3] == ["api", "v1", "model-versions"] and len(parts) == 4 and parts[3].isdigit():
            self._send(h, self.versions.get(int(parts[3])), "Model version")
        elif parts[:3] == ["api", "download", "models"] and len(parts) == 4 and parts[3].isdigit():
            self._download(h, int(parts[3]), query)
        elif parts[:1] == ["images"] and len(parts) == 2 and parts[1].removesuffix(".jpeg").isdigit():
            vid = int(parts[1].removesuffix(".jpeg"))
            h.send_body(200, self.images.get(vid) or _preview(vid), "image/jpeg")
        else:
            h.send_json(404, {"error": "not found"})

    def _send(self, h: BaseHandler, obj: dict[str, Any] | None, what: str) -> None:
        if obj is None:
            h.send_json(404, {"error": f"{what} not found"})
        else:
            h.send_json(200, obj)

    def _by_hash(self, value: str) -> dict[str, Any] | None:
        value = value.upper()
        for v in self.versions.values():
            for f in v["files"]:
                if value in (f["hashes"]["SHA256"], f["hashes"]["AutoV2"]):
                    return v
        return None

    def _download(self, h: BaseHandler, vid: int, query: dict[str, list[str]]) -> None:
        version = self.versions.get(vid)
        if version is None:
            h.send_json(404, {"error": "Model version not found"})
            return
        if vid in self.login_required and h.headers.get("Authorization") != f"Bearer {self.token}":
            h.send_json(401, {"error": "Unauthorized", "message": "The creator requires you to log in"})
            return
        wanted = query.get("file", [None])[0]
        files = version["files"]
        file = next((f for f in files if str(f["id"]) == wanted), None) or next(
            (f for f in files if f["primary"]), files[0])
        target = self.cdn.url_for(f"files/{vid}/{file['id']}/{file['name']}") + "?X-Amz-Signature=test"
        h.send_body(307, b"", headers={"Location": target})


def _preview(vid: int) -> bytes:
    """A version's preview image: a 768x1024 JPEG of one colour."""
    import io

    from PIL import Image
    out = io.BytesIO()
    Image.new("RGB", (768, 1024), (vid * 37 % 256, 90, 160)).save(out, format="JPEG")
    return out.getvalue()
