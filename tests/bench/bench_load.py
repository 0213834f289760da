"""Load benchmark: UNets of SD-1.5 and SDXL size (real configs, random fp16 weights, diffusers folders),
and on CUDA a FLUX-size flat file, each method against the others on the same file in the same run.

Methods (rounds alternate their order; cold = page cache dropped with posix_fadvise(DONTNEED)):
- ``read_1t`` / ``read_8t``: plain reads of the file (one thread, 64 MiB buffered; eight threads preadv):
  the floor the cold loads are held to;
- ``flat``: ``services.load`` tensors into one device buffer (``load_flat``);
- ``module``: ``load_module_folder`` (the meta-model skeleton, cloned, plus the flat load);
- ``diffusers``: ``from_pretrained(...).to(device)``;
- ``st_load_file``: safetensors' ``load_file(device=...)``;
- ``fastsafetensors`` (nogds) and ``runai`` (Run:ai model streamer): when installed (the bench says when not).

Then, through the cache (CUDA): the first VRAM -> RAM offload of a model (into the pinned pool,
made when the cache started), later offloads and reloads (GB/s each way, synchronised), vs a plain
``.to("cpu")``; and the cache hit (get + lock + unlock) p50.

    .venv/bin/python tests/bench/bench_load.py [--device cuda] [--sizes sd15,sdxl] [--flux] [--repeat N] [--out FILE]

On the CPU the default is a half-width SD-1.5 UNet (``--sizes sd15`` for the real size), loaded as fp32.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from modelbus.services.load import safetensors_fast as sf
from modelbus.services.load.cache import Loaded, ModelCache
from modelbus.services.load.loaders import load_module_folder
from modelbus.services.load.safetensors_fast import drop_page_cache, empty_model, load_flat

CONFIGS = Path(__file__).resolve().parents[2] / "services" / "configs" / "diffusers"
UNETS = {"sd15": CONFIGS / "sd-1" / "unet", "sdxl": CONFIGS / "sdxl" / "unet", "half": CONFIGS / "sd-1" / "unet"}
FLUX_CONFIG = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
               "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
               "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}


def make_unet_folder(root: Path, size: str) -> Path:
    """Write config.json + fp16 random weights without running the (slow) weight initialisation."""
    config = UNet2DConditionModel.load_config(UNETS[size])
    if size == "half":
        config["block_out_channels"] = [c // 2 for c in config["block_out_channels"]]  # 160: still /32
    skeleton = empty_model(lambda: UNet2DConditionModel.from_config(config))
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=gen, dtype=torch.float32) * 0.02).half()
             for k, v in skeleton.state_dict().items()}
    folder = root / size / "unet"
    folder.mkdir(parents=True, exist_ok=True)
    skeleton.save_config(folder)
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def make_flux_file(path: Path, device: torch.device) -> Path:
    """A FLUX.1-size transformer file (bf16, random bytes), written without building the model."""
    from diffusers import FluxTransformer2DModel
    skeleton = empty_model(lambda: FluxTransformer2DModel(**FLUX_CONFIG))
    header: dict[str, Any] = {}
    offset = 0
    for name, t in skeleton.state_dict().items():
        n = t.numel() * 2
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    chunk = 256 << 20
    gen = torch.Generator(device=device).manual_seed(0)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        left = offset
        while left:
            n = min(chunk, left)
            # small random bf16 values (no NaN patterns): 0.02 * normal
            block = (torch.randn(n // 2, generator=gen, device=device) * 0.02).to(torch.bfloat16)
            fh.write(block.view(torch.uint8).cpu().numpy().tobytes())
            left -= n
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_1t(path: Path) -> int:
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(view):
            total += n
    return total


def read_8t(path: Path) -> int:
    size = path.stat().st_size
    chunk = 64 << 20
    fd = os.open(path, os.O_RDONLY)
    try:
        def part(i: int) -> int:
            buf = bytearray(chunk)
            done = 0
            for off in range(i * chunk, size, 8 * chunk):
                done += os.preadv(fd, [buf], off)
            return done
        with ThreadPoolExecutor(8) as pool:
            return sum(pool.map(part, range(8)))
    finally:
        os.close(fd)


def read_direct(path: Path) -> int:
    """Eight threads of O_DIRECT reads (the page cache bypassed), 64 MiB each, into aligned buffers."""
    import mmap
    size = path.stat().st_size
    chunk = 64 << 20
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        def part(i: int) -> int:
            buf = mmap.mmap(-1, chunk)  # page-aligned
            done = 0
            for off in range(i * chunk, size, 8 * chunk):
                done += os.preadv(fd, [buf], off)
            return done
        with ThreadPoolExecutor(8) as pool:
            return sum(pool.map(part, range(8)))
    finally:
        os.close(fd)


def _flat_direct(path: Path, device: torch.device) -> Any:
    saved, sf.DIRECT = sf.DIRECT, True
    try:
        return load_flat(path, device)
    finally:
        sf.DIRECT = saved


def _fastsafetensors(path: Path, device: torch.device) -> Any:
    from fastsafetensors import SafeTensorsFileLoader
    loader = SafeTensorsFileLoader(None, str(device), nogds=True)
    try:
        loader.add_filenames({0: [str(path)]})
        fb = loader.copy_files_to_device()
        tensors = {k: fb.get_tensor(k) for k in loader.get_keys()}
        sync(device)
        return tensors
    finally:
        loader.close()


def _runai(path: Path, device: torch.device) -> Any:
    from runai_model_streamer import SafetensorsStreamer
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(str(path), device=str(device) if device.type == "cuda" else "cpu")
        return {name: t.to(device, non_blocking=True) for name, t in streamer.get_tensors()}


def _optional(name: str) -> str | None:
    """Why an optional baseline cannot run (None: it can)."""
    try:
        __import__(name)
    except ImportError as exc:
        return f"{name} not installed ({exc})"
    return None


def methods_for(weights: Path, folder: Path | None, device: torch.device, dtype: torch.dtype
                ) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    m: dict[str, Callable[[], Any]] = {
        "read_1t": lambda: read_1t(weights),
        "read_8t": lambda: read_8t(weights),
        "flat": lambda: load_flat(weights, device, dtype if device.type == "cpu" else None),
    }
    if device.type == "cuda":
        m["read_direct"] = lambda: read_direct(weights)
        m["flat_direct"] = lambda: _flat_direct(weights, device)
    if folder is not None:
        m["module"] = lambda: load_module_folder(UNet2DConditionModel, folder, device, dtype)
        m["diffusers"] = lambda: UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype).to(device)
        m["st_load_file"] = lambda: load_file(str(weights), device=str(device))
    missing = {}
    for method, module, fn in (("fastsafetensors", "fastsafetensors", _fastsafetensors),
                               ("runai", "runai_model_streamer", _runai)):
        why = _optional(module)
        if why is None:
            m[method] = functools.partial(fn, weights, device)
        else:
            missing[method] = why
    return m, missing


def rounds(methods: dict[str, Callable[[], Any]], device: torch.device, n: int, cold: Path | None,
           cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Each method ``n`` times, the order reversed every other round; ``cold``: drop this file's pages first.
    ``cpu``: filled with the CPU seconds this process spent in each (all its threads, kernel time too),
    which other processes on a busy machine disturb far less than the wall time."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for r in range(n):
        for name in (names if r % 2 == 0 else names[::-1]):
            if cold is not None:
                drop_page_cache(cold)
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            result = methods[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - c0)
            del result
    return times


def summary(times: dict[str, list[float]]) -> dict[str, float]:
    """Each method's median over the rounds (a busy machine's outliers in either direction count less
    than in a best-of or a mean)."""
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_file(label: str, weights: Path, folder: Path | None, device: torch.device, dtype: torch.dtype,
               repeat: int, cold_repeat: int, skip: set[str], warmup: bool = True) -> dict[str, Any]:
    methods, missing = methods_for(weights, folder, device, dtype)
    for name in skip:
        methods.pop(name, None)
    out: dict[str, Any] = {"file_bytes": weights.stat().st_size, "missing": missing, "rounds": repeat,
                           "cold_rounds": cold_repeat}
    for fn in methods.values() if warmup else ():  # imports, staging buffers, skeletons: outside the timings
        fn()
    warm_cpu: dict[str, list[float]] = {}
    out["warm_rounds_s"] = rounds(methods, device, repeat, None, warm_cpu)
    out["cold_rounds_s"] = rounds(methods, device, cold_repeat, weights)
    out["warm_s"], out["cold_s"] = summary(out["warm_rounds_s"]), summary(out["cold_rounds_s"])
    out["warm_cpu_s"] = summary(warm_cpu)
    warm, cold = out["warm_s"], out["cold_s"]
    peers = [p for p in ("fastsafetensors", "runai") if p in cold]
    if "module" in warm:
        out["module_over_flat_warm"] = warm["module"] / warm["flat"]
        out["diffusers_over_module_warm"] = warm["diffusers"] / warm["module"]
        out["diffusers_over_module_cold"] = cold["diffusers"] / cold["module"]
        out["diffusers_over_module_warm_cpu"] = out["warm_cpu_s"]["diffusers"] / out["warm_cpu_s"]["module"]
    ours_cold = cold["module"] if "module" in cold else cold["flat"]
    out["ours_cold_over_best_read"] = ours_cold / min(v for k, v in cold.items() if k.startswith("read"))
    if peers:
        out["ours_cold_over_best_peer"] = ours_cold / min(cold[p] for p in peers)
        out["best_peer_warm_over_flat"] = min(warm[p] for p in peers) / warm["flat"]
        if "flat_direct" in cold:
            out["flat_direct_cold_over_best_peer"] = cold["flat_direct"] / min(cold[p] for p in peers)
    print_file(label, out)
    return out


def print_file(label: str, out: dict[str, Any]) -> None:
    print(f"== {label}: {out['file_bytes'] / 1e9:.2f} GB (medians of {out['rounds']} warm, {out['cold_rounds']} "
          "cold rounds, alternating the order)")
    for name in out["warm_s"]:
        each = " ".join(f"{t:.3f}" for t in out["cold_rounds_s"].get(name, []))
        print(f"  {name:16s} cold {out['cold_s'].get(name, float('nan')):7.3f} s   warm {out['warm_s'][name]:7.3f} s"
              f" ({out['warm_cpu_s'][name]:6.3f} s CPU)   (cold rounds: {each})")
    for key, value in out.items():
        if isinstance(value, float):
            print(f"  {key}: {value:.3f}")
    for name, why in out["missing"].items():
        print(f"  {name}: skipped, {why}")


def bench_offload(folder: Path, device: torch.device, dtype: torch.dtype, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    loaded = load_module_folder(UNet2DConditionModel, folder, device, dtype)
    nbytes = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
    out["model_bytes"] = nbytes
    t0 = time.perf_counter()
    cache = ModelCache(execution_device=device, ram_limit=max(8 << 30, 2 * nbytes), vram_limit=64 << 30)
    if cache.host_pool is not None:
        cache.host_pool.wait_ready()
        out["pool_pin_s"] = time.perf_counter() - t0
        out["pool_pinned"] = cache.host_pool.pinned
        out["pool_pin_gbps"] = cache.host_pool.capacity / out["pool_pin_s"] / 1e9
    cache.get_or_load("unet", lambda d: loaded)
    offload, reload = [], []
    for _ in range(max(repeat, 3) + 1):
        sync(device)
        t0 = time.perf_counter(); cache.offload("unet"); sync(device); offload.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); cache.lock("unet"); sync(device); reload.append(time.perf_counter() - t0)
        cache.unlock("unet")
    out["offload_first_gbps"] = nbytes / offload[0] / 1e9
    out["offload_gbps"] = nbytes / statistics.median(offload[1:]) / 1e9
    out["reload_gbps"] = nbytes / statistics.median(reload) / 1e9
    raw = torch.empty(nbytes, dtype=torch.uint8, device=device)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    for direction, (dst, src) in (("raw_d2h_gbps", (pinned, raw)), ("raw_h2d_gbps", (raw, pinned))):
        ts = []
        for _ in range(3):
            sync(device); t0 = time.perf_counter(); dst.copy_(src, non_blocking=True); sync(device)
            ts.append(time.perf_counter() - t0)
        out[direction] = nbytes / min(ts) / 1e9
    plain = UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype).to(device)
    sync(device)
    t0 = time.perf_counter(); plain.to("cpu"); sync(device)
    out["plain_to_cpu_gbps"] = nbytes / (time.perf_counter() - t0) / 1e9
    out["hit_p50_ms"] = hit_p50_ms(cache, "unet")
    print(f"  offload: first {out['offload_first_gbps']:.1f} GB/s, later {out['offload_gbps']:.1f} GB/s, "
          f"reload {out['reload_gbps']:.1f} GB/s (raw pinned copies: d2h {out['raw_d2h_gbps']:.1f}, "
          f"h2d {out['raw_h2d_gbps']:.1f}; plain .to('cpu') {out['plain_to_cpu_gbps']:.1f}); "
          f"hit p50 {out['hit_p50_ms']:.4f} ms")
    return out


def bench_cpu(folder: Path, device: torch.device, dtype: torch.dtype, repeat: int) -> dict[str, Any]:
    """The CPU's figures: hit p50 (offload needs a GPU)."""
    loaded = load_module_folder(UNet2DConditionModel, folder, device, dtype)
    cache = ModelCache(execution_device=device, ram_limit=64 << 30, vram_limit=0)
    cache.get_or_load("unet", lambda d: loaded)
    return {"hit_p50_ms": hit_p50_ms(cache, "unet")}


