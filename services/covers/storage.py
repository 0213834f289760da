"""Where covers live: the WebP bytes in Redis, one copy per host under ``$MODELBUS_ROOT/covers``.

The record holds the cover's BLAKE3 (services.records.extras.Cover); the bytes are a Redis string named
by the model's key and that hash (events.keys.Keys.cover), so every host of the fleet can serve a cover
whether or not it shares a disk with the one that set it. ``<root>/covers/<key>.webp`` is this host's
copy, written when a cover is set here and again when a read finds it missing or stale (its hash is not
the record's); files there are a cache that can be deleted at any time. Thumbnails are small (at most
512x512 WebP), so Redis holds tens of kilobytes per model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import blake3
import redis

from modelbus.events.errors import NotFound
from modelbus.events.keys import Keys
from modelbus.services.covers.limits import COVERS_DIR


class CoverMissing(NotFound):
    """The record names a cover whose bytes are gone (a Redis restored from an older backup...)."""


class CoverStore:
    def __init__(self, client: redis.Redis, keys: Keys, root: Path) -> None:
        self.client = client
        self.keys = keys
        self.folder = root / COVERS_DIR

    def path(self, model_key: str) -> Path:
        return self.folder / f"{model_key}.webp"

    def put(self, model_key: str, webp: bytes) -> str:
        """Store the bytes (before the record names them); returns their BLAKE3."""
        digest = blake3.blake3(webp).hexdigest()
        self.client.set(self.keys.cover(model_key, digest), webp)
        self._write_host_copy(model_key, webp)
        return digest

    def read(self, model_key: str, digest: str) -> bytes:
        path = self.path(model_key)
        try:
            data = path.read_bytes()
            if blake3.blake3(data).hexdigest() == digest:
                return data
        except OSError:
            pass
        found = self.client.get(self.keys.cover(model_key, digest))
        if found is None:
            raise CoverMissing(f"the cover of model {model_key} (blake3 {digest[:16]}...) is missing from Redis; "
                               "set it again")
        self._write_host_copy(model_key, bytes(found))
        return bytes(found)

    def drop(self, model_key: str, digest: str) -> None:
        """Forget bytes no record names any more (the host copy too, when it holds them)."""
        self.client.delete(self.keys.cover(model_key, digest))
        path = self.path(model_key)
        try:
            if blake3.blake3(path.read_bytes()).hexdigest() == digest:
                path.unlink()
        except OSError:
            pass

    def _write_host_copy(self, model_key: str, data: bytes) -> None:
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{model_key}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, self.path(model_key))
        except OSError:  # the host copy is a cache: Redis holds the cover
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
