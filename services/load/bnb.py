"""bitsandbytes-quantized FLUX transformers (NF4/FP4, LLM.int8) loaded with their weights kept quantized.

Two layouts carry the same per-weight state: lllyasviel's ``flux1-dev-bnb-nf4(-v2).safetensors`` (BFL
names under ``model.diffusion_model.``, the VAE and text encoders bundled) and the files diffusers and
transformers save for a model quantized with a bnb ``quantization_config``. A 4-bit weight is its packed
bytes (``<layer>.weight``) with ``.absmax``, ``.quant_map``, for nested statistics ``.nested_absmax`` and
``.nested_quant_map``, and a JSON blob ``.quant_state.bitsandbytes__nf4`` (or ``__fp4``) holding its shape,
block size and dtypes; an LLM.int8 weight is int8 rows (``<layer>.weight``) with a per-row scale
(``<layer>.SCB``) and ``<layer>.weight_format`` (0: row-major, the only one bnb still reads).

The rule: bitsandbytes' own :class:`QuantState` reads every 4-bit state, a weight whose state is
incomplete, unreadable or of a type bitsandbytes does not know refuses the whole load (one line naming
the tensor), and nothing is built until every state has been read. Renaming BFL's layout to diffusers'
splits fused projections by rows; the conversion is run on row-index tensors, so each quantized part is
the rows of one quantized source: int8 rows are sliced as stored, and a 4-bit part is requantized from
its source's dequantized rows with the source's block size (exact where the rows start on a block, as
all of FLUX's do). Weights not split keep the file's bytes.

bitsandbytes runs where its backend does: CUDA, and since 0.48 the CPU. A worker whose device it does
not support refuses with what ``import bitsandbytes`` reported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from diffusers import FluxTransformer2DModel

from modelbus.services.load.errors import InvalidModelException
from modelbus.services.load.flux import flux_diffusers_state, flux_transformer_config
from modelbus.services.load.kit import DENOISER_SUBMODELS, NOT_FLUX_TRANSFORMER, Loaded, LoadRequest, base_of
from modelbus.services.load.safetensors_fast import empty_model
from modelbus.services.load.weights import read_state_dict

QUANT_TYPES = ("nf4", "fp4")
_QS = ".quant_state.bitsandbytes__"
_4BIT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold (BitsAndBytesConfig's default; files do not record it)
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' block sizes
_ROW_BITS = 32  # a row-index tensor's value: source number << 32 | row


def bitsandbytes_for(device: torch.device, where: Path) -> ModuleType:
    """bitsandbytes, when it imports and its backend runs on ``device``; else a one-line refusal."""
    try:
        import bitsandbytes
    except Exception as exc:  # an absent package, or a native library that fails to load
        said = (str(exc).strip().splitlines() or [""])[0]  # (a native library's error runs over many lines)
        raise InvalidModelException(f"{where}: bitsandbytes checkpoints need bitsandbytes, which does not import "
                                    f"here ({type(exc).__name__}: {said}); install it (pip install bitsandbytes) "
                                    "or load it on a worker that has it") from exc  # fmt: skip
    supported = set(getattr(bitsandbytes, "supported_torch_devices", {"cuda"}))
    if device.type not in supported:
        raise InvalidModelException(
            f"{where}: bitsandbytes {bitsandbytes.__version__} does not run on this worker's device ({device.type}; "
            f"it supports {', '.join(sorted(supported))}): load it on a CUDA worker")  # fmt: skip
    return bitsandbytes


@dataclass
class _Quantized:
    """One quantized weight as the file stores it (on the CPU)."""

    data: torch.Tensor
    shape: tuple[int, int]
    state: Any = None                  # 4-bit: bitsandbytes' QuantState
    scb: torch.Tensor | None = None    # int8: the per-row scales

    def rows(self, bnb: ModuleType, rows: torch.Tensor, dense: dict[int, torch.Tensor], n: int,
             device: torch.device) -> _Quantized:
        """The weight's ``rows`` (a part of a fused projection), quantized as the source was, on ``device``
        (where bitsandbytes' kernels are fastest: requantizing a FLUX's fused projections on the CPU takes
        minutes)."""
        if self.scb is not None:
            return _Quantized(self.data[rows].contiguous(), (len(rows), self.shape[1]), scb=self.scb[rows].contiguous())
        if n not in dense:
            dense.clear()  # the parts of one source come together: one dense copy at a time
            self.state.to(device)
            dense[n] = bnb.functional.dequantize_4bit(self.data.to(device), self.state).float()
        rows = rows.to(device)
        data, state = bnb.functional.quantize_4bit(
            dense[n][rows].contiguous(), blocksize=self.state.blocksize, compress_statistics=False,
            quant_type=self.state.quant_type, quant_storage=self.data.dtype)  # fmt: skip
        state.dtype = self.state.dtype
        return _Quantized(data, (len(rows), self.shape[1]), state=state)


def _read_4bit(bnb: ModuleType, tensors: dict[str, torch.Tensor], key: str, where: Path) -> _Quantized:
    """``key``'s 4-bit state read by bitsandbytes, every part checked against the shape it records."""
    kinds = [k[len(key) + len(_QS):] for k in tensors if k.startswith(key + _QS)]
    if len(kinds) != 1:
        raise InvalidModelException(f"{where}: {key} has {len(kinds)} bitsandbytes quant states ({kinds}); one expected")
    blob = tensors[f"{key}{_QS}{kinds[0]}"]
    try:
        packed = json.loads(bytes(blob.to(torch.uint8).numpy()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidModelException(f"{where}: {key}'s bitsandbytes quant state is truncated or not JSON ({exc})") from exc
    if not isinstance(packed, dict) or packed.get("quant_type") != kinds[0]:
        raise InvalidModelException(f"{where}: {key}'s quant state says quant type "
                                    f"{packed.get('quant_type') if isinstance(packed, dict) else packed!r}, "
                                    f"its name {kinds[0]!r}")  # fmt: skip
    parts = {f"weight.{p}": tensors[f"{key}.{p}"] for p in _4BIT_PARTS if f"{key}.{p}" in tensors}
    missing = [p for p in ("absmax", "quant_map") if f"weight.{p}" not in parts]
    missing += [p for p in ("nested_absmax", "nested_quant_map") if "nested_offset" in packed and f"weight.{p}" not in parts]
    if missing:
        raise InvalidModelException(f"{where}: {key} is missing its bitsandbytes {', '.join(missing)}")
    try:
        state = bnb.functional.QuantState.from_dict({**parts, **packed}, device=torch.device("cpu"))
    except (ValueError, KeyError, TypeError, AssertionError, AttributeError) as exc:
        raise InvalidModelException(f"{where}: {key}'s bitsandbytes quant state does not read: "
                                    f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
    blocksizes = [state.blocksize] + ([state.state2.blocksize] if state.nested else [])
    if any(not isinstance(b, int) or b not in _BLOCKSIZES for b in blocksizes) or \
            not isinstance(state.dtype, torch.dtype) or not state.dtype.is_floating_point:
        raise InvalidModelException(f"{where}: {key}'s quant state has block size {blocksizes} and dtype "
                                    f"{state.dtype!r}: bitsandbytes uses blocks of {list(_BLOCKSIZES)} and a "
                                    "floating dtype")  # fmt: skip
    data = tensors[key]
    shape = tuple(state.shape or ())
    if len(shape) != 2:
        raise InvalidModelException(f"{where}: {key}'s quant state has shape {list(shape)}; a Linear weight has two")
    n = shape[0] * shape[1]
    packed_bytes = data.numel() * data.element_size()
    blocks = math.ceil(n / state.blocksize)
    if packed_bytes != math.ceil(n / 2) or state.absmax.numel() != blocks:
        raise InvalidModelException(f"{where}: {key} holds {packed_bytes} bytes and {state.absmax.numel()} block "
                                    f"scales; its shape {list(shape)} needs {math.ceil(n / 2)} and {blocks}")  # fmt: skip
    return _Quantized(data, (shape[0], shape[1]), state=state)


def _read_int8(tensors: dict[str, torch.Tensor], stem: str, where: Path) -> _Quantized:
    weight = tensors.get(stem + ".weight")
    scb = tensors[stem + ".SCB"]
    if weight is None or weight.dtype != torch.int8 or weight.dim() != 2:
        raise InvalidModelException(f"{where}: {stem}.SCB without an int8 matrix {stem}.weight")
    fmt = tensors.get(stem + ".weight_format")
    if fmt is not None and int(fmt.reshape(-1)[0]) != 0:
        raise InvalidModelException(f"{where}: {stem}.weight_format is {int(fmt.reshape(-1)[0])}: only row-major "
                                    "(0) LLM.int8 weights load (bitsandbytes dropped the GPU-tiled formats)")  # fmt: skip
    if scb.numel() != weight.shape[0]:
        raise InvalidModelException(f"{where}: {stem}.SCB has {scb.numel()} scales for {weight.shape[0]} rows")
    return _Quantized(weight, (weight.shape[0], weight.shape[1]), scb=scb.float().reshape(-1))


def read_quantized(bnb: ModuleType, tensors: dict[str, torch.Tensor], where: Path) -> dict[str, _Quantized]:
    """Every quantized weight of the file by its key; refused whole if one state is wrong."""
    found: dict[str, _Quantized] = {}
    for name in tensors:
        if _QS in name:
            key, kind = name.split(_QS, 1)
            if kind not in QUANT_TYPES:
                raise InvalidModelException(f"{where}: {name}: bitsandbytes quant type {kind!r} is not one it knows "
                                            f"({', '.join(QUANT_TYPES)})")  # fmt: skip
            if key not in tensors:
                raise InvalidModelException(f"{where}: {name} without its packed weight {key}")
            found[key] = _read_4bit(bnb, tensors, key, where)
        elif name.endswith(".SCB"):
            stem = name.removesuffix(".SCB")
            found[stem + ".weight"] = _read_int8(tensors, stem, where)
    orphans = sorted(k for k in tensors if k.endswith((".absmax", ".quant_map")) and k.rpartition(".")[0] not in found)
    if orphans:
        raise InvalidModelException(f"{where}: {orphans[0]} has no quant state beside it "
                                    f"({orphans[0].rpartition('.')[0]}{_QS}nf4/fp4 is missing)")
    if not found:
        raise InvalidModelException(f"{where}: no bitsandbytes-quantized weight (no .quant_state.bitsandbytes__*, no .SCB)")
    return found


def _is_state(name: str, quantized: dict[str, _Quantized]) -> bool:
    """A tensor that belongs to a quantized weight's state rather than to the model."""
    stem, _, leaf = name.rpartition(".")
    if _QS in name or (stem in quantized and leaf in _4BIT_PARTS):
        return True
    return leaf in ("SCB", "weight_format") and stem + ".weight" in quantized


def _converted(tensors: dict[str, torch.Tensor], quantized: dict[str, _Quantized], dtype: torch.dtype,
               where: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Diffusers' names for the file's tensors: the plain ones (cast to ``dtype``), row-index tensors where
    quantized weights went, and the sources' keys in the order the indices number them."""
    sources = sorted(quantized)
    plain = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()
             if k not in quantized and not _is_state(k, quantized)}
    index = {k: ((n << _ROW_BITS) + torch.arange(quantized[k].shape[0], dtype=torch.int64)).reshape(-1, 1)
             for n, k in enumerate(sources)}
    converted = flux_diffusers_state(plain | index, where)
    meta = {k: torch.empty(v.shape, device="meta") for k, v in plain.items()}
    meta |= {k: torch.empty(q.shape, device="meta") for k, q in quantized.items()}
    shapes = flux_diffusers_state(meta, where)
    return converted, shapes, sources


def _quantized_linear(bnb: ModuleType, q: _Quantized, bias: bool, device: torch.device, dtype: torch.dtype,
                      threshold: float) -> torch.nn.Module:
    out_features, in_features = q.shape
    if q.scb is not None:
        with torch.device("meta"):
            int8 = _Int8Linear(in_features, out_features, bias=bias, has_fp16_weights=False, threshold=threshold)
        int8.weight = bnb.nn.Int8Params(q.data.to(device), requires_grad=False, has_fp16_weights=False)
        int8.register_buffer("scb", q.scb.to(device), persistent=False)
        return int8
    with torch.device("meta"):
        nf4 = _Linear4bit(in_features, out_features, bias=bias, compute_dtype=dtype, quant_type=q.state.quant_type)
    nf4.support_avx512bf16_for_cpu = False  # its CPU path repacks the weight in place: the cache moves it as stored
    state = q.state
    state.to(device)
    nf4.weight = bnb.nn.Params4bit(q.data.to(device), requires_grad=False, quant_state=state,
                                   blocksize=state.blocksize, compress_statistics=state.nested,
                                   quant_type=state.quant_type, quant_storage=q.data.dtype, bnb_quantized=True,
                                   module=nf4)  # fmt: skip
    nf4.quant_state = state
    nf4.register_buffer("absmax", state.absmax, persistent=False)
    nf4.register_buffer("code", state.code, persistent=False)
    if state.nested:
        nf4.register_buffer("nested_absmax", state.state2.absmax, persistent=False)
        nf4.register_buffer("nested_code", state.state2.code, persistent=False)
        nf4.register_buffer("offset", state.offset, persistent=False)
    return nf4


def _linear_classes() -> tuple[type[torch.nn.Module], type[torch.nn.Module]]:
    import bitsandbytes as bnb

    class Linear4bit(bnb.nn.Linear4bit):  # type: ignore[misc, name-defined]
        """bnb's 4-bit Linear whose quant state is also its buffers, so a whole-model move (the cache's)
        carries it; the state is pointed at them before each call."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weight: Any = self.weight
            state = weight.quant_state
            state.absmax, state.code = self.absmax, self.code
            if state.nested:
                state.state2.absmax, state.state2.code, state.offset = self.nested_absmax, self.nested_code, self.offset
            return super().forward(x)  # type: ignore[no-any-return]

    class Int8Linear(bnb.nn.Linear8bitLt):  # type: ignore[misc, name-defined]
        """bnb's LLM.int8 Linear whose row scales are a buffer (the cache moves buffers)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weight: Any = self.weight
            weight.CB, weight.SCB = None, None
            state: Any = self.state
            state.CB, state.SCB = weight.data, self.scb
            return super().forward(x)  # type: ignore[no-any-return]

    return Linear4bit, Int8Linear


_Linear4bit: Any = None
_Int8Linear: Any = None


def _install_classes() -> None:
    global _Linear4bit, _Int8Linear
    if _Linear4bit is None:
        _Linear4bit, _Int8Linear = _linear_classes()


def _build(bnb: ModuleType, model: torch.nn.Module, converted: dict[str, torch.Tensor],
           quantized: dict[str, _Quantized], sources: list[str], device: torch.device, dtype: torch.dtype,
           where: Path, threshold: float = INT8_THRESHOLD) -> torch.nn.Module:
    """``model`` (built on the meta device) with its quantized Linears replaced by bnb's and every other
    weight assigned; refused whole if a quantized weight has no Linear of its shape, or a weight is missing."""
    modules = dict(model.named_modules())
    dense: dict[int, torch.Tensor] = {}
    replaced: dict[str, torch.nn.Module] = {}
    for key, value in converted.items():
        if value.dtype != torch.int64 or not key.endswith(".weight"):
            continue
        ids = value.reshape(-1)
        n = int(ids[0]) >> _ROW_BITS
        if torch.any((ids >> _ROW_BITS) != n):
            raise InvalidModelException(f"{where}: {key} mixes rows of several quantized weights")
        source = quantized[sources[n]]
        rows = ids - (n << _ROW_BITS)
        whole = len(rows) == source.shape[0] and torch.equal(rows, torch.arange(source.shape[0]))
        part = source if whole else source.rows(bnb, rows, dense, n, device)
        name = key.removesuffix(".weight")
        linear = modules.get(name)
        if not isinstance(linear, torch.nn.Linear) or (linear.out_features, linear.in_features) != part.shape:
            raise InvalidModelException(f"{where}: quantized {sources[n]} ({list(part.shape)}) goes to {key}, "
                                        f"which is not a Linear of that shape in {type(model).__name__}")  # fmt: skip
        replaced[name] = _quantized_linear(bnb, part, linear.bias is not None, device, dtype, threshold)
    for name, module in replaced.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    plain = {k: v.to(device) for k, v in converted.items() if k.removesuffix(".weight") not in replaced
             or not k.endswith(".weight")}
    result = model.load_state_dict(plain, strict=False, assign=True)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):  # transformers: the assignment untied what files store once
        tie()
    still_meta = sorted(n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta)
    if still_meta or result.unexpected_keys:
        raise InvalidModelException(f"{where}: {len(still_meta)} weights missing, {len(result.unexpected_keys)} "
                                    f"unexpected for {type(model).__name__}, e.g. "
                                    f"{(still_meta + list(result.unexpected_keys))[:3]}")  # fmt: skip
    return model.requires_grad_(False).eval()


def load_bnb_main(req: LoadRequest) -> Loaded:
    """A bitsandbytes NF4/FP4 or LLM.int8 FLUX transformer from one file, kept quantized."""
    if req.submodel is None or req.submodel.value not in DENOISER_SUBMODELS:
        raise InvalidModelException(f"{req.location}: a bitsandbytes FLUX checkpoint is loaded as its transformer "
                                    "submodel (its bundled VAE and text encoders are not read)")  # fmt: skip
    if base_of(req.record) != "flux":
        raise InvalidModelException(f"{req.location}: bitsandbytes checkpoints load for FLUX transformers only "
                                    f"(this record's base is {base_of(req.record)})")  # fmt: skip
    if not req.location.is_file():
        raise InvalidModelException(f"{req.location}: a bitsandbytes checkpoint must be a single file")
    bnb = bitsandbytes_for(req.device, req.location)
    _install_classes()
    state = read_state_dict([req.location], torch.device("cpu"), None, lambda k: not k.startswith(NOT_FLUX_TRANSFORMER))
    quantized = read_quantized(bnb, state.tensors, req.location)
    converted, shapes, sources = _converted(state.tensors, quantized, req.dtype, req.location)
    config = flux_transformer_config(shapes, req.location)
    model = empty_model(lambda: FluxTransformer2DModel.from_config(config))
    return Loaded(_build(bnb, model, converted, quantized, sources, req.device, req.dtype, req.location))


def folder_quantization(folder: Path) -> dict[str, Any] | None:
    """The bnb ``quantization_config`` a diffusers or transformers folder was saved with, or None."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return quant if isinstance(quant, dict) and quant.get("quant_method") == "bitsandbytes" else None


def load_bnb_folder(build: Callable[[], torch.nn.Module], files: list[Path], folder: Path, device: torch.device,
                    dtype: torch.dtype) -> Loaded:
    """A diffusers or transformers model saved quantized by bitsandbytes (4-bit or LLM.int8, its names the
    model's own), built by ``build`` on the meta device and kept quantized."""
    quant = folder_quantization(folder) or {}
    bnb = bitsandbytes_for(device, folder)
    _install_classes()
    if not all(f.suffix == ".safetensors" for f in files):
        raise InvalidModelException(f"{folder}: bitsandbytes-quantized weights load from .safetensors only")
    state = read_state_dict(files, torch.device("cpu"), None)
    quantized = read_quantized(bnb, state.tensors, folder)
    sources = sorted(quantized)
    plain = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.tensors.items()
             if k not in quantized and not _is_state(k, quantized)}
    whole = {k: ((n << _ROW_BITS) + torch.arange(quantized[k].shape[0], dtype=torch.int64)).reshape(-1, 1)
             for n, k in enumerate(sources)}
    threshold = float(quant.get("llm_int8_threshold", INT8_THRESHOLD))
    return Loaded(_build(bnb, build(), plain | whole, quantized, sources, device, dtype, folder, threshold))
