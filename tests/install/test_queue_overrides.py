"""The install config's overrides through the queues (real worker processes): a chosen key is the
record's key, and a type that does not fit the files ends the job at once naming both."""

from __future__ import annotations

from pathlib import Path

from modelbus.services.install import InstallStatus, ModelInstallService
from tests.fixtures.model_files import make_lora_kohya, make_textual_inversion
from tests.install.conftest import Bus

TIMEOUT = 60


def test_a_chosen_key_through_the_queue(bus: Bus, installer: ModelInstallService, tmp_path: Path) -> None:
    source = make_lora_kohya(tmp_path / "keyed_lora.safetensors", rank=12)
    job = installer.heuristic_import(str(source), config={"key": "queued-key_1"})
    done = installer.wait_for_job(job, timeout=TIMEOUT)
    assert done.status is InstallStatus.COMPLETED, (done.error, bus.worker_log())
    assert done.key == "queued-key_1"
    assert installer.record_store.get_model("queued-key_1").model_type.value == "lora"


def test_a_type_that_does_not_fit_ends_the_job_naming_it(bus: Bus, installer: ModelInstallService,
                                                         tmp_path: Path) -> None:
    source = make_textual_inversion(tmp_path / "queued_emb.safetensors", fmt="safetensors")
    before = {m.key for m in installer.record_store.all_models()}
    job = installer.heuristic_import(str(source), config={"model_type": "lora"})
    done = installer.wait_for_job(job, timeout=TIMEOUT)
    assert done.status is InstallStatus.ERROR, bus.worker_log()
    assert done.error_type == "InvalidModelConfigException"
    assert "lora" in (done.error or "") and "embedding_file" in (done.error or "")
    assert {m.key for m in installer.record_store.all_models()} == before  # nothing recorded
    placed = [p for p in bus.config.models_path.rglob("queued_emb*") if p.is_file()]
    assert placed == []
