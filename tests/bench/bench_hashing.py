"""Hashing and identification benchmarks (issue 5), each a ratio against a baseline of the same run.

1. the key of a 2 GiB file (goal: under 5 ms) against a full BLAKE3 of it;
2. registering a 2 GiB safetensors file in place (key + BLAKE3 content hash + identification)
   against raw BLAKE3 of the file plus reading its header (goal: at most 1.3x);
3. identifying 200 mixed model files, in files/s, against listing their tensors with the
   reference libraries (safetensors ``safe_open``, ``torch.load(weights_only=True)``, json).

The 2 GiB file is sparse (a hole), so it costs no disk and reads at memory speed: the figures
measure our overhead, not the disk. ``MODELBUS_BENCH_HASH_SIZE`` (bytes, e.g. 8G) changes the
size, ``MODELBUS_BENCH_SCALE`` the number of mixed files. Run:
``.venv/bin/python tests/bench/bench_hashing.py``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import blake3
import structlog

from modelbus.services.config import parse_size
from modelbus.services.hashing import content_hash, model_key
from modelbus.services.probe import probe
from tests import fixtures as fx
from tests.bench.common import ratio_line, scale


def _best_of(repeats: int, fn: Callable[[], object]) -> float:
    """Median seconds of ``repeats`` runs (after one warm-up that fills the page cache)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _raw_blake3(path: Path) -> str:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    hasher.update_mmap(path)
    return hasher.hexdigest()


def _raw_header(path: Path) -> dict[str, object]:
    with path.open("rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        return dict(json.loads(fh.read(length)))


def _once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_register_and_key(big: Path, rounds: int = 3) -> None:
    def register() -> None:
        model_key(big)
        content_hash(big)
        probe(big)

    def baseline() -> None:
        _raw_blake3(big)
        _raw_header(big)

    _raw_blake3(big)  # warm the page cache once for both sides
    # interleaved so both sides see the same page-cache and CPU-frequency conditions
    base: list[float] = []
    ours: list[float] = []
    for _ in range(rounds):
        base.append(_once(baseline))
        ours.append(_once(register))
    ours_s, base_s = statistics.median(ours), statistics.median(base)
    print(f"{'register in place: key+blake3+probe vs blake3+header':<48} ours {ours_s:8.3f} s   "
          f"baseline {base_s:8.3f} s   ratio {ours_s / base_s:5.2f}x  (goal <= 1.3x)", flush=True)  # fmt: skip
    key_s = _best_of(50, lambda: model_key(big))
    ratio_line(f"key of a {big.stat().st_size >> 20} MiB file (ms; vs full BLAKE3)",
               key_s * 1e3, base_s * 1e3, "ms", goal="key < 5 ms", higher_is_better=False)  # fmt: skip


def _mixed_builders() -> list[tuple[str, Callable[[Path], Path]]]:
    return [
        ("sd1.safetensors", fx.make_sd1_checkpoint),
        ("vae.pt", fx.make_vae_checkpoint),
        ("sd2.safetensors", fx.make_sd2_checkpoint),
        ("sdxl.safetensors", fx.make_sdxl_checkpoint),
        ("refiner.safetensors", fx.make_sdxl_refiner_checkpoint),
        ("sd3.safetensors", fx.make_sd3_checkpoint),
        ("flux.safetensors", fx.make_flux_checkpoint),
        ("vae.safetensors", fx.make_vae_checkpoint),
        ("kohya.safetensors", fx.make_lora_kohya),
        ("kohya-xl.safetensors", lambda p: fx.make_lora_kohya(p, "sdxl")),
        ("peft.safetensors", fx.make_lora_diffusers),
        ("lokr.safetensors", fx.make_lora_lokr),
        ("ti.pt", fx.make_textual_inversion),
        ("ti.safetensors", lambda p: fx.make_textual_inversion(p, "sdxl", "safetensors")),
        ("ti.bin", lambda p: fx.make_textual_inversion(p, fmt="bin")),
        ("controlnet.safetensors", fx.make_controlnet_checkpoint),
        ("ip.safetensors", fx.make_ip_adapter),
        ("t5.safetensors", fx.make_t5_encoder_checkpoint),
        ("lora-folder", lambda p: fx.make_lora_diffusers(p, folder=True)),
        ("vae-folder", fx.make_vae_diffusers),
        ("t2i-folder", fx.make_t2i_adapter),
        ("onnx-folder", fx.make_onnx_pipeline),
    ]


def _reference_listing(path: Path) -> int:
    """What a plain script does to see inside a model: the libraries' own readers, no rules."""
    import torch
    from safetensors import safe_open

    if path.is_dir():
        return sum(len(json.loads(p.read_text())) for p in path.rglob("*.json"))
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return len(list(f.keys()))
    return len(torch.load(path, map_location="meta", weights_only=True, mmap=True))


def bench_identify(workdir: Path) -> None:
    count = scale(200)
    builders = _mixed_builders()
    paths = []
    start = time.perf_counter()
    for i in range(count):
        name, build = builders[i % len(builders)]
        paths.append(build(workdir / f"{i:04d}-{name}"))
    build_s = time.perf_counter() - start
    ours_s = _best_of(2, lambda: [probe(p) for p in paths])
    base_s = _best_of(2, lambda: [_reference_listing(p) for p in paths])
    ratio_line(f"identify {count} mixed model files (files/s; built in {build_s:.0f} s)",
               count / ours_s, count / base_s, "files/s", goal="report")  # fmt: skip


def main() -> int:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    size = parse_size(os.environ.get("MODELBUS_BENCH_HASH_SIZE", "2G"))
    workdir = Path(tempfile.mkdtemp(prefix="modelbus-bench-hashing-"))
    try:
        big = fx.make_sparse_safetensors(workdir / "big.safetensors", size)
        print(f"sparse {size >> 20} MiB safetensors file, {fx.file_size_on_disk(big) >> 10} KiB on disk; "
              f"{os.cpu_count()} CPUs", flush=True)  # fmt: skip
        bench_register_and_key(big)
        bench_identify(workdir / "mixed")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
