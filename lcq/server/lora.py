"""vLLM's routes for LoRA adapters at runtime: POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

create_app mounts them only with --allow-runtime-lora-updating (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING):
they let any client holding the API key make the server read a folder of its choosing. Without it
they are unknown routes (404). Success is vLLM's plain-text message; errors are the OpenAI envelope.
"""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from lcq.errors import UserError
from lcq.runtime.errors import AdapterNotFoundError, EngineNotReadyError

from .errors import APIError, engine_error, error_responses
from .protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from .state import get_state

router = APIRouter()
PLAIN_TEXT = {200: {"content": {"text/plain": {}}}}


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
             responses={**PLAIN_TEXT, **error_responses(400, 401, 413, 503)})
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """400 for a name in use (or the base model's), a folder that cannot be served, or max_cpu_loras adapters loaded."""
    state = get_state(request)
    state.require_ready()
    try:
        await state.engine.load_lora_adapter(body.lora_name, body.lora_path, body.load_inplace)
    except UserError as e:
        raise APIError(400, str(e), param="lora_path", code="invalid_value") from None
    except (ValueError, EngineNotReadyError) as e:
        raise engine_error(e, state.settings.retry_after) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
             responses={**PLAIN_TEXT, **error_responses(400, 401, 404, 413, 503)})
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """New requests naming the adapter are refused from now on; running ones finish with it."""
    state = get_state(request)
    state.require_ready()
    try:
        await state.engine.unload_lora_adapter(body.lora_name)
    except AdapterNotFoundError as e:
        raise APIError(404, str(e), param="lora_name", code="model_not_found") from None
    except EngineNotReadyError as e:
        raise engine_error(e, state.settings.retry_after) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
