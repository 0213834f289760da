"""The page routes (``/ui...``, open: a shell at most, see the package docstring) and their fragments
(``/ui/f/...``, behind the token like every API route)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from modelbus.events.errors import ModelbusError
from modelbus.services.api.errors import status_of
from modelbus.services.api.ui import history
from modelbus.services.client import InvalidRequestError, ModelBusClient
from modelbus.services.records import BaseModelType, ModelType
from modelbus.services.records.enums import ModelFormat
from modelbus.services.records.projection import ORDER_FIELDS

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
PAGE_SIZE = 50  # rows of the models table per page
PAGE_SIZE_MAX = 200
JOBS_SHOWN = 200  # the most recent install jobs on the jobs page
ORDERS = tuple(ORDER_FIELDS)  # name, type, base, format, size, added, modified
FEED_TYPES = "model_load_started,model_load_completed,model_load_failed,cache_evicted"
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
NAV = (("models", "/ui", "Models"), ("install", "/ui/install", "Install"), ("jobs", "/ui/jobs", "Jobs"),
       ("workers", "/ui/workers", "Workers"), ("events", "/ui/events", "Events"))


@dataclass(frozen=True)
class JobAction:
    """A button of a job's row: ``method`` on ``url`` (``{id}`` is the job id) while its state is one of
    ``states``."""

    name: str
    label: str
    method: str
    url: str
    states: frozenset[str]


ACTIVE = frozenset({"waiting", "downloading", "downloads_done", "running", "hashing", "paused"})
JOB_ACTIONS: list[JobAction] = [
    JobAction("pause", "Pause", "POST", "/api/v2/models/install/{id}/pause", frozenset({"waiting", "downloading"})),
    JobAction("resume", "Resume", "POST", "/api/v2/models/install/{id}/resume", frozenset({"paused"})),
    JobAction("restart", "Restart", "POST", "/api/v2/models/install/{id}/restart", frozenset({"error", "cancelled"})),
    JobAction("cancel", "Cancel", "DELETE", "/api/v2/models/install/{id}", ACTIVE),
]


def _version(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


_env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                   trim_blocks=True, lstrip_blocks=True)
_env.globals["show"] = history.show
_env.globals["human_bytes"] = lambda n: _human_bytes(n)  # defined below
_versions = {p.name: _version(p) for p in STATIC_DIR.iterdir() if p.is_file()}
_env.globals["static"] = lambda name: f"/ui/static/{name}?v={_versions.get(name, '0')}"

pages = APIRouter(prefix="/ui", include_in_schema=False)
fragments = APIRouter(prefix="/ui/f", include_in_schema=False)


def _human_bytes(n: Any) -> str:
    """Bytes for people, as the page's script shows them too (KB = 1024 B)."""
    if not isinstance(n, int | float) or n < 0:
        return "—"
    units = ("B", "KB", "MB", "GB", "TB")
    step = 0
    while n >= 1024 and step < len(units) - 1:
        n, step = n / 1024, step + 1
    return f"{n:.1f} {units[step]}" if step else f"{int(n)} B"


def _client(request: Request) -> ModelBusClient:
    return request.app.state.client  # type: ignore[no-any-return]


def _render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(_env.get_template(name).render(**context), status_code=status, headers=HEADERS)


COVER_URL = "/api/v2/models/i/{key}/cover"  # services.api.routes.modeldata; shown for records with a cover


def _cover_url(request: Request) -> str | None:
    """The URL template of a model's cover (``{key}`` in it); the templates ask for it only for a record
    whose ``cover`` is set, so a model without one costs no request."""
    return COVER_URL


