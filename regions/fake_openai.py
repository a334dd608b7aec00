"""A fast fake OpenAI-compatible server, for the overhead benchmark and the live tests of proxied
replicas: answers chat completions at once (non-streaming, or 8 SSE chunks), on loopback. Its
usage is 8 prompt tokens, and 1 completion token (whole) or 8 (streamed); a stream asked for
it (``stream_options.include_usage``) ends with OpenAI's usage event before ``[DONE]``. A prompt
over 8,000 characters is refused (HTTP 400), as a server refuses one over its context.
Run: python -m regions.fake_openai PORT

It misbehaves on command, for fault-injection tests: ``POST /_fault`` with ``{"mode": M}``,
M one of ``refuse`` (HTTP 400 as a server refusing a parameter), ``error`` (HTTP 500),
``absurd_usage`` (usage.prompt_tokens 1e30, whole or streamed), ``die_mid_stream`` (a stream
cut after 2 chunks, before any usage), ``refuse_stream_options`` (HTTP 400 for a request with
``stream_options``, as a server that does not know it), ``hang`` (no answer for 10 minutes),
``slow`` (an answer after 1 s; stream chunks 0.25 s apart), or ``null`` to behave again.
``GET /_fault`` says the mode, how many completions were asked for and the trace context
(``traceparent``, ``tracestate``) the last one came with.

``GET /metrics`` answers vLLM's load gauges in Prometheus text: ``vllm:num_requests_running``
(the completions it is answering now) and ``vllm:num_requests_waiting`` (0). ``POST /_metrics``
with ``{"running": R, "waiting": W}`` pins them (``null``: back to counting), and with
``{"mode": M}`` makes the endpoint misbehave: ``hang`` (no answer for 10 minutes, or until the
mode changes), ``missing`` (HTTP 404, as a server without metrics), ``error`` (HTTP 500), or
``null`` to behave again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys

from aiohttp import web

ANSWER = {
    "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "fake",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
}  # fmt: skip


STREAM_USAGE = {"prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16}  # its 8 chunks
ABSURD_USAGE = {"prompt_tokens": 1e30, "completion_tokens": -3}
STATE = web.AppKey("state", dict)
CONTEXT_CHARS = 8000  # a longer prompt is refused (400), as a server refuses one over its context
FAULTS = (None, "refuse", "error", "absurd_usage", "die_mid_stream", "refuse_stream_options",
          "hang", "slow")  # fmt: skip


async def fault(request: web.Request) -> web.StreamResponse:
    mode = (await request.json()).get("mode")
    if mode not in FAULTS:
        return web.json_response({"error": f"mode must be one of {FAULTS}"}, status=400)
    request.app[STATE]["fault"] = mode
    return web.json_response({"mode": mode})


async def fault_state(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    return web.json_response({"mode": state["fault"], "calls": state["calls"],
                              "traceparent": state["traceparent"],
                              "tracestate": state["tracestate"]})  # fmt: skip


METRICS_FAULTS = (None, "hang", "missing", "error")


async def metrics_control(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    state = request.app[STATE]
    if "mode" in body:
        if body["mode"] not in METRICS_FAULTS:
            return web.json_response({"error": f"mode must be one of {METRICS_FAULTS}"}, status=400)
        state["metrics_fault"] = body["mode"]
        if body["mode"] != "hang":
            state["metrics_released"].set()  # hanging answers end (a server shuts down fast)
            state["metrics_released"] = asyncio.Event()
    for key in ("running", "waiting"):
        if key in body:
            state[f"pinned_{key}"] = body[key]
    return web.json_response({"mode": state["metrics_fault"]})


async def metrics(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    mode = state["metrics_fault"]
    if mode == "hang":
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state["metrics_released"].wait(), 600)
    if mode == "missing":
        return web.Response(status=404, text="Not Found")
    if mode == "error":
        return web.Response(status=500, text="internal")
    running = state["pinned_running"]
    running = state["inflight"] if running is None else running
    waiting = state["pinned_waiting"] or 0
    labels = '{engine="0",model_name="fake"}'
    text = (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f"vllm:num_requests_running{labels} {float(running)}\n"
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        f"vllm:num_requests_waiting{labels} {float(waiting)}\n"
    )
    return web.Response(text=text, content_type="text/plain")


async def chat(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state["inflight"] += 1
    try:
        return await _chat(request)
    finally:
        state["inflight"] -= 1


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    mode = request.app[STATE]["fault"]
    request.app[STATE]["calls"] += 1
    request.app[STATE]["traceparent"] = request.headers.get("traceparent")
    request.app[STATE]["tracestate"] = request.headers.get("tracestate")
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
    if mode == "refuse_stream_options" and "stream_options" in body:
        error = {"message": "Unrecognized request argument supplied: stream_options"}
        return web.json_response({"error": error}, status=400)
    if not body.get("stream"):
        if mode == "absurd_usage":
            return web.json_response({**ANSWER, "usage": ABSURD_USAGE})
        return web.json_response(ANSWER)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    try:
        for i in range(8):
            if mode == "die_mid_stream" and i == 2 and request.transport is not None:
                request.transport.abort()  # the server dies mid-stream
                return resp
            if mode == "slow" and i:
                await asyncio.sleep(0.25)
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                     "choices": [{"index": 0, "delta": {"content": f"t{i} "},
                                  "finish_reason": "stop" if i == 7 else None}]}  # fmt: skip
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = ABSURD_USAGE if mode == "absurd_usage" else STREAM_USAGE
            end = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                   "choices": [], "usage": usage}  # fmt: skip
            await resp.write(f"data: {json.dumps(end)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
    except ConnectionResetError:  # the client hung up
        pass
    return resp


def make_app() -> web.Application:
    app = web.Application()
    app[STATE] = {"fault": None, "calls": 0, "inflight": 0, "metrics_fault": None,
                  "traceparent": None, "tracestate": None,
                  "pinned_running": None, "pinned_waiting": None,
                  "metrics_released": asyncio.Event()}  # fmt: skip
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/_fault", fault)
    app.router.add_get("/_fault", fault_state)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/_metrics", metrics_control)
    return app


def main() -> None:
    web.run_app(make_app(), host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
