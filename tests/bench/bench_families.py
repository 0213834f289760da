"""Full-size loads of the 2025-2026 formats, each against a baseline in the same run:

- a FLUX.1-size GGUF Q8_0 transformer (12.7 GB, diffusers' names) through the load service's GGUF
  loader (the flat read, weights kept quantized as diffusers' ``GGUFParameter``) vs diffusers' own GGUF
  load of the same file (``from_single_file`` with a ``GGUFQuantizationConfig``, then ``.to(device)``):
  load time, the first (page cache dropped) and the later loads; vs the same transformer's bf16 file (23.8 GB) through the
  FLUX loader: memory held, load time and forward time (1,024 image + 512 text tokens); and the GGUF
  dequantized as it loads (``MODELBUS_GGUF_DEQUANTIZE``) vs kept quantized: memory held, forward time;
- a Qwen-Image-size transformer (20 B parameters, bf16, 40.9 GB) in diffusers' names through the load
  service's DiT loader vs diffusers' ``QwenImageTransformer2DModel.from_single_file`` (+ ``.to(device)``)
  with the same shipped config: load time.

    python3 tests/bench/bench_families.py [--device cuda] [--only gguf,qwen] [--small | --layers 2,4]
        [--loads 3] [--no-forward] [--repeat 3] [--out FILE]

The files are sparse (their data regions holes: zeros, read from the page cache without a disk), written
under ``$MODELBUS_BENCH_TMP`` (default /tmp) and removed after each step; ``--small`` shrinks both models
to a block or so, to check the script; ``--layers D,S`` keeps FLUX's width with D double and S single
blocks (a CPU-sized GGUF comparison: diffusers' GGUF load copies every tensor out of its memory map, so
its CPU figure is a real load; its bf16 single-file load maps the file and reads nothing until used).
Needs the ``gguf`` package (and diffusers' GGUF support).
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
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import emit, held_bytes, median_forward, ratio_line, sync

from modelbus.services.load.kit import CONFIGS_DIR, LoadRequest
from modelbus.services.records.enums import SubModelType
from tests.fixtures.dit_files import write_sparse

FLUX = {"patch_size": 1, "in_channels": 64, "out_channels": 64, "num_layers": 19, "num_single_layers": 38,
        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
        "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}  # fmt: skip



def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def _flux_inputs(device: torch.device, dtype: torch.dtype, side: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    axis = torch.arange(side, dtype=torch.float32)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), axis, axis, indexing="ij"), -1).reshape(-1, 3)
    feed = {"hidden_states": torch.randn(1, side * side, 64, generator=g).to(dtype),
            "encoder_hidden_states": torch.randn(1, 512, 4096, generator=g).to(dtype),
            "pooled_projections": torch.randn(1, 768, generator=g).to(dtype), "timestep": torch.tensor([0.5]),
            "img_ids": ids, "txt_ids": torch.zeros(512, 3), "guidance": torch.tensor([3.5])}  # fmt: skip
    return {k: v.to(device) for k, v in feed.items()}


def _meta_shapes(cls: Any, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = cls(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _diffusers_gguf_load(path: Path, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """The baseline: diffusers' own GGUF load (``from_single_file`` with a ``GGUFQuantizationConfig``,
    its config from a folder), then ``.to(device)``: what the GGUF loader did before it read the file flat."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    with tempfile.TemporaryDirectory(prefix="bench-gguf-config-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **config}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = FluxTransformer2DModel.from_single_file(
                str(path), config=tmp, local_files_only=True, torch_dtype=dtype,
                quantization_config=GGUFQuantizationConfig(compute_dtype=dtype))  # fmt: skip
    return SimpleNamespace(model=model.to(device).eval())