def hit_p50_ms(cache: ModelCache, key: str) -> float:
    """The cache hit: get + lock + unlock, median of 2,000."""
    hits = []
    for _ in range(2000):
        t0 = time.perf_counter()
        cache.get_or_load(key, lambda d: Loaded(None))
        with cache.locker(key):
            pass
        hits.append(time.perf_counter() - t0)
    return statistics.median(hits) * 1e3


def emit(res: dict[str, Any], out: Path | None) -> None:
    """The RESULT line on stdout, and appended to ``out`` when given."""
    print("RESULT " + json.dumps(res))
    if out:
        with open(out, "a") as fh:
            fh.write(json.dumps(res) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default=None, help="comma list of sd15, sdxl, half (CPU default: half)")
    ap.add_argument("--flux", action="store_true", help="also a FLUX-size (23.8 GB) flat file (CUDA)")
    ap.add_argument("--repeat", type=int, default=int(os.environ.get("MODELBUS_BENCH_REPEAT", "5")))
    ap.add_argument("--cold-repeat", type=int, default=None)
    ap.add_argument("--skip", default="", help="comma list of methods to leave out")
    ap.add_argument("--out", type=Path, default=None, help="append the JSON results line to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    sizes = [s for s in (args.sizes if args.sizes is not None else ("sd15,sdxl" if device.type == "cuda" else "half")).split(",") if s]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    skip = {s for s in args.skip.split(",") if s}
    res: dict[str, Any] = {"bench": "load", "device": str(device), "date": time.strftime("%Y-%m-%d"),
                           "host": platform.node(), "cores": os.cpu_count(), "torch": torch.__version__,
                           "dtype": str(dtype)}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)
        torch.empty(1, device=device)  # CUDA context outside the timings
    print(f"load bench on {device} ({res.get('gpu', 'cpu')}, {os.cpu_count()} cores), torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        for size in sizes:
            folder = make_unet_folder(Path(tmp), size)
            weights = folder / "diffusion_pytorch_model.safetensors"
            res[size] = bench_file(f"{size} UNet", weights, folder, device, dtype, args.repeat,
                                   args.cold_repeat or args.repeat, skip)
            if device.type == "cuda":
                res[size]["offload"] = bench_offload(folder, device, dtype, args.repeat)
            else:
                res[size].update(bench_cpu(folder, device, dtype, args.repeat))
            weights.unlink()
            emit(res, args.out)  # what is done so far survives a run cut short
        if args.flux and device.type == "cuda":
            path = make_flux_file(Path(tmp) / "flux.safetensors", device)
            res["flux"] = bench_file("FLUX-size transformer (flat)", path, None, device, dtype, 1, 1,
                                     skip, warmup=not sizes)
    emit(res, args.out)
    return res


if __name__ == "__main__":
    main()
