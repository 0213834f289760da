"""Safe file names from Content-Disposition headers and URLs, and safe relative part paths.

A server chooses the name we write to, so the name is reduced to one path component that cannot
climb out of the destination folder, name a device, or hide as a dot-file.
"""

from __future__ import annotations

import re
import unicodedata
from email.message import Message
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

from .errors import UnsafePathError

_MAX_NAME = 200
_BAD_CHARS = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]')
_RESERVED = {"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(10)} | {f"lpt{i}" for i in range(10)}


def sanitize_filename(name: str, fallback: str = "download") -> str:
    """Reduce ``name`` to one safe path component; ``fallback`` when nothing usable remains."""
    name = unicodedata.normalize("NFC", name)
    # keep only the last component of either separator style: a server may send "../../x" or "C:\\x"
    name = re.split(r"[/\\]", name)[-1]
    name = _BAD_CHARS.sub("_", name)
    # strip dots and spaces together: ". . ." must not survive as "." (the folder itself) or a dot-file
    name = name.strip(". \t")
    if name.split(".")[0].lower() in _RESERVED:
        name = "_" + name
    if len(name.encode()) > _MAX_NAME:
        stem, dot, ext = name.rpartition(".")
        keep = ext if dot and len(ext) <= 16 else ""
        budget = _MAX_NAME - len(keep.encode()) - 1
        base = (stem if keep else name).encode()[:budget].decode(errors="ignore")
        name = f"{base}.{keep}" if keep else base
    return name or fallback


def filename_from_content_disposition(header: str | None) -> str | None:
    """The file name a Content-Disposition header names (RFC 6266, ``filename*`` wins), unsanitised."""
    if not header:
        return None
    msg = Message()
    msg["content-disposition"] = header
    # email.Message decodes RFC 2231 ``filename*=UTF-8''...`` and prefers it over ``filename``
    name = msg.get_filename()
    return name or None


def filename_from_url(url: str) -> str | None:
    path = urlsplit(url).path
    last = unquote(path.rstrip("/").rsplit("/", 1)[-1]) if path else ""
    return last or None


def choose_filename(content_disposition: str | None, url: str, fallback: str = "download") -> str:
    """Content-Disposition first, else the last URL path component, sanitised to one component."""
    raw = filename_from_content_disposition(content_disposition) or filename_from_url(url) or fallback
    return sanitize_filename(raw, fallback)


def safe_relative_path(path: str) -> PurePosixPath:
    """Check a multi-file part path: relative, no ``..``, no empty or dot-only components."""
    if not path or path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", path) or "\x00" in path:
        raise UnsafePathError(f"part path must be relative: {path!r}")
    parts = re.split(r"[/\\]", path)
    if any(p == ".." for p in parts):
        raise UnsafePathError(f"part path must not climb out with '..': {path!r}")
    clean = [p for p in parts if p not in ("", ".")]
    if not clean:
        raise UnsafePathError(f"part path names no file: {path!r}")
    return PurePosixPath(*clean)
