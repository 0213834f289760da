"""bitsandbytes NF4 (or LLM.int8) vs bf16: a FLUX-shaped transformer in BFL's layout (lllyasviel's
``flux1-dev-bnb-nf4`` keys: every Linear weight quantized by bitsandbytes, nested block scales, the rest
bf16) and the same weights as a bf16 file, both loaded through the load service's loaders in one run.
Prints the memory each model holds on the device, its load time and median forward time, the ratios
quantized / bf16, and how far the quantized model's output is from the bf16 one's.

    python3 tests/bench/bench_bnb.py [--device cuda] [--kind nf4|int8] [--width 3072] [--layers 5,10]
                                     [--tokens 1024] [--repeat 3] [--out FILE]

Defaults: on CUDA FLUX.1's width with 5 double and 10 single blocks (a quarter of FLUX.1-dev: a 6 GB bf16
file and a 1.7 GB NF4 one; ``--layers 19,38`` is the full 24 GB model), 1,024 image tokens; on the CPU a
small one (width 256, 1 + 1 blocks) so a 2-core VM finishes. Weights are random (std 0.02), made and
quantized on the device; the files go under ``MODELBUS_BENCH_TMP`` and are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_fp8 import flux_config, inputs
from common import emit, median_forward, ratio_line, sync

from modelbus.services.load.bnb import load_bnb_main
from modelbus.services.load.flux import load_flux_checkpoint
from modelbus.services.load.kit import LoadRequest
from modelbus.services.records.enums import SubModelType

PREFIX = "model.diffusion_model."


def bfl_shapes(width: int, double: int, single: int) -> dict[str, tuple[int, ...]]:
    """BFL's FLUX.1-dev keys and shapes (128-wide heads, a 4x MLP; linear biases beside every weight)."""
    w, h = width, 128
    linears: dict[str, tuple[int, int]] = {
        "img_in": (w, 64), "txt_in": (w, 4096), "time_in.in_layer": (w, 256), "time_in.out_layer": (w, w),
        "vector_in.in_layer": (w, 768), "vector_in.out_layer": (w, w), "guidance_in.in_layer": (w, 256),
        "guidance_in.out_layer": (w, w), "final_layer.linear": (64, w), "final_layer.adaLN_modulation.1": (2 * w, w)}
    norms: dict[str, tuple[int, ...]] = {}
    for i in range(double):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}_"
            linears |= {b + "mod.lin": (6 * w, w), b + "attn.qkv": (3 * w, w), b + "attn.proj": (w, w),
                        b + "mlp.0": (4 * w, w), b + "mlp.2": (w, 4 * w)}
            norms |= {b + "attn.norm.query_norm.scale": (h,), b + "attn.norm.key_norm.scale": (h,)}
    for i in range(single):
        b = f"single_blocks.{i}."
        linears |= {b + "linear1": (7 * w, w), b + "linear2": (w, 5 * w), b + "modulation.lin": (3 * w, w)}
        norms |= {b + "norm.query_norm.scale": (h,), b + "norm.key_norm.scale": (h,)}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in linears.items():
        shapes |= {name + ".weight": shape, name + ".bias": (shape[0],)}
    return shapes | norms


def _quantized(key: str, w: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    import bitsandbytes.functional as F

    if kind == "int8":
        cb, scb, _ = F.int8_vectorwise_quant(w.half())
        stem = key.removesuffix(".weight")
        return {key: cb.cpu(), stem + ".SCB": scb.float().cpu(), stem + ".weight_format": torch.zeros((), dtype=torch.uint8)}
    data, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=kind)
    return {key: data.cpu()} | {f"{key}.{k}": v.cpu() for k, v in state.as_dict(packed=True).items()}


