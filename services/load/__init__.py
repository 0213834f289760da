"""The load service: models by record key, through a RAM/VRAM cache, with load events.

``ModelLoadService(config, store, publisher=None).get_model(key, submodel_type, context)``
returns a :class:`ModelInfo`; ``with info as model:`` holds the model on the execution device.
"""

from modelbus.services.load.cache import CacheEntry, ModelCache, ModelLocker
from modelbus.services.load.errors import (
    CacheError,
    CacheOutOfMemoryError,
    InvalidModelException,
    LoadError,
    ModelNotFoundException,
    ModelTooLargeError,
    SubmodelRequiredError,
    UnsafeModelException,
)
from modelbus.services.load.ip_adapters import IPAdapter
from modelbus.services.load.kit import Loaded
from modelbus.services.load.safetensors_fast import FlatTensors, drop_page_cache, load_flat
from modelbus.services.load.service import (
    ModelInfo,
    ModelLoadService,
    execution_device,
    inference_dtype,
)
from modelbus.services.load.stats import CacheStats, EntryInfo, TierStats
from modelbus.services.records import UnknownModelException
from modelbus.services.records.enums import SubModelType

__all__ = [
    "CacheEntry",
    "CacheError",
    "CacheOutOfMemoryError",
    "CacheStats",
    "EntryInfo",
    "FlatTensors",
    "IPAdapter",
    "InvalidModelException",
    "LoadError",
    "Loaded",
    "ModelCache",
    "ModelInfo",
    "ModelLoadService",
    "ModelLocker",
    "ModelNotFoundException",
    "ModelTooLargeError",
    "SubModelType",
    "SubmodelRequiredError",
    "TierStats",
    "UnknownModelException",
    "UnsafeModelException",
    "drop_page_cache",
    "execution_device",
    "inference_dtype",
    "load_flat",
]
