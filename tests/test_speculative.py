"""Speculative decoding by prompt lookup and by a draft model: the proposer, the exactness of
verification, and the engine giving the tokens it gives without drafts (batched, chunked, preempted,
stopped mid-draft)."""
from __future__ import annotations

import itertools

import random
import shutil

import pytest
import torch

from lcq.errors import UserError
from lcq.kernels import cpu_index, native
from lcq.kernels.cpu_matmul import products_available
from lcq.runtime import LLM, EngineConfig, SamplingParams
from lcq.runtime.draft_model import DraftSequence, follow
from lcq.runtime.sequence import Sequence
from lcq.runtime.speculative import PromptLookup, can_draft, verify
from tests.test_runtime import FP32, small_block_bytes
from tests.tiny_model import cuda_llm, make_tiny_hf, make_tiny_lcq, make_tiny_mtp, make_tokenizer

# Prompts that repeat themselves, so that lookups match from the first step; the tiny random model
# also falls into loops of its own, which later lookups find.
PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7], [30, 31, 32], [40, 41, 42, 43, 44, 45, 40, 41, 42, 43]]
GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def _seq(tokens: list[int], params: SamplingParams = GREEDY) -> Sequence:
    """A decoding sequence: every token but the last in the cache."""
    seq = Sequence("r", list(tokens), params, detokenizer=None, max_tokens=100)
    seq.num_computed_tokens = len(tokens) - 1
    return seq


@pytest.fixture(scope="module", params=["hf", "lcq"])
def tiny(request, tmp_path_factory):
    """Full precision (torch layers) and LCQ (the C decode step: verification rows are its rows)."""
    folder = tmp_path_factory.mktemp("speculative")
    return make_tiny_hf(folder / "hf", "llama") if request.param == "hf" else \
        make_tiny_lcq(folder, "llama", bits=4, rank=2, group_size=32)


@pytest.fixture(scope="module")
def plain(tiny):
    return LLM(str(tiny), block_size=8, **FP32)


DRAFT_ALWAYS = dict(num_speculative_tokens=4, speculative_disable_by_batch_size=64)  # also when batched


@pytest.fixture(scope="module")
def drafting(tiny):
    return LLM(str(tiny), block_size=8, **DRAFT_ALWAYS, **FP32)


def test_prompt_lookup_takes_the_latest_longest_match():
    lookup = PromptLookup(num_tokens=3, max_n=3, min_n=1)
    seq = _seq([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 2, 3])
    assert lookup.propose(seq, limit=10) == [7, 8, 4]  # "2 3" last seen before 7 8 4 (3-gram "4 2 3" unseen)
    assert lookup.propose(seq, limit=2) == [7, 8]
    seq.token_ids += [7]  # the index grows with the sequence: "2 3 7" now matches its own earlier run
    assert lookup.propose(seq, limit=10) == [8, 4, 2]
    seq.draft_room = 1
    assert lookup.propose(seq, limit=10) == [8]
    assert PromptLookup(3, 3, 2).propose(_seq([1, 2, 3, 4]), limit=10) == []  # nothing repeats
    assert PromptLookup(3, 3, 1).propose(_seq([5, 1, 2, 5]), limit=10) == [1, 2, 5]  # may run into the suffix


def test_prediction_is_followed_and_found_again_after_the_output_leaves_it():
    """Drafts from a request's prediction: its start before any output, its next tokens while the output
    agrees, and after a departure the place where the output's last n tokens occur (the first at or
    after where it was left); with prompt lookup off too."""
    lookup = PromptLookup(num_tokens=0, max_n=3, min_n=2)
    prediction = [10, 11, 12, 13, 20, 21, 22, 10, 11, 12, 14, 15]
    params = SamplingParams(max_tokens=40, temperature=0, prediction=prediction)
    seq = Sequence("r", [1, 2, 3], params, detokenizer=None, max_tokens=100)
    seq.token_ids += [10]  # the first output token, as the prompt's step leaves it
    assert lookup.propose(seq, limit=3) == [11, 12, 13]
    assert seq.draft_from_prediction
    seq.token_ids += [11, 12, 99]  # the model took two drafts and then a token of its own
    assert lookup.propose(seq, limit=3) == []  # "12 99" is nowhere in the prediction
    seq.token_ids += [21, 22]
    assert lookup.propose(seq, limit=3) == [10, 11, 12]  # found again after "21 22"
    seq.token_ids += [10, 11, 12, 14]
    assert lookup.propose(seq, limit=8) == [15]  # followed to its end
    assert PromptLookup(0, 3, 2).propose(_seq([1, 2, 1, 2]), limit=10) == []  # no prediction, lookup off


def test_only_plain_decoding_sequences_draft():
    assert can_draft(_seq([1, 2, 3]))
    for params in (SamplingParams(repetition_penalty=1.1), SamplingParams(presence_penalty=0.5),
                   SamplingParams(frequency_penalty=0.5), SamplingParams(min_tokens=1, max_tokens=5),
                   SamplingParams(bad_words=["x"])):
        assert not can_draft(_seq([1, 2, 3], params)), params
    prefilling = _seq([1, 2, 3])
    prefilling.num_computed_tokens = 0
    assert not can_draft(prefilling)


def test_verify_keeps_greedy_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0, 0.0], [2.0, 0.0, 0.0, 1.0], [0.0, 0.0, 5.0, 0.0]])
    assert verify(logits, [_seq([1])], [[1, 0]]) == [[1, 0, 2]]  # both drafts are the argmax, then a bonus
    assert verify(logits, [_seq([1])], [[1, 3]]) == [[1, 0]]  # the second is not: the argmax replaces it
    assert verify(logits[:2], [_seq([1])], [[2]]) == [[1]]


