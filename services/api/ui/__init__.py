"""The web page at ``/ui`` (``/`` redirects there): models, a model's page, install, jobs, workers, events.

Server-rendered Jinja2 templates (``templates/``) with a few plain ES modules and one stylesheet
(``static/``): no build step, nothing fetched from elsewhere. Each page has a *fragment* route under
``/ui/f/`` that renders its changing part; the page embeds that fragment when the API has no token, and
when it has one the page is an empty shell whose script asks for the token once and fetches the
fragment with it (so nothing but the shell is shown without the token). Every action is a call to the
JSON routes of ``/api/v2`` from the page's own origin: the guard refuses it from any other origin
(services/api/guard.py), and the page's Content-Security-Policy loads nothing from anywhere else.

``install_ui(app)`` adds it all; the routes are in :mod:`.pages`.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from modelbus.services.api.auth import require_token
from modelbus.services.api.ui.pages import STATIC_DIR, fragments, pages


def install_ui(app: FastAPI) -> None:
    app.include_router(pages)
    app.include_router(fragments, dependencies=[Depends(require_token)])
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui", status_code=307)


__all__ = ["install_ui"]
