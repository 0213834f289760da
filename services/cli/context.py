"""What every command shares: the --debug flag and one client, opened on first use."""

from __future__ import annotations

import os
from dataclasses import dataclass

from services.cli.errors import CliError
from services.client import ModelBusClient
from services.config import AppConfig, ConfigError


@dataclass
class State:
    debug: bool = bool(os.environ.get("MODELBUS_DEBUG"))
    _client: ModelBusClient | None = None

    def config(self) -> AppConfig:
        try:
            return AppConfig.load()
        except ConfigError as exc:
            raise CliError(str(exc), 2) from exc

    def client(self) -> ModelBusClient:
        if self._client is None:
            self._client = ModelBusClient(self.config())
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


state = State()


def client() -> ModelBusClient:
    return state.client()
