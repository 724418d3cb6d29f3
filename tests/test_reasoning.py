"""`lcq serve --reasoning-parser`: the parser split at every character boundary, the flag, and real servers
(tiny random models, the official openai client) for chat, its stream, the Responses API and its stream
helper, tool calls and JSON output after the thinking, and a server without the parser.

A random model does not think on its own: guided_choice makes it say a chosen reply (its grammar
applies from the first token, as the prompt is not inside <think>). The thinking model's template
opens <think> in the generation prompt, as DeepSeek-R1's newer one and Qwen3-Thinking's do; a logit
bias makes it write a few tokens, then "</think>" (a token of its own), after which a grammar applies."""
from __future__ import annotations

import json
import random

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from lcq.cli import main
from lcq.server.app import create_app
from lcq.server.reasoning import ReasoningParser, reasoning_parser
from lcq.server.settings import ServeSettings, resolve
from tests.live_server import MODEL, LiveServer, engine_config
from tests.tiny_model import make_tiny_hf
from tests.test_server_cli import parse

THINKING_TEMPLATE = (  # renders an assistant turn's reasoning_content, and opens the thinking of the next one
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message.reasoning_content %}<think>\n"
    "{{ message.reasoning_content }}\n</think>\n\n{% endif %}{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
REPLY = "<think>Paris is in France.</think>\n\nParis."
SAY = {"guided_choice": [REPLY]}
QUESTION = [{"role": "user", "content": "Capital of France?"}]
FRUIT = {"type": "object", "properties": {"name": {"enum": ["apple", "pear"]}, "ripe": {"type": "boolean"}},
         "required": ["name", "ripe"], "additionalProperties": False}

# (reply, (reasoning, content) after a plain prompt, (reasoning, content) after a prompt inside <think>)
SPLITS = [
    (REPLY, ("Paris is in France.", "Paris."), ("Paris is in France.", "Paris.")),
    ("Paris is in France.</think>\n\nParis.", (None, "Paris is in France.</think>\n\nParis."),
     ("Paris is in France.", "Paris.")),
    ("<think>cut off", ("cut off", None), ("cut off", None)),
    ("Hello", (None, "Hello"), ("Hello", None)),
    ("", (None, ""), ("", None)),
    (" \n<think>\nx\n</think>\n \n", ("\nx\n", ""), ("\nx\n", "")),
    ("Hello <think>x</think> y", (None, "Hello <think>x</think> y"), ("Hello <think>x", "y")),
    ("<think>a</thi", ("a</thi", None), ("a</thi", None)),
    ("<think>1 < 2 </b></think>3 </think>", ("1 < 2 </b>", "3 </think>"), ("1 < 2 </b>", "3 </think>")),
    ("<thinking>", (None, "<thinking>"), ("<thinking>", None)),
    ("  <thi", (None, "  <thi"), ("  <thi", None)),
]
PLAIN_PROMPT, THINKING_PROMPT = "<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n"


def streamed(parser: ReasoningParser, pieces: list[str]) -> tuple[str | None, str | None]:
    """The split as the stream gives it, joined; each delta checked to hold no piece of a tag."""
    stream, reasoning, content = parser.stream(), [], []
    for piece in pieces:
        r, c = stream.feed(piece)
        reasoning.append(r)
        content.append(c)
    r, c = stream.finish()
    reasoning.append(r)
    content.append(c)
    return ("".join(reasoning) if stream.entered else None), (None if stream.thinking else "".join(content))


@pytest.mark.parametrize("reply, plain, thinking", SPLITS)
def test_split_at_every_boundary_equals_the_one_shot_split(reply, plain, thinking):
    rng = random.Random(reply)
    for prompt, expected in ((PLAIN_PROMPT, plain), (THINKING_PROMPT, thinking)):
        parser = ReasoningParser(prompt)
        assert parser.split(reply) == expected
        assert streamed(parser, list(reply)) == expected  # one character at a time
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(reply)), min(len(reply) - 1, rng.randint(1, 4)))) if reply else []
            assert streamed(parser, [reply[a:b] for a, b in zip([0] + cuts, cuts + [len(reply)])]) == expected


