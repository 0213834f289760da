"""Fetch one remote file into ``<dest_dir>/<name>``: resumable, parallel ranges, retried, verified.

Steps: probe with ``Range: bytes=0-`` (its body serves as the first range when nothing is on disk);
pick the name (Content-Disposition or URL); compare any ``.part`` state with the probe's
validator and keep the bytes on disk when it is the same resource; split large files into ranges
fetched at once; retry each range where it stopped; verify the sha256; rename into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

from modelbus.events.logs import get_logger

from .cancel import Cancellation
from .errors import (
    DestinationExistsError,
    DownloadCancelled,
    InsufficientSpaceError,
    IntegrityError,
    RemoteError,
    Restart,
    RetriesExhaustedError,
    Retry,
    TokenRequiredError,
)
from .names import choose_filename
from .options import FetchOptions, FileRequest
from .partial import (
    WRITE_BEHIND,
    ByteRange,
    PartialState,
    StateWriter,
    load_state,
    lock_partial,
    part_path,
    remove_partial,
    same_validators,
    split_ranges,
    start_writeback,
)
from .responses import check_status, looks_like_page, parse_content_range
from .transport import open_stream, widen_reads

log = get_logger(__name__)

MODEL_SUFFIXES = {".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".sft", ".pickle"}

PROGRESS_INTERVAL = 0.05  # seconds between progress callbacks of one file
ProgressFn = Callable[[int, "int | None"], None]


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Raise InsufficientSpaceError unless the disk holding ``folder`` has ``need`` bytes free."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < need:
        raise InsufficientSpaceError(f"not enough disk space in {folder} for {what}: need {need} bytes, {free} free")


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
        except Restart as exc:
            log.info("download.restart", url=request.url, reason=str(exc))
    raise RemoteError(f"{request.url} kept changing on the server while it was downloaded")


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
        self._unsaved = 0
        self._last_progress = 0.0
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
            raise Retry(f"timed out connecting to {url}: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise Retry(f"connection to {url} failed: {exc!r}") from exc
        try:
            check_status(response)
        except BaseException:
            response.close()
            raise
        return response

    def _retrying(
        self, what: str, attempt_fn: Callable[[], bool], marker: Callable[[], int] = lambda: 0
    ) -> None:
        """Run ``attempt_fn`` until it returns True, retrying on Retry with backoff.

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
            except Retry as exc:
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
        saved = self._single_range_to_resume()
        headers = {"Range": "bytes=0-"}
        if saved is not None and saved.validator:
            headers = {"Range": f"bytes={saved.ranges[0].done}-", "If-Range": saved.validator}
        holder: list[httpx.Response] = []

        def probe() -> bool:
            holder.append(self._open(self.req.url, headers))
            return True

        self._retrying(f"requesting {self.req.url}", probe)
        response = holder[0]
        try:
            if saved is not None and response.status_code in (206, 416):
                return self._resume_single(response, saved)
            if saved is not None:  # 200: the file changed (or ranges stopped working): start over
                remove_partial(self.req.dest_dir / str(self.req.name))
            return self._after_probe(response)
        finally:
            response.close()

    def _single_range_to_resume(self) -> PartialState | None:
        """When the name is known beforehand, a one-range partial file resumes with its first request
        (Range + If-Range) instead of a probe: 206 continues, 200 restarts, 416 may complete it."""
        if not self.req.name:
            return None
        saved = load_state(self.req.dest_dir / self.req.name)
        if saved is None or saved.url != self.req.url or len(saved.ranges) != 1 or not saved.validator:
            return None
        return saved if saved.ranges[0].done > 0 else None

    def _set_final(self, name: str) -> None:
        self.final = self.req.dest_dir / name
        if self.on_path:
            self.on_path(self.final)
        if self.req.expect_model is None:
            self.expect_model = self.final.suffix.lower() in MODEL_SUFFIXES

    def _resume_single(self, response: httpx.Response, saved: PartialState) -> Path:
        self._set_final(str(self.req.name))
        r = saved.ranges[0]
        offset = r.start + r.done
        first, total = parse_content_range(response.headers.get("content-range"))
        if response.status_code == 416:
            if total is not None and total == offset and saved.total in (None, total):
                r.end, saved.total = total, total  # the partial file already holds every byte
                self.state = saved
                self.writer = StateWriter(self.final, saved)
                self._report(save=True)
                return self._finish()
            remove_partial(self.final)
            raise Restart(f"server refused bytes from {offset} (HTTP 416, size now {total})")
        if first != offset or total != saved.total:
            remove_partial(self.final)
            raise Restart(f"asked for byte {offset} of {saved.total}, got {first} of {total}")
        if not same_validators(saved, response):  # a server that ignored If-Range sent the new file's bytes
            remove_partial(self.final)
            raise Restart(f"the file changed on the server (ETag/Last-Modified) since byte {offset} was saved")
        log.info("download.resume", path=str(self.final), have=offset, total=total)
        return self._download(saved, response, offset)

    def _after_probe(self, probe: httpx.Response) -> Path:
        self._set_final(self.req.name or choose_filename(probe.headers.get("content-disposition"), str(probe.url)))
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
            if self.progress is not None:
                size = self.final.stat().st_size
                self.progress(size, size)
            return self.final
        state = self._plan(current, ranged)
        return self._download(state, probe, 0)

    def _download(self, state: PartialState, first: httpx.Response, first_offset: int) -> Path:
        """Fetch every range still missing; ``first`` is an open response starting at ``first_offset``."""
        self.state = state
        self._check_space()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(part_path(self.final), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not lock_partial(fd, part_path(self.final), self.opt.lock_wait, self.cancel.check):
                raise Restart(f"{self.final.name}: the partial file was replaced while this download waited for it")
            self.writer = StateWriter(self.final, state, fence=self.cancel.fence)
            self.writer.save()
            self._report()
            if len(state.ranges) > 1 and state.total and os.fstat(fd).st_size < state.total:
                os.ftruncate(fd, state.total)  # sparse: ranges write at their offsets
            with self._saving_state():
                self._fetch_ranges(fd, first, first_offset)
            if self.opt.fsync:
                os.fsync(fd)
            self.writer.save()
            return self._finish()  # still under the lock: no other writer sees the file before its rename
        except BaseException:
            self._save_after_failure()
            raise
        finally:
            os.close(fd)

    def _save_after_failure(self) -> None:
        """The range state as the failed (paused, cancelled, stalled) download left it, for a resume; the
        error the caller sees is the original one, and a run whose guard refuses writes saves nothing."""
        if self.writer is None or not part_path(self.final).exists():
            return
        try:
            self.writer.save()
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.info("download.state_not_saved", path=str(self.final), error=str(exc) or type(exc).__name__)

    def _size_of(self, probe: httpx.Response) -> tuple[int | None, bool]:
        """(total size, whether the server serves ranges) from the probe's answer."""
        if probe.status_code == 206:
            _, total = parse_content_range(probe.headers.get("content-range"))
            return total, total is not None
        if probe.status_code == 416:  # `bytes=0-` of an empty resource
            _, total = parse_content_range(probe.headers.get("content-range"))
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
        check_free_space(self.final.parent, self.state.total - self.state.done + self.opt.disk_reserve,
                         self.final.name)

    # -- ranges -----------------------------------------------------------------------------
    def _fetch_ranges(self, fd: int, first: httpx.Response, first_offset: int) -> None:
        assert self.state is not None
        pending = [r for r in self.state.ranges if not r.complete]
        given = {id(r): first for r in pending if r.start + r.done == first_offset}
        if not given:
            first.close()  # nothing on disk matches where its body starts: fetch ranges afresh
        if len(pending) <= 1:
            for r in pending:
                self._fetch_range(fd, r, given.get(id(r)))
            return
        with ThreadPoolExecutor(len(pending), thread_name_prefix="dl-range") as pool:
            futures = [pool.submit(self._fetch_range, fd, r, given.get(id(r))) for r in pending]
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
                    widen_reads(response)
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
            first, _ = parse_content_range(response.headers.get("content-range"))
            if first != offset:
                response.close()
                raise Restart(f"asked for byte {offset}, server sent from byte {first}")
            return response
        response.close()
        if response.status_code == 416:
            _, total = parse_content_range(response.headers.get("content-range"))
            if total is not None and total == offset and (r.end < 0 or r.end == total):
                r.end = total  # the partial file already holds every byte
                return None
            raise Restart(f"server refused bytes from {offset} (HTTP 416, size now {total})")
        raise Restart("server answered the range request with the whole file (changed or no ranges)")

    def _pump(self, fd: int, r: ByteRange, response: httpx.Response) -> None:
        length = r.length
        unflushed = r.start + r.done  # where the bytes not yet handed to the disk begin
        try:
            for chunk in response.iter_raw():
                self.cancel.check()  # cancelled, or (a guard) this run's lease is no longer surely its own
                pos = r.start + r.done
                if length is not None and len(chunk) > length - r.done:
                    chunk = chunk[: length - r.done]  # a server sending too much: keep the range's bytes
                if pos == 0 and self.expect_model and looks_like_page(chunk):
                    raise TokenRequiredError(
                        f"{response.url.host} sent an HTML page where a model file was expected; "
                        "the file probably needs a login: pass an access token"
                    )
                os.pwrite(fd, chunk, pos)
                r.done += len(chunk)
                if self.opt.fsync and pos + len(chunk) - unflushed >= WRITE_BEHIND:
                    start_writeback(fd, unflushed, pos + len(chunk) - unflushed)
                    unflushed = pos + len(chunk)
                self._report(len(chunk))
                if length is not None and r.done >= length:
                    return
        except httpx.TimeoutException as exc:
            raise Retry(f"stalled: no data for {self.opt.stall_timeout:g} s") from exc
        except (httpx.TransportError, OSError) as exc:
            if self.cancel.stopped:
                raise DownloadCancelled(self.cancel.reason or "cancel") from exc
            raise Retry(f"connection broke after {r.done} bytes of the range: {exc!r}") from exc
        if length is None:
            r.end = r.start + r.done  # a body of unknown length ends where the server stops
            if self.state is not None and self.state.total is None:
                self.state.total = r.end
        elif r.done < length:
            raise Retry(f"connection closed after {r.done} of {length} bytes")

    @contextmanager
    def _saving_state(self) -> Iterator[None]:
        """Save the range state (and report progress) every ``state_interval`` s from a ticker, so
        that a stalled or killed download still leaves a state naming the bytes already on disk."""
        done = threading.Event()

        def tick() -> None:
            while not done.wait(self.opt.state_interval):
                try:
                    self._report(save=True)  # also brings progress up to date while a range stalls
                except Exception as exc:  # noqa: BLE001 - a guard refused the write: the writers stop too
                    log.info("download.state_ticker_stopped", path=str(self.final), error=str(exc))
                    return

        ticker = threading.Thread(target=tick, name="dl-state", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()

    def _report(self, n: int = 0, save: bool = False) -> None:
        assert self.state is not None
        self._unsaved += n
        if self.writer is not None and (save or self._unsaved >= self.opt.state_every_bytes):
            self._unsaved = 0
            self.writer.save()
        now = time.monotonic()
        # per-chunk reports would cost more than the copy itself: a few dozen per second suffice
        if self.progress is not None and (save or now - self._last_progress >= PROGRESS_INTERVAL):
            self._last_progress = now
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
