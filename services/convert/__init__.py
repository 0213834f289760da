"""Conversion of single-file checkpoints to diffusers folders: what can be converted (here, light:
the client checks it before it asks a worker) and the conversion itself (:mod:`.folder`, on a worker,
which also decides what an SD-3 file bundles and refuses a FLUX file that bundles more than its transformer),
with the parts a file lacks from companion models (:mod:`.companions`).
"""

from __future__ import annotations

from modelbus.events.errors import InvalidInput
from modelbus.services.records import ModelConfigBase

_SD3 = ("StableDiffusion3Pipeline", ("transformer", "scheduler"))
#: base -> (pipeline class, the parts every file of it gives); a part None in model_index.json is absent
PIPELINES: dict[str, tuple[str, tuple[str, ...]]] = {
    "sd-1": ("StableDiffusionPipeline", ("unet", "vae", "text_encoder", "tokenizer", "scheduler")),
    "sd-2": ("StableDiffusionPipeline", ("unet", "vae", "text_encoder", "tokenizer", "scheduler")),
    "sdxl": ("StableDiffusionXLPipeline",
             ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")),
    "sdxl-refiner": ("StableDiffusionXLImg2ImgPipeline", ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler")),
    # a FLUX.1 file holds the transformer alone (its VAE and encoders are models of their own, as in a load)
    "flux": ("FluxPipeline", ("transformer",)),
    "sd-3": _SD3, "sd-3.5-medium": _SD3, "sd-3.5-large": _SD3,
}
#: what each pipeline's folder holds as null (the pipeline runs without it)
ABSENT = {"StableDiffusionPipeline": ("safety_checker", "feature_extractor"),
          "StableDiffusionXLImg2ImgPipeline": ("text_encoder", "tokenizer")}
#: the parts of a FLUX.1 folder besides its file's transformer: shipped (the CLIP tokenizer, the scheduler), or
#: from companion models (services.convert.companions)
FLUX_SHIPPED = ("tokenizer", "scheduler")
FLUX_COMPANIONS = ("vae", "text_encoder", "text_encoder_2", "tokenizer_2")


class NotConvertible(InvalidInput):
    """The model is not a single-file main checkpoint of a base the converter knows."""


def check_convertible(model: ModelConfigBase) -> str:
    """The model's base when it can be converted; NotConvertible naming why not."""
    what = f"model {model.key} ({model.model_type.value}/{model.model_format.value}, {model.base_model.value})"
    if model.model_type.value != "main" or model.model_format.value != "checkpoint":
        raise NotConvertible(f"{what} is not a single-file main checkpoint: only those convert to diffusers")
    base = model.base_model.value
    if base not in PIPELINES:
        raise NotConvertible(f"{what}: converting {base} checkpoints is not supported (SD-1, SD-2, SDXL, refiner, FLUX.1, SD-3, SD-3.5)")
    return base
