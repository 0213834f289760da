"""Recycled host memory for CPU loads: loads stay bit-exact, a buffer is reused only once no tensor
uses it, free buffers are bounded in bytes and in idle time, and a refused load leaves nothing held."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from modelbus.services.config import AppConfig, ConfigError
from modelbus.services.load import InvalidModelException, ModelCache, ModelLoadService, load_flat
from modelbus.services.load import host_memory as hm
from modelbus.services.load import safetensors_fast as sf
from modelbus.services.load.host_memory import GRAIN, HostMemory, RecycleSettingError
from modelbus.services.load.loaders import load_module_folder
from tests.fixtures.loadable import UNET_CFG

CPU = torch.device("cpu")


@pytest.fixture()
def pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostMemory]:
    """The process's pool for this test: 1 GiB, a minute idle (whatever MODELBUS_CPU_RECYCLE_* say)."""
    gc.collect()  # leases of earlier tests' tensors go back to their own pool, not this one
    own = HostMemory(1 << 30, 60.0)
    monkeypatch.setattr(hm, "_default", own)
    yield own
    own.clear()


def _every_dtype(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "h": torch.randn(300, 37, generator=g).half(), "b": torch.randn(1001, generator=g).bfloat16(),
        "f": torch.randn(17, 3, generator=g), "d": torch.randn(9, generator=g).double(),
        "i": torch.arange(-50, 50, dtype=torch.int64), "u": torch.arange(7, dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]), "e": torch.randn(0, 4, generator=g).half(),
        "q": (torch.randn(65, generator=g) * 3).to(torch.float8_e4m3fn),
    }
    save_file(sd, str(path))
    return sd


@pytest.mark.parametrize("piece", [96, 4096, 4 << 20])
@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
def test_loads_equal_safetensors_own(tmp_path: Path, pool: HostMemory, monkeypatch: pytest.MonkeyPatch,
                                     dtype: torch.dtype | None, piece: int) -> None:
    monkeypatch.setattr(sf, "CAST_PIECE_BYTES", piece)  # tensors split over pieces, pieces of many tensors
    monkeypatch.setattr(sf, "CHUNK_BYTES", piece)
    path = tmp_path / "w.safetensors"
    _every_dtype(path)
    want = load_file(str(path))
    for _ in range(2):  # the second load in recycled memory that holds the first's bytes
        flat = load_flat(path, CPU, dtype)
        assert set(flat.tensors) == set(want)
        for name, ref in want.items():
            ref = ref.to(dtype) if dtype is not None and ref.is_floating_point() else ref
            got = flat.tensors[name]
            assert got.dtype == ref.dtype and got.shape == ref.shape, name
            assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8)), name  # bit for bit (NaN too)
        del flat, got
    assert pool.reused >= 1


def test_a_module_load_equals_diffusers(tmp_path: Path, pool: HostMemory) -> None:
    torch.manual_seed(3)
    UNet2DConditionModel(**UNET_CFG).half().save_pretrained(tmp_path / "unet")
    want = UNet2DConditionModel.from_pretrained(tmp_path / "unet", torch_dtype=torch.float32).state_dict()
    for _ in range(2):
        got = load_module_folder(UNet2DConditionModel, tmp_path / "unet", CPU, torch.float32).model.state_dict()
        assert list(got) == list(want)
        for name, ref in want.items():
            assert got[name].dtype == ref.dtype and torch.equal(got[name], ref), name
        del got
        gc.collect()
    assert pool.reused == 1


