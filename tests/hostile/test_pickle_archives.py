"""Hostile checkpoints against the pickle scanner: a 1 MB zip inflating to a 1 GiB pickle, a pickle of
millions of opcodes, and zips that make the scanner and ``torch.load`` read different things (a member
named twice, a member outside the torch layout, a local header that disagrees with the central
directory, a zip appended to a legacy pickle). Each is refused, naming the problem, before it is read
or loaded; a real checkpoint still scans and loads."""

from __future__ import annotations

import pickle
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from modelbus.events.errors import InvalidInput, TooLarge
from modelbus.services.probe import inspect_pickle, safe_torch_load
from modelbus.services.probe.defaults import PICKLE_MAX_BYTES, PICKLE_MAX_OPCODES
from modelbus.services.probe.errors import PickleTooLargeError, UnsafeArchiveError
from tests.fixtures import model_files as fx

GIB = 1 << 30
EVIL = b"cbuiltins\nexec\n(S'print(1)'\ntR."  # imports builtins.exec: a finding, never loaded


def _saved(tmp_path: Path, name: str = "model.ckpt") -> Path:
    return fx.write_torch(tmp_path / name, {"a.weight": torch.ones(4, 4), "b.weight": torch.zeros(2)})


def _members(path: Path) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(info, z.read(info)) for info in z.infolist()]


def _rewrite(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of a duplicate name: the point of one test
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for name, data in members:
                z.writestr(name, data)
    return path


def test_a_zip_inflating_to_a_gib_pickle_is_refused_before_it_is_inflated(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.ckpt"
    ops = b")0" * (1 << 20)  # EMPTY_TUPLE POP: 2 MiB of opcodes per write
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("bomb/data.pkl", "w", force_zip64=True) as member:
            member.write(b"\x80\x02")
            for _ in range(GIB // len(ops)):
                member.write(ops)
            member.write(b"}.")
        z.writestr("bomb/version", "3\n")
    print(f"\nzip bomb: {bomb.stat().st_size / 2**20:.1f} MiB on disk, inflates to 1 GiB")
    with pytest.raises(PickleTooLargeError) as refused:
        inspect_pickle(bomb)
    assert isinstance(refused.value, TooLarge)
    assert str(PICKLE_MAX_BYTES) in str(refused.value) and "bomb/data.pkl" in str(refused.value)


def test_a_pickle_of_millions_of_opcodes_is_refused(tmp_path: Path) -> None:
    flood = tmp_path / "flood.pt"  # a legacy (not zip) pickle, under the byte limit
    count = PICKLE_MAX_OPCODES + (1 << 20)
    flood.write_bytes(b"\x80\x02" + b")0" * (count // 2) + b"}.")
    assert flood.stat().st_size < PICKLE_MAX_BYTES
    with pytest.raises(PickleTooLargeError, match=f"more than {PICKLE_MAX_OPCODES} opcodes"):
        inspect_pickle(flood)


@pytest.mark.parametrize("evil_first", [True, False], ids=["evil-first", "evil-last"])
def test_a_member_named_twice_is_refused(tmp_path: Path, evil_first: bool) -> None:
    path = _saved(tmp_path)
    members = [(i.filename, data) for i, data in _members(path)]
    pkl = next(name for name, _ in members if name.endswith("/data.pkl"))
    twin = (pkl, EVIL)
    _rewrite(path, [twin, *members] if evil_first else [*members, twin])
    for read in (inspect_pickle, safe_torch_load):
        with pytest.raises(UnsafeArchiveError, match="occurs more than once") as refused:
            read(path)
        assert isinstance(refused.value, InvalidInput) and pkl in str(refused.value)


@pytest.mark.parametrize("extra", ["model/extra/notes.pkl", "elsewhere/data.pkl", "model/code/__torch__.py",
                                   "model/data/0/../../x.pkl"])
def test_a_member_outside_the_torch_layout_is_refused(tmp_path: Path, extra: str) -> None:
    path = _saved(tmp_path)
    harmless = pickle.dumps({"note": 1}, protocol=2)
    _rewrite(path, [(i.filename, data) for i, data in _members(path)] + [(extra, harmless)])
    with pytest.raises(UnsafeArchiveError, match="layout|top-level folders"):
        inspect_pickle(path)


def test_a_local_header_that_disagrees_with_the_directory_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    info = next(i for i, _ in _members(path) if i.filename.endswith("/version"))
    raw = bytearray(path.read_bytes())
    name_at = info.header_offset + 30
    (name_len,) = struct.unpack_from("<H", raw, info.header_offset + 26)
    assert raw[name_at:name_at + name_len] == info.filename.encode()
    raw[name_at + name_len - 1:name_at + name_len] = b"X"  # model/versioX in the local header only
    path.write_bytes(bytes(raw))
    with pytest.raises(UnsafeArchiveError, match="local header"):
        inspect_pickle(path)


def test_a_zip_appended_to_a_legacy_pickle_is_refused(tmp_path: Path) -> None:
    zipped = _saved(tmp_path, "inner.ckpt")
    polyglot = tmp_path / "polyglot.ckpt"
    # torch.load reads a file that does not start with a zip header as a legacy pickle: the front one
    polyglot.write_bytes(EVIL + zipped.read_bytes())
    assert zipfile.is_zipfile(polyglot)
    with pytest.raises(UnsafeArchiveError, match="behind bytes"):
        inspect_pickle(polyglot)


def test_real_checkpoints_still_scan_and_load(tmp_path: Path) -> None:
    many = fx.write_torch(tmp_path / "many.ckpt", {f"layer{i}.weight": torch.zeros(2, 2) for i in range(300)})
    legacy = fx.write_torch(tmp_path / "legacy.pt", {"w": torch.ones(3)}, legacy=True)
    for path in (many, legacy):
        assert inspect_pickle(path).findings == []
        assert safe_torch_load(path, map_location="cpu")
