"""How the layers share the KV cache pool when some attend over a sliding window.

A sliding-window layer never reads a key more than its window behind the newest query, so a long
sequence needs only about a window of its cache; full-attention layers need all of it. Layers of one
kind (full, or one window) form groups of `width` layers, width being the fewest layers of any kind
(Gemma 2: 13 full and 13 sliding layers, two groups of 13; Gemma 3 27B: 10 full and 52 sliding, one
full group and six sliding ones, the last holding 2). The pool is `width` K and V tensors; group g's
j-th layer reads and writes tensor j; every group has its own block table per sequence, and a block
id is one block of each of the width tensors, held by one group at a time. So all groups draw on one
pool, and a sliding group hands the blocks its window has passed back to it (block_manager.py): at
128K tokens Gemma 3 27B's sliding layers hold ~1K tokens each instead of 128K.

A model whose layers are all of one kind is one group of all its layers: the layout of a model
without windows, and of one whose every layer slides (Mistral 7B v0.1, Phi-3-mini), which then
returns its passed blocks too. Layers attending within chunks of C tokens (Llama 4's rotary layers;
window -C) are a kind of their own, whose groups hand back each chunk's blocks once the next begins.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVGroups:
    windows: tuple[int, ...]  # per group: its layers' sliding window in tokens, -size for chunks, 0 for full
    layer_group: tuple[int, ...]  # per layer: the group whose block table it reads
    layer_tensor: tuple[int, ...]  # per layer: which of the width cache tensors it uses
    width: int  # cache tensors (layers per group)

    @classmethod
    def of(cls, layer_windows: list[int]) -> KVGroups:
        """The groups of a model whose layer i attends over layer_windows[i] tokens (0: all)."""
        kinds = sorted(set(layer_windows))
        members = {kind: [i for i, window in enumerate(layer_windows) if window == kind] for kind in kinds}
        width = min(len(layers) for layers in members.values())
        windows, group, tensor = [], [0] * len(layer_windows), [0] * len(layer_windows)
        for kind in kinds:
            for start in range(0, len(members[kind]), width):
                for j, layer in enumerate(members[kind][start:start + width]):
                    group[layer], tensor[layer] = len(windows), j
                windows.append(kind)
        return cls(tuple(windows), tuple(group), tuple(tensor), width)

    @property
    def num_groups(self) -> int:
        return len(self.windows)
