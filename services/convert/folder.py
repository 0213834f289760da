"""Converting a single-file main checkpoint (SD-1, SD-2, SDXL, the SDXL refiner, FLUX.1, SD-3 and SD-3.5) into
a complete diffusers folder.

Each part the file holds is built by the load service exactly as a load builds it (services.load.checkpoints:
offline, the shipped configs or, for the transformer-era files, configs read from the tensors' names and shapes;
diffusers' single-file key conversion) and written with ``save_pretrained``; the folder gets the
``model_index.json`` of the base's pipeline. A FLUX.1 file gives the transformer (a FLUX file that bundles more,
as ComfyUI's all-in-one files do, is refused, since the rest would be lost with the original); its CLIP tokenizer
and scheduler ship with the project (dev's schedule, or schnell's when the transformer embeds no guidance), and
its VAE, CLIP-L, T5-XXL and T5 tokenizer come from companion models (:mod:`.companions`). An SD-3 file gives the
transformer, the scheduler and the CLIP tokenizers, and what it bundles (VAE, CLIP-L, CLIP-G, T5-XXL); the rest
and the T5 tokenizer come from companions. A part no installed model can give refuses the conversion before
anything is written, naming it. The record keeps its key and becomes the folder (``model_format: diffusers``):
the install service checks and hashes the new path, so the hash and the manifest change, as the spec says a
conversion does. The original file is deleted unless it is kept, and only when it lies in the models directory
(a file registered in place elsewhere is the user's). Runs on a worker of the hash queue (workers.convert); a
refused model changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from modelbus.events.errors import ModelbusError
from modelbus.events.logs import get_logger
from modelbus.services.config import AppConfig
from modelbus.services.convert import (
    ABSENT,
    FLUX_COMPANIONS,
    FLUX_SHIPPED,
    PIPELINES,
    NotConvertible,
    check_convertible,
)
from modelbus.services.convert.companions import (
    SD3_BUNDLED,
    build_companion,
    bundled_parts,
    companion_order,
    plan_companions,
)
from modelbus.services.install import ModelInstallService
from modelbus.services.install.finalize import record_path
from modelbus.services.install.placement import destination_dir, is_inside, place, remove_tree, staging_dir
from modelbus.services.load.checkpoints import load_main_checkpoint
from modelbus.services.load.kit import (
    CONFIGS_DIR,
    NOT_FLUX_TRANSFORMER,
    LoadRequest,
    load_tokenizer,
    read_json,
)
from modelbus.services.probe import read_tensor_index
from modelbus.services.probe.storage import precision_of
from modelbus.services.records import SubModelType

log = get_logger(__name__)

#: the file's precision (services.probe.storage) -> the dtype its folder is written in; fp8 (which diffusers
#: folders do not store) becomes bf16, and a file that does not say (a pickle) float32
_FOLDER_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8_e4m3fn": torch.bfloat16,
                  "fp8_e5m2": torch.bfloat16}


def folder_dtype(original: Path) -> torch.dtype:
    """The dtype a conversion keeps: the file's own, so the folder is about the file's size (a 16-bit FLUX
    file would double as float32)."""
    if original.suffix.lower() not in (".safetensors", ".sft"):
        return torch.float32
    try:
        precision = precision_of(read_tensor_index(original))
    except ModelbusError as exc:
        raise NotConvertible(f"{original}: cannot read its tensors: {exc}") from exc
    return _FOLDER_DTYPES.get(precision or "", torch.float32)


def convert_staging_name(key: str) -> str:
    """``convert-<key>``, or of its hash when a long key would make too long a file name."""
    name = f"convert-{key}"
    return name if len(name) <= 255 else f"convert-{hashlib.sha256(key.encode()).hexdigest()}"


def convert(config: AppConfig, installer: ModelInstallService, key: str, keep_original: bool = False,
            dtype: torch.dtype | None = None) -> dict[str, Any]:
    """``dtype``: what the folder's weights are written in (default: the file's precision)."""
    records = installer.record_store
    model = records.get_model(key)
    base = check_convertible(model)
    original = config.model_path(model.path)
    pipeline, parts, wanted, absent = plan_parts(base, original)
    found = plan_companions(config, records.all_models(), model, pipeline, wanted) if wanted else {}
    dtype = dtype or folder_dtype(original)
    staging = staging_dir(config, convert_staging_name(key))
    remove_tree(staging)
    folder = staging / f"{original.stem}"
    target: Path | None = None
    companions: dict[str, str] = {}
    try:
        index: dict[str, Any] = {"_class_name": pipeline, "_diffusers_version": _diffusers_version()}
        built_parts: dict[str, Any] = {}
        for part in parts:
            built_parts[part] = _file_part(pipeline, part, LoadRequest(model, original, SubModelType(part),
                                                                       torch.device("cpu"), dtype), built_parts)
        for part in companion_order(found):
            built_parts[part], record = build_companion(config, pipeline, part, found[part], dtype, built_parts)
            companions[part] = record.key
        for part, built in built_parts.items():
            built.save_pretrained(folder / part, **({} if part.startswith("tokenizer") or part == "scheduler"
                                                    else {"safe_serialization": True}))
            index[part] = [_library(built), type(built).__name__]
        for part in absent:
            index[part] = [None, None]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
        target = place(folder, destination_dir(config, model.base_model, model.model_type), folder.name)
        updated = installer.update_model(key, {"path": record_path(config, target), "model_format": "diffusers"})
    except BaseException:
        if target is not None:
            remove_tree(target)
        raise
    finally:
        remove_tree(staging)
    removed = False
    if not keep_original and is_inside(original, config.models_path) and original.is_file():
        os.unlink(original)
        removed = True
    log.info("model_converted", key=key, path=updated.path, original=str(original), original_removed=removed,
             companions=companions)
    return {"key": key, "path": updated.path, "hash": updated.hash, "model_format": updated.model_format.value,
            "original": str(original), "original_removed": removed, "companions": companions}


def _file_part(pipeline: str, part: str, request: LoadRequest, built: dict[str, Any]) -> Any:
    """A part the file gives, or (FLUX.1's tokenizer and scheduler) the project ships."""
    if pipeline == "FluxPipeline" and part == "tokenizer":
        return load_tokenizer(request).model
    if pipeline == "FluxPipeline" and part == "scheduler":
        guidance = bool(built["transformer"].config.guidance_embeds)  # dev embeds it, schnell not
        name = "flux" if guidance else "flux-schnell"
        config = read_json(CONFIGS_DIR / "diffusers" / name / "scheduler" / "scheduler_config.json")
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    return load_main_checkpoint(request).model


def plan_parts(base: str, original: Path) -> tuple[str, list[str], list[str], list[str]]:
    """(the pipeline class, the parts the file gives, the parts companion models must give, the parts the
    folder holds as null) for the file ``original``; NotConvertible for a FLUX file that holds more than a
    transformer (nothing is read but its header)."""
    pipeline, parts = PIPELINES[base]
    absent = list(ABSENT.get(pipeline, ()))
    if pipeline not in ("FluxPipeline", "StableDiffusion3Pipeline"):
        return pipeline, list(parts), [], absent
    if pipeline == "FluxPipeline":
        try:
            names = list(read_tensor_index(original).shapes)
        except ModelbusError as exc:
            raise NotConvertible(f"{original}: cannot read its tensors: {exc}") from exc
        extra = sorted({n.split(".", 1)[0] for n in names if n.startswith(NOT_FLUX_TRANSFORMER)})
        if extra:
            raise NotConvertible(f"{original.name} bundles more than a FLUX transformer ({', '.join(extra)}): the "
                                 "conversion keeps the transformer alone, so it is refused rather than lose the rest")
        return pipeline, [*parts, *FLUX_SHIPPED], list(FLUX_COMPANIONS), absent
    bundled = bundled_parts(original)
    found = [*parts, "tokenizer", "tokenizer_2", *(p for p in SD3_BUNDLED if p in bundled)]  # (CLIP's tokenizers ship)
    wanted = [p for p in SD3_BUNDLED if p not in bundled]
    return pipeline, found, [*wanted, "tokenizer_3"], absent


def _library(obj: Any) -> str:
    return "transformers" if type(obj).__module__.startswith("transformers") else "diffusers"


def _diffusers_version() -> str:
    import diffusers
    return str(diffusers.__version__)
