"""Per-model data a user edits: default settings, trigger phrases, links to other models, the cover.

Each is part of the record (fields of ``ModelConfigBase``) and changes only by its own domain event
(events.schema: ModelSettingsChanged, ModelLinked, ModelUnlinked, ModelCoverChanged), which
:func:`patch` folds into the record's state; every projection (SQL, YAML, memory), replay and time
travel go through it (services.records.fold.step). The bodies are checked here, once, for every reader
and the append alike (events.validation), so a bad value is refused before it is in the log.

Links live on the model that declares them (a LoRA names the main model it was made for); the other
side finds them by asking who links to it (``ModelRecordServiceBase.linked_from``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelbus.events.validation import register_body_check

#: InvokeAI's scheduler names (diffusers schedulers; ``_k``: Karras sigmas)
SchedulerName = Literal[
    "ddim", "ddpm", "deis", "deis_k", "lms", "lms_k", "pndm", "heun", "heun_k", "euler", "euler_k", "euler_a",
    "kdpm_2", "kdpm_2_k", "kdpm_2_a", "kdpm_2_a_k", "dpmpp_2s", "dpmpp_2s_k", "dpmpp_2m", "dpmpp_2m_k",
    "dpmpp_2m_sde", "dpmpp_2m_sde_k", "dpmpp_3m", "dpmpp_3m_k", "dpmpp_sde", "dpmpp_sde_k", "unipc", "unipc_k",
    "lcm", "tcd",
]
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)
#: the model types that take default settings, and those that take trigger phrases
SETTINGS_TYPES = ("main", "onnx")
TRIGGER_TYPES = ("lora", "embedding", "main")
#: how a model may relate to another, by the linking model's type
RELATIONS: dict[str, tuple[str, ...]] = {
    "for": ("lora", "embedding", "controlnet", "ip_adapter", "t2i_adapter", "vae", "clip_vision", "t5_encoder",
            "clip_embed"),
    "uses": ("main", "ip_adapter"),  # a pipeline using a VAE, encoder...; an IP-Adapter its image encoder
}
MAX_PHRASES = 64
MAX_PHRASE_LENGTH = 256
MAX_LINKS = 256
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.:\-]{1,256}$")


class DefaultSettings(BaseModel):
    """What a generation with this main model starts from; every field optional."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    vae: str | None = Field(default=None, pattern=KEY_PATTERN.pattern,
                            description="key of the VAE model to use instead of the pipeline's own")
    scheduler: SchedulerName | None = None
    steps: int | None = Field(default=None, ge=1, le=1000)
    cfg_scale: float | None = Field(default=None, ge=1.0, le=100.0)
    width: int | None = Field(default=None, ge=64, le=16384, multiple_of=8)
    height: int | None = Field(default=None, ge=64, le=16384, multiple_of=8)
    clip_skip: int | None = Field(default=None, ge=0, le=12)
    guidance: float | None = Field(default=None, ge=0.0, le=100.0, description="FLUX's distilled guidance")


class ModelLink(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    key: str = Field(pattern=KEY_PATTERN.pattern)
    relation: Literal["for", "uses"]


class Cover(BaseModel):
    """The model's cover: a WebP thumbnail named by its BLAKE3 (services.covers keeps the bytes)."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    blake3: str = Field(pattern=r"^[0-9a-f]{64}$")
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    bytes: int = Field(ge=1)
    source: str | None = Field(default=None, max_length=2048, description="where it came from (file, URL)")


def clean_phrases(phrases: Any) -> list[str]:
    """Trigger phrases stripped, empty ones dropped, repeats removed (first kept); ValueError when bad."""
    if isinstance(phrases, str) or not isinstance(phrases, list | tuple):
        raise ValueError("trigger phrases must be a list of strings")  # noqa: TRY004 - the hook's one error type
    out: list[str] = []
    for phrase in phrases:
        if not isinstance(phrase, str):
            raise ValueError(f"trigger phrase {phrase!r} is not a string")  # noqa: TRY004
        text = " ".join(phrase.split())
        if len(text) > MAX_PHRASE_LENGTH:
            raise ValueError(f"trigger phrase {text[:40]!r}... is longer than {MAX_PHRASE_LENGTH} characters")
        if text and text not in out:
            out.append(text)
    if len(out) > MAX_PHRASES:
        raise ValueError(f"{len(out)} trigger phrases: at most {MAX_PHRASES}")
    return out


def settings_errors(settings: Mapping[str, Any]) -> list[tuple[str, Any, str]]:
    """(field, value, why) for each bad field of a default-settings object; empty when it is valid."""
    try:
        DefaultSettings.model_validate(dict(settings))
    except ValidationError as exc:
        out = []
        for error in exc.errors(include_url=False):
            field = ".".join(str(x) for x in error["loc"]) or "settings"
            message = error["msg"]
            if error["type"] == "extra_forbidden":
                message = "not a default setting (known: " + ", ".join(DefaultSettings.model_fields) + ")"
            out.append((field, error.get("input"), message))
        return out
    return []


# --- the fold ----------------------------------------------------------------------------------------

PATCH_TYPES = frozenset({"ModelSettingsChanged", "ModelLinked", "ModelUnlinked", "ModelCoverChanged"})


def patch(state: dict[str, Any] | None, type_name: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record after one per-model-data event (``type_name`` in :data:`PATCH_TYPES`)."""
    if state is None:
        return None  # an event for a record we never saw (or removed) changes nothing
    if type_name == "ModelSettingsChanged":
        out = dict(state)
        if body.get("settings") is not None:
            out["default_settings"] = {k: v for k, v in body["settings"].items() if v is not None} or None
        if body.get("trigger_phrases") is not None:
            out["trigger_phrases"] = list(body["trigger_phrases"])
        return out
    if type_name == "ModelLinked" or type_name == "ModelUnlinked":
        target = body.get("target")
        if not isinstance(target, str):
            raise ValueError(f"{type_name} without a target string")
        links = [link for link in state.get("links") or () if link.get("key") != target]
        if type_name == "ModelLinked":
            links.append({"key": target, "relation": body.get("relation")})
        return {**state, "links": links}
    if type_name == "ModelCoverChanged":
        return {**state, "cover": body.get("cover")}
    return state


# --- the checks every reader and the append share (events.validation) ------------------------------

def _check_settings(aggregate_id: str, body: Mapping[str, Any]) -> None:
    settings = body.get("settings")
    if settings is not None:
        problems = settings_errors(settings)
        if problems:
            field, value, why = problems[0]
            raise ValueError(f"default setting {field}={value!r}: {why}")
    phrases = body.get("trigger_phrases")
    if phrases is not None and clean_phrases(phrases) != list(phrases):
        raise ValueError("trigger phrases are not in their clean form (stripped, unique, non-empty)")


def _check_link(aggregate_id: str, body: Mapping[str, Any]) -> None:
    ModelLink.model_validate({"key": body.get("target"), "relation": body.get("relation")})
    if body.get("target") == aggregate_id:
        raise ValueError("a model cannot be linked to itself")


def _check_unlink(aggregate_id: str, body: Mapping[str, Any]) -> None:
    if not KEY_PATTERN.match(str(body.get("target"))):
        raise ValueError(f"target {body.get('target')!r} is not a model key")


def _check_cover(aggregate_id: str, body: Mapping[str, Any]) -> None:
    if body.get("cover") is not None:
        Cover.model_validate(body["cover"])


register_body_check("ModelSettingsChanged", _check_settings)
register_body_check("ModelLinked", _check_link)
register_body_check("ModelUnlinked", _check_unlink)
register_body_check("ModelCoverChanged", _check_cover)
