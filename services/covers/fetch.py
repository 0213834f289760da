"""The first cover of a model installed from a source that shows one (Civitai's preview image): fetched
once the record exists, through the download client (private-address rule, proxy, the configured token
of the image's origin and no other), within the cover limits. A preview that cannot be had is a warning in the log, never a failed install."""

from __future__ import annotations

import time
from typing import Any

import httpx

from modelbus.events.errors import ModelbusError
from modelbus.events.logs import get_logger
from modelbus.events.store import RedisEventStore
from modelbus.services.covers.errors import CoverTooLarge
from modelbus.services.covers.images import make_thumbnail
from modelbus.services.covers.limits import MAX_COVER_BYTES
from modelbus.services.covers.storage import CoverStore
from modelbus.services.download.errors import RemoteError
from modelbus.services.download.network import download_client
from modelbus.services.download.security import credential_for
from modelbus.services.download.transport import open_stream
from modelbus.services.records import ModelConfigBase, ModelRecordServiceBase
from modelbus.services.records.extras import Cover

log = get_logger(__name__)
TIMEOUT = httpx.Timeout(15.0)


def fetch_image(config: Any, url: str) -> bytes:
    """The image's bytes, at most MAX_COVER_BYTES of them within ``config.cover_fetch_timeout`` seconds (a
    server that sends slowly cannot hold the worker that records the model)."""
    deadline = time.monotonic() + config.cover_fetch_timeout
    with download_client(allow_private=config.allow_private_downloads, proxy=config.download_proxy,
                         timeout=TIMEOUT, headers={"User-Agent": "modelbus-install/0.1"},
                         hf_endpoint=config.hf_endpoint) as client:
        # the configured token of the image's origin, as for a download (a gated repo's card image needs it)
        response = open_stream(client, url, headers={"Accept": "image/png, image/jpeg, image/webp"},
                               credential=credential_for(url, config), allow_private=config.allow_private_downloads)
        try:
            if response.status_code >= 400:
                raise RemoteError(f"{url} answered {response.status_code}")
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > MAX_COVER_BYTES:
                    raise CoverTooLarge(f"{url} is over the cover limit of {MAX_COVER_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise RemoteError(f"{url} took longer than {config.cover_fetch_timeout:g} s to send")
            return bytes(data)
        finally:
            response.close()


def first_cover(config: Any, records: ModelRecordServiceBase, record: ModelConfigBase) -> None:
    """Make the record's ``thumbnail_url`` its cover when it has none yet (best effort)."""
    url = record.thumbnail_url
    store = records.event_store
    if not url or record.cover is not None or not isinstance(store, RedisEventStore):
        return
    try:
        thumb = make_thumbnail(fetch_image(config, url), f"the preview image {url}")
        covers = CoverStore(store.client, store.keys, config.root)
        digest = covers.put(record.key, thumb.webp)
        cover = Cover(blake3=digest, width=thumb.width, height=thumb.height, bytes=len(thumb.webp), source=url[:2048])
        try:
            records.set_cover(record.key, cover, correlation_id=None)
        except BaseException:
            covers.drop(record.key, digest)
            raise
    except (ModelbusError, httpx.HTTPError, OSError) as exc:
        log.warning("cover_fetch_failed", key=record.key, url=url, error=str(exc))