@pytest.mark.parametrize("name", ["deepseek_r1", "qwen3", "glm45", "deepseek_v3", "minimax_m2", "nano_v3"])
def test_every_think_parser_name_reads_think_tags(name):
    """vLLM's names for the <think> syntax (DeepSeek-R1, Qwen3, GLM-4.5, DeepSeek-V3.1, MiniMax-M2, Nemotron 3) all
    split it, and the server's settings take each."""
    assert reasoning_parser(name, THINKING_PROMPT).split(SPLITS[1][0]) == SPLITS[1][2]
    assert reasoning_parser(name, PLAIN_PROMPT).split(REPLY) == SPLITS[0][1]
    assert ServeSettings(reasoning_parser=name).reasoning_parser == name


def test_the_settings_know_every_parser():
    """The names `lcq serve` accepts (settings.py, which imports no parser) are the parsers' own."""
    from lcq.server import reasoning, settings, tool_calls

    assert set(settings.TOOL_CALL_PARSERS) == set(tool_calls.PARSERS)
    assert settings.REASONING_PARSERS == reasoning.PARSERS


ANALYSIS, FINAL = "<|channel|>analysis<|message|>", "<|start|>assistant<|channel|>final<|message|>"
# (a gpt-oss reply with its harmony markup, its (reasoning, content))
HARMONY_SPLITS = [
    (f"{ANALYSIS}Paris is in France.<|end|>{FINAL}Paris.<|return|>", ("Paris is in France.", "Paris.")),
    (f"{ANALYSIS}x < 2 <|b|> y<|end|>{FINAL}1 <| 2", ("x < 2 <|b|> y", "1 <| 2")),  # not markup: text
    (f"{ANALYSIS}cut off", ("cut off", None)),
    (f"{ANALYSIS}cut off <|en", ("cut off <|en", None)),
    (f"{ANALYSIS}a<|end|><|start|>assistant<|channel|>commentary<|message|>Let me check.<|end|>"
     f"<|start|>assistant<|channel|>analysis<|message|>b<|end|>{FINAL}done", ("a\nb", "Let me check.\ndone")),
    (f"{ANALYSIS}a<|b<|end|>{FINAL}ok", ("a<|b", "ok")),  # a tag starts at the last <| before its |>
    ("<|channel|>final<|message|>No thinking.<|return|>", (None, "No thinking.")),
    ("Plain text", (None, "Plain text")),
    (f"{ANALYSIS}a<|end|><|start|>assistant<|channel|>fin", ("a", "")),  # cut off in the markup
    ("", (None, "")),
]
CALL = (f"{ANALYSIS}Weather?<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        '<|message|>{"city": "Paris"}<|call|>')
BROWSING = f'{ANALYSIS}t<|end|><|start|>assistant<|channel|>analysis to=browser.search<|message|>{{"q": 1}}<|call|>'
# (reply, (reasoning, content), whether the turn reads calls): a message to a recipient is left out, but a call to a
# function passes to the content for the openai tool-call parser where the turn reads calls
HARMONY_CALL_SPLITS = [
    (CALL, ("Weather?", ""), False),
    (CALL, ("Weather?", '<|channel|>commentary to=functions.get_weather<|message|>{"city": "Paris"}<|call|>'), True),
    (BROWSING, ("t", ""), True),  # gpt-oss's built-in browser: not one of the request's tools
    ("<|channel|>commentary to=<|message|>hi<|call|>", (None, ""), True),  # no recipient (an IndexError, a 500)
    (f"{CALL}<|start|>assistant<|channel|>final<|message|>Done.", ("Weather?", "Done."), False),
]


@pytest.mark.parametrize("reply, expected, reads_calls", [(*case, False) for case in HARMONY_SPLITS]
                         + HARMONY_CALL_SPLITS)
def test_harmony_split_at_every_boundary_equals_the_one_shot_split(reply, expected, reads_calls):
    """gpt-oss's harmony messages (openai_gptoss): the analysis channel is reasoning, the others content, a
    part's messages joined by a newline, the markup neither, however the reply streams."""
    rng = random.Random(reply)
    parser = reasoning_parser("openai_gptoss", "<|start|>assistant", reads_calls)
    assert parser.split(reply) == expected
    assert streamed(parser, list(reply)) == expected
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(reply)), min(len(reply) - 1, rng.randint(1, 4)))) if reply else []
        assert streamed(parser, [reply[a:b] for a, b in zip([0] + cuts, cuts + [len(reply)])]) == expected


