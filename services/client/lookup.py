"""Finding a model by what a person types: its key, a unique prefix of its key, its name, or its hash.

    find(models, "3f2a")            the one model whose key is, or starts with, "3f2a"; else the one named so
    by_hash(models, "blake3:...")   every model with that content hash (forced copies share one)

A reference that fits several models is refused listing them (:class:`AmbiguousModelError`), never
resolved by a guess; one that fits none is the record service's UnknownModelException.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from modelbus.events.errors import Conflict
from modelbus.services.client.errors import ClientError, InvalidRequestError
from modelbus.services.records import ModelConfigBase, UnknownModelException

SHOWN_CANDIDATES = 10
_HEX = re.compile(r"^[0-9a-f]{8,128}$")


class AmbiguousModelError(ClientError, Conflict):
    """A key prefix or a name that more than one model has; the message lists them."""


def _listed(models: Sequence[ModelConfigBase]) -> str:
    shown = ", ".join(f"{m.key} ({m.name})" for m in models[:SHOWN_CANDIDATES])
    more = len(models) - SHOWN_CANDIDATES
    return shown + (f" and {more} more" if more > 0 else "")


def find(models: Sequence[ModelConfigBase], ref: str) -> ModelConfigBase:
    """The model ``ref`` names: an exact key first, then a unique key prefix, then a unique name."""
    ref = (ref or "").strip()
    if not ref:
        raise InvalidRequestError("name a model: its key, the start of its key, or its name")
    exact = [m for m in models if m.key == ref]
    if exact:
        return exact[0]
    prefixed = [m for m in models if m.key.startswith(ref)]
    if len(prefixed) == 1:
        return prefixed[0]
    if len(prefixed) > 1:
        raise AmbiguousModelError(f"{ref!r} starts the keys of {len(prefixed)} models: {_listed(prefixed)}; "
                                  "give more of the key")
    named = [m for m in models if m.name == ref]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise AmbiguousModelError(f"{len(named)} models are named {ref!r}: {_listed(named)}; use a key")
    raise UnknownModelException(f"no model has the key, a key starting with, or the name {ref!r}")


def normal_hash(text: str) -> str:
    """``blake3:<hex>`` (what records hold) from ``blake3:<hex>`` or bare hex; other algorithms refused."""
    algorithm, sep, digest = (text or "").strip().lower().rpartition(":")
    algorithm = algorithm if sep else "blake3"
    if algorithm != "blake3":
        raise InvalidRequestError(f"records hold BLAKE3 content hashes (blake3:<hex>); {algorithm!r} is not one")
    if not _HEX.match(digest):
        raise InvalidRequestError(f"not a BLAKE3 hash: {text[:140]!r} (expected blake3:<hex digits>)")
    return f"blake3:{digest}"


def by_hash(models: Sequence[ModelConfigBase], text: str) -> list[ModelConfigBase]:
    """Every model with this content hash (a forced second copy has the same one); none: UnknownModelException."""
    wanted = normal_hash(text)
    found = [m for m in models if (m.hash or "").lower() == wanted]
    if not found:
        raise UnknownModelException(f"no model has the hash {wanted}")
    return found
