"""What every command shares: the --debug flag and one client, opened on first use."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported by the first command that needs them (not by --help, not at import)
    from modelbus.services.client import ModelBusClient
    from modelbus.services.config import AppConfig


@dataclass
class State:
    debug: bool = bool(os.environ.get("MODELBUS_DEBUG"))
    _client: ModelBusClient | None = None

    def config(self) -> AppConfig:
        from modelbus.services.config import AppConfig
        return AppConfig.load()  # a ConfigError is invalid input: exit code 2

    def client(self) -> ModelBusClient:
        if self._client is None:
            from modelbus.services.client import ModelBusClient
            self._client = ModelBusClient(self.config())
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


state = State()


def client() -> ModelBusClient:
    return state.client()
