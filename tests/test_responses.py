"""The Responses API (/v1/responses) end to end: real uvicorn, a tiny random model, the official openai
client's `responses` resource and its stream helper. Each request is checked against the chat endpoint
given the same conversation: equal greedy text and equal prompt token counts mean the input items,
instructions and stored history became the same prompt."""
from __future__ import annotations

import json
import threading
import time
from typing import Literal

import httpx
import openai
import pydantic
import pytest

from lcq.server.app import create_app
from lcq.server.response_store import ResponseStore, StoredResponse
from lcq.server.responses_protocol import ResponseObject
from lcq.server.settings import ServeSettings
from tests.live_server import MODEL, LiveServer, ShippedNginx, engine_config
from tests.tiny_model import make_tiny_hf

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
    "additionalProperties": False}}
ANSWERS = {"guided_choice": ["It is sunny.", "It rains."]}  # replies that end (status completed), not cut short


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = make_tiny_hf(tmp_path_factory.mktemp("tiny"), seed=0)
    with LiveServer(create_app(engine_config(model_dir), ServeSettings(responses_store_size=8))) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    """A server whose model's context (8,192 tokens) outlasts any request the tests cancel: a background
    response of thousands of tokens is still generating when it is cancelled."""
    model_dir = make_tiny_hf(tmp_path_factory.mktemp("long"), seed=0, max_position_embeddings=8192)
    with LiveServer(create_app(engine_config(model_dir), ServeSettings(responses_store_size=8))) as live:
        yield live


@pytest.fixture(scope="module")
def long_client(long_server):
    return openai.OpenAI(base_url=long_server.url + "/v1", api_key="unused", max_retries=0)


def chat(client, messages, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kwargs)


def test_text_response_matches_chat_and_its_stream(server, client):
    response = client.responses.create(model=MODEL, input="Tell me about bits.", instructions="Be brief.",
                                       max_output_tokens=12, temperature=0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about bits."}]
    same = chat(client, messages, max_tokens=12)
    assert response.id.startswith("resp_") and response.object == "response" and response.model == MODEL
    assert response.output_text == same.choices[0].message.content
    assert (response.usage.input_tokens, response.usage.output_tokens) == \
        (same.usage.prompt_tokens, same.usage.completion_tokens)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.instructions == "Be brief." and response.max_output_tokens == 12 and response.temperature == 0

    events = list(client.responses.create(model=MODEL, input="Tell me about bits.", instructions="Be brief.",
                                          max_output_tokens=12, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == response.output_text
    last = events[-1].response
    assert last.output_text == response.output_text and last.usage.output_tokens == 12
    assert last.output[0].id == events[2].item.id == events[-2].item.id


def test_reasoning_effort_reaches_the_template_as_chat_s_does(client):
    """Responses' reasoning.effort renders as chat's reasoning_effort does (the tiny template writes it)."""
    messages = [{"role": "user", "content": "Tell me about bits."}]
    effort = client.responses.create(model=MODEL, input="Tell me about bits.", max_output_tokens=2,
                                     reasoning={"effort": "low"})
    plain = client.responses.create(model=MODEL, input="Tell me about bits.", max_output_tokens=2)
    same = chat(client, messages, max_tokens=2, reasoning_effort="low")
    assert effort.usage.input_tokens == same.usage.prompt_tokens > plain.usage.input_tokens


def test_stream_helper_and_completed_status(client):
    with client.responses.stream(model=MODEL, input="Weather?", temperature=0.8, extra_body=ANSWERS) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text in ANSWERS["guided_choice"]
    assert "".join(deltas) == final.output_text and final.output[0].status == "completed"


def test_previous_response_id_continues_the_stored_conversation(server, client):
    first = client.responses.create(model=MODEL, input="Hi", instructions="Be kind.", max_output_tokens=5,
                                    temperature=0)
    second = client.responses.create(model=MODEL, input="And then?", previous_response_id=first.id,
                                     max_output_tokens=5, temperature=0)
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "And then?"}]  # instructions apply to their own response only
    same = chat(client, history, max_tokens=5)
    assert second.output_text == same.choices[0].message.content
    assert second.usage.input_tokens == same.usage.prompt_tokens and second.previous_response_id == first.id

    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError) as missing:  # OpenAI's 400, which clients read to resend it all
        client.responses.create(model=MODEL, input="x", previous_response_id=first.id)
    assert (missing.value.body["param"], missing.value.body["code"]) == ("previous_response_id",
                                                                         "previous_response_not_found")
    # the second still continues: it holds the whole conversation, not a link to the first
    third = client.responses.create(model=MODEL, input="Go on.", previous_response_id=second.id, max_output_tokens=2)
    assert third.usage.input_tokens > second.usage.input_tokens
    unstored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    # null is the default (the SDK types store and parallel_tool_calls as optional; wrappers pass their Nones on)
    defaulted = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=None,
                                        parallel_tool_calls=None)
    assert client.responses.retrieve(defaulted.id).parallel_tool_calls is True