@pytest.mark.parametrize("params, draft", [
    (SamplingParams(temperature=1.0, seed=7), 1),  # a likely draft
    (SamplingParams(temperature=0.7, seed=8), 3),  # an unlikely one, with temperature
    (SamplingParams(temperature=1.0, top_k=2, seed=9), 3),  # one top-k removes: never accepted
])
def test_verify_draws_each_token_as_plain_sampling_would(params, draft):
    """The first emitted token is distributed as the filtered softmax of its row, whatever the draft."""
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]]))
    seq = _seq([1], params)
    draws = 6000
    counts = torch.zeros(4)
    for _ in range(draws):
        counts[verify(logits, [seq], [[draft]])[0][0]] += 1
    probs = torch.softmax(logits[0] / params.temperature, -1)
    if params.top_k:
        probs[probs.argsort()[:-params.top_k]] = 0
        probs /= probs.sum()
    # 6000 draws: a standard error of at most 0.0065 per token, so 0.03 is over four of them.
    assert torch.allclose(counts / draws, probs, atol=0.03), (counts / draws, probs)
    if params.top_k:
        assert counts[draft] == 0


@pytest.mark.parametrize("q", [[0.1, 0.5, 0.3, 0.1], [0.4, 0.1, 0.1, 0.4], [0.0, 0.0, 0.0, 1.0]])
def test_verify_with_the_drafts_distribution_draws_as_plain_sampling_would(q):
    """A draft drawn from a distribution q (a draft model's): accepted with probability min(1, p/q), else
    replaced from the residual max(0, p - q), so the first emitted token is distributed as p whatever q
    is; with q = p every draft is accepted."""
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]]))
    seq = _seq([1], SamplingParams(temperature=1.0, seed=11))
    q = torch.tensor(q)
    drafts = torch.multinomial(q, 6000, replacement=True, generator=torch.Generator().manual_seed(5)).tolist()
    counts, accepted = torch.zeros(4), 0
    for draft in drafts:
        emitted = verify(logits, [seq], [[draft]], [q.unsqueeze(0)])[0]
        counts[emitted[0]] += 1
        accepted += len(emitted) == 2
    assert torch.allclose(counts / len(drafts), torch.softmax(logits[0], -1), atol=0.03), counts / len(drafts)
    expected = float(torch.minimum(torch.softmax(logits[0], -1), q).sum())  # the chance a draft is accepted
    assert accepted / len(drafts) == pytest.approx(expected, abs=0.03)


def test_drafts_give_the_plain_greedy_tokens(tiny, plain, drafting):
    expected = [o.token_ids for o in plain.generate(PROMPTS, GREEDY)]
    assert [o.token_ids for o in drafting.generate(PROMPTS, GREEDY)] == expected
    assert [drafting.generate([p], GREEDY)[0].token_ids for p in PROMPTS] == expected
    stats = drafting.engine.stats()
    assert stats.num_accepted_tokens_total > 0 and stats.num_draft_tokens_total >= stats.num_accepted_tokens_total
    # Drafts cut by a token budget of 5, and a pool of 6 blocks of 8 where someone gets preempted.
    chunked = LLM(str(tiny), block_size=8, max_num_batched_tokens=5, **DRAFT_ALWAYS, **FP32)
    assert [o.token_ids for o in chunked.generate(PROMPTS, GREEDY)] == expected
    small = LLM(str(tiny), block_size=8, kv_cache_memory_gb=6 * small_block_bytes(plain) / 2**30,
                **DRAFT_ALWAYS, **FP32)
    shorter = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)  # each fits the 48 tokens alone
    assert [o.token_ids for o in small.generate(PROMPTS, shorter)] == [e[:30] for e in expected]
    assert small.engine.stats().num_preemptions_total > 0
    for engine in (drafting.engine, chunked.engine, small.engine):
        stats = engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == stats.num_waiting == 0


@pytest.mark.skipif(native.load() is None or not cpu_index.enabled(), reason="the C kernels do not run here")
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("form", ["avx512", "avx2"])
def test_drafts_keep_exact_products_at_batch_one(tmp_path, monkeypatch, group_size, form):
    """With rounded product forms on (int8 for LCQ layers that keep their int8 weights, from 3 rows), a
    lone sequence's verification steps take each row as alone, as its plain decode steps of one row
    are: fp32 (groups of 32), and the int8 decode form where the layers keep int8 books (groups of 64)
    and in the head, which keeps its int8 rows, so drafting changes no token and moves logprobs only by
    fp32 sums taken in another order. So too on AVX2 code (LCQ_CPU_AVX512=0, as on a CPU without AVX-512),
    where int8 products are the shuffle form of the layers' decode products alone."""
    if form == "avx2":
        monkeypatch.setenv("LCQ_CPU_AVX512", "0")
    elif not products_available(torch.int8):
        pytest.skip("the AVX-512 int8 products need AVX512_VNNI, AVX512_VBMI and AVX512_BF16")
    wide = products_available(torch.int8)
    folder = str(make_tiny_lcq(tmp_path, "llama", bits=4, rank=2, group_size=group_size))
    settings = dict(block_size=8, kv_cache_dtype="float32", cpu_matmul_dtype="int8",
                    cpu_int8_weights="on" if wide else "off")
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=0)
    plain = LLM(folder, **settings)
    expected = plain.generate([PROMPTS[0]], params)[0]
    assert (plain.engine.runner.int8_book_bytes > 0) == (group_size == 64) and plain.engine.runner.head_row_bytes > 0
    drafting = LLM(folder, num_speculative_tokens=4, **settings)
    got = drafting.generate([PROMPTS[0]], params)[0]
    assert got.token_ids == expected.token_ids and drafting.engine.stats().num_accepted_tokens_total > 0
    # int8 operands in the verification steps would move them by 1e-3 and more.
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got.logprobs, expected.logprobs)) < 1e-4


def test_stops_inside_drafts_and_logprobs(plain, drafting):
    base = plain.generate([PROMPTS[0]], GREEDY)[0]
    stop_id = base.token_ids[9]
    cases = [SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
             SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop_token_ids=[stop_id]),
             SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[base.text[10:14]]),
             SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)]
    for params in cases:
        want, got = plain.generate([PROMPTS[0]], params)[0], drafting.generate([PROMPTS[0]], params)[0]
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        if params.logprobs:
            for a, b in zip(got.logprobs, want.logprobs):
                assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
                assert [t[0] for t in a.top] == [t[0] for t in b.top]


