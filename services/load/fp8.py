"""fp8 checkpoints: ComfyUI's "fp8_scaled" files keep a scale beside each fp8 weight.

A plain fp8 file (e4m3fn or e5m2) loads like any other: its tensors are upcast to the worker's
dtype as they are read. A scaled one stores ``weight / scale`` in fp8 and the scale as
``<layer>.scale_weight`` (older ComfyUI) or ``<layer>.weight_scale``, with a ``scaled_fp8`` marker
tensor; the weights are only right once multiplied back, which :func:`fold_fp8_scales` does on the
upcast tensors (and drops the scales and the marker, which no model has as parameters).
"""

from __future__ import annotations

import torch

from modelbus.services.load.errors import InvalidModelException

_SCALES = {".scale_weight": ".weight", ".weight_scale": ".weight"}
_MARKERS = ("scaled_fp8",)


def fold_fp8_scales(tensors: dict[str, torch.Tensor], where: object = "") -> dict[str, torch.Tensor]:
    """Multiply each scaled weight by its scale, in place; the scale entries are removed."""
    for marker in _MARKERS:
        for key in [k for k in tensors if k == marker or k.endswith("." + marker)]:
            del tensors[key]
    for key in [k for k in tensors if k.endswith(tuple(_SCALES))]:
        suffix = next(s for s in _SCALES if key.endswith(s))
        target = key[: -len(suffix)] + _SCALES[suffix]
        scale = tensors.pop(key)
        weight = tensors.get(target)
        if weight is None:
            continue  # the scale of a tensor the loader did not select
        if scale.numel() != 1 and scale.shape[0] != weight.shape[0]:
            raise InvalidModelException(f"{where}: fp8 scale {key} of shape {tuple(scale.shape)} fits no row of "
                                        f"{target} {tuple(weight.shape)}")  # fmt: skip
        factor = scale.to(weight.dtype)
        if factor.numel() != 1:  # per output row
            factor = factor.reshape(-1, *([1] * (weight.dim() - 1)))
        tensors[target] = weight * factor.reshape(()) if factor.numel() == 1 else weight * factor
    return tensors
