"""Optional bearer-token auth: when ``MODELBUS_API_TOKEN`` (config ``api_token``) is set, every API route
but /healthz needs ``Authorization: Bearer <token>`` (/metrics and the API documents too, unless
``MODELBUS_API_PUBLIC_METRICS=1``: see guard.py)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

bearer = HTTPBearer(auto_error=False, description="the value of MODELBUS_API_TOKEN")

TOKEN_MESSAGE = "missing or wrong bearer token (Authorization: Bearer $MODELBUS_API_TOKEN)"


def token_matches(expected: str, given: str) -> bool:
    # constant-time comparison: the token must not leak through response timing
    return hmac.compare_digest(given.encode(), expected.encode())


def bearer_of(authorization: str | None) -> str:
    """The credentials of an ``Authorization: Bearer <token>`` header value, else ''."""
    scheme, _, credentials = (authorization or "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""


def require_token(request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    expected: str | None = request.app.state.config.api_token
    if not expected:
        return
    if not token_matches(expected, credentials.credentials if credentials is not None else ""):
        raise HTTPException(401, TOKEN_MESSAGE, headers={"WWW-Authenticate": "Bearer"})
