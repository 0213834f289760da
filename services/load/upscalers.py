"""Image-to-image networks (upscalers, LaMa's inpainting...) through Spandrel, the maintained library that
builds each architecture from its state dict.

The file is read like every other checkpoint (a pickle is scanned before it is unpickled, with
``weights_only``), unwrapped as Spandrel detects it (:func:`services.probe.upscalers.unwrap`), and handed
to Spandrel as tensors: Spandrel never opens the file itself. Spandrel needs torchvision; where it does not
import (PyPI's torchvision beside the CPU build of torch 2.13.0), a load says so and names the fix.
"""

from __future__ import annotations

from typing import Any

import torch

from modelbus.services.load.errors import InvalidModelException
from modelbus.services.load.kit import Loaded, LoadRequest, read_single_file
from modelbus.services.probe.upscalers import unwrap

_INSTALL = "install the 'upscalers' extra (pip install 'modelbus[upscalers]'; here: make install-upscalers)"


def spandrel_module() -> Any:
    """Spandrel, imported on first use; :class:`InvalidModelException` naming the fix when it cannot be."""
    try:
        import spandrel
    except (ImportError, RuntimeError, OSError) as exc:  # torchvision: RuntimeError beside a torch not its own
        raise InvalidModelException(f"image-to-image networks load through Spandrel, which does not import "
                                    f"here ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
                                    f"{_INSTALL}") from exc
    return spandrel


def load_spandrel(req: LoadRequest) -> Loaded:
    """The record's network as a ``torch.nn.Module`` in eval mode, on the worker's device, in its precision
    where the architecture supports it (float32 otherwise)."""
    spandrel = spandrel_module()
    arch = getattr(req.record, "architecture", None) or "image-to-image network"
    state = read_single_file(req)
    tensors = unwrap(state.tensors)
    try:
        descriptor = spandrel.ModelLoader(req.device).load_from_state_dict(tensors)
    except spandrel.UnsupportedModelError as exc:
        raise InvalidModelException(f"{req.location}: not an architecture Spandrel knows "
                                    f"({len(tensors)} tensors, e.g. {', '.join(sorted(tensors)[:3])})") from exc
    except (KeyError, RuntimeError, ValueError, AssertionError, IndexError, TypeError) as exc:
        # a missing or misshapen tensor surfaces as any of these from Spandrel's builders or load_state_dict
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidModelException(f"{req.location}: not a complete {arch}: {first}") from exc
    dtype = req.dtype
    if (dtype == torch.float16 and not descriptor.supports_half) or \
            (dtype == torch.bfloat16 and not descriptor.supports_bfloat16):
        dtype = torch.float32
    model: torch.nn.Module = descriptor.model.to(dtype=dtype).eval()
    return Loaded(model)
