"""The OpenAI-compatible server end to end: real uvicorn on 127.0.0.1, a tiny random model, the official
openai client (sync and async), raw httpx for errors and disconnects, schemathesis over the schema."""
from __future__ import annotations

import asyncio
import codecs
import importlib.util
import json
import random
import re
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

from lcq.errors import UserError
from lcq.quantizer.reference import load_reference_model
from lcq.runtime.detokenizer import TokenBytes, byte_level_alphabet
from lcq.server.app import create_app
from lcq.server.content_format import detected_content_format
from lcq.server.protocol import CompletionRequest
from lcq.server.settings import ServeSettings, resolve
from lcq.server.tool_calls import ReplyReader, ToolCallStream, parse_hermes, parse_llama3_json, read_reply, \
    reply_parser
from tests.live_server import MODEL, LiveServer, ShippedNginx, engine_config
from tests.test_server_cli import parse as parse_serve
from tests.tiny_model import make_tiny_hf

MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def server(model_dir):
    app = create_app(engine_config(model_dir), ServeSettings(max_body_bytes=MAX_BODY))
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/version").json()["version"]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_streaming_equals_non_streaming(server, client):
    args = dict(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
                extra_body={"ignore_eos": True})
    full = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == full.choices[0].text and full.choices[0].finish_reason == "length"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    prompt_tokens = httpx.post(server.url + "/tokenize", json={"prompt": args["prompt"]}).json()["count"]
    assert full.usage.prompt_tokens == prompt_tokens == chunks[-1].usage.prompt_tokens
    assert full.usage.total_tokens == prompt_tokens + 12


def test_chat_async_streaming_equals_non_streaming(server):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello, world!"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "How are you today?"}]

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as aclient:
            args = dict(model=MODEL, messages=messages, max_tokens=10, temperature=0)
            full = await aclient.chat.completions.create(**args)
            stream = await aclient.chat.completions.create(**args, stream=True,
                                                           stream_options={"include_usage": True})
            return full, [chunk async for chunk in stream]

    full, chunks = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == \
        (full.usage.prompt_tokens, full.usage.completion_tokens)
    assert usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: served from the prefix cache
    rendered = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    assert full.usage.prompt_tokens == rendered["count"]
    assert rendered["tokens"][-3:] != rendered["tokens"][:3]  # the template wrapped every turn


def _streamed_and_whole(client, chat: bool, args: dict) -> tuple[dict, dict, tuple, tuple]:
    """Each choice's (text, finish reason, logprob tokens) by index, streamed and whole, and both usages."""
    create = client.chat.completions.create if chat else client.completions.create
    whole = create(**args)
    streamed: dict[int, list] = {}
    usage = None
    for chunk in create(**args, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text, reason, tokens = streamed.setdefault(choice.index, ["", None, []])
            if chat:
                text += choice.delta.content or ""
                tokens += [t.token for t in (choice.logprobs.content or [])] if choice.logprobs else []
            else:
                text += choice.text
                tokens += choice.logprobs.tokens if choice.logprobs else []
            streamed[choice.index] = [text, choice.finish_reason or reason, tokens]
    kept = {}
    for choice in whole.choices:
        if chat:
            tokens = [t.token for t in (choice.logprobs.content or [])] if choice.logprobs else []
            kept[choice.index] = [choice.message.content or "", choice.finish_reason, tokens]
        else:
            kept[choice.index] = [choice.text, choice.finish_reason, choice.logprobs.tokens if choice.logprobs else []]
    return streamed, kept, (usage.prompt_tokens, usage.completion_tokens), \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens)


def test_random_requests_stream_what_they_return_whole(model_dir):
    """Random completions and chat requests (n up to 3, seeded or greedy, stop strings kept or not, min_tokens,
    penalties, logprobs, echo) stream per choice the text, finish reason and logprob tokens their plain response
    holds, and the same usage, sent one after the other so that the second hits the prefix cache. fp32 products
    and cache, whose tokens do not depend on the batch or the cache (test_random_workloads_...)."""
    rng = random.Random(0)
    words = ["Tell me", "a story", "about", "the sea", "Paris", "1 2 3", "日本", "🙂", "def f(x):"]
    config = engine_config(model_dir, kv_cache_dtype="float32", cpu_matmul_dtype="float32")
    with LiveServer(create_app(config)) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        for trial in range(30):
            chat = trial % 2 == 0
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
            most = rng.randint(1, 30)
            args = dict(model=MODEL, max_tokens=most, seed=rng.randint(0, 999),
                        temperature=rng.choice([0, 0.7, 1.3]), top_p=rng.choice([1.0, 0.9]), n=rng.choice([1, 2, 3]),
                        presence_penalty=rng.choice([0, 0.5]),
                        stop=rng.sample(["e", " the", ".", "\n", "ing", "🙂", "th", "an"], rng.randint(0, 3)) or None,
                        extra_body=dict(min_tokens=rng.choice([0, 0, min(3, most)]),
                                        include_stop_str_in_output=rng.random() < 0.3))
            if chat:
                args.update(messages=[{"role": "user", "content": prompt}],
                            **(dict(logprobs=True, top_logprobs=2) if rng.random() < 0.4 else {}))
            else:
                args.update(prompt=prompt, logprobs=rng.choice([None, 2]), echo=rng.random() < 0.2)
            streamed, whole, streamed_usage, whole_usage = _streamed_and_whole(client, chat, args)
            assert streamed == whole and streamed_usage == whole_usage, (trial, args)
        live.wait_pool_full()


def test_token_ids_come_back_with_the_text(server, client):
    """return_token_ids (vLLM's, what RL pipelines train on): the prompt's ids and each reply's, beside the text,
    whole or as streamed (the prompt's on each choice's first chunk, then the ids each chunk adds); a scored
    prompt's reply has none. Without it the fields are absent."""
    messages = [{"role": "user", "content": "Count: one, two,"}]
    prompt = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()["tokens"]
    args = dict(model=MODEL, messages=messages, max_tokens=9, temperature=0, n=2,
                extra_body={"return_token_ids": True, "ignore_eos": True})
    full = client.chat.completions.create(**args)
    assert full.prompt_token_ids == prompt
    for choice in full.choices:
        detokenized = httpx.post(server.url + "/detokenize", json={"tokens": choice.token_ids}).json()["prompt"]
        assert len(choice.token_ids) == 9 and detokenized == choice.message.content
    chunks = list(client.chat.completions.create(**args, stream=True))
    for index in (0, 1):
        mine = [c for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].prompt_token_ids == prompt and not any(c.model_extra.get("prompt_token_ids") for c in mine[1:])
        assert [t for c in mine for t in c.choices[0].token_ids] == full.choices[index].token_ids
    assert "token_ids" not in client.chat.completions.create(**{**args, "extra_body": {}}).choices[0].model_extra

    text_args = dict(model=MODEL, prompt=["The capital", "Once upon"], max_tokens=5, temperature=0, echo=True,
                     extra_body={"return_token_ids": True, "ignore_eos": True})
    whole = client.completions.create(**text_args)
    streamed = list(client.completions.create(**text_args, stream=True))
    for choice, text in zip(whole.choices, text_args["prompt"]):
        ids = httpx.post(server.url + "/tokenize", json={"prompt": text}).json()["tokens"]
        assert choice.prompt_token_ids == ids and len(choice.token_ids) == 5
        mine = [c.choices[0] for c in streamed if c.choices[0].index == choice.index]
        assert mine[0].prompt_token_ids == ids and not any(c.model_extra.get("prompt_token_ids") for c in mine[1:])
        assert [t for c in mine for t in c.token_ids] == choice.token_ids
    scored = client.completions.create(**{**text_args, "max_tokens": 0, "prompt": "The capital"})
    assert scored.choices[0].token_ids == [] and scored.choices[0].prompt_token_ids


def test_cache_salt_keeps_prefix_cache_hits_within_a_salt(client):
    """vLLM's cache_salt: a prompt's cached blocks serve only requests of the same salt (one tenant cannot time
    whether another's prompt began as its own), and unsalted requests share among themselves as before."""
    prompt = "A salted prompt long enough for a few blocks: " + "one two three four five six seven " * 6

    def cached(**salt) -> int:
        completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body=salt)
        return completion.usage.prompt_tokens_details.cached_tokens

    assert cached(cache_salt="tenant-a") == 0
    assert cached(cache_salt="tenant-a") > 0
    assert cached(cache_salt="tenant-b") == 0
    assert cached() == 0 and cached() > 0
    with pytest.raises(openai.BadRequestError) as refused:
        cached(cache_salt="")
    assert refused.value.body["param"] == "cache_salt"


def test_continuous_usage_stats_on_every_chunk(client):
    """vLLM's stream_options.continuous_usage_stats (with include_usage): each chunk of a choice carries that
    choice's usage so far (its prompt, its tokens up to then; chat's first chunk none yet), and the last chunk
    the whole request's, as without it; without include_usage, no usage at all, as OpenAI's default."""
    continuous = {"include_usage": True, "continuous_usage_stats": True}
    common = dict(model=MODEL, max_tokens=5, n=2, temperature=1.0, seed=1, extra_body={"ignore_eos": True})
    streams = {"completions": list(client.completions.create(prompt="Once upon a time", stream=True,
                                                             stream_options=continuous, **common)),
               "chat": list(client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], stream=True,
                                                           stream_options=continuous, **common))}
    for kind, chunks in streams.items():
        *parts, last = chunks
        assert last.choices == [] and last.usage.completion_tokens == 10, kind
        so_far: dict[int, list[int]] = {0: [], 1: []}
        for part in parts:
            (choice,) = part.choices
            usage = part.usage
            assert usage.prompt_tokens == last.usage.prompt_tokens, kind  # (the one prompt, counted once there)
            assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
            so_far[choice.index].append(usage.completion_tokens)
        for counts in so_far.values():
            assert counts == sorted(counts) and counts[-1] == 5, (kind, counts)
        if kind == "chat":
            assert [c.usage.completion_tokens for c in parts if c.choices[0].delta.role] == [0, 0]
    # continuous_usage_stats alone (no include_usage): no usage in any chunk
    alone = client.completions.create(prompt="Once upon a time", stream=True,
                                      stream_options={"continuous_usage_stats": True}, **common)
    assert all(chunk.usage is None and chunk.choices for chunk in alone)
    # a scored prompt (echo, max_tokens 0) generates nothing, chunk by chunk too
    scored = client.completions.create(model=MODEL, prompt="Hello", max_tokens=0, echo=True, logprobs=1, stream=True,
                                       stream_options=continuous)
    assert {chunk.usage.completion_tokens for chunk in scored} == {0}


def test_predicted_outputs_keep_the_reply_and_report_what_was_accepted(server, client):
    """OpenAI's Predicted Outputs through the official client: the reply is the one without a prediction,
    and the usage says how many of the prediction's tokens were accepted as drafts."""
    args = dict(model=MODEL, messages=[{"role": "user", "content": "Repeat after me"}], max_tokens=24,
                temperature=0, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**args)
    text = plain.choices[0].message.content
    predicted = client.chat.completions.create(**args, prediction={"type": "content", "content": text})
    assert predicted.choices[0].message.content == text
    details = predicted.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0
    assert details.accepted_prediction_tokens + details.rejected_prediction_tokens == \
        httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["count"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**args, prediction={"type": "file", "content": text})


def test_embeddings_through_the_official_client(server, client, model_dir):
    """/v1/embeddings: one normalized vector per input, in order, transformers' last hidden state of the
    last token; base64 decodes to the same values; refusals in the envelope."""
    import base64

    import numpy as np

    texts = ["The capital of France is Paris.", "Hello, world!"]
    result = client.embeddings.create(model=MODEL, input=texts)
    assert [d.index for d in result.data] == [0, 1] and result.model == MODEL
    reference = load_reference_model(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for text, item in zip(texts, result.data):
        with torch.no_grad():
            hidden = reference.model(torch.tensor([tokenizer(text)["input_ids"]])).last_hidden_state[0, -1]
        torch.testing.assert_close(torch.tensor(item.embedding), torch.nn.functional.normalize(hidden, dim=0),
                                   atol=2e-3, rtol=1e-3)  # the server's CPU products round to bf16 or int8
    assert result.usage.prompt_tokens == result.usage.total_tokens == sum(len(tokenizer(t)["input_ids"]) for t in texts)
    packed = httpx.post(server.url + "/v1/embeddings", json={"input": texts[1], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == pytest.approx(result.data[1].embedding, abs=1e-6)
    ids = client.embeddings.create(model=MODEL, input=[tokenizer(texts[1])["input_ids"]]).data[0].embedding
    assert ids == pytest.approx(result.data[1].embedding, abs=1e-6)
    for bad, param in (({"input": []}, "input"), ({"input": "x", "dimensions": 3}, "dimensions"),
                       ({"input": [True]}, "input"), ({"input": [[5, False]]}, "input")):  # (no token ids 1 and 0)
        assert error_of(httpx.post(server.url + "/v1/embeddings", json=bad), 400)["param"] == param


def test_a_prompt_past_the_context_names_each_endpoints_field(server):
    """A prompt past the context: OpenAI's code and vLLM's words, the prompt named as each endpoint's client sent it."""
    ids = list(range(300))  # past this server's max_model_len of 256
    words = "word " * 400
    for route, body, param in (("/v1/completions", {"prompt": ids}, "prompt"),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": words}]},
                                "messages"),
                               ("/v1/embeddings", {"input": ids}, "input"),
                               ("/v1/responses", {"input": words}, "input")):
        error = error_of(httpx.post(server.url + route, json={"model": MODEL, "max_tokens": 2, **body}), 400)
        assert error["param"] == param and error["code"] == "context_length_exceeded", (route, error)
        assert error["message"].startswith("This model's maximum context length is 256 tokens. However, your "
                                           "request has "), (route, error)
    # a prompt and max_tokens past it: the same code, in vLLM's words (client libraries read either as an overflow)
    error = error_of(httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": ids[:250],
                                                                       "max_tokens": 10}), 400)
    assert (error["param"], error["code"]) == ("max_tokens", "context_length_exceeded")
    assert error["message"] == "'max_tokens' is too large: 10. This model's maximum context length is 256 tokens " \
        "and your request has 250 input tokens (10 > 256 - 250)."


def test_n_choices_with_seed_are_reproducible(client):
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, n=3, seed=7,
                extra_body={"ignore_eos": True})
    first, second = client.completions.create(**args), client.completions.create(**args)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1  # seed + i: the choices differ
    assert first.usage.completion_tokens == 24
    streamed = {}
    for chunk in client.completions.create(**args, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(3)] == [c.text for c in first.choices]


def test_stop_sequence_cuts_the_text(client):
    args = dict(model=MODEL, prompt="To be, or not to be", max_tokens=16, temperature=0,
                extra_body={"ignore_eos": True})
    text = client.completions.create(**args).choices[0].text
    stop = text[5:8]
    cut = client.completions.create(**args, stop=[stop, "never appears"]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.index(stop)]
    kept = client.completions.create(**{**args, "extra_body": {"ignore_eos": True, "include_stop_str_in_output": True}},
                                     stop=[stop]).choices[0]
    assert kept.text == text[:text.index(stop)] + stop


def test_logprobs_shapes(server, client):
    prompt = "Hello, world!"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True,
                                  extra_body={"ignore_eos": True})
    choice = r.choices[0]
    prompt_len = r.usage.prompt_tokens
    lp = choice.logprobs
    assert choice.text.startswith(prompt) and len(lp.tokens) == prompt_len + 4
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])  # the prompt's too
    # the 2 most likely and the token itself (OpenAI: up to logprobs + 1)
    assert all(2 <= len(top) <= 3 and token in top for token, top in zip(lp.tokens[1:], lp.top_logprobs[1:]))
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True, stream=True,
        extra_body={"ignore_eos": True}) if c.choices and c.choices[0].logprobs]
    assert [x for part in streamed for x in part.token_logprobs] == pytest.approx(lp.token_logprobs)
    # max_tokens 0 with echo scores the prompt: its text and logprobs, nothing generated
    scored = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, logprobs=1, echo=True)
    assert scored.choices[0].text == prompt and scored.choices[0].finish_reason == "length"
    assert scored.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:prompt_len])
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == prompt_len
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, logprobs=1, echo=True,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == prompt
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=0)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs[prompt_len:])
    sampled = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.5, seed=3,
                                        logprobs=0, extra_body={"ignore_eos": True}).choices[0].logprobs
    assert all(top == {token: logprob} for token, top, logprob in
               zip(sampled.tokens, sampled.top_logprobs, sampled.token_logprobs))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[prompt_len] == len(prompt)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=3,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 for t in content)
    # greedy: the sampled token is the most likely one
    assert all(t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5) for t in content)


