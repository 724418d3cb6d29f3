"""Layer groups of the KV cache (lcq/runtime/kv_groups.py): sliding-window layers hand back the blocks their
window has passed, full-attention layers keep theirs, all from one pool. Sequences several windows long,
prefilled in chunks, batched, and reused from the prefix cache give transformers' greedy tokens."""
from __future__ import annotations

import pytest
import torch

from lcq.kernels import cpu_half, cpu_ops
from lcq.runtime import LLM, SamplingParams
from lcq.runtime.block_manager import KEY_TILE, RELEASED, BlockManager
from lcq.runtime.kv_groups import KVGroups
from lcq.runtime.sampling_params import SamplingParams as Params
from lcq.runtime.sequence import Sequence
from lcq.quantizer.reference import load_reference_model
from tests.test_runtime import FP32, _pool_is_full, _transformers_greedy
from tests.tiny_model import cuda_llm, make_tiny_hf


def test_layers_form_groups_of_the_fewest_layers_of_a_kind():
    gemma2 = KVGroups.of([8, 0, 8, 0, 8, 0])  # 3 and 3: one group of each
    assert gemma2.windows == (0, 8) and gemma2.width == 3
    assert gemma2.layer_group == (1, 0, 1, 0, 1, 0) and gemma2.layer_tensor == (0, 0, 1, 1, 2, 2)
    gemma3 = KVGroups.of([8] * 5 + [0] + [8] * 5 + [0] + [8] * 2)  # 2 full, 12 sliding: 1 + 6 groups of 2
    assert gemma3.windows == (0,) + (8,) * 6 and gemma3.width == 2
    assert gemma3.layer_group[5] == gemma3.layer_group[11] == 0 and gemma3.layer_tensor[11] == 1
    assert sorted(zip(gemma3.layer_group, gemma3.layer_tensor)) == sorted(set(zip(gemma3.layer_group,
                                                                                  gemma3.layer_tensor)))
    for windows in ([0] * 4, [8] * 4):  # one kind: one group of every layer, as without windows
        single = KVGroups.of(windows)
        assert single.windows == (windows[0],) and single.width == 4 and single.layer_tensor == (0, 1, 2, 3)


def test_the_kept_tile_is_the_kernels_key_tile():
    """The blocks a sliding group keeps start at the key tile where a window begins, because the kernels
    read a window's keys tile by tile from there (the C kernels' KEYS in cpu_prefill_attention.c is 32 too)."""
    pytest.importorskip("triton")
    from lcq.kernels.paged_attention import BLOCK_N

    assert KEY_TILE == BLOCK_N == 32


def _sequence(tokens: int) -> Sequence:
    return Sequence("r", list(range(tokens)), Params(max_tokens=1), None, 1)


