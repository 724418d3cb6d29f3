"""The FastAPI app: `create_app(engine or config, settings)`, one engine per app.

The lifespan starts loading the model in the background so the server answers at once (/health says
503 until the model is ready) and, on shutdown, drains the engine: running requests get
`drain_timeout` seconds to finish, the rest are aborted.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response

from lcq import __version__
from lcq.errors import UserError
from lcq.format import FormatError
from lcq.runtime import AsyncEngine, EngineConfig

from . import chat, completions, embeddings, lora, responses, sagemaker, tgi
from .errors import APIError, error_responses, install_error_handlers
from .metrics import CONTENT_TYPE, STATS_LOG_INTERVAL, ActivityLog, ServerMetrics
from .middleware import GuardMiddleware
from .protocol import DetokenizeRequest, DetokenizeResponse, HealthResponse, ModelCard, ModelList, TokenizeRequest, \
    TokenizeResponse, VersionResponse
from .response_store import ResponseStore
from .settings import ServeSettings
from .state import ServerState, get_state

logger = logging.getLogger("lcq.server")
router = APIRouter()


class Lifecycle:
    """Background model load at startup; one idempotent drain for SIGTERM and lifespan shutdown alike."""

    def __init__(self, state: ServerState, on_fatal: Callable[[], None] | None):
        self.state = state
        self.on_fatal = on_fatal
        self.load_error: str | None = None  # why the model did not load, in a line, where the settings or folder say
        self._start: asyncio.Task | None = None
        self._drain: asyncio.Task | None = None

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self._start = asyncio.create_task(self._load())
        activity = None if self.state.settings.disable_log_stats else asyncio.create_task(self._log_activity())
        try:
            yield
        finally:
            if activity is not None:
                activity.cancel()
            await self.drain()

    async def _log_activity(self) -> None:
        """The activity line every STATS_LOG_INTERVAL seconds while there is work (metrics.ActivityLog)."""
        activity = ActivityLog(self.state.metrics, self.state.engine.stats)
        while True:
            await asyncio.sleep(STATS_LOG_INTERVAL)
            if line := activity.line():
                logger.info("%s", line)

    async def _load(self) -> None:
        try:
            await self.state.engine.start()
            logger.info("model %s ready", self.state.model_name)
        except (UserError, FormatError) as e:  # the settings or the folder: its one line, not a traceback
            self.load_error = str(e)
            logger.error("the model failed to load: %s", e)
            if self.on_fatal is not None:
                self.on_fatal()
        except Exception:
            logger.exception("the model failed to load")
            if self.on_fatal is not None:
                self.on_fatal()

    async def loaded(self) -> None:
        """Wait for the load the lifespan started (done or failed: `on_fatal` has run by then)."""
        await asyncio.shield(self._start)

    def drain(self) -> asyncio.Task:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._shutdown())
        return self._drain

    async def _shutdown(self) -> None:
        if self._start is not None and not self._start.done():
            self._start.cancel()
        logger.info("draining: up to %.0f s for running requests", self.state.settings.drain_timeout)
        await self.state.engine.shutdown(self.state.settings.drain_timeout)


@router.get("/health", response_model=HealthResponse, responses=error_responses(503))
@router.get("/ping", response_model=HealthResponse, responses=error_responses(503))
@router.post("/ping", response_model=HealthResponse, responses=error_responses(503))
async def health(request: Request) -> HealthResponse:
    """Whether the server takes requests; also SageMaker's health check (/ping), as vLLM's and TGI's images answer it."""
    state = get_state(request)
    if not state.accepting():
        raise APIError(503, "draining" if state.engine.is_draining else "the model is loading",
                       code="service_unavailable", headers={"Retry-After": str(state.settings.retry_after)})
    return HealthResponse()


def model_cards(state: ServerState) -> list[ModelCard]:
    """The base model under each of its names, then each LoRA adapter with the base as its parent, each with its
    folder as root (as vLLM lists them)."""
    context = state.engine.max_model_len or None
    return [ModelCard(id=name, root=state.engine.config.model, max_model_len=context) for name in state.model_names] + [
        ModelCard(id=name, root=folder, parent=state.model_name, max_model_len=context)
        for name, folder in state.adapters.items()]


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401))
async def list_models(request: Request) -> ModelList:
    return ModelList(data=model_cards(get_state(request)))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=error_responses(401, 404))
