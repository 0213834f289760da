"""Test servers on 127.0.0.1 for downloads: a file server with faults, a Hugging Face API and a
Civitai API. Each is a :class:`BackgroundServer`: start()/stop(), a context manager, ``.url``,
``.requests`` (what clients asked) and ``.bytes_sent`` (body bytes written)."""

from .base import BackgroundServer, LoggedRequest
from .civitai_server import CivitaiServer
from .file_server import Fault, FileServer
from .hf_server import HFServer

__all__ = ["BackgroundServer", "CivitaiServer", "Fault", "FileServer", "HFServer", "LoggedRequest"]
