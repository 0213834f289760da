"""Hostile-test fixtures: a download configuration that takes no token or proxy from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelbus.services.config import AppConfig


@pytest.fixture()
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AppConfig:
    """Private addresses allowed (the test servers are on loopback), short stalls, one retry."""
    for var in ("HF_TOKEN", "CIVITAI_TOKEN", "HF_ENDPOINT", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY",
                "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    return AppConfig.load(root=tmp_path / "root", allow_private_downloads=True, download_stall_timeout=1.0,
                          download_retries=1)