def test_drafts_with_allowed_token_ids_give_the_plain_tokens(plain, drafting):
    """allowed_token_ids holds at every position, so drafts are verified under it (speculative.verify)."""
    accepted = drafting.engine.stats().num_accepted_tokens_total
    allowed = sorted(set(plain.generate([PROMPTS[0]], GREEDY)[0].token_ids))[:4]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, allowed_token_ids=allowed)
    expected = plain.generate(PROMPTS, params)
    assert all(set(o.token_ids) <= set(allowed) for o in expected)
    assert [o.token_ids for o in drafting.generate(PROMPTS, params)] == [o.token_ids for o in expected]
    assert drafting.engine.stats().num_accepted_tokens_total > accepted


def test_seeded_sampling_gives_the_tokens_it_gives_without_drafts(plain, drafting):
    """A fixed draft is checked against the token drawn with the one uniform number a plain step takes, so a
    seed gives the same tokens drafted or not (and so whether the batch size turned drafting off)."""
    accepted = drafting.engine.stats().num_accepted_tokens_total
    for prompt in PROMPTS:
        for temperature in (0.05, 0.8):  # (drafts from the tiny model's loops are taken at a low temperature)
            params = SamplingParams(max_tokens=30, temperature=temperature, seed=3, ignore_eos=True)
            first = drafting.generate([prompt], params)[0].token_ids
            assert plain.generate([prompt], params)[0].token_ids == first
            assert drafting.generate([prompt, PROMPTS[1]], [params, GREEDY])[0].token_ids == first
    assert drafting.engine.stats().num_accepted_tokens_total > accepted  # drafts were checked and taken


def test_predicted_outputs_give_the_plain_tokens_in_fewer_steps(tiny, plain):
    """A prediction equal to the output, and one with a changed stretch (an edit), give the tokens plain
    decoding gives, with prompt lookup off; the engine runs fewer steps for them and counts the
    prediction's accepted drafts."""
    prompt = PROMPTS[1]
    base = plain.generate([prompt], GREEDY)[0]
    edited = base.token_ids[:12] + [1, 2, 3] + base.token_ids[15:]
    for prediction in (base.token_ids, edited):
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, prediction=prediction)
        steps = 0
        plain.engine.add_request("p", prompt, params)
        outputs = []
        while plain.engine.has_work():
            outputs += plain.engine.step()
            steps += 1
        out = outputs[-1]
        assert sum((o.token_ids for o in outputs), []) == base.token_ids
        assert steps < 30 and 15 <= out.usage.accepted_prediction_tokens < 40
    assert plain.generate([prompt], GREEDY)[0].usage.accepted_prediction_tokens == 0


def test_accepted_prediction_tokens_count_the_predictions_tokens_the_output_took(plain):
    """OpenAI's accepted_prediction_tokens: the prediction's tokens that appear in the completion, each place
    once and none past a stop (drafts accepted after a stop counted, and a short prediction found again and
    again in a repetitive output counted past its length: rejected_prediction_tokens went negative)."""
    prompt = PROMPTS[1]
    base = plain.generate([prompt], GREEDY)[0]
    stop = base.token_ids[9]
    cut = plain.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                  prediction=base.token_ids, stop_token_ids=[stop]))[0]
    assert cut.token_ids == base.token_ids[:base.token_ids.index(stop) + 1]
    assert 0 < cut.usage.accepted_prediction_tokens < cut.usage.completion_tokens
    few = sorted(set(base.token_ids))[:3]  # an output of three tokens, which repeats itself
    repetitive = dict(max_tokens=40, temperature=0, ignore_eos=True, allowed_token_ids=few)
    for prediction in itertools.product(few, repeat=3):
        out = plain.generate([prompt], SamplingParams(**repetitive, prediction=list(prediction)))[0]
        assert out.usage.accepted_prediction_tokens <= 3


def test_speculative_settings_are_checked():
    for settings, message in [(dict(num_speculative_tokens=17), "num_speculative_tokens"),
                              (dict(prompt_lookup_min=3, prompt_lookup_max=2), "prompt_lookup_min"),
                              (dict(speculative_disable_by_batch_size=1), "speculative_disable_by_batch_size")]:
        with pytest.raises(ValueError, match=message):
            EngineConfig(model="unused", **settings).validate()


def test_predictions_out_of_the_vocabulary_or_longer_than_the_context_are_refused(plain):
    """A prediction's ids are checked as a prompt's (one past the model's vocabulary failed the step, and on a
    recurrent model its batch with it), and one longer than the context is refused (indexed in a step, a
    megabyte of prediction held every request for seconds)."""
    vocab = plain.engine.runner.model_config.vocab_size
    for prediction, message in (([1, 2, vocab], "prediction token ids must be in"), ([-1], "prediction token ids"),
                                ([1] * (plain.engine.max_model_len + 1), "more than max_model_len")):
        with pytest.raises(ValueError, match=message):
            plain.generate([PROMPTS[0]], SamplingParams(max_tokens=4, prediction=prediction))


def test_no_drafts_from_the_batch_size_on(tiny, plain):
    """By default (speculative_disable_by_batch_size 2) only a lone sequence drafts."""
    default = LLM(str(tiny), block_size=8, num_speculative_tokens=4, **FP32)
    expected = [o.token_ids for o in plain.generate(PROMPTS, GREEDY)]
    assert [o.token_ids for o in default.generate(PROMPTS, GREEDY)] == expected
    assert default.engine.stats().num_draft_tokens_total == 0
    assert default.generate([PROMPTS[0]], GREEDY)[0].token_ids == expected[0]
    assert default.engine.stats().num_draft_tokens_total > 0


@pytest.fixture(scope="module")
def other_weights(tiny, tmp_path_factory):
    """A draft of weights near the target's: the LCQ model's full-precision source, or the fp32 model
    quantized."""
    if tiny.name == "lcq":
        return tiny.parent / "hf"
    return make_tiny_lcq(tmp_path_factory.mktemp("draft"), "llama", bits=4, rank=2, group_size=32)


def _drafts_and_accepted(llm) -> tuple[int, int]:
    stats = llm.engine.stats()
    return stats.num_draft_tokens_total, stats.num_accepted_tokens_total


