"""Annotated dependencies shared by the routers."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from .errors import ApiError
from .runtime import Runtime
from .service import GenerationService
from .settings import Settings


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_settings(rt: RuntimeDep) -> Settings:
    return rt.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_service(rt: RuntimeDep) -> GenerationService:
    return GenerationService(rt)


ServiceDep = Annotated[GenerationService, Depends(get_service)]

# auto_error=False: a missing or malformed header is our 401 with the API's error body
_bearer = HTTPBearer(auto_error=False, description="One of the keys in ADSA_API_KEYS (when set)")


def api_key_error(keys: list[str], token: str | None) -> ApiError | None:
    """The 401 for a request whose bearer token is not one of `keys` (None: no keys configured, or a match)."""
    if not keys:
        return None
    given = (token or "").encode()
    # compare against every key (constant time per key) so timing does not reveal which prefix matched
    if any([secrets.compare_digest(given, k.encode()) for k in keys]):
        return None
    return ApiError(
        401, "unauthorized", "missing or invalid API key (Authorization: Bearer <key>)", {"WWW-Authenticate": "Bearer"}
    )


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, as HTTPBearer reads it."""
    scheme, token = get_authorization_scheme_param(authorization)
    return token if scheme.lower() == "bearer" and token else None


def require_api_key(
    settings: SettingsDep, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    if (err := api_key_error(settings.api_keys, creds.credentials if creds is not None else None)) is not None:
        raise err
