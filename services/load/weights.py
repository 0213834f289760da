"""Finding weight files and reading them as a state dict on the target device and dtype.

Safetensors take the fast path (:mod:`services.load.safetensors_fast`: one flat buffer on the
device). Pickles (``.ckpt``, ``.pt``, ``.bin``, ``.pth``) are scanned first
(:func:`services.probe.scan_pickle`) and then loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelbus.services.load.errors import InvalidModelException, UnsafeModelException
from modelbus.services.load.safetensors_fast import load_flat
from modelbus.services.probe import scan_pickle
from modelbus.services.probe.errors import CorruptModelError, UnsafeArchiveError

SAFETENSORS = (".safetensors",)
PICKLES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass
class StateDict:
    tensors: dict[str, torch.Tensor]
    buffer: torch.Tensor | None  # set when every tensor is a view of this one buffer


def _variant_first(files: list[Path], dtype: torch.dtype) -> list[Path]:
    """Prefer ``*.fp16.*`` files when loading in half precision, the plain ones otherwise."""
    fp16 = [f for f in files if ".fp16." in f.name]
    plain = [f for f in files if ".fp16." not in f.name]
    return (fp16 or plain) if dtype == torch.float16 else (plain or fp16)


def weight_files(folder: Path, dtype: torch.dtype, stem: str | None = None) -> list[Path]:
    """The weight files of a diffusers/transformers folder: sharded (via the index), safetensors, else pickles."""
    indices = sorted(folder.glob("*.safetensors.index*.json")) or sorted(folder.glob("*.bin.index*.json"))
    if indices:
        index = _variant_first(indices, dtype)[0]
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (KeyError, ValueError) as exc:
            raise InvalidModelException(f"{index}: bad shard index: {exc}") from exc
        return [folder / s for s in shards]
    for suffixes in (SAFETENSORS, PICKLES):
        files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in suffixes
                       and (stem is None or f.name.startswith(stem)))
        if files:
            return _variant_first(files, dtype)[:1]
    return []


def read_state_dict(paths: list[Path], device: torch.device, dtype: torch.dtype | None,
                    select: Callable[[str], bool] | None = None) -> StateDict:
    """Read one or more weight files (all safetensors, or all pickles)."""
    if not paths:
        raise InvalidModelException("no weight files found")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise InvalidModelException(f"weight files missing: {', '.join(map(str, missing))}")
    if all(p.suffix == ".safetensors" for p in paths):
        flat = load_flat(paths, device, dtype, select)
        return StateDict(flat.tensors, flat.buffer)
    tensors: dict[str, torch.Tensor] = {}
    for p in paths:
        for name, t in load_pickle(p).items():
            if select is None or select(name):
                target = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
                tensors[name] = t.to(device=device, dtype=target)
    return StateDict(tensors, None)


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Scan, then load a pickled checkpoint with ``weights_only=True``; unwraps ``state_dict``."""
    try:
        findings = scan_pickle(path)
    except UnsafeArchiveError as exc:  # the probe's errors, in the load service's family
        raise UnsafeModelException(str(exc)) from exc
    except CorruptModelError as exc:  # a truncated or malformed archive
        raise InvalidModelException(str(exc)) from exc
    if findings:
        raise UnsafeModelException(f"{path}: refusing to unpickle, it imports {', '.join(findings[:5])}")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises pickle/zip/runtime errors of many kinds: one family here
        raise InvalidModelException(f"{path}: cannot be loaded as a torch checkpoint: {exc}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InvalidModelException(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return _flatten(obj)


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            out[prefix + str(key)] = value
        elif isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
    return out