def _assert_restricted_drafts_are_accepted(itself) -> None:
    """The target drafting for itself keeps its drafts to allowed_token_ids and logit_bias as the target's
    rows do, so all of them are accepted (none was before that rule)."""
    drafts, accepted = _drafts_and_accepted(itself)
    restricted = SamplingParams(max_tokens=20, temperature=0.8, ignore_eos=True, allowed_token_ids=list(range(40, 80)),
                                logit_bias={41: 3.0})
    itself.generate(PROMPTS, restricted)
    more_drafts, more_accepted = _drafts_and_accepted(itself)
    assert more_drafts - drafts == more_accepted - accepted > 0


def test_a_draft_model_gives_the_plain_greedy_tokens(tiny, plain, other_weights, caplog):
    """The target as its own draft: every draft is accepted, which holds only while the draft's cache (in
    the target's blocks) is right through batching, prompt chunks, prefix-cache hits and preemption. A
    draft of other weights gives the same tokens with some drafts rejected."""
    expected = [o.token_ids for o in plain.generate(PROMPTS, GREEDY)]
    itself = LLM(str(tiny), block_size=8, speculative_model=str(tiny), **DRAFT_ALWAYS, **FP32)
    assert [o.token_ids for o in itself.generate(PROMPTS, GREEDY)] == expected
    assert [itself.generate([p], GREEDY)[0].token_ids for p in PROMPTS] == expected  # prefix-cache hits
    chunked = LLM(str(tiny), block_size=8, max_num_batched_tokens=5, speculative_model=str(tiny), **DRAFT_ALWAYS,
                  **FP32)
    assert [o.token_ids for o in chunked.generate(PROMPTS, GREEDY)] == expected
    # 6 blocks of 8 for both models' K/V: someone gets preempted.
    small = LLM(str(tiny), block_size=8, kv_cache_memory_gb=6 * 2 * small_block_bytes(plain) / 2**30,
                speculative_model=str(tiny), **DRAFT_ALWAYS, **FP32)
    shorter = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)  # each fits the 48 tokens alone
    assert small.engine.runner.num_blocks == 6
    assert [o.token_ids for o in small.generate(PROMPTS, shorter)] == [e[:30] for e in expected]
    assert small.engine.stats().num_preemptions_total > 0
    # By default only a lone sequence drafts: the last one left reads the tokens the draft missed first.
    lone = LLM(str(tiny), block_size=8, speculative_model=str(tiny), num_speculative_tokens=4, **FP32)
    lengths = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (10, 20, 40)]
    assert [o.token_ids for o in lone.generate(PROMPTS, lengths)] == [e[:n] for e, n in zip(expected, (10, 20, 40))]
    for llm in (itself, chunked, small, lone):
        drafts, accepted = _drafts_and_accepted(llm)
        assert drafts == accepted > 0
    near = LLM(str(tiny), block_size=8, speculative_model=str(other_weights), **DRAFT_ALWAYS, **FP32)
    assert [o.token_ids for o in near.generate(PROMPTS, GREEDY)] == expected
    drafts, accepted = _drafts_and_accepted(near)
    assert 0 < accepted < drafts
    assert "the draft model failed" not in caplog.text  # no step fell back to placeholders
    for engine in (itself.engine, chunked.engine, small.engine, lone.engine, near.engine):
        stats = engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == stats.num_waiting == 0


def test_a_draft_view_follows_the_target_sequence():
    """The draft's view keeps the tokens it shares with the target and its cache up to them: after rejected
    drafts it holds the accepted ones and the target's own, and when a preempted sequence is recomputed
    in chunks it holds only the chunk's end (its cache was freed with the blocks)."""
    seq = _seq(list(range(10, 20)))
    view = DraftSequence(seq)
    follow(view, seq.token_ids, 10)
    assert view.token_ids == seq.token_ids and view.num_computed_tokens == 0
    view.token_ids += [1, 2, 3]  # its drafts, the first two read into its cache
    view.num_computed_tokens = 12
    seq.token_ids += [1, 7]  # the target accepted 1, then chose 7
    follow(view, seq.token_ids, 12)
    assert view.token_ids == seq.token_ids and view.num_computed_tokens == 11
    view.num_computed_tokens = 0  # preempted: its blocks (and the draft's cache in them) are freed
    follow(view, seq.token_ids, 5)  # the first chunk of the recompute
    assert view.token_ids == seq.token_ids[:5] and view.num_computed_tokens == 0
    follow(view, seq.token_ids, 9)
    assert view.token_ids == seq.token_ids[:9]


def test_random_draft_model_workloads_give_the_plain_greedy_tokens(tiny, plain, other_weights, caplog):
    """Seeded random mixes (prompt lengths, greedy, sampled with and without penalties, predictions, token
    budgets of 5 to 1024, pools of 6 to 20 blocks that preempt) with the target or another model as the
    draft: greedy outputs are the plain engine's (to the context a small pool allows), nothing falls back,
    the pool is full again."""
    rng = random.Random(0)
    block_bytes = 2 * small_block_bytes(plain)  # both models' K/V of a block
    for _ in range(4):
        pool = rng.choice([None, rng.randint(6, 20) * block_bytes / 2**30])
        llm = LLM(str(tiny), block_size=8, speculative_model=str(rng.choice([tiny, other_weights])),
                  num_speculative_tokens=rng.randint(1, 6), speculative_disable_by_batch_size=64,
                  max_num_batched_tokens=rng.choice([5, 16, 1024]), **({"kv_cache_memory_gb": pool} if pool else {}),
                  **FP32)
        prompts = [[rng.randrange(5, 380) for _ in range(rng.randint(1, 30))] for _ in range(rng.randint(1, 6))]
        params = [rng.choice([SamplingParams(max_tokens=rng.randint(1, 40), temperature=0, ignore_eos=True),
                              SamplingParams(max_tokens=rng.randint(1, 40), temperature=0, ignore_eos=True,
                                             prediction=[rng.randrange(5, 380) for _ in range(10)]),
                              SamplingParams(max_tokens=rng.randint(1, 40), temperature=0.9, seed=rng.randrange(100),
                                             ignore_eos=True, repetition_penalty=rng.choice([1.0, 1.2]))])
                  for _ in prompts]
        for prompt, p, out in zip(prompts, params, llm.generate(prompts, params)):
            assert len(out.token_ids) == min(p.max_tokens, llm.engine.max_model_len - len(prompt))
            if p.greedy:
                assert out.token_ids == plain.generate([prompt], p)[0].token_ids[:len(out.token_ids)]
        stats = llm.engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks
    assert "the draft model failed" not in caplog.text


