"""``/api/v2/models/i/{key}/...``: per-model data: default settings and trigger phrases, links, the cover.

The cover upload is the one route whose body may pass the API's global limit (MODELBUS_API_MAX_BODY,
1 MiB by default): it has its own, ``services.covers.MAX_COVER_BYTES`` (20 MiB), kept by RequestLimits
for a declared length and by FastAPI's route limit for a chunked body, so a 100 MB upload is refused
before it is read. The image is decoded here only after the cheap checks (services.covers.images)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from modelbus.events.jobs import InstallJobView
from modelbus.services.api.errors import ErrorResponse, Responses
from modelbus.services.api.routes.models import ID_PATTERN, WORKER, Client, Key, _json
from modelbus.services.client import AsyncModelBusClient
from modelbus.services.covers import ACCEPTED_TYPES, MAX_COVER_BYTES, NotAnImage
from modelbus.services.records import AnyModelConfig
from modelbus.services.records.extras import DefaultSettings

router = APIRouter(prefix="/api/v2/models", tags=["model data"])

Target = Annotated[str, Path(pattern=ID_PATTERN, description="the linked model's key")]
FOUND: Responses = {404: {"model": ErrorResponse, "description": "no such model (or link, or cover)"}}
UPLOAD: Responses = {**FOUND, 413: {"model": ErrorResponse, "description": f"over {MAX_COVER_BYTES} bytes or pixels"}}
#: besides the image types: what plain HTTP tools send when told nothing (curl --data-binary)
LOOSE_TYPES = ("application/octet-stream", "application/x-www-form-urlencoded", "")


class SettingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    settings: dict[str, Any] | None = Field(default=None, description=(
        "default settings to change (a null value clears one); fields: " + ", ".join(DefaultSettings.model_fields)),
        examples=[{"steps": 30, "cfg_scale": 7.5, "scheduler": "euler_a"}])
    trigger_phrases: list[str] | None = Field(default=None, max_length=1000, description="the whole new list")
    replace: bool = Field(default=False, description="settings replace the whole set instead of changing fields")


class LinkEntry(BaseModel):
    key: str
    relation: str


class Links(BaseModel):
    links: list[LinkEntry] = Field(description="models this one links to")
    linked_from: list[LinkEntry] = Field(description="models linking to this one")


def _aclient(request: Request) -> AsyncModelBusClient:
    return request.app.state.aclient  # type: ignore[no-any-return]


@router.patch("/i/{key}/settings", response_model=AnyModelConfig, responses=FOUND,
              summary="Change a main model's default settings and/or a model's trigger phrases")
def change_settings(key: Key, c: Client, body: SettingsRequest) -> Response:
    return _json(c.set_settings(key, body.settings, body.trigger_phrases, replace=body.replace).model_dump(mode="json"))


@router.get("/i/{key}/links", response_model=Links, responses=FOUND, summary="A model's links, both sides")
def get_links(key: Key, c: Client) -> Response:
    return _json(c.links(key))


@router.put("/i/{key}/links/{target}", response_model=AnyModelConfig, responses=FOUND,
            summary="Link a model to another (which must exist): a LoRA for a main model, a pipeline uses a VAE")
def put_link(key: Key, target: Target, c: Client,
             relation: Annotated[Literal["for", "uses"] | None, Query(
                 description="by default: `uses` for a main model, `for` for the others")] = None) -> Response:
    return _json(c.link(key, target, relation).model_dump(mode="json"))


@router.delete("/i/{key}/links/{target}", response_model=AnyModelConfig, responses=FOUND, summary="Remove a link")
def delete_link(key: Key, target: Target, c: Client) -> Response:
    return _json(c.unlink(key, target).model_dump(mode="json"))


_IMAGE_BODY = {"requestBody": {"required": True, "description": "the image's bytes (PNG, JPEG or WebP)",
                               "content": {t: {"schema": {"type": "string", "format": "binary"}}
                                           for t in ACCEPTED_TYPES}}}


@router.put("/i/{key}/cover", response_model=AnyModelConfig, responses=UPLOAD, openapi_extra=_IMAGE_BODY,
            max_body_size=MAX_COVER_BYTES,
            summary="Set the cover: a PNG, JPEG or WebP image, stored as a WebP thumbnail")
async def put_cover(key: Key, request: Request,
                    source: Annotated[str | None, Query(max_length=2048, description="where it came from")] = None,
                    ) -> Response:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ACCEPTED_TYPES and kind not in LOOSE_TYPES:
        raise NotAnImage(f"a cover must be {', '.join(ACCEPTED_TYPES)}, not {kind!r}")
    data = await request.body()
    client = _aclient(request).sync
    model = await asyncio.to_thread(client.set_cover, key, data, source=source or "upload")
    return _json(model.model_dump(mode="json"))


@router.get("/i/{key}/cover", responses={**FOUND, 200: {"content": {"image/webp": {}},
                                                           "description": "the cover, a WebP thumbnail"}},
            response_class=Response, summary="Get the cover (WebP)")
def get_cover(key: Key, c: Client) -> Response:
    return Response(c.get_cover(key), media_type="image/webp", headers={"Cache-Control": "no-cache"})


@router.delete("/i/{key}/cover", response_model=AnyModelConfig, responses=FOUND, summary="Remove the cover")
def delete_cover(key: Key, c: Client) -> Response:
    return _json(c.delete_cover(key).model_dump(mode="json"))


__all__ = ["router"]


# --- starter models -------------------------------------------------------------------------------

class StarterInstall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    names: list[Annotated[str, Field(max_length=128)]] = Field(default_factory=list, max_length=100,
                                                               description="starter models to install")
    bundle: str | None = Field(default=None, max_length=128, description="a bundle: sd-1, sdxl, flux")


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")  # every field named (tests/modeldata/test_starters.py checks)


class StarterFile(_Out):
    repo: str
    path: str


class StarterListed(_Out):
    name: str
    description: str
    source: str = Field(description="what `install` takes for it")
    file: StarterFile | None = None
    variant: str | None = None
    type: str
    base: str
    size: int = Field(description="approximate download size in bytes")
    gated: bool
    dependencies: list[str]
    installed: str | None = Field(description="the key of its installed record, or null")


class BundleListed(_Out):
    name: str
    description: str
    models: list[str]


class Starters(_Out):
    models: list[StarterListed]
    bundles: list[BundleListed]


class StarterQueued(_Out):
    starter: str
    job: InstallJobView | None = Field(default=None, description="the install job queued for it")
    installed: str | None = Field(default=None, description="the key of its record, when already installed")


@router.get("/starters", response_model=Starters, summary="The starter models and bundles, with the key of each one installed")
def list_starters(c: Client) -> Response:
    return _json(c.starters())


@router.post("/starters/install", response_model=list[StarterQueued], status_code=202, responses={**FOUND, 502: {
    "model": ErrorResponse, "description": "the install queue could not take the job"}},
             summary="Install starter models (or a bundle) with their dependencies, dependencies first")
def install_starters(body: StarterInstall, c: Client) -> Response:
    return _json(c.install_starters(body.names, body.bundle), status=202)


# --- conversion -----------------------------------------------------------------------------------

class ConvertRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep_original: bool = Field(default=False, description="keep the single file (it is no longer the record's)")
    timeout: float | None = Field(default=None, gt=0, le=86400, description="seconds to wait for the worker")


class Converted(BaseModel):
    key: str
    path: str
    hash: str
    model_format: str
    original: str
    original_removed: bool
    companions: dict[str, str] = Field(default_factory=dict, description="part -> the key of the installed model it "
                                       "came from (what the single file lacked: FLUX.1's VAE and text encoders...)")


@router.post("/i/{key}/convert", response_model=Converted, responses={**FOUND, **WORKER},
             summary="Convert a single-file main checkpoint into a complete diffusers folder (same key; what the file "
             "lacks from installed companion models), on a worker")
def convert_model(key: Key, c: Client, body: ConvertRequest | None = None) -> Response:
    body = body or ConvertRequest()
    return _json(c.convert(key, keep_original=body.keep_original, timeout=body.timeout))
