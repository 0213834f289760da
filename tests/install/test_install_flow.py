"""Installs through the queues, end to end: a command, real worker processes, files on disk, records."""

from __future__ import annotations

from pathlib import Path

from modelbus.services.install import InstallStatus, ModelInstallService
from modelbus.services.install.placement import staging_dir
from tests.fixtures.model_files import make_lora_diffusers, make_lora_kohya, make_vae_checkpoint
from tests.install.conftest import Bus

TIMEOUT = 60


def _models(bus: Bus) -> Path:
    return bus.config.models_path


def test_install_from_local_path_copies_into_models_dir(bus: Bus, installer: ModelInstallService,
                                                         tmp_path: Path) -> None:
    source = make_lora_kohya(tmp_path / "local_lora.safetensors", rank=4)
    job = installer.heuristic_import(str(source), config={"description": "from disk"})
    assert job.status is InstallStatus.WAITING
    done = installer.wait_for_job(job, timeout=TIMEOUT)
    assert done.status is InstallStatus.COMPLETED, (done.error, bus.worker_log())
    record = installer.record_store.get_model(done.key)
    assert record.path == "sd-1/lora/local_lora.safetensors"
    assert (_models(bus) / record.path).read_bytes() == source.read_bytes()
    assert source.exists()  # a copy: the user's file stays
    assert record.description == "from disk"
    assert record.hash.startswith("blake3:")
    assert done.config is not None and done.config["key"] == done.key
    assert done.bytes == done.total_bytes == source.stat().st_size
    assert not staging_dir(bus.config, job.id).exists()


def test_register_in_place_through_the_queue(bus: Bus, installer: ModelInstallService) -> None:
    source = make_vae_checkpoint(bus.library / "inplace_vae.safetensors")  # in place: only from an import root
    job = installer.heuristic_import(source, inplace=True)
    done = installer.wait_for_job(job, timeout=TIMEOUT)
    assert done.status is InstallStatus.COMPLETED, (done.error, bus.worker_log())
    record = installer.record_store.get_model(done.key)
    assert Path(record.path) == source.resolve()
    assert record.model_type.value == "vae"


def test_install_from_url(bus: Bus, installer: ModelInstallService, tmp_path: Path) -> None:
    data = make_lora_kohya(tmp_path / "url_lora.safetensors", rank=8).read_bytes()
    url = bus.files.add_file("files/url_lora.safetensors", data)
    done = installer.wait_for_job(installer.heuristic_import(url), timeout=TIMEOUT)
    assert done.status is InstallStatus.COMPLETED, (done.error, bus.worker_log())
    record = installer.record_store.get_model(done.key)
    assert (_models(bus) / record.path).read_bytes() == data
    assert record.source == url
    assert done.bytes == done.total_bytes == len(data)
    progress = [s.event for s in installer.event_store.read(stream="activity")
                if getattr(s.event, "kind", None) == "install_progress" and s.event.correlation_id == done.id]
    assert progress and progress[-1].payload["bytes"] == len(data)


def test_install_from_hugging_face_repo(bus: Bus, installer: ModelInstallService, tmp_path: Path) -> None:
    folder = make_lora_diffusers(tmp_path / "repo", base="sdxl", folder=True)
    (folder / "README.md").write_text("a tiny lora")
    bus.hub.add_repo("acme/tiny-lora", folder, card={"license": "mit"}, tags=["lora", "sdxl"])
    done = installer.wait_for_job(installer.heuristic_import("acme/tiny-lora"), timeout=TIMEOUT)
    assert done.status is InstallStatus.COMPLETED, (done.error, bus.worker_log())
    record = installer.record_store.get_model(done.key)
    assert record.path == "sdxl/lora/tiny-lora"
    assert (_models(bus) / record.path / "pytorch_lora_weights.safetensors").is_file()
    assert record.base_model.value == "sdxl" and record.model_format.value == "diffusers"
    assert record.source and "acme/tiny-lora" in record.source
    assert record.license == "mit"
    assert "lora" in record.tags


