"""Optional bearer-token auth: when ``MODELBUS_API_TOKEN`` (config ``api_token``) is set, every API route
but /healthz and /metrics needs ``Authorization: Bearer <token>``."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

bearer = HTTPBearer(auto_error=False, description="the value of MODELBUS_API_TOKEN")


def require_token(request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    expected: str | None = request.app.state.config.api_token
    if not expected:
        return
    given = credentials.credentials if credentials is not None else ""
    # constant-time comparison: the token must not leak through response timing
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer $MODELBUS_API_TOKEN)",
                            headers={"WWW-Authenticate": "Bearer"})