def test_store_drops_the_least_recently_used():
    store = ResponseStore(capacity=2)
    entries = [StoredResponse(ResponseObject(id=f"resp_{i}", created_at=0, status="completed", model=MODEL), [], [])
               for i in range(3)]
    store.put(entries[0])
    store.put(entries[1])
    assert store.get("resp_0") is entries[0]  # now the most recently used
    store.put(entries[2])
    assert store.get("resp_1") is None and store.get("resp_0") is entries[0] and len(store) == 2
    empty = ResponseStore(capacity=0)
    empty.put(entries[0])
    assert empty.get("resp_0") is None
    # a background response still generating is never dropped (it was: polls and cancels then got 404s while
    # it kept generating): the least recently used of the others goes
    busy = ResponseStore(capacity=1)
    busy.running["resp_0"] = None
    busy.put(entries[0])
    busy.put(entries[1])
    assert busy.get("resp_0") is entries[0] and busy.get("resp_1") is None
    busy.running.clear()
    busy.put(entries[2])
    assert busy.get("resp_0") is None and busy.get("resp_2") is entries[2] and len(busy) == 1


def test_function_calls_and_their_outputs(client):
    pytest.importorskip("xgrammar")
    named = {"type": "function", "name": "get_weather"}
    response = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER], tool_choice=named,
                                       max_output_tokens=60, temperature=0)
    call = response.output[0]
    assert [item.type for item in response.output] == ["function_call"] and response.status == "completed"
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert json.loads(call.arguments)["city"] in ("Paris", "Oslo")

    events = list(client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER], tool_choice=named,
                                          max_output_tokens=60, temperature=0, stream=True))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == call.arguments and events[-1].type == "response.completed"
    assert not [e for e in events if e.type.startswith("response.output_text")]
    # cut off: the call's arguments end part way, and the call is incomplete as the response is
    cut = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER], tool_choice=named,
                                  max_output_tokens=4, temperature=0)
    assert cut.status == "incomplete" and [(i.type, i.status) for i in cut.output] == [("function_call", "incomplete")]
    assert call.arguments.startswith(cut.output[0].arguments) and cut.output[0].arguments != call.arguments
    # and the conversation goes on past it (the cut-off call is left out of the stored history, which a
    # template could not render: every later turn was a 400 naming `messages`)
    again = client.responses.create(model=MODEL, previous_response_id=cut.id, input="Try again.", max_output_tokens=2)
    assert again.status == "incomplete" and again.usage.input_tokens > cut.usage.input_tokens

    # the call's output as the next turn, by reference and sent in full: the same prompt
    answer = client.responses.create(model=MODEL, previous_response_id=response.id, tools=[WEATHER], tool_choice="none",
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "sunny"}], max_output_tokens=6, temperature=0)
    resent = client.responses.create(model=MODEL, tools=[WEATHER], tool_choice="none", max_output_tokens=6,
                                     temperature=0, store=False, input=[
                                         {"role": "user", "content": "Weather in Paris?"},
                                         {"type": "function_call", "call_id": call.call_id, "name": call.name,
                                          "arguments": call.arguments},
                                         {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert answer.output[0].type == "message" and answer.output_text == resent.output_text
    assert answer.usage.input_tokens == resent.usage.input_tokens
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": call.call_id, "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments}}]},
               {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]
    same = chat(client, history, max_tokens=6, tools=[{"type": "function", "function": {
        k: v for k, v in WEATHER.items() if k != "type"}}], tool_choice="none")
    assert answer.usage.input_tokens == same.usage.prompt_tokens
    assert answer.output_text == same.choices[0].message.content


