"""POST /v1/embeddings: each input's last-token embedding (the final norm's output, L2-normalized), the
pooling of decoder embedding models such as Qwen3-Embedding and e5-mistral, from the same engine and
KV cache as generation (an embedding request ends with its prompt; its blocks serve the prefix cache)."""
from __future__ import annotations

import asyncio
import base64
import struct

from fastapi import APIRouter, Request

from lcq.runtime.sampling_params import SamplingParams

from .completions import tokenize_prompts
from .errors import APIError, error_responses
from .generation import Generation
from .protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, last_tokens
from .state import get_state, request_id_of

router = APIRouter()


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=error_responses(400, 401, 404, 413, 429, 503))
async def create_embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    state = get_state(request)
    state.check_request(body, "/v1/embeddings")
    hidden = state.engine.hidden_size
    if body.dimensions is not None and body.dimensions != hidden:
        raise APIError(400, f"dimensions: this model's embeddings have {hidden} (shortened ones are not supported)",
                       param="dimensions", code="unsupported_value")
    prompts, _ = await asyncio.to_thread(tokenize_prompts, state, body.input, "input")
    prompts = [last_tokens(ids, body.truncate_prompt_tokens, state.engine.max_model_len) for ids in prompts]
    params = SamplingParams(max_tokens=1, embed=True, lora=state.adapter_for(body))
    generation = Generation(state, f"embd-{request_id_of(request, body)}", prompts, params)
    await generation.submit(body)
    await generation.run(request)
    data = [EmbeddingData(index=c.index, embedding=_encoded(c.embedding, body.encoding_format))
            for c in generation.choices]
    tokens = sum(len(ids) for ids in prompts)
    return EmbeddingResponse(data=data, model=generation.model,
                             usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
