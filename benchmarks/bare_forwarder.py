"""The floor for overhead.py: the thinnest Ray Serve forwarder (FastAPI ingress, one shared
aiohttp session, bytes passed through; no auth, policy or metering), on the same fake backend.

    python benchmarks/bare_forwarder.py BACKEND_PORT SERVE_PORT

With RAY_SERVE_THROUGHPUT_OPTIMIZED=1 it is also reachable on its direct-ingress port.
(No `from __future__ import annotations`: FastAPI must see the `Request` annotation.)"""

import sys
import time

import aiohttp
import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve

app = FastAPI()


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Forwarder:
    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.session: aiohttp.ClientSession | None = None

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        if self.session is None:
            self.session = aiohttp.ClientSession()
        body = await request.body()
        headers = {"Content-Type": "application/json"}
        async with self.session.post(self.backend, data=body, headers=headers) as r:
            return Response(await r.read(), media_type="application/json")


def main() -> None:
    backend_port, port = int(sys.argv[1]), int(sys.argv[2])
    ray.init(include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{backend_port}/v1/chat/completions"
    serve.run(Forwarder.bind(url), route_prefix="/")  # type: ignore[attr-defined]
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
