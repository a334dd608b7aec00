"""The errors of the ``router`` package, under the project's root
(:class:`carbonrouter.errors.CarbonRouterError`).

RouterError
├── PriceError         (router.billing) no price for a region at a time
├── LedgerError        (router.ledger) the ledger file cannot be opened, migrated or written
├── AttributionError   (router.metering.attribution, also a ValueError) events out of order
├── JobError           (router.jobs) a job, file or batch cannot be stored
├── PlanError          (router.scheduler) no slot for a deferred job
├── SimulationError    (router.simulate)
├── NoCandidateError   (router.policy) no replica meets the request's constraints
├── RequestError       the client's request is wrong; ``param`` names the field
│   ├── PreferenceError (router.preference) a bad ``X-Carbon-Preference``
│   ├── BodyTooLarge   the body is over the size cap
│   └── UpstreamRefused the replica's server refused the request as invalid (its 4xx)
├── AuthError          no key, or an unknown one
├── PermissionDenied   the key may not do this (admin only)
├── NotFound           no such job, file, batch (or not the caller's), or model
├── Conflict           the request cannot be done in the current state (e.g. a redeploy)
├── BudgetExceeded     the tenant's budget would be crossed; ``reset_at`` says when it resets
├── CarbonUnavailable  no carbon intensity for a region, from any source
├── LoadUnavailable    a replica cannot say its load now (its routing figure is then estimated)
└── ReplicaFailed      a replica failed on its own account (5xx, refused, dropped, timed out)

These are domain errors: they say what went wrong, not which HTTP status it is.
:mod:`router.http.errors` maps each to an OpenAI-style error in one table.
"""

from __future__ import annotations

from datetime import datetime

from carbonrouter.errors import CarbonRouterError


class RouterError(CarbonRouterError):
    """Root of every error raised by :mod:`router`."""


class RequestError(RouterError):
    """The client's request is wrong; ``param`` names the field, ``code`` a stable reason."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class BodyTooLarge(RequestError):
    """The request body is over the size cap."""


class UpstreamRefused(RequestError):
    """The replica's server refused the request as invalid (an HTTP 4xx other than 429): the
    client's mistake, so no other replica is tried and none is cooled down."""


class AuthError(RouterError):
    """No API key, or an unknown one."""


class PermissionDenied(RouterError):
    """The caller's key may not do this."""


class NotFound(RouterError):
    """No such object, or not the caller's (the two are not told apart)."""


class ModelNotFound(NotFound):
    """The request names a model no replica serves."""

    code = "model_not_found"
    param = "model"


class Conflict(RouterError):
    """The request cannot be done in the service's current state; ``code`` says why."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class BudgetExceeded(RouterError):
    """The tenant's budget for its period would be crossed by this request."""

    def __init__(self, message: str, *, reset_at: datetime) -> None:
        super().__init__(message)
        self.reset_at = reset_at


class CarbonUnavailable(RouterError):
    """No carbon intensity for a region from its source, its cache or its forecast."""


class LoadUnavailable(RouterError):
    """A replica's load report could not be read: its endpoint is down, answers no load, or
    answers nonsense. Never a request's error: routing falls back to the ingress's own count
    of what it sent there, marked estimated."""

    def __init__(self, message: str, *, replica: str) -> None:
        super().__init__(f"replica {replica}: {message}")
        self.replica = replica


class LedgerBehind(RouterError):
    """The ledger did not take the bills answered so far in time: a read of it now would
    miss some of them."""


class ReplicaFailed(RouterError):
    """A replica failed on its own account: an HTTP 5xx or 429, a refused or dropped
    connection, a timeout, a dead actor. The replica is cooled down and, before the first byte
    reached the client, the request fails over to the next candidate."""

    def __init__(self, message: str, *, replica: str) -> None:
        super().__init__(f"replica {replica}: {message}")
        self.replica = replica
