"""The service behind a request, and its caller: one dependency every endpoint shares."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from router.service.app import RouterService
from router.service.tenants import Caller


def service_of(request: Request) -> RouterService:
    svc: RouterService = request.app.state.service
    return svc


async def authenticated(request: Request) -> Caller:
    return service_of(request).authenticate(request.headers.get("authorization"))


Auth = Annotated[Caller, Depends(authenticated)]
