"""The model lifecycle beyond install: find a model by key prefix, name or hash; pause, resume and restart
install jobs; verify installed files and prune the models directory (on hash workers: this process never
reads a model file); browse a remote repository and plan an install before running it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from modelbus.events.jobs import InstallJobView
from modelbus.services.api.errors import CONFLICT, FORBIDDEN, NOT_FOUND
from modelbus.services.api.routes.models import WORKER, JobId, _typed
from modelbus.services.api.schemas import InstallRequest
from modelbus.services.client import ModelBusClient, defaults
from modelbus.services.records import AnyModelConfig

router = APIRouter(prefix="/api/v2/models", tags=["lifecycle"])


def _client(request: Request) -> ModelBusClient:
    return request.app.state.client  # type: ignore[no-any-return]


Client = Annotated[ModelBusClient, Depends(_client)]


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload, default=_typed), status_code=status, media_type="application/json")


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


@router.post("/install/{job_id}/pause", response_model=InstallJobView, responses=_JOB_STATE,
             summary="Pause a waiting or downloading install job (its partial files stay for the resume)")
def pause_job(job_id: JobId, c: Client) -> Response:
    return _json(c.pause(job_id))


@router.post("/install/{job_id}/resume", response_model=InstallJobView, responses=_JOB_STATE,
             summary="Resume a paused install job: its downloads continue with ranges")
def resume_job(job_id: JobId, c: Client) -> Response:
    return _json(c.resume(job_id))


class RestartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    from_scratch: bool = Field(default=False, description="download every file again (by default a repo install "
                                                          "that failed in its downloads keeps the files it "
                                                          "downloaded whole and verified: kept_files)")


@router.post("/install/{job_id}/restart", response_model=InstallJobView, responses=_JOB_STATE,
             summary="Run a failed or cancelled install job again: only its failed and missing files are "
                     "downloaded (the body's from_scratch: all of them)")
def restart_job(job_id: JobId, c: Client, body: RestartRequest | None = None) -> Response:
    return _json(c.restart(job_id, from_scratch=bool(body and body.from_scratch)))


# --- health ---------------------------------------------------------------------------------------

class VerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[Annotated[str, Field(min_length=1, max_length=512)]] = Field(
        default_factory=list, max_length=10_000, description="keys, key prefixes or names (empty: every model)")
    repair: bool = Field(default=False, description="download missing or changed models again from their source")
    timeout: float = Field(default=defaults.SCAN_TIMEOUT, gt=0, le=24 * 3600,
                           description="seconds to wait for the workers (504 after)")


class PruneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dry_run: bool = Field(default=False, description="only list what would be deleted")
    timeout: float = Field(default=defaults.SCAN_TIMEOUT, gt=0, le=24 * 3600)


class ModelCheck(BaseModel):
    model_config = ConfigDict(extra="allow")
    key: str
    name: str
    status: str = Field(description="ok, missing, changed, busy (being written: no verdict) or error")
    missing: list[str] = Field(default_factory=list)
    changed: list[str] = Field(default_factory=list)
    busy: list[str] = Field(default_factory=list)
    extra: list[str] = Field(default_factory=list, description="files in a folder model its manifest does not list")


class VerifyResult(BaseModel):
    models: list[ModelCheck]
    summary: dict[str, int]
    healthy: bool = Field(description="nothing missing, changed, busy or refused")


class StagingFigures(BaseModel):
    count: int = Field(description="folders under the staging folder (installs, paused downloads, conversions)")
    bytes: int
    oldest: str | None = Field(description="ISO time of the oldest folder's newest change")
    ttl: float = Field(description="MODELBUS_STAGING_TTL in seconds")
    reclaimable: list[str] = Field(description="older than the TTL, no running job: what the janitor removes")
    reclaimable_bytes: int
    reclaimed: list[str] = Field(description="removed now (none with dry_run), each an InstallStagingReclaimed event")
    reclaimed_bytes: int


class PruneResult(BaseModel):
    files: list[str] = Field(description="deleted (or, with dry_run, to delete), relative to the models directory")
    folders: list[str]
    bytes: int
    dry_run: bool
    staging: StagingFigures


@router.post("/verify", response_model=VerifyResult, responses={**NOT_FOUND, **CONFLICT, **WORKER},
             summary="Re-hash installed files against the recorded hashes (on hash workers), optionally repair")
def verify(c: Client, body: VerifyRequest | None = None) -> Response:
    body = body or VerifyRequest()
    return _json(c.verify(body.keys, repair=body.repair, timeout=body.timeout))


@router.post("/prune", response_model=PruneResult, responses={**CONFLICT, **WORKER},
             summary="Delete the files in the models directory that no record owns, and empty folders; reclaim "
             "staging folders older than MODELBUS_STAGING_TTL that no running job uses")
def prune(c: Client, body: PruneRequest | None = None) -> Response:
    body = body or PruneRequest()
    return _json(c.prune(dry_run=body.dry_run, timeout=body.timeout))


# --- browsing before an install -------------------------------------------------------------------

class _Out(BaseModel):
    """A response documented field by field: a field the code adds and this does not name fails the tests
    that check the real answers against it (tests/lifecycle/test_browse.py)."""

    model_config = ConfigDict(extra="forbid")


class RemoteFile(_Out):
    path: str = Field(description="relative to the repo (and its subfolder)")
    size: int | None
    sha256: str | None = Field(description="the LFS sha256, where the hub gives one")
    chosen: bool = Field(description="an install of the repo takes this file")


class CivitaiFile(_Out):
    name: str
    type: str | None
    size: int | None
    primary: bool
    sha256: str | None
    chosen: bool = Field(description="the file an install of this version takes")


class CivitaiVersion(_Out):
    id: int | None
    name: str | None
    base_model: str | None
    published_at: str | None
    chosen: bool = Field(description="the version an install of the model takes")
    files: list[CivitaiFile]


class RemoteListing(_Out):
    kind: Literal["huggingface", "civitai"]
    # a Hugging Face repo
    repo_id: str | None = None
    subfolder: str | None = None
    revision: str | None = None
    commit: str | None = None
    files: list[RemoteFile] | None = None
    total_bytes: int | None = None
    chosen_bytes: int | None = None
    offline: bool | None = Field(default=None, description="listed from the Hugging Face cache (HF_HUB_OFFLINE)")
    # a Civitai model
    model_id: int | None = None
    name: str | None = None
    type: str | None = None
    versions: list[CivitaiVersion] | None = None


class PlannedFile(_Out):
    path: str
    size: int | None
    url: str | None
    sha256: str | None = None


class InstallPlan(_Out):
    source: str
    files: list[PlannedFile]
    total_bytes: int | None
    folder: str | None = Field(description="the folder the files go in, for a multi-file model")
    destination: str = Field(description="where the model is placed")


@router.get("/remote", response_model=RemoteListing, summary="The files of a Hugging Face repo (owner/repo[:subfolder]) or the versions "
            "of a Civitai model (civitai:MODEL[@VERSION]), with sizes", responses={**NOT_FOUND, **WORKER})
def ls_remote(c: Client, source: Annotated[str, Query(min_length=1, max_length=4096)],
              revision: Annotated[str | None, Query(max_length=256)] = None) -> Response:
    return _json(c.ls_remote(source, revision=revision))


@router.post("/install/plan", response_model=InstallPlan, summary="What an install would download and where (a dry run: nothing queued)",
             responses={**NOT_FOUND, **FORBIDDEN, **WORKER})
def plan_install(body: InstallRequest, c: Client) -> Response:
    options = body.options()
    options.pop("command_id", None)
    token = options.pop("access_token", None)
    return _json(c.plan_install(body.source, hand_over=False, access_token=token, **options))