def test_json_schema_text_format_and_logprobs(client):
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"name": {"enum": ["apple", "pear"]}}, "required": ["name"],
              "additionalProperties": False}
    fmt = {"format": {"type": "json_schema", "name": "fruit", "schema": schema, "strict": True}}
    fruit = client.responses.create(model=MODEL, input="A fruit?", text=fmt, max_output_tokens=30, temperature=0.7)
    assert json.loads(fruit.output_text)["name"] in ("apple", "pear") and fruit.text.format.type == "json_schema"

    class Fruit(pydantic.BaseModel):  # the client's own schema and parsing (responses.parse)
        name: Literal["apple", "pear"]
        ripe: bool

    parsed = client.responses.parse(model=MODEL, input="A fruit?", text_format=Fruit, max_output_tokens=40,
                                    temperature=0.7).output_parsed
    assert parsed.name in ("apple", "pear") and isinstance(parsed.ripe, bool)

    scored = client.responses.create(model=MODEL, input="Hello", max_output_tokens=5, temperature=0, top_logprobs=3,
                                     include=["message.output_text.logprobs"])
    same = chat(client, [{"role": "user", "content": "Hello"}], max_tokens=5, logprobs=True, top_logprobs=3)
    ours, theirs = scored.output[0].content[0].logprobs, same.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in ours] == [(e.token, e.logprob) for e in theirs] and len(ours) == 5
    assert all(len(e.top_logprobs) == 3 for e in ours)
    streamed = [e for e in client.responses.create(model=MODEL, input="Hello", max_output_tokens=5, temperature=0,
                                                   top_logprobs=3, include=["message.output_text.logprobs"],
                                                   stream=True) if e.type == "response.output_text.delta"]
    assert [lp.token for e in streamed for lp in e.logprobs] == [e.token for e in ours]