def _span(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.data_ptr() + s.nbytes()


def test_a_buffer_in_use_is_never_handed_out_again(tmp_path: Path, pool: HostMemory) -> None:
    folders = []
    for seed in range(3):
        torch.manual_seed(seed)
        UNet2DConditionModel(**UNET_CFG).half().save_pretrained(tmp_path / f"u{seed}")
        folders.append(tmp_path / f"u{seed}")

    def loader(folder: Path):  # type: ignore[no-untyped-def]
        return lambda device: load_module_folder(UNet2DConditionModel, folder, device, torch.float32)

    one = sum(t.numel() * t.element_size() for t in UNet2DConditionModel(**UNET_CFG).state_dict().values())
    cache = ModelCache(execution_device=CPU, ram_limit=int(1.5 * one), vram_limit=0)
    entry, _ = cache.get_or_load("a", loader(folders[0]))
    kept = entry.model.conv_in.weight  # a caller still holds one tensor of A
    a_span = _span(kept)
    before = {k: v.clone() for k, v in entry.model.state_dict().items()}
    del entry
    b, _ = cache.get_or_load("b", loader(folders[1]))  # A is evicted: only `kept` refers to its buffer
    assert "a" not in cache
    b_span = _span(b.model.conv_in.weight)
    assert b_span[1] <= a_span[0] or a_span[1] <= b_span[0]  # B's memory is not A's
    assert pool.reused == 0
    c, _ = cache.get_or_load("c", loader(folders[2]))  # evicts B, still not A's memory
    assert _span(c.model.conv_in.weight)[0] != a_span[0]
    torch.manual_seed(0)
    assert torch.equal(kept, before["conv_in.weight"])
    assert torch.equal(kept, UNet2DConditionModel(**UNET_CFG).half().float().conv_in.weight)
    del kept, b, c
    gc.collect()
    assert pool.free_bytes > 0  # A's buffer (and B's) are back now that nothing uses them
    d, _ = cache.get_or_load("d", loader(folders[0]))
    assert pool.reused == 1
    for k, v in d.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_free_buffers_are_released_when_idle() -> None:
    now = [0.0]
    pool = HostMemory(1 << 30, 60.0, clock=lambda: now[0])
    t = pool.take(3 * GRAIN)
    assert pool.leased_bytes == 3 * GRAIN and pool.free_bytes == 0
    del t
    assert pool.free_bytes == 3 * GRAIN and pool.leased_bytes == 0
    now[0] = 59.0
    assert pool.release_idle() == 0 and pool.free_bytes == 3 * GRAIN
    now[0] = 60.5
    pool.release_idle()  # (or the pool's thread did it first, reading the same clock)
    assert pool.free_bytes == 0
    # the pool's own thread does it too, with no call
    real = HostMemory(1 << 30, 0.2)
    t = real.take(GRAIN)
    del t
    assert real.free_bytes == GRAIN
    deadline = time.monotonic() + 10
    while real.free_bytes and time.monotonic() < deadline:
        time.sleep(0.05)
    assert real.free_bytes == 0


def test_free_buffers_are_capped() -> None:
    pool = HostMemory(5 * GRAIN, 60.0)
    a, b = pool.take(2 * GRAIN), pool.take(3 * GRAIN)
    big = pool.take(6 * GRAIN)
    del a, b
    assert pool.free_bytes == 5 * GRAIN
    c = pool.take(2 * GRAIN)  # the 2-grain buffer again, not a new one
    assert pool.reused == 1 and pool.mapped == 3
    del big  # more than the cap alone: unmapped at once
    assert pool.free_bytes == 3 * GRAIN
    d = pool.take(GRAIN)  # too small for the 3-grain buffer's slack: a new one
    del c
    del d  # 3 + 2 + 1 grains: over the cap, the oldest (3) goes
    assert pool.free_bytes == 3 * GRAIN
    assert pool.take(3 * GRAIN) is not None and pool.reused == 1


def test_a_cap_of_zero_keeps_nothing() -> None:
    pool = HostMemory(0, 60.0)
    t = pool.take(GRAIN)
    t.fill_(7)
    del t
    assert pool.free_bytes == 0 and pool.leased_bytes == 0


def test_a_file_cut_short_during_the_load_is_refused_and_leaves_nothing_held(
        tmp_path: Path, pool: HostMemory) -> None:
    path = tmp_path / "w.safetensors"
    _every_dtype(path)
    full = path.read_bytes()
    for dtype in (None, torch.float32):
        path.write_bytes(full)
        flat, fill = sf._prepare(path, CPU, None, dtype)  # header read, buffer taken
        assert pool.leased_bytes > 0
        path.write_bytes(full[:len(full) // 2])  # then the file shrinks
        with pytest.raises(InvalidModelException, match="unexpected end of file"):
            fill()
        del flat, fill
        gc.collect()
        assert pool.leased_bytes == 0
    taken = pool.mapped + pool.reused
    with pytest.raises(InvalidModelException, match="truncated"):
        load_flat(path, CPU, torch.float32)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(InvalidModelException, match="not valid JSON"):
        load_flat(path, CPU, torch.float32)
    assert pool.mapped + pool.reused == taken and pool.leased_bytes == 0  # refused before any memory


def test_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hm, "_default", None)
    monkeypatch.setenv("MODELBUS_CPU_RECYCLE_MB", "lots")
    with pytest.raises(RecycleSettingError, match="MODELBUS_CPU_RECYCLE_MB must be a number >= 0, got 'lots'"):
        hm.host_memory()
    monkeypatch.setenv("MODELBUS_CPU_RECYCLE_MB", "512")
    monkeypatch.setenv("MODELBUS_CPU_RECYCLE_IDLE_S", "-1")
    with pytest.raises(RecycleSettingError, match="MODELBUS_CPU_RECYCLE_IDLE_S"):
        hm.host_memory()
    monkeypatch.setenv("MODELBUS_CPU_RECYCLE_IDLE_S", "2.5")
    made = hm.host_memory()
    assert (made.max_bytes, made.idle_seconds) == (512 << 20, 2.5)


def test_the_service_sets_the_bounds_from_its_config(config: AppConfig, store: object,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hm, "_default", HostMemory(1 << 30, 60.0))
    kept = hm.host_memory().take(3 * GRAIN)
    del kept
    assert hm.host_memory().free_bytes == 3 * GRAIN
    ModelLoadService(config.model_copy(update={"cpu_recycle_mb": 4, "cpu_recycle_idle_s": 5}), store)
    pool = hm.host_memory()
    assert (pool.max_bytes, pool.idle_seconds) == (4 << 20, 5.0)
    assert pool.free_bytes == 0  # over the new cap: given back at once
    with pytest.raises(ConfigError, match="MODELBUS_CPU_RECYCLE_MB=-1"):
        AppConfig.load(cpu_recycle_mb=-1)
