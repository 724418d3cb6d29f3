"""The engine behind the server: one loop, each step run in a worker thread so the event loop
stays free for HTTP; every request gets its own stream of deltas.

Requests, aborts and LoRA adapter loads and unloads arrive on the event loop and are handed to the
worker through an inbox that the next step drains, so the engine's state is only ever touched by
one thread, and never during a step. That thread is always the same one (loading included): one
malloc arena and one OpenMP thread team, not one per pool thread. When the engine goes idle, heap
memory freed by the last steps is handed back to the OS (host_memory.py), so memory after a burst
of requests returns to where it was.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import AsyncIterator, Callable

from .config import EngineConfig
from .engine import EngineStats, LLMEngine
from .errors import EngineNotReadyError, QueueFullError
from .host_memory import return_freed_memory
from .outputs import RequestOutput
from .sampling_params import SamplingParams

logger = logging.getLogger("lcq.engine")
FAILED_STEPS_LIMIT = 3  # engine steps failing in a row before every request is failed (the failure is not passing)


class AsyncEngine:
    def __init__(self, config: EngineConfig):
        config = config.fetched()  # a Hub id's files before the server starts
        config.validate()
        self.config = config
        self.engine: LLMEngine | None = None
        self.is_draining = False
        self._drain_deadline = float("inf")  # while draining: when the requests still running are aborted
        self._lock = threading.RLock()
        self._inbox: list[tuple[str, list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._adapter_changes: list[tuple[Callable[[], None], Future]] = []  # run between steps, in order
        self._streams: dict[str, asyncio.Queue] = {}
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lcq-engine")
        self._compiling = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lcq-grammar")  # requests' grammars
        self._loading: Future | None = None
        self.load_error: BaseException | None = None
        self.stop_error: str | None = None  # why the engine loop stopped, where it did while serving (a bug)
        self._failed_steps = 0  # engine steps failed in a row

    async def start(self) -> None:
        """Load the model in a thread (the server answers /health with 503 meanwhile), then loop."""
        self._wake = asyncio.Event()
        self._loading = self._worker.submit(LLMEngine, self.config)
        try:
            self.engine = await asyncio.wrap_future(self._loading)
        except BaseException as e:
            self.load_error = e
            raise
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    @property
    def is_ready(self) -> bool:
        return self.engine is not None and not self.is_draining and self.stop_error is None

    @property
    def still_loading(self) -> bool:
        """Whether the model's load is still running, on a thread that cannot be stopped (a server stopped
        meanwhile exits without waiting for it)."""
        return self._loading is not None and not self._loading.done()

    @property
    def tokenizer(self):
        return self.engine.tokenizer if self.engine else None

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (detokenizer.TokenBytes), which chat's logprobs report."""
        return self.engine.token_bytes(token_id)

    @property
    def sampling_defaults(self) -> dict[str, float | int]:
        """The model's values for sampling fields a request leaves unset (generation_config.py)."""
        return self.engine.sampling_defaults if self.engine else {}

    @property
    def model_name(self) -> str:
        return self.config.model_name()

    @property
    def adapters(self) -> dict[str, str]:
        """LoRA adapters served now, by name: their folders (lora_modules' while the model loads)."""
        return self.engine.lora_adapters if self.engine else self.config.lora_adapters()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len if self.engine else 0

    @property
    def placement(self) -> tuple[str | None, str | None]:
        """The model's device type and dtype as TGI's /info names them ("cuda", "torch.float16"); None while it
        loads."""
        if not self.engine:
            return None, None
        return self.engine.runner.device.type, str(self.engine.runner.dtype)

    @property
    def hidden_size(self) -> int:
        """The model's hidden size: the length of its embeddings (/v1/embeddings)."""
        return self.engine.runner.model_config.hidden_size if self.engine else 0

    def stats(self) -> EngineStats:
        if self.engine is None:
            return EngineStats(0, 0, 0.0, 0, 0, 0)
        stats = self.engine.stats()
        with self._lock:  # the inbox's requests, less those already aborted (a refused request's other choices)
            aborted = set(self._aborts)
            stats.num_waiting += sum(entry[0] not in aborted for entry in self._inbox)
        return stats

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, check_room: bool = True,
                    arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request; iterate the result for its deltas. Stopping iteration aborts it. check_room False:
        one of the other engine requests of an API request whose first was let in (n choices, many embedding
        inputs), which is admitted whole however many it has (QueueFullError otherwise). arrival_time: its
        time.monotonic() on arrival (default: now), which its latencies count from."""
        self._require_ready()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.engine.check_request(prompt_ids, params)
        # Requests not yet scheduled (the inbox's too) take the free batch slots first; max_queue more may wait.
        # (Counted for an API request's first engine request only: counting the inbox for each of thousands of
        # prompts held the event loop for seconds to minutes.)
        if check_room:
            stats = self.stats()
            if stats.num_waiting + 1 > max(0, self.config.max_num_seqs - stats.num_running) + self.config.max_queue:
                raise QueueFullError(f"the waiting queue is full ({self.config.max_queue} requests)")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        with self._lock:
            self._inbox.append((request_id, list(prompt_ids), params,
                                time.monotonic() if arrival_time is None else arrival_time))
        self._wake.set()
        return self._stream(request_id, queue)

    async def _stream(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                output: RequestOutput = await queue.get()
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.abort(request_id)

    async def prepare(self, params: SamplingParams) -> None:
        """What a request needs before it is queued that would hold the server's loop: its grammar compiled (a
        JSON schema's can take a second, a long regex a minute), on a thread of its own, so that neither the
        event loop nor the engine's steps wait for it (on the engine's thread every user's generation stopped
        meanwhile); a ValueError for one that cannot be used. add_request then finds it compiled."""
        self._require_ready()
        if params.structured_output is not None:
            await asyncio.get_running_loop().run_in_executor(self._compiling, self.engine.structured.check,
                                                             params.structured_output)

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are freed by the next step (at once if the loop is idle)."""
        with self._lock:
            self._aborts.append(request_id)
        if self._wake is not None:
            self._wake.set()

    async def load_lora_adapter(self, name: str, folder: str, replacing: bool = False) -> None:
        """Serve the PEFT folder as `name` from the next step on (`replacing` the adapter of that name, if one is
        served: vLLM's load_inplace). The folder is read off the engine's thread; ValueError or UserError
        (lcq.errors) where it cannot be."""
        self._require_ready()
        adapter = await asyncio.get_running_loop().run_in_executor(None, self.engine.read_lora_adapter, name, folder,
                                                                   replacing)
        await self._between_steps(lambda: self.engine.load_lora_adapter(name, adapter, replacing))

    async def unload_lora_adapter(self, name: str) -> None:
        """Refuse new requests for `name` from the next step on (AdapterNotFoundError if none is loaded);
        running ones finish with it."""
        self._require_ready()
        await self._between_steps(lambda: self.engine.unload_lora_adapter(name))

    async def _between_steps(self, change: Callable[[], None]) -> None:
        done: Future = Future()
        with self._lock:
            self._adapter_changes.append((change, done))
        self._wake.set()
        await asyncio.wrap_future(done)

    def _require_ready(self) -> None:
        if not self.is_ready:
            raise EngineNotReadyError(f"the engine stopped: {self.stop_error}" if self.stop_error else
                                      "the engine is draining" if self.is_draining else "the model is still loading")

    def _step(self) -> list[RequestOutput]:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
            changes, self._adapter_changes = self._adapter_changes, []
        outputs = []
        for request_id, prompt_ids, params, arrival_time in inbox:
            try:  # arrived when added here, not when the engine's thread takes it (a step later at most)
                self.engine.add_request(request_id, prompt_ids, params, arrival_time)
            except Exception as e:  # that request fails, not the step's others (nor its aborts)
                if not isinstance(e, ValueError):
                    logger.exception("request %s could not be added", request_id)
                outputs.append(RequestOutput(request_id, "", [], finish_reason="error", error=str(e)))
        for request_id in aborts:
            output = self.engine.abort(request_id)
            if output is not None:
                outputs.append(output)
        for change, done in changes:  # after the requests queued before them, which keep their adapter
            try:
                change()
                done.set_result(None)
            except Exception as e:
                done.set_exception(e)
        try:
            outputs += self.engine.step()
            self._failed_steps = 0
        except Exception as e:  # the engine isolates request failures; anything here is a bug worth logging
            self._failed_steps += 1
            logger.exception("engine step failed (%d in a row)", self._failed_steps)
            if self._failed_steps >= FAILED_STEPS_LIMIT:  # not passing: fail its requests, which frees their blocks
                outputs += self.engine.fail_all(f"{type(e).__name__}: {e}")
                self._failed_steps = 0
        return outputs  # (those of the inbox and the aborts too, whatever the step did)

    async def _run(self) -> None:
        try:
            await self._loop()
        except Exception as e:
            logger.critical("the engine loop stopped", exc_info=True)
            self.stop_error = f"{type(e).__name__}: {e}"
        finally:  # stopped (shutdown, or a bug): no stream is left waiting for outputs that will not come
            for request_id, queue in self._streams.items():
                queue.put_nowait(RequestOutput(request_id, "", [], finish_reason="error" if self.stop_error else "abort",
                                               error=self.stop_error))
            self._streams.clear()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not (self.engine.has_work() or self._inbox or self._aborts or self._adapter_changes):
                await loop.run_in_executor(self._worker, return_freed_memory)
                await self._wake.wait()
                self._wake.clear()
                continue
            outputs = await loop.run_in_executor(self._worker, self._step)
            for output in outputs:
                queue = self._streams.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)
                    if output.finished:
                        del self._streams[output.request_id]
            if self._failed_steps:
                await asyncio.sleep(0.1)

    def hurry(self) -> None:
        """End a drain now (a second SIGTERM/SIGINT): the requests still running are aborted at once."""
        self._drain_deadline = float("-inf")

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting, let running requests finish within the timeout, abort the rest, stop."""
        self.is_draining = True
        self._compiling.shutdown(wait=False)  # (a grammar being compiled finishes for its request)
        if self.engine is None or self._loop_task is None:  # never loaded: only the loading thread to stop
            self._worker.shutdown(wait=False)
            return
        clock = asyncio.get_running_loop().time
        self._drain_deadline = min(self._drain_deadline, clock() + drain_timeout)  # (hurried already: now)
        while (self.engine.has_work() or self._inbox) and clock() < self._drain_deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            self.abort(request_id)
        while self._streams and clock() < self._drain_deadline + 5:
            await asyncio.sleep(0.02)
        self._loop_task.cancel()
        try:
            await self._loop_task
        except asyncio.CancelledError:
            pass
        self._worker.shutdown(wait=False)