async def get_model(model_id: str, request: Request) -> ModelCard:
    for card in model_cards(get_state(request)):
        if card.id == model_id:
            return card
    raise APIError(404, f"the model `{model_id}` does not exist", param="model", code="model_not_found")


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.exposition(), media_type=CONTENT_TYPE)


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    return VersionResponse(version=__version__)


@router.post("/tokenize", response_model=TokenizeResponse, responses=error_responses(400, 401, 404, 413, 503))
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse | Response:
    if body.prompt is None and body.messages is None and "inputs" in (body.model_extra or {}):
        return await tgi.tokenize(body, request)  # TGI's body
    state = get_state(request)
    state.check_request(body, "/tokenize")
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of `prompt` and `messages`", code="invalid_value")
    tokenizer = state.engine.tokenizer
    # add_special_tokens' default: completions' (true) for a prompt, chat's (false) for messages
    special = body.messages is None if body.add_special_tokens is None else body.add_special_tokens
    if body.messages is not None:  # off the event loop (tokenize_prompts)
        tokens = await asyncio.to_thread(chat.render_chat, tokenizer, body.messages, body, add_special_tokens=special,
                                         tools=body.tools, content_format=state.settings.chat_template_content_format)
    else:
        tokens = await asyncio.to_thread(tokenizer.encode, body.prompt, add_special_tokens=special)
    return TokenizeResponse(count=len(tokens), max_model_len=state.engine.max_model_len, tokens=tokens,
                            token_strs=tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses(400, 401, 404, 413, 503))
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = get_state(request)
    state.check_request(body, "/detokenize")
    state.check_token_ids(body.tokens, "tokens")
    return DetokenizeResponse(prompt=state.engine.tokenizer.decode(body.tokens))


def _openapi_with_400(app: FastAPI) -> Callable[[], dict]:
    """The schema as served: validation failures are documented as 400 with the error envelope, not 422."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    if responses.pop("422", None) is not None and "400" not in responses:
                        responses["400"] = {"description": "Invalid request", "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            for unused in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def create_app(engine: AsyncEngine | EngineConfig, settings: ServeSettings | None = None,
               on_fatal: Callable[[], None] | None = None) -> FastAPI:
    """The app serving `engine` (or a new AsyncEngine for `config`); `on_fatal` runs if the model fails to
    load."""
    if isinstance(engine, EngineConfig):
        engine = AsyncEngine(engine)
    settings = settings or ServeSettings()
    metrics = ServerMetrics(engine.model_name, engine.stats)
    state = ServerState(engine=engine, settings=settings, metrics=metrics,
                        responses=ResponseStore(settings.responses_store_size))
    lifecycle = Lifecycle(state, on_fatal)
    hidden = dict(openapi_url=None, docs_url=None, redoc_url=None) if settings.disable_fastapi_docs else {}
    app = FastAPI(title="lcq", version=__version__, lifespan=lifecycle.lifespan,
                  description="OpenAI-compatible server for LCQ-quantized models", **hidden)
    app.state.lcq = state
    app.state.lifecycle = lifecycle
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(completions.router)
    app.include_router(chat.router)
    app.include_router(responses.router)
    app.include_router(embeddings.router)
    app.include_router(tgi.router)
    app.include_router(sagemaker.router)
    if engine.config.allow_runtime_lora_updating:
        app.include_router(lora.router)
    app.add_middleware(GuardMiddleware, metrics=metrics, api_key=settings.api_key,
                       max_body_bytes=settings.max_body_bytes)
    # outermost: a browser's preflight (OPTIONS, no API key) is answered here, and every reply, errors too,
    # carries the CORS headers
    app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=settings.allowed_methods,
                       allow_headers=settings.allowed_headers, allow_credentials=settings.allow_credentials)
    app.openapi = _openapi_with_400(app)
    return app
