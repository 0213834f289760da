"""The fast path from safetensors files to a model on the target device.

``from_pretrained`` builds a model with random weights, then copies every tensor from the file
into it one by one. Here, the file's data section is streamed in large chunks straight into ONE
buffer on the target device: to CUDA through a few reused pinned staging buffers, with the reads
of the next chunks (threads, GIL released) overlapping the host-to-device copy of the current one;
to the CPU by parallel ``preadv`` straight into recycled host memory (:mod:`services.load.host_memory`),
or, when the dtype changes, piece by piece into a small buffer cast from there. Tensors are then *views* of that
buffer, assigned to a model built on the meta device (``load_state_dict(assign=True)``): no
initialisation, no second copy, bit-exact weights. The cache later moves the whole buffer in one
copy (see :mod:`services.load.tensors`).
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from accelerate import init_empty_weights

from modelbus.events.logs import get_logger
from modelbus.services.load.errors import InvalidModelException
from modelbus.services.load.host_memory import host_memory

log = get_logger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# big enough to amortise a copy launch, small enough to pipeline; tunable per host
CHUNK_BYTES = int(os.environ.get("MODELBUS_LOAD_CHUNK_MB", "32")) << 20
# pinned staging buffers in flight, each filled by its own reader thread ahead of the copy engine
# (12 on a 16-core H200 host: warm 0.119 s vs 0.167 s with 6)
STAGING_SLOTS = int(os.environ.get("MODELBUS_LOAD_SLOTS", str(min(12, max(4, os.cpu_count() or 4)))))
# CPU casts: a piece read, then cast while it is still in the CPU's cache
CAST_PIECE_BYTES = 4 << 20
ALIGN = 64                   # destination alignment of each contiguous range
PAGE = 4096                  # O_DIRECT's alignment of offsets, lengths and buffers
# cold reads straight from the disk (O_DIRECT) for pages the page cache does not hold
DIRECT = os.environ.get("MODELBUS_LOAD_DIRECT", "0") == "1"
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    data_start: int
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]


@dataclass
class FlatTensors:
    """Tensors that are all views of one ``buffer`` (uint8) on one device."""

    buffer: torch.Tensor
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True)
class _Range:
    fd_index: int
    file_off: int
    length: int
    dst_off: int


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse a safetensors header; a file that is not one raises :class:`InvalidModelException`."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise InvalidModelException(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or n > _MAX_HEADER or 8 + n > size:
            raise InvalidModelException(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidModelException(f"{path}: safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise InvalidModelException(f"{path}: safetensors header is not a mapping")
    data_start = 8 + n
    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, TensorEntry] = {}
    for name, spec in header.items():
        try:
            dtype = DTYPES[spec["dtype"]]
            begin, end = (int(x) for x in spec["data_offsets"])
            shape = tuple(int(x) for x in spec["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidModelException(f"{path}: bad header entry for tensor {name!r}: {spec!r}") from exc
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or data_start + end > size:
            raise InvalidModelException(f"{path}: tensor {name!r} does not fit its header (truncated file?)")
        entries[name] = TensorEntry(name, dtype, shape, data_start + begin, data_start + end)
    return SafetensorsHeader(path, data_start, entries, metadata)


def drop_page_cache(path: str | Path) -> None:
    """Ask the kernel to forget a file's cached pages, so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _plan(headers: Sequence[SafetensorsHeader], select: Callable[[str], bool] | None,
          ) -> tuple[list[_Range], dict[str, tuple[TensorEntry, int]], int]:
    """Merge the selected tensors of each file into contiguous ranges and give each a place."""
    ranges: list[_Range] = []
    placed: dict[str, tuple[TensorEntry, int]] = {}
    cursor = 0
    for index, header in enumerate(headers):
        chosen = sorted((e for e in header.entries.values() if select is None or select(e.name)),
                        key=lambda e: e.start)
        group: list[TensorEntry] = []
        for entry in chosen + [None]:  # type: ignore[list-item]
            if entry is not None and group and entry.start == group[-1].end:
                group.append(entry)
                continue
            if group:
                file_off = group[0].start
                # keep the file's alignment modulo ALIGN, so each view(dtype) stays legal
                dst = _align(cursor) + (file_off - header.data_start) % ALIGN
                length = group[-1].end - file_off
                ranges.append(_Range(index, file_off, length, dst))
                for g in group:
                    if g.name in placed:
                        raise InvalidModelException(f"tensor {g.name!r} appears in two weight files")
                    placed[g.name] = (g, dst + g.start - file_off)
                cursor = dst + length
            group = [entry] if entry is not None else []
    return ranges, placed, cursor


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise InvalidModelException(f"unexpected end of file at offset {offset + done}")
        done += n


