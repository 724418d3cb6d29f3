"""TGI's own API (/generate, /generate_stream, / and /info) and SageMaker's routes (/ping, /invocations) end to end:
real uvicorn, a tiny random model, huggingface_hub's InferenceClient as TGI's users call it. Each reply is checked
against /v1/completions given the same prompt: equal greedy tokens, texts and logprobs mean the parameters reached the
engine as TGI's and the tokens came back in TGI's shape."""
from __future__ import annotations

import json
import math
import re

import httpx
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError

from lcq.server.app import create_app
from lcq.server.settings import ServeSettings
from tests.live_server import MODEL, LiveServer, engine_config
from tests.tiny_model import make_tiny_hf

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "Hello there, how"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = make_tiny_hf(tmp_path_factory.mktemp("tiny"), seed=0)
    with LiveServer(create_app(engine_config(model_dir), ServeSettings(api_key=KEY))) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return InferenceClient(base_url=server.url, api_key=KEY)


def completion(server, prompt: str = PROMPT, **fields) -> dict:
    """/v1/completions' greedy choice for the prompt, with its token ids and logprobs."""
    body = {"model": MODEL, "prompt": prompt, "temperature": 0, "return_token_ids": True, "logprobs": 0, **fields}
    response = httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_greedy_details_equal_the_completions_endpoints(server, client):
    expected = completion(server, max_tokens=8, logprobs=2)
    out = client.text_generation(PROMPT, max_new_tokens=8, details=True, decoder_input_details=True, top_n_tokens=2)
    assert out.generated_text == expected["text"]
    details = out.details
    assert [t.id for t in details.tokens] == expected["token_ids"] and details.generated_tokens == 8
    assert details.finish_reason == "length" and details.seed is None  # (greedy)
    for token, logprob, top in zip(details.tokens, expected["logprobs"]["token_logprobs"], details.top_tokens):
        assert token.logprob == pytest.approx(logprob, abs=1e-4) and not token.special
        assert len(top) == 2 and top[0]["logprob"] >= top[1]["logprob"]
    prompt_ids = client.text_generation(PROMPT, max_new_tokens=1, details=True, decoder_input_details=True)
    assert [t.id for t in details.prefill] == [t.id for t in prompt_ids.details.prefill] == expected["prompt_token_ids"]
    assert details.prefill[0].logprob is None and all(t.logprob < 0 for t in details.prefill[1:])
    assert client.text_generation(PROMPT, max_new_tokens=8) == expected["text"]  # (the plain text, no details)


def test_streamed_tokens_make_the_text(server, client):
    expected = completion(server, max_tokens=12)
    events = list(client.text_generation(PROMPT, max_new_tokens=12, stream=True, details=True))
    assert [e.index for e in events] == list(range(1, 13))
    assert [e.token.id for e in events] == expected["token_ids"]
    assert "".join(e.token.text for e in events) == expected["text"] == events[-1].generated_text
    # the same token texts in /generate's details: each character whole with the token that ends it
    whole = client.text_generation(PROMPT, max_new_tokens=12, details=True).details.tokens
    assert [t.text for t in whole] == [e.token.text for e in events]
    # a character of several tokens (an emoji's bytes): no token shows a piece of it (U+FFFD), both routes alike
    emoji = {"max_new_tokens": 40, "grammar": {"type": "regex", "value": "( 🐦){3}"}}
    tokens = client.text_generation(PROMPT, details=True, **emoji).details.tokens
    streamed = [e.token for e in client.text_generation(PROMPT, details=True, stream=True, **emoji)]
    assert [t.text for t in tokens] == [t.text for t in streamed] and len(tokens) > 3
    assert "".join(t.text for t in tokens) == " 🐦" * 3  # the end-of-sequence token last: special, no text
    assert tokens[-1].special and tokens[-1].text == "" and not any(t.special for t in tokens[:-1])
    assert all(e.details is None and e.generated_text is None for e in events[:-1])
    assert events[-1].details.finish_reason == "length" and events[-1].details.generated_tokens == 12
    assert events[-1].details.input_length == len(expected["prompt_token_ids"])
    texts = list(client.text_generation(PROMPT, max_new_tokens=12, stream=True))  # without details: the texts
    assert "".join(texts) == expected["text"]


