"""structlog set-up for every process (API, workers, CLI): JSON lines when not on a TTY (or when asked),
readable console output otherwise.

The rule this module keeps: no secret reaches a log line. Every line, structlog's own and those of the
stdlib loggers it adopts (uvicorn, RQ, httpx), passes :class:`Scrubber` last before it is rendered,
which blanks values under secret-sounding keys (``authorization``, ``*token``, ``password``...),
``Bearer``/``Basic`` credentials, ``user:pass@`` in URLs, secret query parameters and every configured
secret value (the API token, ``HF_TOKEN``, ``CIVITAI_TOKEN``...) wherever it appears. Tracebacks are
rendered as plain text without local variables (a rich traceback shows every frame's locals: request
headers, tokens).

Every module logs through :func:`get_logger`, which imports structlog on the logger's first use, so a
process that never logs (a CLI ``list``) never pays for structlog's import (with rich's traceback and
pretty printers it is about a fifth of the CLI's start-up). :func:`configure_logging_later` records the
set-up and applies it at the first log line, structlog's or a stdlib logger's, whichever comes first.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import structlog

REDACTED = "[redacted]"
#: environment variables whose values are secrets whether or not a config names them
SECRET_ENV = ("MODELBUS_API_TOKEN", "MODELBUS_HF_TOKEN", "MODELBUS_CIVITAI_TOKEN", "HF_TOKEN", "CIVITAI_TOKEN",
              "HUGGING_FACE_HUB_TOKEN")
#: stdlib loggers whose records go through structlog's chain instead of their own handlers
ADOPTED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "rq", "rq.worker", "rq.queue", "httpx",
                   "httpcore")

#: adopted loggers that log every request at INFO: kept at WARNING
QUIET_LOGGERS = ("httpx", "httpcore")


class _NoHousekeeping(logging.Filter):
    """RQ's worker says at INFO each time it cleans its registries (every few seconds with our short
    maintenance interval): housekeeping, not news, so those lines are dropped; everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or "cleaning" not in str(record.msg)


@functools.cache
def _secret_key() -> re.Pattern[str]:
    return re.compile(r"^(?:.*token|.*password|passwd|.*secret|credentials?|authorization|"
                      r"proxy-authorization|cookie|set-cookie|api[_-]?key|x-api-key)$", re.IGNORECASE)


@functools.cache
def _patterns() -> tuple[tuple[re.Pattern[str], str], ...]:
    """The secrets' shapes, compiled on first use (a process that never logs never compiles them)."""
    return (
        # scheme://user:pass@host -> scheme://[redacted]@host
        (re.compile(r"(?P<a>\b[a-z][a-z0-9+.\-]*://)[^/\s@'\"<>]+@", re.IGNORECASE), rf"\g<a>{REDACTED}@"),
        # Authorization: Bearer xyz / Basic xyz, however it is quoted or joined
        (re.compile(r"(?P<a>\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/=\-]{3,}", re.IGNORECASE), rf"\g<a>{REDACTED}"),
        # ?token=...&sig=... : query parameters that carry credentials (presigned URLs included)
        (re.compile(r"(?P<a>[?&;](?:[\w.\-]*(?:token|key|sig|signature|password|secret|credential)[\w.\-]*)=)"
                    r"[^&\s'\"#<>]+", re.IGNORECASE), rf"\g<a>{REDACTED}"),
        # access_token='x', "password": "x", credentials=x in reprs and tracebacks
        (re.compile(r"(?P<a>\b(?:[\w\-]*token|password|passwd|secret|credentials?|authorization|api[_-]?key)"
                    r"['\"]?\s*[=:]\s*b?['\"]?)(?!\[redacted\])[^'\"\s,)}\]]+", re.IGNORECASE), rf"\g<a>{REDACTED}"),
    )