def test_prompt_logprobs_as_vllm_gives_them(server, client):
    """vLLM's prompt_logprobs on completions (per choice) and chat (on the response): per prompt token, None for
    the first, then the token and the k likeliest by id, each with its logprob, rank (1 + the tokens likelier)
    and text; the token's logprob is the echoed prompt's. Not with stream, as vLLM's."""
    prompt = "Hello, world! How are you"
    k = 3
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={"prompt_logprobs": k})
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, logprobs=1, echo=True)
    ids = httpx.post(server.url + "/tokenize", json={"prompt": prompt}).json()["tokens"]
    entries = whole.choices[0].prompt_logprobs
    assert len(entries) == len(ids) and entries[0] is None
    for token, entry, logprob in zip(ids[1:], entries[1:], echoed.choices[0].logprobs.token_logprobs[1:]):
        mine = entry[str(token)]
        assert next(iter(entry)) == str(token)  # the prompt token first, as vLLM's (scorers read the first value)
        assert mine["logprob"] == pytest.approx(logprob, abs=1e-5)
        best = sorted(entry.values(), key=lambda e: e["rank"])
        assert [e["rank"] for e in best[:k]] == [1, 2, 3] and best[0]["logprob"] >= best[1]["logprob"] >= best[2]["logprob"]
        likelier = [e for e in best[:k] if e["logprob"] > mine["logprob"]]
        assert mine["rank"] == len(likelier) + 1 if mine["rank"] <= k else mine["logprob"] <= best[k - 1]["logprob"]
    messages = [{"role": "user", "content": "hi there"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, extra_body={"prompt_logprobs": 0})
    counted = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()["count"]
    assert len(chat.prompt_logprobs) == counted and all(len(entry) == 1 for entry in chat.prompt_logprobs[1:])
    assert "prompt_logprobs" not in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).model_extra
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, stream=True, extra_body={"prompt_logprobs": 1})
    assert refused.value.body["param"] == "prompt_logprobs"


def test_return_tokens_as_token_ids_names_logprobs_tokens_by_id(server, client, model_dir):
    """vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:{id}" (completions' tokens, the keys of
    top_logprobs and the echoed prompt's; chat's token and top_logprobs, `bytes` those of the name); the text,
    logprob values and text offsets (still the text's) stay as they were. --return-tokens-as-token-ids makes it
    the default, which a request may turn off, and the Responses API's logprobs follow it too."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    as_ids = {"ignore_eos": True, "return_tokens_as_token_ids": True}
    token_id = lambda name: int(re.fullmatch(r"token_id:(\d+)", name)[1])  # noqa: E731
    args = dict(model=MODEL, prompt="Hello, world!", max_tokens=4, temperature=0, logprobs=2, echo=True)
    plain = client.completions.create(**args, extra_body={"ignore_eos": True}).choices[0]
    named = client.completions.create(**args, extra_body=as_ids).choices[0]
    ids = [token_id(name) for name in named.logprobs.tokens]
    # (the text leaves out special tokens, which ignore_eos may generate: the tiny model's greedy tokens depend on
    # the CPU's product forms)
    assert named.text == plain.text and tokenizer.decode(ids, skip_special_tokens=True) == plain.text
    token_bytes = TokenBytes(tokenizer)

    def by_text(i: int) -> str:
        """How legacy logprobs name a token by text: a part of a character by its bytes."""
        text = tokenizer.decode([i])
        return "bytes:" + "".join(f"\\x{b:02x}" for b in token_bytes(i)) if "\ufffd" in text else text

    assert [by_text(i) for i in ids] == plain.logprobs.tokens
    assert named.logprobs.text_offset == plain.logprobs.text_offset
    assert named.logprobs.token_logprobs == pytest.approx(plain.logprobs.token_logprobs)
    assert named.logprobs.top_logprobs[0] is None  # the echoed prompt's first token
    for ours, theirs in zip(named.logprobs.top_logprobs[1:], plain.logprobs.top_logprobs[1:]):
        assert {by_text(token_id(name)) for name in ours} == set(theirs)
    streamed = [name for chunk in client.completions.create(**args, stream=True, extra_body=as_ids) if chunk.choices
                and chunk.choices[0].logprobs for name in chunk.choices[0].logprobs.tokens]
    assert streamed == named.logprobs.tokens
    chat_args = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
                     logprobs=True, top_logprobs=2)
    plain_chat = client.chat.completions.create(**chat_args, extra_body={"ignore_eos": True}).choices[0]
    chat = client.chat.completions.create(**chat_args, extra_body=as_ids).choices[0]
    assert chat.message.content == plain_chat.message.content
    content = chat.logprobs.content
    assert tokenizer.decode([token_id(entry.token) for entry in content], skip_special_tokens=True) == \
        chat.message.content
    for entry, theirs in zip(content, plain_chat.logprobs.content):
        assert entry.bytes == list(entry.token.encode()) and entry.logprob == pytest.approx(theirs.logprob)
        assert [tokenizer.decode([token_id(top.token)]) for top in entry.top_logprobs] == \
            [top.token for top in theirs.top_logprobs]
        assert all(top.bytes == list(top.token.encode()) for top in entry.top_logprobs)
    app = create_app(engine_config(model_dir), ServeSettings(return_tokens_as_token_ids=True))
    with LiveServer(app) as live:
        flagged = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        by_default = flagged.completions.create(**args, extra_body={"ignore_eos": True}).choices[0]
        assert by_default.logprobs.tokens == named.logprobs.tokens
        turned_off = flagged.completions.create(**args, extra_body={"ignore_eos": True,
                                                                    "return_tokens_as_token_ids": False})
        assert turned_off.choices[0].logprobs.tokens == plain.logprobs.tokens
        chat_default = flagged.chat.completions.create(**chat_args, extra_body={"ignore_eos": True}).choices[0]
        assert [entry.token for entry in chat_default.logprobs.content] == [entry.token for entry in content]
        reply = flagged.responses.create(model=MODEL, input="hi", max_output_tokens=4, temperature=0, top_logprobs=2,
                                         include=["message.output_text.logprobs"], store=False)
        assert all(token_id(entry.token) >= 0 for entry in reply.output[0].content[0].logprobs)


def test_token_prompts_and_detokenize(server, client):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "Hello, world!"}).json()["tokens"]
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json() == {"prompt": "Hello, world!"}
    by_text = client.completions.create(model=MODEL, prompt="Hello, world!", max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=5, temperature=0)
    assert [c.text for c in by_ids.choices] == [by_text.choices[0].text] * 2
    assert by_ids.usage.prompt_tokens == 2 * len(ids)


def test_logit_bias_through_the_openai_client(server, client):
    token = httpx.post(server.url + "/tokenize", json={"prompt": " castle"}).json()["tokens"][-1]
    expected = httpx.post(server.url + "/detokenize", json={"tokens": [token] * 3}).json()["prompt"]
    forced = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0,
                                       logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == expected
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0.7, logit_bias={str(token): 100},
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == expected
    held = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0,
                                     logit_bias={str(token): 100},
                                     extra_body={"stop_token_ids": [token], "min_tokens": 3})
    assert held.choices[0].finish_reason == "stop" and held.usage.completion_tokens == 4
    post = lambda body: httpx.post(server.url + "/v1/completions", json={"prompt": "x", **body})  # noqa: E731
    for bias in ({"abc": 1}, {"10000000": 1}, {str(token): 200}, {"1" * 5000: 1}):
        error = error_of(post({"logit_bias": bias}), 400)
        assert error["param"] == "logit_bias" and "int_max_str_digits" not in error["message"], error


def test_allowed_token_ids_and_bad_words_through_the_openai_client(server, client):
    """vLLM's token filters: only allowed_token_ids are sampled, and bad_words never appear."""
    a, b = (httpx.post(server.url + "/tokenize", json={"prompt": letter}).json()["tokens"][0] for letter in "ab")
    only_a = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0,
                                       extra_body={"allowed_token_ids": [a], "ignore_eos": True})
    assert only_a.choices[0].text == "aaaa"
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0.9, extra_body={"allowed_token_ids": [a, b],
                                                                       "bad_words": ["a"], "ignore_eos": True})
    assert chat.choices[0].message.content == "bbbb"
    post = lambda body: httpx.post(server.url + "/v1/completions", json={"prompt": "x", **body})  # noqa: E731
    for body in ({"allowed_token_ids": [10000000]}, {"allowed_token_ids": []}, {"bad_words": "a"},
                 {"bad_words": [""]}):
        assert error_of(post(body), 400)["param"] == next(iter(body))
    # every allowed token a bad word: a 400 up front (every step's row had no token: a 500, which SDKs retry)
    assert error_of(post({"allowed_token_ids": [a], "bad_words": ["a"]}), 400)["param"] == "allowed_token_ids"
    # constraints that only sampling finds leave nothing (the only allowed token a stop token before min_tokens,
    # a grammar none of whose tokens is allowed): a 400 too, where a model gone NaN stays a 500
    for body in ({"allowed_token_ids": [a], "stop_token_ids": [a], "min_tokens": 2},
                 {"allowed_token_ids": [a], "guided_choice": ["yes", "no"]}):
        if "guided_choice" in body and importlib.util.find_spec("xgrammar") is None:
            continue
        assert error_of(post({**body, "max_tokens": 3}), 400)["code"] == "invalid_value"
        # streamed, the error event is the same 400's (it was a 500's engine_error)
        streamed = post({**body, "max_tokens": 3, "stream": True}).text.split("\n\n")
        error = next(json.loads(line[6:]) for line in streamed if line.startswith("data: {") and "error" in line)
        assert error["error"]["type"] == "invalid_request_error" and error["error"]["code"] == "invalid_value"
        assert streamed[-2] == "data: [DONE]"


def test_grammars_compile_on_a_thread_of_their_own(server, client, monkeypatch):
    """A JSON schema's grammar can take a second to compile, a long regex a minute: not on the server's loop, which
    would hold every stream meanwhile, nor on the engine's thread, where every user's generation stopped (a 50 KB
    regex: 13 s), but on a thread of its own."""
    pytest.importorskip("xgrammar")
    structured = server.engine.engine.structured
    compiled_on, check = [], structured.check

    def noting_the_thread(spec):
        if spec not in structured._grammars:
            compiled_on.append(threading.current_thread().name)
        return check(spec)

    monkeypatch.setattr(structured, "check", noting_the_thread)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                           temperature=0, extra_body={"guided_regex": "[a-c]{5}x"})
    assert re.fullmatch("[a-c]{5}x", reply.choices[0].message.content)
    assert len(compiled_on) == 1 and compiled_on[0].startswith("lcq-grammar"), compiled_on


def test_legacy_logprobs_name_parts_of_characters_by_their_bytes(client):
    """Tokens that are parts of a character (U+FFFD as text) are named "bytes:\\xNN..." as OpenAI names them:
    by text they would collide as keys of top_logprobs, which then lost alternatives."""
    out = client.completions.create(model=MODEL, prompt="x", max_tokens=12, temperature=0, logprobs=5,
                                    extra_body={"guided_regex": "é€😀"})
    assert out.choices[0].text == "é€😀"
    lp = out.choices[0].logprobs
    parts = [token for token in lp.tokens if token.startswith("bytes:")]
    assert len(parts) > 3
    assert b"".join(bytes.fromhex(token[6:].replace("\\x", "")) for token in parts) == "é€😀".encode()
    assert all(len(top) >= 5 for top in lp.top_logprobs)  # 5 alternatives each, and the chosen one


def test_text_offsets_index_into_the_text(client, model_dir):
    """Each legacy text_offset is where its token's text starts in `text`: a token counts what it added to the
    text, so the pieces of a character split over tokens all start where the character does and a skipped
    special token adds nothing (they counted each piece's U+FFFD and the special token's name, which ran past
    the text's end); in an echoed prompt and the reply, streamed and not."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    special = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    marker = tokenizer.convert_tokens_to_ids("<|im_start|>")

    def token_bytes(name: str) -> bytes:
        return bytes.fromhex(name[6:].replace("\\x", "")) if name.startswith("bytes:") else \
            b"" if name in special else name.encode()

    for request in (dict(prompt="café 東京", echo=True, extra_body={"guided_regex": "é€😀 ok"}),
                    dict(prompt="café 東京", extra_body={"guided_regex": "é€😀 ok"}),
                    dict(prompt="Hi", echo=True, max_tokens=3, logit_bias={str(marker): 100}, temperature=0)):
        request = {"model": MODEL, "max_tokens": 24, "temperature": 0.5, "seed": 1, "logprobs": 0, **request}
        choice = client.completions.create(**request).choices[0]
        written = b""  # the text of the tokens so far: an offset is its whole characters' length
        for name, offset in zip(choice.logprobs.tokens, choice.logprobs.text_offset):
            assert offset == len(codecs.getincrementaldecoder("utf-8")("replace").decode(written)), choice.logprobs
            written += token_bytes(name)
        assert written.decode() == choice.text and choice.logprobs.text_offset[-1] <= len(choice.text)
        streamed = [offset for chunk in client.completions.create(**request, stream=True) if chunk.choices
                    for offset in (chunk.choices[0].logprobs.text_offset if chunk.choices[0].logprobs else [])]
        assert streamed == choice.logprobs.text_offset
    # a byte that is no character's is one U+FFFD in the text, and counts one (it counted none: every later offset
    # was one short); a special token written in a text prompt is in the echo as written, and counts its length
    # (it counted none); each offset indexes its token's text
    lone = tokenizer.convert_tokens_to_ids(byte_level_alphabet()[0xB9])  # a continuation byte, alone
    lead = tokenizer.convert_tokens_to_ids(byte_level_alphabet()[0xF2])  # a 4-byte character's first, never finished
    for prompt, text in ((tokenizer.encode("Hi") + [lone] + tokenizer.encode(" there"), "Hi\ufffd there"),
                         (tokenizer.encode("Hi") + [lead] + tokenizer.encode(" there"), "Hi\ufffd there"),
                         ("Hi<|im_end|>there", "Hi<|im_end|>there")):
        choice = client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=0, logprobs=0).choices[0]
        assert choice.text == text
        for name, offset in zip(choice.logprobs.tokens, choice.logprobs.text_offset):
            assert text[offset:].startswith("\ufffd" if name.startswith("bytes:") else name), choice.logprobs


def test_developer_messages_are_system_messages_for_templates_without_them(server):
    """OpenAI's developer role is the system role's newer name: a template that does not name it (here the
    test model's, which would write any role) gets a system message."""
    def prompt(role: str) -> list[int]:
        messages = [{"role": role, "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        return httpx.post(server.url + "/tokenize", json={"messages": messages}).json()["tokens"]

    assert prompt("developer") == prompt("system") != prompt("user")


def test_chat_logprobs_bytes_put_split_characters_together(client):
    """Each token of a character split over tokens shows as U+FFFD, and its `bytes` are its part of the
    character's UTF-8, so that the parts put together give it (OpenAI's reason for `bytes`)."""
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                           temperature=0, logprobs=True, top_logprobs=2,
                                           extra_body={"guided_regex": "é€😀"})
    assert reply.choices[0].message.content == "é€😀"
    tokens = [t for t in reply.choices[0].logprobs.content if t.token != "<|im_end|>"]  # (the grammar's end)
    assert len(tokens) > 3 and {t.token for t in tokens} == {"\ufffd"}
    assert b"".join(bytes(t.bytes) for t in tokens) == "é€😀".encode("utf-8")


def test_tokenize_renders_tools_and_names_tokens(model_dir):
    """/tokenize counts what chat runs, the tools the template describes included (clients budget context
    with it), and returns the tokens' vocabulary entries with vLLM's return_token_strs."""
    pytest.importorskip("xgrammar")
    template = ("{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}"
                "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris"]}}, "required": ["city"]}}}
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    with LiveServer(create_app(engine_config(model_dir, chat_template=template))) as live:
        tokenize = lambda body: httpx.post(live.url + "/tokenize", json=body).json()  # noqa: E731
        plain, tooled = tokenize({"messages": messages}), tokenize({"messages": messages, "tools": [weather]})
        assert tooled["count"] > plain["count"] and plain["token_strs"] is None
        chat = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0).chat.completions.create(
            model=MODEL, messages=messages, tools=[weather], tool_choice="required", max_tokens=40)
        assert chat.usage.prompt_tokens == tooled["count"]
        named = tokenize({"prompt": "hello world", "return_token_strs": True})
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        assert named["token_strs"] == tokenizer.convert_ids_to_tokens(named["tokens"]) and len(named["tokens"]) > 1


def test_embeddings_of_a_whole_context_and_of_many_inputs(server, client, small_server):
    """A pooling request makes no token: a prompt of the whole context is embedded (one more is a 400); the
    inputs of one request are admitted whole, even past a queue of one (a 429 before); OpenAI's 2,048 at most."""
    assert len(client.embeddings.create(model=MODEL, input=[[5] * 256]).data[0].embedding) > 0
    assert error_of(httpx.post(server.url + "/v1/embeddings", json={"input": [[5] * 257]}), 400)["param"] == "input"
    many = httpx.post(small_server.url + "/v1/embeddings", json={"input": [f"text {i}" for i in range(6)]},
                      headers={"Authorization": "Bearer sekret"})
    assert many.status_code == 200 and [d["index"] for d in many.json()["data"]] == list(range(6))
    too_many = httpx.post(server.url + "/v1/embeddings", json={"input": ["x"] * 2049})
    assert error_of(too_many, 400)["param"].startswith("input")