def test_harmony_reasoning_tokens_count_up_to_the_analysis_end():
    tokens = ["<|channel|>", "analysis", "<|message|>", "Par", "is", "<|end|>", "<|start|>", "assistant",
              "<|channel|>", "final", "<|message|>", "ok"]
    decode = lambda ids: "".join(tokens[i] for i in ids)  # noqa: E731
    parser, ids = reasoning_parser("openai_gptoss", "<|start|>assistant"), list(range(len(tokens)))
    assert parser.reasoning_tokens(decode(ids), ids, decode) == 6
    assert parser.reasoning_tokens(decode(ids[:4]), ids[:4], decode) == 4  # cut off
    assert parser.reasoning_tokens("<|channel|>final<|message|>ok", ids[8:], decode) == 0


def test_tags_are_held_back_until_decided():
    stream = ReasoningParser(PLAIN_PROMPT).stream()
    assert stream.feed("  <thi") == ("", "") and stream.feed("nk>Paris</th") == ("Paris", "")
    assert stream.feed("ink>\n") == ("", "") and stream.feed("\nParis.") == ("", "Paris.")
    plain = ReasoningParser(PLAIN_PROMPT).stream()
    assert plain.feed("<th") == ("", "") and plain.feed("e answer") == ("", "<the answer")


def test_the_prompt_decides_where_a_reply_starts():
    assert ReasoningParser("<|im_start|>assistant\n<think>\n").inside
    assert not ReasoningParser("<|im_start|>assistant\n").inside
    assert not ReasoningParser("<|im_start|>assistant\n<think>\n\n</think>\n\n").inside  # Qwen3, thinking off
    assert ReasoningParser("<think>\nold\n</think>\n\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n").inside


def test_reasoning_tokens_count_up_to_the_closing_tag():
    tokens = ["<th", "ink>", "Par", "is</th", "ink>", "\n\n", "ok"]
    decode = lambda ids: "".join(tokens[i] for i in ids)  # noqa: E731
    ids = list(range(len(tokens)))
    assert ReasoningParser(PLAIN_PROMPT).reasoning_tokens("".join(tokens), ids, decode) == 5
    assert ReasoningParser(PLAIN_PROMPT).reasoning_tokens("".join(tokens[:4]), ids[:4], decode) == 4  # cut off
    assert ReasoningParser(PLAIN_PROMPT).reasoning_tokens("ok", [6], decode) == 0
    assert ReasoningParser(THINKING_PROMPT).reasoning_tokens("Paris</think>\n\nok", ids[2:], decode) == 3


def test_flag_and_environment(tmp_path, capsys):
    assert resolve(parse("--reasoning-parser", "qwen3"), {}).settings.reasoning_parser == "qwen3"
    assert resolve(parse(), {"LCQ_REASONING_PARSER": "deepseek_r1"}).settings.reasoning_parser == "deepseek_r1"
    assert resolve(parse(), {}).settings.reasoning_parser is None
    assert main(["serve", str(tmp_path), "--reasoning-parser", "o1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lcq: error: ") and "reasoning parser" in lines[0]


# Live servers


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("plain"), seed=0)


