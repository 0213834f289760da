"""How a single file stores its weights: the precision (fp8 included) and bitsandbytes quantization.

- precision: the dtype that holds most of the weights (``bf16``, ``fp16``, ``fp32``, ``fp8_e4m3fn``,
  ``fp8_e5m2``), read from the safetensors header; it is the file's, whatever the model is later
  loaded as.
- ComfyUI's "fp8_scaled" files store fp8 weights with a per-tensor scale beside each one
  (``<layer>.scale_weight``, marked by a ``scaled_fp8`` tensor; newer ones ``<layer>.weight_scale``):
  quantization ``fp8_scaled``, the loader multiplies the scales back in.
- bitsandbytes checkpoints keep each quantized weight's state beside it: NF4/FP4
  (``<layer>.weight.quant_state.bitsandbytes__nf4``, ``absmax``, ``quant_map``) and LLM.int8
  (``<layer>.SCB``). Their format is ``bnb_quantized_nf4b`` / ``bnb_quantized_int8b``: loaded kept
  quantized where bitsandbytes runs (services.load.bnb).
"""

from __future__ import annotations

from collections import Counter

from modelbus.services.probe.result import ProbeResult
from modelbus.services.probe.tensors import TensorIndex
from modelbus.services.records.enums import ModelFormat, ModelType

_PRECISIONS = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp64", "F8_E4M3": "fp8_e4m3fn",
               "F8_E5M2": "fp8_e5m2"}  # fmt: skip
FP8_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_NF4, _FP4, _INT8 = ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4", ".SCB"


def precision_of(index: TensorIndex) -> str | None:
    """The dtype holding most weight elements (floating dtypes of tensors of two or more dimensions)."""
    counts: Counter[str] = Counter()
    for name, dtype in index.dtypes.items():
        shape = index.shapes.get(name, ())
        if dtype in _PRECISIONS and len(shape) >= 2:
            n = 1
            for dim in shape:
                n *= dim
            counts[_PRECISIONS[dtype]] += n
    return counts.most_common(1)[0][0] if counts else None


def bnb_quantization(index: TensorIndex) -> tuple[ModelFormat, str] | None:
    keys = index.shapes
    if any(k.endswith(_NF4) for k in keys):
        return ModelFormat.BnbQuantizedNF4, "nf4"
    if any(k.endswith(_FP4) for k in keys):
        return ModelFormat.BnbQuantizedNF4, "fp4"
    if any(k.endswith(_INT8) for k in keys) and any(k.endswith(".weight_format") for k in keys):
        return ModelFormat.BnbQuantizedInt8, "int8"
    return None


def is_fp8_scaled(index: TensorIndex) -> bool:
    return "scaled_fp8" in index.shapes or any(k.endswith(FP8_SCALE_SUFFIXES) for k in index.shapes)


def with_storage_facts(index: TensorIndex, result: ProbeResult) -> ProbeResult:
    """``result`` with the file's precision, and its bitsandbytes or fp8-scaled quantization."""
    update: dict[str, object] = {}
    precision = precision_of(index)
    if precision is not None and result.precision is None:
        update["precision"] = precision
    bnb = bnb_quantization(index)
    if bnb is not None and result.model_type is ModelType.Main and result.model_format is ModelFormat.Checkpoint:
        update["model_format"], update["quantization"] = bnb
    elif precision is not None and precision.startswith("fp8") and is_fp8_scaled(index):
        update["quantization"] = "fp8_scaled"
    return result.model_copy(update=update) if update else result
