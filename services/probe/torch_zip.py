"""A torch zip checkpoint is checked whole before anything in it is read, so that the pickle scanner
and ``torch.load`` cannot be made to read different things.

``torch.load`` decides zip or legacy by the first four bytes, takes the folder of the first member as
the archive's prefix and looks members up through its own zip reader; Python's :mod:`zipfile` finds
the central directory at the end and keeps the last of two members of one name. Whatever could make
the two disagree is refused (:class:`UnsafeArchiveError`, naming the member):

- a zip directory behind bytes that are not a zip (a legacy pickle with an archive appended);
- a member name that occurs twice;
- a member outside the layout ``torch.save`` writes (``<prefix>/data.pkl``, ``<prefix>/data/<n>``,
  and the few bookkeeping records), or members under two prefixes;
- a local header whose name or compression disagrees with the central directory, bytes before the
  first member, or members that overlap.
"""

from __future__ import annotations

import re
import struct
import zipfile
from collections import Counter
from pathlib import Path

from modelbus.services.probe.errors import CorruptModelError, UnsafeArchiveError

ZIP_MAGIC = b"PK\x03\x04"  # what torch.serialization._is_zipfile tests
_LOCAL = struct.Struct("<4s2B4HL2L2H")  # zipfile's structFileHeader
_RECORDS = re.compile(r"data\.pkl|data/\d+|version|byteorder|\.format_version|\.storage_alignment"
                      r"|\.data/version|\.data/serialization_id")
_NO_SIZE = 0xFFFFFFFF  # zip64: the real size is in the extra field


def starts_like_zip(path: Path) -> bool:
    """What ``torch.load`` takes for a zip checkpoint: the file begins with a local header."""
    with path.open("rb") as fh:
        return fh.read(len(ZIP_MAGIC)) == ZIP_MAGIC


def refuse_appended_zip(path: Path) -> None:
    """A file torch reads as a legacy pickle must not also be a zip to other readers."""
    if zipfile.is_zipfile(path):
        raise UnsafeArchiveError(f"{path}: a zip archive behind bytes that are not one (torch.load would "
                                 "read the bytes in front as a pickle): refused")


def pickle_member(path: Path, archive: zipfile.ZipFile) -> zipfile.ZipInfo:
    """The archive's ``<prefix>/data.pkl``, once the whole layout has been checked."""
    infos = archive.infolist()
    if not any(i.filename.endswith("/data.pkl") for i in infos):
        raise CorruptModelError(f"{path}: zip archive holds no pickle (<folder>/data.pkl): not a torch checkpoint")
    twice = sorted(name for name, count in Counter(i.filename for i in infos).items() if count > 1)
    if twice:
        raise UnsafeArchiveError(f"{path}: zip member {twice[0]!r} occurs more than once: refused")
    prefixes = {i.filename.split("/", 1)[0] for i in infos}
    if len(prefixes) != 1:
        raise UnsafeArchiveError(f"{path}: zip members under {len(prefixes)} top-level folders "
                                 f"({', '.join(sorted(prefixes)[:3])}); a torch checkpoint has one: refused")
    prefix = prefixes.pop()
    for info in infos:
        _, _, record = info.filename.partition("/")
        if not _RECORDS.fullmatch(record):
            raise UnsafeArchiveError(f"{path}: zip member {info.filename!r} is outside the torch checkpoint "
                                     "layout (<folder>/data.pkl, <folder>/data/<n>): refused")
    names = {i.filename: i for i in infos}
    _check_local_headers(path, infos, getattr(archive, "start_dir", None))
    return names[f"{prefix}/data.pkl"]


def _check_local_headers(path: Path, infos: list[zipfile.ZipInfo], directory_at: int | None) -> None:
    ordered = sorted(infos, key=lambda i: i.header_offset)
    if ordered[0].header_offset != 0:
        raise UnsafeArchiveError(f"{path}: {ordered[0].header_offset} bytes before the first zip member: refused")
    expected_at = 0  # each member starts after the one before ends
    with path.open("rb") as fh:
        for info in ordered:
            if info.header_offset < expected_at:
                raise UnsafeArchiveError(f"{path}: zip member {info.filename!r} overlaps the one before it: refused")
            fh.seek(info.header_offset)
            raw = fh.read(_LOCAL.size)
            if len(raw) < _LOCAL.size:
                raise UnsafeArchiveError(f"{path}: zip member {info.filename!r} has no local header: refused")
            magic, _, _, flags, method, _, _, _, packed, _, name_len, extra_len = _LOCAL.unpack(raw)
            name = fh.read(name_len).decode("utf-8" if flags & 0x800 else "cp437", errors="replace")
            if magic != ZIP_MAGIC or name != info.orig_filename:
                raise UnsafeArchiveError(f"{path}: zip member {info.filename!r} is named {name!r} in its local "
                                         "header: refused")
            if method != info.compress_type:
                raise UnsafeArchiveError(f"{path}: zip member {info.filename!r} has another compression in its "
                                         "local header: refused")
            if not flags & 0x08 and packed not in (_NO_SIZE, info.compress_size):
                raise UnsafeArchiveError(f"{path}: zip member {info.filename!r} has another size in its local "
                                         "header: refused")
            expected_at = info.header_offset + _LOCAL.size + name_len + extra_len + info.compress_size
    if directory_at is not None and expected_at > directory_at:
        raise UnsafeArchiveError(f"{path}: the last zip member overlaps the central directory: refused")
