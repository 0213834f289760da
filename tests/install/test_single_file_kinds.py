"""Single files that the probe recognises beyond the SD checkpoints, installed from a local path end
to end through the queue and real workers: T2I-Adapters (diffusers state dict, TencentARC's original
pickle), a FLUX transformer in the diffusers layout, transformer ControlNets (FLUX, SD-3), and LoRAs of Wan
and FLUX.2 in their trainers' layouts, a Real-ESRGAN upscaler (its architecture and scale recorded). Each
lands under ``<base>/<type>/`` with a record of the right concrete config class."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from modelbus.events.store import RedisEventStore
from modelbus.services.config import AppConfig
from modelbus.services.install import InstallStatus, ModelInstallService
from modelbus.services.records.models import (
    AnyModelConfigAdapter,
    ControlNetCheckpointConfig,
    LoRALycorisConfig,
    MainCheckpointConfig,
    ModelConfigBase,
    SpandrelImageToImageConfig,
    T2IAdapterCheckpointConfig,
)
from tests.fixtures import dit_loras as dl
from tests.fixtures import transformer_files as b
from tests.install.conftest import Bus

TIMEOUT = 60

Builder = Callable[[Path], Path]


def _first_block(layers: dl.Widths) -> dl.Widths:
    return {k: v for k, v in layers.items() if ".0." in k}


_REALESRGAN_X2PLUS = {
    "conv_first.weight": (8, 12, 3, 3), "body.0.rdb1.conv1.weight": (4, 8, 3, 3), "conv_body.weight": (8, 8, 3, 3),
    "conv_up1.weight": (8, 8, 3, 3), "conv_up2.weight": (8, 8, 3, 3), "conv_hr.weight": (8, 8, 3, 3),
    "conv_last.weight": (3, 8, 3, 3)}

CASES: dict[str, tuple[Builder, type[ModelConfigBase], dict[str, Any]]] = {
    "t2i-sd15-depth.safetensors": (
        lambda p: b.write_state(p, b.t2i_adapter_state("full_adapter")),
        T2IAdapterCheckpointConfig, {"base_model": "sd-1", "config": None}),
    "t2iadapter_sketch_sdxl.pth": (
        lambda p: b.write_state(p, b.to_tencentarc_layout(b.t2i_adapter_state("full_adapter_xl", in_channels=1))),
        T2IAdapterCheckpointConfig, {"base_model": "sdxl", "config": None}),
    "flux1-dev-transformer.safetensors": (
        b.make_flux_diffusers_file,
        MainCheckpointConfig, {"base_model": "flux", "variant": "normal", "config": "flux-dev"}),
    "flux-controlnet-canny.safetensors": (
        lambda p: b.write_state(p, b.flux_controlnet_state()),
        ControlNetCheckpointConfig, {"base_model": "flux", "config": None}),
    "sd3-controlnet-canny.safetensors": (
        lambda p: b.write_state(p, b.sd3_controlnet_state()),
        ControlNetCheckpointConfig, {"base_model": "sd-3", "config": None}),
    # LoRAs of the new families, the real layers of their first blocks (rank 4: a few hundred KB)
    "wan-1.3b-diffusion-pipe.safetensors": (
        lambda p: dl.write_lora_file(p, _first_block(dl.original_widths("wan", dl.shipped_layers("wan-2.1-t2v-1.3b"))),
                                     "aitk"),
        LoRALycorisConfig, {"base_model": "wan-2.1", "model_format": "lycoris"}),
    "my-style-kohya.safetensors": (
        lambda p: dl.write_lora_file(p, _first_block(dl.original_widths("flux2", dl.shipped_layers("flux2-klein-4b"))),
                                     "kohya"),
        LoRALycorisConfig, {"base_model": "flux2", "model_format": "lycoris"}),
    # Real-ESRGAN x2plus in BasicSR's names: an x4 RRDBNet behind a pixel unshuffle (12 input channels)
    "RealESRGAN_x2plus.safetensors": (
        lambda p: b.write_state(p, {k: torch.zeros(shape) for k, shape in _REALESRGAN_X2PLUS.items()}),
        SpandrelImageToImageConfig, {"base_model": "any", "architecture": "ESRGAN", "scale": 2}),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_install_single_file(bus: Bus, installer: ModelInstallService, tmp_path: Path, name: str) -> None:
    build, cls, expected = CASES[name]
    source = build(tmp_path / name)
    done = installer.wait_for_job(installer.heuristic_import(str(source)), timeout=TIMEOUT)
    assert done.status is InstallStatus.COMPLETED and done.key is not None, (done.error, bus.worker_log())
    record = installer.record_store.get_model(done.key)
    assert type(record) is cls
    model_type = cls.model_fields["model_type"].default.value
    fields = record.model_dump(mode="json")
    assert (fields["model_type"], fields["model_format"]) == (model_type, expected.get("model_format", "checkpoint"))
    assert {k: fields[k] for k in expected} == expected
    assert record.path == f"{expected['base_model']}/{model_type}/{name}"
    assert (bus.config.models_path / record.path).read_bytes() == source.read_bytes()
    # what the job reports and what the log holds validate as the same concrete class
    assert done.config is not None and type(AnyModelConfigAdapter.validate_python(done.config)) is cls
    assert type(AnyModelConfigAdapter.validate_python(fields)) is cls


def test_scan_registers_each_kind(app_config: AppConfig, event_store: RedisEventStore, tmp_path: Path) -> None:
    # the synchronous side, in this process (a namespace of its own: the same files are new there)
    service = ModelInstallService(app_config, event_store=event_store)
    try:
        expected = {}
        for name, (build, cls, fields) in CASES.items():
            path = build(tmp_path / "downloads" / name)
            expected[str(path.resolve())] = (cls, fields["base_model"])
        keys = service.scan_directory(tmp_path / "downloads")
        records = [service.record_store.get_model(k) for k in keys]
        assert {r.path: (type(r), r.base_model.value) for r in records} == expected
    finally:
        service.record_store.close()