def test_an_adapter_unloaded_after_the_lookup_is_model_not_found():
    """The engine's refusal of an adapter unloaded between the server's lookup and the queue is OpenAI's 404
    for an unknown model, as the lookup's own."""
    from lcq.runtime import AdapterNotFoundError
    from lcq.server.errors import engine_error

    refused = engine_error(AdapterNotFoundError("the model `sql` does not exist"))
    assert (refused.status, refused.code, refused.param) == (404, "model_not_found", "model")


def test_a_request_names_its_adapter_to_the_engine_whatever_was_unloaded_since(server):
    """Any model name but the base model's goes to the engine as an adapter, so that one unloaded between the
    request's check and its generation is the engine's 404; looked up again, it had run on the base model."""
    state = server.app.state.lcq
    assert state.adapter_for(CompletionRequest(model="gone", prompt="x")) == "gone"
    assert state.adapter_for(CompletionRequest(model=MODEL, prompt="x")) is None
    assert state.adapter_for(CompletionRequest(prompt="x")) is None
    assert state.adapter_for(CompletionRequest(model="", prompt="x")) is None  # (an empty name is none: a 404 before)
    assert httpx.post(server.url + "/v1/completions", json={"model": "", "prompt": "x", "max_tokens": 1}).json()[
        "model"] == MODEL


def test_stream_options_need_stream(server):
    """As OpenAI's API and vLLM answer: stream_options on a request that does not stream is a 400."""
    for route, body in (("/v1/completions", {"prompt": "x"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                        ("/v1/responses", {"input": "x"})):
        refused = httpx.post(server.url + route, json={**body, "stream_options": {"include_usage": True}})
        assert error_of(refused, 400)["param"] == "stream_options", route


def test_priority_is_taken_and_checked(server, client):
    """vLLM's priority: taken by both endpoints; other than 0 where the server schedules fcfs (the fixture's), a
    400 in vLLM's words, as gateways learn from it that priorities are not honoured; not an integer, a 400."""
    reply = client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"priority": 0,
                                                                                          "ignore_eos": True})
    assert reply.usage.completion_tokens == 2
    for route, body in (("/v1/completions", {"prompt": "x"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        refused = httpx.post(server.url + route, json={**body, "max_tokens": 2, "priority": "high"})
        assert error_of(refused, 400)["param"] == "priority"
        ignored = httpx.post(server.url + route, json={**body, "max_tokens": 2, "priority": -5})
        assert "Got priority -5 but Priority scheduling is not enabled" in error_of(ignored, 400)["message"]


def test_tool_calls_and_insertion_are_refused_not_ignored(client):
    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    functions = [tool["function"] for tool in tools]
    for extra, param in [(dict(tools=tools), "tool_choice"), (dict(tools=tools, tool_choice="auto"), "tool_choice"),
                         (dict(tools=tools, tool_choice="sometimes"), "tool_choice"),
                         (dict(tools=tools, tool_choice={"type": "function"}), "tool_choice"),
                         (dict(tool_choice="required"), "tool_choice"), (dict(tool_choice="none"), "tool_choice"),
                         (dict(tools=[], tool_choice="required"), "tool_choice"),
                         (dict(tool_choice={"type": "function", "function": {"name": "f"}}), "tool_choice"),
                         (dict(functions=functions), "functions"),
                         (dict(tools=tools, tool_choice={"type": "function", "function": {"name": "g"}}), "tool_choice")]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, **extra)
        assert refused.value.body["param"] == param
    for extra, param in [(dict(best_of=3), "best_of"), (dict(suffix=" end"), "suffix")]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, **extra)
        assert refused.value.body["param"] == param
    for extra in (dict(response_format={"type": "text"}), dict(tools=tools, tool_choice="none"),
                  dict(functions=functions, function_call="none"),
                  dict(tools=tools, tool_choice="none", parallel_tool_calls=None)):
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, **extra)
        assert reply.choices[0].message.content is not None
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=2, best_of=2).choices
    with pytest.raises(openai.BadRequestError) as refused:  # fewer than n: wrong, not unsupported (vLLM's words)
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=2, best_of=1)
    assert refused.value.body["message"] == "best_of must be greater than or equal to n, got n=2 and best_of=1."
    assert refused.value.body["code"] == "invalid_value"


def test_chat_template_options(server, client):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]
    tokenize = lambda **options: httpx.post(server.url + "/tokenize", json={"messages": messages, **options})  # noqa: E731
    detokenize = lambda ids: httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"]  # noqa: E731
    continued = tokenize(add_generation_prompt=False, continue_final_message=True).json()
    assert detokenize(continued["tokens"]).endswith("The answer is")
    assert detokenize(tokenize().json()["tokens"]).endswith("<|im_start|>assistant\n")
    assert detokenize(tokenize(chat_template_kwargs={"preamble": "Be brief."}).json()["tokens"]).startswith("Be brief.")
    assert error_of(tokenize(continue_final_message=True), 400)["param"] == "continue_final_message"
    # OpenAI's reasoning_effort reaches the template (gpt-oss's system message), unless the kwargs set it
    assert detokenize(tokenize(reasoning_effort="low").json()["tokens"]).startswith("Reasoning: low\n")
    assert detokenize(tokenize(reasoning_effort="low", chat_template_kwargs={"reasoning_effort": "high"}).json()[
        "tokens"]).startswith("Reasoning: high\n")
    assert "Reasoning:" not in detokenize(tokenize().json()["tokens"])
    assert error_of(tokenize(reasoning_effort="extreme"), 400)["param"] == "reasoning_effort"
    assert error_of(tokenize(chat_template_kwargs={"tokenize": True}), 400)["param"] == "chat_template_kwargs"
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                           extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert reply.usage.prompt_tokens == continued["count"]


def test_add_special_tokens_as_each_endpoint_defaults_it(model_dir, tmp_path):
    """vLLM's add_special_tokens, under a tokenizer that starts what it encodes with a BOS (the tiny one adds
    nothing): completions add it to text prompts unless asked not to, token prompts stay as sent; chat adds
    none to the rendered template unless asked; /tokenize counts as those endpoints do."""
    import shutil

    from tokenizers.processors import TemplateProcessing

    folder = shutil.copytree(model_dir, tmp_path / "with-bos")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                                    special_tokens=[("<|endoftext|>", bos)])
    tokenizer.save_pretrained(folder)
    messages = [{"role": "user", "content": "Hello"}]
    with LiveServer(create_app(engine_config(folder), ServeSettings())) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        tokenize = lambda **body: httpx.post(live.url + "/tokenize", json=body).json()["tokens"]  # noqa: E731
        plain, rendered = tokenize(prompt="Hello", add_special_tokens=False), tokenize(messages=messages)
        assert tokenize(prompt="Hello") == [bos, *plain] and bos not in rendered
        assert tokenize(messages=messages, add_special_tokens=True) == [bos, *rendered]

        def prompt_tokens(prompt, **extra) -> int:
            return client.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                             extra_body=extra).usage.prompt_tokens

        assert prompt_tokens("Hello") == len(plain) + 1
        assert prompt_tokens("Hello", add_special_tokens=False) == len(plain)
        assert prompt_tokens(plain, add_special_tokens=True) == prompt_tokens(plain) == len(plain)
        chat = lambda **extra: client.chat.completions.create(  # noqa: E731
            model=MODEL, messages=messages, max_tokens=1, extra_body=extra).usage.prompt_tokens
        assert chat() == chat(add_special_tokens=False) == len(rendered)
        assert chat(add_special_tokens=True) == len(rendered) + 1


def test_truncate_prompt_tokens_keeps_the_prompts_end(server, client):
    ids = list(range(300))  # past this server's max_model_len of 256
    kept = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, echo=True,
                                     extra_body={"truncate_prompt_tokens": 100})
    assert kept.usage.prompt_tokens == 100
    assert kept.choices[0].text.startswith(httpx.post(server.url + "/detokenize", json={"tokens": ids[-100:]})
                                           .json()["prompt"])
    messages = [{"role": "user", "content": "word " * 400}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                          extra_body={"truncate_prompt_tokens": 50})
    assert chat.usage.prompt_tokens == 50
    with pytest.raises(openai.BadRequestError, match="-1 .* or at least 1"):
        client.completions.create(model=MODEL, prompt=ids, max_tokens=2, extra_body={"truncate_prompt_tokens": 0})
    # -1 (vLLM's): as many as the context holds, here an embedding input's 256; beside a reply, what the context
    # leaves it (a prompt cut to the whole context was refused: no room to generate)
    whole = client.embeddings.create(model=MODEL, input=[ids], extra_body={"truncate_prompt_tokens": -1})
    assert whole.usage.prompt_tokens == 256
    fitted = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, extra_body={"truncate_prompt_tokens": -1,
                                                                                          "ignore_eos": True})
    assert (fitted.usage.prompt_tokens, fitted.usage.completion_tokens) == (252, 4)
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                          extra_body={"truncate_prompt_tokens": -1})
    assert chat.usage.prompt_tokens == 250


def test_forced_tool_calls(client):
    pytest.importorskip("xgrammar")
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"enum": [1, 2, 3]}},
        "required": ["city", "days"], "additionalProperties": False}}}
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}}}
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[weather, clock], tool_choice=named,
                                           max_tokens=100, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert arguments["city"] in ("Paris", "Oslo") and arguments["days"] in (1, 2, 3)
    required = client.chat.completions.create(model=MODEL, messages=messages, tools=[weather, clock],
                                              tool_choice="required", max_tokens=100, temperature=0.8, seed=2)
    assert required.choices[0].finish_reason == "tool_calls"
    call = required.choices[0].message.tool_calls[0]
    assert call.function.name in ("get_weather", "get_time") and isinstance(json.loads(call.function.arguments), dict)
    # a response_format is the form of a text answer, which a forced call leaves none of: the call wins, as vLLM's
    # (the Agents SDK sends its output_type so beside tool_choice "required"; it was a 400)
    answer_format = {"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"}}}
    formatted = client.chat.completions.create(model=MODEL, messages=messages, tools=[weather, clock],
                                               tool_choice="required", max_tokens=100, temperature=0.8, seed=2,
                                               response_format=answer_format)
    assert formatted.choices[0].message.tool_calls[0].function == call.function
    # cut by max_tokens: the call so far once its name is whole, as a named call's; before, no call and no content
    # (the {"name", "arguments"} wrapper came back as the reply's text)
    for cut, name in ((3, None), (required.usage.completion_tokens - 1, call.function.name)):
        for stream in (False, True):
            cut_reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[weather, clock],
                                                       tool_choice="required", max_tokens=cut, temperature=0.8, seed=2,
                                                       stream=stream)
            if stream:
                deltas = [c.choices[0] for c in cut_reply if c.choices]
                calls = [d.delta.tool_calls[0].function.name for d in deltas if d.delta.tool_calls]
                content = "".join(d.delta.content or "" for d in deltas)
                finish = deltas[-1].finish_reason
            else:
                message, finish = cut_reply.choices[0].message, cut_reply.choices[0].finish_reason
                calls, content = [c.function.name for c in message.tool_calls or []], message.content or ""
            assert (calls, content, finish) == ([name] if name else [], "", "length"), (cut, stream)
    chunks = [c for c in client.chat.completions.create(
        model=MODEL, messages=messages, tools=[weather], tool_choice=named, max_tokens=100, temperature=0, stream=True,
        logprobs=True) if c.choices]
    streamed = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
    assert streamed[0][0].function.arguments == reply.choices[0].message.tool_calls[0].function.arguments
    assert len(chunks[-2].choices[0].logprobs.content) == reply.usage.completion_tokens  # all, with the call
    last = chunks[-1].choices[0]  # the finish reason in a chunk of its own, as OpenAI's
    assert last.finish_reason == "stop" and last.delta.tool_calls is None and last.delta.content is None
    # the call and its result as history: the next turn renders and answers in text
    history = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                          {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=[weather], tool_choice="none",
                                            max_tokens=3)
    assert answer.choices[0].message.content is not None


def test_required_tool_calls_with_definitions(client):
    """tool_choice "required" over tools whose parameters refer to their own `$defs` (every nested pydantic
    model, the SDK's pydantic_function_tool): the definitions move to the combined schema's root, where the
    references resolve (they were a 400); one name that two tools define differently is a 400."""
    pytest.importorskip("xgrammar")
    from typing import Literal

    from pydantic import BaseModel

    class Place(BaseModel):
        city: Literal["Paris", "Oslo"]

    class GetWeather(BaseModel):
        place: Place

    class GetTime(BaseModel):
        place: Place

    tools = [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(GetTime)]
    sent = json.dumps(tools)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="required",
                                           max_tokens=60, temperature=0)
    call = reply.choices[0].message.tool_calls[0].function
    assert call.name in ("GetWeather", "GetTime")
    assert json.loads(call.arguments)["place"]["city"] in ("Paris", "Oslo") and json.dumps(tools) == sent
    clash = json.loads(sent)
    clash[1]["function"]["parameters"]["$defs"]["Place"]["properties"]["city"]["enum"] = ["Rome"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=messages, tools=clash, tool_choice="required", max_tokens=5)
    assert refused.value.body["param"] == "tools" and "'Place'" in refused.value.body["message"]


