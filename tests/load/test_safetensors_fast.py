"""The fast safetensors path: bit-exact views of one buffer, dtype casts, selection, bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from modelbus.services.load import InvalidModelException, load_flat
from modelbus.services.load.safetensors_fast import assign_weights, empty_model, read_header
from tests.fixtures.loadable import UNET_CFG


def _file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    sd = {"a": torch.randn(3, 5).half(), "b": torch.randn(7).float(), "c": torch.arange(5), "d": torch.randn(2, 2).half()}
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    return path, sd


def test_bit_exact_views_of_one_buffer(tmp_path: Path) -> None:
    path, sd = _file(tmp_path)
    flat = load_flat(path)
    for name, ref in sd.items():
        got = flat.tensors[name]
        assert got.dtype == ref.dtype and torch.equal(got, ref)
        base = flat.buffer.data_ptr()
        assert base <= got.data_ptr() < base + flat.buffer.numel()


def test_cast_converts_floats_only(tmp_path: Path) -> None:
    path, sd = _file(tmp_path)
    flat = load_flat(path, dtype=torch.float32)
    assert flat.tensors["a"].dtype == torch.float32 and torch.equal(flat.tensors["a"], sd["a"].float())
    assert flat.tensors["c"].dtype == torch.int64 and torch.equal(flat.tensors["c"], sd["c"])


def test_cpu_cast_read_in_pieces_matches_a_plain_cast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a CPU load that casts reads pieces and casts each: two files, a selection, every dtype kept,
    # pieces small enough that tensors are split across them and pieces hold several tensors
    monkeypatch.setattr("modelbus.services.load.safetensors_fast.CAST_PIECE_BYTES", 96)
    torch.manual_seed(2)
    one = {"h": torch.randn(64, 33).half(), "i": torch.arange(9, dtype=torch.int32), "f": torch.randn(5)}
    two = {"b": torch.randn(17).bfloat16(), "skip": torch.randn(4).half()}
    save_file(one, str(tmp_path / "one.safetensors"))
    save_file(two, str(tmp_path / "two.safetensors"))
    flat = load_flat([tmp_path / "one.safetensors", tmp_path / "two.safetensors"], dtype=torch.float32,
                     select=lambda n: n != "skip")
    assert set(flat.tensors) == {"h", "i", "f", "b"}
    for name, ref in {**one, **two}.items():
        if name == "skip":
            continue
        want = ref.float() if ref.is_floating_point() else ref
        assert flat.tensors[name].dtype == want.dtype and torch.equal(flat.tensors[name], want)
    base = flat.buffer.data_ptr()  # one buffer holds them all
    assert all(base <= t.data_ptr() < base + flat.buffer.numel() for t in flat.tensors.values())


def test_a_module_loads_cast_is_one_buffer(tmp_path: Path) -> None:
    # read_state_dict on the CPU with a cast (a module's weights): one recycled buffer, the cast values
    from modelbus.services.load.weights import read_state_dict

    path, sd = _file(tmp_path)
    state = read_state_dict([path], torch.device("cpu"), torch.float32)
    assert state.buffer is not None
    for name, ref in sd.items():
        want = ref.float() if ref.is_floating_point() else ref
        assert state.tensors[name].dtype == want.dtype and torch.equal(state.tensors[name], want)
        assert state.tensors[name].untyped_storage().data_ptr() == state.buffer.untyped_storage().data_ptr()


def test_a_cast_of_a_truncated_file_is_refused(tmp_path: Path) -> None:
    path, _ = _file(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(InvalidModelException, match="truncated"):
        load_flat(path, dtype=torch.float32)


def test_select_reads_only_chosen_tensors(tmp_path: Path) -> None:
    path, sd = _file(tmp_path)
    flat = load_flat(path, select=lambda n: n in ("a", "d"))
    assert set(flat.tensors) == {"a", "d"}
    assert flat.buffer.numel() < path.stat().st_size
    assert torch.equal(flat.tensors["d"], sd["d"])


def test_multi_chunk_parallel_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("modelbus.services.load.safetensors_fast.CHUNK_BYTES", 4096)  # force many chunks, many threads
    sd = {f"t{i}": torch.randn(1000 + i) for i in range(20)}
    save_file(sd, str(tmp_path / "big.safetensors"))
    flat = load_flat(tmp_path / "big.safetensors")
    assert all(torch.equal(flat.tensors[k], v) for k, v in sd.items())


@pytest.mark.parametrize("content", [b"", b"garbage!", b"\xff" * 8 + b"{}", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"])
def test_bad_files_are_named(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(InvalidModelException, match="bad.safetensors"):
        read_header(bad)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path, _ = _file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(InvalidModelException, match="truncated"):
        load_flat(path)


def test_assign_to_meta_model_is_bit_exact(tmp_path: Path) -> None:
    torch.manual_seed(1)
    ref = UNet2DConditionModel(**UNET_CFG).half()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "u.safetensors"))
    flat = load_flat(tmp_path / "u.safetensors")
    model = empty_model(lambda: UNet2DConditionModel.from_config(ref.config))
    assert next(model.parameters()).is_meta
    assign_weights(model, flat.tensors, torch.device("cpu"), "unet")
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in model.parameters())


def test_missing_weights_are_named(tmp_path: Path) -> None:
    torch.manual_seed(1)
    ref = UNet2DConditionModel(**UNET_CFG)
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("conv_in")}
    save_file(sd, str(tmp_path / "u.safetensors"))
    model = empty_model(lambda: UNet2DConditionModel.from_config(ref.config))
    with pytest.raises(InvalidModelException, match="conv_in"):
        assign_weights(model, load_flat(tmp_path / "u.safetensors").tensors, torch.device("cpu"), "unet")


def test_direct_reads_give_the_same_bytes_as_buffered_ones(tmp_path: Path) -> None:
    import mmap
    import os

    from modelbus.services.load import safetensors_fast as sf

    path = tmp_path / "blob"
    data = os.urandom(3 * sf.PAGE * 5 + 123)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        direct = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        os.close(fd)
        pytest.skip("no O_DIRECT on this file system")
    try:
        import numpy as np
        arr = np.frombuffer(mmap.mmap(-1, len(data) + 2 * sf.PAGE), dtype=np.uint8)  # page-aligned
        for off, n in ((0, 100), (5, sf.PAGE), (sf.PAGE + 17, 2 * sf.PAGE + 3), (len(data) - 50, 50)):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # not cached: the direct path reads it
            at = sf._read_piece(fd, direct, arr, off, n)
            assert bytes(arr[at:at + n]) == data[off:off + n]
            at = sf._read_piece(fd, None, arr, off, n)
            assert at == 0 and bytes(arr[:n]) == data[off:off + n]
    finally:
        os.close(fd)
        os.close(direct)
