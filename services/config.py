"""Application configuration: environment (prefix ``MODELBUS_``) over ``$MODELBUS_ROOT/modelbus.yaml``.

Path settings (``models_dir``, ``db_path``, ``conf_path``) accept paths relative to ``root`` and hold
absolute ones once loaded, as InvokeAI's config does; ``root`` itself is made absolute. A bad value raises :class:`ConfigError` naming the
variable and the value, so a typo in the environment is reported instead of silently ignored.

The settings are read as pydantic-settings reads them (``MODELBUS_<FIELD>`` whatever its case; a
dict setting's value as JSON; keyword arguments over the environment over the file over the defaults,
dicts merged) by :func:`_sources`, a few lines instead of pydantic-settings itself, whose import cost
every ``modelbus`` command ~0.05 s of start-up (``tests/config/test_config.py`` compares the two).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modelbus.events.errors import InvalidInput
from modelbus.services.hfcache import read_token
from modelbus.services.store.errors import StoreConfigError
from modelbus.services.store.location import parse_store_url

ENV_PREFIX = "MODELBUS_"
CONFIG_FILE_NAME = "modelbus.yaml"

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
#: path settings given relative to ``root`` and read as absolute paths (``AppConfig._absolute_paths``)
_ROOT_RELATIVE = ("models_dir", "conf_path", "db_path", "cache_dir")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class ConfigError(InvalidInput, ValueError):
    """A configuration value could not be used; the message names the variable and the value."""


#: what httpx can speak to a proxy (SOCKS needs the ``socksio`` package: ``pip install httpx[socks]``)
PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)[^@/\s]*@")


def redact_url(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\g<head>***@", text)


def parse_size(value: float | str) -> int:
    """Parse a byte size such as ``32G``, ``512MiB``, ``1.5g`` or a plain integer."""
    if isinstance(value, bool):
        # ValueError, not TypeError: pydantic turns only ValueError raised in a validator into a field error
        raise ValueError(f"not a size: {value!r}")  # noqa: TRY004
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"size must not be negative: {value!r}")
        return int(value)
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"not a size (use e.g. 512M, 32G or a number of bytes): {value!r}")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "")[:1].lower()])


def parse_duration(value: float | str) -> float:
    """Seconds from a duration such as ``7d``, ``12h``, ``30m``, ``45s``, ``2w`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")  # noqa: TRY004 - (see parse_size)
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(f"not a duration (use e.g. 7d, 12h, 30m or a number of seconds): {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
    if seconds <= 0:
        raise ValueError(f"a duration must be more than 0: {value!r}")
    return seconds


def default_root() -> Path:
    env = os.environ.get(f"{ENV_PREFIX}ROOT")
    return Path(env).expanduser() if env else Path.home() / ".modelbus"


def _yaml_file() -> dict[str, Any]:
    """The settings of ``$MODELBUS_ROOT/modelbus.yaml`` when it exists; the environment wins over it."""
    path = default_root() / CONFIG_FILE_NAME
    if not path.is_file():
        return {}
    import yaml  # (only when there is a file: most commands start without one)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
    return loaded


#: the settings whose environment value is JSON (pydantic-settings' "complex" fields: the dict ones)
_JSON_SETTINGS = ("remote_api_tokens",)


def _environment(names: Iterable[str]) -> dict[str, Any]:
    """``MODELBUS_<NAME>`` of each setting that is set, its name matched whatever its case (a later
    spelling in the environment wins, as in pydantic-settings); a JSON setting's value decoded."""
    env = {k.lower(): v for k, v in os.environ.items()}
    found: dict[str, Any] = {}
    for name in names:
        value = env.get(f"{ENV_PREFIX}{name}".lower())
        if value is None:
            continue
        if name in _JSON_SETTINGS:
            import json
            try:
                value = json.loads(value)
            except ValueError:  # (the value is not shown: it holds tokens)
                raise ConfigError(f"invalid configuration: {ENV_PREFIX}{name.upper()}: not valid JSON "
                                  "(expected an object of URL regex -> token)") from None
        if value is not None:  # (JSON null: unset)
            found[name] = value
    return found


def _merged(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    """``high`` over ``low``; where both hold a dict, the two dicts merged the same way."""
    out = dict(low)
    for key, value in high.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _sources(fields: Iterable[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """The values of a configuration: keyword arguments over the environment over modelbus.yaml (only
    its settings, not its other keys); the defaults fill in the rest."""
    names = tuple(fields)
    file = {k: v for k, v in _yaml_file().items() if k in names}
    return _merged(_merged(file, _environment(names)), overrides)


class AppConfig(BaseModel):
    """Everything modelbus reads from its environment. See README "Configuration"."""

    model_config = ConfigDict(extra="ignore", validate_default=True)

    def __init__(self, **overrides: Any) -> None:
        super().__init__(**_sources(type(self).model_fields, overrides))

    root: Path = Field(default_factory=default_root, description="root directory of models, databases, redis data")
    models_dir: Path = Field(default=Path("models"), description="where installed models live")
    redis_url: str | None = Field(default=None, description="Redis URL; unset = start an embedded Redis")
    namespace: str = Field(default="modelbus", description="prefix of every Redis key and queue")
    model_config_db: str | None = Field(default="auto", description="'auto', a .db/.yaml path, or None")
    conf_path: Path = Field(default=Path("configs/models.yaml"), description="legacy models.yaml")
    db_path: Path = Field(default=Path("databases/modelbus.db"), description="SQLite database")
    ram_cache_size: int = Field(default=8 << 30, description="RAM model cache size in bytes (accepts 8G)")
    vram_cache_size: int = Field(default=16 << 30, description="VRAM model cache size in bytes (accepts 16G)")
    cache_keep_alive: float = Field(default=0.0, description="seconds an idle model stays cached; 0 = forever")
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    precision: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    fp8_storage: Literal["auto", "on", "off"] = Field(
        default="auto", description="keep fp8 files' weights in fp8 in memory, upcast layer by layer in the forward "
        "pass: 'on', 'off', or 'auto' (on CUDA devices with fp8 support, compute capability 8.9 and later)")
    gguf_dequantize: bool = Field(
        default=False, description="dequantize GGUF transformers' weights once, as they load, to the inference "
        "precision: the forward pass of an unquantized model for its memory (Q8_0 at bf16: about 1.9x the file)")
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"
    allow_private_downloads: bool = Field(default=False, description="allow URLs to loopback/private hosts")
    staging_ttl: float = Field(default=7 * 86400, description="age (7d, 12h... or seconds) after which `prune` "
                               "reclaims a staging folder no running job uses (a worker killed mid-install)")
    download_proxy: str | None = Field(
        default=None, repr=False, description="proxy for every download and metadata call (http, https, socks5 URL; "
        "credentials allowed); unset = direct. The environment's HTTP_PROXY & co. are never used")
    download_threads: int = Field(default=5, ge=1, le=64)
    download_parts: int = Field(default=4, ge=1, le=64, description="parallel ranges for one large file")
    download_retries: int = Field(default=5, ge=0, le=50)
    download_stall_timeout: float = Field(default=30.0, gt=0)
    cover_fetch_timeout: float = Field(default=60.0, gt=0, le=3600, description="seconds an install may spend on "
                                       "its source's preview image, all of it (then: no cover, a warning)")
    download_concurrency: int = Field(default=4, ge=1, le=64, description="downloads one download-only worker "
                                      "process runs at once (its RQ worker slots; --concurrency overrides)")
    hash_threads: int = Field(default=max(1, min(8, os.cpu_count() or 1)), ge=1, le=256)
    hf_endpoint: str = Field(default_factory=lambda: os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    civitai_api: str = Field(default="https://civitai.com")
    hf_token: str | None = Field(default_factory=lambda: os.environ.get("HF_TOKEN") or read_token())  # or the login's
    civitai_token: str | None = Field(default_factory=lambda: os.environ.get("CIVITAI_TOKEN"))
    remote_api_tokens: dict[str, str] = Field(default_factory=dict, description="URL regex -> token")
    import_roots: str | None = Field(
        default=None, description="folders local installs through the API or the queue may read from, separated "
        "by ':' (unset: the models directory and $MODELBUS_ROOT/import)")
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=9090, ge=0, le=65535)
    api_workers: int = Field(default_factory=lambda: max(1, min(8, (os.cpu_count() or 1) // 2)), ge=1, le=64,
                             description="API processes `modelbus up` serves on its one socket (default: half "
                             "the cores, 1 to 8)")
    api_token: str | None = None
    api_allowed_hosts: tuple[str, ...] = Field(
        default=(), description="host names the API answers besides its bound address, localhost, 127.0.0.1 "
        "and [::1] (comma-separated; '*' turns the Host check off)")
    api_public_metrics: bool = Field(default=False, description="with a token set, /metrics and the API docs "
                                     "still need no token")
    # limits before work (services/api/limits.py)
    api_max_body: int = Field(default=1 << 20, description="largest request body in bytes (accepts 1M); over: 413")
    api_max_requests: int = Field(default=64, ge=1, description="requests served at once (event streams apart)")
    api_queue_wait: float = Field(default=1.0, ge=0, description="s a request over the limit waits; then 503")
    api_body_timeout: float = Field(default=30.0, gt=0, description="s a request's body may pause; then 408")
    api_max_streams_per_client: int = Field(default=8, ge=1, description="event streams per client address; "
                                            "over: 429")
    durability: Literal["fast", "fsync", "replicated"] = "fast"
    replicas: int = Field(default=1, ge=0)
    activity_maxlen: int = Field(default=100_000, ge=1000)
    store_url: str = Field(default="shared", description="where every model's canonical copy lives: 'shared' "
                           "(the models directory) or s3://bucket/prefix (see README 'Model store')")
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (MinIO, R2...); unset = AWS")
    store_retries: int = Field(default=5, ge=1, le=50, description="attempts of one store request")
    cache_dir: Path = Field(default=Path("cache"), description="this host's cache of store blobs")
    cache_size: int = Field(default=100 << 30, description="size limit of the host cache in bytes (accepts 500G)")
    cpu_recycle_mb: float = Field(default=4096, ge=0, description="MiB of freed CPU-load buffers a process keeps "
                                  "for its next CPU loads (0: none; see services/load/host_memory.py)")
    cpu_recycle_idle_s: float = Field(default=60.0, ge=0, description="s a kept CPU-load buffer may go unused "
                                      "before it is given back to the OS")
    records_read_tracking: bool = Field(
        default=True, description="record reads learn of appends from Redis client-side tracking instead of a "
        "round trip per read (false: one round trip per read)")

    @model_validator(mode="after")
    def _absolute_paths(self) -> AppConfig:
        # InvokeAI's rule: the settings may be relative (to the root), what a program reads is absolute,
        # so ``sqlite3.connect(config.db_path)`` opens the same file from any working directory
        self.root = self.root.expanduser().absolute()
        for name in _ROOT_RELATIVE:
            setattr(self, name, self.resolve(getattr(self, name)))
        return self

    @field_validator("ram_cache_size", "vram_cache_size", "api_max_body", "cache_size", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> int:
        return parse_size(value)

    @field_validator("staging_ttl", mode="before")
    @classmethod
    def _durations(cls, value: Any) -> float:
        return parse_duration(value)

    @field_validator("api_allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else list(value or ())
        return tuple(str(item).strip().lower() for item in items if str(item).strip())

    @field_validator("store_url")
    @classmethod
    def _store_url(cls, value: str) -> str:
        try:
            return parse_store_url(value).url
        except StoreConfigError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("s3_endpoint_url", mode="before")
    @classmethod
    def _endpoint(cls, value: Any) -> str | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not re.match(r"^https?://[^/\s]+", str(value)):
            raise ValueError("must be an http:// or https:// URL")
        return str(value).rstrip("/")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        # braces would break the {ns} hash tag; ':' and spaces would make ambiguous keys
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", value):
            raise ValueError("namespace may hold letters, digits, '_', '.', '-' (1-64 characters)")
        return value

    @field_validator("model_config_db", mode="before")
    @classmethod
    def _model_config_db(cls, value: Any) -> str | None:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        return str(value)

    @field_validator("download_proxy", mode="before")
    @classmethod
    def _download_proxy(cls, value: Any) -> str | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        text = str(value).strip()
        scheme, sep, rest = text.partition("://")
        if not sep or scheme.lower() not in PROXY_SCHEMES:
            raise ValueError(f"must be a URL starting with {', '.join(s + '://' for s in PROXY_SCHEMES)}")
        host = rest.split("/", 1)[0].rpartition("@")[2]
        if not host or host.startswith(":") or any(c.isspace() for c in text):
            raise ValueError("must name the proxy's host (scheme://[user:password@]host[:port])")
        return text

    @field_validator("redis_url", mode="before")
    @classmethod
    def _redis_url(cls, value: Any) -> str | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not re.match(r"^(redis|rediss|unix|redis\+sentinel|rediss\+sentinel)://", str(value)):
            raise ValueError("must start with redis://, rediss://, unix:// or redis+sentinel://")
        return str(value)

    @classmethod
    def load(cls, **overrides: Any) -> AppConfig:
        """Build the configuration, translating validation errors into one readable ConfigError."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from exc

    @classmethod
    def get_config(cls, **overrides: Any) -> AppConfig:
        """The spec's spelling of :meth:`load`. As InvokeAI's ``db_path`` does, it makes the database's folder,
        so the spec's ``sqlite3.connect(config.db_path.as_posix())`` opens a file there; ``load`` itself creates
        nothing (a read-only root is no config error)."""
        config = cls.load(**overrides)
        with contextlib.suppress(OSError):
            config.db_path.parent.mkdir(parents=True, exist_ok=True)
        return config

    def resolve(self, path: str | Path) -> Path:
        """Resolve a path the way the spec says: relative paths are taken against ``root``."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.root / p

    @property
    def secret_values(self) -> tuple[str, ...]:
        """Every configured secret (API token, HF/Civitai tokens, remote API tokens): never logged."""
        found = (self.api_token, self.hf_token, self.civitai_token, *self.remote_api_tokens.values())
        return tuple(s for s in found if s)

    @property
    def models_path(self) -> Path:
        return self.resolve(self.models_dir)

    @property
    def cache_path(self) -> Path:
        return self.resolve(self.cache_dir)

    @property
    def db_file(self) -> Path:
        return self.resolve(self.db_path)

    @property
    def conf_file(self) -> Path:
        return self.resolve(self.conf_path)

    def model_path(self, path: str | Path) -> Path:
        """A record's path as an absolute location: relative ones live under ``models_dir``."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.models_path / p


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        name = ".".join(str(x) for x in err["loc"]) or "?"
        var = f"{ENV_PREFIX}{name.upper()}"
        value = err.get("input")
        shown = redact_url(value) if isinstance(value, str) else value  # a URL's password stays out
        parts.append(f"{var}={shown!r}: {err['msg']}")
    return "invalid configuration: " + "; ".join(parts)
