"""ComfyUI's ``t5xxl_fp8_e4m3fn_scaled.safetensors`` (a tiny real T5 quantized at test time in its layout)
installed from a local path through the queue and real workers: recorded as a T5 encoder with the file's
precision (fp8_e4m3fn) and quantization (fp8_scaled), and the installed record loads through the load
service upcast, every scale folded in as ComfyUI folds it."""

from __future__ import annotations

from pathlib import Path

from modelbus.services.config import AppConfig
from modelbus.services.install import InstallStatus, ModelInstallService
from modelbus.services.load import ModelLoadService
from modelbus.services.records.models import T5EncoderCheckpointConfig
from tests.install.conftest import Bus
from tests.load.test_fp8_encoders_load import _check_loaded, _t5, _write, comfy_fp8


def test_install_fp8_scaled_t5_then_load(bus: Bus, installer: ModelInstallService, tmp_path: Path) -> None:
    model, state = _t5("t5")
    stored, parts = comfy_fp8(model, state, scaled=True)
    source = _write(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", stored)
    done = installer.wait_for_job(installer.heuristic_import(str(source)), timeout=60)
    assert done.status is InstallStatus.COMPLETED and done.key is not None, (done.error, bus.worker_log())
    record = installer.record_store.get_model(done.key)
    assert type(record) is T5EncoderCheckpointConfig
    assert (record.precision, record.quantization, record.base_model.value) == ("fp8_e4m3fn", "fp8_scaled", "any")
    assert record.path == "any/t5_encoder/t5xxl_fp8_e4m3fn_scaled.safetensors"
    config = AppConfig.load(root=bus.root, device="cpu", ram_cache_size="64M", vram_cache_size="0")
    service = ModelLoadService(config, installer.record_store)
    with service.get_model(done.key) as loaded:
        assert type(loaded) is type(model)
        _check_loaded(loaded, parts, service.precision)
