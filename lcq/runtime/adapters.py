"""Which LoRA adapter each slot of the AdapterStack holds: the names requests may use, the sequences
using each slot, and the id that keeps each load's prefix-cache blocks apart.

Adapters are loaded and unloaded while the engine runs (between steps, on the engine's thread). An
unloaded adapter's name is refused at once, but the sequences already running with it finish on its
slot; the slot is zeroed and freed when the last of them ends.
"""
from __future__ import annotations

from dataclasses import dataclass

from lcq.models.config import ModelConfig
from lcq.models.lora import AdapterStack, LoRAAdapter, load_adapter

from .errors import AdapterNotFoundError


@dataclass(frozen=True)
class ServedAdapter:
    name: str
    folder: str
    slot: int
    # Unique per load ("name#n"): it seeds the prefix-cache hashes of the adapter's sequences, so KV blocks
    # computed with one load's weights are never reused by another load, even under the same name.
    load_id: str


class AdapterRegistry:
    def __init__(self, stack: AdapterStack | None, model_config: ModelConfig, base_name: str):
        """stack: None when the engine serves no adapters (no slots)."""
        self.stack = stack
        self.model_config = model_config
        self.base_name = base_name
        self.served: dict[str, ServedAdapter] = {}  # replaced on change, never mutated: other threads read it
        self.users: dict[int, int] = {}  # slot -> sequences running with it
        self.num_loads = 0

    def check_name(self, name: str) -> None:
        """ValueError unless `name` may be given to a new adapter."""
        if self.stack is None:
            raise ValueError("LoRA adapters are off: the engine has no adapter slots (max_loras 0)")
        if not name or name == self.base_name:
            raise ValueError(f"the LoRA adapter name {name!r} is empty or the base model's")
        if name in self.served:
            raise ValueError(f"the LoRA adapter {name!r} has already been loaded")

    def read(self, name: str, folder: str) -> LoRAAdapter:
        """Check the name and read the folder (UserError where it cannot be served); changes nothing, so it
        may run off the engine's thread."""
        self.check_name(name)
        return load_adapter(folder, self.model_config, self.stack.rank)

    def load(self, name: str, adapter: LoRAAdapter) -> ServedAdapter:
        """Copy the adapter into a free slot and serve it under `name`."""
        self.check_name(name)
        busy = {served.slot for served in self.served.values()} | {slot for slot, n in self.users.items() if n}
        slot = next((s for s in range(self.stack.slots) if s not in busy), None)
        if slot is None:
            raise ValueError(f"all {self.stack.slots} LoRA adapter slots are in use (max_loras): unload one first")
        self.stack.load(slot, adapter)
        self.num_loads += 1
        served = ServedAdapter(name, adapter.folder, slot, f"{name}#{self.num_loads}")
        self.served = {**self.served, name: served}
        return served

    def unload(self, name: str) -> None:
        """Stop serving `name`; its slot is freed now, or when the last sequence using it finishes."""
        served = self.served.get(name)
        if served is None:
            raise AdapterNotFoundError(f"the LoRA adapter {name!r} is not loaded")
        self.served = {key: value for key, value in self.served.items() if key != name}
        if not self.users.get(served.slot):
            self.stack.clear(served.slot)

    def acquire(self, name: str) -> ServedAdapter:
        """The adapter a new sequence runs with, counted as a user of its slot."""
        served = self.served[name]
        self.users[served.slot] = self.users.get(served.slot, 0) + 1
        return served

    def release(self, served: ServedAdapter) -> None:
        """A sequence is done with its adapter: free the slot if it was unloaded and this was its last user."""
        self.users[served.slot] -= 1
        if not self.users[served.slot] and self.served.get(served.name) is not served:
            self.stack.clear(served.slot)