def test_the_draft_reads_long_prompts_within_the_token_budget(tiny, plain, caplog):
    """A 200-token prompt in chunks of 16 (and again, served by the prefix cache, which the draft reads
    from its start), and sequences that ran at batch 2 without drafts catching up once alone: the draft
    reads at most max_num_batched_tokens a step, and drafts once it has caught up."""
    prompt = [(7 * i) % 300 + 5 for i in range(200)]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    expected = plain.generate([prompt], params)[0].token_ids
    llm = LLM(str(tiny), block_size=8, max_num_batched_tokens=16, speculative_model=str(tiny),
              num_speculative_tokens=4, **FP32)
    rows = []
    run = llm.engine.drafter.runner.run
    llm.engine.drafter.runner.run = lambda items: rows.append(sum(count for _, count in items)) or run(items)
    for _ in range(2):
        assert llm.generate([prompt], params)[0].token_ids == expected
    both = llm.generate([prompt, PROMPTS[0]], [params, SamplingParams(max_tokens=5, temperature=0)])
    assert both[0].token_ids == expected  # no drafts while both ran, then the lag is read in steps
    assert max(rows) <= 16 and sum(rows) > 3 * 200
    drafts, accepted = _drafts_and_accepted(llm)
    assert drafts == accepted > 0 and "the draft model failed" not in caplog.text


def test_a_draft_over_a_target_with_sliding_window_groups(tmp_path):
    """Gemma 3 (a sliding-window layer group handing back the blocks its window of 8 has passed, and a
    full one) drafting for itself: the draft reads the full group's table, its own sliding layer masking by
    the window, so every draft is accepted and the tokens are the plain engine's."""
    folder = str(make_tiny_hf(tmp_path, "gemma3", sliding_window=8))
    expected = [o.token_ids for o in LLM(folder, block_size=8, **FP32).generate(PROMPTS, GREEDY)]
    itself = LLM(folder, block_size=8, speculative_model=folder, **DRAFT_ALWAYS, **FP32)
    assert itself.engine.runner.kv_groups.windows == (0, 8)
    assert [o.token_ids for o in itself.generate(PROMPTS, GREEDY)] == expected
    drafts, accepted = _drafts_and_accepted(itself)
    assert drafts == accepted > 0
    _assert_restricted_drafts_are_accepted(itself)


def test_drafts_are_the_draft_models_own_greedy_tokens(tiny, other_weights, caplog):
    """Each step's drafts are what the draft model alone generates greedily after the sequence so far,
    also after steps whose drafts were rejected (its cache past the accepted tokens is read again)."""
    near = LLM(str(tiny), block_size=8, speculative_model=str(other_weights), **DRAFT_ALWAYS, **FP32)
    proposals = []
    propose = near.engine.drafter.propose

    def recording(scheduled, behind):
        propose(scheduled, behind)
        proposals.extend((seq.token_ids[:len(seq) - n], seq.token_ids[len(seq) - n:])
                         for seq, _ in scheduled if (n := seq.num_draft_tokens))

    near.engine.drafter.propose = recording
    near.generate(PROMPTS, GREEDY)
    assert "the draft model failed" not in caplog.text  # no step fell back to placeholders
    assert len(proposals) > 20 and 0 < _drafts_and_accepted(near)[1] < _drafts_and_accepted(near)[0]
    alone = LLM(str(other_weights), block_size=8, **FP32)
    for prefix, drafts in proposals:
        params = SamplingParams(max_tokens=len(drafts), temperature=0, ignore_eos=True)
        assert alone.generate([prefix], params)[0].token_ids == drafts


def test_draft_model_with_stops_logprobs_predictions_and_seeded_sampling(tiny, plain, other_weights, caplog):
    """Stops inside a step's drafts end the output where plain decoding ends it; logprobs are the target's;
    a request's prediction drafts where it agrees, the draft model elsewhere; a seeded sampled request
    gives the tokens of plain decoding, alone and batched."""
    near = LLM(str(tiny), block_size=8, speculative_model=str(other_weights), **DRAFT_ALWAYS, **FP32)
    base = plain.generate([PROMPTS[0]], GREEDY)[0]
    edited = base.token_ids[:12] + [1, 2, 3] + base.token_ids[15:]
    predicted = near.generate([PROMPTS[0]], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                           prediction=edited))[0]
    assert predicted.token_ids == base.token_ids and predicted.usage.accepted_prediction_tokens >= 15
    assert "the draft model failed" not in caplog.text
    for params in (SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop_token_ids=[base.token_ids[9]]),
                   SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)):
        want, got = plain.generate([PROMPTS[0]], params)[0], near.generate([PROMPTS[0]], params)[0]
        assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason)
        for a, b in zip(got.logprobs or [], want.logprobs or []):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
    # A seeded request drafts the draft's likeliest tokens, verified as fixed ones: its tokens are those of
    # plain decoding, whether a step drafts or not (which depends on the batch).
    seeded = SamplingParams(max_tokens=30, temperature=0.8, seed=3, ignore_eos=True)
    first = near.generate([PROMPTS[2]], seeded)[0].token_ids
    assert near.generate([PROMPTS[2], PROMPTS[1]], [seeded, GREEDY])[0].token_ids == first
    assert plain.generate([PROMPTS[2]], seeded)[0].token_ids == first
    assert _drafts_and_accepted(near)[1] > 0
    # The target as its own draft samples its drafts from the target's distribution: all are accepted.
    itself = LLM(str(tiny), block_size=8, speculative_model=str(tiny), **DRAFT_ALWAYS, **FP32)
    sampled = SamplingParams(max_tokens=30, temperature=0.8, ignore_eos=True)
    nucleus = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, ignore_eos=True)
    outputs = itself.generate(PROMPTS, [sampled, nucleus, sampled])
    drafts, accepted = _drafts_and_accepted(itself)
    assert drafts == accepted > 0
    _assert_restricted_drafts_are_accepted(itself)
    # ... and drawn, not picked: few of the tokens are the target's most likely ones.
    scored = plain.generate([p + o.token_ids for p, o in zip(PROMPTS, outputs)],
                            SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))
    likeliest = [lp.token_id == lp.top[0][0] for p, o in zip(PROMPTS, scored) for lp in o.prompt_logprobs[len(p):]]
    assert len(likeliest) == 90 and sum(likeliest) < 45


