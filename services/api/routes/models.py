"""``/api/v2/models``: records (list/search, get, patch, delete, rename, history), installs and their
jobs, scan and sync, loads and unloads, and the workers with their caches."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response

from modelbus.events.jobs import InstallJobView, LoadOutcome, ScanOutcome, SyncOutcome, UnloadOutcome
from modelbus.services.api.errors import CONFLICT, FORBIDDEN, NOT_FOUND, ErrorResponse, Responses
from modelbus.services.api.schemas import (
    HistoryEntry,
    InstallRequest,
    LoadRequest,
    ModelPage,
    Removed,
    RenameRequest,
    ScanRequest,
    UnloadRequest,
    WorkerInfo,
)
from modelbus.services.client import ModelBusClient
from modelbus.services.client import defaults as limits
from modelbus.services.records import AnyModelConfig, BaseModelType, ModelFormat, ModelType

router = APIRouter(prefix="/api/v2/models", tags=["models"])

ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,256}$"
Key = Annotated[str, Path(pattern=ID_PATTERN, description="the model's key")]
JobId = Annotated[str, Path(pattern=ID_PATTERN, description="the install job's id")]
WORKER: Responses = {502: {"model": ErrorResponse, "description": "the worker ran the job and it failed"},
          504: {"model": ErrorResponse, "description": "the worker did not finish in time"}}


def _client(request: Request) -> ModelBusClient:
    return request.app.state.client  # type: ignore[no-any-return]


Client = Annotated[ModelBusClient, Depends(_client)]


def _typed(value: Any) -> Any:
    """orjson's fallback: a typed view inside a payload (a job view in a starter's report) as its JSON."""
    dump = getattr(value, "model_dump", None)
    if not callable(dump):
        raise TypeError(f"{type(value).__name__} is not JSON")
    return dump(mode="json")


def _json(payload: Any, status: int = 200) -> Response:
    # records are serialised once with orjson rather than revalidated against the response model
    return Response(orjson.dumps(payload, default=_typed), status_code=status, media_type="application/json")


# --- records --------------------------------------------------------------------------------------

@router.get("", response_model=ModelPage, summary="List and search models")
def list_models(c: Client, name: Annotated[str | None, Query(max_length=512)] = None,
                base: BaseModelType | None = None, type: ModelType | None = None,
                tag: Annotated[list[str] | None, Query(description="models carrying all of these tags")] = None,
                offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
                limit: Annotated[int, Query(ge=1, le=limits.LIST_LIMIT_MAX)] = limits.LIST_LIMIT_DEFAULT,
                order_by: Annotated[Literal["name", "type", "base", "format", "size", "added", "modified"], Query(
                    description="sort field (size: bytes installed; added, modified: when recorded); ties by "
                                "name, then key (stable across pages)")] = "name",
                direction: Literal["asc", "desc"] = "asc",
                format: ModelFormat | None = None,
                contains: Annotated[str | None, Query(max_length=512, description="part of the name, any case")] = None,
                quantization: Annotated[str | None, Query(max_length=64, description="e.g. Q4_K, nf4")] = None,
                ) -> Response:
    total, found = c.list_models_page(name=name, base=base, type=type, tag=tag, offset=offset, limit=limit,
                                      order_by=order_by, direction=direction, format=format, contains=contains,
                                      quantization=quantization)
    page = [m.model_dump(mode="json") for m in found]
    listing = {k: {"size": v.size, "added": _iso(v.added), "modified": _iso(v.modified)}
               for k, v in c.listing(m.key for m in found).items()}
    return _json({"total": total, "offset": offset, "limit": limit, "items": page, "listing": listing})


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


@router.get("/i/{key}", response_model=AnyModelConfig, responses=NOT_FOUND, summary="Get one model")
def get_model(key: Key, c: Client) -> Response:
    return _json(c.get_model(key).model_dump(mode="json"))


@router.patch("/i/{key}", response_model=AnyModelConfig, responses={**NOT_FOUND, **CONFLICT, **FORBIDDEN},
              summary="Update fields of a model (a sparse object of changes; a new path is checked and hashed)")
def update_model(key: Key, c: Client, changes: Annotated[dict[str, Any], Body(
        examples=[{"description": "a better description", "tags": ["sfw"]}])]) -> Response:
    return _json(c.update_model(key, changes).model_dump(mode="json"))


@router.post("/i/{key}/rename", response_model=AnyModelConfig, responses=NOT_FOUND, summary="Rename a model")
def rename_model(key: Key, body: RenameRequest, c: Client) -> Response:
    return _json(c.rename_model(key, body.name).model_dump(mode="json"))


@router.delete("/i/{key}", response_model=Removed, responses={**NOT_FOUND, **CONFLICT},
               summary="Remove a model (and, with delete_files, exactly the files recorded at its install)")
def delete_model(key: Key, c: Client, delete_files: bool = False) -> Removed:
    c.delete_model(key, delete_files=delete_files)
    return Removed(key=key, deleted_files=delete_files)


@router.get("/i/{key}/history", response_model=list[HistoryEntry], responses=NOT_FOUND,
            summary="Every event of one model, oldest first")
def model_history(key: Key, c: Client) -> Response:
    return _json([{"position": s.position, "type": s.event.type, "event": s.event.model_dump(mode="json")}
                  for s in c.history(key)])


# --- loads ----------------------------------------------------------------------------------------

@router.post("/i/{key}/load", response_model=LoadOutcome, responses={**NOT_FOUND, **WORKER},
             summary="Load a model on a GPU worker (the one already holding it, by default)")
def load_model(key: Key, c: Client, body: LoadRequest | None = None) -> Response:
    body = body or LoadRequest()
    submodel = body.submodel.value if body.submodel is not None else None
    return _json(c.load(key, submodel=submodel, worker=body.worker, wait=body.wait,
                        timeout=body.timeout).model_dump(mode="json"))


@router.post("/i/{key}/unload", response_model=UnloadOutcome, responses={**NOT_FOUND, **WORKER},
             summary="Drop a model from the workers' caches")
def unload_model(key: Key, c: Client, body: UnloadRequest | None = None) -> Response:
    return _json(c.unload(key, worker=(body or UnloadRequest()).worker).model_dump(mode="json"))


# --- installs -------------------------------------------------------------------------------------

@router.post("/install", response_model=InstallJobView, status_code=202, responses={**WORKER, **FORBIDDEN},
             summary="Install a model from a path, URL, Hugging Face repo id or Civitai id")
def install(body: InstallRequest, c: Client) -> Response:
    # a local path must lie in an import root: the API never reads a file on a caller's behalf
    return _json(c.install(body.source, hand_over=False, **body.options()).model_dump(mode="json"), status=202)


@router.get("/install", response_model=list[InstallJobView], responses=WORKER, summary="List install jobs")
def list_jobs(c: Client) -> Response:
    return _json([j.model_dump(mode="json") for j in c.jobs()])


@router.get("/install/{job_id}", response_model=InstallJobView, responses={**NOT_FOUND, **WORKER},
            summary="Get one install job")
def get_job(job_id: JobId, c: Client) -> Response:
    return _json(c.job(job_id).model_dump(mode="json"))


@router.delete("/install/{job_id}", response_model=InstallJobView, responses={**NOT_FOUND, **WORKER},
               summary="Cancel an install job")
def cancel_job(job_id: JobId, c: Client) -> Response:
    return _json(c.cancel(job_id).model_dump(mode="json"))


@router.post("/scan", response_model=ScanOutcome, summary="Register every model found in a folder (in place)",
             responses={**WORKER, 403: {"model": ErrorResponse, "description": "the folder is outside the import roots"}})
def scan(body: ScanRequest, c: Client) -> Response:
    # a worker reads the model files: never this process (services/client/on_worker.py)
    return _json(c.scan(body.path, on_worker=True, timeout=body.timeout).model_dump(mode="json"))


@router.post("/sync", response_model=SyncOutcome, responses=WORKER,
             summary="Reconcile the records with the models directory")
def sync(c: Client) -> Response:
    return _json(c.sync(on_worker=True).model_dump(mode="json"))


# --- workers --------------------------------------------------------------------------------------

@router.get("/workers", response_model=list[WorkerInfo], summary="Live workers and their cache contents")
def workers(c: Client, include_dead: bool = False) -> Response:
    return _json([w.model_dump(mode="json") for w in c.workers(include_dead=include_dead)])
