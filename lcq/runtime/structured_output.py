"""Output constrained to JSON (OpenAI's response_format json_object and json_schema), to a regular
expression (vLLM's guided_regex and guided_choice) or to an EBNF grammar (vLLM's guided_grammar) with
xgrammar.

Each constrained sequence has a grammar matcher; before a step's tokens are chosen, the matcher of
each such row writes a bitmask of the tokens that keep the output a prefix of valid JSON (xgrammar
does this in C++ in about 0.1 ms), disallowed logits become -inf, and the chosen token advances the
matcher. Once the JSON is complete only the end-of-sequence tokens remain allowed, so generation stops
there. JSON is compact (no whitespace between tokens): models that pad JSON with whitespace could
otherwise loop on it. xgrammar is imported on the first constrained request only.

A grammar may start later (SamplingParams.structured_output_after): the output is free until its text
holds the marker, and the grammar constrains the tokens after the one that completed it (the rest of
that token's text, as a rule whitespace after a reasoning model's "</think>", is not checked).
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Collection

import torch

from .sampling_params import StructuredOutput
from .schema_limits import MAX_SCHEMA_DEPTH, nesting_depth, unenforced
from .sequence import Sequence
from .step_inputs import host_tensor


GRAMMARS_KEPT = 256  # compiled grammars kept for the schemas asked again; a server sees ever new ones
# ... and their bytes at most, the most recently used first (an enum of 50,000 values compiles to 200 MB)
GRAMMAR_BYTES_KEPT = 512 << 20

# The character class of a length-bounded string in xgrammar's EBNF of a schema, and the one JSON allows
LENGTH_BOUNDED_CHARACTER = r'([^\"\\\r\n])'
JSON_STRING_CHARACTER = r'([^\0-\x1f\"\\\r\n])'


class StructuredOutputs:
    """Grammars compiled once per schema for one tokenizer (the GRAMMARS_KEPT most recently used, at most
    GRAMMAR_BYTES_KEPT of them; a larger one is not kept), and each
    constrained sequence's matcher (which holds its grammar). Grammars are compiled on any thread (the server
    compiles a request's off the engine's, AsyncEngine.prepare), matchers made on the engine's."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Collection[int], kept: int = GRAMMARS_KEPT):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, sorted(eos_ids)
        self.kept = kept
        self._compiler = None
        self._grammars: OrderedDict[StructuredOutput, object] = OrderedDict()
        self._lock = threading.Lock()  # the kept grammars and the compiler's making; not held while compiling
        self._openings: dict[str, torch.Tensor] = {}

    def _grammar(self, spec: StructuredOutput):
        with self._lock:
            if spec in self._grammars:
                self._grammars.move_to_end(spec)
                return self._grammars[spec]
        try:
            import xgrammar
        except ImportError:
            raise ValueError("response_format and guided outputs need the xgrammar package (pip install "
                             "xgrammar)") from None
        with self._lock:
            if self._compiler is None:
                info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                               stop_token_ids=self.eos_ids)
                self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)  # (kept here, bounded)
        try:
            if spec.structural_tag is not None:
                grammar = self._structural_tag_grammar(xgrammar, json.loads(spec.structural_tag))
            elif spec.regex is not None:
                grammar = self._compiler.compile_regex(spec.regex)
            elif spec.grammar is not None:
                grammar = self._compiler.compile_grammar(spec.grammar)
            else:
                schema = json.loads(spec.json_schema) if spec.json_schema is not None else {"type": "object"}
                if nesting_depth(schema) > MAX_SCHEMA_DEPTH:
                    raise ValueError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
                if problem := unenforced(schema):
                    raise ValueError(f"the grammar would not enforce {problem}")
                grammar = self._schema_grammar(xgrammar, schema)
        except Exception as e:  # xgrammar raises RuntimeError for what it cannot compile
            what = spec.source or ("guided_regex" if spec.regex is not None else "guided_grammar"
                                   if spec.grammar is not None else "response_format json_schema")
            reason = re.sub(r"^\[[^]]*\]\s*\S+:\d+:\s*", "", str(e).strip())  # no C++ timestamp and source line
            raise ValueError(f"{what} cannot be used: {reason}") from None
        with self._lock:
            self._grammars[spec] = grammar
            self._grammars.move_to_end(spec)
            while len(self._grammars) > self.kept or self._kept_bytes() > GRAMMAR_BYTES_KEPT:
                self._grammars.popitem(last=False)
        return grammar

    def _structural_tag_grammar(self, xgrammar, tag: dict):
        """The compiled grammar of a structural tag: xgrammar's form as it is, vLLM's older one (structures and
        triggers) as xgrammar's items; nested no deeper than a schema may be."""
        if nesting_depth(tag) > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the structural tag nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if "structures" not in tag:
            return self._compiler.compile_structural_tag(tag)
        structures, triggers = tag.get("structures"), tag.get("triggers")
        if not isinstance(structures, list) or not isinstance(triggers, list) or not all(
                isinstance(s, dict) and isinstance(s.get("begin"), str) and isinstance(s.get("end"), str)
                for s in structures):
            raise ValueError("structures must be a list of {begin, schema, end} and triggers a list of strings")
        items = [xgrammar.StructuralTagItem(begin=s["begin"], schema=json.dumps(s.get("schema") or {}), end=s["end"])
                 for s in structures]
        return self._compiler.compile_structural_tag(items, triggers)

    def _kept_bytes(self) -> int:
        return sum(grammar.memory_size_bytes for grammar in self._grammars.values())

    def _schema_grammar(self, xgrammar, schema: dict):
        """The compiled grammar of a JSON schema. xgrammar (0.2.9, the latest) writes the characters of a string
        with minLength or maxLength as any but a quote, a backslash, CR and LF, control characters included,
        which JSON does not allow raw (json.loads and the SDKs' parse() refuse the output): such grammars are
        compiled from their EBNF with the control characters left out, as its other strings have them."""
        text = json.dumps(schema)
        if '"minLength"' not in text and '"maxLength"' not in text:
            return self._compiler.compile_json_schema(schema, any_whitespace=False)
        ebnf = str(xgrammar.Grammar.from_json_schema(text, any_whitespace=False))
        return self._compiler.compile_grammar(ebnf.replace(LENGTH_BOUNDED_CHARACTER, JSON_STRING_CHARACTER))

    def check(self, spec: StructuredOutput) -> None:
        """Compile now, so that a bad schema is a client error at submission (ValueError)."""
        self._grammar(spec)

    def start(self, seq: Sequence, opening: str | None = None) -> None:
        """Give seq a matcher: its next tokens follow the grammar from its start, but for its first, which may
        instead be a token that opens with `opening` (the grammar then waits for the marker)."""
        import xgrammar
        seq.grammar = xgrammar.GrammarMatcher(self._grammar(seq.params.structured_output))
        seq.may_open = opening is not None

    def opening_tokens(self, opening: str) -> torch.Tensor:
        """The ids of the tokens whose text opens with `opening` (after whitespace), once per opening."""
        ids = self._openings.get(opening)
        if ids is None:
            texts = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            candidates = [i for i, text in enumerate(texts) if text is not None and opening in text]
            ids = [i for i in candidates if i < self.vocab_size
                   and self.tokenizer.decode([i], skip_special_tokens=False).lstrip().startswith(opening)]
            ids = self._openings[opening] = torch.tensor(ids, dtype=torch.long)
        return ids

    def start_after(self, seq: Sequence, searched_from: int) -> None:
        """Start seq's matcher if its output text, past `searched_from` minus the marker's length (what
        earlier tokens left unsearched), now holds the marker."""
        marker = seq.params.structured_output_after
        if seq.detokenizer.text.find(marker, max(0, searched_from - len(marker) + 1)) >= 0:
            self.start(seq)

    def constrain(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Set to -inf, in place, every logit of a constrained row that its grammar does not allow next."""
        import xgrammar
        rows = [row for row, seq in enumerate(seqs) if seq.grammar is not None]
        bitmask = xgrammar.allocate_token_bitmask(len(seqs), self.vocab_size)
        openings = []  # (row, the tokens that open it otherwise): allowed beside the grammar's, after masking
        for row in rows:
            seqs[row].grammar.fill_next_token_bitmask(bitmask, row)
            if seqs[row].may_open:
                ids = host_tensor(self.opening_tokens(seqs[row].params.structured_output_opening), logits.device)
                openings.append((row, ids, logits[row, ids].clone()))
        xgrammar.apply_token_bitmask_inplace(logits, host_tensor(bitmask, logits.device), vocab_size=self.vocab_size,
                                             indices=rows)
        for row, ids, values in openings:
            logits[row, ids] = values

    def accept(self, seq: Sequence, token: int, opening: str | None = None) -> bool:
        """Advance seq's matcher by its new token; True when the grammar has ended (the output is done). A first
        token that opens with `opening` drops the matcher instead: the grammar starts after the marker."""
        if seq.may_open:
            seq.may_open = False
            if token in self.opening_tokens(opening).tolist():
                seq.grammar = None
                return False
        if not seq.grammar.accept_token(token):
            raise RuntimeError(f"token {token} was sampled outside the grammar")
        return seq.grammar.is_terminated()
