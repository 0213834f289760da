"""Read and validate a safetensors header without touching the tensor data.

Layout: an 8-byte little-endian length ``N``, ``N`` bytes of JSON, then the data buffer. The
JSON maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into
the data buffer) plus an optional ``"__metadata__"`` of strings. We apply the same checks as the
``safetensors`` library so that a file we accept is one the loader accepts: every byte range
matches its shape and dtype, the ranges tile the buffer without gaps or overlaps, and the buffer
ends where the file ends. A download cut short therefore fails here, with the numbers, instead
of deep inside a load.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson

from modelbus.services.probe.errors import CorruptModelError, ModelPathError

METADATA_KEY = "__metadata__"
# the safetensors library refuses headers above 100 MB; so do we, before allocating anything
MAX_HEADER_BYTES = 100_000_000

# bits per element; sub-byte float formats are packed
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The validated header of ``path``: tensor entries plus ``__metadata__`` when present.

    Raises :class:`CorruptModelError` naming what is wrong (too short, header length beyond the
    file, bad JSON, unknown dtype, offsets out of range, sizes that do not match shapes).
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            file_size = _file_size(fh)
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CorruptModelError(f"{path}: {file_size} bytes is too short for a safetensors file")
            header_len = int.from_bytes(prefix, "little")
            # an error page saved under a model's name is the usual culprit: show how it starts
            start = f"; the file starts with {prefix + fh.read(24)!r}"
            if header_len > MAX_HEADER_BYTES:
                raise CorruptModelError(
                    f"{path}: declared header length {header_len} exceeds the {MAX_HEADER_BYTES} byte limit"
                    f" (not a safetensors file?){start}"
                )
            if header_len > file_size - 8:
                raise CorruptModelError(
                    f"{path}: declared header length {header_len} runs past the end of the "
                    f"{file_size}-byte file (truncated, or not a safetensors file){start}"
                )
            fh.seek(8)
            raw = fh.read(header_len)
    except FileNotFoundError as exc:
        raise ModelPathError(f"no such file: {path}") from exc
    except IsADirectoryError as exc:
        raise ModelPathError(f"expected a safetensors file, got a folder: {path}") from exc
    except OSError as exc:
        raise CorruptModelError(f"{path}: cannot read: {exc}") from exc
    header = _parse_json(path, raw)
    _validate(path, header, data_len=file_size - 8 - header_len)
    return header


def tensor_shapes(header: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from a header returned by :func:`read_safetensors_header`."""
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != METADATA_KEY}


def header_metadata(header: dict[str, Any]) -> dict[str, str]:
    meta = header.get(METADATA_KEY)
    return dict(meta) if isinstance(meta, dict) else {}


def _file_size(fh: Any) -> int:
    fh.seek(0, 2)
    size = int(fh.tell())
    fh.seek(0)
    return size


def _parse_json(path: Path, raw: bytes) -> dict[str, Any]:
    if not raw.lstrip().startswith(b"{"):
        raise CorruptModelError(f"{path}: header is not a JSON object (starts with {raw[:16]!r})")
    try:
        header = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CorruptModelError(f"{path}: header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise CorruptModelError(f"{path}: header is not a JSON object")
    return header


def _validate(path: Path, header: dict[str, Any], data_len: int) -> None:
    meta = header.get(METADATA_KEY)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise CorruptModelError(f"{path}: {METADATA_KEY} must map strings to strings")
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == METADATA_KEY:
            continue
        spans.append(_check_entry(path, name, entry, data_len))
    # the ranges must tile [0, data_len) exactly, as the safetensors loader requires
    expected = 0
    for begin, end, name in sorted(spans):
        if begin != expected:
            kind = "overlaps the previous tensor" if begin < expected else "leaves a gap before it"
            raise CorruptModelError(f"{path}: tensor {name!r} starts at byte {begin} and {kind}")
        expected = end
    if expected != data_len:
        raise CorruptModelError(
            f"{path}: tensors cover {expected} bytes but the data buffer holds {data_len} "
            "(trailing bytes after the last tensor)"
        )


def _check_entry(path: Path, name: str, entry: Any, data_len: int) -> tuple[int, int, str]:
    if not isinstance(entry, dict):
        raise CorruptModelError(f"{path}: entry for tensor {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise CorruptModelError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CorruptModelError(f"{path}: tensor {name!r} has invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise CorruptModelError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if begin > end:
        raise CorruptModelError(f"{path}: tensor {name!r} has data_offsets {offsets} that run backwards")
    if end > data_len:
        raise CorruptModelError(
            f"{path}: tensor {name!r} ends at byte {end} of the data buffer but the file holds only "
            f"{data_len} data bytes (truncated)"
        )
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - begin:
        raise CorruptModelError(
            f"{path}: tensor {name!r} declares shape {shape} of {dtype} ({bits // 8} bytes) "
            f"but data_offsets span {end - begin} bytes"
        )
    return begin, end, name


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
