"""Request and response bodies of the API (they make the OpenAPI document complete)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from modelbus.services.client import defaults
from modelbus.services.records import AnyModelConfig, SubModelType

NAME_MAX = 255   # bytes of one path component (Linux, macOS, Windows)
PATH_MAX = 4096  # bytes of a whole path (Linux)


def no_nul(value: str) -> str:
    """No NUL byte: no path, URL or repo id holds one, and the OS refuses it (a 500 if it got that far)."""
    if "\x00" in value:
        raise ValueError("must not contain a NUL byte")
    return value


def check_path(value: str) -> str:
    """A path the operating system can take: refused here (422) rather than by the OS later (a 500)."""
    no_nul(value)
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a path must be valid UTF-8 text") from None
    if len(raw) > PATH_MAX:
        raise ValueError(f"path is {len(raw)} bytes long, over the {PATH_MAX} a path may have")
    longest = max(raw.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise ValueError(f"path has a {len(longest)}-byte component, over the {NAME_MAX} a file name may have")
    return value


class ListingValues(BaseModel):
    """What a listing sorts a record by beyond its config (``order_by`` size, added, modified)."""

    size: int = Field(description="bytes of the files recorded at its install (0: none recorded)")
    added: datetime = Field(description="when the log recorded the model's add")
    modified: datetime = Field(description="when the log recorded its last change")


class ModelPage(BaseModel):
    total: int = Field(description="models matching the filters")
    offset: int
    limit: int
    items: list[AnyModelConfig]  # type: ignore[valid-type]
    listing: dict[str, ListingValues] = Field(default_factory=dict, description="per item key")


class RenameRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=512)


class InstallRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(min_length=1, max_length=4096,
                        description="a local path, a URL, a Hugging Face repo id (owner/name[:sub]) or civitai:ID")
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="record fields and identification overrides (name, base_model...)")
    inplace: bool = Field(default=False, description="register a local path where it is instead of copying it")
    force: bool = Field(default=False, description="install content already installed, under a new key")
    revision: str | None = Field(default=None, max_length=256, description="Hugging Face revision")
    variant: str | None = Field(default=None, max_length=64, description="diffusers variant, e.g. fp16")
    access_token: str | None = Field(default=None, max_length=4096, description="for this download only; never logged")
    command_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:\-]{1,128}$",
                                   description="idempotency: a repeated command_id returns the first job")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$",
                               description="a URL download's expected SHA-256: a mismatch fails and leaves nothing")
    blake3: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$",
                               description="a URL download's expected BLAKE3: a mismatch fails and leaves nothing")
    include: list[Annotated[str, Field(min_length=1, max_length=512)]] | None = Field(
        default=None, max_length=100, description="Hugging Face: only the files matching these globs")
    exclude: list[Annotated[str, Field(min_length=1, max_length=512)]] | None = Field(
        default=None, max_length=100, description="Hugging Face: leave out the files matching these globs")

    _source = field_validator("source")(no_nul)

    def options(self) -> dict[str, Any]:
        return self.model_dump(exclude={"source"}, exclude_none=True)


class ScanRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=PATH_MAX, description="a folder to scan for models (on a worker: "
                      "inside the import roots)")
    timeout: float = Field(default=defaults.SCAN_TIMEOUT, gt=0, le=24 * 3600,
                           description="seconds to wait for the worker's answer (504 after: the scan goes on)")

    _path = field_validator("path")(check_path)


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    submodel: SubModelType | None = Field(default=None, description="the part of a main model to load")
    worker: str | None = Field(default=None, max_length=256, description="a worker id; default: the one holding it")
    wait: bool = Field(default=True, description="answer after model_load_completed")
    timeout: float = Field(default=120.0, gt=0, le=3600)


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    worker: str | None = Field(default=None, max_length=256)


class WorkerInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    alive: bool
    last_heartbeat: float
    queues: list[str] = Field(default_factory=list)
    host: str | None = None
    pid: int | None = None
    device: str | None = None
    models: list[Any] = Field(default_factory=list, description="the worker's cache contents")


class HistoryEntry(BaseModel):
    position: str
    type: str
    event: dict[str, Any]


class RedisHealth(BaseModel):
    ok: bool
    latency_ms: float | None = None
    error: str | None = None


class Health(BaseModel):
    status: str = Field(description="ok | degraded (no live worker, a queue with jobs that no live worker "
                                    "serves, or quarantined log entries) | unavailable (Redis unreachable)")
    redis: RedisHealth
    workers_alive: int
    queues: dict[str, int] = Field(default_factory=dict)
    unserved: list[str] = Field(default_factory=list, description="queues with waiting jobs and no live worker")
    quarantined: int = Field(default=0, description="log entries refused by every reader (degraded while any)")


class Removed(BaseModel):
    key: str
    deleted_files: bool


