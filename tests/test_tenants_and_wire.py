"""Keys, request bodies and budgets, and the HTTP errors they become."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import orjson
import pytest

from regions.config import Budget, Tenant
from router.errors import AuthError, BudgetExceeded, RequestError
from router.http.errors import error_response
from router.http.wire import parse_body
from router.service.tenants import Budgets, Tenants, period_end, period_start

KEY_HASH = hashlib.sha256(b"sk-a").hexdigest()
NOW = datetime(2026, 11, 26, 20, tzinfo=UTC)


def test_keys_map_to_tenants() -> None:
    t = Tenants(
        [Tenant(name="acme", api_key_sha256=[KEY_HASH])], env={"CARBON_ROUTER_ADMIN_KEY": "root"}
    )
    assert t.authenticate("Bearer sk-a").tenant == "acme"
    assert t.authenticate("Bearer root").admin
    for bad in (None, "sk-a", "Bearer sk-b", "Basic sk-a"):
        with pytest.raises(AuthError) as info:
            t.authenticate(bad)
        answer = error_response(info.value)
        assert answer.status_code == 401
        assert orjson.loads(answer.body)["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{", None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "m", "messages": []}', "messages"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
            "max_tokens",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
            "temperature",
        ),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [1]}', "stop"),
    ],
)
def test_bad_bodies_name_the_field(body: bytes, param: str | None) -> None:
    with pytest.raises(RequestError) as info:
        parse_body(body, chat=True)
    answer = error_response(info.value)
    assert answer.status_code == 400 and orjson.loads(answer.body)["error"]["param"] == param


def test_good_body() -> None:
    p = parse_body(b'{"model": "m", "prompt": "hi", "max_tokens": 5, "stream": true}', chat=False)
    assert p.stream and p.completion.prompt == "hi" and p.completion.max_tokens == 5


def test_budget_refuses_with_the_reset_time() -> None:
    b = Budgets([Tenant(name="acme", api_key_sha256=[KEY_HASH], budget=Budget(kwh=1e-3))])
    b.load("acme", 9e-4, 0.0, 0.0, NOW)
    b.check("acme", 5e-5, 0.0, 0.0, NOW)  # still under
    with pytest.raises(BudgetExceeded) as info:
        b.check("acme", 2e-4, 0.0, 0.0, NOW)
    answer = error_response(info.value)
    assert answer.status_code == 402
    assert "energy budget of tenant acme exceeded" in str(info.value)
    assert answer.headers["X-Budget-Reset"] == "2026-12-01T00:00:00+00:00"
    b.check("other", 1e9, 1e9, 1e9, NOW)  # no budget, no limit
    assert period_end(period_start(NOW, "day"), "day") == datetime(2026, 11, 27, tzinfo=UTC)
