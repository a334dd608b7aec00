"""A fast fake OpenAI-compatible server, for the overhead benchmark and the live tests of proxied
replicas: answers chat completions at once (non-streaming, or 8 SSE chunks), on loopback.
A prompt over 8,000 characters is refused (HTTP 400), as a server refuses one over its context.
Run: python -m regions.fake_openai PORT

It misbehaves on command, for fault-injection tests: ``POST /_fault`` with ``{"mode": M}``,
M one of ``refuse`` (HTTP 400 as a server refusing a parameter), ``error`` (HTTP 500),
``absurd_usage`` (usage.prompt_tokens 1e30), ``die_mid_stream`` (a stream cut after 2 chunks),
or ``null`` to behave again."""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

ANSWER = {
    "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "fake",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
}  # fmt: skip


STATE = web.AppKey("state", dict)
CONTEXT_CHARS = 8000  # a longer prompt is refused (400), as a server refuses one over its context
FAULTS = (None, "refuse", "error", "absurd_usage", "die_mid_stream", "hang", "slow")


async def fault(request: web.Request) -> web.StreamResponse:
    mode = (await request.json()).get("mode")
    if mode not in FAULTS:
        return web.json_response({"error": f"mode must be one of {FAULTS}"}, status=400)
    request.app[STATE]["fault"] = mode
    return web.json_response({"mode": mode})


async def fault_state(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    return web.json_response({"mode": state["fault"], "calls": state["calls"]})


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    mode = request.app[STATE]["fault"]
    request.app[STATE]["calls"] += 1
    if mode == "hang":
        await asyncio.sleep(600)
    if mode == "slow" and not body.get("stream"):
        await asyncio.sleep(1.0)
    text = "".join(str(m.get("content", "")) for m in body.get("messages") or [])
    if len(text) > CONTEXT_CHARS:
        error = {"message": f"This model's maximum context length is {CONTEXT_CHARS // 4} "
                            f"tokens; the prompt has about {len(text) // 4}"}  # fmt: skip
        return web.json_response({"error": error}, status=400)
    if mode == "refuse":
        return web.json_response({"error": {"message": "top_p must be in (0, 1]"}}, status=400)
    if mode == "error":
        return web.json_response({"error": {"message": "internal"}}, status=500)
    if not body.get("stream"):
        if mode == "absurd_usage":
            return web.json_response({**ANSWER, "usage": {"prompt_tokens": 1e30,
                                                          "completion_tokens": -3}})  # fmt: skip
        return web.json_response(ANSWER)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(8):
        if mode == "die_mid_stream" and i == 2 and request.transport is not None:
            request.transport.abort()  # the server dies mid-stream
            return resp
        if mode == "slow" and i:
            await asyncio.sleep(0.25)
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                 "choices": [{"index": 0, "delta": {"content": f"t{i} "},
                              "finish_reason": "stop" if i == 7 else None}]}  # fmt: skip
        try:
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        except ConnectionResetError:  # the client hung up
            return resp
    await resp.write(b"data: [DONE]\n\n")
    return resp


def main() -> None:
    app = web.Application()
    app[STATE] = {"fault": None, "calls": 0}
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/_fault", fault)
    app.router.add_get("/_fault", fault_state)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
