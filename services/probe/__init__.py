"""Model identification: what a model file or folder is, read from headers and configs only.

``probe(path, overrides)`` returns a :class:`ProbeResult` (type, format, base, variant,
prediction type, compatible bases, original-format config). Safetensors are read through their
header alone; pickles are scanned for unsafe imports before ``torch.load(weights_only=True)``.
"""

from modelbus.services.probe.errors import (
    CorruptModelError,
    InvalidOverrideError,
    ModelPathError,
    ProbeError,
    UnrecognizedFilesError,
    UnsafeModelError,
)
from modelbus.services.probe.identify import probe
from modelbus.services.probe.pickle_scan import inspect_pickle, safe_torch_load, scan_pickle
from modelbus.services.probe.result import ProbeResult, legacy_config_path
from modelbus.services.probe.safetensors_header import read_safetensors_header, tensor_shapes
from modelbus.services.probe.tensors import MODEL_FILE_SUFFIXES, TensorIndex, read_tensor_index

__all__ = [
    "MODEL_FILE_SUFFIXES",
    "CorruptModelError",
    "InvalidOverrideError",
    "ModelPathError",
    "ProbeError",
    "ProbeResult",
    "TensorIndex",
    "UnrecognizedFilesError",
    "UnsafeModelError",
    "inspect_pickle",
    "legacy_config_path",
    "probe",
    "read_safetensors_header",
    "read_tensor_index",
    "safe_torch_load",
    "scan_pickle",
    "tensor_shapes",
]
