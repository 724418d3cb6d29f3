"""Reasoning in replies: the thinking a reasoning model writes before its answer, split from the answer.

`lcq serve --reasoning-parser NAME` reads it as vLLM's parser of that name does. Six names read one
syntax, `<think>` ... `</think>`:
- deepseek_r1 (DeepSeek-R1 and its distills, QwQ);
- qwen3 (Qwen3, hybrid and Thinking);
- glm45 (GLM-4.5 to 4.7, GLM-4.7-Flash);
- deepseek_v3 (DeepSeek-V3.1 and later, thinking or not);
- minimax_m2 (MiniMax-M2, M2.1, M2.5);
- nano_v3 (Nemotron 3 Nano, NVIDIA's plugin name; with enable_thinking false its template closes an empty
  thinking, so the reply is content, as that plugin reads it);
openai_gptoss reads gpt-oss's harmony messages (HarmonyStream).
Newer chat templates open the thinking themselves (the generation prompt ends with `<think>` and a
newline, so the reply has only `</think>`); others leave the model to write `<think>` first; with
Qwen3's enable_thinking false the prompt closes an empty thinking. So the rendered prompt decides how a
reply starts: inside reasoning when the prompt ends inside an open `<think>`, else as content, where a
reply that opens (after whitespace) with `<think>` enters reasoning. Reasoning ends at the first
`</think>`; the whitespace after it belongs to neither part.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Callable

HARMONY = "openai_gptoss"  # gpt-oss's harmony channels, under vLLM's name
PARSERS = ("deepseek_r1", "qwen3", "glm45", "deepseek_v3", "minimax_m2", "nano_v3", HARMONY)  # all but the last: one syntax, vLLM's names
THINK_START, THINK_END = "<think>", "</think>"
# Harmony's markup, special tokens all: a message is <|channel|>NAME ...<|message|>TEXT and one of the ends;
# the next opens with <|start|>assistant (its role) before its channel.
CHANNEL, MESSAGE, START, TAG_OPEN, TAG_CLOSE = "<|channel|>", "<|message|>", "<|start|>", "<|", "|>"
CALL_END = "<|call|>"
MESSAGE_ENDS = ("<|end|>", CALL_END, "<|return|>")
REASONING_CHANNEL = "analysis"
RECIPIENT = " to="  # in a header: the message is addressed (to=functions.NAME: a tool call)
FUNCTIONS = "functions."  # the recipients that are the request's tools (others: gpt-oss's built-in browser, python)
LEFT_OUT = "left out"  # the channel of a message to a recipient that is not read as a call


def _tag_prefix(text: str, tag: str) -> int:
    """Length of the longest tail of text that is a proper prefix of tag (it may be the tag's start)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ReasoningStream:
    """One reply split as it streams: `feed` returns the (reasoning, content) text that is final, and
    never part of a tag: a tail that may begin one is held until the next text decides."""

    def __init__(self, inside: bool):
        self.inside = inside  # the prompt opened the reasoning
        self.state = "start"  # start (before any text but whitespace), reasoning, ended (after </think>), content
        self.entered = False  # the reply has a reasoning part
        self.held = ""

    @property
    def thinking(self) -> bool:
        """Whether the reply is inside its reasoning now (at the end: whether it was cut off there)."""
        return self.state == "reasoning" or (self.state == "start" and self.inside)

    def feed(self, delta: str) -> tuple[str, str]:
        text, self.held = self.held + delta, ""
        reasoning = content = ""
        while text:
            if self.state == "start":
                opening = text.lstrip()
                if opening.startswith(THINK_START):
                    self.state, self.entered, text = "reasoning", True, opening[len(THINK_START):]
                elif THINK_START.startswith(opening):  # only whitespace yet, or a tag not yet complete
                    self.held, text = text, ""
                else:
                    self.state, self.entered = ("reasoning", True) if self.inside else ("content", False)
            elif self.state == "reasoning":
                end = text.find(THINK_END)
                if end >= 0:
                    reasoning, self.state, text = reasoning + text[:end], "ended", text[end + len(THINK_END):]
                else:
                    cut = len(text) - _tag_prefix(text, THINK_END)
                    reasoning, self.held, text = reasoning + text[:cut], text[cut:], ""
            elif self.state == "ended":
                text = text.lstrip()
                if text:
                    self.state = "content"
            else:
                content, text = content + text, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The held-back text, once the reply is complete."""
        rest, self.held = self.held, ""
        if self.state == "start":
            self.state, self.entered = ("reasoning", True) if self.inside else ("content", False)
        return (rest, "") if self.state == "reasoning" else ("", rest)


class ReasoningParser:
    """How the replies to one prompt are split: whether they start inside reasoning (where what opens them,
    chat.reply_opening, leaves a think tag open)."""

    def __init__(self, opening: str):
        start = opening.rfind(THINK_START)
        self.inside = start >= 0 and THINK_END not in opening[start:]

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self.inside)

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a complete reply: reasoning None when it has none; content None when
        the reply ended inside its reasoning (cut off by max_tokens)."""
        stream = self.stream()
        reasoning, content = stream.feed(text)
        more_reasoning, more_content = stream.finish()
        return (reasoning + more_reasoning if stream.entered else None,
                None if stream.thinking else content + more_content)

    def reasoning_tokens(self, text: str, token_ids: list[int], decode: Callable[[list[int]], str]) -> int:
        """How many of a reply's tokens are reasoning: up to and including the one that completes
        `</think>` (the first token whose prefix decodes with it), all of them for a reply cut off in
        its reasoning, none for a reply without."""
        reasoning, content = self.split(text)
        if reasoning is None:
            return 0
        if content is None:
            return len(token_ids)
        first = bisect_left(range(1, len(token_ids) + 1), True, key=lambda k: THINK_END in decode(token_ids[:k]))
        return min(first + 1, len(token_ids))


class HarmonyStream:
    """One gpt-oss reply split as it streams. The reply is harmony messages (the prompt ends with
    `<|start|>assistant`): the analysis channel's text is reasoning, the final channel's (and a
    commentary's) content, the markup neither, as vLLM's openai_gptoss parser reads them, messages of a part
    joined by a newline. A message to a recipient (a tool call) is left out, as vLLM leaves it to the tool
    parser; where the turn reads calls (`reads_calls`: the openai tool-call parser, lcq.server.tool_calls) a
    call to a function goes to the content whole, as `<|channel|>commentary to=functions.NAME<|message|>`, its
    text, `<|call|>`. Text before any channel is content. A tail that may begin a tag is held until the next
    text decides. Same interface as ReasoningStream."""

    def __init__(self, reads_calls: bool = False):
        self.reads_calls = reads_calls
        self.state, self.channel = "body", None  # body (a message's text, in `channel`) or header (markup)
        self.header = ""  # the markup read since the last message's text, up to its <|message|>
        self.entered = False
        self.held = ""
        self.written = {"reasoning": False, "content": False}  # whether an earlier message gave the part text
        self.opened = False  # whether the current message has given its part text yet

    @property
    def thinking(self) -> bool:
        return self.state == "body" and self.channel == REASONING_CHANNEL

    def feed(self, delta: str) -> tuple[str, str]:
        text, self.held = self.held + delta, ""
        parts = {"reasoning": "", "content": ""}
        while text:
            if self.state == "header":
                self.header += text
                text = ""
                if MESSAGE in self.header:  # the header names the channel after its last <|channel|>
                    head, _, text = self.header.partition(MESSAGE)
                    words = head.rpartition(CHANNEL)[2].split()
                    self.state, self.channel, self.header = "body", words[0] if words else None, ""
                    self.entered |= self.channel == REASONING_CHANNEL
                    self.opened = False
                    if RECIPIENT in head:  # before or after the channel: `assistant to=X<|channel|>commentary`
                        recipient = (head.partition(RECIPIENT)[2].split("<|")[0].split() or [""])[0]  # (may be empty)
                        read = self.reads_calls and recipient.startswith(FUNCTIONS) and recipient != FUNCTIONS
                        self.channel = "call" if read else LEFT_OUT
                        if read:
                            parts["content"] += f"{CHANNEL}commentary{RECIPIENT}{recipient}{MESSAGE}"
                continue
            at = text.find(TAG_OPEN)
            if at < 0:
                cut = len(text) - text.endswith(TAG_OPEN[0])
                self._write(parts, text[:cut])
                self.held, text = text[cut:], ""
                continue
            end = text.find(TAG_CLOSE, at + len(TAG_OPEN))
            if end < 0:
                self._write(parts, text[:at])
                self.held, text = text[at:], ""
                continue
            again = text.find(TAG_OPEN, at + len(TAG_OPEN), end)
            if again >= 0:  # a `<|` of the text itself: a tag starts at the last `<|` before its `|>`
                self._write(parts, text[:again])
                text = text[again:]
                continue
            tag = text[at:end + len(TAG_CLOSE)]
            self._write(parts, text[:at])
            text = text[end + len(TAG_CLOSE):]
            if tag in MESSAGE_ENDS or tag in (CHANNEL, START):
                if self.channel == "call" and tag in MESSAGE_ENDS:
                    parts["content"] += CALL_END
                self.state, self.header = "header", "" if tag in MESSAGE_ENDS else tag
            else:  # not harmony's markup: the message's own text
                self._write(parts, tag)
        return parts["reasoning"], parts["content"]

    def _write(self, parts: dict[str, str], text: str) -> None:
        """A message's text to its part (none for a message to a recipient not read as a call), after a newline
        where an earlier message gave that part text."""
        if not text or self.channel == LEFT_OUT:
            return
        part = "reasoning" if self.thinking else "content"
        if self.channel != "call":
            if not self.opened and self.written[part]:
                text = "\n" + text
            self.opened = self.written[part] = True
        parts[part] += text

    def finish(self) -> tuple[str, str]:
        rest, self.held = self.held, ""
        parts = {"reasoning": "", "content": ""}
        if self.state == "body":
            self._write(parts, rest)
        return parts["reasoning"], parts["content"]


class HarmonyParser(ReasoningParser):
    """How gpt-oss's replies are split: every reply starts in markup or content, never inside reasoning.
    reads_calls: calls to functions pass to the content for the openai tool-call parser (HarmonyStream)."""

    def __init__(self, opening: str, reads_calls: bool = False):
        self.inside = False
        self.reads_calls = reads_calls

    def stream(self) -> HarmonyStream:
        return HarmonyStream(self.reads_calls)

    def reasoning_tokens(self, text: str, token_ids: list[int], decode: Callable[[list[int]], str]) -> int:
        """The tokens up to and including the one that ends the first analysis message (`decode` keeps the
        markup), all of them for a reply cut off in it, none for a reply without."""
        reasoning, content = self.split(text)
        if reasoning is None:
            return 0
        if content is None:
            return len(token_ids)

        def ended(prefix: str) -> bool:
            body = prefix.find(REASONING_CHANNEL + MESSAGE)
            return body >= 0 and any(end in prefix[body:] for end in MESSAGE_ENDS)

        first = bisect_left(range(1, len(token_ids) + 1), True, key=lambda k: ended(decode(token_ids[:k])))
        return min(first + 1, len(token_ids))


def reasoning_parser(name: str, opening: str, reads_calls: bool = False) -> ReasoningParser:
    """The parser `--reasoning-parser name` picks, for replies opened by `opening` (chat.reply_opening);
    reads_calls: whether the turn's tool calls are read by the openai tool-call parser (HarmonyStream)."""
    return HarmonyParser(opening, reads_calls) if name == HARMONY else ReasoningParser(opening)
