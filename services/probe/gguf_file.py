"""GGUF files: the header read without the data, the family told from the tensor names and shapes.

The community ships diffusion transformers as GGUF (city96's FLUX, Qwen-Image and Wan files) with the
original release's tensor names, so the safetensors rules identify them once the shapes are turned
from GGUF's order (fastest dimension first) to torch's. The quantization types and their block sizes
are the ``gguf`` package's; the header is parsed here so that every inconsistency gets a message that
names it (the package's reader maps the whole file and stops at the first bad value). Refused, saying
what was found: a truncated file, an unknown quantization type, and a language model (llama.cpp names
its blocks ``blk.N`` beside a ``token_embd``) or any GGUF that is not a diffusion transformer.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from modelbus.services.probe.errors import CorruptModelError, UnrecognizedFilesError
from modelbus.services.probe.result import ProbeResult
from modelbus.services.probe.tensor_index import TensorIndex
from modelbus.services.records.enums import BaseModelType as Base
from modelbus.services.records.enums import ModelFormat, ModelType

_MAGIC = b"GGUF"
_MAX_TENSORS = 200_000  # a FLUX GGUF has ~780, a 70B LLM ~720
_MAX_KV = 100_000
_MAX_STRING = 16 << 20
_MAX_ARRAY = 64 << 20  # tokenizer vocabularies: ~250k entries
_MAX_DIMS = 8
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# city96's converters name the family in general.architecture; a name not listed claims nothing
_ARCH_FAMILIES: dict[str, frozenset[Base]] = {
    "flux": frozenset({Base.Flux, Base.Chroma}), "chroma": frozenset({Base.Chroma}), "flux2": frozenset({Base.Flux2}),
    "wan": frozenset({Base.Wan21, Base.Wan22}), "qwen_image": frozenset({Base.QwenImage, Base.QwenImage21}),
    "sd3": frozenset({Base.StableDiffusion3, Base.StableDiffusion35Medium, Base.StableDiffusion35Large}),
    "hidream": frozenset({Base.HiDream}), "lumina2": frozenset({Base.Lumina2}),
    "ltxv": frozenset({Base.LTXVideo, Base.LTXVideo2}), "hyvid": frozenset({Base.HunyuanVideo, Base.HunyuanVideo15}),
}  # fmt: skip
_LLM_MARKERS = ("token_embd.", "blk.", "output_norm.")
_TEXT_ENCODER_MARKERS = ("enc.blk.", "dec.blk.")


class GGUFHeader:
    """What a GGUF file's header holds: metadata, tensor name -> (torch-order shape, type, offset, bytes)."""

    def __init__(self, path: Path, version: int, metadata: dict[str, Any],
                 tensors: dict[str, tuple[tuple[int, ...], str, int, int]], data_start: int) -> None:
        self.path, self.version, self.metadata = path, version, metadata
        self.tensors, self.data_start = tensors, data_start

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def quantization(self) -> tuple[str, dict[str, float]]:
        """The type most weights are stored in, and each type's share of the elements."""
        counts: Counter[str] = Counter()
        for shape, qtype, _, _ in self.tensors.values():
            n = 1
            for dim in shape:
                n *= dim
            counts[qtype] += n
        total = sum(counts.values()) or 1
        shares = {t: n / total for t, n in counts.most_common()}
        quantized = [t for t in shares if t not in ("F32", "F16", "BF16", "F64")]
        return (quantized[0] if quantized else next(iter(shares), "F32")), shares

    def data_bytes(self) -> int:
        return sum(nbytes for _, _, _, nbytes in self.tensors.values())


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse the header; :class:`CorruptModelError` names what is wrong (truncation, unknown types)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            return _parse(path, fh, size)
    except (struct.error, EOFError) as exc:
        raise CorruptModelError(f"{path}: truncated GGUF header ({size} bytes): {exc}") from exc
    except UnicodeDecodeError as exc:
        raise CorruptModelError(f"{path}: GGUF header holds a name that is not UTF-8") from exc