def test_tool_calls_in_history_reach_the_template_as_mappings(model_dir):
    """An assistant turn's call in history comes with its arguments as JSON text (OpenAI's wire form, what the
    SDK sends back); templates take them as a mapping (Qwen3-Coder's `|items` refused text with a 400, and
    `|tojson` wrote them as a quoted string), through chat and the Responses API alike, and the request
    keeps what the client sent (a stored response lists its input as given). Tools reach the template with
    tool_choice "none" too."""
    template = ("{% for t in tools or [] %}tool {{ t.function.name }}\n{% endfor %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}{% for c in m.tool_calls or [] %}"
                "[{{ c.function.name }}{% for k, v in c.function.arguments|items %} {{ k }}={{ v }}{% endfor %} "
                "{{ c.function.arguments|tojson }}]{% endfor %}\n{% endfor %}")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    with LiveServer(create_app(engine_config(model_dir, chat_template=template))) as live:
        def rendered(messages: list[dict]) -> str:
            tokens = httpx.post(live.url + "/tokenize", json={"messages": messages}).json()["tokens"]
            return httpx.post(live.url + "/detokenize", json={"tokens": tokens}).json()["prompt"]

        assert '[get_weather city=Paris {"city": "Paris"}]' in rendered(history)
        for empty in ("", None):  # no arguments: an empty mapping, as vLLM gives
            bare = {**call, "function": {"name": "get_weather", "arguments": empty}}
            assert "[get_weather {}]" in rendered([history[0], {**history[1], "tool_calls": [bare]}])
        local = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        reply = local.chat.completions.create(model=MODEL, messages=history, max_tokens=2)
        assert reply.usage.prompt_tokens == httpx.post(live.url + "/tokenize", json={"messages": history}).json()["count"]
        # tool_choice "none" still shows the model its tools, as vLLM renders them (they were left out)
        weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
        told = local.chat.completions.create(model=MODEL, messages=history, max_tokens=2, tools=[weather],
                                             tool_choice="none")
        assert told.usage.prompt_tokens == httpx.post(live.url + "/tokenize", json={
            "messages": history, "tools": [weather]}).json()["count"] > reply.usage.prompt_tokens
        # arguments that are not JSON (a call cut off by max_tokens, sent back): {} for the template, as vLLM gives
        # it, where a 400 refused every later turn of the conversation
        broken = {**call, "function": {"name": "get_weather", "arguments": "{city: Paris"}}
        assert "[get_weather {}]" in rendered([history[0], {**history[1], "tool_calls": [broken]}])
        assert local.chat.completions.create(model=MODEL, messages=[history[0], {**history[1], "tool_calls": [broken]}],
                                             max_tokens=2).choices
        items = [{"role": "user", "content": "Weather in Paris?"},
                 {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                 {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]
        response = local.responses.create(model=MODEL, input=items, max_output_tokens=2)
        assert response.usage.input_tokens == reply.usage.prompt_tokens
        listed = [item for item in local.responses.input_items.list(response.id) if item.type == "function_call"]
        assert [item.arguments for item in listed] == ['{"city": "Paris"}']


def test_hermes_tool_calls_are_parsed():
    content, calls = parse_hermes('Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
                                  '<tool_call>{"name": "g", "arguments": "{}"}</tool_call>')
    assert content == "Let me check." and [(c.function.name, c.function.arguments) for c in calls] == \
        [("f", '{"x": 1}'), ("g", "{}")]
    unclosed, calls = parse_hermes('<tool_call>{"name": "f", "arguments": {}}')  # ended at EOS before the tag
    assert unclosed is None and calls[0].function.name == "f"
    assert parse_hermes("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert parse_hermes("plain answer") == ("plain answer", [])
    # arguments keep the model's characters (they had come back as \u escapes: the same JSON, not the same text)
    assert parse_hermes('<tool_call>{"name": "f", "arguments": {"x": "café 東京"}}</tool_call>')[1][0] \
        .function.arguments == '{"x": "café 東京"}'
    stream = ToolCallStream("hermes")
    pieces = [stream.feed(d) for d in ("Sure", ", <to", "ol_call>{\"name\": \"f\", ", '"arguments": {}}</tool_call>')]
    assert "".join(pieces) == "Sure, " and pieces[1] == ", "  # "<to" is held back until it is clearly not text
    content, calls = stream.finish()
    assert content is None and calls[0].function.name == "f"
    plain = ToolCallStream("hermes")
    assert plain.feed("a <to") == "a " and plain.feed("p") == "<top" and plain.finish() == (None, [])


def test_llama3_json_tool_calls_are_parsed():
    content, calls = parse_llama3_json(' {"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}\n')
    assert content is None and [(c.function.name, c.function.arguments) for c in calls] == [("f", '{"x": 1}'),
                                                                                          ("g", "{}")]
    assert parse_llama3_json("Paris is sunny.") == ("Paris is sunny.", [])
    assert parse_llama3_json('{"name": "f", "parameters": {') == ('{"name": "f", "parameters": {', [])  # cut short
    assert parse_llama3_json('{"city": "Paris"}') == ('{"city": "Paris"}', [])  # JSON, but not a call
    # an answer with a "name" field (response_format beside the tools) is no call without its arguments (vLLM's
    # parsers read them as value["arguments"]); the same in the other parsers of JSON objects
    person = '{"name": "Alice", "age": 30}'
    assert parse_llama3_json(person) == (person, [])
    for parser, reply in [("granite", f"[{person}]"), ("hermes", f"<tool_call>{person}</tool_call>"),
                          ("mistral", f"[TOOL_CALLS][{person}]"), ("phi4_mini_json", f"functools[{person}]")]:
        assert read_reply(reply, None, parser, "stop")[1] is None, parser
    stream = ToolCallStream("llama3_json")
    assert stream.feed(" ") == "" and stream.feed('{"name": "f", ') == "" and stream.feed('"parameters": {}}') == ""
    assert stream.finish()[1][0].function.name == "f"
    text = ToolCallStream("llama3_json")
    assert text.feed("Sun") == "Sun" and text.feed("ny {x}") == "ny {x}" and text.finish() == (None, [])


# Per parser: replies with (content, calls as (name, arguments)); texts it leaves as text (prose, cut short,
# forms not its own); stream deltas with what each sends on; the call the stream gives at the end; a text a
# stream sends on at once (or None).
PARSED = {
    "granite": ([(' [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]\n', None,
                  [("f", {"x": 1}), ("g", {})])],
                ("Paris is sunny.", '[{"name": "f", "arguments": {', "[1, 2]", '{"name": "f"}', '[{"name": "f"}]'),
                [(" ", ""), ('[{"name": "f", ', ""), ('"arguments": {}}', ""), ("]", "")], ("f", {}), "Sunny [1]"),
    "mistral": ([('Let me look. [TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}]', "Let me look.", [("f", {"x": 1})]),
                 ('[TOOL_CALLS]f[ARGS]{"x": 1}[TOOL_CALLS]g[ARGS]{}', None, [("f", {"x": 1}), ("g", {})])],
                ("No tools needed.", "[TOOL_CALLS]f[ARGS]{", "[TOOL_CALLS]no arguments"),
                [("Sure [TOOL", "Sure "), ("_CALLS]f[ARGS]{}", "")], ("f", {}), None),
    # Python's syntax, parsed and never run: positional arguments, names and calls as values are refused
    "pythonic": ([(' [get_weather(city="Paris", days=[1, 2], metric=True), f()]\n', None,
                   [("get_weather", {"city": "Paris", "days": [1, 2], "metric": True}), ("f", {})])],
                 ("It is sunny.", "[f(x=1", "[f(1)]", "[f(x=y)]", "[f(**kw)]", "[os.system(x='ls')]", "[1, 2]", "[]",
                  "[f(x=__import__('os'))]"),
                 [(" [get_", ""), ("weather(city='Rome')]", "")], ("get_weather", {"city": "Rome"}), "Sunny [1]"),
    # one pythonic call per line, JSON's literals allowed
    "olmo3": ([('<function_calls>\nget_weather(city="Paris", alerts=true, days=null)\nf(x=-1)\n</function_calls>', None,
                [("get_weather", {"city": "Paris", "alerts": True, "days": None}), ("f", {"x": -1})])],
              ("Sunny.", "<function_calls>\nf(x=y)\n</function_calls>", "<function_calls>\nf(x=1",
               "get_weather(city='Paris')"),
              [("<func", ""), ("tion_calls>\nf(x=1)\n</function_calls>", "")], ("f", {"x": 1}), "<b>Sunny"),
    "internlm": ([('Let me check.<|action_start|><|plugin|>\n{"name": "f", "parameters": {"x": 1}}<|action_end|>',
                   "Let me check.", [("f", {"x": 1})])],
                 ("No tools.", '<|action_start|><|plugin|>{"name": "f", "parameters": {', "<|action_start|><|plugin|>"),
                 [("Sure<|action_start|>", "Sure"), ('<|plugin|>{"name": "g"}', "")], ("g", {}), None),
    # gpt-oss's function messages as the harmony reasoning parser passes them on (or as written)
    "openai": ([('Let me check.<|channel|>commentary to=functions.f<|message|>{"x": 1}<|call|>', "Let me check.",
                 [("f", {"x": 1})]),
                ('<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"x": 1}<|call|>'
                 '<|channel|>commentary to=functions.g<|message|>{}', None, [("f", {"x": 1}), ("g", {})])],
               ("No tools.", "<|channel|>commentary<|message|>A preamble."),
               [("Sure<|channel|>comm", "Sure"), ("entary to=functions.g<|message|>{}", "")], ("g", {}), None),
    # GLM-4.5's calls (a newline after the name) and GLM-4.7's (none); values JSON or Python literals, typed
    "glm45": ([("Let me check.<tool_call>f\n<arg_key>x</arg_key>\n<arg_value>1</arg_value>\n</tool_call>", "Let me check.",
                [("f", {"x": 1})]),
               ("<tool_call>f<arg_key>x</arg_key><arg_value>[1, 'a']</arg_value><arg_key>y</arg_key><arg_value>some "
                "text</arg_value></tool_call>\n<tool_call>g\n</tool_call>", None,
                [("f", {"x": [1, "a"], "y": "some text"}), ("g", {})])],
              ("No tools.", "<tool_call>\n</tool_call>"),
              [("Sure <tool", "Sure "), ("_call>g\n</tool_call>", "")], ("g", {}), "Sunny <b>"),
    "deepseek_v3": ([("Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"x\": 1}\n```"
                      "<｜tool▁call▁end｜><｜tool▁calls▁end｜>", "Sure.", [("f", {"x": 1})])],
                    ("No tools.", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"x\": "
                     "\n```<｜tool▁call▁end｜>"),
                    [("Sure<｜tool▁calls", "Sure"), ("▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>g\n```json\n{}\n```"
                                                   "<｜tool▁call▁end｜><｜tool▁calls▁end｜>", "")], ("g", {}), None),
    "deepseek_v31": ([('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{"x": 1}<｜tool▁call▁end｜><｜tool▁call▁begin｜>'
                       'g<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>', None, [("f", {"x": 1}), ("g", {})])],
                     ("No tools.", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{"x": <｜tool▁call▁end｜>'),
                     [("<｜tool▁calls▁begin｜>", ""), ("<｜tool▁call▁begin｜>g<｜tool▁sep｜>{}<｜tool▁call▁end｜>", "")],
                     ("g", {}), None),
    # MiniMax-M2's XML calls, typed by the tool schema (none here: text)
    "minimax_m2": ([('Let me check.\n<minimax:tool_call>\n<invoke name="f">\n<parameter name="x">1</parameter>\n'
                     '<parameter name="y">two\nlines</parameter>\n</invoke>\n<invoke name="g">\n</invoke>\n'
                     '</minimax:tool_call>', "Let me check.", [("f", {"x": "1", "y": "two\nlines"}), ("g", {})])],
                   ("No tools.", '<invoke name="f"></invoke>', "<minimax:tool_call>\n</minimax:tool_call>"),
                   [("Sure <minimax:", "Sure "), ('tool_call><invoke name="g"></invoke>', "")], ("g", {}), "Sunny <b>"),
    "phi4_mini_json": ([('Checking. functools[{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]',
                         "Checking.", [("f", {"x": 1}), ("g", {})])],
                       ("No tools.", 'functools[{"name": "f", "arguments": {', "functools[]", 'functools[{"x": 1}]'),
                       [("Sure functo", "Sure "), ('ols[{"name": "f", "arguments": {}}]', "")], ("f", {}), None),
    # Nemotron Nano 2's: a JSON list inside <TOOLCALL> (its closing tag missing where generation stopped first)
    "nemotron_json": ([('Checking.\n<TOOLCALL>[{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]'
                        '</TOOLCALL>', "Checking.", [("f", {"x": 1}), ("g", {})]),
                       ('<TOOLCALL> {"name": "f", "arguments": {}} ', None, [("f", {})])],
                      ("No tools.", '<TOOLCALL>[{"name": "f", "arguments": {</TOOLCALL>', "<TOOLCALL>[]</TOOLCALL>",
                       "[TOOLCALL]"), [("Sure <TOOL", "Sure "), ('CALL>[{"name": "f", "arguments": {}}]</TOOLCALL>', "")],
                      ("f", {}),
                      "Sunny <b>"),
}


@pytest.mark.parametrize("parser", PARSED)
def test_tool_calls_in_each_parsers_syntax(parser):
    """A reply in the parser's syntax gives its calls and the text beside them; other text stays text; a
    stream holds the text back from where a call may start and gives the call at the end."""
    replies, texts, deltas, streamed, released = PARSED[parser]
    parse = reply_parser(parser, None)
    for reply, content, calls in replies:
        got_content, got = parse(reply)
        assert got_content == content
        assert [(call.function.name, json.loads(call.function.arguments)) for call in got] == calls
    for text in texts:
        assert parse(text) == (text, [])
    stream = ToolCallStream(parser)
    assert [stream.feed(delta) for delta, _ in deltas] == [sent for _, sent in deltas]
    content, calls = stream.finish()
    assert content is None and [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [streamed]
    if released is not None:
        assert ToolCallStream(parser).feed(released) == released


@pytest.mark.parametrize("parser", [*PARSED, "hermes"])
def test_a_reply_with_calls_reads_the_same_whole_and_streamed(parser):
    """A reply's content and calls are the same read whole (a plain response) as streamed a character at a time
    (what a streaming client puts together): a whole reply's text beside the calls was stripped, so
    "Let me check.\n" streamed came back "Let me check." plain, and a stored Responses conversation differed."""
    replies = [reply for reply, _, _ in PARSED.get(parser, ([],))[0]]
    replies += ['Let me check.\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\n\nDone.'] if parser == "hermes" else []
    for reply in replies:
        reader = ReplyReader(None, parser)
        sent = "".join(reader.feed(character) for character in reply)
        rest, streamed_calls, _ = reader.finish("stop")
        content, calls, _ = read_reply(reply, None, parser, "stop")
        assert calls and content == ((sent + (rest or "")) or None)
        assert [call.function for call in calls] == [call.function for call in streamed_calls]


@pytest.mark.parametrize("parser, opening, call", [
    ("deepseek_v3", "<｜tool▁calls▁begin｜>" + "<｜tool▁call▁begin｜>" * 3000,
     '<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{"x": 1}\n```<｜tool▁call▁end｜>'),
    ("deepseek_v31", "<｜tool▁calls▁begin｜>" + "<｜tool▁call▁begin｜>" * 3000,
     '<｜tool▁call▁begin｜>f<｜tool▁sep｜>{"x": 1}<｜tool▁call▁end｜>'),
    ("qwen3_coder", "<tool_call>" + "<function=" * 3000, "<function=f>\n<parameter=x>\n1\n</parameter>\n</function>"),
    ("minimax_m2", '<minimax:tool_call><invoke name="f">' + "<parameter name=" * 3000,
     '<parameter name="x">1</parameter></invoke>'),
    ("glm45", "<tool_call>f\n" + "<arg_key>k</arg_key>" * 3000, "<arg_key>x</arg_key><arg_value>1</arg_value>"),
    ("openai", "<|channel|>commentary to=functions.g" * 3000,
     '<|channel|>commentary to=functions.f<|message|>{"x": 1}<|call|>'),
    # a run of whitespace inside a call (a degenerate reply): lazy groups between whitespace backtracked, O(n^3)
    ("deepseek_v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>g\n```json" + " " * 20000,
     '<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{"x": 1}\n```<｜tool▁call▁end｜>'),
    ("hermes", "<tool_call>" + " " * 20000, '{"name": "f", "arguments": {"x": 1}}' + " " * 20000 + "</tool_call>")])
def test_tool_call_parsers_read_many_openings_in_one_pass(parser, opening, call):
    """A reply of thousands of unfinished openings before a call (a client can force them, with logit_bias or a
    grammar): the call is read, in one pass over the reply. Each pattern searched from every opening to the
    reply's end: O(n^2), 8,000 openings took 4-15 s on the event loop, holding every request (found by an audit
    of the server's security)."""
    _, calls = reply_parser(parser, None)(opening + call)
    last = calls[-1]  # (the XML forms' values are text without a tool schema to type them)
    assert last.function.name == "f" and json.loads(last.function.arguments) in ({"x": 1}, {"x": "1"})


def test_a_gpt_oss_call_cut_by_max_tokens_is_no_call():
    """A gpt-oss call ends at its stop token, <|call|>, which the text does not keep: a last call cut by max_tokens
    reads like a whole one, so with finish reason "length" it is left out, neither call nor content, as vLLM reads
    only completed messages (its arguments, '{"y": ', were returned as a call's)."""
    reply = ('Checking.<|channel|>commentary to=functions.f<|message|>{"x": 1}<|call|>'
             '<|channel|>commentary to=functions.g<|message|>{"y": ')
    for reason, names in (("length", ["f"]), ("stop", ["f", "g"])):
        content, calls, finish = read_reply(reply, None, "openai", reason)
        assert content == "Checking." and [call.function.name for call in calls] == names
        assert finish == ("length" if reason == "length" else "tool_calls")
        reader = ReplyReader(None, "openai")
        sent = "".join(reader.feed(character) for character in reply)
        rest, streamed, _ = reader.finish(reason)
        assert sent + (rest or "") == "Checking." and [call.function.name for call in streamed] == names
    assert read_reply(reply[reply.index("<|channel|>commentary to=functions.g"):], None, "openai", "length") == \
        ("", None, "length")


def test_a_glm_call_cut_by_max_tokens_is_no_call():
    """GLM's last call may lack its </tool_call> (read whole where the reply stopped), but one cut by max_tokens may
    have lost part of its name: it is left out, as vLLM reads only closed calls (a call named "ge" was returned)."""
    reply = "Checking.<tool_call>get_time\n</tool_call><tool_call>ge"
    for reason, names in (("length", ["get_time"]), ("stop", ["get_time", "ge"])):
        content, calls, finish = read_reply(reply, None, "glm45", reason)
        assert content == "Checking." and [call.function.name for call in calls] == names
        reader = ReplyReader(None, "glm47")
        sent = "".join(reader.feed(character) for character in reply)
        rest, streamed, _ = reader.finish(reason)
        assert sent + (rest or "") == "Checking." and [call.function.name for call in streamed] == names


def test_xml_tool_calls_are_parsed_and_typed_by_the_tool_schema():
    """Seed-OSS's and Qwen3-Coder's XML calls: each parameter's text typed as the request's tool schema says
    (text where it says string, gives no type, or the text is not of that type; "null" is null)."""
    schemas = {"book": {"type": "object", "properties": {
        "guests": {"type": "integer"}, "price": {"type": "number"}, "late": {"type": "boolean"},
        "rooms": {"type": "array"}, "note": {"type": ["string", "null"]}, "when": {"type": "integer"}}}}
    reply = ("Booking now.<seed:tool_call>\n<function=book>\n<parameter=guests>\n2\n</parameter>\n"
             "<parameter=price>99.5</parameter>\n<parameter=late>True</parameter>\n<parameter=rooms>[1, 2]"
             "</parameter>\n<parameter=note>\nnear 12 the sea\n</parameter>\n<parameter=when>soon</parameter>\n"
             "<parameter=city>null</parameter>\n</function>\n</seed:tool_call>")
    content, calls = reply_parser("seed_oss", schemas)(reply)
    assert content == "Booking now." and calls[0].function.name == "book"
    assert json.loads(calls[0].function.arguments) == {"guests": 2, "price": 99.5, "late": True, "rooms": [1, 2],
                                                       "note": "near 12 the sea", "when": "soon", "city": None}
    coder = reply_parser("qwen3_coder", None)
    _, calls = coder("<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>"
                     "<tool_call>\n<function=g>\n</function>\n</tool_call>")
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("f", {"x": "1"}), ("g", {})]
    for text in ("No tools.", "<tool_call>{\"name\": \"f\"}</tool_call>"):
        assert coder(text) == (text, [])
    # as vLLM's qwen3_coder reads them: functions without <tool_call> (Qwen3-Coder leaves it out at times), and a
    # parameter whose </parameter> is missing ends at the next parameter or the function's end
    integers = {"f": {"type": "object", "properties": {"a": {"type": "integer"}}}}
    for reply in ("Sure.\n<function=f>\n<parameter=a>\n1\n</parameter>\n<parameter=b>\nx\n</parameter>\n</function>\n"
                  "</tool_call>",
                  "Sure.\n<tool_call>\n<function=f>\n<parameter=a>\n1\n<parameter=b>\nx\n</function>\n</tool_call>"):
        content, calls = reply_parser("qwen3_coder", integers)(reply)
        assert content == "Sure." and json.loads(calls[0].function.arguments) == {"a": 1, "b": "x"}
        stream = ToolCallStream("qwen3_coder", integers)
        assert "".join(stream.feed(character) for character in reply) == "Sure.\n"
        assert stream.finish()[1][0].function.name == "f"
    stream = ToolCallStream("seed_oss", schemas)
    assert stream.feed("Sure <seed:tool") == "Sure " and stream.feed("_call><function=book>") == ""
    assert stream.finish()[1][0].function.name == "book"


def test_tool_call_arguments_are_always_json():
    """Parsed arguments are always JSON (RFC 8259: what clients json.loads or JSON.parse). A value JSON cannot
    hold (NaN, Infinity, a Python set, bytes or complex number: a 500 or NaN in the arguments before) stays
    its text where the parser types values (XML, GLM), and leaves the reply text where a call is read whole
    (pythonic, JSON forms); hermes arguments written as a string that is not JSON are that string as JSON, as
    vLLM writes them; properties that are not an object type nothing (a 500 before)."""
    def arguments(parser: str, reply: str, schemas: dict | None = None) -> dict:
        _, calls = reply_parser(parser, schemas)(reply)
        return json.loads(calls[0].function.arguments, parse_constant=lambda name: pytest.fail(name))

    numbers = {"f": {"type": "object", "properties": {"n": {"type": "number"}, "o": {"type": "object"}}}}
    for value in ("nan", "inf", "-Infinity", "1e400"):
        xml = f"<tool_call>\n<function=f>\n<parameter=n>\n{value}\n</parameter>\n<parameter=o>[NaN]</parameter>\n"
        assert arguments("qwen3_coder", xml + "</function>\n</tool_call>", numbers) == {"n": value, "o": "[NaN]"}
    for value in ("{1, 2}", "1j", 'b"x"', "NaN", "1e999"):
        glm = f"<tool_call>f\n<arg_key>n</arg_key>\n<arg_value>{value}</arg_value>\n</tool_call>"
        assert arguments("glm45", glm) == {"n": value}
    assert arguments("glm45", "<tool_call>f<arg_key>n</arg_key><arg_value>(1, 'a')</arg_value></tool_call>") == \
        {"n": [1, "a"]}
    assert reply_parser("pythonic", None)("[f(x=1e999)]") == ("[f(x=1e999)]", [])
    nan = '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>'
    assert parse_hermes(nan) == (nan, [])
    assert arguments("hermes", '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>') == "not json"
    assert arguments("hermes", '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>') == {"x": 1}
    listed = {"f": {"type": "object", "properties": ["a"]}}
    assert arguments("qwen3_coder", "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n"
                     "</tool_call>", listed) == {"a": "1"}
    odd_type = {"f": {"type": "object", "properties": {"a": {"type": 5}}}}
    assert arguments("seed_oss", "<seed:tool_call><function=f><parameter=a>1</parameter></function></seed:tool_call>",
                     odd_type) == {"a": "1"}


def test_tool_parameters_that_are_no_schema_object(model_dir):
    """A tool whose parameters are not a JSON schema object is a 400 (vLLM's typed FunctionDefinition); one
    whose properties are not an object reads its call untyped: the reply, streamed or not, was a 500 or a
    stream cut without [DONE] after the whole generation."""
    pytest.importorskip("xgrammar")
    reply = "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>"
    with LiveServer(create_app(engine_config(model_dir), ServeSettings(tool_call_parser="qwen3_coder"))) as live:
        local = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        args = dict(model=MODEL, messages=[{"role": "user", "content": "Call f"}], max_tokens=100, temperature=0)
        for parameters in ("abc", [1]):
            for choice in ("auto", "none"):
                with pytest.raises(openai.BadRequestError) as refused:
                    local.chat.completions.create(**args, tool_choice=choice, tools=[
                        {"type": "function", "function": {"name": "f", "parameters": parameters}}])
                assert refused.value.body["param"] == "tools" and "'f'" in refused.value.body["message"]
        listed = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": ["a"]}}}]
        out = local.chat.completions.create(**args, tools=listed, extra_body={"guided_choice": [reply]})
        assert json.loads(out.choices[0].message.tool_calls[0].function.arguments) == {"a": "1"}
        chunks = list(local.chat.completions.create(**args, tools=listed, extra_body={"guided_choice": [reply]},
                                                    stream=True))
        assert [call.function.arguments for c in chunks for call in c.choices[0].delta.tool_calls or []] == \
            ['{"a": "1"}'] and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_skip_special_tokens_false_keeps_them_in_the_text(client, model_dir):
    """vLLM's skip_special_tokens: a special token the model emits (here forced by logit_bias) is text only
    when asked for; the end-of-sequence token never is."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    marker = tokenizer.convert_tokens_to_ids("<|im_start|>")
    args = dict(model=MODEL, prompt="Hi", max_tokens=2, temperature=0, logit_bias={str(marker): 100})
    assert client.completions.create(**args).choices[0].text == ""
    kept = client.completions.create(**args, extra_body={"skip_special_tokens": False}).choices[0].text
    assert kept == "<|im_start|><|im_start|>"
    eos = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0,
                                    logit_bias={str(tokenizer.eos_token_id): 100},
                                    extra_body={"skip_special_tokens": False}).choices[0]
    assert eos.text == "" and eos.finish_reason == "stop"


CALL_TWICE = {"hermes": "\n", "llama3_json": "; ", "mistral": "", "ernie45": "\n", "internlm": "",
              "seed_oss": "", "openai": "", "glm47": ""}  # how two calls of a parser's syntax are joined (not
# DeepSeek's: two take 302 tokens of the tiny tokenizer, past the tiny model's context of 256)
# Parsers whose calls are one list: what comes before the calls in it, and what after.
LISTED = {"granite": ("[", "]"), "pythonic": ("[", "]"), "phi4_mini_json": ("functools[", "]"),
          "nemotron_json": ("<TOOLCALL>[", "]</TOOLCALL>")}


@pytest.mark.parametrize("parser, reply", [
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    ("granite", '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'),
    ("pythonic", '[get_weather(city="Paris")]'),
    ("phi4_mini_json", 'functools[{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
    ("nemotron_json", '<TOOLCALL>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</TOOLCALL>'),
    ("ernie45", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    ("internlm", '<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Paris"}}<|action_end|>'),
    ("olmo3", '<function_calls>\nget_weather(city="Paris")\n</function_calls>'),
    ("seed_oss", "<seed:tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                 "<parameter=days>3</parameter>\n</function>\n</seed:tool_call>"),
    ("openai", '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
               '<|call|>'),  # with the harmony reasoning parser (short: two of them fit the tiny model's context)
    ("glm47", "<tool_call>get_weather<arg_key>days</arg_key><arg_value>3</arg_value></tool_call>"),  # (two in 200
    # tokens: a call cut by max_tokens is none)
    ("deepseek_v3", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n'
                    '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')])
def test_auto_tool_calls_with_a_parser(model_dir, parser, reply):
    pytest.importorskip("xgrammar")
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
    forced_text = {"guided_choice": [reply]}  # the tiny model says it, as a tool-trained one would
    settings = ServeSettings(tool_call_parser=parser, reasoning_parser="openai_gptoss" if parser == "openai" else None)
    with LiveServer(create_app(engine_config(model_dir), settings)) as live:
        hermes = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        out = hermes.chat.completions.create(model=MODEL, messages=messages, tools=[weather], max_tokens=200,
                                             temperature=0, extra_body=forced_text)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls[0].function.name == "get_weather"
        expected = {"city": "Paris", "days": 3} if parser == "seed_oss" else {"days": 3} if parser == "glm47" else \
            {"city": "Paris"}  # typed by the schema
        assert json.loads(choice.message.tool_calls[0].function.arguments) == expected
        chunks = list(hermes.chat.completions.create(model=MODEL, messages=messages, tools=[weather], max_tokens=200,
                                                     temperature=0, stream=True, extra_body=forced_text))
        assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
        assert [call.function.name for call in calls] == ["get_weather"]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        text = hermes.chat.completions.create(model=MODEL, messages=messages, tools=[weather], max_tokens=5)
        assert text.choices[0].message.tool_calls is None and text.choices[0].finish_reason == "length"
        if parser == "deepseek_v3":
            return
        opening, closing = LISTED.get(parser, ("", ""))
        inner = reply[len(opening):len(reply) - len(closing)]
        doubled = opening + inner + ", " + inner + closing if parser in LISTED else \
            reply.replace("</function_calls>", 'get_weather(city="Paris")\n</function_calls>') if parser == "olmo3" \
            else reply + CALL_TWICE[parser] + reply
        twice = {"guided_choice": [doubled]}
        for parallel, count in ((True, 2), (False, 1)):  # parallel_tool_calls false: the first call only
            out = hermes.chat.completions.create(model=MODEL, messages=messages, tools=[weather], max_tokens=200,
                                                 parallel_tool_calls=parallel, extra_body=twice)
            assert len(out.choices[0].message.tool_calls) == count
            chunks = list(hermes.chat.completions.create(model=MODEL, messages=messages, tools=[weather],
                                                         max_tokens=200, parallel_tool_calls=parallel,
                                                         extra_body=twice, stream=True))
            assert len([call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]) == count
        # cut inside the second call by max_tokens: "length" still (clients must not take the calls as complete)
        whole = hermes.chat.completions.create(model=MODEL, messages=messages, tools=[weather], max_tokens=200,
                                               temperature=0, extra_body=twice)
        cut = dict(model=MODEL, messages=messages, tools=[weather], max_tokens=whole.usage.completion_tokens - 2,
                   temperature=0, extra_body=twice)
        assert hermes.chat.completions.create(**cut).choices[0].finish_reason == "length"
        assert [c.choices[0].finish_reason for c in hermes.chat.completions.create(**cut, stream=True)
                if c.choices][-1] == "length"


def test_the_sdk_stream_helper_ends_a_forced_call(client):
    """The official SDK's stream helper: a forced call's arguments are reported done (the finish reason comes
    in a chunk of its own, as OpenAI's), and its reply has no content, as the same request unstreamed."""
    pytest.importorskip("xgrammar")
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {  # (a reply that ends)
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
        "additionalProperties": False}}}
    request = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[weather],
                   tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=60,
                   temperature=0)
    with client.chat.completions.stream(**request) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    call = final.choices[0].message.tool_calls[0].function
    assert len(done) == 1 and (done[0].name, done[0].arguments) == (call.name, call.arguments)
    assert final.choices[0].message.content is None and not [e for e in events if e.type == "content.delta"]
    assert client.chat.completions.create(**request).choices[0].message.content is None


def test_json_output_through_the_openai_client(server, client):
    pytest.importorskip("xgrammar")
    messages = [{"role": "user", "content": "Describe a fruit."}]
    schema = {"type": "object", "properties": {"name": {"enum": ["apple", "pear"]}, "ripe": {"type": "boolean"}},
              "required": ["name", "ripe"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "fruit", "schema": schema, "strict": True}}
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0.7, seed=1,
                                           response_format=fmt)
    assert reply.choices[0].finish_reason == "stop"
    fruit = json.loads(reply.choices[0].message.content)
    assert fruit["name"] in ("apple", "pear") and isinstance(fruit["ripe"], bool)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=40, temperature=0.7, seed=1, response_format=fmt, stream=True)
        if c.choices)
    assert streamed == reply.choices[0].message.content
    completion = client.completions.create(model=MODEL, prompt="Fruit:", max_tokens=40, temperature=0,
                                           extra_body={"response_format": fmt})
    assert json.loads(completion.choices[0].text)["name"] in ("apple", "pear")
    sentiment = client.completions.create(model=MODEL, prompt="Great film!", max_tokens=40, temperature=0.9, n=4,
                                          extra_body={"guided_choice": ["positive", "negative", "so-so (meh)"]})
    assert {c.text for c in sentiment.choices} <= {"positive", "negative", "so-so (meh)"}
    assert all(c.finish_reason == "stop" for c in sentiment.choices)
    code = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0.9,
                                          extra_body={"guided_regex": "[A-Z]{3}-[0-9]{2}"})
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", code.choices[0].message.content)
    guided = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0.7, seed=1,
                                            extra_body={"guided_json": json.dumps(schema)})
    assert json.loads(guided.choices[0].message.content)["name"] in ("apple", "pear")
    animal = 'root ::= ("cat" | "dog") " " ("runs" | "sleeps")'
    for extra in ({"guided_grammar": animal}, {"structured_outputs": {"grammar": animal}}):
        said = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0.9,
                                              extra_body=extra).choices[0].message.content
        assert re.fullmatch("(cat|dog) (runs|sleeps)", said), said
    # vLLM's structural tags: xgrammar's form (here a tag around one of two words as the whole reply), and the older
    # one of structures and triggers (free text; after a trigger, the tag's JSON), as response_format or
    # structured_outputs
    xgrammar = pytest.importorskip("xgrammar")
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<fruit>", "end": "</fruit>",
                                                "content": {"type": "regex", "pattern": "apple|pear"}}}
    for extra in ({"response_format": tag}, {"structured_outputs": {"structural_tag": json.dumps(tag)}}):
        tagged = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0.7,
                                                seed=1, extra_body=extra)
        assert re.fullmatch("<fruit>(apple|pear)</fruit>", tagged.choices[0].message.content), tagged
    older = CompletionRequest(prompt="x", response_format=older_format(schema)).structured_output()
    grammar = server.engine.engine.structured._grammar(older)
    for text, follows in (('Here: <fruit>{"name": "pear", "ripe": true}</fruit> done', True),
                          ('<fruit>{"name": "plum", "ripe": true}</fruit>', False)):
        assert xgrammar.GrammarMatcher(grammar).accept_string(text) == follows, text
    assert client.completions.create(model=MODEL, prompt="Fruit:", max_tokens=8,
                                     extra_body={"response_format": older_format(schema)}).choices[0].text is not None
    chosen = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=10, temperature=0.9, n=3,
                                       extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert {c.text for c in chosen.choices} <= {"left", "right"}
    for extra, param in [({"guided_regex": "(", "guided_choice": ["a"]}, "guided_choice"),
                         ({"guided_regex": "(unclosed"}, "guided_regex"), ({"guided_json": "{not json"}, "guided_json"),
                         ({"guided_grammar": "root ::= (unclosed"}, "guided_grammar"),
                         ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
                         ({"structured_outputs": {"regex": "a"}, "guided_choice": ["b"]}, "structured_outputs")]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, extra_body=extra)
        assert refused.value.body["param"] == param, refused.value.body
    for bad in ({"type": "yaml"}, {"type": "json_schema", "json_schema": {"name": "x"}},
                {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, response_format=bad)
        assert refused.value.body["param"] == "response_format"


def older_format(schema: dict) -> dict:
    """vLLM's older structural tag: a fruit's JSON after <fruit>, free text elsewhere."""
    return {"type": "structural_tag", "triggers": ["<fruit"],
            "structures": [{"begin": "<fruit>", "schema": schema, "end": "</fruit>"}]}


def test_malformed_structured_output_fields_are_400s(server):
    """A structured-output field of the wrong type is a 400 that names it (some were a 500: a json_schema that
    is no object, a regex or grammar that is no string; a choice string was read letter by letter), and a
    guided constraint beside a forced tool call is refused as response_format is (it was dropped unsaid)."""
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    forced = {"tools": [weather], "tool_choice": "required"}
    for extra, param in [({"response_format": {"type": "json_schema", "json_schema": "abc"}}, "response_format"),
                         ({"response_format": {"type": "json_schema", "json_schema": ["x"]}}, "response_format"),
                         ({"structured_outputs": {"regex": ["a"]}}, "structured_outputs"),
                         ({"structured_outputs": {"grammar": ['root ::= "a"']}}, "structured_outputs"),
                         ({"structured_outputs": {"grammar": {"a": 1}}}, "structured_outputs"),
                         ({"structured_outputs": {"choice": "yes"}}, "structured_outputs"),
                         ({"structured_outputs": {"choice": ["yes", 1]}}, "structured_outputs"),
                         ({"structured_outputs": {"json": [1]}}, "structured_outputs"),
                         ({"guided_choice": "yes"}, "guided_choice"),
                         ({**forced, "guided_choice": ["x"]}, "guided_choice"),
                         ({**forced, "structured_outputs": {"regex": "x"}}, "structured_outputs")]:
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/completions", {"prompt": "hi"})):
            if "tools" in extra and path == "/v1/completions":
                continue
            response = httpx.post(server.url + path, json={**body, "max_tokens": 5, **extra})
            assert error_of(response, 400)["param"] == param, (extra, response.text)


def test_null_means_the_default_for_nullable_flags(server, client):
    """stream, echo and chat's logprobs may be null, as OpenAI's and vLLM's types declare them (clients that
    write unset fields out, or pass None through the SDK, got a 400): null means false. A logit_bias key must
    be ASCII digits: "²" leaked int()'s message and "٣" (Arabic-Indic 3) biased token 3."""
    messages = [{"role": "user", "content": "hi"}]
    args = dict(model=MODEL, max_tokens=2, temperature=0)
    plain = client.chat.completions.create(messages=messages, **args)
    nulls = client.chat.completions.create(messages=messages, logprobs=None, stream=None, **args)
    assert nulls.choices[0].message.content == plain.choices[0].message.content and nulls.choices[0].logprobs is None
    completion = client.completions.create(prompt="hi", echo=None, stream=None, **args)
    assert completion.choices[0].text == client.completions.create(prompt="hi", **args).choices[0].text
    for key in ("²", "٣", "-1"):
        error = error_of(httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "logit_bias": {key: 1}}), 400)
        assert error["param"] == "logit_bias" and "token ids" in error["message"]