def test_draft_model_settings_are_checked(tiny, tmp_path):
    """A draft needs drafts to make, a model folder, the target's tokenizer (and an embedding for each of its
    tokens), the target's context, and full-attention layers in the target whose block table it reads."""
    for settings, message in [(dict(speculative_model=str(tiny)), "num_speculative_tokens"),
                              (dict(speculative_model=str(tmp_path), num_speculative_tokens=2), "config.json")]:
        with pytest.raises(ValueError, match=message):
            EngineConfig(model=str(tiny), **settings).validate()
    retokenized = shutil.copytree(tiny, tmp_path / "retokenized")
    make_tokenizer(retokenized, vocab_size=300)
    shorter = make_tiny_hf(tmp_path / "shorter", "llama", max_position_embeddings=64)
    sliding = make_tiny_hf(tmp_path / "sliding", "mistral", sliding_window=16)
    narrow = make_tiny_hf(tmp_path / "narrow", "llama", vocab_size=300)  # the same tokenizer, 384 tokens
    for target, draft, message in [(tiny, retokenized, "its tokenizer differs"),
                                   (tiny, narrow, "its 300 embeddings are fewer than the tokenizer's 384"),
                                   (tiny, shorter, "draft model .*shorter: max_model_len 256 is longer"),
                                   (sliding, sliding, "every layer of this model slides")]:
        with pytest.raises(UserError, match=message):
            LLM(str(target), speculative_model=str(draft), num_speculative_tokens=2, **FP32)


@pytest.mark.gpu
def test_drafts_on_cuda_replay_the_decode_graphs(tmp_path, exact_products):
    """Verification rows are decode rows: a lone sequence's 1 + 4 rows replay the graph of 8 and give the
    eager engine's tokens; against plain decoding (the 1-row kernel), the same tokens' logprobs agree to
    fp16 products summed in another order."""
    folder = str(make_tiny_lcq(tmp_path, "llama", bits=2, rank=2, group_size=32))
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=0)
    graphed = cuda_llm(folder, block_size=8, max_num_seqs=8, num_speculative_tokens=4)
    assert graphed.engine.runner.graphs is not None
    eager = cuda_llm(folder, block_size=8, max_num_seqs=8, num_speculative_tokens=4, cuda_graphs=False)
    got = graphed.generate([PROMPTS[0]], params)[0]
    assert got.token_ids == eager.generate([PROMPTS[0]], params)[0].token_ids
    assert graphed.engine.stats().num_accepted_tokens_total > 0
    plain = cuda_llm(folder, block_size=8, max_num_seqs=8).generate([PROMPTS[0]], params)[0]
    same = next((i for i, (a, b) in enumerate(zip(got.token_ids, plain.token_ids)) if a != b), len(got.token_ids))
    assert same > 0 and all(abs(a.logprob - b.logprob) < 2e-2 for a, b in zip(got.logprobs[:same], plain.logprobs))


@pytest.mark.gpu
def test_draft_model_on_cuda(tmp_path, exact_products):
    """The target as its own draft on a GPU, the draft's decode passes replaying its graphs: the tokens of
    the eager engine, and nearly every draft accepted (the draft's one-row products and the target's
    verification rows may round a near tie apart)."""
    folder = str(make_tiny_lcq(tmp_path, "llama", bits=2, rank=2, group_size=32))
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    settings = dict(block_size=8, max_num_seqs=8, num_speculative_tokens=4, speculative_model=folder)
    graphed = cuda_llm(folder, **settings)
    assert graphed.engine.drafter.runner.graphs is not None
    eager = cuda_llm(folder, cuda_graphs=False, **settings)
    assert graphed.generate([PROMPTS[0]], params)[0].token_ids == eager.generate([PROMPTS[0]], params)[0].token_ids
    drafts, accepted = _drafts_and_accepted(graphed)
    assert accepted >= 0.9 * drafts > 0


