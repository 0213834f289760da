"""The view of a single model file that identification works on: tensor names and shapes.

Safetensors files give it from the header alone. Pickle files are scanned, then loaded with
``weights_only=True`` onto the meta device, so shapes come without reading tensor data.
Nested dictionaries are flattened with dots (``{"string_to_param": {"*": t}}`` becomes
``string_to_param.*``), which makes a pickle and its safetensors twin look the same to the rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelbus.services.probe.errors import UnrecognizedFilesError
from modelbus.services.probe.pickle_scan import PICKLE_SUFFIXES, safe_torch_load
from modelbus.services.probe.safetensors_header import header_metadata, read_safetensors_header, tensor_shapes
from modelbus.services.probe.tensor_index import TensorIndex

SAFETENSORS_SUFFIXES = frozenset({".safetensors", ".sft"})
GGUF_SUFFIXES = frozenset({".gguf"})
MODEL_FILE_SUFFIXES = SAFETENSORS_SUFFIXES | PICKLE_SUFFIXES | GGUF_SUFFIXES
_MAX_DEPTH = 4  # state dicts nest at most a few levels (IP-Adapter: 2)


def read_tensor_index(path: Path) -> TensorIndex:
    """Read the tensor names and shapes of a safetensors or (scanned) pickle file."""
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        header = read_safetensors_header(path)
        dtypes = {k: str(v.get("dtype")) for k, v in header.items() if isinstance(v, dict) and "dtype" in v}
        return TensorIndex(path, tensor_shapes(header), header_metadata(header), dtypes)
    if suffix in PICKLE_SUFFIXES:
        return _from_pickle(path, safe_torch_load(path, map_location="meta"))
    if suffix in GGUF_SUFFIXES:
        from modelbus.services.probe.gguf_file import gguf_tensor_index  # (the gguf reader, on first use)

        return gguf_tensor_index(path)
    raise UnrecognizedFilesError(
        f"{path}: unsupported file suffix {path.suffix or '(none)'!r}; "
        f"model files end in {', '.join(sorted(MODEL_FILE_SUFFIXES))} (or give a diffusers folder)"
    )


def _from_pickle(path: Path, obj: Any) -> TensorIndex:
    if not isinstance(obj, Mapping):
        raise UnrecognizedFilesError(f"{path}: pickle holds a {type(obj).__name__}, not a dictionary of tensors")
    metadata = {str(k): str(v) for k, v in obj.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    state = obj.get("state_dict")
    shapes: dict[str, tuple[int, ...]] = {}
    _flatten(state if isinstance(state, Mapping) else obj, "", shapes, 0)
    return TensorIndex(path, shapes, metadata)


def _flatten(obj: Mapping[Any, Any], prefix: str, out: dict[str, tuple[int, ...]], depth: int) -> None:
    import torch  # only a pickle needs it (it was loaded by then): identifying safetensors stays torch-free
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, torch.Tensor):
            out[name] = tuple(value.shape)
        elif isinstance(value, Mapping) and depth < _MAX_DEPTH:
            _flatten(value, name, out, depth + 1)