def bench_gguf(folder: Path, device: torch.device, dtype: torch.dtype, config: dict[str, Any], repeat: int,
               loads: int, forward: bool) -> dict[str, Any]:
    """A FLUX GGUF Q8_0 through the load service's GGUF loader against diffusers' GGUF load of the same
    file (``loads`` rounds, the two alternating: the first load and the median of the later ones), and
    against the same transformer's bf16 file through the FLUX loader (memory held, load, forward)."""
    from diffusers import FluxTransformer2DModel

    from modelbus.services.load.flux import load_flux_checkpoint
    from modelbus.services.load.gguf import load_gguf_main
    from modelbus.services.load.safetensors_fast import drop_page_cache
    from tests.fixtures.gguf_files import write_gguf

    shapes = _meta_shapes(FluxTransformer2DModel, config)
    gguf_path = write_gguf(folder / "flux1-dev-Q8_0.gguf", shapes, "Q8_0")
    bf16_path = write_sparse(folder / "flux1-dev-bf16.safetensors", shapes)
    feed = _flux_inputs(device, dtype, 16 if config["num_layers"] < 19 else 32)
    results: dict[str, Any] = {"config": config, "gguf_file_gb": gguf_path.stat().st_size / 1e9,
                               "bf16_file_gb": bf16_path.stat().st_size / 1e9}  # fmt: skip

    def request(path: Path, fmt: str) -> LoadRequest:
        record = SimpleNamespace(key=fmt, model_type="main", model_format=fmt, base_model="flux", config=None)
        return LoadRequest(record, path, SubModelType.Transformer, device, dtype)

    steps: dict[str, Callable[[], Any]] = {
        "gguf": lambda: load_gguf_main(request(gguf_path, "gguf")),
        "diffusers_gguf": lambda: _diffusers_gguf_load(gguf_path, config, device, dtype),
        "bf16": lambda: load_flux_checkpoint(request(bf16_path, "checkpoint")),
        # once, after the rounds: a different model (plain layers, twice the memory), not a rival
        "gguf_dequantized": lambda: load_gguf_main(replace(request(gguf_path, "gguf"), gguf_dequantize=True)),
    }
    rivals = list(steps)[:3]
    times: dict[str, list[float]] = {name: [] for name in steps}
    import diffusers.quantizers.gguf.utils  # noqa: F401 - imported before the clock starts, for both
    try:
        for round_ in range(loads + 1):
            # the rivals in turns (neither always first), the first round from a cold page cache for each
            names = (rivals[:: 1 if round_ % 2 == 0 else -1]) if round_ < loads else ["gguf_dequantized"]
            for name in names:
                if round_ == 0:
                    for path in (gguf_path, bf16_path):
                        drop_page_cache(path)
                loaded, seconds = _timed(steps[name], device)
                times[name].append(round(seconds, 3))
                if name not in results:
                    model = loaded.model
                    results[name] = {"held_bytes": held_bytes(model)}
                    if forward and name != "diffusers_gguf":  # the same modules as ours: the same forward
                        results[name]["forward_s"] = round(median_forward(model, feed, device, repeat), 4)
                    del model
                del loaded
        for name, seconds in times.items():
            later = seconds[1:] or seconds
            results[name] |= {"load_s": seconds, "first_s": seconds[0], "later_s": statistics.median(later)}
            print(f"{name}: {results[name]}", flush=True)
    finally:
        gguf_path.unlink(missing_ok=True)
        bf16_path.unlink(missing_ok=True)
    gguf, theirs, bf16 = results["gguf"], results["diffusers_gguf"], results["bf16"]
    ratio_line("GGUF Q8_0 FLUX: load, first (ms) vs diffusers' GGUF", gguf["first_s"] * 1e3, theirs["first_s"] * 1e3,
               "ms", higher_is_better=False)
    ratio_line("GGUF Q8_0 FLUX: load, later (ms) vs diffusers' GGUF", gguf["later_s"] * 1e3, theirs["later_s"] * 1e3,
               "ms", higher_is_better=False)
    ratio_line("GGUF Q8_0 FLUX: memory held (GB) vs bf16", gguf["held_bytes"] / 1e9, bf16["held_bytes"] / 1e9, "GB",
               higher_is_better=False)
    ratio_line("GGUF Q8_0 FLUX: load, later (ms) vs bf16 file", gguf["later_s"] * 1e3, bf16["later_s"] * 1e3, "ms",
               higher_is_better=False)
    deq = results["gguf_dequantized"]
    ratio_line("GGUF dequantized on load: memory held (GB) vs kept", deq["held_bytes"] / 1e9, gguf["held_bytes"] / 1e9,
               "GB", higher_is_better=False)
    if forward:
        ratio_line("GGUF Q8_0 FLUX: forward pass (ms) vs bf16", gguf["forward_s"] * 1e3, bf16["forward_s"] * 1e3,
                   "ms", higher_is_better=False)
        ratio_line("GGUF dequantized on load: forward (ms) vs kept", deq["forward_s"] * 1e3, gguf["forward_s"] * 1e3,
                   "ms", higher_is_better=False)
    return results


