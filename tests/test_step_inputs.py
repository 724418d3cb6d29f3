"""A step's inputs packed into one buffer (lcq/runtime/step_inputs.py), as the decode graphs and the eager
steps on a GPU take them, checked on the CPU."""
import numpy as np
import pytest
import torch

from lcq.runtime.step_inputs import StepInputs, StepLayout, pack, pad, to_device


def random_step(starts: list[int], groups: int, width: int, states: bool, seed: int = 0) -> StepInputs[np.ndarray]:
    """A step of sequences whose new tokens begin at `starts` (the last: the step's tokens), random values."""
    rng = np.random.default_rng(seed)
    tokens, seqs = starts[-1], len(starts) - 1
    return StepInputs(input_ids=rng.integers(1, 1000, tokens), positions=rng.integers(0, 100, tokens),
                      slot_mapping=rng.integers(0, 800, (groups, tokens)), adapter_slots=rng.integers(-1, 3, tokens),
                      query_start=np.array(starts, np.int32),
                      context_lens=rng.integers(1, 100, seqs).astype(np.int32),
                      block_tables=rng.integers(-1, 50, (groups, seqs, width)).astype(np.int32),
                      state_slots=rng.integers(0, 4, seqs) if states else None)


def assert_same(got: StepInputs, want: StepInputs) -> None:
    for name, array in vars(want).items():
        if array is None:
            assert getattr(got, name) is None, name
        else:
            assert np.array_equal(np.asarray(getattr(got, name)), array), name


def context_dtypes(step: StepInputs) -> list[torch.dtype]:
    """The dtypes ForwardContext documents (int64 ids, positions, slots; int32 starts, lengths, tables)."""
    return [step.input_ids.dtype, step.positions.dtype, step.slot_mapping.dtype, step.adapter_slots.dtype,
            step.query_start.dtype, step.context_lens.dtype, step.block_tables.dtype]


@pytest.mark.parametrize("groups,states", [(1, False), (3, True)])
@pytest.mark.parametrize("starts", [[0, 1, 2, 3], [0, 5, 6, 9]])  # a decode step, a prefill step
def test_a_packed_step_reads_back_through_its_views(starts, groups, states):
    """A step packed into a buffer of its own layout (an eager step's on a GPU) reads back as the arrays
    it was given, in ForwardContext's dtypes and shapes."""
    step = random_step(starts, groups, width=4, states=states)
    layout = StepLayout.of(step)
    buffer = torch.full((layout.numel,), 77, dtype=torch.int64)
    pack(layout.views(buffer).map(torch.Tensor.numpy), step)
    got = layout.views(buffer)
    assert_same(got, step)
    assert context_dtypes(got) == [torch.int64] * 4 + [torch.int32] * 3
    assert got.slot_mapping.shape == (groups, starts[-1]) and got.block_tables.shape == (groups, len(starts) - 1, 4)
    assert got.state_slots is None or got.state_slots.dtype == torch.int64


@pytest.mark.parametrize("groups,states", [(1, False), (3, True)])
def test_a_padded_decode_step_reads_back_from_its_prefix(groups, states):
    """A decode graph's buffer (8 rows, tables 6 wide): a step of 3 sequences with 4-wide tables after a
    wider one of 7, padded to the graph of 4 rows, reads back from the prefix of the buffer that size
    copies: the step's rows, then a padding row (id 0, position 0, slot -1, base model, one token of
    block 0, the scratch state slot)."""
    layout, scratch = StepLayout(8, 8, groups, 6, states), 5 if states else None
    buffer = torch.zeros(layout.numel, dtype=torch.int64)
    staged = layout.views(buffer).map(torch.Tensor.numpy)
    pad(staged, 0, 8, 6, scratch)
    wider = random_step(list(range(8)), groups, width=6, states=states, seed=1)
    pack(staged, wider)
    step = random_step([0, 1, 2, 3], groups, width=4, states=states)
    pack(staged, step)
    pad(staged, 3, 4, 4, scratch)
    copied = torch.full((layout.numel,), 77, dtype=torch.int64)
    copied[:layout.prefix(4)] = buffer[:layout.prefix(4)]
    got = layout.views(copied)
    assert np.array_equal(got.input_ids[:4], [*step.input_ids, 0])
    assert np.array_equal(got.positions[:4], [*step.positions, 0])
    assert np.array_equal(got.slot_mapping[:, :4], np.concatenate([step.slot_mapping, np.full((groups, 1), -1)], 1))
    assert np.array_equal(got.adapter_slots[:4], [*step.adapter_slots, -1])
    assert np.array_equal(got.query_start[:5], np.arange(5))
    assert np.array_equal(got.context_lens[:4], [*step.context_lens, 1])
    assert np.array_equal(got.block_tables[:, :3, :4], step.block_tables)
    assert not got.block_tables[:, 3, :4].any()
    assert np.array_equal(got.block_tables[:, :3, 4:], wider.block_tables[:, :3, 4:])  # past the step's width
    if states:
        assert np.array_equal(got.state_slots[:4], [*step.state_slots, scratch])
    assert got.block_tables.shape == (groups, 8, 6) and got.slot_mapping.shape == (groups, 8)


def test_on_cpu_a_step_is_read_in_place():
    """On CPU the model reads the step's own arrays: no copies."""
    step = random_step([0, 2, 3], groups=2, width=3, states=True)
    tensors = to_device(step, torch.device("cpu"))
    assert_same(tensors, step)
    for name, array in vars(step).items():
        assert np.shares_memory(getattr(tensors, name).numpy(), array), name
