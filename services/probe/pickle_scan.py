"""Scan pickle checkpoints (.ckpt/.pt/.pth/.bin) for unsafe imports, then load them safely.

A pickle can name any importable callable (``os.system``...) and have the unpickler call it, so
we never unpickle before reading the opcode stream with :mod:`pickletools`, which only parses.
Every global the stream imports must be either a tensor-rebuilding global that
``torch.load(weights_only=True)`` allows anyway, or one of a short list of harmless globals
that real checkpoints carry (PyTorch Lightning callbacks, numpy scalars, ``argparse.Namespace``).
Anything else is a finding, and the file is refused.

The harmless globals are then mapped to an inert stub while loading with ``weights_only=True``,
so the real class is never imported; this is what lets the original SD-1 ``.ckpt`` files load.

Both torch formats are covered: the zip format (``<archive>/data.pkl``) and the legacy format
(up to five pickles in a row: magic number, protocol, system info, the object, storage keys).
Zip or legacy is decided as ``torch.load`` decides it, and a zip's layout is checked whole before any
member is read (:mod:`services.probe.torch_zip`). The work is bounded (:mod:`services.probe.defaults`):
a pickle over the inflated size or the opcode count no real checkpoint needs is refused, and a
cancelled job stops between two batches of opcodes (:func:`services.stopping.checkpoint`).
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import pickletools
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from modelbus.events.logs import get_logger
from modelbus.services.probe.defaults import PICKLE_CHECK_EVERY, PICKLE_MAX_BYTES, PICKLE_MAX_OPCODES
from modelbus.services.probe.errors import (
    CorruptModelError,
    ModelPathError,
    PickleTooLargeError,
    UnsafeModelError,
)
from modelbus.services.probe.torch_zip import pickle_member, refuse_appended_zip, starts_like_zip
from modelbus.services.stopping import checkpoint

if TYPE_CHECKING:
    import torch

log = get_logger(__name__)

PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin"})
_LEGACY_PICKLES = 5

_TORCH_STORAGES = (
    "Float", "Half", "BFloat16", "Double", "Long", "Int", "Short", "Char", "Byte", "Bool",
    "ComplexFloat", "ComplexDouble", "Untyped",
)  # fmt: skip
_TORCH_DTYPES = (
    "float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8",
    "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "half", "float", "double",
)  # fmt: skip

#: Globals ``torch.load(weights_only=True)`` resolves to its own tensor rebuilders.
TENSOR_GLOBALS: frozenset[str] = frozenset(
    {
        "collections.OrderedDict",
        "torch.Size",
        "torch.device",
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch._utils._rebuild_meta_tensor_no_storage",
        "torch._tensor._rebuild_from_type_v2",
        "torch.nn.parameter.Parameter",
        "torch.storage.UntypedStorage",
        "builtins.set",
        "builtins.frozenset",
        "builtins.bytearray",
    }
    | {f"torch.{kind}Storage" for kind in _TORCH_STORAGES}
    | {f"torch.{dtype}" for dtype in _TORCH_DTYPES}
)

#: Globals that training frameworks leave in checkpoints and that carry no weights. They are
#: replaced by an inert stub while loading, never imported.
HARMLESS_GLOBALS: frozenset[str] = frozenset(
    {
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.dtype",
        "numpy.ndarray",
        "_codecs.encode",
        "argparse.Namespace",
        "torch.torch_version.TorchVersion",
    }
)
HARMLESS_PREFIXES: tuple[str, ...] = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "numpy.dtypes.")

_STRING_OPS = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
)
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_NO_VALUE_OPS = frozenset({"PROTO", "FRAME", "MEMOIZE"}) | _PUT_OPS


@dataclass
class PickleScan:
    """What a scan saw: every imported global, and those that are findings."""

    globals: set[str] = field(default_factory=set)
    findings: list[str] = field(default_factory=list)

    def add(self, name: str) -> None:
        self.globals.add(name)
        if not is_allowed_global(name) and name not in self.findings:
            self.findings.append(name)


class _InertStub:
    """Stands in for a harmless global while unpickling: accepts anything, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def is_allowed_global(name: str) -> bool:
    return name in TENSOR_GLOBALS or name in HARMLESS_GLOBALS or name.startswith(HARMLESS_PREFIXES)


def scan_pickle(path: Path) -> list[str]:
    """The unsafe globals ``path`` imports (empty list: safe to load with :func:`safe_torch_load`)."""
    return inspect_pickle(path).findings


def inspect_pickle(path: Path) -> PickleScan:
    """Parse every pickle stream in ``path`` without executing it."""
    path = Path(path)
    if not path.is_file():
        raise ModelPathError(f"no such file: {path}")
    scan = PickleScan()
    try:
        if starts_like_zip(path):
            _scan_zip(path, scan)
        else:
            refuse_appended_zip(path)
            with path.open("rb") as fh:
                _scan_legacy(path, _Budget(fh, path), scan)
    except (OSError, zipfile.BadZipFile) as exc:
        raise CorruptModelError(f"{path}: cannot read pickle archive: {exc}") from exc
    return scan


def safe_torch_load(path: Path, map_location: str | torch.device = "meta") -> Any:
    """Scan, then ``torch.load(weights_only=True)``; mmap for zip files so nothing is read early.

    The default ``map_location="meta"`` gives shapes without reading tensor data, which is all
    identification needs; pass ``"cpu"`` for the weights.
    """
    path = Path(path)
    scan = inspect_pickle(path)
    if scan.findings:
        log.warning("unsafe_pickle", path=str(path), findings=scan.findings)
        raise UnsafeModelError(path, scan.findings)
    stubs: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
        (_InertStub, name) for name in sorted(scan.globals) if name not in TENSOR_GLOBALS
    ]
    import torch  # imported here: identifying safetensors (and the CLI) must not pay for torch

    is_zip = starts_like_zip(path)
    try:
        with torch.serialization.safe_globals(stubs):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=is_zip)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, OSError) as exc:
        raise CorruptModelError(f"{path}: cannot load pickle checkpoint: {_first_line(exc)}") from exc


