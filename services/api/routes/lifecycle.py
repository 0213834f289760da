"""The model lifecycle beyond install: find a model by key prefix, name or hash; pause, resume and restart
install jobs; verify installed files and prune the models directory (on hash workers: this process never
reads a model file); browse a remote repository and plan an install before running it."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Path, Query, Request, Response

from modelbus.services.api.errors import CONFLICT, NOT_FOUND
from modelbus.services.api.routes.models import WORKER, JobId
from modelbus.services.api.schemas import Job
from modelbus.services.client import ModelBusClient
from modelbus.services.records import AnyModelConfig

router = APIRouter(prefix="/api/v2/models", tags=["lifecycle"])


def _client(request: Request) -> ModelBusClient:
    return request.app.state.client  # type: ignore[no-any-return]


Client = Annotated[ModelBusClient, Depends(_client)]


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


# --- finding --------------------------------------------------------------------------------------

@router.get("/find", response_model=AnyModelConfig, responses={**NOT_FOUND, **CONFLICT},
            summary="Get the one model a key, a unique key prefix or a unique name names (409 lists candidates)")
def find_model(c: Client, ref: Annotated[str, Query(min_length=1, max_length=512)]) -> Response:
    return _json(c.find_model(ref).model_dump(mode="json"))


@router.get("/by-hash/{hash}", response_model=list[AnyModelConfig], responses=NOT_FOUND,
            summary="Every model with this content hash (blake3:<hex>)")
def models_by_hash(c: Client, hash: Annotated[str, Path(min_length=8, max_length=200,
                                                            pattern=r"^[A-Za-z0-9:]+$")]) -> Response:
    return _json([m.model_dump(mode="json") for m in c.models_by_hash(hash)])


# --- job control ----------------------------------------------------------------------------------

_JOB_STATE = {**NOT_FOUND, **CONFLICT}


@router.post("/install/{job_id}/pause", response_model=Job, responses=_JOB_STATE,
             summary="Pause a waiting or downloading install job (its partial files stay for the resume)")
def pause_job(job_id: JobId, c: Client) -> Response:
    return _json(c.pause(job_id))


@router.post("/install/{job_id}/resume", response_model=Job, responses=_JOB_STATE,
             summary="Resume a paused install job: its downloads continue with ranges")
def resume_job(job_id: JobId, c: Client) -> Response:
    return _json(c.resume(job_id))


@router.post("/install/{job_id}/restart", response_model=Job, responses=_JOB_STATE,
             summary="Run a failed or cancelled install job again from the start")
def restart_job(job_id: JobId, c: Client) -> Response:
    return _json(c.restart(job_id))