def test_text_parts_are_joined_by_newlines_whatever_their_openai_kind(server):
    """A message's text parts render as one text joined by newlines, as vLLM joins them (they were glued
    together); an assistant history's refusal and the Responses API's input_text/output_text parts are text
    too (they were 400s)."""
    def count(content) -> int:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": content}]}
        return httpx.post(server.url + "/tokenize", json=body).json()["tokens"]

    joined = count("Hello\nworld")
    assert count([{"type": "text", "text": "Hello"}, {"type": "output_text", "text": "world"}]) == joined
    assert count([{"type": "input_text", "text": "Hello"}, {"type": "refusal", "refusal": "world"}]) == joined
    assert joined != count("Helloworld")


# Templates in the forms real ones take: ChatML over strings (SmolLM2's), Gemma 3's test-then-loop, Llama 3.2
# Vision's loop over the content of messages set aside first, and a loop through a variable set from the content.
STRING_TEMPLATE = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
PARTS_TEMPLATES = [
    "{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}",
    "{% set loop_messages = messages[1:] %}{% for m in loop_messages | selectattr('role') %}"
    "{% for part in m.content %}[{{ part.text }}]{% endfor %}{% endfor %}",
    "{% for message in messages %}{% set content = message.content %}{% for part in content %}[{{ part.text }}]"
    "{% endfor %}{% endfor %}",
    # macros handed a message, or its content, by position or by name
    "{% macro render(m) %}{% for part in m['content'] %}[{{ part.text }}]{% endfor %}{% endmacro %}"
    "{% for message in messages %}{{ render(message) }}{% endfor %}",
    "{% macro parts(items) %}{% for part in items %}[{{ part.text }}]{% endfor %}{% endmacro %}"
    "{% for message in messages %}{{ parts(items=message.content) }}{% endfor %}"]