def test_stop_sequences_stay_in_the_text_and_full_text_and_truncate(server, client):
    text = completion(server, max_tokens=16)["text"]
    stop = next(text[i:i + 2] for i in range(4, len(text) - 2)
                if text[i:i + 2].strip() and text[i:i + 2] not in text[:i + 1])
    out = client.text_generation(PROMPT, max_new_tokens=16, stop=[stop], details=True, return_full_text=True)
    assert out.generated_text == PROMPT + text[:text.index(stop) + len(stop)]
    assert out.details.finish_reason == "stop_sequence"
    # the tokens' texts end where the text does, a stop string's end inside a token too, streamed alike
    cut = text[:text.index(stop) + len(stop)]
    assert "".join(t.text for t in out.details.tokens if not t.special) == cut
    tokens = [t.text for t in client.text_generation(PROMPT, max_new_tokens=16, details=True).details.tokens]
    at = next(k for k, token in enumerate(tokens) if k > 1 and len(token) > 1 and "".join(tokens[:k]).strip())
    inside = "".join(tokens[:at])[-3:] + tokens[at][0]  # (ends inside token `at`, unless found before)
    for stop_here in (stop, inside):
        events = list(client.text_generation(PROMPT, max_new_tokens=16, stop=[stop_here], stream=True, details=True))
        assert "".join(e.token.text for e in events if not e.token.special) == events[-1].generated_text
        assert events[-1].generated_text.endswith(stop_here) and events[-1].details.finish_reason == "stop_sequence"
    if len(events) == at + 1:  # (ended inside token `at`: its text cut there)
        assert events[-1].token.text == tokens[at][0]
    truncated = client.text_generation(PROMPT, max_new_tokens=4, truncate=2, details=True, decoder_input_details=True)
    prompt_ids = completion(server, max_tokens=1)["prompt_token_ids"]
    assert [t.id for t in truncated.details.prefill] == prompt_ids[-2:]


def test_sampling_best_of_and_grammar(client):
    seeded = [client.text_generation(PROMPT, max_new_tokens=8, do_sample=True, seed=7, details=True) for _ in range(2)]
    assert seeded[0].generated_text == seeded[1].generated_text and seeded[0].details.seed == 7
    # unseeded, a seed is drawn and reported, as TGI's, which gives the sample again; typical_p (LangChain's
    # HuggingFaceEndpoint sends 0.95) samples from the typical tokens
    for typical in (None, 0.95):
        drawn = client.text_generation(PROMPT, max_new_tokens=8, do_sample=True, typical_p=typical, details=True)
        again = client.text_generation(PROMPT, max_new_tokens=8, do_sample=True, typical_p=typical,
                                       seed=drawn.details.seed, details=True)
        assert drawn.details.seed is not None and again.generated_text == drawn.generated_text
    best = client.text_generation(PROMPT, max_new_tokens=8, best_of=3, do_sample=True, seed=1, details=True)
    others = best.details.best_of_sequences
    assert len(others) == 2 and {s.seed for s in others} | {best.details.seed} == {1, 2, 3}

    def total(details) -> float:
        return sum(t.logprob for t in details.tokens)
    assert all(total(best.details) >= total(other) for other in others)
    for grammar in ({"type": "regex", "value": "(yes|no)[0-9]{2}"},
                    {"type": "json", "value": {"type": "object", "properties": {"a": {"enum": ["x", "y"]}},
                                               "required": ["a"], "additionalProperties": False}}):
        out = client.text_generation(PROMPT, max_new_tokens=32, grammar=grammar)
        assert re.fullmatch(grammar["value"], out) if grammar["type"] == "regex" else json.loads(out)["a"] in "xy"


def test_defaults_and_what_tgis_clients_send_to_openais_routes(server, client):
    """max_new_tokens unset is TGI's 100, null the rest of the context; the chat route takes the model names TGI's
    clients send for none (huggingface_hub's "dummy", text-generation's "tgi", huggingface.js's URL) and TGI's
    response_format, as huggingface_hub rewrites a json_schema one; replies carry a system_fingerprint."""
    for max_new_tokens, length_ok in (({}, lambda n: n == 100), ({"max_new_tokens": None}, lambda n: n > 100)):
        body = {"inputs": PROMPT, "parameters": {"details": True, **max_new_tokens}}
        details = httpx.post(server.url + "/generate", json=body, headers=AUTH, timeout=120).json()["details"]
        assert details["finish_reason"] == "eos_token" or length_ok(details["generated_tokens"]), details
    chat = InferenceClient(base_url=server.url, api_key=KEY)  # (its chat_completion sends the model "dummy")
    reply = chat.chat_completion([{"role": "user", "content": "Hi"}], max_tokens=3)
    assert reply.model == MODEL and reply.system_fingerprint
    for name in ("tgi", server.url):
        assert chat.chat_completion([{"role": "user", "content": "Hi"}], model=name, max_tokens=3).model == MODEL
    with pytest.raises(Exception, match="404"):
        chat.chat_completion([{"role": "user", "content": "Hi"}], model="none-such", max_tokens=3)
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"],
              "additionalProperties": False}
    formatted = chat.chat_completion([{"role": "user", "content": "Hi"}], max_tokens=32, response_format={
        "type": "json_schema", "json_schema": {"name": "out", "schema": schema}})
    assert json.loads(formatted.choices[0].message.content)["a"] in ("x", "y")
    for format_ in ({"type": "regex", "value": "(ab)+c"}, {"type": "json", "value": schema}):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32,
                "response_format": format_}
        text = httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60).json()
        content = text["choices"][0]["message"]["content"]
        assert re.fullmatch("(ab)+c", content) if format_["type"] == "regex" else json.loads(content)["a"] in "xy"


