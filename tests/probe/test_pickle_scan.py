"""Pickles are scanned without being executed; unsafe ones are refused with the finding."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from modelbus.services.probe import (
    CorruptModelError,
    UnsafeModelError,
    inspect_pickle,
    probe,
    safe_torch_load,
    scan_pickle,
)
from tests import fixtures as fx


class _System:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, ("true",)


def test_clean_checkpoints_have_no_findings(tmp_path: Path) -> None:
    for legacy in (False, True):
        path = fx.write_torch(tmp_path / f"clean{legacy}.pt", {"w": torch.zeros(2, 3)}, legacy=legacy)
        assert scan_pickle(path) == []
        assert "torch._utils._rebuild_tensor_v2" in inspect_pickle(path).globals


def test_the_payload_fixture_really_runs_when_unpickled_unsafely(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = fx.make_unsafe_pickle(tmp_path / "model.ckpt", marker)
    torch.load(path, weights_only=False, map_location="meta")
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_exec_payload_is_found_and_never_run(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "executed"
    if legacy:
        path = fx.write_torch(tmp_path / "legacy.ckpt", _payload_state(marker), legacy=True)
    else:
        path = fx.make_unsafe_pickle(tmp_path / "model.ckpt", marker)
    assert scan_pickle(path) == ["builtins.exec"]
    with pytest.raises(UnsafeModelError, match="builtins.exec") as info:
        probe(path)
    assert info.value.findings == ["builtins.exec"]
    with pytest.raises(UnsafeModelError):
        probe(path, {"model_type": "main", "base_model": "sd-1", "model_format": "checkpoint"})
    with pytest.raises(UnsafeModelError):
        safe_torch_load(path)
    assert not marker.exists()


def _payload_state(marker: Path) -> dict[str, Any]:
    class _Exec:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return exec, (f"open({str(marker)!r}, 'w').write('x')",)

    return {"state_dict": {"w": torch.zeros(1)}, "payload": _Exec()}


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_every_pickle_protocol_names_the_global(tmp_path: Path, protocol: int) -> None:
    """Protocol 4+ imports with STACK_GLOBAL from memoised strings; older ones with GLOBAL."""
    path = tmp_path / "plain.bin"
    path.write_bytes(pickle.dumps({"a": [1, 2], "b": _System()}, protocol=protocol))
    assert scan_pickle(path) == [f"{os.system.__module__}.system"]


def test_stack_global_built_at_run_time_is_a_finding(tmp_path: Path) -> None:
    # STACK_GLOBAL whose module name comes from a non-string op: cannot be resolved statically
    stream = b"\x80\x04" + b"K\x01" + b"\x8c\x06system\x94" + b"\x93" + b"."
    path = tmp_path / "odd.pt"
    path.write_bytes(stream)
    assert scan_pickle(path) == ["<unresolved STACK_GLOBAL>"]


def test_lightning_checkpoint_loads_with_stubs(tmp_path: Path) -> None:
    path = fx.make_sd1_checkpoint(tmp_path / "v1-5-pruned.ckpt")
    scan = inspect_pickle(path)
    assert scan.findings == []
    assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in scan.globals
    obj = safe_torch_load(path)
    assert obj["global_step"] == 470000
    assert obj["state_dict"]["model.diffusion_model.input_blocks.0.0.weight"].shape == (320, 4, 3, 3)
    assert obj["state_dict"]["model.diffusion_model.input_blocks.0.0.weight"].device.type == "meta"
    cpu = safe_torch_load(path, map_location="cpu")
    assert cpu["state_dict"]["model.diffusion_model.out.2.weight"].abs().sum().item() == 0


def test_corrupt_pickles(tmp_path: Path) -> None:
    html = tmp_path / "login.ckpt"
    html.write_bytes(b"<!DOCTYPE html><html>please log in</html>")
    with pytest.raises(CorruptModelError, match="not a valid pickle"):
        probe(html)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CorruptModelError, match="empty"):
        scan_pickle(empty)
    nopkl = tmp_path / "archive.pt"
    with zipfile.ZipFile(nopkl, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(CorruptModelError, match="no pickle"):
        scan_pickle(nopkl)
    good = fx.write_torch(tmp_path / "good.pt", {"w": torch.zeros(64, 64)})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:-3000])
    with pytest.raises(CorruptModelError):
        probe(truncated)