def test_install_from_civitai(bus: Bus, installer: ModelInstallService, tmp_path: Path) -> None:
    data = make_lora_kohya(tmp_path / "civitai_lora.safetensors", rank=16).read_bytes()
    bus.civitai.add_model(4101, "Tiny Civitai LoRA", type="LORA", tags=["style"], creator="painter",
                          description="a test lora", versions=[{
                              "id": 41010, "name": "v1", "baseModel": "SD 1.5", "trainedWords": ["tinystyle"],
                              "files": [{"name": "civitai_lora.safetensors", "content": data, "primary": True}]}])
    done = installer.wait_for_job(installer.heuristic_import("civitai:4101"), timeout=TIMEOUT)
    assert done.status is InstallStatus.COMPLETED, (done.error, bus.worker_log())
    record = installer.record_store.get_model(done.key)
    assert record.name == "Tiny Civitai LoRA"
    assert record.author == "painter"
    assert record.tags and "style" in record.tags
    assert record.thumbnail_url and record.thumbnail_url.startswith(bus.civitai.url)
    assert record.source and "4101" in record.source
    assert (_models(bus) / record.path).read_bytes() == data


def test_repeated_command_id_returns_the_same_job(bus: Bus, installer: ModelInstallService,
                                                  tmp_path: Path) -> None:
    source = make_lora_kohya(tmp_path / "idem_lora.safetensors", rank=12)
    first = installer.heuristic_import(source, command_id="cmd-idem-1")
    again = installer.heuristic_import(source, command_id="cmd-idem-1")
    assert first.id == again.id == "cmd-idem-1"
    done = installer.wait_for_job(first, timeout=TIMEOUT)
    assert done.status is InstallStatus.COMPLETED, (done.error, bus.worker_log())
    # after it ended, the same command still answers with the same (finished) job, and adds nothing
    later = installer.heuristic_import(source, command_id="cmd-idem-1")
    assert later.id == first.id and later.status is InstallStatus.COMPLETED
    requested = [s for s in installer.event_store.history(first.id) if s.event.type == "InstallRequested"]
    assert len(requested) == 1
    assert len([m for m in installer.record_store.all_models() if m.name == "idem_lora"]) == 1


def test_a_source_being_installed_returns_the_running_job(bus: Bus, installer: ModelInstallService,
                                                          tmp_path: Path) -> None:
    data = make_lora_kohya(tmp_path / "busy.safetensors", rank=20).read_bytes()
    url = bus.files.add_file("files/busy_lora.safetensors", data)
    first = installer.heuristic_import(url)
    second = installer.heuristic_import(url)
    assert second.id == first.id
    done = installer.wait_for_job(first, timeout=TIMEOUT)
    assert done.status is InstallStatus.COMPLETED, (done.error, bus.worker_log())
    # once it ended, the source is free again: a new command is a new job (already installed: that key)
    third = installer.wait_for_job(installer.heuristic_import(url), timeout=TIMEOUT)
    assert third.id != first.id
    assert third.status is InstallStatus.COMPLETED and third.already_installed and third.key == done.key


def test_duplicate_content_completes_with_the_existing_key_unless_forced(bus: Bus, installer: ModelInstallService,
                                                                          tmp_path: Path) -> None:
    original = make_lora_kohya(tmp_path / "dup_a.safetensors", rank=24)
    copy = tmp_path / "dup_b.safetensors"
    copy.write_bytes(original.read_bytes())
    first = installer.wait_for_job(installer.heuristic_import(original), timeout=TIMEOUT)
    assert first.status is InstallStatus.COMPLETED, (first.error, bus.worker_log())
    second = installer.wait_for_job(installer.heuristic_import(copy), timeout=TIMEOUT)
    assert second.status is InstallStatus.COMPLETED and second.already_installed, (second.error, bus.worker_log())
    assert second.key == first.key
    assert not (_models(bus) / "sd-1/lora/dup_b.safetensors").exists()
    assert not staging_dir(bus.config, second.id).exists()
    assert len([m for m in installer.record_store.all_models() if m.key == first.key]) == 1
    forced = installer.wait_for_job(installer.heuristic_import(copy, force=True), timeout=TIMEOUT)
    assert forced.status is InstallStatus.COMPLETED, (forced.error, bus.worker_log())
    assert forced.key != first.key
    assert (_models(bus) / "sd-1/lora/dup_b.safetensors").is_file()


def test_list_and_prune_jobs(bus: Bus, installer: ModelInstallService, tmp_path: Path) -> None:
    job = installer.heuristic_import(make_lora_kohya(tmp_path / "listed.safetensors", rank=28))
    assert job.id in {j.id for j in installer.list_jobs()}
    installer.wait_for_installs(timeout=TIMEOUT)
    assert all(j.terminal for j in installer.list_jobs())
    assert installer.prune_jobs() >= 1
    assert installer.list_jobs() == []
    assert installer.get_job_by_id(job.id).status is InstallStatus.COMPLETED  # the log keeps it
