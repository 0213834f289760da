"""What a file fetch needs to know: tunables (from AppConfig) and the file asked for."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelbus.services.config import AppConfig

from .security import Credential


@dataclass(frozen=True)
class FetchOptions:
    parts: int = 4
    min_part_size: int = 32 << 20
    retries: int = 5
    stall_timeout: float = 30.0
    connect_timeout: float = 15.0
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: float = 120.0
    state_interval: float = 0.5
    state_every_bytes: int = 8 << 20  # also save after this many new bytes: a kill re-fetches little
    disk_reserve: int = 16 << 20
    fsync: bool = True
    allow_private: bool = False
    proxy: str | None = None  # MODELBUS_DOWNLOAD_PROXY; the environment's proxies are never used
    lock_wait: float = 60.0  # s; how long a download waits for another writer of its partial file

    @classmethod
    def from_config(cls, config: AppConfig, **overrides: object) -> FetchOptions:
        values: dict[str, object] = {
            "parts": config.download_parts,
            "retries": config.download_retries,
            "stall_timeout": config.download_stall_timeout,
            "allow_private": config.allow_private_downloads,
            "proxy": config.download_proxy,
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


@dataclass
class FileRequest:
    url: str
    dest_dir: Path
    name: str | None = None  # a checked relative path; None = from the response
    size: int | None = None
    sha256: str | None = None
    credential: Credential | None = None
    expect_model: bool | None = None  # None = decide by the file name's suffix
