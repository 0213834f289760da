"""Load benchmark: an SD-1.5-sized UNet (real config, random fp16 weights, diffusers folder).

Measures, in one run and against baselines of the same run:
- cold and warm loads with the fast path (services.load) vs diffusers ``from_pretrained(...).to(device)``,
  and vs a plain read of the file (cold: page cache dropped with posix_fadvise(DONTNEED));
- VRAM -> RAM offload and RAM -> VRAM reload through the cache, in GB/s, vs a plain ``model.to("cpu")``;
- the cache hit (get + lock + unlock) p50 vs the warm load.

    .venv/bin/python tests/bench/bench_load.py [--device cuda] [--full] [--repeat N] [--out FILE]

On the CPU the default UNet is a half-width SD-1.5 (about a quarter of the weights) (MODELBUS_BENCH_FULL=1 or --full for the real
size); on CUDA it is the real SD-1.5 size. Goals on CUDA: warm >= 3x faster than diffusers, cold
within 1.1x of reading the file, offload >= 40 GB/s each way, hit p50 < 1 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from modelbus.services.load.cache import Loaded, ModelCache
from modelbus.services.load.loaders import load_module_folder
from modelbus.services.load.safetensors_fast import drop_page_cache, empty_model

SD15_UNET = Path(__file__).resolve().parents[2] / "services" / "configs" / "diffusers" / "sd-1" / "unet"


def make_unet_folder(root: Path, full: bool) -> Path:
    """Write config.json + fp16 random weights without running the (slow) weight initialisation."""
    config = UNet2DConditionModel.load_config(SD15_UNET)
    if not full:
        config["block_out_channels"] = [c // 2 for c in config["block_out_channels"]]  # 160: still /32
    skeleton = empty_model(lambda: UNet2DConditionModel.from_config(config))
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=gen, dtype=torch.float32) * 0.02).half()
             for k, v in skeleton.state_dict().items()}
    folder = root / "unet"
    folder.mkdir(parents=True, exist_ok=True)
    skeleton.save_config(folder)
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeat: int, before: Callable[[], None] | None = None,
          ) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        if before is not None:
            before()
        result = None  # free the previous result before the next load
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def read_file(path: Path) -> int:
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(view):
            total += n
    return total


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full", action="store_true", default=os.environ.get("MODELBUS_BENCH_FULL") == "1")
    ap.add_argument("--repeat", type=int, default=int(os.environ.get("MODELBUS_BENCH_REPEAT", "3")))
    ap.add_argument("--out", type=Path, default=None, help="append the JSON results line to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    full = args.full or device.type == "cuda"
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    res: dict[str, Any] = {"bench": "load", "device": str(device), "date": time.strftime("%Y-%m-%d"),
                           "host": platform.node(), "torch": torch.__version__, "dtype": str(dtype)}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)
        torch.empty(1, device=device)  # CUDA context outside the timings
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        folder = make_unet_folder(Path(tmp), full)
        weights = folder / "diffusion_pytorch_model.safetensors"
        size = weights.stat().st_size
        res["file_bytes"] = size
        cold = lambda: drop_page_cache(weights)
        r = args.repeat
        res["read_cold_s"], _ = timed(lambda: read_file(weights), device, r, cold)
        res["read_warm_s"], _ = timed(lambda: read_file(weights), device, r)
        ours = lambda: load_module_folder(UNet2DConditionModel, folder, device, dtype)
        ref = lambda: UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype).to(device)
        ours(), ref()  # imports and one-time set-up (pinned staging buffers) outside the timings
        res["ours_cold_s"], _ = timed(ours, device, r, cold)
        res["diffusers_cold_s"], _ = timed(ref, device, r, cold)
        res["ours_warm_s"], loaded = timed(ours, device, r)
        res["diffusers_warm_s"], plain = timed(ref, device, r)
        same = all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(),
                                                      plain.state_dict().values(), strict=True))
        res["bit_exact"] = same
        nbytes = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
        res["model_bytes"] = nbytes
        cache = ModelCache(execution_device=device, ram_limit=64 << 30, vram_limit=64 << 30)
        cache.get_or_load("unet", lambda d: loaded)
        if device.type == "cuda":
            offload, reload = [], []
            for _ in range(max(r, 3)):
                t0 = time.perf_counter(); cache.offload("unet"); offload.append(time.perf_counter() - t0)
                t0 = time.perf_counter(); cache.lock("unet"); reload.append(time.perf_counter() - t0)
                cache.unlock("unet")
            res["offload_first_gbps"] = nbytes / offload[0] / 1e9
            res["offload_gbps"] = nbytes / statistics.median(offload[1:]) / 1e9
            res["reload_gbps"] = nbytes / statistics.median(reload) / 1e9
            t, _ = timed(lambda: plain.to("cpu"), device, 1)
            res["plain_to_cpu_gbps"] = nbytes / t / 1e9
        hits = []
        for _ in range(2000):
            t0 = time.perf_counter()
            _entry, _hit = cache.get_or_load("unet", lambda d: Loaded(None))
            with cache.locker("unet"):
                pass
            hits.append(time.perf_counter() - t0)
        res["hit_p50_ms"] = statistics.median(hits) * 1e3
    report(res)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(res) + "\n")
    return res


def report(res: dict[str, Any]) -> None:
    gb = res["file_bytes"] / 1e9
    print(f"load bench on {res['device']} ({res.get('gpu', 'cpu')}), file {gb:.2f} GB, dtype {res['dtype']}")
    print(f"  read file      cold {res['read_cold_s']:.3f} s   warm {res['read_warm_s']:.3f} s")
    print(f"  diffusers      cold {res['diffusers_cold_s']:.3f} s   warm {res['diffusers_warm_s']:.3f} s")
    print(f"  services.load  cold {res['ours_cold_s']:.3f} s   warm {res['ours_warm_s']:.3f} s"
          f"   bit-exact vs diffusers: {res['bit_exact']}")
    print(f"  warm speed-up vs diffusers: {res['diffusers_warm_s'] / res['ours_warm_s']:.2f}x  (goal >= 3x on CUDA)")
    print(f"  cold speed-up vs diffusers: {res['diffusers_cold_s'] / res['ours_cold_s']:.2f}x")
    print(f"  cold / file read: {res['ours_cold_s'] / res['read_cold_s']:.2f}x  (goal <= 1.1x on CUDA)")
    if "offload_gbps" in res:
        print(f"  offload VRAM->RAM {res['offload_gbps']:.1f} GB/s (first, with pinning: "
              f"{res['offload_first_gbps']:.1f})  reload RAM->VRAM {res['reload_gbps']:.1f} GB/s  "
              f"vs plain .to('cpu') {res['plain_to_cpu_gbps']:.1f} GB/s "
              f"({res['offload_gbps'] / res['plain_to_cpu_gbps']:.1f}x; goal >= 40 GB/s each way)")
    print(f"  cache hit p50 {res['hit_p50_ms']:.4f} ms ({res['ours_warm_s'] * 1e3 / res['hit_p50_ms']:.0f}x faster "
          f"than a warm load; goal < 1 ms)")
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