@pytest.mark.parametrize("template", [STRING_TEMPLATE, "{% for m in messages %}{{ m.content }}{% generation %}"
                                      "{% endgeneration %}{% endfor %}", "{% for x in"])
def test_templates_that_read_content_as_text_are_detected(template):
    assert detected_content_format(template) == "string"


@pytest.mark.parametrize("template", PARTS_TEMPLATES)
def test_templates_that_loop_over_content_are_detected(template):
    assert detected_content_format(template) == "openai"


def test_content_reaches_the_template_in_the_form_it_reads(model_dir):
    """A template that loops over a message's content gets a list of text parts, as vLLM's "auto" gives it: given
    the text it looped over its characters (a Llama 3.2 Vision or Llama 4 template rendered no word of any
    message). The form can be set for the server; RAG templates get `documents`."""
    template = PARTS_TEMPLATES[2] + "{% for d in documents or [] %}<doc {{ d.title }}: {{ d.text }}>{% endfor %}"
    messages = [{"role": "user", "content": "Hi"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_text", "text": "b"}]},
                {"role": "assistant", "content": None}]

    def rendered(setting: str, **fields) -> str:
        with LiveServer(create_app(engine_config(model_dir, chat_template=template),
                                   ServeSettings(chat_template_content_format=setting))) as live:
            response = httpx.post(live.url + "/tokenize", json={"messages": messages, **fields})
            assert response.status_code == 200, response.text
            return httpx.post(live.url + "/detokenize", json={"tokens": response.json()["tokens"]}).json()["prompt"]

    assert rendered("auto") == "[Hi][a][b]"
    assert rendered("string") == "[]" * len("Hi" + "a\nb")  # what the template makes of text: each character
    assert rendered("openai", documents=[{"title": "T", "text": "body"}]) == "[Hi][a][b]<doc T: body>"


def test_messages_reach_the_template_as_vllm_gives_them(model_dir):
    """As vLLM builds the conversation: a tool's result is one string in either content format (Mistral's
    templates write it with `|string`: a list of parts became its Python repr), null text parts are left out
    and empty ones do not add newlines, any role reaches the template (Llama 3.1's ipython), an assistant's
    thinking is also `reasoning`, and reasoning_effort "none" sets enable_thinking false (Qwen3's switch)."""
    template = ("{% for m in messages %}{{ m.role }}={% if m.content is string %}{{ m.content }}{% else %}"
                "{% for p in m.content %}[{{ p.text }}]{% endfor %}{% endif %}|{{ m.reasoning or '' }};{% endfor %}"
                "{{ enable_thinking }}")
    messages = [{"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "b"},
                                             {"type": "text", "text": None}]},
                {"role": "ipython", "content": "x"},
                {"role": "assistant", "content": "ok", "reasoning_content": "think"},
                {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "sunny"}]}]
    for setting, user, other, answer in (("openai", "[][b]", "[x]", "[ok]"), ("string", "b", "x", "ok")):
        with LiveServer(create_app(engine_config(model_dir, chat_template=template),
                                   ServeSettings(chat_template_content_format=setting))) as live:
            def rendered(**fields) -> str:
                response = httpx.post(live.url + "/tokenize", json={"messages": messages, **fields})
                assert response.status_code == 200, response.text
                return httpx.post(live.url + "/detokenize", json={"tokens": response.json()["tokens"]}).json()["prompt"]

            assert rendered(reasoning_effort="none") == \
                f"user={user}|;ipython={other}|;assistant={answer}|think;tool=sunny|;False"
            assert rendered(reasoning_effort="low").endswith(";True") and rendered().endswith(";")
            assert rendered(reasoning_effort="none", chat_template_kwargs={"enable_thinking": True}).endswith(";True")


def test_the_shipped_balancer_never_runs_a_slow_request_twice(tmp_path):
    """A non-streaming request longer than nginx's read timeout is a 504 from the replica that ran it, not run
    again on the next replica (nginx retried on timeouts, and under /v1/responses on every replica in turn)."""
    model_dir = make_tiny_hf(tmp_path / "long", seed=0, max_position_embeddings=8192)
    with LiveServer(create_app(engine_config(model_dir))) as a, LiveServer(create_app(engine_config(model_dir))) as b:
        with ShippedNginx([a, b], tmp_path, read_timeout=2) as nginx:
            for path, body in (("/v1/completions", {"prompt": "Once upon", "max_tokens": 8000, "ignore_eos": True}),
                               ("/v1/responses", {"input": "Once upon", "max_output_tokens": 8000, "ignore_eos": True})):
                asked = [live.metric("lcq:prompt_tokens_total") for live in (a, b)]
                assert httpx.post(nginx.url + path, json=body, timeout=30).status_code == 504
                a.wait_pool_full()
                b.wait_pool_full()
                ran = [live.metric("lcq:prompt_tokens_total") > before for live, before in zip((a, b), asked)]
                assert sorted(ran) == [False, True], path


def test_a_model_served_under_several_names(model_dir):
    """vLLM's several --served-model-name: requests may give any of them, replies name the first, /v1/models
    lists each; an adapter may not take one of them (from the command line or the environment alike)."""
    names = resolve(parse_serve("--served-model-name", "main", "gpt-4o"), {}).engine_fields["served_model_name"]
    assert names == ["main", "gpt-4o"] == resolve(parse_serve(), {"LCQ_SERVED_MODEL_NAME": "main gpt-4o"}
                                                  ).engine_fields["served_model_name"]
    config = engine_config(model_dir, served_model_name=names)
    with LiveServer(create_app(config)) as live:
        local = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        assert [card.id for card in local.models.list().data] == names
        reply = local.completions.create(model="gpt-4o", prompt="Hi", max_tokens=1)
        assert reply.model == "main"
        with pytest.raises(openai.NotFoundError):
            local.completions.create(model="tiny", prompt="Hi", max_tokens=1)
    with pytest.raises(ValueError, match="used twice"):
        engine_config(model_dir, served_model_name=names, lora_modules=f"gpt-4o={model_dir}").lora_adapters()
    with pytest.raises(ValueError, match="each given once"):
        engine_config(model_dir, served_model_name=["a", "a"]).validate()


def test_browsers_may_call_across_origins_as_vllm_allows(model_dir):
    """CORS as vLLM's defaults: a browser's preflight is answered (before the API key is asked for) and replies,
    errors too, carry the allowed origin; --allowed-origins narrows it; credentials need named origins."""
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    with LiveServer(create_app(engine_config(model_dir), ServeSettings(api_key="k"))) as live:
        answer = httpx.options(live.url + "/v1/chat/completions", headers=preflight)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "*"
        refused = httpx.post(live.url + "/v1/completions", json={"prompt": "x"}, headers={"Origin": "http://app.example"})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "*"
    narrow = ServeSettings(allowed_origins=["http://app.example"], allow_credentials=True)
    with LiveServer(create_app(engine_config(model_dir), narrow)) as live:
        assert httpx.options(live.url + "/v1/models", headers=preflight).headers[
            "access-control-allow-origin"] == "http://app.example"
        other = httpx.options(live.url + "/v1/models", headers={**preflight, "Origin": "http://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    with pytest.raises(UserError, match="needs --allowed-origins"):
        ServeSettings(allow_credentials=True)


def test_the_api_key_guards_the_routes_under_a_root_path(model_dir):
    """Behind a proxy that serves the API under --root-path (uvicorn puts the prefix in front of each request's
    path), the key is still asked for on the API's routes, and probes are still not counted as requests: the
    guard matched the path with the prefix, so no /v1 route asked for a key. With --disable-fastapi-docs the
    schema and its pages, open without the key, are not served."""
    settings = ServeSettings(api_key="k", root_path="/api", disable_fastapi_docs=True)
    with LiveServer(create_app(engine_config(model_dir), settings), root_path="/api") as live:
        assert httpx.get(live.url + "/v1/models").status_code == 401
        assert httpx.post(live.url + "/tokenize", json={"prompt": "x"}).status_code == 401
        assert httpx.get(live.url + "/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200
        keyed = openai.OpenAI(base_url=live.url + "/v1", api_key="k", max_retries=0)
        assert keyed.completions.create(model=MODEL, prompt="x", max_tokens=1).choices
        assert httpx.get(live.url + "/health").status_code == 200
        counted = {line.split("status=")[1] for line in httpx.get(live.url + "/metrics").text.splitlines()
                   if line.startswith("lcq:http_requests_total{") and not line.endswith(" 0.0")}
        assert counted == {'"200"} 2.0', '"401"} 2.0'}  # the two keyed requests and the two refused, no probe
        for page in ("/openapi.json", "/docs", "/redoc"):
            assert httpx.get(live.url + page).status_code == 404


def test_client_errors_use_the_envelope(server):
    post = lambda path, body: httpx.post(server.url + path, json=body)  # noqa: E731
    assert error_of(post("/v1/completions", {"prompt": "x", "temperature": 5}), 400)["param"] == "temperature"
    error_of(post("/v1/completions", {"prompt": "x", "max_tokens": "many"}), 400)  # a type error: 400, not 422
    error_of(post("/v1/completions", {"prompt": []}), 400)
    mixed = error_of(post("/v1/completions", {"prompt": ["a", 5]}), 400)  # the field, not pydantic's union branch
    assert mixed["param"] == "prompt" and mixed["message"].startswith("prompt: ")
    error_of(post("/v1/completions", {"prompt": [10**6]}), 400)
    error_of(post("/v1/chat/completions", {"messages": []}), 400)
    error_of(post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}), 400)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert error_of(post("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, image]}]}), 400)["param"] == "messages.0.content"
    too_long = error_of(post("/v1/completions", {"prompt": list(range(300))}), 400)["message"]
    assert "300" in too_long and "256" in too_long
    error_of(httpx.post(server.url + "/v1/completions", content=b"{not json",
                        headers={"content-type": "application/json"}), 400)
    assert error_of(post("/v1/completions", {"model": "gpt-4", "prompt": "x"}), 404)["code"] == "model_not_found"
    error_of(httpx.get(server.url + "/v1/nothing-here"), 404)
    error_of(post("/v1/completions", {"prompt": "x" * (MAX_BODY + 1)}), 413)
    error_of(httpx.get(server.url + "/v1/completions"), 405)
    schema = httpx.get(server.url + "/openapi.json").text
    assert '"422"' not in schema and '"400"' in schema
    # text that is no Unicode (a lone UTF-16 surrogate, which JSON can write): 400 before the tokenizer sees it
    raw = lambda path, body: httpx.post(server.url + path, content=body,  # noqa: E731
                                        headers={"content-type": "application/json"})
    for path, body in [("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud83d"}]}'),
                       ("/v1/completions", b'{"prompt": "a\\udc00b", "max_tokens": 2}'),
                       ("/v1/completions", b'{"model": "x\\ud800", "prompt": "x"}'),
                       ("/tokenize", b'{"prompt": "a\\udc00b"}'), ("/v1/embeddings", b'{"input": "a\\udc00b"}'),
                       ("/v1/responses", b'{"input": [{"role": "user", "content": "\\ud83d"}]}')]:
        assert "surrogate" in error_of(raw(path, body), 400)["message"], path
    assert raw("/v1/completions", b'{"prompt": "\\ud83d\\ude00", "max_tokens": 1}').status_code == 200  # a pair
    # a completion the context cannot hold after the prompt: 400 naming the field sent (context 256 here)
    chat = {"messages": [{"role": "user", "content": "x"}]}
    assert error_of(post("/v1/completions", {"prompt": "x", "max_tokens": 300}), 400)["param"] == "max_tokens"
    assert error_of(post("/v1/completions", {"prompt": "x", "max_tokens": 2**31 - 1}), 400)["param"] == "max_tokens"
    assert error_of(post("/v1/chat/completions", {**chat, "max_completion_tokens": 300}), 400)["param"] \
        == "max_completion_tokens"
    assert error_of(post("/v1/responses", {"input": "x", "max_output_tokens": 300}), 400)["param"] \
        == "max_output_tokens"
    # the fields named as sent, where they reach the sampling checks under other names
    assert error_of(post("/v1/chat/completions", {**chat, "max_completion_tokens": 0}), 400)["param"] \
        == "max_completion_tokens"
    too_many = error_of(post("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 21}), 400)
    assert too_many["param"] == "top_logprobs" and too_many["message"].startswith("top_logprobs")
    # vLLM's fields of what lcq does not do: refused, not ignored (found by running vLLM's examples)
    for path, body, field in (("/v1/chat/completions", {**chat, "use_beam_search": True}, "use_beam_search"),
                              ("/v1/completions", {"prompt": "x", "use_beam_search": True}, "use_beam_search"),
                              ("/v1/chat/completions", {**chat, "chat_template": "{{ 'x' }}"}, "chat_template"),
                              ("/tokenize", {**chat, "chat_template": "{{ 'x' }}"}, "chat_template"),
                              ("/v1/chat/completions", {**chat, "echo": True}, "echo")):
        refused = error_of(post(path, body), 400)
        assert (refused["param"], refused["code"]) == (field, "unsupported_value"), (path, refused)
    assert post("/v1/chat/completions", {**chat, "max_tokens": 2, "use_beam_search": False, "echo": None}
                ).status_code == 200
    for path, body, field in (("/v1/completions", {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
                              ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
                              ("/v1/responses", {"input": "x", "top_logprobs": 21}, "top_logprobs")):
        too_many = error_of(post(path, body), 400)  # (the engine's max_logprobs, 20 by default)
        assert too_many["param"] == field and "between 0 and 20" in too_many["message"], (path, too_many)
    assert error_of(post("/v1/responses", {"input": "x", "max_output_tokens": 0}), 400)["param"] \
        == "max_output_tokens"
    # unknown fields are ignored
    ok = post("/v1/completions", {"prompt": "x", "max_tokens": 2, "some_vendor_field": {"a": 1}})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", top_p=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])


def test_x_request_id_names_the_response(server, client, model_dir):
    """vLLM's X-Request-Id: the client's id comes back as a header and is the base of the body's id, streamed
    too; two requests sharing one both run at once (the engine's ids stay apart); a value unfit for ids and
    headers is replaced, and a request without one gets a generated id, on errors as well."""
    messages = [{"role": "user", "content": "Hi"}]
    sent = {"X-Request-Id": "trace-42/a.b"}
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="Hi", max_tokens=2, extra_headers=sent)
    assert raw.headers["x-request-id"] == "trace-42/a.b" and raw.parse().id == "cmpl-trace-42/a.b"
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=2,
                                                           extra_headers=sent)
    assert raw.headers["x-request-id"] == "trace-42/a.b" and raw.parse().id == "chatcmpl-trace-42/a.b"
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, stream=True,
                                            extra_headers=sent)
    assert {chunk.id for chunk in stream} == {"chatcmpl-trace-42/a.b"}
    # the same id twice at once: the first streams (its choices running in the engine) while the second runs
    shared = {"X-Request-Id": "shared"}
    long = {"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "n": 2}
    with httpx.stream("POST", server.url + "/v1/completions", json={**long, "stream": True}, headers=shared,
                      timeout=60) as first:
        lines = first.iter_lines()
        assert next(lines).startswith("data: ") and server.engine.stats().num_running > 0
        second = httpx.post(server.url + "/v1/completions", json={**long, "max_tokens": 2}, headers=shared,
                            timeout=60)
        assert second.status_code == 200, second.text
        assert second.json()["id"] == "cmpl-shared" and second.headers["x-request-id"] == "shared"
        finishes = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in lines
                    if line.startswith("data: {")]
    assert finishes.count("length") == 2 and first.headers["x-request-id"] == "shared"
    # unfit values (a space, too long, not ASCII, empty) and none at all: a generated id, header and body alike
    for headers in ({"X-Request-Id": "two words"}, {"X-Request-Id": "x" * 129}, {"X-Request-Id": b"caf\xc3\xa9"},
                    {"X-Request-Id": ""}, {}):
        reply = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=headers)
        generated = reply.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated) and reply.json()["id"] == f"cmpl-{generated}", headers
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                      headers={"X-Request-Id": "x" * 128}).json()["id"] == "cmpl-" + "x" * 128
    # vLLM's request_id field names it where no header does (the header first, as vLLM's): body and header alike
    named = {"request_id": "job-7"}
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=2,
                                                           extra_body=named)
    assert raw.headers["x-request-id"] == "job-7" and raw.parse().id == "chatcmpl-job-7"
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, extra_body=named).id == "cmpl-job-7"
    raw = client.embeddings.with_raw_response.create(model=MODEL, input="Hi", extra_body=named)
    assert raw.headers["x-request-id"] == "job-7"
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, extra_body=named,
                                     extra_headers=sent).id == "cmpl-trace-42/a.b"
    unfit = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "request_id": "two words"})
    assert error_of(unfit, 400)["param"] == "request_id"
    # every response carries it: errors of the routes and of the middleware (413), and probes
    for reply in (httpx.post(server.url + "/v1/completions", json={"prompt": "x", "temperature": 5}, headers=sent),
                  httpx.post(server.url + "/v1/completions", json={"prompt": "x" * (MAX_BODY + 1)}, headers=sent),
                  httpx.get(server.url + "/v1/nothing-here", headers=sent), httpx.get(server.url + "/health",
                                                                                      headers=sent)):
        assert reply.headers["x-request-id"] == "trace-42/a.b", reply
    # and so does a 500 from an unhandled exception, which Starlette's outermost layer answers
    from unittest import mock

    app = create_app(engine_config(model_dir))  # (not loaded: /metrics needs no model)
    app.state.lcq.metrics = mock.Mock(exposition=mock.Mock(side_effect=RuntimeError("broken")))

    async def failing():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.get("/metrics", headers=sent)

    failed = asyncio.run(failing())
    assert error_of(failed, 500) and failed.headers["x-request-id"] == "trace-42/a.b"


