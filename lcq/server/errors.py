"""Every failure as OpenAI's error envelope `{"error": {"message", "type", "param", "code"}}`.

Clients (the openai SDK, LangChain, curl scripts) parse this shape and map the status to an exception,
so client mistakes must be 4xx with a useful message, never FastAPI's 422 or a bare 500. TGI's routes (tgi.py)
answer in TGI's shape instead, which its clients parse (error_reply).
"""
from __future__ import annotations

import dataclasses
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lcq.runtime.errors import AdapterNotFoundError, ContextLengthError, EngineNotReadyError, QueueFullError
from lcq.runtime.sampling_params import SamplingParams

from .protocol import ErrorResponse, OpenAIRequest

logger = logging.getLogger("lcq.server")

# Every response's request id (GuardMiddleware's, also request.state.request_id)
REQUEST_ID_HEADER = "X-Request-Id"

# status -> OpenAI error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error to send as the OpenAI envelope with this HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)


# The longest error message sent: messages quote what the client sent (a model name, a part's type), which may be
# megabytes long
MAX_MESSAGE_CHARS = 2000


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS - 3] + "..."
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


# status -> TGI's error_type, which its clients map to their exceptions (huggingface_hub's ValidationError,
# OverloadedError, GenerationError)
TGI_ERROR_TYPES = {401: "authentication", 429: "overloaded", 503: "overloaded", 500: "generation"}


def tgi_route(endpoint):
    """Marks a route of TGI's API: its errors take TGI's shape (error_reply), those of reading its body too."""
    endpoint.speaks_tgi = True
    return endpoint


def speaks_tgi(request: Request) -> None:
    """Marks a request of TGI's API that came by another route (/invocations): its errors take TGI's shape."""
    request.state.tgi = True


def error_reply(request: Request, error: APIError) -> JSONResponse:
    """The error as the request's API writes it: OpenAI's envelope, or for TGI's (tgi_route, speaks_tgi) TGI's
    {"error": message, "error_type": kind}, a request's mistake its 422."""
    if not (getattr(request.state, "tgi", False) or getattr(request.scope.get("endpoint"), "speaks_tgi", False)):
        return error_response(error)
    status, body = tgi_error(error)
    return JSONResponse(body, status_code=status, headers=error.headers)


def tgi_error(error: APIError) -> tuple[int, dict]:
    """(status, body) of an error in TGI's shape: {"error": message, "error_type": kind}, a bad request its 422."""
    status = 422 if error.status == 400 else error.status
    return status, {"error": error.body()["error"]["message"], "error_type": TGI_ERROR_TYPES.get(status, "validation")}


def not_ready(message: str = "the model is loading or the server is shutting down", retry_after: int = 1) -> APIError:
    return APIError(503, message, code="service_unavailable", headers={"Retry-After": str(retry_after)})


# Request fields whose values the engine checks (LLMEngine.check_request), so errors can name them.
ENGINE_CHECKED_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)} | {
    "prompt", "response_format", "tools", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "structured_outputs"}


def engine_error(e: Exception, retry_after: int = 1, request: OpenAIRequest | None = None) -> APIError:
    """Map what AsyncEngine.add_request raises to the status a client should see; a value error names the
    field of `request` it concerns, as the client sent it."""
    if isinstance(e, QueueFullError):
        return APIError(429, str(e) or "the server is busy: too many requests are waiting", code="queue_full",
                        headers={"Retry-After": str(retry_after)})
    if isinstance(e, EngineNotReadyError):
        return not_ready(str(e) or "the engine is not ready", retry_after)
    if isinstance(e, AdapterNotFoundError):  # unloaded after the request's model was looked up
        return APIError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, ContextLengthError):  # (the prompt, named as the endpoint's client sent it)
        return APIError(400, str(e), param="prompt" if request is None else request.field_name("prompt"),
                        code="context_length_exceeded")
    if isinstance(e, ValueError) and request is not None:
        return invalid_value(str(e), request)
    if isinstance(e, ValueError):  # the engine's messages start with the request field they concern
        first = str(e).split(" ", 1)[0]
        return APIError(400, str(e), code="invalid_value", param=first if first in ENGINE_CHECKED_FIELDS else None)
    raise e


TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "bytes"})


def _union_branch(part: object) -> bool:
    """Whether a part of pydantic's error location names the branch of a union it tried ("str", "list[int]",
    "function-after[...]"), not a field: `prompt`, not `prompt.str`."""
    return isinstance(part, str) and (part in TYPE_TAGS or "[" in part or "-" in part)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem as one line, and the request field it concerns (OpenAI's `param`)."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _union_branch(part)]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {message}{more}" if param else f"{message}{more}"), param


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception to the envelope: validation -> 400, HTTP errors keep their status."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_reply(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_reply(request, APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                                str(exc.detail))
        return error_reply(request, APIError(exc.status_code, message, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        """Answered by Starlette's outermost layer, outside GuardMiddleware: the request id is added here."""
        request_id = request.state.request_id
        logger.exception("internal error on %s %s (request %s)", request.method, request.url.path, request_id)
        return error_reply(request, APIError(500, f"internal error: {type(exc).__name__}",
                                             headers={REQUEST_ID_HEADER: request_id}))


def error_responses(*statuses: int) -> dict:
    """OpenAPI `responses` entries documenting the envelope for these statuses."""
    return {status: {"model": ErrorResponse} for status in statuses}


def generation_responses(stream: dict) -> dict:
    """OpenAPI `responses` of a generation route: `stream` (its SSE form) beside the JSON body, and every
    status one can answer (bad value, key, model, body size, full queue, loading or draining)."""
    return {200: stream, **error_responses(400, 401, 404, 413, 429, 503)}


def invalid_value(message: str, request: OpenAIRequest) -> APIError:
    """A 400 for a value check; `param` is the request field the message starts with, if it is one, under
    the name the client sent it by (SamplingParams' checks name its fields)."""
    first, space, rest = message.partition(" ")
    named = request.field_name(first)
    param = named if named != first or first in type(request).model_fields else None
    return APIError(400, f"{named}{space}{rest}", param=param, code="invalid_value")
