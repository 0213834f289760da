"""Tiny image-to-image networks of Spandrel's own architecture classes, random weights, saved in the
layouts people download: ESRGAN's original keys, Real-ESRGAN's BasicSR keys (``body.``, under
``params_ema``, x4plus and the pixel-unshuffled x2plus), the compact SRVGGNet, SwinIR, HAT, DAT and LaMa."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file


def _esrgan(scale: int = 4, in_nc: int = 3, shuffle: int | None = None) -> torch.nn.Module:
    from spandrel.architectures.ESRGAN import ESRGAN
    return ESRGAN(in_nc=in_nc, out_nc=3, num_filters=8, num_blocks=2, scale=scale, shuffle_factor=shuffle)


def _compact() -> torch.nn.Module:
    from spandrel.architectures.Compact import Compact
    return Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=4)


def _swinir() -> torch.nn.Module:
    from spandrel.architectures.SwinIR import SwinIR
    return SwinIR(upscale=2, img_size=16, window_size=4, embed_dim=12, depths=[1], num_heads=[2], mlp_ratio=2,
                  upsampler="pixelshuffle")


def _hat() -> torch.nn.Module:
    from spandrel.architectures.HAT import HAT
    return HAT(upscale=2, img_size=16, window_size=4, embed_dim=12, depths=[1], num_heads=[2], mlp_ratio=2,
               upsampler="pixelshuffle", num_feat=8, squeeze_factor=4, compress_ratio=3)


def _dat() -> torch.nn.Module:
    from spandrel.architectures.DAT import DAT
    return DAT(upscale=4, img_size=16, embed_dim=32, depth=[1], num_heads=[2], split_size=[2, 4],
               expansion_factor=2, upsampler="pixelshuffle")


def _more(kind: str) -> torch.nn.Module:
    """Further architectures, each in an upsampler its scale rule must read."""
    from spandrel.architectures.ATD import ATD
    from spandrel.architectures.DRCT import DRCT
    from spandrel.architectures.PLKSR import PLKSR
    from spandrel.architectures.RGT import RGT
    from spandrel.architectures.SPAN import SPAN
    from spandrel.architectures.SwinIR import SwinIR

    swin = {"img_size": 16, "window_size": 4, "embed_dim": 12, "depths": [1], "num_heads": [2], "mlp_ratio": 2}
    atd = {"img_size": 16, "depths": [2], "num_heads": [2], "window_size": 4, "category_size": 16, "num_tokens": 8}
    builders: dict[str, Callable[[], torch.nn.Module]] = {
        "span_x2": lambda: SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2),
        "plksr_x3": lambda: PLKSR(dim=16, n_blocks=2, upscaling_factor=3, kernel_size=7),
        "atd_x4": lambda: ATD(embed_dim=12, upscale=4, upsampler="pixelshuffle", **atd),
        "atd_light_x2": lambda: ATD(embed_dim=48, upscale=2, upsampler="pixelshuffledirect", **atd),
        "drct_x2": lambda: DRCT(img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, upscale=2,
                                upsampler="pixelshuffle", gc=8),
        "rgt_x3": lambda: RGT(img_size=16, embed_dim=12, depth=[1], num_heads=[2], split_size=[4, 4], upscale=3),
        "swinir_nearest_x4": lambda: SwinIR(upscale=4, upsampler="nearest+conv", **swin),
        "swinir_direct_x3": lambda: SwinIR(upscale=3, upsampler="pixelshuffledirect", **swin),
        "swinir_x1": lambda: SwinIR(upscale=1, upsampler="", **swin),
    }
    return builders[kind]()


def _lama() -> torch.nn.Module:
    from spandrel.architectures.LaMa import LaMa
    return LaMa(in_nc=4, out_nc=3)  # LaMa's one size (51M parameters): the test saves it in fp16


def basicsr_keys(old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ESRGAN's original names -> the BasicSR RRDBNet names Real-ESRGAN ships (the inverse of Spandrel's
    conversion): conv_first, body.N.rdbM.convK, conv_body, conv_up1/2, conv_hr, conv_last."""
    blocks = max(int(m.group(1)) for k in old if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k))) + 1
    top = sorted({int(m.group(1)) for k in old if (m := re.fullmatch(r"model\.(\d+)\.weight", k))} - {0})
    *ups, hr, last = top  # [conv_up1, conv_up2...], conv_hr, conv_last
    fixed = {"model.0": "conv_first", f"model.1.sub.{blocks}": "conv_body", f"model.{hr}": "conv_hr",
             f"model.{last}": "conv_last", **{f"model.{n}": f"conv_up{i + 1}" for i, n in enumerate(ups)}}
    new = {}
    for key, value in old.items():
        stem, kind = key.rsplit(".", 1)
        if m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0", stem):
            new[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{kind}"] = value
        else:
            new[f"{fixed[stem]}.{kind}"] = value
    return new


def _random(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


Writer = Callable[[Path], torch.nn.Module]


def _save(path: Path, state: dict[str, torch.Tensor]) -> None:
    state = {k: v.contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)


def write(kind: str, path: Path, seed: int = 0) -> torch.nn.Module:
    """Write a ``kind`` network (a key of :data:`KINDS`) to ``path``; returns the module it holds."""
    build, layout = KINDS[kind]
    model = _random(build(), seed)
    state = dict(model.state_dict())
    if kind == "lama":
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict({k: v.float() for k, v in state.items()})  # the reference holds what the file does
    if layout == "basicsr":  # BasicSR's .pth keep the EMA weights under params_ema; its safetensors don't
        renamed = basicsr_keys(state)
        if path.suffix == ".safetensors":
            _save(path, renamed)
        else:
            torch.save({"params_ema": renamed}, path)
    else:
        _save(path, state)
    return model


#: kind -> (builder, layout); the expected (Spandrel id, scale) is Spandrel's own reading of the file
KINDS: dict[str, tuple[Callable[[], torch.nn.Module], str]] = {
    "esrgan_x4": (lambda: _esrgan(scale=4), "plain"),
    "esrgan_x2": (lambda: _esrgan(scale=2), "plain"),
    "realesrgan_x4plus": (lambda: _esrgan(scale=4), "basicsr"),
    "realesrgan_x2plus": (lambda: _esrgan(in_nc=12, scale=4, shuffle=2), "basicsr"),
    "compact_x4": (_compact, "plain"),
    "swinir_x2": (_swinir, "plain"),
    "hat_x2": (_hat, "plain"),
    "dat_x4": (_dat, "plain"),
    "lama": (_lama, "plain"),
}
#: identified only (as .safetensors): their scale rules checked against Spandrel's
MORE_KINDS = ("span_x2", "plksr_x3", "atd_x4", "atd_light_x2", "drct_x2", "rgt_x3", "swinir_nearest_x4",
              "swinir_direct_x3", "swinir_x1")
KINDS.update({kind: ((lambda k=kind: _more(k)), "plain") for kind in MORE_KINDS})