def _scan_zip(path: Path, scan: PickleScan) -> None:
    with zipfile.ZipFile(path) as archive:
        info = pickle_member(path, archive)
        if info.file_size > PICKLE_MAX_BYTES:
            raise _too_large(path, info.filename, f"inflates to {info.file_size} bytes")
        with archive.open(info) as member:
            # the object pickle is small (tensor data lives in other members); reading it whole is many
            # times faster than pickletools pulling opcodes through a zip stream
            data = member.read(PICKLE_MAX_BYTES + 1)
        if len(data) > PICKLE_MAX_BYTES:
            raise _too_large(path, info.filename, "inflates to more")
        _scan_stream(path, io.BytesIO(data), scan, where=info.filename, counted=[0])


def _scan_legacy(path: Path, fh: _Budget, scan: PickleScan) -> None:
    # torch's legacy loader unpickles at most this many objects; raw storage bytes follow
    counted = [0]
    for index in range(_LEGACY_PICKLES):
        if not fh.peek(1):
            if index == 0:
                raise CorruptModelError(f"{path}: empty file")
            return
        _scan_stream(path, fh, scan, where=f"pickle #{index + 1}", counted=counted)


class _Budget:
    """A file read by pickletools, refused once its pickles have taken PICKLE_MAX_BYTES."""

    def __init__(self, fh: io.BufferedReader, path: Path) -> None:
        self.fh, self.path, self.left = fh, path, PICKLE_MAX_BYTES

    def _take(self, data: bytes) -> bytes:
        self.left -= len(data)
        if self.left < 0:
            raise _too_large(self.path, "its pickles", "take more")
        return data

    def read(self, size: int = -1) -> bytes:
        return self._take(self.fh.read(min(size, self.left + 1) if size >= 0 else self.left + 1))

    def readline(self) -> bytes:
        return self._take(self.fh.readline(self.left + 1))

    def peek(self, size: int) -> bytes:
        return self.fh.peek(size)

    def tell(self) -> int:
        return self.fh.tell()


def _too_large(path: Path, where: str, what: str) -> PickleTooLargeError:
    return PickleTooLargeError(f"{path}: {where} {what} than {PICKLE_MAX_BYTES} bytes, the limit for a "
                               "checkpoint's pickle (services/probe/defaults.py): refused")


def _scan_stream(path: Path, fh: IO[bytes] | _Budget, scan: PickleScan, where: str, counted: list[int]) -> None:
    try:
        # (_Budget reads like the file it wraps: genops only calls read, readline, tell)
        for name in _imported_globals(_bounded(pickletools.genops(fh), path, counted)):  # type: ignore[arg-type]
            scan.add(name)
    except (ValueError, EOFError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        raise CorruptModelError(f"{path}: not a valid pickle ({where}): {_first_line(exc)}") from exc


def _bounded(ops: Iterable[tuple[pickletools.OpcodeInfo, Any, int | None]], path: Path,
             counted: list[int]) -> Iterator[tuple[pickletools.OpcodeInfo, Any, int | None]]:
    """The opcodes, refused past PICKLE_MAX_OPCODES for the whole file, with a stop check now and then."""
    for op in ops:
        counted[0] += 1
        if counted[0] % PICKLE_CHECK_EVERY == 0:
            if counted[0] > PICKLE_MAX_OPCODES:
                raise PickleTooLargeError(f"{path}: its pickles hold more than {PICKLE_MAX_OPCODES} opcodes, the "
                                          "limit for a checkpoint (services/probe/defaults.py): refused")
            checkpoint()
        yield op


def _imported_globals(ops: Iterable[tuple[pickletools.OpcodeInfo, Any, int | None]]) -> Iterator[str]:
    """Yield ``module.name`` for each GLOBAL/INST/STACK_GLOBAL, resolving memoised strings."""
    memo: dict[int, Any] = {}
    recent: list[Any] = []  # the value each opcode pushed (a string, or None for anything else)
    for opcode, arg, _pos in ops:
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            yield _py3_name(module, attr)
            recent.append(None)
        elif name == "STACK_GLOBAL":
            top = recent[-2:] if len(recent) >= 2 else [None, None]
            if isinstance(top[0], str) and isinstance(top[1], str):
                yield _py3_name(top[0], top[1])
            else:
                # the name was built at run time: we cannot prove it harmless
                yield "<unresolved STACK_GLOBAL>"
            recent.append(None)
        elif name in ("EXT1", "EXT2", "EXT4"):
            yield f"<copyreg extension {arg}>"
        elif name in _STRING_OPS:
            recent.append(arg if isinstance(arg, str) else bytes(arg).decode("latin-1"))
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in _PUT_OPS:
            memo[int(arg)] = recent[-1] if recent else None
        elif name in _GET_OPS:
            recent.append(memo.get(int(arg)))
        elif name not in _NO_VALUE_OPS:
            recent.append(None)
        if len(recent) > 64:
            del recent[:-8]


def _py3_name(module: str, attr: str) -> str:
    """The name the unpickler resolves: protocols < 3 spell Python 2 names (``__builtin__``)."""
    module, attr = _compat_pickle.NAME_MAPPING.get((module, attr), (module, attr))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{attr}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