def _guarded(view: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """A view's context, or an error to show where the view would be (and its HTTP status)."""
    try:
        return view(), 200
    except ModelbusError as exc:
        return {"error": str(exc), "error_type": type(exc).__name__}, status_of(exc)


def _page(request: Request, page: str, template: str, fragment: str, view: Callable[[], dict[str, Any]],
          **extra: Any) -> HTMLResponse:
    """A page: with a token configured, the shell (its script loads ``fragment`` with the token)."""
    token = bool(request.app.state.config.api_token)
    context: dict[str, Any] = {}
    status = 200
    if not token:
        context, status = _guarded(view)
    query = str(request.url.query)
    return _render(template, status=status, page=page, nav=NAV, token_required=token, embedded=not token,
                   fragment_url=fragment + (f"?{query}" if query else ""), since=_since(request), **extra, **context)


def _since(request: Request) -> str:
    """Where the page's event stream starts: the heads of both streams as the page was rendered, so an
    event appended between the render and the stream's first read is not missed ("$" would be resolved
    only at that read). A position is no secret: the shell of a token-protected API carries it too."""
    try:
        store = _client(request).store
        return f"{store.head('events')},{store.head('activity')}"
    except ModelbusError:
        return "$"  # Redis away: the page says so where its data would be


# --- models ---------------------------------------------------------------------------------------

def _int(raw: str | None, default: int, low: int, high: int, field: str) -> int:
    if raw in (None, ""):
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise InvalidRequestError(f"invalid {field}: {raw[:40]!r} (a whole number {low}..{high})")
    return int(raw)


def _models_view(request: Request) -> dict[str, Any]:
    q = request.query_params
    c = _client(request)
    filters = {key: q.get(key) or "" for key in ("name", "type", "base", "format")}
    filters |= {"order_by": q.get("order_by") or "name", "direction": q.get("direction") or "asc"}
    offset = _int(q.get("offset"), 0, 0, 2**31, "offset")
    limit = _int(q.get("limit"), PAGE_SIZE, 1, PAGE_SIZE_MAX, "limit")
    if filters["order_by"] not in ORDERS or filters["direction"] not in ("asc", "desc"):
        raise InvalidRequestError(f"invalid order: {filters['order_by'][:20]!r} {filters['direction'][:20]!r} "
                                  f"(by {', '.join(ORDERS)}; asc or desc)")
    total, found = c.list_models_page(contains=filters["name"] or None, base=filters["base"] or None,
                                      type=filters["type"] or None, format=filters["format"] or None,
                                      offset=offset, limit=limit, order_by=filters["order_by"],
                                      direction=filters["direction"])
    loaded: dict[str, list[str]] = {}
    for worker in c.workers():
        for held in worker.models:
            loaded.setdefault(held.model_key, [])
            if worker.id not in loaded[held.model_key]:
                loaded[held.model_key].append(worker.id)
    listing = c.listing([m.key for m in found])
    return {"models": [m.model_dump(mode="json") for m in found], "total": total, "offset": offset,
            "sizes": {k: v.size for k, v in listing.items()},
            "limit": limit, "filters": filters, "loaded": loaded, "cover": _cover_url(request)}


def _choices() -> dict[str, list[str]]:
    return {"types": [t.value for t in ModelType], "bases": [b.value for b in BaseModelType],
            "formats": [f.value for f in ModelFormat], "orders": list(ORDERS)}


@pages.get("")
def models_page(request: Request) -> HTMLResponse:
    q = request.query_params
    filters = {key: q.get(key, "") for key in ("name", "type", "base", "format")}
    filters |= {"order_by": q.get("order_by", "name"), "direction": q.get("direction", "asc")}
    return _page(request, "models", "models.html", "/ui/f/models", lambda: _models_view(request),
                 choices=_choices(), form=filters, deleted=q.get("deleted", "")[:256])


@fragments.get("/models")
def models_fragment(request: Request) -> HTMLResponse:
    context, status = _guarded(lambda: _models_view(request))
    return _render("_models.html", status=status, **context)


# --- one model ------------------------------------------------------------------------------------

def _model_view(request: Request, key: str) -> dict[str, Any]:
    c = _client(request)
    record = c.get_model(key).model_dump(mode="json")
    steps = history.fold([{"position": s.position, "type": s.event.type, "event": s.event.model_dump(mode="json")}
                          for s in c.history(key)])
    files = steps[-1].files if steps else ()
    holders = [{"worker": w.id, "device": w.device, "locked": m.locked, "submodel": m.submodel, "tier": m.tier}
               for w in c.workers() for m in w.models if m.model_key == key]
    # a field holding an object (settings...) is shown, not edited here: `modelbus update` takes it
    editable = [f for f, v in record.items() if f not in history.READ_ONLY and not isinstance(v, dict)]
    return {"record": record, "steps": list(reversed(steps)), "files": files, "holders": holders,
            "editable": editable, "choices": _choices(), "cover": _cover_url(request),
            "total_size": sum(int(f.get("size", 0)) for f in files)}


def _key_ok(key: str) -> bool:
    return 0 < len(key) <= 256 and all(ch.isalnum() or ch in "_.:-" for ch in key)


@pages.get("/models/{key}")
def model_page(request: Request, key: str) -> HTMLResponse:
    view = (lambda: _model_view(request, key)) if _key_ok(key) else _bad_key(key)
    return _page(request, "model", "model.html", f"/ui/f/models/{key}", view, key=key)


@fragments.get("/models/{key}")
def model_fragment(request: Request, key: str) -> HTMLResponse:
    view = (lambda: _model_view(request, key)) if _key_ok(key) else _bad_key(key)
    context, status = _guarded(view)
    return _render("_model.html", status=status, key=key, **context)


def _bad_key(key: str) -> Callable[[], dict[str, Any]]:
    def view() -> dict[str, Any]:
        raise InvalidRequestError(f"not a model key: {key[:80]!r}")
    return view


@fragments.get("/models/{key}/at/{position}")
def model_at_fragment(request: Request, key: str, position: str) -> HTMLResponse:
    def view() -> dict[str, Any]:
        if not _key_ok(key):
            raise InvalidRequestError(f"not a model key: {key[:80]!r}")
        c = _client(request)
        steps = history.fold([{"position": s.position, "type": s.event.type,
                               "event": s.event.model_dump(mode="json")} for s in c.history(key)])
        step = history.at(steps, position)
        if step is None:
            raise InvalidRequestError(f"model {key} has no event at {position[:40]!r}")
        return {"step": step}
    context, status = _guarded(view)
    return _render("_record_at.html", status=status, **context)


# --- install, jobs, workers, events ---------------------------------------------------------------

@pages.get("/install")
def install_page(request: Request) -> HTMLResponse:
    return _page(request, "install", "install.html", "", dict)


def _jobs_view(request: Request) -> dict[str, Any]:
    found = [j.model_dump(mode="json") for j in _client(request).jobs()]
    jobs = sorted(found, key=lambda j: j.get("updated_at") or j.get("created_at") or "", reverse=True)
    return {"jobs": jobs[:JOBS_SHOWN], "more": max(0, len(jobs) - JOBS_SHOWN), "actions": JOB_ACTIONS}


@pages.get("/jobs")
def jobs_page(request: Request) -> HTMLResponse:
    return _page(request, "jobs", "jobs.html", "/ui/f/jobs", lambda: _jobs_view(request))


@fragments.get("/jobs")
def jobs_fragment(request: Request) -> HTMLResponse:
    context, status = _guarded(lambda: _jobs_view(request))
    return _render("_jobs.html", status=status, **context)


def _workers_view(request: Request) -> dict[str, Any]:
    hosts: dict[str, list[dict[str, Any]]] = {}
    for worker in _client(request).workers():
        hosts.setdefault(worker.host or "?", []).append(worker.model_dump(mode="json"))
    return {"hosts": sorted(hosts.items())}


@pages.get("/workers")
def workers_page(request: Request) -> HTMLResponse:
    return _page(request, "workers", "workers.html", "/ui/f/workers", lambda: _workers_view(request),
                 feed_types=FEED_TYPES)


@fragments.get("/workers")
def workers_fragment(request: Request) -> HTMLResponse:
    context, status = _guarded(lambda: _workers_view(request))
    return _render("_workers.html", status=status, **context)


@pages.get("/events")
def events_page(request: Request) -> HTMLResponse:
    return _page(request, "events", "events.html", "", dict, types=request.query_params.get("types", ""))
