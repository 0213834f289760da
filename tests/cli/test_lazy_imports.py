"""The CLI answers at once: importing it (or the client) pulls neither torch nor diffusers, nor the
install service; only a command that needs them imports them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "transformers", "modelbus.services.install", "modelbus.services.load")


def _imported_after(statement: str) -> list[str]:
    """Which of HEAVY a fresh interpreter holds after ``statement`` (the worktree's code: PYTHONPATH)."""
    probe = f"import json, sys\n{statement}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("statement", ["import services.cli", "import services.client",
                                       "from services.client import ModelBusClient; ModelBusClient()"])
def test_the_cli_and_the_client_import_nothing_heavy(statement: str, modelbus_env: dict[str, str]) -> None:
    assert _imported_after(statement) == []


def test_the_install_bridge_still_comes_on_first_use(modelbus_env: dict[str, str]) -> None:
    # the lazy seam works: asking for the features imports the install service (and still no torch)
    found = _imported_after("from services.client import ModelBusClient; ModelBusClient().installs.installer")
    assert "modelbus.services.install" in found and "torch" not in found


def test_identifying_a_pickle_still_imports_torch(tmp_path, modelbus_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    import torch

    path = tmp_path / "tiny.pt"
    torch.save({"w": torch.zeros(2, 3)}, path)
    found = _imported_after(f"from services.probe import read_tensor_index; from pathlib import Path\n"
                            f"assert read_tensor_index(Path({str(path)!r})).shapes == {{'w': (2, 3)}}")
    assert "torch" in found
