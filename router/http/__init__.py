"""The HTTP side of the request path: the ASGI front (:mod:`.app`), the OpenAI wire format
(:mod:`.wire`) and the one table mapping domain errors to HTTP (:mod:`.errors`)."""