def test_multi_token_prediction_layer_of_a_multimodal_qwen3_5(tmp_path):
    """Qwen3.5 is published as a multimodal wrapper, its multi-token-prediction layer beside the language
    model's tensors (mtp.*): read through the wrapper, it drafts as it does in the text model's folder."""
    import json

    from safetensors.torch import load_file, save_file

    from tests.tiny_model import make_tiny_multimodal

    wrapped = make_tiny_multimodal(tmp_path / "multimodal", "qwen3_5")
    text = tmp_path / "multimodal" / "text"
    layer, _ = make_tiny_mtp(tmp_path / "mtp", "qwen3_5")  # the same sizes: its layer serves this model too
    extra = {name: t for name, t in load_file(layer / "model.safetensors").items() if name.startswith("mtp.")}
    for folder in (wrapped, text):
        save_file({**load_file(folder / "model.safetensors"), **extra}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
    assert json.loads((wrapped / "config.json").read_text())["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    mtp = dict(speculative_method="mtp", num_speculative_tokens=2, block_size=8, **FP32)
    outputs = {}
    for folder in (wrapped, text):
        llm = LLM(str(folder), **mtp)
        outputs[folder] = ([llm.generate([p], GREEDY)[0].token_ids for p in PROMPTS], _drafts_and_accepted(llm))
    assert outputs[wrapped] == outputs[text] and outputs[wrapped][1][0] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_next"])
def test_multi_token_prediction_on_cuda(tmp_path, arch, exact_products):
    """The multi-token-prediction layer drafting on a GPU (its passes through the Triton attention): the tokens of
    the engine without drafts, some drafts accepted (make_tiny_mtp's echoing model; PROMPTS[1], as on CPU: for
    PROMPTS[0] Qwen3-Next's layer has none of its 75 drafts accepted, on CPU too)."""
    served, _ = make_tiny_mtp(tmp_path, arch, echoing=True)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    drafting = cuda_llm(served, block_size=8, max_num_seqs=8, speculative_method="mtp", num_speculative_tokens=2,
                   dtype="float32")
    plain = cuda_llm(served, block_size=8, max_num_seqs=8, dtype="float32")
    assert drafting.generate([PROMPTS[1]], params)[0].token_ids == plain.generate([PROMPTS[1]], params)[0].token_ids
    assert _drafts_and_accepted(drafting)[1] > 0


@pytest.mark.parametrize("arch", ["qwen3_5", "granite4_hybrid", "lfm2", "nemotron_h", "falcon_h1"])
def test_recurrent_models_verify_drafts(tmp_path, arch):
    """A model with recurrent layers verifies drafts: a drafting sequence's recurrent states advance one token
    at a time through the step and go back to the tokens it kept (its last one and the accepted drafts). A
    prediction that is the greedy output itself is accepted whole; one that departs from it halfway is
    accepted up to there, then rejected; batched with a sequence that does not draft, every sequence gets
    the tokens of plain decoding. A draft model of attention layers drafts for such a target; a draft model
    with recurrent layers is refused."""
    folder = make_tiny_hf(tmp_path / arch, arch)
    expected = [o.token_ids for o in LLM(str(folder), block_size=8, **FP32).generate(PROMPTS, GREEDY)]
    departing = expected[0][:20] + [(token + 7) % 300 + 1 for token in expected[0][20:]]
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, prediction=departing),
              SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, prediction=expected[1]), GREEDY]
    llm = LLM(str(folder), block_size=8, **DRAFT_ALWAYS, **FP32)
    outs = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == expected
    assert outs[1].usage.accepted_prediction_tokens >= 30 and 15 <= outs[0].usage.accepted_prediction_tokens < 30
    drafts, accepted = _drafts_and_accepted(llm)
    assert 0 < accepted < drafts
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and len(llm.engine.blocks.free_states) == 64
    attention_draft = make_tiny_hf(tmp_path / "llama", "llama")
    drafted = LLM(str(folder), block_size=8, speculative_model=str(attention_draft), **DRAFT_ALWAYS, **FP32)
    assert [o.token_ids for o in drafted.generate(PROMPTS, GREEDY)] == expected
    assert _drafts_and_accepted(drafted)[0] > 0
    with pytest.raises(UserError, match="recurrent layers' states cannot take back the drafts"):
        LLM(str(attention_draft), speculative_model=str(folder), num_speculative_tokens=2, **FP32)


def test_a_recurrent_state_kept_while_verifying_drafts_is_the_blocks_own(tmp_path):
    """A sequence that verifies drafts keeps its recurrent state for reuse under the block its tokens fill, not
    under the last step's: at a block's end with that block's kept state evicted meanwhile (2 snapshot slots, 4
    sequences), the state already a token further was kept under it, and a later prompt opening with those 8
    tokens restored it and generated other tokens than cold (found by an audit of prefix caching)."""
    folder = make_tiny_hf(tmp_path / "qwen3_5", "qwen3_5")
    prompts = [[233, 203, 163, 207, 35, 35, 165, 236], [131, 113, 280, 243], [135, 96, 280, 109, 160, 104, 129, 187],
               [146, 48, 232, 49]]
    predictions = [  # drafts that the model accepts in part, at the steps that met the case
        [357, 75, 220, 357, 350, 366, 146, 22, 84, 70, 350, 187, 209, 253, 16, 203, 22, 251, 159, 43, 206, 137, 281,
         261, 11, 84, 167, 13, 7, 310, 270, 14, 79, 168, 45, 149, 122, 89, 80, 217],
        [185, 362, 43, 259, 254, 204, 228, 136, 3, 258, 200, 206, 290, 159, 121, 312, 31, 127, 255, 156, 358, 35,
         124, 291, 74, 276, 72, 229, 299, 24, 160, 196, 338, 169, 228, 206, 230, 231, 23, 249],
        [95, 375, 194, 223, 369, 170, 197, 42, 359, 320, 82, 49, 75, 285, 45, 282, 334, 314, 33, 353, 193, 267, 320,
         58, 75, 69, 278, 40, 49, 165, 24, 352, 210, 233, 179, 49, 121, 113, 77, 227],
        [128, 353, 21, 127, 184, 44, 313, 96, 61, 102, 1, 278, 82, 171, 20, 90, 7, 158, 263, 17, 344, 70, 13, 241,
         50, 101, 107, 111, 251, 35, 98, 135, 227, 8, 27, 127, 42, 39, 7, 169],
    ]
    lengths = (9, 7, 18, 12)
    llm = LLM(str(folder), block_size=8, speculative_disable_by_batch_size=8, state_snapshots=2, max_num_seqs=4,
              **FP32)
    outs = llm.generate(prompts, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, prediction=p)
                                  for n, p in zip(lengths, predictions)])
    cold = LLM(str(folder), block_size=8, enable_prefix_caching=False, **FP32)
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    probe = (prompts[1] + outs[1].token_ids)[:8] + [5, 6]  # the second's next turn
    assert llm.generate([probe], greedy)[0].token_ids == cold.generate([probe], greedy)[0].token_ids


