"""The HTTP side of ``lorakit serve``: OpenAI's completions and chat endpoints over the batching engine.

The request's ``model`` picks the adapter (the base model's name: none), as in vLLM and LoRAX. Text is
tokenised here, as ``lorakit generate`` tokenises it (an adapter's recorded prompt format decides how chat
messages become its prompt), checked against the context, and handed to the engine; its tokens come back
through an asyncio queue per request, streamed as Server-Sent Events or gathered into one response.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lorakit.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from lorakit.errors import AdapterFileError, ConfigError, LorakitError
from lorakit.serve.api import (APIError, ChatRequest, CompletionRequest, LoadAdapterRequest, VLLMLoadRequest,
                               VLLMUnloadRequest, parse)
from lorakit.serve.engine import Adapters, Engine, EngineStopped, Generation, QueueFull, Sampling
from lorakit.serve.metrics import Metrics
from lorakit.serve.threads import Threads
from lorakit.train import data

MISMATCH_HEADER = "X-Lorakit-Prompt-Format-Mismatch"  # a request not in the adapter's prompt format: what was done
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
MAX_BODY_BYTES = 4 * 2 ** 20
# Parts of letters, digits, '.', '_' and '-', each starting with a letter or digit, joined by '/' ("org/name"):
# no '..' part, no leading '/', no whitespace or control characters to forge log lines or paths with.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)*", re.ASCII)
# What a malformed adapter file can make a reader raise where it checks nothing (a config field of the wrong type,
# an unreadable file): still that file's fault, so the adapter is refused by name, never a crash or a 500.
MALFORMED = (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError)


class Server:
    """One model, its served adapters, the engine, and the FastAPI ``app`` answering for them."""

    def __init__(self, model, tokenizer, base_name: str, adapters: dict[str, Path] | None = None, *,
                 api_key: str | None = None, adapters_dir: str | Path | None = None,
                 allow_runtime_adapters: bool = False, max_batch: int = 64, max_loaded_adapters: int = 16,
                 max_queue: int = 256, max_body_bytes: int = MAX_BODY_BYTES, threads: Threads | None = None):
        if max_body_bytes < 1:
            raise ConfigError(f"--max-body-bytes must be >= 1, got {max_body_bytes}")
        self.tokenizer, self.base_name = tokenizer, base_name
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes
        self.adapters_dir = Path(adapters_dir).resolve() if adapters_dir else None
        self.allow_runtime_adapters = allow_runtime_adapters
        self.metrics = Metrics()
        self.store = Adapters(model, max_loaded_adapters)
        self.formats: dict[str, str | None] = {}
        self.mismatches_logged: set[tuple[str, bool]] = set()  # (adapter, chat): each logged once, not per request
        self.unloading: set[str] = set()
        self.created = int(time.time())
        for name, path in (adapters or {}).items():
            self.add(name, path)
        self.engine = Engine(model, tokenizer, self.store, max_batch=max_batch, max_queue=max_queue,
                             metrics=self.metrics, threads=threads)
        # Each token stands for at most this many characters of text (a byte-level BPE token's string has one
        # character per byte, and a text has no more characters than bytes), so a longer text cannot fit the
        # context: it is refused without being tokenised.
        longest_token = max(len(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) if t)
        self.max_prompt_chars = self.engine.context * longest_token
        self.tokenizing: ThreadPoolExecutor | None = None  # while serving: one thread, as vLLM's, off the event loop
        self.app = self._build_app()

    def add(self, name: str, path: str | Path) -> None:
        """Serve the adapter in ``path`` as ``name`` (before the server starts; at run time: POST /v1/adapters).
        A LorakitError naming the file and the reason if it cannot be: a bad name, a file that is unreadable,
        malformed or does not fit the model (``lorakit serve`` skips such an adapter it found, and serves the rest)."""
        try:
            self._check_name(name)
        except APIError as e:
            raise ConfigError(e.message) from None
        self._serve(name, Path(path))

    def _serve(self, name: str, path: Path, busy: set[str] = frozenset()) -> None:
        """Read ``path`` once (its tensors stay in host memory: see ``Adapters``) and serve it as ``name``."""
        try:
            # its prompt format is known before any request can name it
            self.formats[name] = data.read_prompt_format(path)
            self.store.add(name, path, busy)
        except BaseException as e:
            self.formats.pop(name, None)
            if isinstance(e, LorakitError) or not isinstance(e, MALFORMED):
                raise
            raise AdapterFileError(f"{path}: its files cannot be read as an adapter ({type(e).__name__}: {e})"
                                   ) from None

    # --- the app -----------------------------------------------------------------------------------------
    def _build_app(self):
        @contextlib.asynccontextmanager
        async def lifespan(_app):
            self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="lorakit-tokenize")
            self.engine.start()
            try:
                yield
            finally:
                self.engine.stop()
                self.tokenizing.shutdown(cancel_futures=True)

        app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(APIError)
        async def api_error(_request, e: APIError):
            self.metrics.errors.labels(e.TYPES.get(e.status, "error")).inc()
            headers = {"Retry-After": "1"} if e.status == 429 else None
            return JSONResponse(e.body(), status_code=e.status, headers=headers)

        @app.exception_handler(HTTPException)
        async def http_error(_request, e: HTTPException):
            message = "no such endpoint" if e.status_code == 404 else str(e.detail)
            return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code)

        @app.exception_handler(Exception)
        async def unexpected(_request, e: Exception):  # a bug of ours: still a JSON answer, and the worker lives
            self.metrics.errors.labels("server_error").inc()
            return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

        app.add_middleware(_CountRequests, metrics=self.metrics)

        @app.get("/health")
        async def health():
            state = {"running": len(self.engine.running), "waiting": len(self.engine.waiting)}
            if not self.engine.alive():
                return JSONResponse({"status": "stopped", **state}, status_code=503)
            return {"status": "ok", **state}

        page = resources.files("lorakit.serve").joinpath("playground.html").read_text()

        @app.get("/", response_class=HTMLResponse)
        async def playground():
            # The page needs nothing from elsewhere, and says so to the browser: the key it keeps stays here.
            return HTMLResponse(page, headers={
                "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})

        @app.get("/metrics")
        async def metrics(request: Request):
            self._authorize(request)
            self.metrics.observe_state(self.engine)
            return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

        @app.get("/v1/models")
        async def models(request: Request):
            self._authorize(request)
            return {"object": "list", "data": self._model_cards()}

        @app.post("/v1/completions")
        async def completions(request: Request):
            self._authorize(request)
            body = parse(CompletionRequest, await self._body(request))
            adapter = self._adapter_of(body.model)
            prompts = await self._off_loop(self._completion_prompts, body.prompt)
            max_tokens = body.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS
            return _noted(await self._generate(request, body, adapter, prompts, max_tokens, chat=False),
                          self._format_mismatch(adapter, False, body.prompt))

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            self._authorize(request)
            body = parse(ChatRequest, await self._body(request))
            adapter = self._adapter_of(body.model)
            ids = await self._off_loop(self._chat_prompt, body.conversation(), adapter)
            return _noted(await self._generate(request, body, adapter, [ids],
                                               body.max_completion_tokens or body.max_tokens, chat=True),
                          self._format_mismatch(adapter, True))

        @app.post("/v1/adapters")
        async def load_adapter(request: Request):
            self._authorize(request)
            self._runtime_allowed()
            body = parse(LoadAdapterRequest, await self._body(request))
            return await self._load(body.name, body.path)

        @app.post("/v1/load_lora_adapter")  # vLLM's names for the same, so its clients and scripts work here
        async def load_lora_adapter(request: Request):
            self._authorize(request)
            self._runtime_allowed()
            body = parse(VLLMLoadRequest, await self._body(request))
            if body.load_inplace and body.lora_name in self.served():
                await self._unload(body.lora_name)
            return await self._load(body.lora_name, body.lora_path)

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(request: Request):
            self._authorize(request)
            self._runtime_allowed()
            body = parse(VLLMUnloadRequest, await self._body(request))
            await self._unload(body.lora_name)
            return {"id": body.lora_name, "object": "model", "deleted": True}

        @app.delete("/v1/adapters/{name:path}")
        async def unload_adapter(name: str, request: Request):
            self._authorize(request)
            self._runtime_allowed()
            await self._unload(name)
            return {"id": name, "object": "model", "deleted": True}

        return app

    # --- requests ------------------------------------------------------------------------------------------
    def _authorize(self, request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        """The request's body; 413 past ``max_body_bytes``, by its Content-Length before a byte of it is read, else
        (a chunked upload) as soon as what arrived passes it."""
        declared = int(request.headers.get("content-length", 0))  # the HTTP parser has checked it is a number
        if declared > self.max_body_bytes:
            raise self._too_large(f"{declared} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large(f"more than {self.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, size: str) -> APIError:
        return APIError(413, f"the request body has {size}; this server takes at most {self.max_body_bytes} "
                             "(--max-body-bytes)", code="request_too_large")

    async def _off_loop(self, fn, *args):
        """``fn(*args)`` in the tokenizing thread, so that a long prompt holds up no other request and not /health
        (a fast tokenizer releases the GIL while it works)."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, *args)

    def _adapter_of(self, model: str) -> str | None:
        if model == self.base_name:
            return None
        if model in self.store.paths and model not in self.unloading:
            return model
        served = [self.base_name, *self.served()]
        raise APIError(404, f"the model {model!r} does not exist; this server has {', '.join(served)}",
                       param="model", code="model_not_found")

    def served(self) -> list[str]:
        """The adapters requests may name now."""
        return [n for n in list(self.store.paths) if n not in self.unloading]

    def _completion_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            texts = [prompt]
        elif all(isinstance(p, str) for p in prompt):
            texts = prompt
        else:
            rows = [prompt] if all(isinstance(p, int) for p in prompt) else prompt
            vocab = len(self.tokenizer)
            for row in rows:
                bad = [t for t in row if not 0 <= t < vocab]
                if bad:
                    raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0 to {vocab - 1})",
                                   param="prompt")
            return [self._nonempty(list(r)) for r in rows]
        return [self._prompt_ids(t, "prompt") for t in texts]

    def _format_mismatch(self, adapter: str | None, chat: bool, prompt=None) -> str | None:
        """What ``MISMATCH_HEADER`` says where a chat request, or a completion's ``prompt`` (its texts: raw, or
        holding chat-template markup; token ids are not judged), goes to an adapter trained on the other prompt
        format; logged as a warning once per adapter and endpoint. None where the formats agree or are unknown."""
        recorded = self.formats.get(adapter) if adapter else None
        if recorded is None:
            return None
        if chat:
            note = None if recorded == "chat" else ("a chat request to an adapter trained on raw prompt text: its "
                                                    "user message was sent as that text, without the chat template")
        else:
            texts = [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]
            marked = any(data.markup_in(t, self.tokenizer) for t in texts)
            note = data.format_mismatch("chat" if marked else "raw", recorded) if texts else None
        if note and (adapter, chat) not in self.mismatches_logged:
            self.mismatches_logged.add((adapter, chat))
            logging.getLogger("lorakit.serve").warning("lorakit serve: %s: %s", adapter, note)
        return note

    def _chat_prompt(self, conversation: list[dict], adapter: str | None) -> list[int]:
        prompt_format = (self.formats.get(adapter) if adapter else None) or "chat"
        # an adapter trained with --chat-template brings its own
        own = getattr(prompt_format, "chat_template", None)
        if prompt_format == "chat" and not (own or getattr(self.tokenizer, "chat_template", None)):
            raise APIError(400, f"{self.base_name} has no chat template; use /v1/completions", param="messages")
        try:
            prompt = data.in_format(conversation, prompt_format)
        except LorakitError as e:
            raise APIError(400, str(e), param="messages") from None
        return self._prompt_ids(prompt, "messages")

    def _prompt_ids(self, prompt: str | list[dict], param: str) -> list[int]:
        """``data.prompt_ids`` of ``prompt`` (text, or chat messages), refused untokenised when it has more
        characters than the context can hold (``max_prompt_chars``)."""
        characters = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
        if characters > self.max_prompt_chars:
            raise APIError(400, f"this model's maximum context length is {self.engine.context} tokens, at most "
                                f"{self.max_prompt_chars} characters of text; the prompt has {characters}",
                           param=param, code="context_length_exceeded")
        return self._nonempty(data.prompt_ids(prompt, self.tokenizer))

    @staticmethod
    def _nonempty(ids: list[int]) -> list[int]:
        if not ids:
            raise APIError(400, "the prompt is empty (it encodes to no tokens)", param="prompt")
        return ids

    def _budget(self, prompts: list[list[int]], max_tokens: int | None) -> int:
        """``max_tokens`` checked against the context (None: what the context leaves)."""
        context, longest = self.engine.context, max(len(p) for p in prompts)
        budget = context - longest if max_tokens is None else max_tokens
        if longest + budget > context or budget < 1:
            raise APIError(400, f"this model's maximum context length is {context} tokens; the request asks for "
                                f"{longest + budget} ({longest} in the prompt, {budget} to generate)",
                           param="max_tokens" if max_tokens is not None else "messages",
                           code="context_length_exceeded")
        return budget

    async def _generate(self, request, body, adapter: str | None, prompts: list[list[int]],
                        max_tokens: int | None, chat: bool):
        budget = self._budget(prompts, max_tokens)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        generations = []
        for prompt in prompts:
            for _ in range(body.n):
                index = len(generations)
                seed = None if body.seed is None else body.seed + index
                sampling = Sampling(budget, body.temperature, body.top_p, body.stops(), seed)
                generations.append(Generation(prompt, adapter, sampling, _sink(loop, events, index)))
        try:
            self.engine.submit(generations)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full") from None
        except ConfigError as e:  # more than the whole queue holds: a 429 would be retried for ever
            raise APIError(400, str(e), param="n" if body.n > 1 else "prompt", code="too_many_sequences") from None
        except EngineStopped as e:
            raise APIError(503, str(e)) from None
        reply = _Reply(chat, body.model, generations)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._stream(reply, events, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while reply.pending:
                try:
                    index, event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise APIError(499, "the client closed the request") from None
                    continue
                reply.take(index, event)
        finally:
            reply.cancel_rest()
        if reply.error is not None:
            raise APIError(reply.error[1], reply.error[0])
        return reply.whole()

    async def _stream(self, reply: "_Reply", events: asyncio.Queue, usage: bool):
        try:
            for chunk in reply.opening():
                yield _sse(chunk)
            while reply.pending:
                index, event = await events.get()
                for chunk in reply.take(index, event):
                    yield _sse(chunk)
            if usage:
                yield _sse(reply.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away mid-stream: its rows leave the batch before the next step
            reply.cancel_rest()

    # --- adapters at run time --------------------------------------------------------------------------------
    def _runtime_allowed(self) -> None:
        if not self.allow_runtime_adapters or self.adapters_dir is None:
            raise APIError(403, "loading and unloading adapters at run time is off; start the server with "
                                "--allow-runtime-adapters (adapters come from under --adapters-dir only)")

    def _check_name(self, name: str) -> None:
        if not ADAPTER_NAME.fullmatch(name):
            raise APIError(400, f"{name!r} is not an adapter name: letters, digits, '.', '_' and '-', in parts joined "
                                "by '/', each starting with a letter or digit", param="name")
        if name == self.base_name:
            raise APIError(400, f"{name!r} is the base model's name; give the adapter another", param="name")
        if name in self.store.paths:
            raise APIError(409, f"an adapter named {name!r} is already served", param="name",
                           code="adapter_exists")

    async def _load(self, name: str, path: str) -> dict:
        self._check_name(name)
        directory = self._adapter_directory(path)
        try:
            await asyncio.wrap_future(self.engine.call(lambda: self._serve(name, directory,
                                                                           self.engine.busy_adapters())))
        except LorakitError as e:
            # the error names the files under --adapters-dir: as the client knows them, not where they are here
            shown = str(e).replace(str(directory), str(directory.relative_to(self.adapters_dir)))
            raise APIError(400, f"cannot load {path!r}: {shown}", param="path") from None
        return self._card(name)

    def _adapter_directory(self, path: str) -> Path:
        """The adapter directory ``path`` names under --adapters-dir: a 4xx naming ``path`` as given (never a path of
        the server's) where it or a file read from it (through a link) lies outside, or holds no safetensors."""
        try:
            directory = (self.adapters_dir / path).resolve()
            if not directory.is_relative_to(self.adapters_dir):
                raise APIError(403, f"{path!r} is outside --adapters-dir", param="path")
            outside = [name for name in (CONFIG_NAME, WEIGHTS_NAME, data.PROMPT_FILE)
                       if not (directory / name).resolve().is_relative_to(self.adapters_dir)]
            if outside:
                raise APIError(403, f"{path!r}: {', '.join(outside)} links to outside --adapters-dir", param="path")
            if not (directory / WEIGHTS_NAME).is_file():
                raise APIError(400, f"{path!r} holds no {WEIGHTS_NAME} (only safetensors adapters are loaded at "
                                    "run time)", param="path")
        except (OSError, ValueError) as e:  # a NUL byte; a name longer than the file system takes
            reason = e.strerror if isinstance(e, OSError) else str(e)
            raise APIError(400, f"{path!r} is not a usable path ({reason})", param="path") from None
        return directory

    async def _unload(self, name: str) -> None:
        if name not in self.store.paths or name in self.unloading:
            raise APIError(404, f"no adapter named {name!r} is served", param="name", code="model_not_found")
        self.unloading.add(name)  # new requests for it are refused from now on

        def remove_when_idle() -> bool:
            if name in self.engine.busy_adapters():
                return False
            self.store.remove(name)
            return True

        try:
            while not await asyncio.wrap_future(self.engine.call(remove_when_idle)):
                await asyncio.sleep(0.02)
        finally:
            self.unloading.discard(name)
        self.formats.pop(name, None)

    def _card(self, name: str | None) -> dict:
        card = {"id": name or self.base_name, "object": "model", "created": self.created, "owned_by": "lorakit",
                "root": self.base_name, "parent": None, "max_model_len": self.engine.context}
        if name is not None:
            card.update(root=str(self.store.paths[name]), parent=self.base_name)
        return card

    def _model_cards(self) -> list[dict]:
        return [self._card(None), *(self._card(n) for n in self.served())]


def discover(root: str | Path) -> dict[str, Path]:
    """The adapters under ``root`` by name: ROOT/NAME/adapter (a ``lorakit finetune`` run) or ROOT/NAME itself."""
    root = Path(root)
    found: dict[str, Path] = {}
    for sub in sorted(root.iterdir()) if root.is_dir() else []:
        for candidate in (sub / "adapter", sub):
            if (candidate / "adapter_config.json").is_file():
                found[sub.name] = candidate
                break
    return found


@contextlib.contextmanager
def running(server, host: str = "127.0.0.1", port: int = 0):
    """Serve ``server`` (a Server, or any ASGI app) with uvicorn in a background thread (port 0: a free one);
    yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    web = uvicorn.Server(uvicorn.Config(getattr(server, "app", server), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, name="lorakit-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not web.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        web.should_exit = True
        thread.join(30)
        sock.close()


class _CountRequests:
    """ASGI middleware counting answers by endpoint and status (pure ASGI: streaming and disconnects pass as is)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def watched(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(endpoint, str(status[0])).inc()


def _sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int):
    def put(event: dict) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, (index, event))
        except RuntimeError:  # the event loop has closed (the server is stopping): nobody is listening
            pass
    return put


def _noted(response, note: str | None):
    """``response`` (a Response, or the dict FastAPI would send as JSON) with ``note`` in ``MISMATCH_HEADER``."""
    if note is None:
        return response
    if not isinstance(response, Response):
        response = JSONResponse(response)
    response.headers[MISMATCH_HEADER] = note
    return response


def _sse(chunk: dict) -> str:
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


class _Reply:
    """One request's answers as they arrive: the OpenAI chunks to stream, or the whole response."""

    def __init__(self, chat: bool, model: str, generations: list[Generation]):
        self.chat, self.model, self.generations = chat, model, generations
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.texts = [""] * len(generations)
        self.reasons: list[str | None] = [None] * len(generations)
        self.prompt_tokens = [len(g.prompt_ids) for g in generations]
        self.completion_tokens = [0] * len(generations)
        self.pending = len(generations)
        self.error: tuple[str, int] | None = None

    def take(self, index: int, event: dict) -> list[dict]:
        """Record an engine event; the stream chunks it makes."""
        if "text" in event:
            self.texts[index] += event["text"]
            return [self._chunk(index, event["text"], None)]
        self.pending -= 1
        if "error" in event:
            self.error = (event["error"], event["status"])
            return [{"error": APIError(event["status"], event["error"]).body()["error"]}]
        self.reasons[index] = event["done"]
        self.completion_tokens[index] = event["completion_tokens"]
        return [self._chunk(index, None, event["done"])]

    def cancel_rest(self) -> None:
        for g in self.generations:
            if not g.finished:
                g.cancel()

    def opening(self) -> list[dict]:
        if not self.chat:
            return []
        return [self._envelope([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]) for i in range(len(self.generations))]

    def _chunk(self, index: int, text: str | None, reason: str | None) -> dict:
        if self.chat:
            choice = {"index": index, "delta": {} if text is None else {"content": text}}
        else:
            choice = {"index": index, "text": text or ""}
        return self._envelope([{**choice, "logprobs": None, "finish_reason": reason}])

    def _envelope(self, choices: list[dict], usage: dict | None = None) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def usage(self) -> dict:
        prompt = sum(self.prompt_tokens[i] for i in self._prompts())
        completion = sum(self.completion_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _prompts(self) -> list[int]:
        """One index per distinct prompt (``n`` choices share theirs)."""
        seen, first = set(), []
        for i, g in enumerate(self.generations):
            if id(g.prompt_ids) not in seen:
                seen.add(id(g.prompt_ids))
                first.append(i)
        return first

    def usage_chunk(self) -> dict:
        return self._envelope([], self.usage())

    def whole(self) -> dict:
        choices = []
        for i, (text, reason) in enumerate(zip(self.texts, self.reasons)):
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                "finish_reason": reason})
            else:
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}
