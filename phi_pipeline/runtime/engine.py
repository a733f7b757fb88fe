"""The serving engines: one thread owns the model and advances the requests; the server only submits.

Two engines share the request bookkeeping (queue, limits, events, stop strings, draining):

- `BatchedEngine` (the default for multi-adapter CPU bundles): continuous batching on plain onnxruntime
  (batched.py). Every round feeds one prompt chunk of the request being prefilled, sized to take no longer than
  a decode step while others decode (scheduling.py: stall-free), then runs one decode step for all the requests
  already decoding, each row with its own adapter; a request joins the batch as
  soon as its prompt is in, and leaves it (freeing its row) when it ends. Its KV then goes to the prefix
  cache (prefix_cache.py), so a later prompt that repeats its tokens (a chat's next turn) prefills only the rest.
- `Engine`: one onnxruntime-genai generator per request, advanced round-robin (below); for the bundles
  the batched engine cannot run (merged layout, other execution providers).

The genai engine:

Why one thread: onnxruntime-genai is not thread-safe and its Python calls hold the GIL for the
whole native call. Each round gives every active request one model run: a prompt chunk of at most
`prefill_chunk` tokens while its prompt is going in, then one new token. So a short request is not
stuck behind a long one, a long prompt does not stall the streams already running, and requests
with different adapters run side by side, each generator with its own active adapter.

Requests come in from the server's event loop (`submit`), results go back to it as events on an
asyncio queue per request. At most `max_active` generators exist at once (each holds a KV cache
sized prompt + max_tokens); up to `max_queue` more requests wait; beyond that `submit` refuses.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from phi_pipeline.bundle.layout import MANIFEST
from phi_pipeline.runtime.batched import BatchedDecoder, RowSampler
from phi_pipeline.runtime.genai import BundleModel, Generation, Sampling
from phi_pipeline.runtime.prefix_cache import PrefixCache, Segments, positions
from phi_pipeline.runtime.scheduling import PrefillBudget, StepTimes

log = logging.getLogger("phi_pipeline.serve")


@dataclass(frozen=True)
class EngineSettings:
    max_active: int = 8
    """Generators at once (KV caches in memory)."""
    max_queue: int = 32
    """Requests waiting beyond max_active before new ones are refused (429)."""
    prefill_chunk: int = 128
    """Prompt tokens per model run at most: a longer prompt goes in over several rounds."""
    pace_prefill: bool = True
    """Batched engine: while requests decode, a round's prompt run takes what fits in one decode step
    (scheduling.py), so streams keep their pace; False: always prefill_chunk tokens."""
    prefill_min_tokens: int = 32
    """Batched engine, paced: the fewest prompt tokens a run takes while others decode (PrefillBudget.floor)."""
    prefix_cache_bytes: int = 1 << 30
    """Batched engine: host RAM kept for finished requests' KV, reused by a later prompt that starts with the
    same tokens under the same adapter (prefix_cache.py); 0: every prompt is prefilled whole."""


class QueueFull(Exception):
    """Every generator is busy and the wait queue is full."""


class NotAccepting(Exception):
    """The engine is loading, draining or has failed."""


@dataclass(frozen=True)
class Job:
    """What to run: prompt token ids (already formatted), adapter, limits and decoding settings."""

    prompt: list[int]
    adapter: str | None
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...] = ()
    min_tokens: int = 0


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str
    """"stop" (end-of-sequence token or a stop string) or "length" (max_tokens reached)."""
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str


Event = Delta | Finished | Failed
CANCELLED = Failed("the request was cancelled (its client went away)")


class StopText:
    """Decoded text of one request with its stop strings: text is released only once no stop string
    can start in it, and cut where one appears."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, piece: str) -> str:
        """Append decoded text; the part now safe to send."""
        self.text += piece
        # text already sent holds no stop string: it was released only once none could start in it
        cut = min((i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self.flush()
        end = max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


class Handle:
    """One submitted request as the server sees it: events arrive on `events`; `cancel()` (a client
    gone) frees its generator at the engine's next round."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()


@dataclass
class _Slot:
    job: Job
    handle: Handle
    generation: Generation | None = None
    stream: Any = None
    text: StopText | None = None
    produced: int = 0
    # batched engine: the row's sampler, tokens in its KV cache, prompt tokens fed, the token to feed next
    sampler: RowSampler | None = None
    length: int = 0
    fed: int = 0
    last: int = 0
    adapter: str | None = None
    """batched engine: the adapter version the request runs from start to end (a reload does not change it)"""
    generated: list[int] = field(default_factory=list)
    """batched engine: the tokens chosen so far; those fed back are in the KV row after the prompt"""
    restored: Segments = ()
    """batched engine: the prefix-cache segments its row starts with when it restored a whole entry; the entry
    it leaves shares them"""


class Engine:
    """Loads the bundle on its own thread, then runs submitted jobs until stopped."""

    def __init__(self, load: Callable[[], BundleModel], settings: EngineSettings = EngineSettings()):
        self.settings = settings
        self._load = load
        self.model: BundleModel | None = None
        self.error: str | None = None
        self.state = "loading"  # loading -> ready -> draining -> stopped; or failed
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Slot] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._active: list[_Slot] = []
        self._accepted = 0  # waiting + active, under _cv
        self.peak_active = 0
        """Most generators that were alive at once (interleaving shows as > 1)."""
        self._stop = False
        self.ready = threading.Event()
        self.idle = threading.Event()
        self.idle.set()
        self._thread = threading.Thread(target=self._run, name="phi-pipeline-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def context_length(self) -> int:
        """The most prompt + answer tokens one request may have."""
        assert self.model is not None
        return self.model.context_length

    @property
    def busy(self) -> int:
        """Requests accepted and not yet finished."""
        return self._accepted

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> Handle:
        handle = Handle(loop)
        with self._cv:
            if self.state != "ready":
                raise NotAccepting(self.state)
            if self._accepted >= self.settings.max_active + self.settings.max_queue:
                raise QueueFull()
            self._accepted += 1
            self.idle.clear()
            self._waiting.append(_Slot(job, handle))
            self._cv.notify()
        return handle

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn` on the engine thread between two rounds (the model is only touched there); its result or
        exception comes back in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._stop or self.state in ("failed", "stopped"):
                raise NotAccepting(self.state)
            self._calls.append((fn, future))
            self._cv.notify()
        return future

    def swap_adapters(self, changes: dict[str, tuple[Path, dict[str, Any]] | None]) -> None:
        """Engine thread: serve each named adapter from a new file (with its prompt format), or stop serving it
        (None). The genai engine loads its adapters once."""
        raise ValueError("the genai engine loads its adapters when it starts; restart the server to change them "
                         "(the batched engine, the default on CPU, reloads them)")

    def drain(self) -> None:
        """Refuse new requests; those accepted run to the end (`idle` is set then)."""
        with self._cv:
            if self.state == "ready":
                self.state = "draining"

    def stop(self, timeout: float | None = None) -> None:
        """End the thread after the current round; unfinished requests get a Failed event."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._start_up()
        except Exception as exc:  # reported by /health and the server's log, which exits
            log.exception("loading the bundle failed")
            self.error, self.state = f"{type(exc).__name__}: {exc}", "failed"
            self.ready.set()
            return
        with self._cv:
            if self.state == "loading":
                self.state = "ready"
        self.ready.set()
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._active and not self._calls:
                    self._cv.wait()
                if self._stop:
                    break
                calls, self._calls = self._calls, collections.deque()
                admitted = self._take_waiting()
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as exc:  # the caller's to report
                        future.set_exception(exc)
            self._step(admitted)
        for slot in [*self._active, *self._waiting]:
            self._finish(slot, Failed("the server is shutting down"))
        for _, future in self._calls:
            future.set_exception(NotAccepting("stopped"))
        with self._cv:
            self.state = "stopped"

    def _start_up(self) -> None:
        self.model = self._load()

    def _take_waiting(self) -> list[_Slot]:
        """Under the lock: the waiting requests that start now (as many as there are free generators)."""
        admitted = []
        while self._waiting and len(self._active) + len(admitted) < self.settings.max_active:
            admitted.append(self._waiting.popleft())
        return admitted

    def _step(self, admitted: list[_Slot]) -> None:
        """One round: start the admitted requests, then one model run for each active one."""
        for slot in admitted:
            self._admit(slot)
        for slot in list(self._active):
            self._advance(slot)

    def _admit(self, slot: _Slot) -> bool:
        """Start a request (False: it was cancelled or could not start, and has been told so)."""
        if slot.handle.cancelled.is_set():
            self._finish(slot, CANCELLED)
            return False
        assert self.model is not None
        try:
            self._open(slot)
            slot.stream = self.model.tokenizer.create_stream()
            slot.text = StopText(slot.job.stop)
        except Exception as exc:
            log.exception("starting a request failed")
            self._finish(slot, Failed(f"the engine could not start this request: {exc}"))
            return False
        self._active.append(slot)
        self.peak_active = max(self.peak_active, len(self._active))
        return True

    def _open(self, slot: _Slot) -> None:
        """The request's own generator (its KV cache sized prompt + max_tokens)."""
        assert self.model is not None
        job = slot.job
        slot.generation = self.model.start(job.prompt, job.adapter, job.max_tokens, job.sampling,
                                           min_new_tokens=job.min_tokens)

    def _advance(self, slot: _Slot) -> None:
        """One model run for `slot`: its next prompt chunk, or its next token."""
        if slot.handle.cancelled.is_set():
            self._finish(slot, CANCELLED)
            return
        generation = slot.generation
        assert generation is not None
        try:
            if not generation.prefilled:
                generation.feed(self.settings.prefill_chunk)
                return
            if not self._deliver(slot, generation.step()) and generation.done:
                self._close(slot, "length" if slot.produced >= slot.job.max_tokens else "stop")
        except Exception as exc:
            log.exception("a request failed in the engine")
            self._finish(slot, Failed(f"the engine failed on this request: {exc}"))

    def _deliver(self, slot: _Slot, token: int) -> bool:
        """A new token of `slot`: send the text it adds; True when it ended the request (end-of-sequence
        or a stop string), which has then been told so."""
        assert self.model is not None and slot.text is not None
        if token in self.model.eos_token_ids:
            self._close(slot, "stop")
            return True
        slot.produced += 1
        piece = slot.text.add(slot.stream.decode(token))
        if piece:
            slot.handle.emit(Delta(piece))
        if slot.text.stopped:
            self._close(slot, "stop")
            return True
        return False

    def _close(self, slot: _Slot, reason: str) -> None:
        assert slot.text is not None
        rest = slot.text.flush()
        if rest:
            slot.handle.emit(Delta(rest))
        self._finish(slot, Finished(reason, len(slot.job.prompt), slot.produced))

    def _finish(self, slot: _Slot, event: Event) -> None:
        """Drop the slot's generator (its KV cache goes with it) and tell the waiting client."""
        if slot in self._active:
            self._active.remove(slot)
        slot.generation = slot.stream = None
        # `busy` drops before the client can see the answer; `idle` is set only once the answer is on
        # its way, so a draining server never closes before it
        with self._cv:
            self._accepted -= 1
        slot.handle.emit(event)
        with self._cv:
            if self._accepted == 0:
                self.idle.set()


class BatchedEngine(Engine):
    """Continuous batching with a different adapter in every row (module docstring)."""

    def __init__(self, load: Callable[[], BundleModel], make_decoder: Callable[[], BatchedDecoder],
                 settings: EngineSettings = EngineSettings()):
        super().__init__(load, settings)
        self._make_decoder = make_decoder
        self.decoder: BatchedDecoder | None = None
        self._rows: list[_Slot] = []
        """Requests decoding; row i of the KV buffers is self._rows[i]'s."""
        self._prefilling: _Slot | None = None
        self._prefill_row = 0
        """The KV row the prompt going in is written to, where it then decodes: the first row past the decoding
        ones when it started (rows leaving meanwhile make it one past: it moves down when it joins)."""
        self._defaults: dict[str, Any] = {}
        self.prefix_cache = PrefixCache(settings.prefix_cache_bytes) if settings.prefix_cache_bytes > 0 else None
        self.prefill_budget = PrefillBudget(settings.prefill_chunk, floor=settings.prefill_min_tokens,
                                            paced=settings.pace_prefill)
        self.step_times = StepTimes()
        self._versions: dict[str, str] = {}
        """adapter name -> the key of the weights it is served from now (the decoder's and the prefix cache's)"""
        self._loads = 0

    @property
    def context_length(self) -> int:
        assert self.decoder is not None
        return self.decoder.kv_len

    def _start_up(self) -> None:
        self.model = self._load()
        self.decoder = self._make_decoder()
        self.decoder.warm_up()
        self._versions = {name: name for name in self.decoder.adapters}
        self._defaults = json.loads((self.decoder.model_dir / "genai_config.json").read_text()).get("search", {})

    def _take_waiting(self) -> list[_Slot]:
        """Under the lock: the next waiting request, when no prompt is going in and a row is free."""
        if self._prefilling is None and self._waiting and len(self._rows) < self.settings.max_active:
            return [self._waiting.popleft()]
        return []

    def _step(self, admitted: list[_Slot]) -> None:
        for slot in admitted:
            if self._admit(slot):
                self._prefilling, self._prefill_row = slot, len(self._rows)
        try:
            self._round()
        except Exception as exc:  # a failed model run fails the requests in it, not the server
            log.exception("a batched step failed")
            for slot in [*self._rows, *([self._prefilling] if self._prefilling else [])]:
                self._finish(slot, Failed(f"the engine failed on this request: {exc}"))
            self._rows, self._prefilling = [], None

    def _open(self, slot: _Slot) -> None:
        """No generator: the request's row sampler; its prompt goes in by chunks in the coming rounds."""
        assert self.model is not None
        job = slot.job
        self.model.check_adapter(job.adapter)
        slot.adapter = None if job.adapter is None else self._versions[job.adapter]
        slot.sampler = RowSampler(job.sampling.search_options(), self._defaults, job.sampling.seed)

    def _round(self) -> None:
        decoder = self.decoder
        assert decoder is not None
        for i in reversed(range(len(self._rows))):  # clients gone: their rows go before the step
            if self._rows[i].handle.cancelled.is_set():
                self._finish(self._leave(i), CANCELLED)
        slot = self._prefilling
        if slot is not None:
            if slot.handle.cancelled.is_set():
                self._prefilling = None
                self._finish(slot, CANCELLED)
            else:
                prompt = slot.job.prompt
                if slot.fed == 0 and self.prefix_cache is not None:
                    reused, entry = self.prefix_cache.lookup(slot.adapter, prompt)
                    if entry is not None:
                        decoder.restore(entry.kv, reused, self._prefill_row)
                        slot.fed = reused
                        if reused == len(entry.tokens):
                            slot.restored = entry.kv
                chunk = prompt[slot.fed : slot.fed + self.prefill_budget.tokens(decoding=bool(self._rows))]
                started = time.perf_counter()
                logits = decoder.prefill(chunk, slot.fed, slot.adapter, self._prefill_row)
                seconds = time.perf_counter() - started
                self.prefill_budget.prefilled(len(chunk), seconds)
                self.step_times.prefilled(len(chunk), seconds)
                slot.fed += len(chunk)
                if slot.fed == len(prompt):
                    self._prefilling = None
                    slot.length = len(prompt)
                    if self._take(slot, logits):
                        self._keep(slot, self._prefill_row)
                    else:
                        if self._prefill_row != len(self._rows):
                            decoder.move(self._prefill_row, len(self._rows), slot.length)
                        self._rows.append(slot)
        if self._rows:
            rows = self._rows
            started = time.perf_counter()
            logits = decoder.decode([r.last for r in rows], [r.length for r in rows], [r.adapter for r in rows])
            seconds = time.perf_counter() - started
            self.prefill_budget.decoded(seconds)
            self.step_times.decoded(seconds, len(rows))
            done = []
            for i, row in enumerate(rows):
                row.length += 1
                if self._take(row, logits[i]):
                    done.append(i)
            for i in reversed(done):
                self._leave(i)
        if len(decoder.adapters) > len(self._versions):  # an old version's last request may just have ended
            self._drop_unused_versions()

    def _take(self, slot: _Slot, logits: Any) -> bool:
        """Choose the slot's next token from its logits and deliver it; True when the request has ended."""
        assert slot.sampler is not None and self.model is not None
        eos = self.model.eos_token_ids
        token = slot.sampler.pick(logits, eos if slot.produced < slot.job.min_tokens else frozenset())
        slot.generated.append(token)
        if self._deliver(slot, token):
            return True
        slot.last = token
        if slot.produced >= slot.job.max_tokens:
            self._close(slot, "length")
            return True
        return False

    def _leave(self, i: int) -> _Slot:
        """Take row i out of the batch: the last row moves into its place (rows stay a prefix)."""
        assert self.decoder is not None
        slot, last = self._rows[i], len(self._rows) - 1
        self._keep(slot, i)
        if i != last:
            moved = self._rows[last]
            self.decoder.move(last, i, moved.length)
            self._rows[i] = moved
        self._rows.pop()
        return slot

    def swap_adapters(self, changes: dict[str, tuple[Path, dict[str, Any]] | None]) -> None:
        """New versions get new keys, so requests already running keep the weights they started with; a version
        no request uses any more is dropped with its prefix-cache entries."""
        assert self.decoder is not None and self.model is not None
        versions, formats = dict(self._versions), dict(self.model.formats)
        for name, change in changes.items():
            if change is None:
                versions.pop(name, None)
                formats.pop(name, None)
                continue
            path, prompt_format = change
            self._loads += 1
            key = f"{name}@{self._loads}"
            self.decoder.add_adapter(key, path)  # checks its inputs against the graph: raises before any change
            versions[name], formats[name] = key, prompt_format
        self._versions, self.model.formats = versions, formats
        self._drop_unused_versions()

    def _drop_unused_versions(self) -> None:
        assert self.decoder is not None
        running = {s.adapter for s in [*self._rows, *([self._prefilling] if self._prefilling else [])]}
        for key in set(self.decoder.adapters) - set(self._versions.values()) - running:
            self.decoder.remove_adapter(key)
            if self.prefix_cache is not None:
                self.prefix_cache.drop_adapter(key)

    def _keep(self, slot: _Slot, row: int) -> None:
        """A leaving request's KV (its row `row`) into the prefix cache."""
        if self.prefix_cache is not None and self.decoder is not None and slot.length:
            tokens = [*slot.job.prompt, *slot.generated][: slot.length]
            start = sum(positions(segment) for segment in slot.restored)
            new = self.decoder.snapshot(row, start, slot.length)
            self.prefix_cache.store(slot.adapter, tokens, (*slot.restored, new))



def batched_problem(manifest: dict[str, Any]) -> str | None:
    """Why the batched engine cannot serve this bundle here (None: it can)."""
    from phi_pipeline.runtime.genai import needs_cpu_fallback

    if manifest.get("layout") == "merged":
        return "the bundle has one model per adapter (merged layout)"
    provider = manifest.get("execution_provider", "CPUExecutionProvider")
    if provider != "CPUExecutionProvider" and not needs_cpu_fallback(provider):
        return f"the bundle runs on {provider}; the batched engine runs onnxruntime's CPU kernels"
    return None


def default_kv_tokens(model_dir: Path, rows: int) -> int:
    """The model's context length, capped so that `rows` KV rows take at most a quarter of the memory."""
    genai = json.loads((model_dir / "genai_config.json").read_text())["model"]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    decoder = genai["decoder"]
    # keys and values of every layer, fp32 (a CPU bundle's KV cache)
    per_token = 2 * decoder["num_hidden_layers"] * decoder["num_key_value_heads"] * decoder["head_size"] * 4
    return max(1, min(genai["context_length"], memory // 4 // (rows * per_token)))


def engine_kind(manifest: dict[str, Any], requested: str) -> str:
    """The engine that serves a bundle for `--engine requested` (auto: batched where it can); ValueError
    when batched is asked for a bundle it cannot serve."""
    problem = batched_problem(manifest)
    if requested == "batched" and problem:
        raise ValueError(f"--engine batched: {problem}; use --engine genai or auto")
    return "genai" if requested == "genai" or problem else "batched"


def serving_engine(bundle: Path, threads: int | None, settings: EngineSettings, kind: str = "auto") -> Engine:
    """The engine `phi-pipeline serve` runs (engine_kind)."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    if engine_kind(manifest, kind) == "genai":
        return Engine(lambda: BundleModel(bundle, threads=threads), settings)
    files = {a["name"]: bundle / a["file"] for a in manifest["adapters"] if "file" in a}
    kv = default_kv_tokens(bundle, settings.max_active)

    def make_decoder() -> BatchedDecoder:
        return BatchedDecoder(bundle, files, max_batch=settings.max_active, kv_len=kv, threads=threads)

    # its onnxruntime-genai model is only the tokenizer and prompt formats: one thread
    return BatchedEngine(lambda: BundleModel(bundle, threads=1), make_decoder, settings)