@pytest.fixture(scope="module")
def thinking_dir(tmp_path_factory):
    """A model whose template opens the thinking, with <think> and </think> as tokens of their own (rows
    of the model past the trained vocabulary, as real models pad theirs)."""
    folder = make_tiny_hf(tmp_path_factory.mktemp("thinking"), seed=1, vocab_size=400)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = THINKING_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(plain_dir):
    settings = ServeSettings(reasoning_parser="deepseek_r1", tool_call_parser="hermes")
    with LiveServer(create_app(engine_config(plain_dir), settings)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def client_of(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def reasoning_tokens_of(logprobs) -> int:
    """Tokens up to and including the one that completes </think>, from the reply's own tokens."""
    text = ""
    for count, entry in enumerate(logprobs.content, 1):
        text += entry.token
        if "</think>" in text:
            return count
    raise AssertionError("no </think> in the reply")


def test_chat_reasoning_apart_from_the_answer(client):
    pytest.importorskip("xgrammar")
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=60, logprobs=True, n=2,
                                         extra_body=SAY)
    for choice in out.choices:
        message = choice.message
        assert (message.reasoning, message.reasoning_content, message.content) == \
            ("Paris is in France.", "Paris is in France.", "Paris.")
        assert choice.finish_reason == "stop"
    assert sum(len(c.logprobs.content) for c in out.choices) == out.usage.completion_tokens  # every token's
    assert out.usage.completion_tokens_details.reasoning_tokens == sum(reasoning_tokens_of(c.logprobs)
                                                                       for c in out.choices)

    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=60, n=2, stream=True,
                                                 stream_options={"include_usage": True}, extra_body=SAY))
    for index in (0, 1):
        deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].index == index]
        thinking = [i for i, d in enumerate(deltas) if getattr(d, "reasoning", None)]
        answer = [i for i, d in enumerate(deltas) if d.content]
        assert thinking and answer and thinking[-1] < answer[0]  # the thinking first, then the answer
        assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == "Paris is in France."
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Paris is in France."
        assert "".join(d.content or "" for d in deltas) == "Paris."
    assert 0 < chunks[-1].usage.completion_tokens_details.reasoning_tokens < chunks[-1].usage.completion_tokens


def test_a_reply_without_thinking_has_null_reasoning(server, client):
    """With a reasoning parser, a reply that did not think still has message.reasoning and reasoning_content,
    null, as vLLM's (its documented client reads message.reasoning_content); without the parser neither key is
    there (test_without_the_parser_nothing_changes)."""
    pytest.importorskip("xgrammar")
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 10, "guided_choice": ["Paris."]}
    message = httpx.post(server.url + "/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Paris.", "reasoning": None, "reasoning_content": None,
                       "tool_calls": None}
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10,
                                         extra_body={"guided_choice": ["Paris."]})
    assert out.choices[0].message.reasoning_content is None and out.choices[0].message.content == "Paris."


def test_a_reply_cut_off_while_thinking_has_no_content(client):
    pytest.importorskip("xgrammar")
    args = dict(model=MODEL, messages=QUESTION, max_tokens=10, temperature=0, extra_body=SAY)
    out = client.chat.completions.create(**args)
    message = out.choices[0].message
    assert message.content is None and REPLY.startswith("<think>" + message.reasoning) and message.reasoning
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens_details.reasoning_tokens == out.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert not any(c.choices[0].delta.content for c in chunks[1:])
    assert "".join(getattr(c.choices[0].delta, "reasoning", None) or "" for c in chunks) == message.reasoning


