"""What every handler needs (engine, settings, metrics) and the checks they all start with."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import Request

from .errors import APIError, not_ready
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, OpenAIRequest, SamplingRequest
from .response_store import ResponseStore
from .settings import ServeSettings

logger = logging.getLogger("lcq.server")
TGI_PLACEHOLDER_MODELS = ("tgi", "dummy")  # (ServerState.names_base_model)


@dataclass
class ServerState:
    engine: object  # lcq.runtime.AsyncEngine
    settings: ServeSettings
    metrics: ServerMetrics
    responses: ResponseStore  # stored responses of /v1/responses

    @property
    def model_name(self) -> str:
        """The name replies give the base model (the first of its served names)."""
        return self.engine.model_name

    @property
    def model_names(self) -> list[str]:
        """Every name requests may give the base model (vLLM's several --served-model-name)."""
        return self.engine.config.model_names()

    @property
    def adapters(self) -> dict[str, str]:
        """LoRA adapters served beside the base model, by the model name clients send: their folders."""
        return self.engine.adapters

    def adapter_for(self, request: OpenAIRequest) -> str | None:
        """The adapter a (checked) request names as its model, or None for the base model. Any name but the
        base model's is an adapter: one unloaded since check_request saw it then reaches the engine, whose
        refusal is the 404 (looked up again here, the request ran on the base model, a 200)."""
        model = getattr(request, "model", None)
        return None if self.names_base_model(model) else model

    def names_base_model(self, model: str | None) -> bool:
        """Whether a request's model names the base model: none (or ""), one of its names, or, where no adapter
        has it, a name TGI's clients send when they know none, which TGI takes for its model (it takes any): "tgi"
        (the text-generation package's chat), "dummy" (huggingface_hub's chat_completion with a base_url) or the
        endpoint's URL (huggingface.js)."""
        if not model or model in self.model_names:  # (an empty name too: no name, as vLLM and TGI take it)
            return True
        placeholder = model in TGI_PLACEHOLDER_MODELS or model.startswith(("http://", "https://"))
        return placeholder and model not in self.adapters

    def accepting(self) -> bool:
        return bool(self.engine.is_ready and not self.engine.is_draining)

    def require_ready(self) -> None:
        """503 while the model loads or the server drains: the tokenizer and engine are not usable."""
        if not self.accepting():
            self.metrics.rejected("not_ready")
            raise not_ready(retry_after=self.settings.retry_after)

    def check_request(self, request: OpenAIRequest, route: str) -> None:
        """Log fields we ignore, 400 what we cannot do, 404 a model we do not serve, 503 when not ready."""
        unknown = request.unknown_fields()
        if unknown:
            # as repr()s, cut: a client's field names are no log lines of their own (a newline in one forged a line)
            names = ", ".join(repr(name[:64]) for name in unknown[:16]) + (", ..." if len(unknown) > 16 else "")
            logger.info("%s: ignoring unknown fields %s", route, names)
        if (wrong := request.invalid()) is not None:
            raise APIError(400, wrong[1], param=wrong[0], code="invalid_value")
        if (refused := request.unsupported()) is not None:
            raise APIError(400, refused[1], param=refused[0], code="unsupported_value")
        model = getattr(request, "model", None)
        if model and not self.names_base_model(model) and model not in self.adapters:
            self.metrics.rejected("model_not_found")
            served = ", ".join(f"`{name}`" for name in (*self.model_names, *self.adapters))
            raise APIError(404, f"the model `{model}` does not exist; this server serves {served}",
                           param="model", code="model_not_found")
        self.require_ready()

    def tokens_as_ids(self, request: SamplingRequest) -> bool:
        """Whether logprobs name tokens by id: the request's return_tokens_as_token_ids, else the server's flag."""
        asked = request.return_tokens_as_token_ids
        return self.settings.return_tokens_as_token_ids if asked is None else asked

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = len(self.engine.tokenizer)
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range (vocabulary size {vocab})", param=param,
                           code="invalid_value")


def request_id_of(request: Request, body: CompletionRequest | ChatCompletionRequest | EmbeddingRequest) -> str:
    """The request's id, the base of its response's, as vLLM picks it: the client's X-Request-Id, else the body's
    request_id, else the server's own. The reply's X-Request-Id header says the same (GuardMiddleware reads it when
    the reply starts)."""
    if body.request_id is not None and not request.state.request_id_sent:
        request.state.request_id = body.request_id
    return request.state.request_id


def get_state(request: Request) -> ServerState:
    return request.app.state.lcq
