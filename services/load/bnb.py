"""bitsandbytes-quantized checkpoints (NF4/FP4, LLM.int8): identified anywhere, loadable only on CUDA.

bitsandbytes' kernels run on CUDA devices; a CPU (or MPS) worker refuses such a record with an error
that says where it can load. Dequantizing them on a CUDA worker is not implemented yet: the refusal
there says so too, rather than building a model from packed bytes.
"""

from __future__ import annotations

from modelbus.services.load.errors import InvalidModelException
from modelbus.services.load.kit import Loaded, LoadRequest


def load_bnb_main(req: LoadRequest) -> Loaded:
    quant = req.record.quantization or ("int8" if "int8" in str(getattr(req.record.model_format, "value", "")) else "nf4")
    if req.device.type != "cuda":
        raise InvalidModelException(
            f"{req.location}: bitsandbytes {quant} checkpoints load only where bitsandbytes runs (CUDA); "
            f"this worker's device is {req.device.type}: load it on a CUDA worker")  # fmt: skip
    raise InvalidModelException(
        f"{req.location}: bitsandbytes {quant} checkpoints are identified but not loaded by this version "
        "(dequantizing them is not implemented); use the bf16, fp8 or GGUF release of the model")  # fmt: skip
