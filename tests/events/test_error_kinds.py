"""Every error modelbus defines is a ModelbusError of exactly one kind, and the HTTP status, the CLI's exit
code and the install steps' retry decision follow from that kind alone."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from modelbus.events.errors import KIND_CLASSES, Kind, ModelbusError, Unavailable
from modelbus.services.api.errors import STATUS, status_of
from modelbus.services.cli.errors import EXIT_CODES, exit_code
from modelbus.services.install.steps import RETRIED_KINDS, is_final

PACKAGES = ("modelbus.events", "modelbus.services", "modelbus.workers")


def _modules() -> list[str]:
    names = list(PACKAGES)
    for package in PACKAGES:
        path = importlib.import_module(package).__path__
        names += [m.name for m in pkgutil.walk_packages(path, prefix=f"{package}.")
                  if not m.name.endswith("__main__")]
    return names


def _defined_errors() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for name in _modules():
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == name:
                found[f"{name}.{obj.__qualname__}"] = obj
    return list(found.values())


ERRORS = _defined_errors()
LEAVES = [e for e in ERRORS if not any(o is not e and issubclass(o, e) for o in ERRORS)]


def _kinds(cls: type[BaseException]) -> set[Kind]:
    """The kinds a class declares among its own bases, else those its parents have (TooLarge is also
    InvalidInput: that counts once, as too large). A leaf may refine the kind of the error it extends
    (TokenRequiredError is a RemoteError, but forbidden rather than failed)."""
    own = {k.kind for k in KIND_CLASSES if k in cls.__bases__}
    kinds = own or {k.kind for k in KIND_CLASSES if issubclass(cls, k)}
    return kinds - {Kind.INVALID_INPUT} if Kind.TOO_LARGE in kinds else kinds


def test_the_walk_finds_every_family() -> None:
    names = {e.__name__ for e in ERRORS}
    assert {"EventStoreError", "RecordServiceError", "ProbeError", "LoadError", "InstallError", "DownloadError",
            "ClientError", "CliError", "RoutingError", "HashingError", "ConfigError"} <= names
    assert len(LEAVES) > 40


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_every_error_is_a_modelbus_error(cls: type[BaseException]) -> None:
    assert issubclass(cls, ModelbusError), f"{cls.__qualname__} is no ModelbusError"


@pytest.mark.parametrize("cls", LEAVES, ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_every_leaf_is_exactly_one_kind(cls: type[ModelbusError]) -> None:
    kinds = _kinds(cls)
    assert len(kinds) == 1, f"{cls.__qualname__} is of kinds {sorted(kinds)}"
    assert cls.kind == kinds.pop()


def _instance(cls: type[ModelbusError]) -> ModelbusError:
    return cls.__new__(cls)  # the decisions read the class's kind only, whatever its constructor needs


@pytest.mark.parametrize("cls", LEAVES, ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_status_exit_code_and_retry_follow_the_kind(cls: type[ModelbusError]) -> None:
    exc = _instance(cls)
    assert status_of(exc) == STATUS[cls.kind]
    assert exit_code(exc) == EXIT_CODES[cls.kind]
    assert is_final(exc, retries_left=3) is (cls.kind not in RETRIED_KINDS)


def test_the_tables_decide_by_kind() -> None:
    assert sorted(k.kind for k in KIND_CLASSES) == sorted(Kind)
    assert set(STATUS) == set(EXIT_CODES) == set(Kind)
    assert [STATUS[k] for k in (Kind.NOT_FOUND, Kind.CONFLICT, Kind.INVALID_INPUT, Kind.TOO_LARGE, Kind.FORBIDDEN,
                                Kind.UNAVAILABLE, Kind.TIMED_OUT, Kind.FAILED)] == [404, 409, 422, 413, 403, 503, 504, 502]
    assert [EXIT_CODES[k] for k in (Kind.FAILED, Kind.INVALID_INPUT, Kind.NOT_FOUND, Kind.CONFLICT, Kind.UNAVAILABLE,
                                    Kind.TIMED_OUT)] == [1, 2, 3, 4, 5, 6]
    assert RETRIED_KINDS == {Kind.UNAVAILABLE, Kind.TIMED_OUT}


def test_what_is_no_modelbus_error_is_a_bug_or_retried() -> None:
    assert status_of(RuntimeError("boom")) == 500
    assert exit_code(RuntimeError("boom")) == 1
    assert is_final(RuntimeError("boom"), retries_left=2) is False
    assert is_final(RuntimeError("boom"), retries_left=0) is True
    assert is_final(_instance(Unavailable), retries_left=0) is True
