"""What makes a log entry acceptable, decided the same way by every reader and by the append.

An entry of the domain log is accepted when (1) it decodes against its type's schema (events.codec),
(2) its body passes the *domain checks* registered for its type, and (3) its aggregate version is
exactly one more than the last version of that aggregate accepted before it (a gap, a repeat or an
older version is refused). A refused entry never advances its aggregate's version: entries written
by the append script always do, so a forged entry can never shift the versions of real ones.

The domain checks are a hook: the event layer knows no record configs, so the package that does
(``services.records``) registers its check here at import, and every reader and the store's append
call the very same function. A check raises ``ValueError`` naming the problem.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from pydantic import ValidationError

from modelbus.events.schema import EVENT_TYPES, Event

#: (aggregate id, body) -> None, or ValueError naming what is wrong with the body
BodyCheck = Callable[[str, Mapping[str, Any]], None]

_CHECKS: dict[str, list[BodyCheck]] = {}


@dataclass(frozen=True, slots=True)
class Refusal:
    """One refused entry of the domain log: where it is, what it claimed to be, and why it was refused."""

    position: str
    type: str
    aggregate_id: str
    aggregate_version: int
    reason: str


def register_body_check(type_name: str, check: BodyCheck) -> None:
    """Add a domain check for one event type (registering the same function twice keeps one)."""
    if type_name not in EVENT_TYPES:
        raise ValueError(f"no event type {type_name!r}")
    checks = _CHECKS.setdefault(type_name, [])
    if check not in checks:
        checks.append(check)


def body_problem(type_name: str, aggregate_id: str, body: Mapping[str, Any]) -> str | None:
    """Why the domain checks refuse this body, or None when they accept it (or none is registered)."""
    for check in _CHECKS.get(type_name, ()):
        try:
            check(aggregate_id, body)
        except ValueError as exc:  # (pydantic's ValidationError is a ValueError)
            return f"{type_name} body refused: {' '.join(str(exc).split())}"
    return None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def schema_problem(type_name: str, aggregate_id: str, aggregate_version: int, body: Mapping[str, Any]) -> str | None:
    """Why a (decoded, upcast) body does not fit its type's schema, or None. For readers that took the
    body without building the event (events.codec.EventBody); building an event checks this already."""
    cls = EVENT_TYPES.get(type_name)
    if cls is None:
        return f"unknown event type {type_name!r}"
    try:
        # the envelope was checked as the entry was read: given here, so that no default factory runs
        cls.__pydantic_validator__.validate_python(
            {"time": _EPOCH, "event_id": "", **body, "type": type_name, "aggregate_id": aggregate_id,
             "aggregate_version": aggregate_version})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(x) for x in first["loc"]) or "body"
        return f"malformed {type_name} entry ({exc.error_count()} error(s); {where}: {first['msg']})"
    return None


def version_problem(last: int, version: int) -> str | None:
    """Why ``version`` cannot follow ``last`` (the aggregate's last accepted version), or None."""
    if version == last + 1:
        return None
    if version <= last:
        what = "repeats" if version == last else "is older than"
        return f"aggregate version {version} {what} the current version {last}"
    return f"aggregate version {version} skips past {last + 1} (the current version is {last})"


class _Stored(Protocol):
    @property
    def position(self) -> str: ...

    @property
    def event(self) -> Event: ...


S = TypeVar("S", bound=_Stored)


class Refuse(Protocol):
    """Where a reader hands the entries it refused (the store's quarantine): one call per batch."""

    def __call__(self, *refusals: Refusal) -> object: ...


def in_sequence(history: Iterable[S], refuse: Refuse) -> list[S]:
    """One aggregate's decoded events from its first on (a history), without those that break its version
    sequence; each of those is refused."""
    out: list[S] = []
    last = 0
    for stored in history:
        event = stored.event
        reason = version_problem(last, event.aggregate_version)
        if reason is not None:
            refuse(Refusal(stored.position, event.type, event.aggregate_id, event.aggregate_version, reason))
            continue
        last = event.aggregate_version
        out.append(stored)
    return out


class SequenceGate:
    """The version check for a reader that follows the domain log from anywhere (a subscriber).

    It remembers the last version it accepted of each aggregate; for an aggregate it has not met yet it
    asks ``version_before`` (what the append script recorded before that position). An entry another
    reader quarantined is skipped too, so every reader leaves out the same entries."""

    def __init__(self, version_before: Callable[[str, str], int],
                 quarantined_among: Callable[[Sequence[str]], set[str]], refuse: Refuse) -> None:
        self._version_before = version_before
        self._quarantined_among = quarantined_among
        self._refuse = refuse
        self._last: dict[str, int] = {}

    def admit(self, batch: Sequence[S]) -> list[S]:
        """The entries of ``batch`` (decoded, in log order) that every reader accepts."""
        if not batch:
            return []
        skip = self._quarantined_among([s.position for s in batch])
        out: list[S] = []
        for stored in batch:
            if stored.position in skip:
                continue
            event = stored.event
            last = self._last.get(event.aggregate_id)
            if last is None:
                last = self._version_before(event.aggregate_id, stored.position)
            reason = version_problem(last, event.aggregate_version)
            if reason is not None:
                self._refuse(Refusal(stored.position, event.type, event.aggregate_id, event.aggregate_version,
                                     reason))
                self._last[event.aggregate_id] = last
                continue
            self._last[event.aggregate_id] = event.aggregate_version
            out.append(stored)
        return out