def _mv(arr: Any) -> memoryview:
    """A writable byte view of a numpy slice (numpy's stubs do not declare the buffer protocol)."""
    return memoryview(arr)


def _chunks(ranges: Iterable[_Range], chunk: int) -> list[_Range]:
    out: list[_Range] = []
    for r in ranges:
        for off in range(0, r.length, chunk):
            n = min(chunk, r.length - off)
            out.append(_Range(r.fd_index, r.file_off + off, n, r.dst_off + off))
    return out


def _workers() -> int:
    return max(2, min(8, os.cpu_count() or 2))


def _read_to_cpu(fds: list[int], ranges: list[_Range], dst: torch.Tensor) -> None:
    arr = dst.numpy()
    pieces = _chunks(ranges, CHUNK_BYTES)
    if len(pieces) <= 1:
        for p in pieces:
            _pread_into(fds[p.fd_index], _mv(arr[p.dst_off:p.dst_off + p.length]), p.file_off)
        return
    with ThreadPoolExecutor(min(_workers(), len(pieces))) as pool:
        futures = [pool.submit(_pread_into, fds[p.fd_index],
                               _mv(arr[p.dst_off:p.dst_off + p.length]), p.file_off) for p in pieces]
        for f in futures:
            f.result()


class _StagingPool:
    """A few pinned buffers reused by every load to one CUDA device (pinning is slow: do it once)."""

    def __init__(self, slots: int, chunk: int) -> None:
        self.lock = threading.Lock()
        # two pages of slack: a direct read starts at the page below a piece and ends at the one above
        self.buffers = [torch.empty(chunk + 2 * PAGE, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
        self.arrays = [b.numpy() for b in self.buffers]


_pools: dict[int, _StagingPool] = {}
_pools_lock = threading.Lock()


def _pool_for(device: torch.device) -> _StagingPool:
    with _pools_lock:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _pools:
            _pools[index] = _StagingPool(STAGING_SLOTS, CHUNK_BYTES)
        return _pools[index]


def _read_piece(fd: int, direct: int | None, arr: Any, file_off: int, length: int) -> int:
    """Read one piece into ``arr``; returns where in ``arr`` it starts. With a ``direct`` (O_DIRECT)
    descriptor, pages the page cache holds are read from it (``RWF_NOWAIT``), the others straight
    from the disk, page-aligned."""
    if direct is not None:
        try:
            got = os.preadv(fd, [_mv(arr[:length])], file_off, os.RWF_NOWAIT)
        except BlockingIOError:
            got = 0
        if got == length:
            return 0
        start = file_off - file_off % PAGE
        delta = file_off - start
        end = -(-(delta + length) // PAGE) * PAGE
        done = 0
        while done < delta + length:
            n = os.preadv(direct, [_mv(arr[done:end])], start + done)
            if n <= 0:
                raise InvalidModelException(f"unexpected end of file at offset {start + done}")
            done += n
        return delta
    _pread_into(fd, _mv(arr[:length]), file_off)
    return 0


def _direct_fds(paths: Sequence[Path], fds: list[int]) -> list[int] | None:
    """O_DIRECT descriptors for cold reads, when ``MODELBUS_LOAD_DIRECT`` is on and the system has
    them (and can tell cached pages apart: RWF_NOWAIT); None otherwise."""
    if not DIRECT or not hasattr(os, "O_DIRECT") or not hasattr(os, "RWF_NOWAIT"):
        return None
    probe = bytearray(1)
    opened: list[int] = []
    try:
        for p, fd in zip(paths, fds, strict=True):
            try:
                os.preadv(fd, [probe], 0, os.RWF_NOWAIT)
            except BlockingIOError:
                pass
            opened.append(os.open(p, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        for d in opened:
            os.close(d)
        return None
    return opened


def _read_to_cuda(fds: list[int], ranges: list[_Range], dst: torch.Tensor, direct: list[int] | None = None) -> None:
    """Reads run ahead in threads into pinned slots; the copy stream drains them in order."""
    pool = _pool_for(dst.device)
    if direct is not None and any(b.data_ptr() % PAGE for b in pool.buffers):
        direct = None
    pieces = _chunks(ranges, CHUNK_BYTES)
    slots = len(pool.buffers)
    stream = torch.cuda.Stream(dst.device)
    with pool.lock, ThreadPoolExecutor(slots) as executor:
        done_events: list[torch.cuda.Event | None] = [None] * slots

        def read(i: int, wait: torch.cuda.Event | None) -> int:
            if wait is not None:
                wait.synchronize()  # the slot's previous copy must have left it
            p = pieces[i]
            return _read_piece(fds[p.fd_index], direct[p.fd_index] if direct is not None else None,
                               pool.arrays[i % slots], p.file_off, p.length)

        futures: dict[int, Future[int]] = {i: executor.submit(read, i, None) for i in range(min(slots, len(pieces)))}
        for i, p in enumerate(pieces):
            at = futures.pop(i).result()
            slot = i % slots
            with torch.cuda.stream(stream):
                dst[p.dst_off:p.dst_off + p.length].copy_(pool.buffers[slot][at:at + p.length], non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            done_events[slot] = event
            if i + slots < len(pieces):
                futures[i + slots] = executor.submit(read, i + slots, event)
        stream.synchronize()


class PendingFlat:
    """A flat load under way: ``flat`` holds the tensors (views of the buffer being filled) at once;
    ``wait()`` returns when every byte has arrived (and raises what the read raised)."""

    def __init__(self, flat: FlatTensors, fill: Callable[[], None]) -> None:
        self.flat = flat
        self._done = threading.Event()
        self._error: BaseException | None = None

        def run() -> None:
            try:
                fill()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                self._error = exc
            finally:
                self._done.set()

        threading.Thread(target=run, name="modelbus-read", daemon=True).start()

    def wait(self) -> FlatTensors:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self.flat


def _prepare(paths: str | Path | Sequence[str | Path], device: torch.device, select: Callable[[str], bool] | None,
             dtype: torch.dtype | None = None) -> tuple[FlatTensors, Callable[[], None]]:
    """The buffer and its views now; the function that fills the buffer from the files. ``dtype``
    (CPU only): floating tensors are cast to it piece by piece as they are read."""
    path_list = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    headers = [read_header(p) for p in path_list]
    if device.type == "cpu" and dtype is not None and _casts(headers, dtype, select):
        return _prepare_cast(path_list, headers, dtype, select)
    ranges, placed, total = _plan(headers, select)
    # on the CPU: memory an earlier load used and freed, its pages still mapped (host_memory)
    buffer = host_memory().take(total) if device.type == "cpu" else torch.empty(max(total, 1), dtype=torch.uint8,
                                                                                 device=device)
    tensors = {name: _view(buffer, off, e.dtype, e.shape) for name, (e, off) in placed.items()}

    return FlatTensors(buffer, tensors), lambda: _fill(path_list, ranges, buffer)


def _fill(path_list: Sequence[Path], ranges: list[_Range], buffer: torch.Tensor) -> None:
    """Read ``ranges`` of the files into ``buffer`` (uint8) on its device: the CUDA pipeline, or
    parallel ``preadv`` on the CPU."""
    device = buffer.device
    fds = [os.open(p, os.O_RDONLY) for p in path_list]
    direct = _direct_fds(path_list, fds) if device.type == "cuda" else None
    try:
        for fd in fds:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        if device.type == "cuda":
            _read_to_cuda(fds, ranges, buffer, direct)
        elif device.type == "cpu":
            _read_to_cpu(fds, ranges, buffer)
        else:  # mps and others: read to the CPU, one copy over
            host = torch.empty_like(buffer, device="cpu")
            _read_to_cpu(fds, ranges, host)
            buffer.copy_(host)
    finally:
        for fd in fds + (direct or []):
            os.close(fd)


def read_span(path: str | Path, start: int, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bytes ``start`` to ``start + length`` of a file, read the way the flat loads read (pinned
    pipeline to CUDA, parallel ``preadv`` into recycled host memory on the CPU) into one uint8 buffer
    on ``device``: for formats other than safetensors whose tensors lie in one data region (GGUF)."""
    device = torch.device(device)
    buffer = host_memory().take(length) if device.type == "cpu" else torch.empty(max(length, 1), dtype=torch.uint8,
                                                                                  device=device)
    if length > 0:
        _fill([Path(path)], [_Range(0, start, length, 0)], buffer)
    return buffer


def _casts(headers: Sequence[SafetensorsHeader], dtype: torch.dtype, select: Callable[[str], bool] | None) -> bool:
    return any(e.dtype.is_floating_point and e.dtype != dtype for h in headers for e in h.entries.values()
               if select is None or select(e.name))


@dataclass(frozen=True)
class _Segment:
    """Part of one tensor inside a piece: ``count`` elements at ``src`` in the piece, ``dst`` in the buffer."""

    src: int
    dst: int
    count: int
    src_dtype: torch.dtype
    dst_dtype: torch.dtype


@dataclass
class _Piece:
    fd_index: int
    file_off: int
    length: int
    segments: list[_Segment]


def _cast_plan(headers: Sequence[SafetensorsHeader], dtype: torch.dtype, select: Callable[[str], bool] | None,
               piece_bytes: int) -> tuple[list[_Piece], dict[str, tuple[torch.dtype, tuple[int, ...], int]], int]:
    """Each selected tensor's place in the buffer in its loaded dtype, and the file read in pieces of
    at most ``piece_bytes`` (a tensor larger than that split at whole elements) that each cast alone."""
    pieces: list[_Piece] = []
    placed: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
    cursor = 0
    for index, header in enumerate(headers):
        chosen = sorted((e for e in header.entries.values() if select is None or select(e.name)),
                        key=lambda e: e.start)
        for e in chosen:
            if e.name in placed:
                raise InvalidModelException(f"tensor {e.name!r} appears in two weight files")
            target = dtype if e.dtype.is_floating_point else e.dtype
            dst = _align(cursor)
            numel = math.prod(e.shape)
            placed[e.name] = (target, e.shape, dst)
            cursor = dst + numel * target.itemsize
            step = max(1, piece_bytes // e.dtype.itemsize)
            for first in range(0, numel, step):
                count = min(step, numel - first)
                file_off, length = e.start + first * e.dtype.itemsize, count * e.dtype.itemsize
                last = pieces[-1] if pieces else None
                if (last is None or last.fd_index != index or last.file_off + last.length != file_off
                        or last.length + length > piece_bytes):
                    last = _Piece(index, file_off, 0, [])
                    pieces.append(last)
                last.segments.append(_Segment(last.length, dst + first * target.itemsize, count, e.dtype, target))
                last.length += length
    return pieces, placed, cursor


def _prepare_cast(path_list: list[Path], headers: Sequence[SafetensorsHeader], dtype: torch.dtype,
                  select: Callable[[str], bool] | None) -> tuple[FlatTensors, Callable[[], None]]:
    """A CPU load that casts: pieces of the file are read (``preadv``) into a small buffer per
    thread and cast from there into the pooled buffer, while they are still in the CPU's cache;
    the file is never mapped, nor copied whole."""
    pieces, placed, total = _cast_plan(headers, dtype, select, CAST_PIECE_BYTES)
    buffer = host_memory().take(total)
    tensors = {name: _view(buffer, off, target, shape) for name, (target, shape, off) in placed.items()}

    def fill() -> None:
        fds = [os.open(p, os.O_RDONLY) for p in path_list]
        local = threading.local()

        def run(piece: _Piece) -> None:
            staging = getattr(local, "staging", None)
            if staging is None:
                staging = local.staging = torch.empty(CAST_PIECE_BYTES, dtype=torch.uint8)
            _pread_into(fds[piece.fd_index], _mv(staging.numpy()[:piece.length]), piece.file_off)
            for g in piece.segments:
                src = staging[g.src:g.src + g.count * g.src_dtype.itemsize].view(g.src_dtype)
                buffer[g.dst:g.dst + g.count * g.dst_dtype.itemsize].view(g.dst_dtype).copy_(src)

        try:
            for fd in fds:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            if len(pieces) <= 1:
                for piece in pieces:
                    run(piece)
            else:
                with ThreadPoolExecutor(min(_workers(), len(pieces)), thread_name_prefix="modelbus-cast") as pool:
                    for f in [pool.submit(run, piece) for piece in pieces]:
                        f.result()
        finally:
            for fd in fds:
                os.close(fd)

    return FlatTensors(buffer, tensors), fill


def start_flat(paths: str | Path | Sequence[str | Path], device: torch.device | str = "cpu",
               select: Callable[[str], bool] | None = None, dtype: torch.dtype | None = None) -> PendingFlat:
    """Start a :func:`load_flat` in the background: the tensors' views exist at once (a model can be
    assigned them while the bytes stream in); ``wait()`` before use. ``dtype`` casts on the CPU only."""
    device = torch.device(device)
    if dtype is not None and device.type != "cpu":
        raise ValueError(f"start_flat casts on the CPU only, not on {device}")
    flat, fill = _prepare(paths, device, select, dtype)
    return PendingFlat(flat, fill)


def needs_cast(paths: Sequence[str | Path], dtype: torch.dtype | None,
               select: Callable[[str], bool] | None = None) -> bool:
    """Whether loading ``paths`` in ``dtype`` converts any floating-point tensor (headers only)."""
    if dtype is None:
        return False
    return any(e.dtype.is_floating_point and e.dtype != dtype for p in paths for e in read_header(p).entries.values()
               if select is None or select(e.name))


def load_flat(paths: str | Path | Sequence[str | Path], device: torch.device | str = "cpu",
              dtype: torch.dtype | None = None, select: Callable[[str], bool] | None = None) -> FlatTensors:
    """Load the (selected) tensors of one or more safetensors files into one buffer on ``device``.

    Floating-point tensors are converted to ``dtype`` when given (on the CPU piece by piece as they are
    read; on other devices after the copy); other tensors keep their type. Values are bit-exact when no
    conversion is asked for, and equal to ``tensor.to(dtype)`` of the file's tensors when one is.
    On the CPU the buffer is recycled host memory (:mod:`services.load.host_memory`).
    """
    device = torch.device(device)
    flat, fill = _prepare(paths, device, select, dtype if device.type == "cpu" else None)
    fill()
    if dtype is not None and any(_needs_cast(t, dtype) for t in flat.tensors.values()):
        flat = _cast(flat, dtype)
    return flat


def _view(buffer: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape) * dtype.itemsize
    return buffer[offset:offset + n].view(dtype).view(shape)


def _needs_cast(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return t.is_floating_point() and t.dtype != dtype


def _cast(flat: FlatTensors, dtype: torch.dtype) -> FlatTensors:
    """Repack into a new buffer with floating tensors in ``dtype`` (the old buffer is then freed)."""
    layout: list[tuple[str, torch.Tensor, torch.dtype, int]] = []
    cursor = 0
    for name, t in flat.tensors.items():
        target = dtype if t.is_floating_point() else t.dtype
        layout.append((name, t, target, cursor))
        cursor = _align(cursor + t.numel() * target.itemsize)
    out = torch.empty(max(cursor, 1), dtype=torch.uint8, device=flat.buffer.device)
    tensors = {name: _view(out, off, target, tuple(t.shape)) for name, t, target, off in layout}
    _copy_all([(tensors[name], t) for name, t, _, _ in layout])
    return FlatTensors(out, tensors)


def _copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``dst.copy_(src)`` for each pair; on the CPU spread over threads (the copies release the GIL):
    casts there are bound by first-touch page faults and one core each."""
    if pairs and pairs[0][0].device.type == "cpu" and len(pairs) > 1:
        with ThreadPoolExecutor(_workers()) as pool:
            list(pool.map(lambda p: p[0].copy_(p[1]), pairs))
    else:
        for dst, src in pairs:
            dst.copy_(src)


def empty_model(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a model whose parameters live on the meta device: no memory, no random init."""
    with init_empty_weights(include_buffers=False):
        return factory()


def _assign_direct(model: torch.nn.Module, tensors: dict[str, torch.Tensor], device: torch.device) -> list[str]:
    """Set every parameter and persistent buffer straight from ``tensors`` (no load_state_dict hooks:
    several times faster on models with hundreds of modules). Tied parameters stay tied. Returns the
    names it could not fill; the caller falls back to ``load_state_dict`` then."""
    replaced: dict[int, torch.nn.Parameter] = {}
    unfilled: list[tuple[torch.nn.Module, str, str, torch.Tensor]] = []
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, old in list(module._parameters.items()):
            if old is None:
                continue
            value = tensors.get(dot + name)
            # a parameter kind that stores its data in another shape (diffusers' GGUFParameter: bytes of
            # quantized blocks) tells the shape it stands for, and is assigned as it is
            stored_as = getattr(value, "quant_shape", None)
            if value is None or (stored_as if stored_as is not None else value.shape) != old.shape:
                unfilled.append((module, name, dot + name, old))
                continue
            if id(old) not in replaced:
                replaced[id(old)] = (cast(torch.nn.Parameter, value) if stored_as is not None
                                     else torch.nn.Parameter(value, requires_grad=False))
            module._parameters[name] = replaced[id(old)]
        for name, buf in list(module._buffers.items()):
            if buf is None:
                continue
            if name in module._non_persistent_buffers_set:
                if buf.device != device:  # position ids...: built on the CPU, brought along
                    module._buffers[name] = buf.to(device)
                continue
            value = tensors.get(dot + name)
            if value is None or value.shape != buf.shape:
                unfilled.append((module, name, dot + name, buf))
                continue
            module._buffers[name] = value
    missing = []
    for module, name, key, old in unfilled:
        if id(old) in replaced and name in module._parameters:
            module._parameters[name] = replaced[id(old)]  # the other end of a tied weight
        else:
            missing.append(key)
    return missing


def assign_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], device: torch.device,
                   what: str) -> torch.nn.Module:
    """Assign ``tensors`` to a meta-built ``model``; every parameter must be given a value."""
    if _assign_direct(model, tensors, device):
        result = model.load_state_dict(tensors, strict=False, assign=True)
        still_meta = [n for n, p in model.named_parameters() if p.is_meta]
        still_meta += [n for n, b in model.named_buffers() if b.is_meta]
        if result.missing_keys or still_meta:
            missing = sorted(set(result.missing_keys) | set(still_meta))
            raise InvalidModelException(
                f"{what}: {len(missing)} weights missing for {type(model).__name__}, e.g. {missing[:3]}")
        for module in model.modules():
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.device != device:
                    module._buffers[name] = buf.to(device)
        model.requires_grad_(False)  # (the direct assignment makes parameters that need no gradient)
    if model.training:  # a skeleton's clone is built in inference mode already
        model.eval()
    return model
