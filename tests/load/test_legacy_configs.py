"""The original-format (LDM/SGM) inference YAMLs shipped in ``services/configs/stable-diffusion``.

Every name the probe can put on a main checkpoint's record ships, and each file says what its name
promises (the UNet's input channels: 4 normal, 9 inpaint, 5 depth; the prediction type) through the
code the loader uses. The variants' configs also load tiny checkpoints of that variant, with the
shipped YAML shrunk to the tiny model's sizes and nothing else changed.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel

from modelbus.services.load import ModelLoadService, checkpoints
from modelbus.services.load.kit import LoadRequest
from modelbus.services.load.safetensors_fast import empty_model
from modelbus.services.probe.result import legacy_config_path
from modelbus.services.records.enums import (
    BaseModelType,
    ModelVariantType,
    SchedulerPredictionType,
    SubModelType,
)
from tests.fixtures import loadable as builders

EPS, V = "epsilon", "v_prediction"
_CONTEXT = {"sd-1": 768, "sd-2": 1024, "sdxl": 2048, "sdxl-refiner": 1280}
_IN_CHANNELS = {ModelVariantType.Normal: 4, ModelVariantType.Inpaint: 9, ModelVariantType.Depth: 5}
# name -> (base, UNet input channels, prediction type)
SHIPPED: dict[str, tuple[str, int, str]] = {
    "v1-inference.yaml": ("sd-1", 4, EPS),
    "v1-inference-v.yaml": ("sd-1", 4, V),
    "v1-inpainting-inference.yaml": ("sd-1", 9, EPS),
    "v1-inpainting-inference-v.yaml": ("sd-1", 9, V),
    "v2-inference.yaml": ("sd-2", 4, EPS),
    "v2-inference-v.yaml": ("sd-2", 4, V),
    "v2-inpainting-inference.yaml": ("sd-2", 9, EPS),
    "v2-inpainting-inference-v.yaml": ("sd-2", 9, V),
    "v2-midas-inference.yaml": ("sd-2", 5, EPS),
    "v2-midas-inference-v.yaml": ("sd-2", 5, V),
    "sd_xl_base.yaml": ("sdxl", 4, EPS),
    "sd_xl_inpaint.yaml": ("sdxl", 9, EPS),
    "sd_xl_refiner.yaml": ("sdxl-refiner", 4, EPS),
}
NEW = ["v1-inference-v.yaml", "v1-inpainting-inference-v.yaml", "v2-inpainting-inference.yaml",
       "v2-inpainting-inference-v.yaml", "v2-midas-inference.yaml", "v2-midas-inference-v.yaml",
       "sd_xl_inpaint.yaml"]


def _request(record: Any) -> LoadRequest:
    return LoadRequest(record, checkpoints.CONFIGS_DIR, SubModelType.Scheduler, torch.device("cpu"), torch.float32)


def test_every_config_the_probe_names_ships() -> None:
    bases = [BaseModelType.StableDiffusion1, BaseModelType.StableDiffusion2, BaseModelType.StableDiffusionXL,
             BaseModelType.StableDiffusionXLRefiner]
    named = {legacy_config_path(base, variant, prediction)
             for base in bases for variant in ModelVariantType for prediction in SchedulerPredictionType}
    named.discard(None)
    assert named == {f"configs/stable-diffusion/{name}" for name in SHIPPED}
    assert {p.name for p in (checkpoints.CONFIGS_DIR / "stable-diffusion").glob("*.yaml")} == set(SHIPPED)


@pytest.mark.parametrize("variant", list(_IN_CHANNELS))
@pytest.mark.parametrize("base", [BaseModelType.StableDiffusion1, BaseModelType.StableDiffusion2,
                                  BaseModelType.StableDiffusionXL])
def test_probe_names_a_config_of_the_variant(base: BaseModelType, variant: ModelVariantType) -> None:
    for prediction in SchedulerPredictionType:
        name = legacy_config_path(base, variant, prediction)
        if name is not None:
            assert SHIPPED[name.rsplit("/", 1)[1]][1] == _IN_CHANNELS[variant], name


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config(add: Any, store: Any, name: str) -> None:
    base, in_channels, prediction = SHIPPED[name]
    record = store.get_model(add("m.safetensors", "main", "checkpoint", base=base,
                                 config=f"configs/stable-diffusion/{name}"))
    assert checkpoints.original_config_path(record) == checkpoints.CONFIGS_DIR / "stable-diffusion" / name
    orig = checkpoints.original_config(record)
    cfg = checkpoints.unet_config(orig, base)
    assert (cfg["in_channels"], cfg["out_channels"], cfg["cross_attention_dim"]) == (in_channels, 4, _CONTEXT[base])
    assert cfg["use_linear_projection"] is (base != "sd-1")
    assert checkpoints.load_scheduler(_request(record), orig).model.config.prediction_type == prediction
    unet: Any = empty_model(lambda: UNet2DConditionModel.from_config(cfg))  # a valid config; meta: no memory
    assert unet.conv_in.in_channels == in_channels


def _unet_out(unet: Any, in_channels: int, context: int, added: dict[str, torch.Tensor] | None) -> torch.Tensor:
    torch.manual_seed(0)
    sample, states = torch.randn(1, in_channels, 8, 8), torch.randn(1, 3, context)
    with torch.no_grad():
        return unet(sample, 10, states, added_cond_kwargs=added).sample  # type: ignore[no-any-return]


def _same(a: Any, b: Any) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", NEW)
def test_variant_checkpoint_loads_with_its_config(service: ModelLoadService, config: Any, add: Any,
                                                  name: str) -> None:
    base, in_channels, prediction = SHIPPED[name]
    variant = {4: "normal", 9: "inpaint", 5: "depth"}[in_channels]
    ref = builders.write_variant_checkpoint(config.models_path / "tiny.safetensors", base, in_channels)
    yaml_path = builders.write_tiny_yaml_like(checkpoints.CONFIGS_DIR / "stable-diffusion" / name,
                                              config.root / f"tiny-{name}", base)
    key = add("tiny.safetensors", "main", "checkpoint", base=base, variant=variant, config=str(yaml_path))
    unet_cfg = {"sd-1": builders.UNET_CFG, "sd-2": builders.SD2_UNET_CFG, "sdxl": builders.SDXL_UNET_CFG}[base]
    context = int(unet_cfg["cross_attention_dim"])  # type: ignore[call-overload]
    added = None
    if base == "sdxl":
        torch.manual_seed(1)
        added = {"text_embeds": torch.randn(1, builders.OPEN_CLIP_CFG["projection_dim"]),
                 "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    with service.get_model(key, SubModelType.UNet) as model:
        unet: Any = model
        assert isinstance(model, UNet2DConditionModel) and unet.config.in_channels == in_channels
        assert _same(unet, ref["unet"])
        # the weights are equal; SD-1's 1x1-convolution projections may take another kernel on the
        # loaded layout, so the outputs agree to float rounding only
        assert torch.allclose(_unet_out(unet, in_channels, context, added),
                              _unet_out(ref["unet"], in_channels, context, added), rtol=0, atol=1e-5)
    with service.get_model(key, SubModelType.Scheduler) as scheduler:
        assert scheduler.config.prediction_type == prediction
    with service.get_model(key, SubModelType.Vae) as vae:
        assert _same(vae, ref["vae"])
    with service.get_model(key, SubModelType.TextEncoder2 if base == "sdxl" else SubModelType.TextEncoder) as te:
        want = ref["text_encoder_2" if base == "sdxl" else "text_encoder"]
        assert _same(te, want)


@pytest.mark.parametrize(("prediction", "name", "scheduler"), [
    (SchedulerPredictionType.Epsilon, "v2-midas-inference.yaml", EPS),
    (SchedulerPredictionType.VPrediction, "v2-midas-inference-v.yaml", V)])
def test_depth_model_gets_the_config_of_its_prediction(add: Any, store: Any, prediction: SchedulerPredictionType,
                                                       name: str, scheduler: str) -> None:
    # a depth model fine-tuned for v prediction once got the epsilon config, so the wrong scheduler
    path = legacy_config_path(BaseModelType.StableDiffusion2, ModelVariantType.Depth, prediction)
    assert path == f"configs/stable-diffusion/{name}"
    record = store.get_model(add("depth.safetensors", "main", "checkpoint", base="sd-2", variant="depth",
                                 config=path))
    orig = checkpoints.original_config(record)
    assert checkpoints.unet_config(orig, "sd-2")["in_channels"] == 5
    assert checkpoints.load_scheduler(_request(record), orig).model.config.prediction_type == scheduler
