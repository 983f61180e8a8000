"""The FastAPI app: routes, OpenAI-shaped errors, and a gate in front of every request (draining, API key, body
size, per-status metrics)."""
from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lowbit.server.engine_loop import EngineDeadError, EngineLoop
from lowbit.server.errors import APIError, bad_request, error_body
from lowbit.server.metrics import CONTENT_TYPE_LATEST, Metrics
from lowbit.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard,
                                    ModelList, TokenizeRequest)
from lowbit.server.serving import Serving

OPEN_PATHS = ("/health", "/metrics")  # no API key needed: probes and scrapers


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    reasoning_parser: str | None = None


class _Gate:
    """ASGI middleware: 503 while draining, 401 without the API key, 413 over the body limit, and a count of
    every answer by route and status."""

    def __init__(self, app, settings: ServerSettings, metrics: Metrics, state, routes: frozenset[str]):
        self.app, self.settings, self.metrics, self.state, self.routes = app, settings, metrics, state, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal, receive = await self._check(scope, receive)
            if refusal is not None:
                await refusal(scope, receive, send_counted)
            else:
                await self.app(scope, receive, send_counted)
        finally:
            path = scope["path"] if scope["path"] in self.routes else "other"  # bounded label values
            self.metrics.http_requests.labels(method=scope["method"], path=path, status=str(status)).inc()

    async def _check(self, scope, receive):
        """(a refusal response or None, the receive callable to pass on)."""
        if self.state.draining:
            return APIError(503, "the server is shutting down", code="shutting_down").response(), receive
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = self.settings.api_key
        if key and scope["path"] not in OPEN_PATHS:
            auth = headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(given.encode(), key.encode()):
                return APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                                code="invalid_api_key").response(), receive
        limit = self.settings.max_body_bytes
        too_large = APIError(413, f"the request body is larger than the server's limit of {limit} bytes",
                             code="request_too_large").response()
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                return too_large, receive
            return None, receive
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return None, receive
        # no length given (chunked): read the body up to the limit, then replay it
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None, receive  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return too_large, receive
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return None, replay


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) for the first validation error; param is the top-level field, as OpenAI names it."""
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    loc = [x for x in err.get("loc", ()) if x != "body"]
    param = str(loc[0]) if loc else None
    msg = err.get("msg", "invalid request")
    return (f"{param}: {msg}" if param else msg), param


def build_app(engine_loop: EngineLoop, settings: ServerSettings, metrics: Metrics) -> FastAPI:
    """The app over a started-or-not engine loop; the app's lifespan starts and stops the loop."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine_loop.alive:
            engine_loop.start()
        try:
            yield
        finally:
            engine_loop.shutdown()

    app = FastAPI(title="lowbit", lifespan=lifespan)
    app.state.draining = False
    serving = Serving(engine_loop, settings.model_name, settings.reasoning_parser)
    tokenizer = engine_loop.engine.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return bad_request(message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError):
        return APIError(503, str(exc), code="engine_unavailable").response()

    @app.get("/health")
    async def health():
        if not engine_loop.alive:
            raise EngineDeadError("the engine is not running")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=settings.model_name, max_model_len=engine_loop.engine.max_model_len)])

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await serving.completion(req, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await serving.chat(req, request)

    # vLLM's tokenizer endpoints (lm-eval's remote tokenizer uses them)
    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        if req.messages is not None:
            ids = serving.chat_prompt(ChatCompletionRequest(messages=req.messages))
        else:
            ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine_loop.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        vocab = engine_loop.engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise bad_request(f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {"eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token,
                "pad_token": tokenizer.pad_token, "chat_template": getattr(tokenizer, "chat_template", None),
                "model_max_length": engine_loop.engine.max_model_len}

    routes = frozenset(getattr(r, "path", "") for r in app.routes)
    app.add_middleware(_Gate, settings=settings, metrics=metrics, state=app.state, routes=routes)
    return app