def _parse(path: Path, fh: IO[bytes], size: int) -> GGUFHeader:
    import gguf

    def read(n: int) -> bytes:
        data = fh.read(n)
        if len(data) != n:
            raise EOFError(f"needed {n} bytes at offset {fh.tell() - len(data)}, the file ends there")
        return data

    def unpack(fmt: str) -> Any:
        return struct.unpack(fmt, read(struct.calcsize(fmt)))[0]

    def string() -> str:
        n = unpack("<Q")
        if n > _MAX_STRING:
            raise CorruptModelError(f"{path}: GGUF string of {n} bytes (over {_MAX_STRING})")
        return read(n).decode("utf-8")

    def value(vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return string()
        if vtype == _ARRAY and depth == 0:
            item, count = unpack("<I"), unpack("<Q")
            if count > _MAX_ARRAY:
                raise CorruptModelError(f"{path}: GGUF array of {count} items (over {_MAX_ARRAY})")
            if item in _SCALARS:  # numbers: skip them in one read
                read(struct.calcsize(_SCALARS[item]) * count)
                return f"<{count} numbers>"
            return [value(item, depth + 1) for _ in range(count)][:16]  # vocabularies: only a few kept
        raise CorruptModelError(f"{path}: GGUF metadata value of unknown type {vtype}")

    if read(4) != _MAGIC:
        raise UnrecognizedFilesError(f"{path}: named .gguf but does not start with the GGUF magic")
    version = unpack("<I")
    if version not in (2, 3):
        raise CorruptModelError(f"{path}: GGUF version {version} (known: 2, 3)")
    n_tensors, n_kv = unpack("<Q"), unpack("<Q")
    if n_tensors > _MAX_TENSORS or n_kv > _MAX_KV:
        raise CorruptModelError(f"{path}: GGUF header claims {n_tensors} tensors and {n_kv} metadata entries "
                                f"(limits {_MAX_TENSORS}, {_MAX_KV})")  # fmt: skip
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        metadata[key] = value(unpack("<I"))
    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name = string()
        n_dims = unpack("<I")
        if n_dims > _MAX_DIMS:
            raise CorruptModelError(f"{path}: GGUF tensor {name!r} has {n_dims} dimensions")
        dims = tuple(unpack("<Q") for _ in range(n_dims))
        infos.append((name, tuple(reversed(dims)), unpack("<I"), unpack("<Q")))
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CorruptModelError(f"{path}: GGUF alignment {alignment!r} is not a power of two")
    data_start = -(-fh.tell() // alignment) * alignment
    tensors: dict[str, tuple[tuple[int, ...], str, int, int]] = {}
    known = {t.value: t for t in gguf.GGMLQuantizationType}
    for name, shape, raw_type, offset in infos:
        qtype = known.get(raw_type)
        if qtype is None:
            raise CorruptModelError(
                f"{path}: GGUF tensor {name!r} has unknown quantization type {raw_type} "
                f"(known: {', '.join(t.name for t in gguf.GGMLQuantizationType)})"
            )
        if name in tensors:
            raise CorruptModelError(f"{path}: GGUF tensor {name!r} appears twice")
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        elements = 1
        for dim in shape:
            elements *= dim
        if shape and shape[-1] % block:
            raise CorruptModelError(f"{path}: GGUF tensor {name!r} of shape {shape} does not fill whole "
                                    f"{qtype.name} blocks of {block}")  # fmt: skip
        nbytes = elements // block * type_size
        end = data_start + offset + nbytes
        if end > size:
            raise CorruptModelError(
                f"{path}: truncated GGUF: tensor {name!r} ({qtype.name}, {shape}) ends at byte {end}, "
                f"the file has {size}"
            )
        tensors[name] = (shape, qtype.name, offset, nbytes)
    return GGUFHeader(path, version, metadata, tensors, data_start)


def gguf_tensor_index(path: Path) -> TensorIndex:
    header = read_gguf_header(path)
    _refuse_non_diffusion(header)
    return _index_of(header)


def _index_of(header: GGUFHeader) -> TensorIndex:
    meta = {k: v for k, v in header.metadata.items() if isinstance(v, str)}
    return TensorIndex(header.path, {name: t[0] for name, t in header.tensors.items()}, meta)


def _refuse_non_diffusion(header: GGUFHeader) -> None:
    names = header.tensors
    arch = header.architecture or "unnamed"
    if any(n.startswith(_TEXT_ENCODER_MARKERS) for n in names):
        raise UnrecognizedFilesError(
            f"{header.path}: GGUF of a text encoder (architecture {arch!r}, llama.cpp enc/dec blocks): "
            "modelbus loads GGUF diffusion transformers only")  # fmt: skip
    if any(n.startswith(_LLM_MARKERS) for n in names) or "tokenizer.ggml.model" in header.metadata:
        blocks = {n.split(".")[1] for n in names if n.startswith("blk.")}
        raise UnrecognizedFilesError(
            f"{header.path}: GGUF of a language model (architecture {arch!r}, {len(blocks)} blocks, "
            f"{'a' if 'tokenizer.ggml.model' in header.metadata else 'no'} tokenizer): not a diffusion model; "
            "modelbus loads GGUF diffusion transformers only")  # fmt: skip


def identify_gguf(path: Path, identify_file: Callable[[TensorIndex], ProbeResult]) -> ProbeResult:
    """Identify a GGUF transformer with the file rules; the result is ``main``/``gguf`` with its quantization."""
    header = read_gguf_header(path)
    _refuse_non_diffusion(header)
    index = _index_of(header)
    try:
        result = identify_file(index)
    except UnrecognizedFilesError as exc:
        main = exc.partial.get("model_type") is ModelType.Main
        partial = {**exc.partial, "model_format": ModelFormat.GGUF} if main else {}
        raise UnrecognizedFilesError(f"{exc} (a GGUF file, architecture {header.architecture or 'unnamed'!r})",
                                     partial) from exc
    if result.model_type is not ModelType.Main:
        raise UnrecognizedFilesError(
            f"{path}: GGUF holding a {result.model_type.value} of {result.base_model.value}: modelbus loads GGUF "
            "diffusion transformers only")  # fmt: skip
    quant, shares = header.quantization()
    others = [f"{t} {share:.0%}" for t, share in shares.items() if t != quant and share >= 0.01]
    notes = [result.notes] if result.notes else []
    claimed = _ARCH_FAMILIES.get(header.architecture.lower())
    if claimed is not None and result.base_model not in claimed:
        notes.append(f"GGUF general.architecture={header.architecture!r} claims "
                     f"{'/'.join(sorted(b.value for b in claimed))}, but the tensors are "
                     f"{result.base_model.value}'s: identified by the tensors")  # fmt: skip
    if others:
        notes.append(f"GGUF {quant} with {', '.join(others)} of the weights in other types")
    return result.model_copy(update={"model_format": ModelFormat.GGUF, "quantization": quant,
                                     "notes": "; ".join(notes) or None})  # fmt: skip