def test_every_serve_flag_is_documented():
    """docs/configuration.md's table names every flag of `lcq serve`, and each flag the README's short table
    names is one."""
    import re
    from pathlib import Path

    from lcq.server.settings import FLAGS

    root = Path(__file__).resolve().parents[1]
    table = (root / "docs" / "configuration.md").read_text()
    assert [flag.name for flag in FLAGS if f"`{flag.name}`" not in table] == []
    readme = (root / "README.md").read_text()
    short = readme[readme.index("## Configuration"):readme.index("## API")]
    named = set(re.findall(r"`(--[a-z0-9-]+)`", short))
    assert named and named <= {flag.name for flag in FLAGS}


def test_metrics_move_after_requests(server, client):
    before = {name: server.metric(name) for name in ("lcq:prompt_tokens_total", "lcq:generation_tokens_total",
                                                     "lcq:e2e_request_latency_seconds_count",
                                                     "lcq:time_to_first_token_seconds_count")}
    success = server.metric("lcq:request_success_total", finished_reason="length")
    ok = server.metric("lcq:http_requests_total", status="200")
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert server.metric("lcq:prompt_tokens_total") == before["lcq:prompt_tokens_total"] + r.usage.prompt_tokens
    assert server.metric("lcq:generation_tokens_total") == before["lcq:generation_tokens_total"] + 5
    assert server.metric("lcq:e2e_request_latency_seconds_count") == before["lcq:e2e_request_latency_seconds_count"] + 1
    assert server.metric("lcq:time_to_first_token_seconds_count") > before["lcq:time_to_first_token_seconds_count"]
    assert server.metric("lcq:request_success_total", finished_reason="length") == success + 1
    assert server.metric("lcq:http_requests_total", status="200") >= ok + 1
    queries, hits = server.metric("lcq:prefix_cache_queries_total"), server.metric("lcq:prefix_cache_hits_total")
    long_prompt = "To be, or not to be, that is the question. " * 6
    for _ in range(2):  # the second finds the first's full blocks cached
        again = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=1)
    assert server.metric("lcq:prefix_cache_queries_total") == queries + 2 * again.usage.prompt_tokens
    assert server.metric("lcq:prefix_cache_hits_total") - hits >= again.usage.prompt_tokens_details.cached_tokens > 0
    text = httpx.get(server.url + "/metrics").text
    for name in ("lcq:num_requests_running", "lcq:num_requests_waiting", "lcq:kv_cache_usage_perc",
                 "lcq:num_preemptions_total", "lcq:inter_token_latency_seconds_bucket",
                 "lcq:time_per_output_token_seconds_bucket", "lcq:request_prefill_time_seconds_bucket",
                 "lcq:request_decode_time_seconds_bucket", "lcq:request_inference_time_seconds_bucket",
                 "lcq:request_queue_time_seconds_bucket", "lcq:request_prompt_tokens_bucket",
                 "lcq:request_generation_tokens_bucket"):
        assert name + "{" in text
    ok = server.metric("lcq:http_requests_total", status="200")
    for path in ("/health", "/metrics", "/version"):  # probes and scrapes are no client's requests (as vLLM)
        assert httpx.get(server.url + path).status_code == 200
    assert server.metric("lcq:http_requests_total", status="200") == ok


def test_metric_series_exist_from_the_start_and_count_what_clients_wait_for(model_dir):
    """Every labelled series is exported at 0 before its first event (a series first seen at 1 shows no
    increase, so a process's first error, abort or 429 never reached a dashboard); a scored prompt's dropped token
    is not counted as generated; latencies count from before a grammar compiles, as the client waits for it."""
    with LiveServer(create_app(engine_config(model_dir))) as live:
        text = httpx.get(live.url + "/metrics").text
        for series in ('lcq:request_rejected_total{model_name="tiny",reason="queue_full"} 0.0',
                       'lcq:request_aborted_total{model_name="tiny"} 0.0', 'lcq:request_error_total{model_name="tiny"} 0.0',
                       'lcq:request_success_total{finished_reason="length",model_name="tiny"} 0.0',
                       'lcq:time_to_first_token_seconds_count{model_name="tiny"} 0.0'):
            assert series in text, series
        local = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        local.completions.create(model=MODEL, prompt="Hello there", max_tokens=0, echo=True, logprobs=1)
        assert live.metric("lcq:generation_tokens_total") == 0 == live.metric("lcq:request_generation_tokens_sum")
        if importlib.util.find_spec("xgrammar") is None:
            return
        structured = live.engine.engine.structured
        check = structured.check

        def slow_check(spec):  # a large schema's compile
            time.sleep(0.5)
            return check(spec)

        structured.check = slow_check
        try:
            local.completions.create(model=MODEL, prompt="{", max_tokens=2,
                                     extra_body={"response_format": {"type": "json_object"}})
        finally:
            structured.check = check
        assert live.metric("lcq:time_to_first_token_seconds_sum") >= 0.5


def test_many_concurrent_streams(server):
    """32 streaming clients at once on 8 sequence slots: all finish, the pool is full again afterwards."""

    async def one(aclient, i: int) -> tuple[str, str]:
        stream = await aclient.completions.create(model=MODEL, prompt=f"Number {i} is", max_tokens=12 + i % 5,
                                                  temperature=0.8, seed=i, stream=True,
                                                  extra_body={"ignore_eos": True})
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(32)))

    results = asyncio.run(run())
    assert [finish for _, finish in results] == ["length"] * 32
    server.wait_pool_full()


def test_streams_from_steps_launched_ahead_are_those_of_steps_read_one_at_a_time(model_dir, server):
    """A server with async scheduling (its default on a GPU; forced here on the CPU): 12 concurrent seeded
    streams on 8 slots (some stopped by a stop string, the rest by length) stream the text the server
    without it streams, and a client that hangs up mid-stream frees its blocks."""
    requests = [dict(prompt=f"Number {i} is", max_tokens=10 + i % 4, temperature=0.8, seed=i, stop=["e"] if i % 3
                     else None, extra_body={"ignore_eos": True}) for i in range(12)]

    async def streamed(url: str) -> list[tuple[str, str]]:
        async def one(aclient, request: dict) -> tuple[str, str]:
            text, finish = "", None
            async for chunk in await aclient.completions.create(model=MODEL, stream=True, **request):
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            return text, finish

        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, request) for request in requests))

    app = create_app(engine_config(model_dir, async_scheduling=True), ServeSettings(max_body_bytes=MAX_BODY))
    with LiveServer(app) as ahead:
        assert ahead.engine.engine.async_scheduling
        results = asyncio.run(streamed(ahead.url))
        assert results == asyncio.run(streamed(server.url))
        assert {finish for _, finish in results} == {"stop", "length"}
        ahead.wait_pool_full()
        body = {"prompt": "Once upon a time", "max_tokens": 230, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", ahead.url + "/v1/completions", json=body) as response:
            assert next(response.iter_lines()).startswith("data: ")
        ahead.wait_pool_full()


def test_disconnect_mid_stream_frees_the_pool(server):
    aborted = server.metric("lcq:request_aborted_total")
    body = {"prompt": "Once upon a time", "max_tokens": 230, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.engine.stats().num_total_blocks > server.engine.stats().num_free_blocks
    server.wait_pool_full()
    assert server.metric("lcq:request_aborted_total") == aborted + 1


def test_disconnect_while_waiting_for_a_full_response_frees_the_pool(server):
    """The client hangs up once its 8 choices are generating (a raw socket, so the moment does not depend
    on how fast the machine generates); all 8 are aborted and their blocks freed."""
    aborted = server.metric("lcq:request_aborted_total")
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 230, "temperature": 0, "ignore_eos": True,
                       "n": 8}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.time() + 10
        while server.engine.stats().num_running == 0:
            assert time.time() < deadline, "the request never started"
            time.sleep(0.005)
    server.wait_pool_full()
    assert server.metric("lcq:request_aborted_total") == aborted + 8


def test_a_completions_request_takes_at_most_2048_prompts(server):
    """A few KB of one-token prompts made hundreds of thousands of engine requests, admitted whole (gigabytes, the
    server unanswering for seconds): a request takes up to 2,048 prompts, as an embeddings request its inputs."""
    for prompt in ([[5]] * 2049, ["a"] * 2049, ["7"] * 2049):  # (texts of digits past the cap: read as token ids)
        error = error_of(httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": prompt,
                                                                           "max_tokens": 1}), 400)
        assert error["param"] == "prompt", error
    out = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": [[5]] * 2048, "max_tokens": 1},
                     timeout=120).json()
    assert len(out["choices"]) == 2048


def test_vllm_logging_and_forced_usage(model_dir, client, caplog, monkeypatch):
    """vLLM's --enable-force-include-usage (every stream ends with its usage), --enable-log-requests and
    --enable-log-outputs with --max-log-len (a line per prompt and per finished choice, cut) and the activity line every interval while there is work (none without
    work, none with --disable-log-stats); the default server streams no usage unasked (`client`)."""
    import lcq.server.app as server_app

    monkeypatch.setattr(server_app, "STATS_LOG_INTERVAL", 0.2)
    args = dict(model=MODEL, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}, stream=True)
    assert [chunk.usage for chunk in client.completions.create(prompt="Once upon a time", **args)][-1] is None
    settings = ServeSettings(enable_force_include_usage=True, enable_log_requests=True, enable_log_outputs=True,
                             max_log_len=3)
    with caplog.at_level("INFO", logger="lcq.server"), LiveServer(create_app(engine_config(model_dir), settings)) as live:
        forced = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        completion = list(forced.completions.create(prompt="Once upon a time", **args))
        chat = list(forced.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], **args))
        for chunks in (completion, chat):
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
            assert all(chunk.usage is None for chunk in chunks[:-1])
        time.sleep(1.0)  # (the interval's line after the work, however late the loop wakes)
        # (this server's lines only: the module's server, alive beside it, logs its own activity)
        logged = [record.getMessage() for record in caplog.records if record.threadName == live.thread.name]
        idle = len([line for line in logged if "generation throughput" in line])
        time.sleep(0.5)  # no work since: no more activity lines
        logged = [record.getMessage() for record in caplog.records if record.threadName == live.thread.name]
    received = [line for line in logged if line.startswith("received request")]
    assert len(received) == 2 and all("prompt 1 of 1, model tiny" in line for line in received)
    assert all(re.search(r"prompt_token_ids \[\d+, \d+, \d+\]$", line) for line in received)
    outputs = [line for line in logged if line.startswith("generated for request")]
    assert len(outputs) == 2 and all("choice 0 (length): output " in line for line in outputs)
    assert all(re.search(r"output '.{0,3}', output_token_ids \[\d+, \d+, \d+\]$", line) for line in outputs)
    activity = [line for line in logged if "generation throughput" in line]
    assert activity and re.search(r"generation throughput [1-9][\d.]* tokens/s", " ".join(activity))
    assert len(activity) == idle and "running 0 reqs, waiting 0 reqs" in activity[-1]
    caplog.clear()
    quiet = ServeSettings(disable_log_stats=True)
    with caplog.at_level("INFO", logger="lcq.server"), LiveServer(create_app(engine_config(model_dir), quiet)) as live:
        list(openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0).completions.create(
            prompt="Once upon a time", **args))
        time.sleep(0.5)
    assert not [r for r in caplog.records if r.threadName == live.thread.name
                and ("throughput" in r.getMessage() or "received" in r.getMessage())]


def test_one_request_cannot_hold_the_engine_or_flood_the_log(server, client, caplog):
    """What one small body made the server do for everyone, found by a security audit, now bounded:
    - prompts x n, each choice an engine request admitted whole: 2,048 prompts at n = 128 made 262,144 of them;
    - stop strings and bad_words of 30,000 characters each, matched or tokenized for every choice: 16,384 in all;
    - a million repeated allowed_token_ids and stop_token_ids, made a tensor or searched at every step: each id once;
    - an unknown field named with a newline forged a log line, a megabyte-long name went to the log whole;
    - an error message quoting what was sent (a model name of megabytes) is cut to 2,000 characters."""
    fanout = error_of(httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": ["a"] * 17, "n": 128,
                                                                         "max_tokens": 1}), 400)
    assert fanout["param"] == "n" and "2176 choices" in fanout["message"], fanout
    for field in ("stop", "bad_words"):
        long = error_of(httpx.post(server.url + "/v1/completions", json={
            "model": MODEL, "prompt": "a", "max_tokens": 1, field: ["x" * 8000, "y" * 8000, "z" * 400]}), 400)
        assert long["param"] == field and "16384 characters" in long["message"], long
    repeated = client.completions.create(model=MODEL, prompt="Once", max_tokens=6, temperature=0, extra_body={
        "allowed_token_ids": [40, 41] * 3000, "stop_token_ids": [7, 8] * 3000, "ignore_eos": True,
        "return_token_ids": True}, timeout=60)
    tokens = repeated.choices[0].model_extra["token_ids"]
    assert len(tokens) == 6 and set(tokens) <= {40, 41}, tokens
    with caplog.at_level("INFO", logger="lcq.server"):
        httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 1,
                                                          "x\nERROR: forged": 1, "y" * 10000: 2})
    line = next(r.getMessage() for r in caplog.records if "ignoring unknown fields" in r.getMessage())
    assert "\n" not in line and len(line) < 500, line
    missing = error_of(httpx.post(server.url + "/v1/completions", json={"model": "m" * 30000, "prompt": "a"}), 404)
    assert len(missing["message"]) == 2000 and missing["message"].endswith("..."), len(missing["message"])


def test_a_client_gone_before_its_body_is_a_499(server):
    """A client that hangs up while sending its body is counted as a 499, as one that leaves a non-streamed
    request is (it was counted a 400: its body, cut short, was not JSON)."""
    before = {status: server.metric("lcq:http_requests_total", status=status) for status in ("400", "499")}
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                       b'Content-Length: 1000\r\n\r\n{"model": "tiny", "prompt": "Hel')
        time.sleep(0.2)
    deadline = time.time() + 10
    while server.metric("lcq:http_requests_total", status="499") == before["499"]:
        assert time.time() < deadline, "the request was never counted"
        time.sleep(0.02)
    assert server.metric("lcq:http_requests_total", status="499") == before["499"] + 1
    assert server.metric("lcq:http_requests_total", status="400") == before["400"]


