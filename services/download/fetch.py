"""Fetch one remote file into ``<dest_dir>/<name>``: resumable, parallel ranges, retried, verified.

Steps: probe with ``Range: bytes=0-`` (its body serves as the first range when nothing is on disk);
pick the name (Content-Disposition or URL); compare any ``.part`` state with the probe's
validator and keep the bytes on disk when it is the same resource; split large files into ranges
fetched at once; retry each range where it stopped; verify the sha256; rename into place.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import structlog

from services.config import AppConfig

from .cancel import Cancellation
from .errors import (
    DestinationExistsError,
    DownloadCancelled,
    InsufficientSpaceError,
    IntegrityError,
    RemoteError,
    RetriesExhaustedError,
    TokenRequiredError,
)
from .names import choose_filename
from .partial import (
    ByteRange,
    PartialState,
    StateWriter,
    load_state,
    part_path,
    remove_partial,
    split_ranges,
)
from .security import Credential
from .transport import open_stream

log = structlog.get_logger(__name__)

MODEL_SUFFIXES = {".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".sft", ".pickle"}
_HTML_MARKERS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml")
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")

ProgressFn = Callable[[int, "int | None"], None]


@dataclass(frozen=True)
class FetchOptions:
    parts: int = 4
    min_part_size: int = 32 << 20
    retries: int = 5
    stall_timeout: float = 30.0
    connect_timeout: float = 15.0
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: float = 120.0
    state_interval: float = 0.5
    disk_reserve: int = 16 << 20
    fsync: bool = True
    allow_private: bool = False

    @classmethod
    def from_config(cls, config: AppConfig, **overrides: object) -> FetchOptions:
        values: dict[str, object] = dict(
            parts=config.download_parts,
            retries=config.download_retries,
            stall_timeout=config.download_stall_timeout,
            allow_private=config.allow_private_downloads,
        )
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


@dataclass
class FileRequest:
    url: str
    dest_dir: Path
    name: str | None = None  # a checked relative path; None = from the response
    size: int | None = None
    sha256: str | None = None
    credential: Credential | None = None
    expect_model: bool | None = None  # None = decide by the file name's suffix


class _Retry(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _Restart(Exception):
    """The resource changed under us: throw away the partial file and start over."""


def fetch_file(
    client: httpx.Client,
    request: FileRequest,
    options: FetchOptions,
    cancel: Cancellation,
    progress: ProgressFn | None = None,
    on_path: Callable[[Path], None] | None = None,
) -> Path:
    """Download ``request`` and return the final path; raises DownloadError subclasses."""
    for _ in range(3):
        try:
            return _FileFetch(client, request, options, cancel, progress, on_path).run()
        except _Restart as exc:
            log.info("download.restart", url=request.url, reason=str(exc))
    raise RemoteError(f"{request.url} kept changing on the server while it was downloaded")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _check_status(response: httpx.Response) -> None:
    code = response.status_code
    if code in (200, 206, 416):
        return
    url = str(response.request.url)
    if code in (401, 403):
        raise TokenRequiredError(
            f"HTTP {code} from {response.request.url.host}: this file needs an access token "
            "(pass access_token, or configure HF_TOKEN / CIVITAI_TOKEN / remote_api_tokens)",
            code,
        )
    if code in (408, 425, 429) or code >= 500:
        raise _Retry(f"HTTP {code} from {url}", _retry_after(response))
    raise RemoteError(f"HTTP {code} for {url}", code)


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) of a Content-Range header; None where absent or '*'."""
    match = _CONTENT_RANGE.match(value or "")
    if not match:
        return None, None
    first, _, total = match.groups()
    return (int(first) if first else None), (int(total) if total and total != "*" else None)


def _looks_like_page(chunk: bytes) -> bool:
    head = chunk[:256].lstrip().lower()
    return head.startswith(_HTML_MARKERS)


