"""Converting a single-file main checkpoint (SD-1, SD-2, SDXL, the SDXL refiner) into a diffusers folder.

Each part is built by the load service exactly as a load builds it (services.load.checkpoints: offline,
the shipped configs, diffusers' single-file key conversion) and written with ``save_pretrained``; the
folder gets the ``model_index.json`` of the base's pipeline. The record keeps its key and becomes the
folder (``model_format: diffusers``): the install service checks and hashes the new path, so the hash
and the manifest change, as the spec says a conversion does. The original file is deleted unless it is
kept, and only when it lies in the models directory (a file registered in place elsewhere is the user's).
Runs on a worker of the hash queue (workers.convert); a refused model changes nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import structlog
import torch

from modelbus.services.config import AppConfig
from modelbus.services.convert import ABSENT, PIPELINES, check_convertible
from modelbus.services.install import ModelInstallService
from modelbus.services.install.finalize import record_path
from modelbus.services.install.placement import destination_dir, is_inside, place, remove_tree, staging_dir
from modelbus.services.load.checkpoints import load_main_checkpoint
from modelbus.services.load.kit import LoadRequest
from modelbus.services.records import SubModelType

log = structlog.get_logger(__name__)

def convert(config: AppConfig, installer: ModelInstallService, key: str, keep_original: bool = False,
            dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    records = installer.record_store
    model = records.get_model(key)
    base = check_convertible(model)
    original = config.model_path(model.path)
    pipeline, parts = PIPELINES[base]
    staging = staging_dir(config, f"convert-{key}")
    remove_tree(staging)
    folder = staging / f"{original.stem}"
    target: Path | None = None
    try:
        index: dict[str, Any] = {"_class_name": pipeline, "_diffusers_version": _diffusers_version()}
        for part in parts:
            request = LoadRequest(model, original, SubModelType(part), torch.device("cpu"), dtype)
            built = load_main_checkpoint(request).model
            built.save_pretrained(folder / part, **({} if part.startswith("tokenizer") or part == "scheduler"
                                                    else {"safe_serialization": True}))
            index[part] = [_library(built), type(built).__name__]
        for part in ABSENT.get(pipeline, ()):
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
    log.info("model_converted", key=key, path=updated.path, original=str(original), original_removed=removed)
    return {"key": key, "path": updated.path, "hash": updated.hash, "model_format": updated.model_format.value,
            "original": str(original), "original_removed": removed}


def _library(obj: Any) -> str:
    return "transformers" if type(obj).__module__.startswith("transformers") else "diffusers"


def _diffusers_version() -> str:
    import diffusers
    return str(diffusers.__version__)