def test_tool_calls_after_thinking(client):
    pytest.importorskip("xgrammar")
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    reply = ('<think>I should ask.</think>\n'
             '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')
    args = dict(model=MODEL, messages=QUESTION, tools=[weather], max_tokens=200, extra_body={"guided_choice": [reply]})
    out = client.chat.completions.create(**args)
    message = out.choices[0].message
    assert (message.reasoning, message.content, out.choices[0].finish_reason) == ("I should ask.", None, "tool_calls")
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert "".join(getattr(c.choices[0].delta, "reasoning", None) or "" for c in chunks) == "I should ask."
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [call for c in chunks for call in c.choices[0].delta.tool_calls or []]
    assert [call.function.name for call in calls] == ["get_weather"] and chunks[-1].choices[0].finish_reason == \
        "tool_calls"
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    with client.responses.stream(model=MODEL, input="Capital of France?", tools=[tool], max_output_tokens=200,
                                 extra_body={"guided_choice": [reply]}) as stream:
        added = [(e.output_index, e.item.type) for e in stream if e.type == "response.output_item.added"]
        final = stream.get_final_response()
    assert added == [(0, "reasoning"), (1, "function_call")]
    assert [item.type for item in final.output] == ["reasoning", "function_call"] and final.output_text == ""
    # not streamed, and as stored: the same items, the reasoning as completed (it ended) as the stream's
    whole = client.responses.create(model=MODEL, input="Capital of France?", tools=[tool], max_output_tokens=200,
                                    extra_body={"guided_choice": [reply]})
    for response in (final, whole, client.responses.retrieve(whole.id)):
        assert [(item.type, item.status) for item in response.output] == [("reasoning", "completed"),
                                                                         ("function_call", "completed")]


def test_responses_reasoning_item(server, client):
    pytest.importorskip("xgrammar")
    response = client.responses.create(model=MODEL, input="Capital of France?", max_output_tokens=60,
                                       temperature=0, extra_body=SAY)
    kinds = [type(item).__name__ for item in response.output]
    assert kinds == ["ResponseReasoningItem", "ResponseOutputMessage"]
    thought = response.output[0]
    assert thought.id.startswith("rs_") and thought.summary == [] and thought.status == "completed"
    assert [(c.type, c.text) for c in thought.content] == [("reasoning_text", "Paris is in France.")]
    assert response.output_text == "Paris." and response.status == "completed"
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=60, temperature=0,
                                          extra_body=SAY)  # the same prompt and tokens
    assert response.usage.output_tokens_details.reasoning_tokens == \
        chat.usage.completion_tokens_details.reasoning_tokens > 0

    stored = server.app.state.lcq.responses.get(response.id).conversation  # the thinking, for the template
    assert stored[-1] == {"role": "assistant", "content": "Paris.", "reasoning_content": "Paris is in France."}
    sent_back = client.responses.create(model=MODEL, max_output_tokens=2, input=[
        {"role": "user", "content": "Capital of France?"}, thought.model_dump(exclude_none=True),
        response.output[1].model_dump(exclude_none=True), {"role": "user", "content": "Sure?"}])
    assert server.app.state.lcq.responses.get(sent_back.id).conversation[1] == stored[-1]


def test_responses_stream_helper_with_reasoning(client):
    pytest.importorskip("xgrammar")
    with client.responses.stream(model=MODEL, input="Capital of France?", max_output_tokens=60,
                                 extra_body=SAY) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    item = ["response.output_item.added", "response.content_part.added"]
    done = ["response.content_part.done", "response.output_item.done"]
    assert kinds == ["response.created", "response.in_progress", *item] + ["response.reasoning_text.delta"] * \
        kinds.count("response.reasoning_text.delta") + ["response.reasoning_text.done", *done, *item] + \
        ["response.output_text.delta"] * kinds.count("response.output_text.delta") + \
        ["response.output_text.done", *done, "response.completed"]
    indexes = {e.type: e.output_index for e in events if hasattr(e, "output_index") and "text" in e.type}
    assert indexes == {"response.reasoning_text.delta": 0, "response.reasoning_text.done": 0,
                       "response.output_text.delta": 1, "response.output_text.done": 1}
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Paris is in France."
    assert final.output_text == "Paris." and final.output[0].content[0].text == "Paris is in France."
    assert final.output[0].id == events[2].item.id and final.usage.output_tokens_details.reasoning_tokens > 0


