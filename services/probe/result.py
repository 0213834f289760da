"""What identification concludes about a model, and the derived facts that follow from it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from modelbus.services.records.enums import (
    BaseModelType,
    ModelFormat,
    ModelType,
    ModelVariantType,
    SchedulerPredictionType,
)

_SD_CONFIGS = "configs/stable-diffusion/"
_Eps, _V = SchedulerPredictionType.Epsilon, SchedulerPredictionType.VPrediction
_Normal, _Inpaint, _Depth = ModelVariantType.Normal, ModelVariantType.Inpaint, ModelVariantType.Depth

# Original-format (LDM/SGM) inference configs of main checkpoints, as the engines name them.
_LEGACY_CONFIGS: dict[tuple[BaseModelType, ModelVariantType, SchedulerPredictionType | None], str] = {
    (BaseModelType.StableDiffusion1, _Normal, _Eps): "v1-inference.yaml",
    (BaseModelType.StableDiffusion1, _Normal, _V): "v1-inference-v.yaml",
    (BaseModelType.StableDiffusion1, _Inpaint, _Eps): "v1-inpainting-inference.yaml",
    (BaseModelType.StableDiffusion1, _Inpaint, _V): "v1-inpainting-inference-v.yaml",
    (BaseModelType.StableDiffusion2, _Normal, _Eps): "v2-inference.yaml",
    (BaseModelType.StableDiffusion2, _Normal, _V): "v2-inference-v.yaml",
    (BaseModelType.StableDiffusion2, _Inpaint, _Eps): "v2-inpainting-inference.yaml",
    (BaseModelType.StableDiffusion2, _Inpaint, _V): "v2-inpainting-inference-v.yaml",
    (BaseModelType.StableDiffusion2, _Depth, _Eps): "v2-midas-inference.yaml",
    (BaseModelType.StableDiffusion2, _Depth, _V): "v2-midas-inference-v.yaml",
    (BaseModelType.StableDiffusionXL, _Normal, None): "sd_xl_base.yaml",
    (BaseModelType.StableDiffusionXL, _Inpaint, None): "sd_xl_inpaint.yaml",
    (BaseModelType.StableDiffusionXLRefiner, _Normal, None): "sd_xl_refiner.yaml",
}
_CONTROLNET_CONFIGS = {
    BaseModelType.StableDiffusion1: "configs/controlnet/cldm_v15.yaml",
    BaseModelType.StableDiffusion2: "configs/controlnet/cldm_v21.yaml",
}


class ProbeResult(BaseModel):
    """The identity of a model as read from its files (frozen: derive copies with overrides)."""

    model_config = ConfigDict(frozen=True, protected_namespaces=(), extra="forbid")

    model_type: ModelType
    model_format: ModelFormat
    base_model: BaseModelType
    variant: ModelVariantType | None = None
    prediction_type: SchedulerPredictionType | None = None
    upcast_attention: bool | None = None
    compatible_bases: list[BaseModelType] = Field(default_factory=list)
    #: main checkpoints: the original-format inference config, e.g.
    #: ``configs/stable-diffusion/v1-inference.yaml``; FLUX: ``flux-dev`` or ``flux-schnell``
    config_path: str | None = None
    name: str = ""
    #: GGUF quantization type (``Q4_K``...) or bitsandbytes' (``nf4``, ``int8``)
    quantization: str | None = None
    #: the dtype most of the file's weights are stored in (``bf16``, ``fp8_e4m3fn``...)
    precision: str | None = None
    #: image-to-image networks (Spandrel's): the architecture's id (``ESRGAN``, ``SwinIR``...) and scale
    architecture: str | None = None
    scale: int | None = None
    #: what identification noticed beyond the fields: metadata that disagreed with the tensors...
    notes: str | None = None

    def as_config_fields(self) -> dict[str, Any]:
        """The fields a model record takes from identification (not the name: callers pick it)."""
        fields: dict[str, Any] = {
            "model_type": self.model_type,
            "model_format": self.model_format,
            "base_model": self.base_model,
            "compatible_bases": list(self.compatible_bases),
        }
        optional = {
            "variant": self.variant,
            "prediction_type": self.prediction_type,
            "upcast_attention": self.upcast_attention,
            "config": self.config_path,
            "quantization": self.quantization,
            "precision": self.precision,
            "notes": self.notes,
            "architecture": self.architecture,
            "scale": self.scale,
        }
        fields.update({k: v for k, v in optional.items() if v is not None})
        return fields


def legacy_config_path(
    base: BaseModelType,
    variant: ModelVariantType | None,
    prediction: SchedulerPredictionType | None,
) -> str | None:
    """The original-format config name of an SD-1/SD-2/SDXL main checkpoint, else ``None``."""
    variant = variant or _Normal
    if base in (BaseModelType.StableDiffusionXL, BaseModelType.StableDiffusionXLRefiner):
        prediction = None  # SGM configs do not encode the prediction type
    else:
        prediction = prediction or _Eps
    name = _LEGACY_CONFIGS.get((base, variant, prediction))
    return _SD_CONFIGS + name if name else None


def controlnet_config_path(base: BaseModelType) -> str | None:
    return _CONTROLNET_CONFIGS.get(base)


def compatible_bases(model_type: ModelType, base: BaseModelType) -> list[BaseModelType]:
    """Further bases a model serves besides its own.

    VAEs cross bases: SD-1 and SD-2 share one latent space (the kl-f8 autoencoder), the SDXL refiner
    decodes with the SDXL VAE, and Wan 2.2's A14B models with Wan 2.1's. So do the encoders of families
    that share one: UMT5 (Wan 2.1 and 2.2), Qwen2.5-VL-7B (Qwen-Image and HunyuanVideo 1.5), Qwen3-4B (Z-Image
    and FLUX.2 Klein 4B). Everything else
    is tied to the network it was made for.
    """
    shared = {
        ModelType.Vae: {
            BaseModelType.StableDiffusion1: [BaseModelType.StableDiffusion2],
            BaseModelType.StableDiffusion2: [BaseModelType.StableDiffusion1],
            BaseModelType.StableDiffusionXL: [BaseModelType.StableDiffusionXLRefiner],
            BaseModelType.Wan21: [BaseModelType.Wan22],
        },
        ModelType.T5Encoder: {BaseModelType.Wan21: [BaseModelType.Wan22]},
        ModelType.Qwen25VL: {BaseModelType.QwenImage: [BaseModelType.HunyuanVideo15]},
        ModelType.Qwen3Encoder: {BaseModelType.ZImage: [BaseModelType.Flux2]},
    }
    return list(shared.get(model_type, {}).get(base, []))


def upcast_for(base: BaseModelType, prediction: SchedulerPredictionType | None) -> bool:
    """SD-2 768 v-prediction models overflow in fp16 attention unless it is upcast."""
    return base is BaseModelType.StableDiffusion2 and prediction is SchedulerPredictionType.VPrediction