def test_errors_take_tgis_shape(server, client):
    for wrong in (dict(temperature=-1.0), dict(top_p=1.5), dict(repetition_penalty=0.0), dict(best_of=2)):
        with pytest.raises(ValidationError):
            client.text_generation(PROMPT, max_new_tokens=4, **wrong)
    with pytest.raises(ValidationError, match="watermark"):  # refused, not ignored
        client.text_generation(PROMPT, max_new_tokens=4, watermark=True)
    with pytest.raises(ValidationError, match="best_of"):
        list(client.text_generation(PROMPT, max_new_tokens=4, best_of=2, do_sample=True, stream=True))
    for body, status in (({"inputs": "x", "parameters": {"max_new_tokens": "many"}}, 422),
                         ({"inputs": ""}, 422), ({"parameters": {}}, 422),
                         ({"inputs": "x", "parameters": {"max_new_tokens": 10**6}}, 422),
                         ({"inputs": "x", "parameters": {"adapter_id": "none-such"}}, 404), ("{not json", 422)):
        response = httpx.post(server.url + "/generate", headers=AUTH,
                              **({"content": body} if isinstance(body, str) else {"json": body}))
        assert response.status_code == status and set(response.json()) == {"error", "error_type"}, response.text
        assert response.json()["error_type"] == "validation"
    # the checks before any route, in TGI's shape on its routes too: the API key, the body's size
    for status, headers, body in ((401, {}, {"inputs": "x"}), (413, AUTH, {"inputs": "x" * (5 << 20)})):
        response = httpx.post(server.url + "/generate", json=body, headers=headers)
        assert response.status_code == status and set(response.json()) == {"error", "error_type"}, response.text
    server.wait_pool_full()


def test_generate_routes_and_info(server):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6}}
    plain = httpx.post(server.url + "/generate", json=body, headers=AUTH)
    assert plain.json() == {"generated_text": completion(server, max_tokens=6)["text"]}
    assert plain.headers["x-generated-tokens"] == "6"
    assert httpx.post(server.url + "/", json=body, headers=AUTH).json() == [plain.json()]  # (a list: TGI's compat)
    stream = httpx.post(server.url + "/generate_stream", json=body, headers=AUTH)
    assert stream.headers["content-type"].startswith("text/event-stream") and "[DONE]" not in stream.text
    info = httpx.get(server.url + "/info", headers=AUTH).json()
    assert info["model_id"] == MODEL and info["max_total_tokens"] == server.engine.max_model_len
    assert (info["model_device_type"], info["model_dtype"]) == ("cpu", "torch.float32")  # as TGI names them


def test_tokenize_takes_tgis_body_beside_vllms(server):
    """/tokenize with TGI's body lists each token as TGI does, its text the characters it covers; vLLM's body keeps
    vLLM's reply; a bad TGI body is TGI's 422."""
    text = "Hello there, héllo wörld"
    reply = httpx.post(server.url + "/tokenize", json={"inputs": text}, headers=AUTH, timeout=60)
    assert reply.status_code == 200, reply.text
    tokens = reply.json()
    vllm = httpx.post(server.url + "/tokenize", json={"prompt": text}, headers=AUTH, timeout=60).json()
    assert [t["id"] for t in tokens] == vllm["tokens"]
    assert all(t["text"] == text[t["start"]:t["stop"]] for t in tokens)
    # the spans cover the text in order; the bytes of one character (é here) are tokens of the same span
    spans = [(t["start"], t["stop"]) for t in tokens]
    assert "".join(text[start:stop] for start, stop in dict.fromkeys(spans)) == text
    truncated = httpx.post(server.url + "/tokenize", json={"inputs": text, "parameters": {"truncate": 3}},
                           headers=AUTH, timeout=60).json()
    assert truncated == tokens[-3:]
    bad = httpx.post(server.url + "/tokenize", json={"inputs": ""}, headers=AUTH, timeout=60)
    assert bad.status_code == 422 and bad.json()["error_type"] == "validation" and "inputs" in bad.json()["error"]
    bad = httpx.post(server.url + "/tokenize", json={"inputs": "x", "parameters": {"truncate": "all"}}, headers=AUTH,
                     timeout=60)
    assert bad.status_code == 422 and set(bad.json()) == {"error", "error_type"}
    assert httpx.post(server.url + "/tokenize", json={"inputs": text}, timeout=60).status_code == 401