@pytest.fixture(scope="module")
def thinking(thinking_dir):
    with LiveServer(create_app(engine_config(thinking_dir), ServeSettings(reasoning_parser="qwen3"))) as live:
        yield live


def think_then(tokenizer_dir) -> dict:
    """A logit bias that has the thinking model write one token again (penalized more each time), then
    </think>: a few tokens of thinking, then the end of it."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    word, end = tokenizer.encode("Paris", add_special_tokens=False)[0], tokenizer.convert_tokens_to_ids("</think>")
    return dict(temperature=0, presence_penalty=2, frequency_penalty=2, logit_bias={str(word): 100, str(end): 90})


def test_json_output_follows_the_thinking(thinking, thinking_dir):
    """The prompt opens the thinking: the grammar applies from the token after </think>."""
    pytest.importorskip("xgrammar")
    client = client_of(thinking)
    fmt = {"type": "json_schema", "json_schema": {"name": "fruit", "schema": FRUIT}}
    args = dict(model=MODEL, messages=QUESTION, max_tokens=60, **think_then(thinking_dir))
    out = client.chat.completions.create(**args, response_format=fmt)
    message = out.choices[0].message
    assert message.reasoning and "Par" in message.reasoning and out.choices[0].finish_reason == "stop"
    assert json.loads(message.content)["name"] in ("apple", "pear")
    chunks = list(client.chat.completions.create(**args, response_format=fmt, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    response = client.responses.create(model=MODEL, input="Capital of France?", max_output_tokens=60,
                                       text={"format": {"type": "json_schema", "name": "fruit", "schema": FRUIT}},
                                       extra_body=think_then(thinking_dir))
    assert response.output[0].content[0].text == message.reasoning and json.loads(response.output_text) == \
        json.loads(message.content)
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": FRUIT}}
    named = {"type": "function", "function": {"name": "get_weather"}}
    called = client.chat.completions.create(**args, tools=[weather], tool_choice=named)
    call = called.choices[0].message.tool_calls[0]
    assert called.choices[0].message.reasoning == message.reasoning and json.loads(call.function.arguments)["name"] \
        in ("apple", "pear")


def test_json_output_follows_the_thinking_a_reply_opens_itself(thinking_dir, tmp_path):
    """The prompt does not open the thinking (Qwen3's stock template with thinking on: the model writes <think>
    itself): a reply may open with <think> and is then free until </think>, after which the grammar applies; a
    reply that opens otherwise follows the grammar from its first token. The grammar forced the first token to
    be JSON, so such a model could not think."""
    pytest.importorskip("xgrammar")
    folder = tmp_path / "opens-itself"
    folder.mkdir()
    for path in thinking_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = THINKING_TEMPLATE.replace("assistant\n<think>\n", "assistant\n")
    tokenizer.save_pretrained(folder)
    start, end = tokenizer.convert_tokens_to_ids("<think>"), tokenizer.convert_tokens_to_ids("</think>")
    fmt = {"type": "json_schema", "json_schema": {"name": "fruit", "schema": FRUIT}}
    with LiveServer(create_app(engine_config(folder), ServeSettings(reasoning_parser="qwen3"))) as live:
        client = client_of(live)
        args = dict(model=MODEL, messages=QUESTION, max_tokens=30, temperature=0, response_format=fmt)
        thought = client.chat.completions.create(**args, frequency_penalty=2,
                                                 logit_bias={str(start): 100, str(end): 99})
        message = thought.choices[0].message
        assert message.reasoning is not None and json.loads(message.content)["name"] in ("apple", "pear")
        plain = client.chat.completions.create(**args, logit_bias={str(start): -100}).choices[0].message
        assert getattr(plain, "reasoning", None) is None and json.loads(plain.content)["name"] in ("apple", "pear")


def test_a_message_that_mentions_the_tag_does_not_open_the_thinking(client, thinking):
    """Only what opens the reply decides whether it starts inside reasoning: a question about the <think>
    tag made the whole reply reasoning and dropped its JSON schema; a template that opens the thinking still
    does, and so does an assistant message continued inside its thinking."""
    pytest.importorskip("xgrammar")
    fmt = {"type": "json_schema", "json_schema": {"name": "fruit", "schema": FRUIT}}
    asked = [{"role": "user", "content": "What does the <think> tag do?"}]
    out = client.chat.completions.create(model=MODEL, messages=asked, max_tokens=30, temperature=0,
                                         response_format=fmt)
    assert getattr(out.choices[0].message, "reasoning", None) is None
    assert json.loads(out.choices[0].message.content)["name"] in ("apple", "pear")
    opened = client_of(thinking).chat.completions.create(model=MODEL, messages=asked, max_tokens=4, temperature=0)
    assert opened.choices[0].message.reasoning and opened.choices[0].message.content is None
    continued = client.chat.completions.create(
        model=MODEL, messages=QUESTION + [{"role": "assistant", "content": "<think>\nLet me see"}], max_tokens=4,
        temperature=0, extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert continued.choices[0].message.reasoning and continued.choices[0].message.content is None


def test_responses_logprobs_are_those_of_the_messages_text(thinking, thinking_dir):
    """The Responses API's output_text logprobs are the answer's tokens', not the thinking's before it."""
    client = client_of(thinking)
    args = dict(model=MODEL, input="Capital of France?", max_output_tokens=16,
                include=["message.output_text.logprobs"], extra_body=think_then(thinking_dir))
    response = client.responses.create(**args)
    text = response.output[-1].content[0]
    assert [item.type for item in response.output] == ["reasoning", "message"] and text.text
    assert "".join(lp.token for lp in text.logprobs).strip() == text.text.strip()
    events = list(client.responses.create(**args, stream=True))
    streamed = [lp.token for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert streamed == [lp.token for lp in events[-1].response.output[-1].content[0].logprobs] == \
        [lp.token for lp in text.logprobs]


@pytest.mark.parametrize("reply", ["<think>x</think>Paris.", REPLY])
def test_streamed_responses_logprobs_are_the_messages_whatever_opens_the_reply(server, reply):
    """Streamed output_text logprobs are the final message's, token for token, where the reply opens its own
    thinking: the tokens of a `<think` still held back went out with the first text, and the whitespace
    tokens after `</think>`, which add no text, never did."""
    args = dict(model=MODEL, input="Capital of France?", max_output_tokens=60, temperature=0, top_logprobs=1,
                include=["message.output_text.logprobs"], extra_body={"guided_choice": [reply]})
    whole = [lp.token for lp in client_of(server).responses.create(**args).output[-1].content[0].logprobs]
    events = list(client_of(server).responses.create(**args, stream=True))
    streamed = [lp.token for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    assert streamed == [lp.token for lp in done.logprobs] == whole and "Paris" in "".join(whole)


def test_reasoning_sent_back_reaches_the_template(thinking):
    """Chat messages may carry `reasoning` or `reasoning_content`; the template gets reasoning_content."""
    for key in ("reasoning", "reasoning_content"):
        messages = QUESTION + [{"role": "assistant", "content": "Paris.", key: "It is in France."},
                               {"role": "user", "content": "Sure?"}]
        tokens = httpx.post(thinking.url + "/tokenize", json={"messages": messages}).json()["tokens"]
        prompt = httpx.post(thinking.url + "/detokenize", json={"tokens": tokens}).json()["prompt"]
        assert "<think>\nIt is in France.\n</think>\n\nParis.<|im_end|>" in prompt


def test_reasoning_sent_back_is_gpt_oss_thinking_too():
    """gpt-oss's template renders an assistant turn's `thinking` as its analysis message."""
    from lcq.server.chat import message_dicts
    from lcq.server.protocol import ChatMessage

    sent = message_dicts([ChatMessage(role="assistant", content="Paris.", reasoning="It is in France.")])
    assert sent[0]["thinking"] == sent[0]["reasoning_content"] == "It is in France."


def test_thinking_cut_off_is_all_reasoning(thinking):
    client = client_of(thinking)
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5, temperature=0)
    assert out.choices[0].message.content is None and out.choices[0].message.reasoning is not None
    assert out.usage.completion_tokens_details.reasoning_tokens == 5
    events = list(client.responses.create(model=MODEL, input="Capital of France?", max_output_tokens=5,
                                          temperature=0, stream=True))  # the stream helper wants "completed"
    kinds, final = [e.type for e in events], events[-1].response
    assert final.status == "incomplete" and [(item.type, item.status) for item in final.output] == \
        [("reasoning", "incomplete")] and final.output_text == ""
    assert "response.reasoning_text.done" in kinds and "response.output_text.delta" not in kinds
    assert final.output[0].content[0].text == out.choices[0].message.reasoning
    whole = client.responses.create(model=MODEL, input="Capital of France?", max_output_tokens=5, temperature=0)
    assert [(item.type, item.status) for item in whole.output] == [("reasoning", "incomplete")]  # not streamed too


def test_without_the_parser_nothing_changes(thinking_dir):
    pytest.importorskip("xgrammar")
    with LiveServer(create_app(engine_config(thinking_dir), ServeSettings())) as live:
        body = {"messages": QUESTION, "max_tokens": 60, **SAY}
        out = httpx.post(live.url + "/v1/chat/completions", json=body).json()
        assert out["choices"][0]["message"] == {"role": "assistant", "content": REPLY, "tool_calls": None}
        assert "completion_tokens_details" not in out["usage"]
        with httpx.stream("POST", live.url + "/v1/chat/completions", json={**body, "stream": True}) as events:
            lines = [line for line in events.iter_lines() if line.startswith("data: {")]
        assert not any("reasoning" in line for line in lines)
        response = client_of(live).responses.create(model=MODEL, input="Capital of France?", max_output_tokens=60,
                                                    extra_body=SAY)
        assert [item.type for item in response.output] == ["message"] and response.output_text == REPLY
        fmt = {"type": "json_schema", "json_schema": {"name": "fruit", "schema": FRUIT}}
        json_out = client_of(live).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=60,
                                                           response_format=fmt, **think_then(thinking_dir))
        assert json.loads(json_out.choices[0].message.content)["name"] in ("apple", "pear")  # from the first token


def test_harmony_replies_split_on_a_live_server(plain_dir):
    """--reasoning-parser openai_gptoss on a real server: a harmony reply (its markup ordinary text for this
    tokenizer, where gpt-oss's are special tokens the server then keeps) comes back as reasoning and
    content, whole and streamed, its analysis tokens counted."""
    pytest.importorskip("xgrammar")
    reply = f"{ANALYSIS}Paris is in France.<|end|>{FINAL}Paris."
    with LiveServer(create_app(engine_config(plain_dir), ServeSettings(reasoning_parser="openai_gptoss"))) as live:
        args = dict(model=MODEL, messages=QUESTION, max_tokens=200, extra_body={"guided_choice": [reply]})
        out = client_of(live).chat.completions.create(**args)
        assert (out.choices[0].message.reasoning, out.choices[0].message.content) == ("Paris is in France.", "Paris.")
        assert 0 < out.usage.completion_tokens_details.reasoning_tokens < out.usage.completion_tokens
        deltas = [c.choices[0].delta for c in client_of(live).chat.completions.create(**args, stream=True)]
        assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == "Paris is in France."
        assert "".join(d.content or "" for d in deltas) == "Paris."
