"""``modelbus scan DIR`` and ``modelbus sync``: their outcomes typed (events.jobs.ScanOutcome /
SyncOutcome), printed as that JSON with --json and as a summary without."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from modelbus.events.jobs import ScanOutcome, SyncOutcome
from modelbus.services.cli import app
from modelbus.services.client import ModelBusClient
from modelbus.services.config import AppConfig
from tests.fixtures.model_files import make_lora_kohya


def _run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (args, result.stdout, result.stderr)
    return result.stdout


def test_scan_and_sync_print_their_outcomes(app_config: AppConfig) -> None:
    folder = app_config.models_path / "scanned"
    folder.mkdir(parents=True)
    first = make_lora_kohya(folder / "one.safetensors", rank=4)
    make_lora_kohya(folder / "two.safetensors", rank=8)
    scanned = ScanOutcome.model_validate(json.loads(_run("scan", str(folder), "--json")))
    assert len(scanned.added) == 2
    with ModelBusClient(app_config) as client:
        assert sorted(m.key for m in client.list_models()) == sorted(scanned.added)
        gone = next(m.key for m in client.list_models() if m.path.endswith("one.safetensors"))
    assert "registered 0 model(s)" in _run("scan", str(folder))  # already recorded: nothing new
    first.unlink()
    synced = SyncOutcome.model_validate(json.loads(_run("sync", "--json")))
    assert synced.missing == (gone,) and synced.added == ()
    assert f"missing: {gone}" in _run("sync")
