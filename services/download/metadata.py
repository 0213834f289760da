"""What a source tells about a model, returned with its download for the install service to record."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ModelMetadata(BaseModel):
    """Metadata from Hugging Face or Civitai; fields a source does not publish stay None/empty."""

    source: str
    name: str | None = None
    author: str | None = None
    description: str | None = None
    license: str | None = None
    tags: list[str] = Field(default_factory=list)
    thumbnail_url: str | None = None
    source_url: str | None = None
    # Hugging Face
    repo_id: str | None = None
    revision: str | None = None
    # Civitai
    model_id: int | None = None
    version_id: int | None = None
    version_name: str | None = None
    base_model: str | None = None
    trained_words: list[str] = Field(default_factory=list)
    allow_commercial_use: list[str] | str | bool | None = None
    allow_derivatives: bool | None = None
    allow_no_credit: bool | None = None
    allow_different_license: bool | None = None
    nsfw: bool | None = None
    hashes: dict[str, str] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
