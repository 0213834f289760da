"""The CLI answers at once: importing it (or the client) pulls neither torch nor diffusers, nor the
install service; only a command that needs them imports them. Nor do the reading commands pay for what
only other commands use (RQ, YAML, the catalogue, the download stack), and the pydantic classes of records
and events build their validators when first used, not at import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "transformers", "modelbus.services.install", "modelbus.services.load")


#: what the reading commands (list, show, jobs, workers, events) leave for the commands that use it
DEFERRED = ("rq", "yaml", "httpx", "modelbus.services.catalog", "modelbus.services.routing",
            "modelbus.services.install.service", "modelbus.services.download")


def _imported_after(statement: str, names: tuple[str, ...] = HEAVY) -> list[str]:
    """Which of ``names`` a fresh interpreter holds after ``statement`` (the worktree's code: PYTHONPATH)."""
    probe = f"import json, sys\n{statement}\nprint(json.dumps([m for m in {names!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("statement", ["import services.cli", "import services.client",
                                       "from services.client import ModelBusClient; ModelBusClient()"])
def test_the_cli_and_the_client_import_nothing_heavy(statement: str, modelbus_env: dict[str, str]) -> None:
    assert _imported_after(statement) == []


def test_the_cli_leaves_what_reading_commands_do_not_need(modelbus_env: dict[str, str]) -> None:
    assert _imported_after("import modelbus.services.cli.app", DEFERRED) == []


def test_listing_jobs_reads_them_without_the_install_service(modelbus_env: dict[str, str]) -> None:
    # the job fold and the progress board suffice; the service (downloads, probing, RQ) is not imported
    statement = "from modelbus.services.client import ModelBusClient\nassert ModelBusClient().jobs() == []"
    assert _imported_after(statement, DEFERRED) == []


def test_record_and_event_classes_build_their_validators_on_first_use(modelbus_env: dict[str, str]) -> None:
    probe = """
import json, sys
from pydantic_core import SchemaValidator
import modelbus.services.cli.app
from modelbus.events.schema import ModelAdded, ModelRemoved
from modelbus.services.records.models import LoRALycorisConfig, MainCheckpointConfig
from modelbus.services.records.parsing import parse_config
classes = (LoRALycorisConfig, MainCheckpointConfig, ModelAdded, ModelRemoved)
def built():
    return [c.__name__ for c in classes if isinstance(c.__dict__.get("__pydantic_validator__"), SchemaValidator)]
at_import = built()
record = parse_config({"name": "m", "model_type": "lora", "model_format": "lycoris", "base_model": "sd-1",
                       "path": "m.safetensors"}, key="k")
ModelAdded(aggregate_id="k", config=record.model_dump(mode="json"))
print(json.dumps([at_import, built()]))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    at_import, after_use = json.loads(out.stdout.strip().splitlines()[-1])
    assert at_import == []
    assert after_use == ["LoRALycorisConfig", "ModelAdded"]  # the classes used, and only those


def test_the_install_bridge_still_comes_on_first_use(modelbus_env: dict[str, str]) -> None:
    # the lazy seam works: asking for the features imports the install service (and still no torch)
    found = _imported_after("from services.client import ModelBusClient; ModelBusClient().installs.installer",
                            (*HEAVY, "modelbus.services.install.service"))
    assert "modelbus.services.install.service" in found and "torch" not in found


def test_identifying_a_pickle_still_imports_torch(tmp_path, modelbus_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    import torch

    path = tmp_path / "tiny.pt"
    torch.save({"w": torch.zeros(2, 3)}, path)
    found = _imported_after(f"from services.probe import read_tensor_index; from pathlib import Path\n"
                            f"assert read_tensor_index(Path({str(path)!r})).shapes == {{'w': (2, 3)}}")
    assert "torch" in found
