"""The LoRA adapters an engine serves, and which of them its AdapterStack's slots hold.

As in vLLM, adapters are registered (up to max_cpu_loras, kept in host memory) apart from the slots
(max_loras) that every step's LoRA products cover. A sequence takes a slot for its adapter when the
scheduler admits it and gives it back when it is preempted or ends: the slot already holding that
adapter, else an empty one, else the one idle longest, into which the adapter is copied. So any number of
registered adapters is served, at most max_loras of them in one step, and a server whose slots hold
every adapter (the default) never copies one after loading it.

Adapters are loaded and unloaded while the engine runs (between steps, on the engine's thread). An
unloaded adapter's name is refused at once, but the sequences already running with it finish on its
slot; the slot is zeroed and freed when the last of them ends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lcq.models.config import ModelConfig
from lcq.models.lora import AdapterStack, LoRAAdapter, load_adapter

from .errors import AdapterNotFoundError

MAX_NAME_CHARS = 256  # of an adapter's name

if TYPE_CHECKING:
    from .sequence import Sequence


@dataclass(frozen=True, eq=False)
class ServedAdapter:
    name: str
    adapter: LoRAAdapter  # its matrices in host memory, copied into a slot while sequences run with it
    # Unique per load ("name#n"): it seeds the prefix-cache hashes of the adapter's sequences, so KV blocks
    # computed with one load's weights are never reused by another load, even under the same name.
    load_id: str

    @property
    def folder(self) -> str:
        return self.adapter.folder


class AdapterRegistry:
    def __init__(self, stack: AdapterStack | None, model_config: ModelConfig, base_names: list[str], capacity: int):
        """stack: None when the engine serves no adapters (no slots); base_names: the base model's served names;
        capacity: adapters registered at most."""
        self.stack = stack
        self.model_config = model_config
        self.base_names = base_names
        self.capacity = capacity
        self.served: dict[str, ServedAdapter] = {}  # replaced on change, never mutated: other threads read it
        slots = stack.slots if stack is not None else 0
        self.holding: list[ServedAdapter | None] = [None] * slots  # the adapter whose weights each slot holds
        self.users = [0] * slots  # sequences running with each slot
        self.last_used = [0] * slots  # when each slot was last taken (a count of bindings), for choosing one
        self.num_bindings = 0
        self.num_loads = 0

    def check_name(self, name: str, replacing: bool = False) -> None:
        """ValueError unless `name` may be given to a new adapter (`replacing`: or to the one that has it now)."""
        if self.stack is None:
            raise ValueError("LoRA adapters are off: the engine has no adapter slots (max_loras 0)")
        if not name or name in self.base_names:
            raise ValueError(f"the LoRA adapter name {name!r} is empty or the base model's")
        if len(name) > MAX_NAME_CHARS or not name.isprintable():  # (logged and listed by /v1/models)
            raise ValueError(f"a LoRA adapter name has at most {MAX_NAME_CHARS} printable characters")
        if name in self.served and not replacing:
            raise ValueError(f"the LoRA adapter {name!r} has already been loaded")

    def read(self, name: str, folder: str, replacing: bool = False) -> LoRAAdapter:
        """Check the name and read the folder (UserError where it cannot be served); changes nothing, so it
        may run off the engine's thread."""
        self.check_name(name, replacing)
        return load_adapter(folder, self.model_config, self.stack.rank)

    def load(self, name: str, adapter: LoRAAdapter, replacing: bool = False) -> ServedAdapter:
        """Serve the adapter under `name`, copied into an empty slot if there is one (else when first used).
        replacing: the adapter served under that name now is unloaded first (its running sequences finish with it)."""
        self.check_name(name, replacing)
        if replacing and name in self.served:
            self.unload(name)
        if len(self.served) >= self.capacity:
            raise ValueError(f"{self.capacity} LoRA adapters are loaded, as many as max_cpu_loras allows: unload "
                             "one first")
        self.num_loads += 1
        served = ServedAdapter(name, adapter, f"{name}#{self.num_loads}")
        self.served = {**self.served, name: served}
        if None in self.holding:
            self._fill(self.holding.index(None), served)
        return served

    def unload(self, name: str) -> None:
        """Stop serving `name`; its slot is freed now, or when the last sequence using it finishes."""
        served = self.served.get(name)
        if served is None:
            raise AdapterNotFoundError(f"the LoRA adapter {name!r} is not loaded")
        self.served = {key: value for key, value in self.served.items() if key != name}
        if served in self.holding:
            self._free_if_done(self.holding.index(served))

    def bind(self, seq: Sequence) -> bool:
        """Give a sequence that is about to run a slot holding its adapter, for as long as it runs; False
        when every slot serves other adapters' running sequences."""
        served = seq.adapter
        if served in self.holding:
            slot = self.holding.index(served)
        else:
            idle = [s for s in range(len(self.users)) if not self.users[s]]
            if not idle:
                return False
            slot = min(idle, key=lambda s: (self.holding[s] is not None, self.last_used[s]))
            self._fill(slot, served)
        self.users[slot] += 1
        self.num_bindings += 1
        self.last_used[slot] = self.num_bindings
        seq.adapter_slot = slot
        return True

    def unbind(self, seq: Sequence) -> None:
        """A sequence stops running (preempted or ended): its slot may go to another adapter."""
        slot, seq.adapter_slot = seq.adapter_slot, None
        if slot is not None:
            self.users[slot] -= 1
            self._free_if_done(slot)

    def _fill(self, slot: int, served: ServedAdapter) -> None:
        self.stack.load(slot, served.adapter)
        self.holding[slot] = served

    def _free_if_done(self, slot: int) -> None:
        """Zero a slot whose adapter was unloaded once no sequence runs with it."""
        held = self.holding[slot]
        if not self.users[slot] and held is not None and self.served.get(held.name) is not held:
            self.stack.clear(slot)
            self.holding[slot] = None
