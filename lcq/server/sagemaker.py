"""Amazon SageMaker's POST /invocations, as vLLM's and TGI's images serve it (its health check, /ping, is app.py's
/health), which runs whichever API's request its body is: chat messages, a completion prompt, embedding
input, or TGI's inputs (each route's own checks, replies and errors)."""
from __future__ import annotations

import json

import pydantic
from fastapi import APIRouter, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from . import chat, completions, embeddings, tgi
from .errors import APIError, error_responses, speaks_tgi
from .protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .tgi_protocol import GenerateRequest

router = APIRouter()
# The key that tells each request's API from the others, its request model and its route
INVOCATIONS = (("messages", ChatCompletionRequest, chat.create_chat_completion),
               ("prompt", CompletionRequest, completions.create_completion),
               ("input", EmbeddingRequest, embeddings.create_embeddings),
               ("inputs", GenerateRequest, tgi.compat_generate))


@router.post("/invocations", responses=error_responses(400, 401, 404, 413, 429, 503))
async def invocations(request: Request) -> Response:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON", code="invalid_value") from None
    for key, model, route in INVOCATIONS if isinstance(body, dict) else ():
        if key in body:
            if route is tgi.compat_generate:
                speaks_tgi(request)
            try:
                parsed = model.model_validate(body)
            except pydantic.ValidationError as e:
                raise RequestValidationError(e.errors()) from None
            reply = await route(parsed, request)
            return reply if isinstance(reply, Response) else JSONResponse(jsonable_encoder(reply))
    raise APIError(400, "/invocations takes a chat request (messages), a completion (prompt), embeddings (input) or "
                   "TGI's request (inputs)", code="invalid_value")