def test_bad_requests_get_the_envelope(server, client):
    def refused(body: dict, status: int = 400) -> dict:
        reply = httpx.post(server.url + "/v1/responses", json=body)
        assert reply.status_code == status, reply.text
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        return error

    assert refused({"input": [{"type": "item_reference", "id": "x"}]})["param"] == "input.0"
    assert refused({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]})["param"] \
        == "input.0.content"
    assert refused({"input": [{"content": "no role"}]})["param"] == "input.0"
    assert refused({"input": [{"type": "function_call", "name": "f"}]})["param"] == "input.0"
    assert refused({"input": "x", "background": True, "store": False})["param"] == "background"
    assert refused({"input": "x", "tools": [{"type": "web_search"}]})["param"] == "tools.0"
    assert refused({"input": "x", "tools": [WEATHER]})["param"] == "tool_choice"  # "auto" needs a parser
    assert refused({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function"}})["param"] == "tool_choice"
    assert refused({"input": "x", "n": 2})["param"] == "n"
    assert refused({"input": "x", "tool_choice": "required"})["param"] == "tool_choice"  # no tools
    assert refused({"input": "x", "tools": [WEATHER], "tool_choice": "sometimes"})["param"] == "tool_choice"
    assert refused({"input": "x", "truncation": "auto"})["param"] == "truncation"
    assert refused({"input": "x", "include": ["message.output_text.logprob"]})["param"].startswith("include")
    refused({"input": []})
    refused({"input": "x", "max_output_tokens": -1})
    refused({"input": "x", "text": {"format": {"type": "yaml"}}})
    assert refused({"input": "x", "text": {"format": "json_object"}})["param"] == "text.format"  # (it was ignored)
    assert refused({"input": "x", "reasoning": {"effort": "max"}})["param"] == "reasoning.effort"
    assert refused({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": '{"ci'}]})[
        "param"] == "input.0.arguments"
    assert refused({"model": "gpt-5", "input": "x"}, 404)["code"] == "model_not_found"
    assert refused({"input": "x", "previous_response_id": "resp_none"})["code"] == "previous_response_not_found"
    # what is stored with a response within OpenAI's limits on metadata (a 4 MB map was kept whole), and what it
    # echoes at most 64 deep (400 deep passed the parser and failed the reply: a 500 after the generation)
    assert refused({"input": "x", "metadata": {str(i): "v" for i in range(17)}})["param"] == "metadata"
    assert refused({"input": "x", "metadata": {"k": "v" * 513}})["param"] == "metadata"
    nested: dict = {}
    for _ in range(400):
        nested = {"x": nested}
    assert refused({"input": "x", "text": {"format": {"type": "text"}, "x": nested}})["param"] == "text"
    assert refused({"input": "x", "background": True, "stream": True, "text": {"x": nested}})["param"] == "text"
    kept = client.responses.create(model=MODEL, input="x", max_output_tokens=2,
                                   metadata={str(i): "v" * 512 for i in range(16)})
    assert len(kept.metadata) == 16
    assert httpx.delete(server.url + "/v1/responses/resp_none").status_code == 404
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input="x", temperature=9)


def test_disconnect_mid_stream_frees_the_pool(server):
    with httpx.stream("POST", server.url + "/v1/responses", json={"input": "x", "max_output_tokens": 200,
                                                                   "stream": True, "extra": 1}) as reply:
        lines = reply.iter_lines()
        assert next(lines) == "event: response.created"
    server.wait_pool_full()


def test_a_failed_stream_keeps_the_text_it_sent(server, failing_draws):
    """A request the engine fails part way (here its sampling, after 5 tokens) ends its stream with an error
    event and response.failed, whose message holds the text already streamed, incomplete."""
    failing_draws(lambda seq: seq.params.seed == 666 and seq.num_output_tokens >= 5)
    body = {"input": "x", "max_output_tokens": 20, "stream": True, "temperature": 0, "seed": 666, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/responses", json=body, timeout=60) as reply:
        events = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    sent = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    message = events[-1]["response"]["output"][0]
    assert sent and message["content"][0]["text"] == sent and message["status"] == "incomplete"
    assert events[-1]["response"]["error"]["code"] == "server_error"  # one of OpenAI's codes
    server.wait_pool_full()


def test_a_request_its_own_constraints_fail_is_no_server_error(server):
    """A request whose own settings leave no token (its only allowed token is the end of sequence, which min_tokens
    bans) is a 400 unstreamed; streamed or in the background its failed response says invalid_prompt, as its error
    event says invalid_value: it said server_error, which tells clients to send it again."""
    body = {"input": "hi", "temperature": 0, "max_output_tokens": 8, "allowed_token_ids": [2], "min_tokens": 3}
    assert httpx.post(server.url + "/v1/responses", json=body, timeout=60).status_code == 400
    with httpx.stream("POST", server.url + "/v1/responses", json={**body, "stream": True}, timeout=60) as reply:
        events = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: ")]
    assert [(e["type"], e.get("code")) for e in events[-2:]] == [("error", "invalid_value"), ("response.failed", None)]
    assert events[-1]["response"]["error"]["code"] == "invalid_prompt"
    started = httpx.post(server.url + "/v1/responses", json={**body, "background": True}, timeout=60).json()
    deadline = time.monotonic() + 30
    while (stored := httpx.get(server.url + f"/v1/responses/{started['id']}").json())["status"] in ("queued",
                                                                                                  "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert (stored["status"], stored["error"]["code"]) == ("failed", "invalid_prompt")
    server.wait_pool_full()


def test_background_needs_a_store(tmp_path):
    """With no response store a background response could be neither polled nor cancelled (404s while it
    generated), and a streamed one's events were kept for ever: it is a 400, as background without store is."""
    model_dir = make_tiny_hf(tmp_path / "tiny", seed=0)
    with LiveServer(create_app(engine_config(model_dir), ServeSettings(responses_store_size=0))) as live:
        reply = httpx.post(live.url + "/v1/responses", json={"input": "x", "background": True, "max_output_tokens": 2})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "background"
        assert httpx.post(live.url + "/v1/responses", json={"input": "x", "max_output_tokens": 2}).status_code == 200


def test_a_response_the_server_aborts_has_failed(long_server, long_client):
    """A response the server cuts off (a drain's deadline aborts what still runs) has failed, with a
    server_error, whole or streamed (error, then response.failed): it was completed, so a client took an empty
    or truncated answer for the whole one on every rolling restart."""
    body = {"input": "x", "max_output_tokens": 8000, "temperature": 0, "ignore_eos": True}
    results = {}

    def whole():
        results["whole"] = httpx.post(long_server.url + "/v1/responses", json=body, timeout=60).json()

    def streamed():
        with httpx.stream("POST", long_server.url + "/v1/responses", json={**body, "stream": True}, timeout=60) as r:
            results["events"] = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]

    threads = [threading.Thread(target=target) for target in (whole, streamed)]
    for thread in threads:
        thread.start()
    deadline = time.time() + 30
    while long_server.engine.stats().num_running < 2:
        assert time.time() < deadline
        time.sleep(0.05)
    for request_id in list(long_server.engine._streams):  # what a drain's deadline does
        long_server.engine.abort(request_id)
    for thread in threads:
        thread.join(30)
    assert results["whole"]["status"] == "failed" and results["whole"]["error"]["code"] == "server_error"
    events = results["events"]
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-1]["response"]["error"]["code"] == "server_error"
    long_server.wait_pool_full()


def _polled(client, response_id: str, timeout: float = 30.0):
    """The background response once it has ended."""
    deadline = time.time() + timeout
    while (response := client.responses.retrieve(response_id)).status in ("queued", "in_progress"):
        assert time.time() < deadline, f"{response_id} still {response.status}"
        time.sleep(0.05)
    return response


def test_background_responses_are_polled_cancelled_and_deleted(long_server, long_client):
    """background: the response comes back queued at once, is generated with no connection waiting and, polled
    by id, ends as the same request without background does. Cancelled while generating it stops at once (the
    pool full again), cancelled; cancelling it again returns it as it ended. One still generating cannot be
    continued yet; one not created in the background cannot be cancelled; deleting a running one cancels it."""
    args = dict(model=MODEL, input="Tell me about bits.", max_output_tokens=12, temperature=0)
    queued = long_client.responses.create(**args, background=True)
    assert queued.status == "queued" and queued.background and queued.output == []
    input_ids = [item.id for item in long_client.responses.input_items.list(queued.id)]
    done, same = _polled(long_client, queued.id), long_client.responses.create(**args)
    assert [item.id for item in long_client.responses.input_items.list(queued.id)] == input_ids  # ids given once
    assert done.status == "incomplete" and done.output_text == same.output_text and done.usage.output_tokens == 12
    assert done.background and not same.background
    endless = dict(model=MODEL, input="x", max_output_tokens=8000, background=True, extra_body={"ignore_eos": True})
    running = long_client.responses.create(**endless)
    with pytest.raises(openai.BadRequestError, match="is still (queued|in_progress)"):
        long_client.responses.create(model=MODEL, input="y", previous_response_id=running.id)
    cancelled = long_client.responses.cancel(running.id)
    assert cancelled.status == "cancelled" and cancelled.usage.output_tokens < 8000
    long_server.wait_pool_full()
    assert long_client.responses.cancel(running.id).status == "cancelled"
    assert long_client.responses.retrieve(running.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError, match="only background responses can be cancelled"):
        long_client.responses.cancel(same.id)
    deleted = long_client.responses.create(**endless)
    long_client.responses.delete(deleted.id)
    long_server.wait_pool_full()
    with pytest.raises(openai.NotFoundError):
        long_client.responses.retrieve(deleted.id)


def test_a_background_stream_is_read_again_from_any_event(long_server, long_client):
    """background with stream: the events go on without a reader (the generation is not the connection's), and
    GET /v1/responses/{id}?stream=true sends them again after starting_after, then the rest as they come: a
    client that left after a few events resumes where it left off, and the deltas make the stored response's
    text; cancelled, its stream ends where it was cut. Only such responses stream again."""
    args = dict(model=MODEL, input="Tell me about bits.", max_output_tokens=40, temperature=0,
                extra_body={"ignore_eos": True})
    stream = long_client.responses.create(**args, background=True, stream=True)
    first = [event for event, _ in zip(stream, range(4))]
    stream.close()
    assert [e.sequence_number for e in first] == [0, 1, 2, 3] and first[0].response.background
    assert [(e.type, e.response.status) for e in first[:2]] == [("response.created", "queued"),
                                                                ("response.in_progress", "in_progress")]
    rest = list(long_client.responses.retrieve(first[0].response.id, stream=True, starting_after=3))
    assert [e.sequence_number for e in rest] == list(range(4, 4 + len(rest)))
    assert rest[-1].type == "response.incomplete"
    deltas = "".join(e.delta for e in first + rest if e.type == "response.output_text.delta")
    stored = long_client.responses.retrieve(first[0].response.id)
    assert deltas == stored.output_text == long_client.responses.create(**args).output_text
    again = list(long_client.responses.retrieve(stored.id, stream=True))
    assert [e.sequence_number for e in again] == list(range(len(again))) and len(again) == 4 + len(rest)
    long_server.wait_pool_full()
    long = long_client.responses.create(**{**args, "max_output_tokens": 8000}, background=True, stream=True)
    started = next(iter(long))
    long.close()
    cancelled = long_client.responses.cancel(started.response.id)
    assert cancelled.status == "cancelled", (started, cancelled)
    cut = list(long_client.responses.retrieve(started.response.id, stream=True))  # (ends where it was cut)
    assert cut and cut[-1].type != "response.completed"
    long_server.wait_pool_full()
    plain = long_client.responses.create(model=MODEL, input="x", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError, match="only such responses stream again"):
        list(long_client.responses.retrieve(plain.id, stream=True))


def test_replicas_behind_the_shipped_nginx_config_continue_stored_responses(server, tmp_path):
    """A response continued or fetched through the shipped balancer finds the replica that stored it,
    whichever replica the balancer asks first; the 404s that hand a request on are not counted as HTTP errors
    (each turn showed as up to one 404 per other replica on the dashboard)."""
    with LiveServer(create_app(engine_config(make_tiny_hf(tmp_path / "model", seed=0)))) as other, \
            ShippedNginx([server, other], tmp_path) as nginx:
        via = openai.OpenAI(base_url=nginx.url + "/v1", api_key="unused", max_retries=0)
        replicas = (server, other)
        misses = [live.metric("lcq:http_requests_total", status="404") for live in replicas]
        answers = [live.metric("lcq:http_requests_total", status="200") for live in replicas]
        previous = None
        for turn in range(4):  # the balancer alternates, so half the first tries go to the wrong replica
            previous = via.responses.create(model=MODEL, input=f"Turn {turn}.", max_output_tokens=2,
                                            previous_response_id=previous.id if previous else None)
            assert via.responses.retrieve(previous.id).output_text == previous.output_text
        assert previous.usage.input_tokens > 4 * 5  # four turns of history
        misses = [live.metric("lcq:http_requests_total", status="404") - before
                  for live, before in zip(replicas, misses)]
        answers = [live.metric("lcq:http_requests_total", status="200") - before
                   for live, before in zip(replicas, answers)]
        assert sum(misses) == 0 and sum(answers) == 8, (misses, answers)


def test_input_items_lists_a_stored_responses_own_input(client):
    """client.responses.input_items.list: this response's input items (not the earlier turns), newest
    first by default, in OpenAI's shapes with ids; the client's cursor pages through them with `after`."""
    first = client.responses.create(model=MODEL, input="Hello", max_output_tokens=3, store=True)
    items = list(client.responses.input_items.list(first.id))
    assert len(items) == 1 and items[0].type == "message" and items[0].role == "user"
    assert items[0].content[0].type == "input_text" and items[0].content[0].text == "Hello"
    assert items[0].id.startswith("msg_")
    turns = [{"role": "user", "content": f"Question {i}"} for i in range(5)]
    call = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}", "id": "fc_given"}
    output = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
    second = client.responses.create(model=MODEL, input=turns + [call, output], previous_response_id=first.id,
                                     max_output_tokens=3)
    paged = list(client.responses.input_items.list(second.id, limit=2, order="asc"))  # three pages
    assert [getattr(item, "content", None) and item.content[0].text for item in paged[:5]] == \
        [f"Question {i}" for i in range(5)]
    assert [item.type for item in paged[5:]] == ["function_call", "function_call_output"]
    assert paged[5].id == "fc_given" and paged[6].output == "sunny" and len({item.id for item in paged}) == 7
    newest = client.responses.input_items.list(second.id, limit=1)
    assert newest.data[0].type == "function_call_output" and newest.has_more
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_missing")
    with pytest.raises(openai.BadRequestError):
        client.responses.input_items.list(second.id, limit=0)
    with pytest.raises(openai.BadRequestError, match="no input item"):
        client.responses.input_items.list(second.id, after="msg_missing")
