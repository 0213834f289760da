"""Image-to-image networks that Spandrel loads (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, LaMa...), told
from a file's tensor names and shapes alone, without Spandrel.

The rule this module keeps: the architecture is decided exactly as Spandrel decides it, by Spandrel's
own key conditions tried in Spandrel's own order (:mod:`services.probe.spandrel_archs`, generated from
its registry; a test in the upscaler venv fails when the two differ), on the state dict as Spandrel
canonicalises it (BasicSR's ``params_ema``/``params`` wrappers, ``module.``/``netG.`` prefixes). The
scale is read from the shapes with Spandrel's rules for the architectures people run most; for the
rest it stays unknown (``None``) rather than guessed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import TypeVar

from modelbus.services.probe.spandrel_archs import SPANDREL_ARCHS, Condition

Shapes = Mapping[str, tuple[int, ...]]
T = TypeVar("T")

# the wrappers Spandrel unwraps (canonicalize_state_dict), in its order, then the prefixes it strips
_WRAPPERS = ("model_state_dict.", "state_dict.", "params_ema.", "params-ema.", "params.", "model.", "net.")
_COMMON_PREFIXES = ("module.", "netG.")


def canonical_views(names: list[str]) -> list[dict[str, str]]:
    """The views of a flattened state dict Spandrel could detect on, each canonical name -> the file's
    name: the tensors under the first wrapper it unwraps (the wrapper stripped), then all of them;
    in each, a prefix that every name carries (``module.``, ``netG.``) removed."""
    views: list[dict[str, str]] = []
    for wrapper in _WRAPPERS:
        inner = {n[len(wrapper):]: n for n in names if n.startswith(wrapper)}
        if inner:
            views.append(inner)
            break
    views.append({n: n for n in names})
    out = []
    for view in views:
        for prefix in _COMMON_PREFIXES:
            if view and all(n.startswith(prefix) for n in view):
                view = {n[len(prefix):]: original for n, original in view.items()}
        out.append(view)
    return out


def _first_match(names: list[str]) -> tuple[dict[str, str], tuple[str, str]] | None:
    for view in canonical_views(names):
        found = detect(set(view))
        if found is not None:
            return view, found
    return None


def unwrap(tensors: Mapping[str, T]) -> dict[str, T]:
    """The state dict Spandrel detects and loads: the first view of :func:`canonical_views` that some
    architecture matches (the names as they are when none does)."""
    match = _first_match(list(tensors))
    if match is None:
        return dict(tensors)
    return {name: tensors[original] for name, original in match[0].items()}


def _holds(condition: Condition, keys: set[str]) -> bool:
    kind, *items = condition
    results = (item in keys if isinstance(item, str) else _holds(item, keys) for item in items)
    return all(results) if kind == "all" else any(results)


def detect(keys: set[str]) -> tuple[str, str] | None:
    """Spandrel's architecture (id, name) for these tensor names, the first in its order; None if none."""
    for arch_id, name, condition in SPANDREL_ARCHS:
        if condition is not None and _holds(condition, keys):
            return arch_id, name
    return None


# ---- scale, by Spandrel's rules, for the architectures people run most ----
def _seq_len(shapes: Shapes, prefix: str) -> int:
    found = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _pixelshuffle(channels: int, in_channels: int) -> int | None:
    """scale such that scale**2 * out_channels == channels (Spandrel's get_scale_and_output_channels)."""
    for out in (in_channels, 3, 4, 1):
        if channels % out == 0 and math.isqrt(channels // out) ** 2 == channels // out:
            return math.isqrt(channels // out)
    return None


def _esrgan(shapes: Shapes) -> int | None:
    if "model.0.weight" in shapes:  # the old layout: [conv, trunk, (upsample, conv, act) * log2(scale), conv, act, conv]
        seq = _seq_len(shapes, "model")
        return int(2 ** ((seq - 5) // 3))
    ups = sum(1 for k in shapes if re.fullmatch(r"(upconv|conv_up)\d\.weight", k))
    first, last = shapes.get("conv_first.weight"), shapes.get("conv_last.weight")
    if first is None or last is None:
        return None
    in_nc, out_nc = first[1], last[0]
    shuffle = math.isqrt(in_nc // out_nc) if in_nc in (out_nc * 4, out_nc * 16) else 1  # Real-ESRGAN x2/x1
    return int(2**ups // shuffle)


def _compact(shapes: Shapes) -> int | None:
    last = _seq_len(shapes, "body") - 1
    bias, first = shapes.get(f"body.{last}.bias"), shapes.get("body.0.weight")
    return _pixelshuffle(bias[0], first[1]) if bias and first else None


def _transformer_sr(shapes: Shapes) -> int | None:
    """SwinIR, HAT, DAT, ATD, DRCT, RGT: their upsampler is told by its keys."""
    if "conv_before_upsample.0.weight" in shapes and "conv_up1.weight" in shapes:  # nearest+conv
        return int(2 ** sum(1 for k in shapes if re.fullmatch(r"conv_up\d\.weight", k)))
    if "conv_before_upsample.0.weight" in shapes and "upsample.0.weight" in shapes:  # pixelshuffle
        scale = 1
        for i in range(0, 10, 2):
            shape = shapes.get(f"upsample.{i}.weight")
            if shape is None:
                break
            scale *= math.isqrt(shape[0] // shape[1])
        return scale
    if "upsample.0.weight" in shapes:  # pixelshuffledirect
        first = shapes.get("conv_first.weight") or shapes.get("conv_first.1.weight")
        return _pixelshuffle(shapes["upsample.0.weight"][0], first[1]) if first else None
    return 1


def _span(shapes: Shapes) -> int | None:
    up, first = shapes.get("upsampler.0.weight"), shapes.get("conv_1.sk.weight")
    return _pixelshuffle(up[0], first[1]) if up and first else None


def _plksr(shapes: Shapes) -> int | None:
    last = shapes.get(f"feats.{_seq_len(shapes, 'feats') - 1}.weight")
    return math.isqrt(last[0] // 3) if last else None


_SCALES: dict[str, Callable[[Shapes], int | None]] = {
    "ESRGAN": _esrgan, "Compact": _compact, "SwinIR": _transformer_sr, "HAT": _transformer_sr,
    "DAT": _transformer_sr, "ATD": _transformer_sr, "DRCT": _transformer_sr, "RGT": _transformer_sr,
    "SPAN": _span, "PLKSR": _plksr, "LaMa": lambda _: 1,
}  # fmt: skip

#: what an architecture is for, where it is not upscaling
PURPOSES = {"LaMa": "inpainting"}


def identify(shapes: Shapes) -> tuple[str, str, int | None] | None:
    """(architecture id, name, scale or None) of a state dict's shapes; None when no architecture matches."""
    match = _first_match(list(shapes))
    if match is None:
        return None
    view, (arch_id, name) = match
    rule = _SCALES.get(arch_id)
    return arch_id, name, rule({n: shapes[o] for n, o in view.items()}) if rule else None