def test_a_drafting_reply_keeps_its_recurrent_state_at_every_block_end(tmp_path):
    """A reply's recurrent state is kept at the end of each block it fills, for the conversation's next turn,
    also where a step's accepted drafts carry it past a block's end (its state after that token, one of the
    step's per-token states, goes to the snapshot): a prediction accepted whole keeps them as plain decoding
    does (the next turn had reused 8 tokens instead of 32; found by QA), and the next turn's tokens are plain
    decoding's."""
    folder = str(make_tiny_hf(tmp_path / "qwen3_5", "qwen3_5"))
    prompt = [(3 * i + 1) % 300 + 1 for i in range(9)]
    plain = LLM(folder, block_size=8, **FP32)
    reply = plain.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].token_ids
    next_turn, short = prompt + reply + [4], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = plain.generate([next_turn], short)[0]
    assert expected.usage.cached_tokens == 32
    drafting = LLM(folder, block_size=8, num_speculative_tokens=5, **FP32)
    out = drafting.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, prediction=reply))
    assert out[0].token_ids == reply and out[0].usage.accepted_prediction_tokens >= 20
    again = drafting.generate([next_turn], short)[0]
    assert again.usage.cached_tokens == 32 and again.token_ids == expected.token_ids


def _mtp_predictions(llm, tokens: list[int]) -> list[int]:
    """The multi-token-prediction layer's greedy token after next at each position of `tokens` (position p
    reads the model's hidden state there and token p + 1), in one pass over the engine's model (its pool free)."""
    from lcq.models import ForwardContext

    model, block = llm.engine.runner.model, llm.engine.runner.block_size

    def context(rows: int) -> ForwardContext:
        return ForwardContext(is_prefill=True, slot_mapping=torch.arange(rows),
                              query_start=torch.tensor([0, rows], dtype=torch.int32),
                              context_lens=torch.tensor([rows], dtype=torch.int32),
                              block_tables=torch.arange(-(-rows // block), dtype=torch.int32)[None],
                              max_query_len=rows, max_context_len=rows, state_slots=torch.tensor([0]))

    hidden = model(torch.tensor(tokens), torch.arange(len(tokens)), context(len(tokens)))
    _, logits = model.predict_next(torch.tensor(tokens[1:]), hidden[:-1], torch.arange(len(tokens) - 1),
                                   context(len(tokens) - 1))
    return logits.argmax(-1).tolist()


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_next"])
def test_multi_token_prediction_layer_drafts(tmp_path, arch):
    """The model's multi-token-prediction layer drafts (DeepSeek-V3's latent attention and mixture; Qwen3-Next's
    linear attention around it): tokens equal plain decoding's batched, in prompt chunks, preempted and from
    prefix-cache hits, seeded sampling is reproducible, and the pool is full after. On a model whose layer
    predicts some of its tokens (make_tiny_mtp's echoing), chained drafts are accepted, and with one draft a
    step, alone, each step's draft is the layer's prediction from the model's hidden states: the drafts
    accepted are those that prediction over the final sequence says. A model without the layer is refused, and
    so are the method without num_speculative_tokens or beside a draft model."""
    served, longer = make_tiny_mtp(tmp_path, arch)
    expected = [o.token_ids for o in LLM(str(served), block_size=8, **FP32).generate(PROMPTS, GREEDY)]
    mtp = dict(speculative_method="mtp", block_size=8, **FP32)
    llm = LLM(str(served), num_speculative_tokens=3, speculative_disable_by_batch_size=64, **mtp)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
    assert [llm.generate([p], GREEDY)[0].token_ids for p in PROMPTS] == expected  # prefix-cache hits
    assert _drafts_and_accepted(llm)[0] > 0
    chunked = LLM(str(served), num_speculative_tokens=2, speculative_disable_by_batch_size=64,
                  max_num_batched_tokens=5, **mtp)
    assert [o.token_ids for o in chunked.generate(PROMPTS, GREEDY)] == expected
    runner = llm.engine.runner  # 8 blocks, and (Qwen3-Next) the states of 3 sequences and the graphs' scratch slot
    memory = 8 * runner.kv_cache_bytes / runner.num_blocks + 4 * runner.state_bytes / runner.snapshot_slots.stop
    small = LLM(str(served), num_speculative_tokens=2, speculative_disable_by_batch_size=64,
                kv_cache_memory_gb=memory / 2**30, max_num_seqs=3, state_snapshots=0, **mtp)
    shorter = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    assert small.engine.runner.num_blocks == 8
    assert [o.token_ids for o in small.generate(PROMPTS, shorter)] == [e[:30] for e in expected]
    assert small.engine.stats().num_preemptions_total > 0
    sampled = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    assert llm.generate([PROMPTS[0]], sampled)[0].token_ids == llm.generate([PROMPTS[0]], sampled)[0].token_ids
    for engine in (llm.engine, chunked.engine, small.engine):
        stats = engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == stats.num_waiting == 0

    echoing, _ = make_tiny_mtp(tmp_path / "echoing", arch, echoing=True)
    prompt, steps = PROMPTS[1], GREEDY.max_tokens
    plain = LLM(str(echoing), block_size=8, **FP32).generate([prompt], GREEDY)[0].token_ids
    chained = LLM(str(echoing), num_speculative_tokens=3, **mtp)
    assert chained.generate([prompt], GREEDY)[0].token_ids == plain
    assert _drafts_and_accepted(chained)[1] > 0
    alone = LLM(str(echoing), num_speculative_tokens=1, **mtp)
    sequence = prompt + alone.generate([prompt], GREEDY)[0].token_ids
    assert sequence == prompt + plain
    predicted = _mtp_predictions(alone, sequence)
    drafts = accepted = 0
    last = len(prompt)  # the position of the sequence's last token, after the prompt's step
    while last - len(prompt) + 1 < steps:
        if steps - (last - len(prompt) + 1) - 1 >= 1:  # a draft, where max_tokens leaves room for one
            drafts += 1
            if predicted[last - 1] == sequence[last + 1]:
                accepted += 1
                last += 1
        last += 1
    assert _drafts_and_accepted(alone) == (drafts, accepted) and accepted > 0
    with pytest.raises(UserError, match="no multi-token-prediction layer to draft with"):
        LLM(str(longer), num_speculative_tokens=1, **mtp)
    for settings in ({}, {"num_speculative_tokens": 1, "speculative_model": str(served)}):
        with pytest.raises(ValueError, match="speculative_method mtp drafts num_speculative_tokens a step"):
            LLM(str(served), **settings, **mtp)
