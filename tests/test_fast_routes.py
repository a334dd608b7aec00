"""The ingress's pure-ASGI front, in front of the whole FastAPI app: what it takes, what it
leaves to FastAPI, and how a bug behind it reaches the client (an OpenAI-style 500)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson

from router.http.app import FastRoutes, _Api
from router.http.errors import JSONResponse
from router.http.wire import EventStream


class Handler:
    """Stands in for ``answer_completion``: records what FastRoutes hands it."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.seen: list[tuple[bytes, bool]] = []

    async def __call__(self, svc: Any, raw: bytes, headers: Any, *, chat: bool) -> JSONResponse:
        self.seen.append((raw, chat))
        if self.fail:
            raise RuntimeError("a bug")
        return JSONResponse({"ok": True, "value": 0.5})


async def call(front: Any, method: str, path: str, body: bytes) -> dict[str, Any]:
    app = SimpleNamespace(state=SimpleNamespace(service=object()))
    scope = {"type": "http", "method": method, "path": path, "headers": [], "app": app}
    parts = [{"type": "http.request", "body": body[:3], "more_body": True},
             {"type": "http.request", "body": body[3:], "more_body": False}]  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return parts.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await front(scope, receive, send)
    start = sent[0]
    return {
        "status": start["status"],
        "body": b"".join(m.get("body", b"") for m in sent[1:]),
    }


async def test_completions_go_to_the_service_and_the_rest_to_the_app() -> None:
    passed: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        passed.append(scope["path"])
        await JSONResponse({"app": True})(scope, receive, send)

    handler = Handler()
    front = FastRoutes(app, handler)
    out = await call(front, "POST", "/v1/chat/completions", b'{"a": 1}')
    assert out["status"] == 200 and orjson.loads(out["body"]) == {"ok": True, "value": 0.5}
    assert handler.seen == [(b'{"a": 1}', True)]  # the body whole, from its two parts
    await call(front, "POST", "/v1/completions", b"{}")
    assert handler.seen[-1] == (b"{}", False)
    await call(front, "GET", "/v1/chat/completions", b"")
    await call(front, "GET", "/v1/models", b"")
    assert passed == ["/v1/chat/completions", "/v1/models"]


async def test_a_bug_behind_it_is_an_openai_style_500() -> None:
    out = await call(FastRoutes(None, Handler(fail=True)), "POST", "/v1/completions", b"{}")
    assert out["status"] == 500
    assert orjson.loads(out["body"])["error"] == {
        "message": "internal error",
        "type": "server_error",
        "param": None,
        "code": None,
    }


def test_it_wraps_fastapis_own_middleware() -> None:
    stack = _Api().build_middleware_stack()
    assert isinstance(stack, FastRoutes)
    assert type(stack.app).__name__ == "ServerErrorMiddleware"


async def test_event_stream_leaves_its_last_event_with_the_end_of_the_body() -> None:
    async def events() -> Any:
        for e in (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"):
            yield e

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await EventStream(events(), {"X-Carbon-Region": "eu-north"})({}, None, send)
    start, *body = sent
    headers = dict(start["headers"])
    assert start["status"] == 200 and b"content-length" not in headers
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"x-carbon-region"] == b"eu-north"
    assert [(m["body"], m["more_body"]) for m in body] == [
        (b"data: 1\n\n", True),
        (b"data: 2\n\n", True),
        (b"data: [DONE]\n\n", False),
    ]
