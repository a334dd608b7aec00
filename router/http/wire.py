"""The OpenAI wire format: request bodies in (validated, every error naming its field),
answers out (whole bodies and server-sent events), and the ASGI plumbing that carries them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.responses import Response

from regions.backends import CompletionRequest
from router.errors import BodyTooLarge, RequestError
from router.service.ports import ParsedRequest, TraceContext

MAX_BODY_BYTES = 1 << 20
MAX_TOKENS_CEILING = 1024


def parse_body(
    raw: bytes,
    *,
    chat: bool,
    max_tokens_ceiling: int = MAX_TOKENS_CEILING,
    trace: TraceContext | None = None,
) -> ParsedRequest:
    """A request body, validated (:class:`RequestError` names the field); ``trace``: the
    request's span's W3C ``(traceparent, tracestate)``, to send upstream with it."""
    traceparent, tracestate = trace if trace is not None else (None, None)
    if len(raw) > MAX_BODY_BYTES:
        raise BodyTooLarge(f"request body over {MAX_BODY_BYTES} bytes")
    try:
        body = orjson.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise RequestError("body must be a JSON object")

    def field_(
        name: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False
    ) -> Any:
        if name not in body or body[name] is None:
            if required:
                raise RequestError(f"'{name}' is required", param=name)
            return default
        v = body[name]
        if not isinstance(v, kind) or (
            isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
        ):
            raise RequestError(f"'{name}' has the wrong type", param=name)
        return v

    model = field_("model", str, required=True)
    refuse_unsupported(body)
    max_tokens = field_("max_completion_tokens", int) or field_("max_tokens", int, 256)
    if not 1 <= max_tokens <= max_tokens_ceiling:
        raise RequestError(
            f"'max_tokens' must be 1..{max_tokens_ceiling}, got {max_tokens}",
            param="max_tokens",
        )
    temperature = float(field_("temperature", (int, float), 0.7))
    if not 0 <= temperature <= 2:
        raise RequestError("'temperature' must be 0..2", param="temperature")
    top_p = float(field_("top_p", (int, float), 1.0))
    if not 0 < top_p <= 1:
        raise RequestError("'top_p' must be in (0, 1]", param="top_p")
    stop = field_("stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise RequestError("'stop' must be a string or a list of strings", param="stop")
    seed = field_("seed", int)
    stream = bool(field_("stream", bool, False))
    opts = field_("stream_options", dict, {})
    if chat:
        messages = field_("messages", list, required=True)
        if not messages or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise RequestError(
                "'messages' must be a non-empty list of {role, content} strings",
                param="messages",
            )
        req = CompletionRequest(
            messages=[{"role": m["role"], "content": m["content"]} for m in messages],
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
            traceparent=traceparent,
            tracestate=tracestate,
        )
    else:
        prompt = field_("prompt", str, required=True)
        req = CompletionRequest(
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
            traceparent=traceparent,
            tracestate=tracestate,
        )
    return ParsedRequest(model, stream, bool(opts.get("include_usage", True)), req, chat)


def refuse_unsupported(body: dict[str, Any]) -> None:
    """Refuse what the router would otherwise drop without a word (the client would get an
    answer to a different question): several choices, tools, structured output, logprobs."""
    if body.get("n") not in (None, 1):
        raise RequestError("only n=1 is supported", param="n")
    for name in ("tools", "functions"):
        if body.get(name):
            raise RequestError(f"'{name}' is not supported by this router", param=name)
    if body.get("tool_choice") not in (None, "none"):
        raise RequestError("'tool_choice' is not supported by this router", param="tool_choice")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise RequestError(
            "only response_format {'type': 'text'} is supported", param="response_format"
        )
    if body.get("logprobs") or body.get("top_logprobs"):
        raise RequestError("'logprobs' is not supported by this router", param="logprobs")


class OpenAIWire:
    """The :class:`router.service.ports.Wire` of OpenAI's API."""

    def parse(self, raw: bytes, *, chat: bool, trace: TraceContext | None = None) -> ParsedRequest:
        return parse_body(raw, chat=chat, trace=trace)

    def body(
        self, request_id: str, parsed: ParsedRequest, text: str, finish_reason: str,
        usage: dict[str, Any], created: int,
    ) -> dict[str, Any]:  # fmt: skip
        return completion_body(request_id, parsed, text, finish_reason, usage, created)


def completion_body(
    request_id: str, parsed: ParsedRequest, text: str, finish_reason: str,
    usage: dict[str, Any], created: int,
) -> dict[str, Any]:  # fmt: skip
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if parsed.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": request_id,
        "object": "chat.completion" if parsed.chat else "text_completion",
        "created": created,
        "model": parsed.model,
        "choices": [choice],
        "usage": usage,
    }


def sse_event(request_id: str, obj: str, created: int, model: str, **fields: Any) -> bytes:
    event = {"id": request_id, "object": obj, "created": created, "model": model, **fields}
    return b"data: " + orjson.dumps(event) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


async def read_capped(receive: Any, limit: int) -> bytes:
    """An ASGI request body, refused with 413 as soon as it passes ``limit`` bytes."""
    parts, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestError("client disconnected while sending the body")
        body = message.get("body", b"")
        size += len(body)
        if size > limit:
            raise BodyTooLarge(f"request body over {limit} bytes")
        parts.append(body)
        more = message.get("more_body", False)
    return b"".join(parts)


class EventStream(Response):
    """A ``text/event-stream`` answer written straight to ASGI ``send``. Starlette's
    StreamingResponse runs each stream in an anyio task group with a second task listening for
    the disconnect (under ASGI spec < 2.4, which uvicorn declares): ~15 % of the ingress's CPU
    per stream. Ray Serve already watches for the client going away and cancels the request.
    The last event leaves with the end of the body, in one write."""

    def __init__(
        self,
        events: AsyncIterator[bytes],
        headers: dict[str, str],
        on_unstarted: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        # not Response.__init__: it would add a Content-Length for the empty body
        self.status_code = 200
        self.background = None
        self.events = events
        # called instead of closing ``events`` when they were never started (the client was
        # gone before the response began): an unstarted generator's cleanup never runs
        self.on_unstarted = on_unstarted
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
        ]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        began = False
        last = b""
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            began = True  # from here the events run, and their own cleanup with them
            async for event in self.events:
                if last:
                    await send({"type": "http.response.body", "body": last, "more_body": True})
                last = event
            await send({"type": "http.response.body", "body": last, "more_body": False})
        finally:  # cancelled while sending (the client went away): the events' cleanup now
            if not began and self.on_unstarted is not None:
                await self.on_unstarted()
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()
