"""fp8 kept vs upcast: a FLUX-shaped ComfyUI fp8_scaled transformer file (per-tensor scales on the blocks'
linears, the rest bf16) loaded through the load service's FLUX loader twice in one run, once keeping its
fp8 weights (``MODELBUS_FP8_STORAGE=on``: upcast layer by layer in the forward pass) and once upcast to
the compute dtype as it is read. Prints the memory the model holds and the median forward-pass time of
each, the ratios kept / upcast, and the largest difference between their outputs.

    python3 tests/bench/bench_fp8.py [--device cuda] [--width 3072] [--layers 19,38] [--tokens 4096]
                                     [--repeat 5] [--dtype bf16] [--out FILE]

Defaults: on CUDA a FLUX.1-size transformer (width 3072, 19 double and 38 single blocks, 4,096 image
tokens); on the CPU a small one (width 1536, 1 + 2 blocks, 256 tokens) so a 2-core VM finishes.
The weights are random fp8 bit patterns of small exponents with scales near 0.02 (weights about FLUX's
size); the data are the same for both loads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import ratio_line

from modelbus.services.load.flux import load_flux_checkpoint
from modelbus.services.load.kit import LoadRequest
from modelbus.services.records.enums import SubModelType

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ST = {torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32"}


def flux_config(width: int, double: int, single: int) -> dict[str, Any]:
    return {"patch_size": 1, "in_channels": 64, "out_channels": 64, "num_layers": double,
            "num_single_layers": single, "attention_head_dim": 128, "num_attention_heads": width // 128,
            "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
            "axes_dims_rope": (16, 56, 56)}  # fmt: skip


def _random_fp8(numel: int, gen: torch.Generator) -> torch.Tensor:
    # sign, a 3-bit exponent (of e4m3's 4: |x| < 2) and the mantissa: no NaN, no infinity
    bits = torch.randint(0, 256, (numel,), dtype=torch.uint8, generator=gen) & 0b1011_1111
    return bits.view(torch.float8_e4m3fn)


def write_fp8_file(path: Path, config: dict[str, Any]) -> int:
    """A ComfyUI fp8_scaled FLUX file in diffusers' names under ``model.diffusion_model.``, written tensor
    by tensor (never all in memory). Returns the fp8 elements it holds."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        shapes = {k: tuple(v.shape) for k, v in FluxTransformer2DModel.from_config(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    plan: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    for name, shape in shapes.items():
        scaled = "blocks." in name and name.endswith(".weight") and len(shape) == 2
        plan.append((name, torch.float8_e4m3fn if scaled else torch.bfloat16, shape))
        if scaled:
            plan.append((name.removesuffix(".weight") + ".scale_weight", torch.float32, ()))
    plan.append(("scaled_fp8", torch.float8_e4m3fn, (0,)))
    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in plan:
        n = int(torch.tensor(shape).prod().item()) if shape else 1
        header["model.diffusion_model." + name] = {"dtype": _ST[dtype], "shape": list(shape),
                                                    "data_offsets": [offset, offset + n * dtype.itemsize]}
        offset += n * dtype.itemsize
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    fp8 = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _name, dtype, shape in plan:
            n = int(torch.tensor(shape).prod().item()) if shape else 1
            if dtype == torch.float8_e4m3fn:
                t = _random_fp8(n, gen)
                fp8 += n
            elif dtype == torch.float32:  # a scale: stored weights of |x| < 2 become about FLUX's 0.02
                t = torch.tensor([0.01 + 0.02 * torch.rand((), generator=gen).item()])
            else:
                t = (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16)
            f.write(t.view(torch.uint8).numpy().tobytes())
    return fp8


def held_bytes(model: torch.nn.Module) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in chain(model.parameters(), model.buffers())}
    return sum(storages.values())


