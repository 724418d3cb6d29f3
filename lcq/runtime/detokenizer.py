"""Incremental detokenization with stop strings.

Text is released only when it is final: never half of a multi-byte character (a token can end
inside one, decoding to U+FFFD until the next token completes it), and never a piece that might
be the start of a stop string (held back until the next tokens decide). Stop strings are cut off
and never shown, also when they span several tokens.
"""
from __future__ import annotations

import functools
import json
import re

PROMPT_CONTEXT_TOKENS = 5  # decode with a few prompt tokens before, so leading spaces come out right


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str], skip_special_tokens: bool = True,
                 min_tokens: int = 0):
        # The fast tokenizer's Rust decoder directly: transformers' decode wrapper costs several
        # times more per call, and this runs twice per generated token.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        skip = skip_special_tokens
        self._decode_ids = (lambda ids: backend.decode(ids, skip_special_tokens=skip)) if backend is not None else (
            lambda ids: tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False))
        self.ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.tails = StopTails(stop)
        self.min_tokens = min_tokens  # stop strings are looked for once more tokens than this came (vLLM's)
        self.generated = 0
        self.text = ""  # output text decoded so far (cut at a stop string once found)
        self.released = 0  # characters of self.text already handed out
        self.stop_string: str | None = None

    def add(self, token_id: int) -> str:
        """Take one generated token; return the text that became final."""
        self.ids.append(token_id)
        self.generated += 1
        before = self._decode_ids(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode_ids(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            new_from = len(self.text)
            self.text += after[len(before):]
            ended = self.tails.feed(self.text[new_from:], new_from)
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            if ended and self.generated > self.min_tokens:
                # Cut the text at the first stop string that ends in its new part: one within the text before was
                # looked for then, or came within min_tokens, where none counts (vLLM's rule).
                index, self.stop_string = min(ended)
                self.text = self.text[:index]
        return self._release()

    def _release(self) -> str:
        end = len(self.text)
        if self.stop_string is None:
            end -= self._held_back()
        end = max(end, self.released)
        out, self.released = self.text[self.released:end], end
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        return self.tails.longest()

    def flush(self) -> str:
        """The held-back text, when generation ends for another reason than a stop string."""
        out, self.released = self.text[self.released:], len(self.text)
        return out


class TokenBytes:
    """The bytes each token stands for, which OpenAI's logprobs report (`bytes`) so that a character split
    over several tokens can be put together again (decoded alone, each of its tokens gives U+FFFD), and a
    token's leading space kept (a SentencePiece token decoded alone loses it). They come from the token's
    vocabulary entry: byte-level BPE's characters (GPT-2's table: Llama 3, Qwen, SmolLM2), or SentencePiece's
    pieces, "▁" for a space and byte tokens `<0xNN>` (Llama 2, Mistral); else from its decoded text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = json.dumps(json.loads(backend.to_str()).get("decoder"), ensure_ascii=False) if backend else ""
        self.byte_level = '"ByteLevel"' in decoder
        self.sentencepiece = "▁" in decoder
        self.of_character = {character: byte for byte, character in enumerate(byte_level_alphabet())}

    @functools.lru_cache(maxsize=1 << 16)
    def __call__(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if token_id not in self.tokenizer.all_special_ids and isinstance(piece, str):
            if self.byte_level and all(c in self.of_character for c in piece):
                return bytes(self.of_character[c] for c in piece)
            if self.sentencepiece:
                if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                    return bytes([int(piece[3:5], 16)])
                return piece.replace("▁", " ").encode("utf-8")
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def text(self, token_id: int) -> str:
        """The token's text as logprobs show it: U+FFFD for a part of a character."""
        return self(token_id).decode("utf-8", errors="replace")


class StopTails:
    """For each stop string, how long a prefix of it the text ends with, kept up to date character by character
    (Knuth-Morris-Pratt): the text a step may still be holding back. Trying every tail length against every stop
    string each token took O(L^2) in a stop string's length L (a 100,000-character one: 15 ms a token, on the
    engine's thread, for every sequence)."""

    def __init__(self, stops: list[str]):
        self.stops = [stop for stop in stops if stop]
        self.failures = [self._failure(stop) for stop in self.stops]
        self.matched = [0] * len(self.stops)

    @staticmethod
    def _failure(stop: str) -> list[int]:
        """failure[i]: the length of the longest proper prefix of stop[:i + 1] that is also its suffix."""
        failure, k = [0] * len(stop), 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = failure[k - 1]
            k += stop[i] == stop[k]
            failure[i] = k
        return failure

    def feed(self, text: str, at: int) -> list[tuple[int, str]]:
        """Take the text's next characters (from index `at` of it); returns where each stop string that ends in them
        first starts, with the stop string."""
        ended = []
        for j, (stop, failure) in enumerate(zip(self.stops, self.failures)):
            k, first = self.matched[j], None
            for i, character in enumerate(text):
                if k == len(stop):  # a whole match (before min_tokens, where none counts): go on from its tail
                    k = failure[k - 1]
                while k and character != stop[k]:
                    k = failure[k - 1]
                k += character == stop[k]
                if k == len(stop) and first is None:
                    first = at + i + 1 - len(stop)
            self.matched[j] = k
            if first is not None:
                ended.append((first, stop))
        return ended

    def longest(self) -> int:
        """The longest tail of the text that is a proper prefix of a stop string."""
        return max((k if k < len(stop) else failure[-1] for stop, failure, k in
                    zip(self.stops, self.failures, self.matched)), default=0)


def byte_level_alphabet() -> list[str]:
    """The character byte-level BPE writes for each byte 0..255 (GPT-2's table): printable Latin-1 bytes
    stand for themselves, the others for the characters from U+0100 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    extra = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(extra)) for byte in range(256)]