def test_schemathesis_finds_no_server_errors(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize",
                                              "/generate", "/invocations"}

    statuses: dict[str, set[int]] = {}
    for operation in operations:
        @given(case=operation.as_strategy())
        # (completions' prompt forms are mostly empty or out-of-vocabulary drawn: more examples, so that some reach
        # generation whatever the schema's draw)
        @settings(max_examples=50 if operation.path == "/v1/completions" else 25, deadline=None, database=None,
                  derandomize=True, suppress_health_check=list(HealthCheck))
        def no_5xx(case):
            if isinstance(case.body, dict):  # keep generations short so the run stays fast
                for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
                    if isinstance(case.body.get(key), int):
                        case.body[key] = min(case.body[key], 4)
                parameters = case.body.get("parameters")  # (TGI's routes)
                for key in ("max_new_tokens", "best_of") if isinstance(parameters, dict) else ():
                    if isinstance(parameters.get(key), int):
                        parameters[key] = min(parameters[key], 4)
                if case.path == "/v1/completions":  # random grammars never compile (400): let this route reach
                    for key in ("guided_grammar", "structured_outputs"):  # generation; chat fuzzes the same fields
                        case.body.pop(key, None)
                    if case.body.get("prompt") == "":  # (the draw's favourite, a 400: run alone, no draw got further)
                        case.body["prompt"] = "Hello"
            response = case.call(base_url=server.url, timeout=60)
            statuses.setdefault(case.path, set()).add(response.status_code)
            assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: " \
                                               f"{response.text[:300]} for {json.dumps(case.body)[:300]}"
        no_5xx()
    print(statuses)
    assert 200 in statuses["/v1/completions"] and 400 in statuses["/v1/completions"]  # it reached generation
    server.wait_pool_full()


def test_503_while_loading(model_dir):
    """An engine that has not loaded yet: health and generation say 503 with Retry-After."""
    app = create_app(engine_config(model_dir))  # no lifespan run here, so the model never loads

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return (await http.get("/health"),
                    await http.post("/v1/completions", json={"prompt": "x"}),
                    await http.get("/v1/models"))

    health, completion, models = asyncio.run(run())
    error_of(health, 503)
    assert error_of(completion, 503) and completion.headers["retry-after"]
    assert models.json()["data"][0]["id"] == MODEL


@pytest.fixture(scope="module")
def small_server(model_dir):
    """One sequence at a time, a queue of one, an API key and frequent keep-alives."""
    app = create_app(engine_config(model_dir, max_num_seqs=1, max_queue=1),
                     ServeSettings(api_key="sekret", keepalive_interval=0.05))
    with LiveServer(app) as live:
        yield live


def test_api_key(small_server):
    url = small_server.url
    body = {"prompt": "x", "max_tokens": 1}
    assert error_of(httpx.post(url + "/v1/completions", json=body), 401)["type"] == "authentication_error"
    error_of(httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
    assert good.completions.create(model=MODEL, prompt="x", max_tokens=1).choices[0].finish_reason
    assert httpx.get(url + "/health").status_code == 200  # probes need no key
    for page in ("/openapi.json", "/docs", "/redoc"):  # nor the schema and its pages (--disable-fastapi-docs)
        assert httpx.get(url + page).status_code == 200


def test_full_queue_429_and_keepalive_while_waiting(small_server):
    url, headers = small_server.url, {"Authorization": "Bearer sekret"}
    long = {"prompt": "Once upon a time", "max_tokens": 230, "temperature": 0, "ignore_eos": True, "stream": True}
    rejected = small_server.metric("lcq:request_rejected_total", reason="queue_full")
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "/v1/completions", json=long, headers=headers) as running:
            running_lines = running.iter_lines()
            assert next(running_lines).startswith("data: ")  # the only slot is taken
            with http.stream("POST", url + "/v1/completions", json=long, headers=headers) as waiting:
                waiting_lines = waiting.iter_lines()
                assert next(waiting_lines) == ": keep-alive"  # queued: no token yet, but the connection lives
                full = httpx.post(url + "/v1/completions", json={**long, "stream": False}, headers=headers)
                assert error_of(full, 429)["type"] == "rate_limit_error"
                assert int(full.headers["retry-after"]) >= 0
    assert small_server.metric("lcq:request_rejected_total", reason="queue_full") == rejected + 1
    small_server.wait_pool_full()
    # n=3 on an idle server of one slot and a queue of one: admitted whole (its choices past the queue's room)
    assert len(httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 3},
                          headers=headers).json()["choices"]) == 3
    # two prompts, the second past the context: refused whole, its first choice, queued, neither an aborted
    # request nor prompt tokens
    counts = [small_server.metric(name) for name in ("lcq:request_aborted_total", "lcq:prompt_tokens_total")]
    invalid = small_server.metric("lcq:request_rejected_total", reason="invalid_request")
    refused = httpx.post(url + "/v1/completions", json={"prompt": [[5, 6], [5] * 300], "max_tokens": 2},
                         headers=headers)
    assert "your request has 300 input tokens" in error_of(refused, 400)["message"]
    assert small_server.metric("lcq:request_rejected_total", reason="invalid_request") == invalid + 1
    assert [small_server.metric(name) for name in ("lcq:request_aborted_total", "lcq:prompt_tokens_total")] == counts
    small_server.wait_pool_full()


@pytest.mark.parametrize("draft_model", [False, True], ids=["prompt-lookup", "draft-model"])
def test_speculative_decoding_streams_the_same_text(model_dir, server, client, draft_model):
    """A server drafting by prompt lookup, or with a draft model (the model itself), streams what the plain
    one does, and counts its drafts."""
    drafts = dict(speculative_model=str(model_dir)) if draft_model else {}
    app = create_app(engine_config(model_dir, num_speculative_tokens=4, **drafts), ServeSettings())
    messages = [{"role": "user", "content": "To be, or not to be, to be, or not to be, to be"}]
    request = dict(model=MODEL, messages=messages, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**request).choices[0].message.content
    with LiveServer(app) as live:
        drafting = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        stream = drafting.chat.completions.create(**request, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == plain
        accepted = live.metric("lcq:spec_decode_num_accepted_tokens_total")
        drafted_steps = live.metric("lcq:spec_decode_num_drafts_total")
        assert 0 < drafted_steps <= live.metric("lcq:spec_decode_num_draft_tokens_total")
        assert 0 < accepted <= live.metric("lcq:spec_decode_num_draft_tokens_total")
        live.wait_pool_full()


def test_unset_sampling_fields_take_the_models_generation_config(model_dir, tmp_path):
    """A generation_config.json with temperature 0 and max_new_tokens 4: requests that leave them unset
    are greedy and 4 tokens long on every generation route; a request's own values win."""
    import shutil

    folder = shutil.copytree(model_dir, tmp_path / "tuned")
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "temperature": 0.0, "max_new_tokens": 4}))
    messages = [{"role": "user", "content": "Hello"}]
    with LiveServer(create_app(engine_config(folder, generation_config="auto"), ServeSettings())) as live:
        tuned = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        chat = tuned.chat.completions.create(model=MODEL, messages=messages, extra_body={"ignore_eos": True})
        greedy = tuned.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4,
                                               extra_body={"ignore_eos": True})
        assert chat.usage.completion_tokens == 4
        assert chat.choices[0].message.content == greedy.choices[0].message.content
        longer = tuned.chat.completions.create(model=MODEL, messages=messages, max_tokens=9,
                                               extra_body={"ignore_eos": True})
        assert longer.usage.completion_tokens == 9
        assert longer.choices[0].message.content.startswith(chat.choices[0].message.content)  # still greedy
        text = tuned.completions.create(model=MODEL, prompt="Hello", extra_body={"ignore_eos": True})
        assert text.usage.completion_tokens == 4
        reply = tuned.responses.create(model=MODEL, input="Hello", store=False)
        assert reply.usage.output_tokens <= 4
    with LiveServer(create_app(engine_config(folder, generation_config="vllm"), ServeSettings())) as live:
        plain = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        assert plain.completions.create(model=MODEL, prompt="Hello", extra_body={"ignore_eos": True}
                                        ).usage.completion_tokens == 16  # OpenAI's default for completions


def test_lora_adapters_are_served_as_models_of_their_own(model_dir, tmp_path):
    """`--lora-modules`: each adapter is a model in /v1/models (its parent the base) that chat,
    completions and Responses requests name; its replies are the offline engine's with that adapter,
    and the base model's stay the base's."""
    from lcq.runtime import LLM, SamplingParams
    from tests.tiny_model import make_tiny_adapter

    adapter = make_tiny_adapter(tmp_path / "sql", model_dir)
    config = engine_config(model_dir, lora_modules=f"sql-lora={adapter}")
    offline = LLM(config.model, lora_modules=config.lora_modules, kv_cache_memory_gb=0.01)
    prompt = "Hello"
    ids = offline.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    expected = {name: offline.generate([ids], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, lora=lora)
                                       )[0].text for name, lora in ((MODEL, None), ("sql-lora", "sql-lora"))}
    assert expected[MODEL] != expected["sql-lora"]
    with LiveServer(create_app(config, ServeSettings())) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        cards = {card.id: card for card in client.models.list().data}
        assert set(cards) == {MODEL, "sql-lora"} and cards["sql-lora"].parent == MODEL
        # vLLM's root (the folder served) and permission (none)
        assert [(card.root, card.permission) for card in cards.values()] == [(str(model_dir), []), (str(adapter), [])]
        assert client.models.retrieve("sql-lora").parent == MODEL
        for name, text in expected.items():
            out = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert out.choices[0].text == text and out.model == name
        messages = [{"role": "user", "content": "Hi"}]
        chats = [client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0,
                                                extra_body={"ignore_eos": True}).choices[0].message.content
                 for name in (MODEL, "sql-lora")]
        assert chats[0] != chats[1]
        reply = client.responses.create(model="sql-lora", input="Hi", max_output_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True}, store=False)
        assert reply.output_text == chats[1] and reply.model == "sql-lora"
        with pytest.raises(openai.NotFoundError, match="serves `tiny`, `sql-lora`"):
            client.completions.create(model="other", prompt=prompt, max_tokens=2)


def test_lora_adapters_load_and_unload_at_runtime(model_dir, tmp_path):
    """--allow-runtime-lora-updating: vLLM's load and unload routes (behind the API key). A loaded adapter
    is a model of its own whose replies equal those of the same folder given at start (--lora-modules),
    alone or batched with others; unloaded, it is gone, its running request still finishing with it;
    another folder loaded under its name replies with its own weights, never the old ones' cached
    blocks. Three adapters take turns in two slots. Names in use, folders that cannot be served, a fourth
    adapter beyond --max-cpu-loras and unknown names are refused."""
    from tests.tiny_model import make_tiny_adapter

    first, second = (make_tiny_adapter(tmp_path / f"a{seed}", model_dir, seed=seed) for seed in (0, 1))
    config = engine_config(model_dir, lora_modules=f"first={first},second={second}", max_loras=2, max_cpu_loras=3,
                           allow_runtime_lora_updating=True)
    with LiveServer(create_app(config, ServeSettings(api_key="sekret"))) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="sekret", max_retries=0)
        auth = {"Authorization": "Bearer sekret"}

        def post(route: str, body: dict, headers: dict = auth) -> httpx.Response:
            return httpx.post(live.url + route, json=body, headers=headers, timeout=30)

        prompt = "Once upon a time " * 12  # several full KV blocks, for the prefix cache
        args = dict(prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})

        def complete(model: str):
            return client.completions.create(model=model, **args)

        def text(model: str) -> str:
            return complete(model).choices[0].text

        expected = {name: text(name) for name in (MODEL, "first", "second")}
        assert len(set(expected.values())) == 3
        assert error_of(post("/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(first)}, {}), 401)
        loaded = post("/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(first)})
        assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'sql' added successfully."
        assert {card.id: card.parent for card in client.models.list().data}["sql"] == MODEL
        assert text("sql") == expected["first"]

        async def together() -> list[str]:
            async with openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="sekret", max_retries=0) as aclient:
                outs = await asyncio.gather(*(aclient.completions.create(model=name, **args)
                                              for name in ("sql", MODEL, "second", "sql")))
            return [out.choices[0].text for out in outs]

        assert asyncio.run(together()) == [expected[name] for name in ("first", MODEL, "second", "first")]

        for name, folder, message in (("sql", first, "'sql' has already been loaded"),
                                      (MODEL, first, "the base model's"),
                                      ("bad", tmp_path, "needs adapter_config.json"),
                                      ("long", tmp_path / ("a" * 300), "cannot be read")):  # (a 500: OSError)
            error = error_of(post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)}), 400)
            assert message in error["message"]
        assert error_of(post("/v1/load_lora_adapter", {"lora_name": "sql2"}), 400)["param"] == "lora_path"
        full = error_of(post("/v1/load_lora_adapter", {"lora_name": "more", "lora_path": str(second)}), 400)
        assert "3 LoRA adapters are loaded, as many as max_cpu_loras allows" in full["message"]

        stream = client.completions.create(model="sql", stream=True, **{**args, "max_tokens": 48})
        streamed = next(iter(stream)).choices[0].text  # running with the adapter
        removed = post("/v1/unload_lora_adapter", {"lora_name": "sql"})
        assert removed.status_code == 200 and removed.text == "Success: LoRA adapter 'sql' removed successfully."
        with pytest.raises(openai.NotFoundError, match="the model `sql` does not exist"):
            complete("sql")
        assert "sql" not in {card.id for card in client.models.list().data}
        streamed += "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
        assert streamed == client.completions.create(model="first", **{**args, "max_tokens": 48}).choices[0].text
        error = error_of(post("/v1/unload_lora_adapter", {"lora_name": "sql"}), 404)
        assert error["code"] == "model_not_found" and "'sql' is not loaded" in error["message"]

        assert post("/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(second)}).status_code == 200
        reloaded = complete("sql")
        assert reloaded.choices[0].text == expected["second"]
        assert reloaded.usage.prompt_tokens_details.cached_tokens == 0  # the first load's blocks are not its own
        assert complete("sql").usage.prompt_tokens_details.cached_tokens > 0
        # vLLM's load_inplace: the name's adapter replaced (a load of it without is refused, as above)
        inplace = post("/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(first), "load_inplace": True})
        assert inplace.status_code == 200 and complete("sql").choices[0].text == expected["first"]
        live.wait_pool_full()


def test_runtime_lora_routes_need_the_flag(server):
    for route, body in (("/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": "/tmp"}),
                        ("/v1/unload_lora_adapter", {"lora_name": "sql"})):
        assert "no route" in error_of(httpx.post(server.url + route, json=body), 404)["message"]


def _served_as_offline(model_dir, device: str) -> None:
    """A server on `device`: greedy completions, streamed and not, one at a time, give the offline engine's texts on
    the same device with the same settings; 12 concurrent seeded streams complete and free every block; /info names
    the device type."""
    from lcq.runtime import LLM, SamplingParams

    settings = dict(device=device, gpu_memory_utilization=0.02) if device == "cuda" else {}
    prompts = ["Once upon a time", "The capital of", "Numbers: 1, 2, 3,"]
    with LiveServer(create_app(engine_config(model_dir, **settings))) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        args = dict(model=MODEL, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        served = []
        for prompt in prompts:
            text = client.completions.create(prompt=prompt, **args).choices[0].text
            streamed = "".join(c.choices[0].text for c in client.completions.create(prompt=prompt, stream=True, **args)
                               if c.choices)
            assert streamed == text
            served.append(text)

        async def burst() -> list[str | None]:
            async with openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0) as aclient:
                async def one(i: int) -> str | None:
                    finish = None
                    async for chunk in await aclient.completions.create(
                            model=MODEL, prompt=f"Number {i} is", max_tokens=8 + i % 5, temperature=0.8, seed=i,
                            stream=True):
                        if chunk.choices and chunk.choices[0].finish_reason:
                            finish = chunk.choices[0].finish_reason
                    return finish
                return await asyncio.gather(*(one(i) for i in range(12)))

        assert all(finish in ("stop", "length") for finish in asyncio.run(burst()))
        live.wait_pool_full()
        assert httpx.get(live.url + "/info").json()["model_device_type"] == device
    offline = LLM(str(model_dir), kv_cache_memory_gb=0.01, max_num_seqs=8, **settings)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert [offline.generate([prompt], greedy)[0].text for prompt in prompts] == served


def test_the_server_serves_what_its_engine_generates(model_dir):
    _served_as_offline(model_dir, "cpu")


@pytest.mark.gpu
def test_the_server_on_a_gpu_serves_what_its_engine_generates(model_dir):
    """The server's own path on CUDA (its engine's loop on a thread, decode steps launched ahead, CUDA graphs, SSE),
    which the GPU runs of the engine alone do not take (bench/gpu_session.sh's test-server-gpu step, with the server's
    packages carried in)."""
    _served_as_offline(model_dir, "cuda")
