"""A remote OpenAI-compatible server (vLLM, llama.cpp server, TGI) as a :class:`Backend`:
completions are proxied with streaming over kept-alive connections (:mod:`regions.http1`), a
timeout on every call.

Token counts are the server's: the ``usage`` of a whole answer, and on a stream the usage event
the server ends it with when asked (``stream_options.include_usage``, sent unless
``stream_usage=False``, for a server that refuses it). Before the server answers, and where it
reports nothing usable, they are estimated from the text (:func:`estimate_tokens`, 4 chars a
token), the prompt's and the answer's, the same way streamed or whole."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from regions.backends import (
    Backend,
    BackendError,
    BackendRefused,
    BackendUnavailable,
    CompletionRequest,
    TokenChunk,
)
from regions.http1 import Http1Pool, Response, UpstreamError, header_lines

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 1 << 20  # one SSE line; past it the server is not streaming tokens
MAX_REPORTED_TOKENS = 10_000_000  # more than any context window: past it, a server's nonsense
CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    """The tokens of ``text`` where no server counted them: 4 characters a token, at least one
    for any text. The one estimate of a whole answer and of a stream, so that the same answer
    bills the same tokens either way."""
    return max(1, len(text) // CHARS_PER_TOKEN) if text else 0


@dataclass(frozen=True, slots=True)
class Answer:
    """A non-streamed completion; token counts as the server reported them (None: not given)."""

    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass(frozen=True, slots=True)
class StreamBatch:
    """The chunks of one read off a stream, to be passed on together. ``last``: the server
    ended the stream in that read (nothing follows). The last batch carries the token counts
    the server reported for the whole stream (None: not given, or nonsense). A stream whose
    body just ends, without ``[DONE]``, has a last batch only if its final read brought output
    or the server had reported usage."""

    chunks: list[TokenChunk]
    last: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class OpenAIBackend(Backend):
    def __init__(self, url: str, model: str, *, api_key: str | None = None,
                 timeout_s: float = 60.0, connect_timeout_s: float = 5.0,
                 stream_usage: bool = True) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self.stream_usage = stream_usage
        self._pool = Http1Pool(self.url, connect_timeout_s=connect_timeout_s)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._heads = {
            (chat, stream): self._pool.head(
                "POST",
                "/chat/completions" if chat else "/completions",
                {**headers, "Accept": "text/event-stream"} if stream else headers,
            )
            for chat in (True, False)
            for stream in (True, False)
        }

    async def prompt_tokens(self, request: CompletionRequest) -> int:
        text = request.prompt or "".join(m["content"] for m in request.messages or [])
        return max(1, estimate_tokens(text))

    def _body(self, request: CompletionRequest, stream: bool) -> tuple[bytes, dict[str, Any]]:
        chat = request.messages is not None
        body: dict[str, Any] = {
            "model": self.model, "max_tokens": request.max_tokens,
            "temperature": request.temperature, "top_p": request.top_p, "stream": stream,
        }  # fmt: skip
        if request.stop:
            body["stop"] = request.stop
        if request.seed is not None:
            body["seed"] = request.seed
        if stream and self.stream_usage:  # OpenAI refuses stream_options on a whole answer
            body["stream_options"] = {"include_usage": True}
        if chat:
            body["messages"] = request.messages
        else:
            body["prompt"] = request.prompt
        return self._heads[chat, stream], body

    async def _post(
        self, head: bytes, body: dict[str, Any], request: CompletionRequest
    ) -> Response:
        """The response, its head in and its status checked; the caller reads and closes it.
        The request's trace context goes with it (``traceparent``, ``tracestate``)."""
        trace = b""
        if request.traceparent is not None:
            context = {"traceparent": request.traceparent}
            if request.tracestate:
                context["tracestate"] = request.tracestate
            try:
                trace = header_lines(context)
            except ValueError:  # not ours to send: the request goes without it
                log.warning("%s: a trace context with control characters was not sent", self.url)
        resp = await self._pool.request(
            head, orjson.dumps(body), timeout_s=self.timeout_s, headers=trace
        )
        if resp.status >= 500 or resp.status == 429:
            resp.close()
            raise BackendUnavailable(f"{self.url}: HTTP {resp.status}")
        if resp.status >= 400:
            text = (await resp.read()).decode(errors="replace")
            raise BackendRefused(f"{self.url}: HTTP {resp.status}: {text[:200]}")
        return resp

    async def answer(self, request: CompletionRequest) -> Answer:
        """The whole completion in one (non-streamed) call; token counts are the server's."""
        head, body = self._body(request, stream=False)
        try:
            async with await self._post(head, body, request) as resp:
                data = orjson.loads(await resp.read())
        except UpstreamError as e:
            raise BackendUnavailable(str(e)) from e
        except ValueError as e:
            raise BackendError(f"{self.url}: answer is not JSON: {e}") from e
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if "messages" in body else choice["text"]
            usage = data.get("usage")
        except (KeyError, IndexError, TypeError) as e:
            raise BackendError(f"{self.url}: answer lacks {e}") from e
        prompt, completion = self._usage(usage)
        return Answer(
            text=text or "",
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=prompt,
            completion_tokens=completion,
        )

    def _usage(self, usage: Any) -> tuple[int | None, int | None]:
        """The (prompt, completion) token counts of a ``usage`` object the server sent; each
        None where it gave none or nonsense."""
        if usage is None:
            return None, None
        if not isinstance(usage, dict):
            log.warning("%s: ignoring usage = %r from the server", self.url, usage)
            return None, None
        return (
            self._count(usage.get("prompt_tokens"), "prompt_tokens"),
            self._count(usage.get("completion_tokens"), "completion_tokens"),
        )

    def _count(self, value: Any, name: str) -> int | None:
        """A token count the server reported, if it is one; nonsense (negative, fractional,
        absurdly large, not a number) is ignored, logged, and the caller estimates instead."""
        if value is None:
            return None
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and float(value).is_integer() and 0 <= value <= MAX_REPORTED_TOKENS:
            return int(value)
        log.warning("%s: ignoring usage.%s = %r from the server", self.url, name, value)
        return None

    async def stream(self, request: CompletionRequest) -> AsyncIterator[TokenChunk]:
        """The output's chunks; the server's token counts are on :meth:`stream_batches`."""
        async for batch in self.stream_batches(request):
            for chunk in batch.chunks:
                yield chunk

    async def stream_batches(self, request: CompletionRequest) -> AsyncIterator[StreamBatch]:
        """The stream as it comes off the network: the chunks of each read together, so a
        proxy can pass on what arrived at once in one write, marked when the server ended the
        stream in that read (nothing follows: the proxy may send its own end with it). The
        server's usage event is no chunk: its counts come on the last batch."""
        head, body = self._body(request, stream=True)
        chat = "messages" in body
        pending = b""
        usage: Any = None  # the last usage the server sent: its counts for the whole stream
        try:
            async with await self._post(head, body, request) as resp:
                async for data in resp.chunks():
                    *lines, pending = (pending + data).split(b"\n")
                    if len(pending) > MAX_EVENT_BYTES:
                        raise BackendError(f"{self.url}: stream event over {MAX_EVENT_BYTES} bytes")
                    batch, done, usage = self._events(lines, chat, usage)
                    if done:
                        resp.release_after_end()  # the body's end may still be on its way
                        yield StreamBatch(batch, True, *self._usage(usage))
                        return
                    if batch:
                        yield StreamBatch(batch)
                batch = []
                if pending.strip():  # a last event without its newline
                    batch, _, usage = self._events([pending], chat, usage)
                if batch or usage is not None:
                    yield StreamBatch(batch, True, *self._usage(usage))
        except UpstreamError as e:
            raise BackendUnavailable(str(e)) from e
        except ValueError as e:
            raise BackendError(f"{self.url}: stream event is not a JSON chunk: {e}") from e

    @staticmethod
    def _events(lines: list[bytes], chat: bool, usage: Any) -> tuple[list[TokenChunk], bool, Any]:
        """The chunks of SSE ``data:`` lines, whether ``[DONE]`` was among them, and the last
        ``usage`` sent until then (``usage`` if none of them has one). OpenAI sends it in an
        event of its own at the end (``"choices": []``); others with the last choice, or
        running totals on every chunk."""
        out: list[TokenChunk] = []
        for raw in lines:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return out, True, usage
            event = orjson.loads(data)
            try:
                if event.get("usage") is not None:
                    usage = event["usage"]
                choices = event.get("choices") or []
                if not isinstance(choices, list):
                    raise TypeError("choices is not a list")
                for choice in choices:
                    got = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if got is not None and not isinstance(got, str):
                        raise TypeError(f"its text is {type(got).__name__}, not a string")
                    finish = choice.get("finish_reason")
                    out.append(TokenChunk(got or "", 1 if got else 0, finish))
            except (AttributeError, TypeError) as e:  # valid JSON, but no chunk of a completion
                raise ValueError(f"not a completion chunk ({e}): {data[:200]}") from e
        return out, False, usage

    async def aclose(self) -> None:
        await self._pool.aclose()