def test_launcher_limits(tmp_path):
    """--max-input-tokens (TGI's launcher's) refuses a longer prompt on every generating route, OpenAI's with 400 and
    TGI's with its 422, counts a truncated prompt after truncation, and is what /info reports; so do --max-best-of,
    --max-stop-sequences and --max-top-n-tokens on TGI's routes."""
    model_dir = make_tiny_hf(tmp_path / "tiny", seed=0)
    limits = ServeSettings(max_input_tokens=6, max_best_of=2, max_stop_sequences=1, max_top_n_tokens=2)
    with LiveServer(create_app(engine_config(model_dir), limits)) as live:
        prompt = "one two three four five six seven eight nine ten"
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
        refused = httpx.post(live.url + "/v1/completions", json=body, timeout=60)
        assert refused.status_code == 400 and "--max-input-tokens" in refused.json()["error"]["message"]
        assert refused.json()["error"]["code"] == "context_length_exceeded"
        kept = httpx.post(live.url + "/v1/completions", json={**body, "truncate_prompt_tokens": 6}, timeout=60)
        assert kept.status_code == 200, kept.text
        chat = httpx.post(live.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 2})
        assert chat.status_code == 400 and "more than this server takes (6" in chat.json()["error"]["message"]
        tgi = httpx.post(live.url + "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 2}},
                         timeout=60)
        assert tgi.status_code == 422 and tgi.json()["error_type"] == "validation"
        short = httpx.post(live.url + "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 2,
                                                                                          "truncate": 6}}, timeout=60)
        assert short.status_code == 200, short.text
        info = httpx.get(live.url + "/info", timeout=60).json()
        assert (info["max_input_tokens"], info["max_best_of"], info["max_stop_sequences"]) == (6, 2, 1)
        for parameters, name in (({"best_of": 3, "do_sample": True}, "best_of"), ({"stop": ["a", "b"]}, "stop"),
                                 ({"top_n_tokens": 3}, "top_n_tokens")):
            refused = httpx.post(live.url + "/generate", timeout=60, json={"inputs": "hi", "parameters": {
                "max_new_tokens": 2, **parameters}})
            assert refused.status_code == 422 and f"`{name}` must be <=" in refused.json()["error"], refused.text
        within = {"best_of": 2, "do_sample": True, "stop": ["a"], "top_n_tokens": 2, "max_new_tokens": 2}
        assert httpx.post(live.url + "/generate", json={"inputs": "hi", "parameters": within},
                          timeout=60).status_code == 200


def test_sagemaker_ping_and_invocations(server):
    for method in ("GET", "POST"):  # (no key: a probe)
        assert httpx.request(method, server.url + "/ping").json() == {"status": "ok"}
    calls = {"prompt": {"prompt": PROMPT, "max_tokens": 3, "temperature": 0},
             "messages": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
             "input": {"input": "Hi"}, "inputs": {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}}
    replies = {key: httpx.post(server.url + "/invocations", json=body, headers=AUTH) for key, body in calls.items()}
    assert {key: r.status_code for key, r in replies.items()} == dict.fromkeys(calls, 200)
    assert replies["prompt"].json()["choices"][0]["text"] == completion(server, max_tokens=3)["text"]
    assert replies["inputs"].json()[0]["generated_text"] == replies["prompt"].json()["choices"][0]["text"]
    assert replies["messages"].json()["object"] == "chat.completion"
    embedding = replies["input"].json()["data"][0]["embedding"]
    assert math.isclose(sum(v * v for v in embedding), 1.0, rel_tol=1e-4)
    for body, param in (({"nothing": 1}, None), ({"messages": 3}, "messages")):
        response = httpx.post(server.url + "/invocations", json=body, headers=AUTH)
        assert response.status_code == 400 and response.json()["error"]["param"] == param
    wrong = httpx.post(server.url + "/invocations", json={"inputs": "x", "parameters": {"top_k": -1}}, headers=AUTH)
    assert wrong.status_code == 422 and wrong.json()["error_type"] == "validation"  # (TGI's request, TGI's error)
    assert httpx.post(server.url + "/invocations", json=calls["prompt"]).status_code == 401
