"""Domain errors to OpenAI-style HTTP errors, in one table.

Every error the project raises on purpose is a :class:`carbonrouter.errors.CarbonRouterError`;
the first row whose class is in the error's MRO gives its status, ``type`` and ``code``. An
error no row names is a bug: a 500 whose body says nothing of the internals (the trace goes
to the log).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from starlette.responses import Response

from carbonrouter.errors import CarbonRouterError
from regions.config import ConfigError
from router.errors import (
    AuthError,
    BodyTooLarge,
    BudgetExceeded,
    CarbonUnavailable,
    Conflict,
    LedgerBehind,
    NotFound,
    PermissionDenied,
    ReplicaFailed,
    RequestError,
    UpstreamRefused,
)
from router.policy import AtCapacity, NoCandidateError

log = logging.getLogger(__name__)

# error class -> (HTTP status, OpenAI error type, default code)
TABLE: list[tuple[type[BaseException], int, str, str | None]] = [
    (BodyTooLarge, 413, "invalid_request_error", "body_too_large"),
    (UpstreamRefused, 400, "invalid_request_error", "upstream_refused"),
    (RequestError, 400, "invalid_request_error", None),
    (ConfigError, 400, "invalid_request_error", "invalid_config"),
    (AuthError, 401, "authentication_error", "invalid_api_key"),
    (BudgetExceeded, 402, "insufficient_quota", "budget_exceeded"),
    (PermissionDenied, 403, "permission_error", None),
    (NotFound, 404, "invalid_request_error", "not_found"),
    (Conflict, 409, "invalid_request_error", None),
    (AtCapacity, 429, "rate_limit_error", "at_capacity"),
    (NoCandidateError, 503, "server_error", "no_replica"),
    (CarbonUnavailable, 503, "server_error", "carbon_unavailable"),
    (ReplicaFailed, 503, "server_error", "replica_failed"),
    (LedgerBehind, 503, "server_error", "ledger_behind"),
]


class JSONResponse(Response):
    """JSON by orjson: Starlette's ``json.dumps`` was ~4 % of the ingress's CPU per request."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_status(e: BaseException) -> tuple[int, str]:
    """``e``'s HTTP status and OpenAI error code (its type where it has none), as
    :func:`error_parts` answers it; for metrics and traces (nothing is logged)."""
    row = next((r for r in TABLE if isinstance(e, r[0])), None)
    if row is None:
        return 500, "server_error"
    _, status, type_, code = row
    return status, getattr(e, "code", None) or code or type_


def error_parts(e: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``e`` as (HTTP status, OpenAI error body, headers)."""
    row = next((r for r in TABLE if isinstance(e, r[0])), None)
    if row is None:
        if not isinstance(e, CarbonRouterError):
            log.error("unexpected error on the request path", exc_info=e)
        else:
            log.error("an error the table does not name: %r", e, exc_info=e)
        return 500, error_body("internal error", "server_error"), {}
    _, status, type_, code = row
    param = getattr(e, "param", None)
    code = getattr(e, "code", None) or code
    headers: dict[str, str] = {}
    if isinstance(e, BudgetExceeded):
        headers["X-Budget-Reset"] = e.reset_at.isoformat()
    if isinstance(e, AtCapacity):
        headers["Retry-After"] = str(math.ceil(e.retry_after_s))
    return status, error_body(str(e), type_, param=param, code=code), headers


def error_response(e: BaseException) -> JSONResponse:
    """The OpenAI-style answer to ``e``."""
    status, body, headers = error_parts(e)
    return JSONResponse(body, status_code=status, headers=headers)