class _FileFetch:
    def __init__(
        self,
        client: httpx.Client,
        request: FileRequest,
        options: FetchOptions,
        cancel: Cancellation,
        progress: ProgressFn | None,
        on_path: Callable[[Path], None] | None,
    ) -> None:
        self.client = client
        self.req = request
        self.opt = options
        self.cancel = Cancellation(cancel)  # a child: one failing range stops its siblings
        self.progress = progress
        self.on_path = on_path
        self._lock = threading.Lock()
        self._last_save = 0.0
        self.final: Path = request.dest_dir
        self.state: PartialState | None = None
        self.writer: StateWriter | None = None
        self.expect_model = bool(request.expect_model)

    # -- requests ---------------------------------------------------------------------------
    def _open(self, url: str, headers: dict[str, str]) -> httpx.Response:
        headers = {"Accept-Encoding": "identity", **headers}
        try:
            response = open_stream(
                self.client, url, headers=headers, credential=self.req.credential,
                allow_private=self.opt.allow_private,
            )
        except httpx.TimeoutException as exc:
            raise _Retry(f"timed out connecting to {url}: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise _Retry(f"connection to {url} failed: {exc!r}") from exc
        try:
            _check_status(response)
        except BaseException:
            response.close()
            raise
        return response

    def _retrying(
        self, what: str, attempt_fn: Callable[[], bool], marker: Callable[[], int] = lambda: 0
    ) -> None:
        """Run ``attempt_fn`` until it returns True, retrying on _Retry with backoff.

        Only consecutive failures without progress (``marker`` unchanged) count against the
        limit: a server that drops the connection every few megabytes still gets us the file.
        """
        failures = 0
        while True:
            self.cancel.check()
            before = marker()
            try:
                if attempt_fn():
                    return
                continue
            except _Retry as exc:
                if self.cancel.stopped:
                    raise DownloadCancelled(self.cancel.reason or "cancel") from exc
                failures = 1 if marker() > before else failures + 1
                if failures > self.opt.retries:
                    raise RetriesExhaustedError(
                        f"{what}: gave up after {failures} attempts; last error: {exc}"
                    ) from exc
                delay = min(self.opt.backoff_max, self.opt.backoff_base * 2 ** (failures - 1))
                if exc.retry_after is not None:
                    delay = min(self.opt.retry_after_max, exc.retry_after)
                log.info("download.retry", what=what, attempt=failures, delay=delay, reason=str(exc))
                self.cancel.wait(delay)

    # -- the steps --------------------------------------------------------------------------
    def run(self) -> Path:
        holder: list[httpx.Response] = []

        def probe() -> bool:
            holder.append(self._open(self.req.url, {"Range": "bytes=0-"}))
            return True

        self._retrying(f"probing {self.req.url}", probe)
        response = holder[0]
        try:
            return self._after_probe(response)
        finally:
            response.close()

    def _after_probe(self, probe: httpx.Response) -> Path:
        name = self.req.name or choose_filename(probe.headers.get("content-disposition"), str(probe.url))
        self.final = self.req.dest_dir / name
        if self.on_path:
            self.on_path(self.final)
        if self.req.expect_model is None:
            self.expect_model = self.final.suffix.lower() in MODEL_SUFFIXES
        ctype = probe.headers.get("content-type", "").split(";")[0].strip().lower()
        if self.expect_model and ctype in ("text/html", "application/json", "application/xhtml+xml"):
            raise TokenRequiredError(
                f"{probe.url.host} answered with a {ctype} page where a model file was expected; "
                "the file probably needs a login: pass an access token"
            )
        total, ranged = self._size_of(probe)
        if self.req.size is not None and total is not None and total != self.req.size:
            log.warning("download.size_differs", url=self.req.url, expected=self.req.size, got=total)
        current = PartialState(
            url=self.req.url, total=total, etag=probe.headers.get("etag"),
            last_modified=probe.headers.get("last-modified"),
        )
        if self._already_there(total):
            return self.final
        self.state = self._plan(current, ranged)
        self._check_space()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.writer = StateWriter(self.final, self.state)
        self.writer.save()
        self._report()
        fd = os.open(part_path(self.final), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if len(self.state.ranges) > 1 and total and os.fstat(fd).st_size < total:
                os.ftruncate(fd, total)  # sparse: ranges write at their offsets
            first = probe if self.state.ranges[0].done == 0 else None
            if first is None:
                probe.close()
            self._fetch_ranges(fd, first)
            if self.opt.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
            self.writer.save()
        return self._finish()

    def _size_of(self, probe: httpx.Response) -> tuple[int | None, bool]:
        """(total size, whether the server serves ranges) from the probe's answer."""
        if probe.status_code == 206:
            _, total = _parse_content_range(probe.headers.get("content-range"))
            return total, total is not None
        if probe.status_code == 416:  # `bytes=0-` of an empty resource
            _, total = _parse_content_range(probe.headers.get("content-range"))
            if total == 0:
                return 0, False
            raise RemoteError(f"{probe.url} refused a range request from byte 0 (HTTP 416)", 416)
        length = probe.headers.get("content-length")
        return (int(length) if length and length.isdigit() else None), False

    def _already_there(self, total: int | None) -> bool:
        if not self.final.exists():
            return False
        if self.final.is_file():
            same = self._verify(self.final) if self.req.sha256 else self.final.stat().st_size == total
            if same:
                log.info("download.already_complete", path=str(self.final))
                return True
        raise DestinationExistsError(f"{self.final} already exists and is not the file being downloaded")

    def _plan(self, current: PartialState, ranged: bool) -> PartialState:
        saved = load_state(self.final)
        if saved is not None and ranged and saved.matches(current):
            log.info("download.resume", path=str(self.final), have=saved.done, total=saved.total)
            return saved
        remove_partial(self.final)
        total = current.total
        if ranged and total and self.opt.parts > 1 and total >= 2 * self.opt.min_part_size:
            current.ranges = split_ranges(total, min(self.opt.parts, total // self.opt.min_part_size))
        else:
            current.ranges = [ByteRange(0, total if total is not None else -1)]
        return current

    def _check_space(self) -> None:
        assert self.state is not None
        if self.state.total is None:
            return
        need = self.state.total - self.state.done + self.opt.disk_reserve
        folder = self.final.parent
        while not folder.exists():
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        if free < need:
            raise InsufficientSpaceError(
                f"not enough disk space in {folder} for {self.final.name}: need {need} bytes, {free} free"
            )

    # -- ranges -----------------------------------------------------------------------------
    def _fetch_ranges(self, fd: int, first: httpx.Response | None) -> None:
        assert self.state is not None
        pending = [r for r in self.state.ranges if not r.complete]
        if len(pending) <= 1:
            for r in pending:
                self._fetch_range(fd, r, first if r.start == 0 else None)
            return
        with ThreadPoolExecutor(len(pending), thread_name_prefix="dl-range") as pool:
            futures = [pool.submit(self._fetch_range, fd, r, first if r.start == 0 else None) for r in pending]
            errors: list[BaseException] = []
            for future in futures:
                exc = future.exception()
                if exc is not None:
                    errors.append(exc)
                    self.cancel.stop("abort")  # one range failed for good: stop the others now
        real = [e for e in errors if not isinstance(e, DownloadCancelled)]
        if real:
            raise real[0]
        if errors:
            raise errors[0]

    def _fetch_range(self, fd: int, r: ByteRange, first: httpx.Response | None) -> None:
        given = [first] if first is not None else []

        def attempt() -> bool:
            if r.complete:
                return True
            response = given.pop() if given else self._open_range(r)
            if response is None:
                return True
            try:
                with self.cancel.watching(response):
                    self._pump(fd, r, response)
            finally:
                response.close()
                self._report(save=True)
            return r.complete

        self._retrying(f"downloading {self.final.name} bytes {r.start}-{r.end}", attempt, lambda: r.done)

    def _open_range(self, r: ByteRange) -> httpx.Response | None:
        """A response for the rest of ``r``; None when the server says the file is already whole."""
        assert self.state is not None
        offset = r.start + r.done
        headers = {"Range": f"bytes={offset}-{r.end - 1 if r.end >= 0 else ''}"}
        if self.state.validator:
            headers["If-Range"] = self.state.validator
        response = self._open(self.req.url, headers)
        if response.status_code == 206:
            first, _ = _parse_content_range(response.headers.get("content-range"))
            if first != offset:
                response.close()
                raise _Restart(f"asked for byte {offset}, server sent from byte {first}")
            return response
        response.close()
        if response.status_code == 416:
            _, total = _parse_content_range(response.headers.get("content-range"))
            if total is not None and total == offset and (r.end < 0 or r.end == total):
                r.end = total  # the partial file already holds every byte
                return None
            raise _Restart(f"server refused bytes from {offset} (HTTP 416, size now {total})")
        raise _Restart("server answered the range request with the whole file (changed or no ranges)")

    def _pump(self, fd: int, r: ByteRange, response: httpx.Response) -> None:
        length = r.length
        try:
            for chunk in response.iter_raw():
                if self.cancel.stopped:
                    raise DownloadCancelled(self.cancel.reason or "cancel")
                pos = r.start + r.done
                if length is not None:
                    chunk = chunk[: length - r.done]
                if pos == 0 and self.expect_model and _looks_like_page(chunk):
                    raise TokenRequiredError(
                        f"{response.url.host} sent an HTML page where a model file was expected; "
                        "the file probably needs a login: pass an access token"
                    )
                os.pwrite(fd, chunk, pos)
                r.done += len(chunk)
                self._report(len(chunk))
                if length is not None and r.done >= length:
                    return
        except httpx.TimeoutException as exc:
            raise _Retry(f"stalled: no data for {self.opt.stall_timeout:g} s") from exc
        except (httpx.TransportError, OSError) as exc:
            if self.cancel.stopped:
                raise DownloadCancelled(self.cancel.reason or "cancel") from exc
            raise _Retry(f"connection broke after {r.done} bytes of the range: {exc!r}") from exc
        if length is None:
            r.end = r.start + r.done  # a body of unknown length ends where the server stops
            if self.state is not None and self.state.total is None:
                self.state.total = r.end
        elif r.done < length:
            raise _Retry(f"connection closed after {r.done} of {length} bytes")

    def _report(self, _n: int = 0, save: bool = False) -> None:
        assert self.state is not None
        now = time.monotonic()
        if self.writer is not None and (save or now - self._last_save >= self.opt.state_interval):
            self._last_save = now
            self.writer.save()
        if self.progress is not None:
            self.progress(self.state.done, self.state.total)

    # -- completion -------------------------------------------------------------------------
    def _verify(self, path: Path) -> bool:
        assert self.req.sha256 is not None
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(8 << 20):
                self.cancel.check()
                digest.update(block)
        return digest.hexdigest() == self.req.sha256.lower()

    def _finish(self) -> Path:
        part = part_path(self.final)
        if self.req.sha256 and not self._verify(part):
            remove_partial(self.final)
            raise IntegrityError(f"{self.final.name}: sha256 differs from the published {self.req.sha256}")
        os.replace(part, self.final)
        remove_partial(self.final)
        log.info("download.file_complete", path=str(self.final))
        return self.final