def inputs(config: dict[str, Any], tokens: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    side = int(tokens ** 0.5)
    axis = torch.arange(side, dtype=torch.float32)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), axis, axis, indexing="ij"),
                          -1).reshape(-1, 3)
    made = {"hidden_states": torch.randn(1, side * side, 64, generator=g),
            "encoder_hidden_states": torch.randn(1, 512, 4096, generator=g),
            "pooled_projections": torch.randn(1, 768, generator=g), "timestep": torch.tensor([0.5]),
            "img_ids": img_ids.float(), "txt_ids": torch.zeros(512, 3), "guidance": torch.tensor([3.5])}  # fmt: skip
    return {k: v.to(device=device, dtype=dtype if k in ("hidden_states", "encoder_hidden_states",
                                                        "pooled_projections") else torch.float32)
            for k, v in made.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(path: Path, keep: bool, device: torch.device, dtype: torch.dtype, feed: dict[str, Any],
            repeat: int) -> tuple[dict[str, Any], torch.Tensor]:
    record = SimpleNamespace(key="bench", model_type="main", base_model="flux", config=None, model_format="checkpoint")
    req = LoadRequest(record, path, SubModelType.Transformer, device, dtype, fp8_storage=keep)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = load_flux_checkpoint(req).model
    _sync(device)
    load_s = time.perf_counter() - start
    held = held_bytes(model)
    times = []
    with torch.no_grad():
        out = model(**feed).sample  # warm-up (kernels, allocator)
        _sync(device)
        for _ in range(repeat):
            start = time.perf_counter()
            model(**feed)
            _sync(device)
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    kept = sum(p.numel() for p in model.parameters() if p.dtype == torch.float8_e4m3fn)
    result = {"kept": keep, "held_bytes": held, "peak_bytes": peak, "load_s": round(load_s, 3),
              "forward_s": round(statistics.median(times), 4), "fp8_params": kept}
    result_out = out.float().cpu()
    del model, out
    return result, result_out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--layers", default=None, help="double,single blocks")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    width = args.width or (3072 if cuda else 1536)
    double, single = (int(x) for x in (args.layers or ("19,38" if cuda else "1,2")).split(","))
    tokens = args.tokens or (4096 if cuda else 256)
    dtype = _DTYPES[args.dtype]
    config = flux_config(width, double, single)
    folder = Path(tempfile.mkdtemp(prefix="bench-fp8-", dir=os.environ.get("MODELBUS_BENCH_TMP")))
    path = folder / "flux-fp8-scaled.safetensors"
    try:
        start = time.perf_counter()
        fp8 = write_fp8_file(path, config)
        print(f"wrote {path.stat().st_size / 1e9:.2f} GB ({fp8 / 1e9:.2f} G fp8 weights) in "
              f"{time.perf_counter() - start:.1f} s; {device}, compute {args.dtype}, {double}+{single} blocks "
              f"of width {width}, {tokens} tokens, {torch.get_num_threads()} threads", flush=True)
        feed = inputs(config, tokens, device, dtype)
        upcast, want = measure(path, False, device, dtype, feed, args.repeat)
        kept, got = measure(path, True, device, dtype, feed, args.repeat)
    finally:
        path.unlink(missing_ok=True)
        folder.rmdir()
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    print(f"upcast: {upcast}\nkept:   {kept}\noutputs: largest difference {diff:.3g} (outputs up to {scale:.3g})")
    ratio_line("fp8 kept: memory held (MB)", kept["held_bytes"] / 1e6, upcast["held_bytes"] / 1e6, "MB",
               higher_is_better=False)
    if cuda:
        ratio_line("fp8 kept: peak in forward (MB)", kept["peak_bytes"] / 1e6, upcast["peak_bytes"] / 1e6, "MB",
                   higher_is_better=False)
    ratio_line("fp8 kept: forward pass (ms)", kept["forward_s"] * 1e3, upcast["forward_s"] * 1e3, "ms",
               higher_is_better=False)
    res = {"bench": "fp8", "device": str(device), "host": platform.node(), "width": width, "blocks": [double, single],
           "tokens": tokens, "dtype": args.dtype, "upcast": upcast, "kept": kept, "max_abs_diff": diff,
           "memory_ratio": kept["held_bytes"] / upcast["held_bytes"],
           "forward_ratio": kept["forward_s"] / upcast["forward_s"]}  # fmt: skip
    if torch.cuda.is_available():
        res["gpu"] = torch.cuda.get_device_name(device)
    print("RESULT " + json.dumps(res))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    main()
