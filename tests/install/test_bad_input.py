"""Each bad input ends its job in ``error`` with a message naming the cause, and leaves no record, no
partial file in the models directory and no job that never ends. A cancel stops a running download."""

from __future__ import annotations

from pathlib import Path

import pytest
from rq.job import Job

from modelbus.services.install import InstallJob, InstallStatus, ModelInstallService
from modelbus.services.install.placement import staging_dir
from tests.fixtures import gguf_files as g
from tests.fixtures.model_files import make_lora_kohya
from tests.install.conftest import Bus
from tests.servers import Fault
from tests.waiting import wait_until

TIMEOUT = 60


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def _bad_sources(bus: Bus, tmp_path: Path) -> dict[str, tuple[str, str, str]]:
    """name -> (source, a phrase the error must contain, the error type)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("these are not weights\n" * 10)
    good = make_lora_kohya(tmp_path / "whole.safetensors", rank=4).read_bytes()
    truncated = tmp_path / "truncated_lora.safetensors"
    truncated.write_bytes(good[: len(good) // 2])
    small = {"img_in.weight": (256, 64), "double_blocks.0.img_attn.qkv.weight": (768, 256)}
    cut = g.write_gguf(tmp_path / "cut-Q8_0.gguf", small, "Q8_0")
    with cut.open("r+b") as fh:
        fh.truncate(cut.stat().st_size - 1000)
    odd = g.set_tensor_type(g.write_gguf(tmp_path / "odd-Q8_0.gguf", small, "Q8_0"), "img_in.weight", 99)
    llm = g.write_gguf(tmp_path / "tinyllama-Q4_K.gguf", g.llm_shapes(layers=2, width=256), "Q4_K", "llama",
                       metadata={"tokenizer.ggml.model": "llama"})  # fmt: skip
    return {
        "truncated gguf": (str(cut), "truncated GGUF: tensor", "ModelIdentificationError"),
        "gguf of an unknown quantization type": (str(odd), "unknown quantization type 99", "ModelIdentificationError"),
        "gguf of a language model": (str(llm), "GGUF of a language model (architecture 'llama'", "ModelIdentificationError"),
        "non-model file": (str(notes), "notes.txt", "ModelIdentificationError"),
        "truncated safetensors": (str(truncated), "truncated_lora.safetensors", "ModelIdentificationError"),
        "unknown civitai id": ("civitai:987654", "987654", "MetadataError"),
        "404 url": (bus.files.url_for("nowhere/gone_lora.safetensors"), "404", "RemoteError"),
    }


def test_each_bad_input_ends_in_error_and_leaves_nothing(bus: Bus, installer: ModelInstallService,
                                                          tmp_path: Path) -> None:
    cases = _bad_sources(bus, tmp_path)
    before = {m.key for m in installer.record_store.all_models()}
    jobs = {name: installer.heuristic_import(source) for name, (source, _, _) in cases.items()}
    ended: dict[str, InstallJob] = {name: installer.wait_for_job(job, timeout=TIMEOUT) for name, job in jobs.items()}
    for name, job in ended.items():
        _, phrase, error_type = cases[name]
        assert job.status is InstallStatus.ERROR, (name, job, bus.worker_log())
        assert job.error and phrase in job.error and "\n" not in job.error, (name, job.error_type, job.error)
        assert job.error_type == error_type, (name, job.error_type, job.error)
        assert not staging_dir(bus.config, job.id).exists(), name
    assert {m.key for m in installer.record_store.all_models()} == before
    models = bus.config.models_path
    leftovers = [p for p in _files_under(models) if any(s in p.name for s in ("truncated", "notes", "gone", ".part", ".gguf"))]
    assert leftovers == []
    assert all(j.terminal for j in installer.list_jobs() if j.id in {x.id for x in jobs.values()})


def test_a_missing_path_is_refused_at_submission_and_appends_nothing(bus: Bus, installer: ModelInstallService,
                                                                     tmp_path: Path) -> None:
    from modelbus.services.install.errors import InvalidSourceError
    store = installer.event_store
    head = store.head()
    with pytest.raises(InvalidSourceError, match="no such file"):
        installer.heuristic_import(str(tmp_path / "no_such_model.safetensors"))
    assert store.head() == head


def test_cancel_stops_a_running_download_and_cleans_up(bus: Bus, installer: ModelInstallService) -> None:
    name = "files/slow_lora.safetensors"
    bus.files.add_file(name, b"\x00" * (2 << 20))
    # the server sends 64 KiB and then stalls for a minute: only a cancel can end this job in time
    bus.files.set_fault(name, Fault(stall_after=64 << 10, stall_seconds=60, times=None))
    job = installer.heuristic_import(bus.files.url_for(name))
    wait_until(lambda: installer.get_job_by_id(job.id).bytes > 0, TIMEOUT, "the download to start")
    cancelled = installer.cancel_job(job)
    assert cancelled.status is InstallStatus.CANCELLED
    client = installer.event_store.client
    download = wait_until(lambda: _finished(client, f"{job.id}-dl0"), 30, "the download job to stop")
    assert download.return_value() == "cancelled"
    wait_until(lambda: not staging_dir(bus.config, job.id).exists(), 30, "the staging folder to go")
    assert installer.get_job_by_id(job.id).status is InstallStatus.CANCELLED
    assert installer.cancel_job(job).status is InstallStatus.CANCELLED  # cancelling again changes nothing


def _finished(client, rq_id: str) -> Job | None:  # type: ignore[no-untyped-def]
    job = Job.fetch(rq_id, connection=client)
    return job if job.is_finished else None


def test_unknown_command_ids_are_refused(installer: ModelInstallService, tmp_path: Path) -> None:
    from modelbus.services.install import InvalidCommandError
    with pytest.raises(InvalidCommandError, match="command id"):
        installer.heuristic_import(str(tmp_path), command_id="has spaces/and:colons")