def write_files(folder: Path, shapes: dict[str, tuple[int, ...]], kind: str, device: torch.device
                ) -> tuple[Path, Path]:
    """The bf16 file written tensor by tensor, and the same weights quantized (its Linear weights) by
    bitsandbytes on ``device``."""
    from safetensors.torch import save_file

    dense, quant = folder / "flux-bf16.safetensors", folder / f"flux-bnb-{kind}.safetensors"
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes.items():
        n = int(torch.tensor(shape).prod().item())
        header[PREFIX + name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + 2 * n]}
        offset += 2 * n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator(device=device).manual_seed(0)
    stored: dict[str, torch.Tensor] = {}
    with open(dense, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            w = (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)
            if name.endswith(".scale"):
                w = w.abs() + 1  # RMSNorm scales near one
            f.write(w.cpu().view(torch.uint8).numpy().tobytes())
            if len(shape) == 2:
                stored |= _quantized(PREFIX + name, w, kind)
            else:
                stored[PREFIX + name] = w.cpu()
    save_file(stored, str(quant))
    return dense, quant


def measure(path: Path, quantized: str | None, device: torch.device, feed: dict[str, Any], repeat: int
            ) -> tuple[dict[str, Any], torch.Tensor]:
    fmt = {None: "checkpoint", "int8": "bnb_quantized_int8b"}.get(quantized, "bnb_quantized_nf4b")
    record = SimpleNamespace(key="bench", model_type="main", base_model="flux", config=None, model_format=fmt,
                             quantization=quantized)
    req = LoadRequest(record, path, SubModelType.Transformer, device, torch.bfloat16)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    start = time.perf_counter()
    model = (load_bnb_main if quantized else load_flux_checkpoint)(req).model
    sync(device)
    load_s = time.perf_counter() - start
    held = (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else \
        sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    load_peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else 0
    with torch.no_grad():
        out = model(**feed).sample.float().cpu()
    forward_s = median_forward(model, feed, device, repeat)
    result = {"format": quantized or "bf16", "held_bytes": held, "load_peak_bytes": load_peak,
              "load_s": round(load_s, 3), "forward_s": round(forward_s, 4),
              "file_bytes": path.stat().st_size}  # fmt: skip
    del model
    return result, out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kind", default="nf4", choices=("nf4", "fp4", "int8"))
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--layers", default=None, help="double,single blocks")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import bitsandbytes

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    width = args.width or (3072 if cuda else 256)
    double, single = (int(x) for x in (args.layers or ("5,10" if cuda else "1,1")).split(","))
    tokens = args.tokens or (1024 if cuda else 64)
    config = flux_config(width, double, single)
    print(f"bitsandbytes {bitsandbytes.__version__} ({', '.join(sorted(getattr(bitsandbytes, 'supported_torch_devices', ['?'])))}); "
          f"{device}, {args.kind} vs bf16, {double}+{single} blocks of width {width}, {tokens} tokens", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-bnb-", dir=os.environ.get("MODELBUS_BENCH_TMP")))
    try:
        start = time.perf_counter()
        dense, quant = write_files(folder, bfl_shapes(width, double, single), args.kind, device)
        print(f"wrote {dense.stat().st_size / 1e9:.2f} GB bf16 and {quant.stat().st_size / 1e9:.2f} GB {args.kind} "
              f"in {time.perf_counter() - start:.1f} s", flush=True)
        feed = inputs(config, tokens, device, torch.bfloat16)
        bf16, want = measure(dense, None, device, feed, args.repeat)
        print(f"bf16: {bf16}", flush=True)
        if cuda:
            torch.cuda.empty_cache()
        quantized, got = measure(quant, args.kind, device, feed, args.repeat)
        print(f"{args.kind}: {quantized}", flush=True)
    finally:
        for p in folder.glob("*"):
            p.unlink()
        folder.rmdir()
    error = ((got - want).abs().mean() / want.abs().mean()).item()
    print(f"outputs: mean |{args.kind} - bf16| / mean |bf16| = {error:.3g}")
    ratio_line(f"bnb {args.kind}: memory held on {device.type} (MB)", quantized["held_bytes"] / 1e6,
               bf16["held_bytes"] / 1e6, "MB", higher_is_better=False)
    ratio_line(f"bnb {args.kind}: load (ms)", quantized["load_s"] * 1e3, bf16["load_s"] * 1e3, "ms",
               higher_is_better=False)
    ratio_line(f"bnb {args.kind}: forward pass (ms)", quantized["forward_s"] * 1e3, bf16["forward_s"] * 1e3, "ms",
               higher_is_better=False)
    res = {"bench": "bnb", "kind": args.kind, "device": str(device), "host": platform.node(), "width": width,
           "blocks": [double, single], "tokens": tokens, "bitsandbytes": bitsandbytes.__version__, "bf16": bf16,
           "quantized": quantized, "relative_error": error,
           "memory_ratio": quantized["held_bytes"] / max(1, bf16["held_bytes"]),
           "load_ratio": quantized["load_s"] / bf16["load_s"]}  # fmt: skip
    if cuda:
        res["gpu"] = torch.cuda.get_device_name(device)
    emit(res, args.out)
    return res


if __name__ == "__main__":
    main()