def test_a_sliding_group_holds_its_window_and_the_full_group_everything():
    """A sequence decoded to 1,000 tokens (prefilled in chunks of 100): the full group's table holds every
    block, the sliding one only those from the key tile where the newest token's window begins; every
    block comes back at the end."""
    manager = BlockManager(200, 16, enable_prefix_caching=False, windows=(0, 64))
    seq = _sequence(1000)
    while seq.num_computed_tokens < 1000:
        count = min(100, 1000 - seq.num_computed_tokens) if seq.num_computed_tokens < 300 else 1
        assert manager.can_grow(seq, seq.num_computed_tokens + count)
        manager.grow(seq, seq.num_computed_tokens + count)
        seq.num_computed_tokens += count
        full, sliding = seq.block_tables
        assert RELEASED not in full and len(full) == len(sliding) == -(-seq.num_computed_tokens // 16)
        first = max(0, seq.num_computed_tokens - count - 64 + 1) // KEY_TILE * KEY_TILE // 16
        assert sliding[:first] == [RELEASED] * first and RELEASED not in sliding[first:]
        held = manager.num_total_blocks - manager.num_free_blocks
        assert held == len(full) + len(sliding) - first
    assert len(seq.block_tables[1]) - seq.block_tables[1].count(RELEASED) <= 64 // 16 + 3
    assert manager.most_blocks_held(1000, 100) >= 63 + 4 + 3
    manager.release(seq)
    assert manager.num_free_blocks == manager.num_total_blocks


def test_a_full_pool_grows_a_sequence_whose_window_hands_back_more_than_it_takes():
    """can_grow counts the blocks a sliding window has passed as free: grow must hand every group's back
    before it takes any, or the full group, which comes first, finds the pool empty (it raised
    StopIteration from an exactly full pool, failing every request of the engine's step)."""
    manager = BlockManager(12, 8, enable_prefix_caching=False, windows=(0, 9))
    first, second = _sequence(41), _sequence(3)
    for seq, count in ((first, 40), (second, 3)):
        manager.grow(seq, count)
        seq.num_computed_tokens = count
    assert manager.num_free_blocks == 0 and manager.can_grow(first, 41)  # 2 new blocks, 4 passed
    manager.grow(first, 41)
    full, sliding = first.block_tables
    assert len(full) == len(sliding) == 6 and sliding[:4] == [RELEASED] * 4 and manager.num_free_blocks == 2
    for seq in (first, second):
        manager.release(seq)
    assert manager.num_free_blocks == manager.num_total_blocks


@pytest.fixture(scope="module", params=["gemma3", "gemma2", "mistral", "llama4"])
def windowed(request, tmp_path_factory):
    """Gemma 3 (three 8-token sliding layers, then a full one: four groups of one layer), Gemma 2 (sliding
    and full layers alternating: two groups of two sharing two cache tensors), Mistral (every layer
    sliding: one group that hands its passed blocks back) and Llama 4 (three layers attending within
    8-token chunks, then a full one: four groups of one layer)."""
    layers = {"gemma3": dict(num_hidden_layers=4, layer_types=["sliding_attention"] * 3 + ["full_attention"],
                             sliding_window=8),
              "gemma2": dict(num_hidden_layers=4, sliding_window=8), "mistral": dict(sliding_window=8),
              "llama4": dict(attention_chunk_size=8)}[request.param]
    folder = make_tiny_hf(tmp_path_factory.mktemp(request.param) / "hf", request.param,
                          max_position_embeddings=1024, dtype=torch.float16, **layers)  # fp16: the C decode step
    return request.param, folder


PROMPTS = [[(7 * i + 3) % 300 + 1 for i in range(100)], [(5 * i + 2) % 300 + 1 for i in range(45)],
           [(11 * i + 1) % 300 + 1 for i in range(70)]]


def test_long_sequences_in_layer_groups_match_transformers(windowed):
    """Prompts of 45-100 tokens (12 windows) batched, prefilled in chunks of 16 and decoded 20 tokens with
    blocks of 8 (decode steps in the one-call C step where it builds): every sliding group's passed blocks
    handed back on the way; then the same prompts again, from the prefix cache; the pool is whole again
    after each."""
    arch, folder = windowed
    llm = LLM(str(folder), block_size=8, max_num_batched_tokens=16, **FP32)
    assert llm.engine.runner.kv_groups.num_groups == {"gemma3": 4, "gemma2": 2, "mistral": 1, "llama4": 4}[arch]
    reference = load_reference_model(folder)
    expected = [_transformers_greedy(folder, prompt, 20, reference) for prompt in PROMPTS]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    released = []
    grow = llm.engine.blocks.grow

    def counted(seq, num_tokens):
        grow(seq, num_tokens)
        released.append(sum(table.count(RELEASED) for table in seq.block_tables))

    llm.engine.blocks.grow = counted
    first = llm.generate(PROMPTS, params)
    assert [out.token_ids for out in first] == expected
    assert max(released) >= (100 - 8 - KEY_TILE) // 8 * (3 if arch in ("gemma3", "llama4") else 1)  # a table's
    # worth or more; decode steps in one C call (Llama 4's mixtures and chunks too)
    assert (llm.engine.runner.model.cpu_decoder is not None) == (cpu_ops.usable() and cpu_half.enabled())
    assert _pool_is_full(llm.engine)
    again = llm.generate(PROMPTS, params)
    assert [out.token_ids for out in again] == expected
    assert all(out.usage.cached_tokens > 0 for out in again)
    assert _pool_is_full(llm.engine)


def test_sliding_groups_let_one_pool_hold_longer_contexts(windowed):
    """The same KV memory gives a sliding-window model a longer context with its layer groups than with every
    layer keeping every block (vLLM's --disable-hybrid-kv-cache-manager): its sliding groups hold about a
    window each."""
    _, folder = windowed
    memory = dict(kv_cache_memory_gb=2 ** -12, max_num_batched_tokens=16, **FP32)  # 256 KiB: 64 blocks of one layer
    grouped = LLM(str(folder), block_size=8, **memory).engine
    single = LLM(str(folder), block_size=8, hybrid_kv_cache=False, **memory).engine
    assert single.runner.kv_groups.num_groups == 1 and single.max_model_len == single.runner.num_blocks * 8
    assert single.max_model_len < grouped.max_model_len


@pytest.mark.gpu
def test_cuda_graphs_with_layer_groups_give_the_eager_tokens_and_transformers(tmp_path):
    """On a GPU (fp32, so that transformers' tokens are the reference), the Gemma 3 model of four groups:
    decode graphs captured with every group's slots and tables replay the eager engine's tokens, which are
    transformers'; the Triton kernels read the sliding groups' tables with their passed blocks handed back."""
    folder = make_tiny_hf(tmp_path, "gemma3", sliding_window=8, max_position_embeddings=1024, num_hidden_layers=4,
                          layer_types=["sliding_attention"] * 3 + ["full_attention"])
    settings = dict(block_size=8, max_num_batched_tokens=16, max_num_seqs=4, dtype="float32")
    graphed = cuda_llm(folder, **settings)
    assert graphed.engine.runner.graphs is not None
    eager = cuda_llm(folder, cuda_graphs=False, **settings)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    tokens = [out.token_ids for out in graphed.generate(PROMPTS, params)]
    assert tokens == [out.token_ids for out in eager.generate(PROMPTS, params)]
    reference = load_reference_model(folder)
    assert tokens == [_transformers_greedy(folder, prompt, 20, reference) for prompt in PROMPTS]
    assert _pool_is_full(graphed.engine)


def test_drafts_verified_across_handed_back_blocks(windowed):
    """Drafts from a predicted output (the expected tokens themselves, so that every step verifies up to 8):
    each verification step is one query per draft, each over its own window, with the blocks before them
    handed back; the tokens are still transformers'."""
    _, folder = windowed
    llm = LLM(str(folder), block_size=8, max_num_batched_tokens=16, **FP32)
    prompt = PROMPTS[0]
    expected = _transformers_greedy(folder, prompt, 40)
    out = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, prediction=expected))[0]
    assert out.token_ids == expected
    stats = llm.engine.stats()
    assert stats.num_accepted_tokens_total >= 30
    assert _pool_is_full(llm.engine)
