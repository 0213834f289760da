"""Optional bearer-token auth: when ``MODELBUS_API_TOKEN`` (config ``api_token``) is set, every API route
but /healthz needs ``Authorization: Bearer <token>`` (/metrics and the API documents too, unless
``MODELBUS_API_PUBLIC_METRICS=1``: see guard.py).

The route dependency below checks it after routing; :mod:`services.api.limits` checks the same token
before a request's body is read, with the same comparison."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

bearer = HTTPBearer(auto_error=False, description="the value of MODELBUS_API_TOKEN")
UNAUTHORIZED = "missing or wrong bearer token (Authorization: Bearer $MODELBUS_API_TOKEN)"


def token_matches(expected: str | None, given: str) -> bool:
    """Whether ``given`` is the configured token (always true when none is configured)."""
    if not expected:
        return True
    # constant-time comparison: the token must not leak through response timing
    return hmac.compare_digest(given.encode(), expected.encode())


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header ('' for anything else)."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""



def require_token(request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    given = credentials.credentials if credentials is not None else ""
    if not token_matches(request.app.state.config.api_token, given):
        raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