def bench_qwen_image(folder: Path, device: torch.device, dtype: torch.dtype, small: bool) -> dict[str, Any]:
    from diffusers import QwenImageTransformer2DModel

    from modelbus.services.load.dit import load_dit_checkpoint

    config = json.loads((CONFIGS_DIR / "diffusers" / "qwen-image" / "transformer" / "config.json").read_text())
    if small:
        config |= {"num_layers": 1}
    config_dir = folder / "qwen-image-config"
    (config_dir / "transformer").mkdir(parents=True)
    (config_dir / "transformer" / "config.json").write_text(json.dumps(config))
    shapes = _meta_shapes(QwenImageTransformer2DModel, {k: v for k, v in config.items() if not k.startswith("_")})
    path = write_sparse(folder / "qwen_image_bf16.safetensors", shapes)
    results: dict[str, Any] = {"file_gb": path.stat().st_size / 1e9, "params": sum(torch.Size(s).numel() for s in shapes.values())}
    try:
        record = SimpleNamespace(key="q", model_type="main", model_format="checkpoint", base_model="qwen-image",
                                 config=str(config_dir))
        req = LoadRequest(record, path, SubModelType.Transformer, device, dtype)
        loaded, ours = _timed(lambda: load_dit_checkpoint(req), device)
        results["ours_s"] = round(ours, 3)
        del loaded

        def diffusers_load() -> Any:
            model = QwenImageTransformer2DModel.from_single_file(
                str(path), config=str(config_dir), subfolder="transformer", local_files_only=True, torch_dtype=dtype)
            return model.to(device)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, theirs = _timed(diffusers_load, device)
        results["diffusers_s"] = round(theirs, 3)
        del model
    finally:
        path.unlink(missing_ok=True)
    print(f"qwen-image: {results}", flush=True)
    ratio_line("Qwen-Image transformer: load (s)", results["ours_s"], results["diffusers_s"], "s",
               higher_is_better=False)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", default="gguf,qwen")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--layers", default="", help="FLUX's double,single block counts at full width (e.g. 2,4)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--loads", type=int, default=3, help="GGUF load rounds (ours and diffusers' alternating)")
    ap.add_argument("--no-forward", dest="forward", action="store_false")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    res: dict[str, Any] = {"bench": "families", "device": str(device), "host": platform.node(), "small": args.small}
    if torch.cuda.is_available():
        res["gpu"] = torch.cuda.get_device_name(device)
    steps = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="bench-families-", dir=os.environ.get("MODELBUS_BENCH_TMP")) as tmp:
        if "gguf" in steps:
            config = FLUX | ({"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 4} if args.small else {})
            if args.layers:
                double, single = (int(n) for n in args.layers.split(","))
                config |= {"num_layers": double, "num_single_layers": single}
            res["gguf"] = bench_gguf(Path(tmp), device, dtype, config, args.repeat, args.loads, args.forward)
        if "qwen" in steps:
            res["qwen_image"] = bench_qwen_image(Path(tmp), device, dtype, args.small)
    emit(res, args.out)
    return res


if __name__ == "__main__":
    main()
