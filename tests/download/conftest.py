"""Fixtures of the download tests: real servers on 127.0.0.1 and a service with short timeouts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelbus.services.config import AppConfig
from modelbus.services.download import DownloadQueueService, FetchOptions
from tests.servers import CivitaiServer, FileServer, HFServer


@pytest.fixture()
def file_server() -> Iterator[FileServer]:
    with FileServer() as srv:
        yield srv


@pytest.fixture()
def hf_server() -> Iterator[HFServer]:
    with HFServer() as srv:
        yield srv


@pytest.fixture()
def civitai_server() -> Iterator[CivitaiServer]:
    with CivitaiServer() as srv:
        yield srv


@pytest.fixture()
def dl_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AppConfig:
    for var in ("HF_TOKEN", "CIVITAI_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODELBUS_ROOT", str(tmp_path / "root"))
    return AppConfig.load(root=tmp_path / "root", allow_private_downloads=True, download_stall_timeout=0.5,
                          download_retries=3, download_parts=4)


def fast_options(config: AppConfig, **overrides: Any) -> FetchOptions:
    values: dict[str, Any] = {"backoff_base": 0.01, "backoff_max": 0.05, "retry_after_max": 1.5,
                                  "min_part_size": 64 << 10, "connect_timeout": 2.0, "state_interval": 0.05}
    values.update(overrides)
    return FetchOptions.from_config(config, **values)


class Events:
    """A publisher that records (event_type, payload) pairs."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, payload: dict[str, Any]) -> None:
        self.items.append((event, payload))

    def types(self) -> list[str]:
        return [e for e, _ in self.items]


@pytest.fixture()
def events() -> Events:
    return Events()


@pytest.fixture()
def service(dl_config: AppConfig, events: Events) -> Iterator[DownloadQueueService]:
    svc = DownloadQueueService(3, dl_config, events, options=fast_options(dl_config))
    svc.start()
    yield svc
    svc.cancel_all_jobs()
    svc.stop()
