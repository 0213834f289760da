"""Record configs for events that tests append straight to the store (the store refuses any ModelAdded
or ModelUpdated whose config is not a valid record for its key, as every reader would)."""

from __future__ import annotations

from typing import Any


def record_config(key: str, name: str | None = None, **fields: Any) -> dict[str, Any]:
    """A valid LyCORIS LoRA record for ``key``; ``fields`` override or add record fields."""
    return {"key": key, "hash": key, "name": name or key, "model_type": "lora", "model_format": "lycoris",
            "base_model": "sd-1", "path": f"sd-1/lora/{key}.safetensors", **fields}