class Scrubber:
    """A structlog processor: blanks secrets in every value of an event (nested ones included)."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        values = {s for s in (*secrets, *(os.environ.get(name) for name in SECRET_ENV)) if s}
        # longest first: a secret that contains another is blanked whole
        self.secrets = sorted(values, key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self.secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        for pattern, replacement in _patterns():
            value = pattern.sub(replacement, value)
        return value

    def value(self, value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: REDACTED if self._secret_key(k, v) else self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self.value(v) for v in value]
        return self.text(repr(value))

    @staticmethod
    def _secret_key(key: object, value: object) -> bool:
        return isinstance(key, str) and bool(_secret_key().match(key)) and value not in (None, "", True, False)

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in list(event_dict.items()):
            if key.startswith("_"):  # structlog's own bookkeeping (the stdlib record, its logger)
                continue
            event_dict[key] = REDACTED if self._secret_key(key, value) else self.value(value)
        return event_dict


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of writing, not at configuration time: a
    stream captured once (a test runner's, a replaced one) may be closed by the time we log."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(fmt: str = "auto", level: str = "INFO", secrets: Iterable[str | None] = ()) -> None:
    """Configure structlog and route the stdlib loggers of our libraries through it; ``secrets`` are
    values (tokens) to blank wherever they appear, besides those of :data:`SECRET_ENV`."""
    global _pending, _generation
    _pending = None
    _generation += 1
    _drop_deferred_handler()
    import structlog

    json_output = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_output
        else structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    )
    scrub = Scrubber(secrets)
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso"),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, scrub, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    _adopt_stdlib(shared, scrub, renderer, level)


def _adopt_stdlib(shared: list[structlog.typing.Processor], scrub: Scrubber, renderer: structlog.typing.Processor,
                  level: str) -> None:
    """One root handler renders stdlib records with structlog's chain; the libraries' own handlers go."""
    import structlog

    handler = logging.StreamHandler(_CurrentStderr())
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, scrub, renderer],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_modelbus", False)]:
        root.removeHandler(old)
    handler._modelbus = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.getLevelName(level.upper()))
    for name in ADOPTED_LOGGERS:
        adopted = logging.getLogger(name)
        adopted.handlers.clear()
        adopted.propagate = True
    for name in QUIET_LOGGERS:  # a line per HTTP request a worker makes is noise, not news
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    rq_worker = logging.getLogger("rq.worker")
    if not any(isinstance(f, _NoHousekeeping) for f in rq_worker.filters):
        rq_worker.addFilter(_NoHousekeeping())


def reset_logging() -> None:
    """Undo :func:`configure_logging` (tests: the next one starts clean): structlog's defaults, our root
    handler gone, the root logger back at WARNING."""
    global _pending, _generation
    import structlog

    _pending = None
    _generation += 1
    _drop_deferred_handler()
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_modelbus", False)]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


#: the arguments of :func:`configure_logging_later`, until the first log line applies them
_pending: tuple[str, str, tuple[str | None, ...]] | None = None
#: how many times the set-up was made or undone: a logger made under an earlier one is made again
_generation = 0


def configure_logging_later(fmt: str = "auto", level: str = "INFO", secrets: Iterable[str | None] = ()) -> None:
    """:func:`configure_logging`, done at the first log line instead of now (a command that logs nothing
    never imports structlog). Until then a stdlib root handler stands in: a record reaching it applies
    the set-up and is rendered by the real handler."""
    global _pending
    _pending = (fmt, level, tuple(secrets))
    root = logging.getLogger()
    if not any(isinstance(h, _DeferredHandler) for h in root.handlers):
        root.addHandler(_DeferredHandler())
    root.setLevel(logging.getLevelName(level.upper()))


def _apply_pending() -> None:
    if _pending is not None:
        configure_logging(*_pending)


class _DeferredHandler(logging.Handler):
    """The root handler while the set-up is pending: the first record applies it, then goes to the
    handler that set-up installs."""

    def emit(self, record: logging.LogRecord) -> None:
        _apply_pending()
        for handler in logging.getLogger().handlers:
            if getattr(handler, "_modelbus", False) and record.levelno >= handler.level:
                handler.handle(record)


def _drop_deferred_handler() -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _DeferredHandler)]:
        root.removeHandler(handler)


class _Logger:
    """structlog's logger for a name, imported and made on the first call (see :func:`get_logger`), and
    bound once per set-up: structlog's own lazy proxy binds a new logger (its context, its output, its
    filtering class) at every call, a twentieth of a record add's own time. The bound logger shares
    the configured processor list, which ``structlog.testing.capture_logs`` changes in place."""

    __slots__ = ("_generation", "_logger", "_name")

    def __init__(self, name: str | None) -> None:
        self._name = name
        self._logger: Any = None
        self._generation = -1

    def __getattr__(self, attr: str) -> Any:  # each call: log.info is no attribute of ours
        if _pending is not None:
            _apply_pending()
        if self._generation != _generation:
            import structlog

            self._logger = structlog.get_logger(self._name).bind()
            self._generation = _generation
        return getattr(self._logger, attr)


def get_logger(name: str | None = None) -> Any:
    """``structlog.get_logger(name)``, without importing structlog until the logger is first used (the
    logger follows every later :func:`configure_logging` and :func:`reset_logging`; set structlog up
    through them, not with ``structlog.configure``)."""
    return _Logger(name)
