"""Partial VRAM loading benchmark: a FLUX-size transformer (random bf16 weights, fixed input) run
with a VRAM limit below its size, through the cache (``with cache.locker(key) as model``).

Forward-pass time with 25% and 50% of the weights resident vs fully resident, vs diffusers' own
block-level group offloading (``use_stream=True``), in one run. Goals: >= 1.0x diffusers' group
offloading at every limit; at 50% resident, within 1.5x of fully resident.

    python3 tests/bench/bench_partial.py [--layers 19,38] [--tokens 4096] [--repeat 3] [--out FILE]

Needs CUDA (on the CPU it says so and exits: the streaming's correctness is tested in
tests/load/test_streaming.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from bench_load import emit

from modelbus.services.load.cache import Loaded, ModelCache
from modelbus.services.load.pinned import PinnedPool
from modelbus.services.load.safetensors_fast import assign_weights, empty_model
from modelbus.services.load.streaming import SLOTS, find_blocks
from modelbus.services.load.tensors import move_object, tensor_slots

FLUX = {"patch_size": 1, "in_channels": 64, "attention_head_dim": 128, "num_attention_heads": 24,
        "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56)}


def build(layers: tuple[int, int], device: torch.device) -> tuple[torch.nn.Module, torch.Tensor, float]:
    """The model with its weights in one pinned host buffer (a pool piece, as the cache keeps it)."""
    from diffusers import FluxTransformer2DModel
    model = empty_model(lambda: FluxTransformer2DModel(num_layers=layers[0], num_single_layers=layers[1], **FLUX))
    shapes = [(k, v.shape) for k, v in model.state_dict().items()]
    total = sum(int(torch.Size(s).numel()) * 2 + 64 for _, s in shapes)
    t0 = time.perf_counter()
    pool = PinnedPool(total + (64 << 20), device=device, background=False)
    pin_s = time.perf_counter() - t0
    host = pool.take(total)
    if host is None:
        host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    gen = torch.Generator(device=device).manual_seed(0)
    tensors, off = {}, 0
    for name, shape in shapes:
        n = int(torch.Size(shape).numel())
        t = host[off:off + 2 * n].view(torch.bfloat16).view(shape)
        src = torch.randn(n, generator=gen, device=device) * (0.02 if len(shape) > 1 else 0.1)
        if name.endswith(("norm.weight", "norm_q.weight", "norm_k.weight", "norm_added_q.weight",
                          "norm_added_k.weight")):
            src = torch.ones(n, device=device)
        t.copy_(src.to(torch.bfloat16).view(shape))
        tensors[name] = t
        off += (2 * n + 63) // 64 * 64
    torch.cuda.synchronize(device)
    assign_weights(model, tensors, torch.device("cpu"), "bench FLUX")
    return model, host, pin_s


def inputs(tokens: int, text: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(1)
    side = int(tokens ** 0.5)
    ids = torch.zeros(side, side, 3, device=device)
    ids[..., 1] = torch.arange(side, device=device)[:, None]
    ids[..., 2] = torch.arange(side, device=device)[None, :]
    bf = torch.bfloat16
    return {"hidden_states": torch.randn(1, tokens, 64, generator=g, device=device).to(bf),
            "encoder_hidden_states": torch.randn(1, text, 4096, generator=g, device=device).to(bf),
            "pooled_projections": torch.randn(1, 768, generator=g, device=device).to(bf),
            "timestep": torch.tensor([0.5], device=device).to(bf),
            "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(text, 3, device=device),
            "guidance": torch.tensor([3.5], device=device).to(bf)}


def forward_times(model: torch.nn.Module, x: dict[str, torch.Tensor], repeat: int, device: torch.device,
                  ) -> tuple[float, torch.Tensor]:
    times, out = [], None
    with torch.inference_mode():
        model(**x, return_dict=False)  # warm-up (kernels, the prefetch ring's first lap)
        for _ in range(repeat):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = model(**x, return_dict=False)[0]
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    assert out is not None
    return statistics.median(times), out.float()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--layers", default="19,38", help="double,single blocks (FLUX.1: 19,38)")
    ap.add_argument("--tokens", type=int, default=4096, help="image tokens (4096: 1024x1024)")
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--shares", default="0.5,0.25")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_partial: needs CUDA (correctness on the CPU: tests/load/test_streaming.py); skipped")
        return {}
    device = torch.device("cuda", 0)
    layers = tuple(int(x) for x in args.layers.split(","))
    res: dict[str, Any] = {"bench": "partial", "date": time.strftime("%Y-%m-%d"), "host": platform.node(),
                           "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
                           "cores": os.cpu_count(), "tokens": args.tokens, "text": args.text, "layers": layers}
    model, host, pin_s = build(layers, device)  # type: ignore[arg-type]
    size = sum(s.nbytes for s in tensor_slots(model))
    res["model_bytes"] = size
    res["pool_pin_s"] = pin_s
    print(f"FLUX-size transformer {size / 1e9:.1f} GB, pinned host pool in {pin_s:.1f} s", flush=True)
    x = inputs(args.tokens, args.text, device)

    # fully resident
    buffer = move_object(model, host, device)
    res["full_s"], ref = forward_times(model, x, args.repeat, device)
    host = move_object(model, buffer, torch.device("cpu"), reuse=host)
    del buffer
    torch.cuda.empty_cache()
    print(f"  fully resident: {res['full_s']:.3f} s per forward", flush=True)

    blocks = find_blocks(model)
    block_bytes = sum(s.nbytes for b in blocks for s in tensor_slots(b))
    rest = size - block_bytes
    largest = max(sum((s.nbytes + 63) // 64 * 64 for s in tensor_slots(b)) for b in blocks)
    for share in (float(s) for s in args.shares.split(",")):
        limit = int(rest + SLOTS * largest + share * size)
        cache = ModelCache(execution_device=device, ram_limit=2 * size, vram_limit=limit,
                           host_pool=PinnedPool(0))
        cache.get_or_load("flux", lambda d: Loaded(model, host), size_hint=size)
        info = cache.contents()[0]
        with cache.locker("flux") as m:
            t, out = forward_times(m, x, args.repeat, device)
        key = f"partial_{int(share * 100)}"
        res[key] = {"s": t, "vram_limit": limit, "resident_bytes": info.resident_bytes, "tier": info.tier,
                    "resident_share": info.resident_bytes / size, "over_full": t / res["full_s"],
                    "max_abs_diff": float((out - ref).abs().max()), "peak_vram": torch.cuda.max_memory_allocated(device)}
        print(f"  {key}: {t:.3f} s per forward ({t / res['full_s']:.2f}x fully resident), "
              f"{info.resident_bytes / size:.0%} resident, max |diff| {res[key]['max_abs_diff']:.3g}", flush=True)
        cache.clear()
        del cache
        torch.cuda.empty_cache()

    if not args.no_diffusers:
        try:
            model.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                       offload_type="block_level", num_blocks_per_group=1, use_stream=True)
            t, out = forward_times(model, x, args.repeat, device)
            res["diffusers_group_offload"] = {"s": t, "max_abs_diff": float((out - ref).abs().max())}
            for share in args.shares.split(","):
                key = f"partial_{int(float(share) * 100)}"
                res[key]["diffusers_over_ours"] = t / res[key]["s"]
            print(f"  diffusers group offloading (block_level, 1 block per group, use_stream): {t:.3f} s "
                  f"per forward", flush=True)
        except Exception as exc:  # noqa: BLE001 - a baseline that fails is reported, not fatal
            res["diffusers_group_offload"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  diffusers group offloading failed: {exc}")
    emit(res, args.out)
    return res


if __name__ == "__main__":
    main()
