"""The header reader: what it accepts, each way it refuses, and fuzzing with hypothesis."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from modelbus.services.probe import (
    CorruptModelError,
    ModelPathError,
    ProbeError,
    read_safetensors_header,
    tensor_shapes,
)

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _raw(path: Path, header: Any, data_len: int, header_len: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + raw + b"\0" * data_len)
    return path


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_reads_what_the_library_wrote(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(5, dtype=torch.bfloat16), "c": torch.zeros(0)},
              str(path), metadata={"format": "pt"})  # fmt: skip
    header = read_safetensors_header(path)
    assert tensor_shapes(header) == {"a": (2, 3), "b": (5,), "c": (0,)}
    assert header["__metadata__"] == {"format": "pt"}
    assert header["a"]["dtype"] == "F32"


def test_truncated_download_names_the_tensor_and_sizes(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(64), "z": torch.zeros(64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CorruptModelError, match=r"'z' ends at byte 512 .* holds only 502 data bytes \(truncated\)"):
        read_safetensors_header(path)


CASES = {
    "too short": (b"\x01\x02", None, 0, None, "too short"),
    "length past end": (b"{}", None, 0, 1000, "runs past the end"),
    "huge length": (b"{}", None, 0, 1 << 62, "exceeds the 100000000 byte limit"),
    "bad json": (b'{"a": ', None, 0, None, "not valid JSON"),
    "not an object": (b"[1, 2]", None, 0, None, "not a JSON object"),
    "html page": (b"<html>", None, 0, None, "not a JSON object"),
    "unknown dtype": (None, {"a": _entry("F17", [1], 0, 4)}, 4, None, "unknown dtype 'F17'"),
    "negative dim": (None, {"a": _entry("F32", [-1], 0, 4)}, 4, None, "invalid shape"),
    "offset beyond file": (None, {"a": _entry("F32", [4], 0, 16)}, 8, None, "truncated"),
    "backwards offsets": (None, {"a": _entry("U8", [0], 4, 0)}, 4, None, "run backwards"),
    "huge declared size": (None, {"a": _entry("F32", [1 << 40, 1 << 40], 0, 4)}, 4, None, "but data_offsets span 4"),
    "gap": (None, {"a": _entry("U8", [2], 2, 4)}, 4, None, "leaves a gap"),
    "overlap": (None, {"a": _entry("U8", [4], 0, 4), "b": _entry("U8", [2], 2, 4)}, 4, None, "overlaps"),
    "trailing bytes": (None, {"a": _entry("U8", [2], 0, 2)}, 6, None, "trailing bytes"),
    "bad metadata": (None, {"__metadata__": {"k": 1}}, 0, None, "must map strings to strings"),
    "entry not object": (None, {"a": [1, 2]}, 0, None, "is not an object"),
    "bool offsets": (None, {"a": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, 1, None,
                     "invalid data_offsets"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_headers_raise_clear_errors(tmp_path: Path, case: str) -> None:
    raw, header, data_len, header_len, message = CASES[case]
    path = tmp_path / "bad.safetensors"
    if raw is not None and header is None and case == "too short":
        path.write_bytes(raw)
    else:
        _raw(path, raw if raw is not None else header, data_len, header_len)
    with pytest.raises(CorruptModelError, match=message) as info:
        read_safetensors_header(path)
    assert str(path) in str(info.value)


def test_an_html_page_saved_as_a_model_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"<!DOCTYPE html><html><body>Please log in to download</body></html>")
    with pytest.raises(CorruptModelError, match=r"not a safetensors file.*starts with b'<!DOCTYPE html>"):
        read_safetensors_header(path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelPathError):
        read_safetensors_header(tmp_path / "nope.safetensors")
    with pytest.raises(ModelPathError):
        read_safetensors_header(tmp_path)


# ------------------------------------------------------------------------- property tests


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_never_crash(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.safetensors"
        path.write_bytes(data)
        try:
            read_safetensors_header(path)
        except ProbeError:
            pass


@FUZZ
@given(length=st.integers(min_value=0, max_value=(1 << 64) - 1), body=st.binary(max_size=256))
def test_random_declared_lengths_never_crash(length: int, body: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.safetensors"
        path.write_bytes(struct.pack("<Q", length) + body)
        try:
            read_safetensors_header(path)
        except ProbeError:
            pass


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "U8", "BOOL", "F4", "X"]),
        "shape": st.lists(st.integers(min_value=-1, max_value=40), max_size=3),
        "data_offsets": st.lists(st.integers(min_value=-1, max_value=200), min_size=0, max_size=3),
    }
)
_headers = st.dictionaries(st.sampled_from(["a", "b", "c", "__metadata__"]), _entries | _json_values, max_size=4)


def _library_opens(path: Path) -> dict[str, tuple[int, ...]] | None:
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118  (not iterable)
    except Exception:  # noqa: BLE001  (the library raises several types; any of them means "refused")
        return None


def _ours(path: Path) -> dict[str, tuple[int, ...]] | None:
    try:
        return tensor_shapes(read_safetensors_header(path))
    except ProbeError:
        return None


@FUZZ
@given(header=_headers, data_len=st.integers(min_value=0, max_value=200))
def test_structured_headers_agree_with_the_safetensors_library(header: dict[str, Any], data_len: int) -> None:
    """We accept exactly the headers the real loader accepts, with the same tensors and shapes."""
    with tempfile.TemporaryDirectory() as d:
        path = _raw(Path(d) / "f.safetensors", header, data_len)
        assert _ours(path) == _library_opens(path)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=400), flip=st.integers(min_value=0, max_value=400))
def test_damaged_real_files_agree_with_the_safetensors_library(cut: int, flip: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.safetensors"
        save_file({"a": torch.zeros(8), "b": torch.ones(3, 4)}, str(path), metadata={"x": "y"})
        data = bytearray(path.read_bytes())
        if flip < len(data):
            data[flip] ^= 0x5A
        path.write_bytes(bytes(data[: max(0, len(data) - cut)]))
        ours = _ours(path)
        if ours is not None:  # never accept what the loader would refuse
            assert ours == _library_opens(path)


@st.composite
def _tiled_files(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    """Mostly-valid headers: tensors tiling the buffer, then at most one small perturbation."""
    names = draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), unique=True, max_size=4))
    header: dict[str, Any] = {}
    offset = 0
    bits = {"F32": 32, "F16": 16, "U8": 8, "F4": 4}
    for name in names:
        dtype = draw(st.sampled_from(sorted(bits)))
        shape = draw(st.lists(st.integers(min_value=0, max_value=6), max_size=3))
        n = 1
        for dim in shape:
            n *= dim
        size = n * bits[dtype] // 8
        header[name] = _entry(dtype, shape, offset, offset + size)
        offset += size
    data_len = offset + draw(st.sampled_from([0, 0, 0, 1, -1]))
    if names and draw(st.booleans()):
        victim = header[draw(st.sampled_from(names))]
        victim["data_offsets"][draw(st.integers(0, 1))] += draw(st.sampled_from([-1, 1]))
    return header, max(0, data_len)


@FUZZ
@given(case=_tiled_files())
def test_tiled_headers_agree_with_the_safetensors_library(case: tuple[dict[str, Any], int]) -> None:
    header, data_len = case
    with tempfile.TemporaryDirectory() as d:
        path = _raw(Path(d) / "f.safetensors", header, data_len)
        assert _ours(path) == _library_opens(path)
