"""Annotated dependencies shared by the routers."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

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


def require_api_key(
    settings: SettingsDep, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    if not settings.api_keys:
        return
    given = creds.credentials.encode() if creds is not None else b""
    # compare against every key (constant time per key) so timing does not reveal which prefix matched
    if not any([secrets.compare_digest(given, k.encode()) for k in settings.api_keys]):
        raise ApiError(
            401,
            "unauthorized",
            "missing or invalid API key (Authorization: Bearer <key>)",
            {"WWW-Authenticate": "Bearer"},
        )
