"""Continuous batching across adapters: one model in memory, one forward per decode step for every request.

The engine runs in a thread of its own. Between two decode steps it runs the calls queued for it (adapter
loads and unloads), drops cancelled requests, and admits waiting ones. They are prefilled together: the
prompts laid end to end in rows of ``PACK_WIDTH`` tokens (``_pack``), each attending only to itself from
position 0 (a block-diagonal causal mask) and each through its own adapter (``lk.route`` per position), so
a forward computes almost no padding whatever the prompts' lengths. Each request's keys and values then
join the running batch's (``KVSlab``) as a row of its own. A decode step feeds every running request its
last token in one forward, row i routed through request i's adapter by ``lk.route``
(``lorakit/routing.py``: factored adapters stacked once and gathered per row; the stacks are kept across
steps while the adapters do not change). Finished requests leave the batch at once.

A row computes from its own tokens, KV and adapter only: what other rows share its forwards changes
nothing but the summation order inside batched matmuls (MKL's sgemm gives a row other low bits at another
row count), about 1e-6 of a logit. That could still flip a greedy choice between two nearly equal logits, so
such a choice is made by a forward of the request alone (``Engine._alone``), a function of its tokens and
adapter only. A greedy answer is thus the same alone, in any mixed batch, and from ``lorakit generate``,
``lorakit eval`` and finetune's evaluation, which decode through this engine too (``Engine.complete``;
tests/test_serve.py, and tests/test_greedy_paths.py on the embedded model).
"""

from __future__ import annotations

import collections
import inspect
import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import lorakit as lk
from lorakit.adapt import attach
from lorakit.errors import AdapterNotFoundError, ConfigError, LorakitError
from lorakit.layers import adapted_layers
from lorakit.serve.threads import Threads
from lorakit.trained import trained_modules

# A prefill row holds prompts end to end up to this many tokens (or one longer prompt). Its attention costs
# width² however the prompts split it, so wider rows would spend more on masked-out scores than they save.
PACK_WIDTH = 256
# Two greedy candidates closer than this (relative to the larger logit) are told apart by a forward of the request
# alone (Engine._alone). The batch's summation order moves float32 logits by about 1e-6 of their size (measured
# on the embedded model: BENCHMARKS.md); this leaves a margin of hundreds above it.
TIE_TOLERANCE = 1e-3
# The same for a model computing in 16 bits, where every layer rounds its activations to 8 (bfloat16) or 11
# (float16) bits of mantissa, and the few low bits a batch moves become whole steps of that rounding: measured on
# the embedded model in bfloat16, a batch moved a logit by up to 3.4e-2 of the largest (BENCHMARKS.md). bfloat16's
# tolerance is three times that; float16's, with eight times finer steps, an eighth of it.
TIE_TOLERANCES = {torch.bfloat16: 0.1, torch.float16: 0.0125}


class QueueFull(LorakitError):
    """More requests are waiting than the server was told to hold (``--max-queue``)."""


class EngineStopped(LorakitError):
    """The engine is not running: it was stopped, or has not been started."""


@dataclass
class Sampling:
    """How one request's tokens are chosen and when it stops."""

    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(eq=False)
class Generation:
    """One sequence being generated: its prompt, adapter, sampling, and where its events go.

    ``sink(event)`` is called from the engine's thread with {"text": delta} as text becomes final, then one
    {"done": finish_reason, "prompt_tokens", "completion_tokens"} or {"error": message, "status"}.
    """

    prompt_ids: list[int]
    adapter: str | None  # the served adapter name; None: the base model
    sampling: Sampling
    sink: Callable[[dict], None]
    submitted: float = field(default_factory=time.perf_counter)
    generated: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the answer already sent
    cached: int = 0  # tokens of this sequence in the KV slab
    last_token_at: float | None = None
    cancelled: bool = False
    finished: bool = False
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Stop generating (a client went away); the engine frees the slot before its next step."""
        self.cancelled = True


class KVSlab:
    """The running batch's keys and values: per model layer one (rows, heads, columns, head_dim) buffer.

    Row i holds request i's sequence, right-aligned so that every row's next token goes to the same column
    ``n``; columns before ``pad[i]`` are padding, masked out. A request joins by a copy of its own prefill
    KV into a free row and leaves by the last row moving into its place: no step copies the whole batch,
    and the buffers grow by doubling (rows and columns) and shift left when every row has padding to spare.
    """

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = 0  # rows in use
        self.n = 0  # columns in use
        self.pad: list[int] = []

    def join(self, cache, row: int, start: int, end: int) -> int:
        """Add columns ``start:end`` of row ``row`` of a prefill's ``cache`` (a DynamicCache: one sequence of the
        prompts packed in that row) as the slab's last row; its index."""
        layers = [(layer.keys[row, :, start:end], layer.values[row, :, start:end]) for layer in cache.layers]
        length = layers[0][0].shape[1]
        if not self.keys:
            self.keys = [k.new_zeros(_grown(0, 1), k.shape[0], _grown(0, length + 1), k.shape[2]) for k, _ in layers]
            self.values = [v.new_zeros(_grown(0, 1), v.shape[0], self.keys[0].shape[2], v.shape[2]) for _, v in layers]
        if length > self.n:
            self._reserve(self.rows, length + 1)
            self._shift(length - self.n)
        self._reserve(self.rows + 1, self.n + 1)
        slot = self.rows
        for buffer, (k, v) in zip(zip(self.keys, self.values), layers):
            buffer[0][slot, :, self.n - length:self.n] = k
            buffer[1][slot, :, self.n - length:self.n] = v
        self.pad.append(self.n - length)
        self.rows += 1
        return slot

    def leave(self, row: int) -> None:
        """Remove ``row``; the last row takes its place (callers remove rows from the highest index down)."""
        last = self.rows - 1
        if row != last:
            start = self.pad[last]
            for k, v in zip(self.keys, self.values):
                k[row, :, start:self.n] = k[last, :, start:self.n]
                v[row, :, start:self.n] = v[last, :, start:self.n]
            self.pad[row] = start
        self.pad.pop()
        self.rows -= 1
        if self.rows == 0:
            self.n = 0

    def prepare_step(self) -> None:
        """Make room for one more column: drop padding every row has (when worth a copy), else grow."""
        spare = min(self.pad, default=0)
        if spare and (self.n + 1 > self.keys[0].shape[2] or spare >= max(32, self.n // 4)):
            self._shift(-spare)
        self._reserve(self.rows, self.n + 1)

    def mask(self, device) -> torch.Tensor:
        """The (rows, n + 1) attention mask of a decode step: 1 where a row has a token, the new one included."""
        columns = torch.arange(self.n + 1, device=device)
        return (columns[None, :] >= torch.tensor(self.pad, device=device)[:, None]).long()

    def cache(self):
        """A transformers Cache whose layers write the step's new keys and values into column ``n``."""
        from transformers.cache_utils import Cache

        return Cache(layers=[_SlabLayer(self, i) for i in range(len(self.keys))])

    def _reserve(self, rows: int, columns: int) -> None:
        have_rows, have_columns = self.keys[0].shape[0], self.keys[0].shape[2]
        if rows <= have_rows and columns <= have_columns:
            return
        rows, columns = max(have_rows, _grown(have_rows, rows)), max(have_columns, _grown(have_columns, columns))
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_zeros(rows, old.shape[1], columns, old.shape[3])
                new[:self.rows, :, :self.n] = old[:self.rows, :, :self.n]
                buffers[i] = new

    def _shift(self, by: int) -> None:
        """Move every row's columns right by ``by`` (left when negative); the buffers have the room."""
        if by == 0 or self.rows == 0:
            self.n = max(self.n + by, 0)
            return
        for buffer in (*self.keys, *self.values):
            part = buffer[:self.rows, :, :self.n].clone()
            if by > 0:
                buffer[:self.rows, :, by:by + self.n] = part
                buffer[:self.rows, :, :by] = 0
            else:
                buffer[:self.rows, :, :self.n + by] = part[:, :, -by:]
        self.n += by
        self.pad = [p + by for p in self.pad]

    def advance(self) -> None:
        """One column more is in use (after a decode step wrote it)."""
        self.n += 1


def _grown(have: int, need: int) -> int:
    """Capacity for ``need``: doubling from ``have`` (at least 8)."""
    size = max(have, 8)
    while size < need:
        size *= 2
    return size


def _slab_layer_class():
    from transformers.cache_utils import DynamicLayer

    class SlabLayer(DynamicLayer):
        """One model layer's view of the KVSlab during a decode step."""

        def __init__(self, slab: KVSlab, index: int):
            super().__init__()
            self.slab, self.index = slab, index
            self.is_initialized = True
            self.device = slab.keys[index].device

        def update(self, key_states, value_states, *args, **kwargs):
            s, i = self.slab, self.index
            rows, n, t = s.rows, s.n, key_states.shape[2]
            s.keys[i][:rows, :, n:n + t] = key_states
            s.values[i][:rows, :, n:n + t] = value_states
            return s.keys[i][:rows, :, :n + t], s.values[i][:rows, :, :n + t]

        def get_seq_length(self) -> int:
            return self.slab.n

        def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
            q = query_length if isinstance(query_length, int) else query_length.shape[0]
            return self.slab.n + q, 0

    return SlabLayer


def _SlabLayer(slab: KVSlab, index: int):
    global _SlabLayer  # the class needs transformers; it is made on first use, then replaces this function
    _SlabLayer = _slab_layer_class()
    return _SlabLayer(slab, index)


class Adapters:
    """The adapters the engine serves, by name, and which of them are on the model (least recently used last).

    A served name maps to an internal one (``a0``, ``a1``, ...) on the model, so any name a client uses (with
    dots or slashes) is fine. An adapter's files are read once, when it is added. At most ``max_loaded`` are on
    the model; the least recently used one that no running request uses is taken off to make room, its modules
    kept in host memory (as vLLM keeps evicted LoRAs in its CPU cache), and put back when asked for: a name means
    the tensors first read for as long as it is served, a file replaced or corrupted later changes nothing, and
    no request waits on the disk. Used by the engine's thread only.
    """

    def __init__(self, model, max_loaded: int):
        if max_loaded < 1:
            raise ConfigError(f"--max-loaded-adapters must be >= 1, got {max_loaded}")
        self.model, self.max_loaded = model, max_loaded
        self.paths: dict[str, Path] = {}
        self.internal: dict[str, str] = {}
        # off the model, on the CPU: by name, ({layer path: (recipe, adapter)}, {path: its train= copy})
        self.evicted: dict[str, tuple[dict[str, tuple], dict[str, torch.nn.Module]]] = {}
        self.device = next(model.parameters()).device
        self.resident: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.with_copies: set[str] = set()  # internal names of loaded adapters with train= copies (routed per row)
        self.loads = 0
        self._counter = itertools.count()

    def add(self, name: str, path: Path, busy: set[str] = frozenset()) -> None:
        """Serve ``path`` as ``name``: loaded now (which checks it fits the model), and stays while there is room."""
        if name in self.paths:
            raise ConfigError(f"an adapter named {name!r} is already served")
        self.paths[name], self.internal[name] = Path(path), f"a{next(self._counter)}"
        try:
            if not self.ensure(name, busy):
                self._load(name)  # every slot is busy: check it now, and let it be evicted first
                self._evict(name)
        except BaseException:
            del self.paths[name], self.internal[name]
            raise

    def attached(self, name: str) -> None:
        """Serve as ``name`` the adapter already on the model under that name (an in-memory one, as training left
        it), with no files behind it."""
        self.paths[name], self.internal[name] = None, name
        self.resident[name] = None
        if any(name in module.adapters for _, module in trained_modules(self.model)):
            self.with_copies.add(name)

    def remove(self, name: str) -> None:
        """Stop serving ``name`` (the caller has made sure no running request uses it)."""
        if name not in self.paths:
            raise AdapterNotFoundError(f"no adapter named {name!r} is served")
        if name in self.resident:
            self._evict(name)
        del self.paths[name], self.internal[name], self.evicted[name]

    def ensure(self, name: str, busy: set[str]) -> bool:
        """Whether ``name`` is on the model, loading it (evicting an idle one) if needed; False when every
        loaded adapter is in use by a running request and there is no room."""
        if name in self.resident:
            self.resident.move_to_end(name, last=False)
            return True
        if len(self.resident) >= self.max_loaded:
            idle = [n for n in reversed(self.resident) if n not in busy]
            if not idle:
                return False
            self._evict(idle[0])
        self._load(name)
        self.resident[name] = None
        self.resident.move_to_end(name, last=False)
        return True

    def _load(self, name: str) -> None:
        internal = self.internal[name]
        if name in self.evicted:  # back from host memory: the modules first loaded, never the files again
            built, copies = self.evicted[name]
            attach(self.model, internal, {path: (recipe, adapter.to(self.device))
                                          for path, (recipe, adapter) in built.items()},
                   {path: copy.to(self.device) for path, copy in copies.items()})
            del self.evicted[name]
        else:
            lk.load(self.model, self.paths[name], name=internal)
        if any(internal in module.adapters for _, module in trained_modules(self.model)):
            self.with_copies.add(internal)
        self.loads += 1

    def _evict(self, name: str) -> None:
        internal = self.internal[name]
        built = {path: (layer.recipes[internal], layer.adapters[internal])
                 for path, layer in adapted_layers(self.model) if internal in layer.adapters}
        copies = {path: module.adapters[internal] for path, module in trained_modules(self.model)
                  if internal in module.adapters}
        lk.delete(self.model, internal)
        # kept off the accelerator, where the room was wanted
        self.evicted[name] = ({path: (recipe, adapter.to("cpu")) for path, (recipe, adapter) in built.items()},
                              {path: copy.to("cpu") for path, copy in copies.items()})
        self.with_copies.discard(internal)
        self.resident.pop(name, None)


class Engine:
    """Generates for many requests at once, each with its own adapter, on one model (see the module docstring).

    ``submit`` and ``call`` may be used from any thread; everything touching the model runs in the engine's.
    """

    def __init__(self, model, tokenizer, adapters: Adapters, max_batch: int = 64, max_queue: int = 256,
                 metrics=None, prefill_tokens: int = 2048, threads: Threads | None = None):
        for flag, value in (("--max-batch", max_batch), ("--max-queue", max_queue)):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        self.max_batch, self.max_queue, self.metrics = max_batch, max_queue, metrics
        self.prefill_tokens = prefill_tokens
        self.threads = threads or Threads()  # torch's thread count for the decode steps (none: left as it is)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device = next(model.parameters()).device
        self.tie_tolerance = TIE_TOLERANCES.get(model.get_input_embeddings().weight.dtype, TIE_TOLERANCE)
        attention = getattr(model.config, "_attn_implementation", None) or "eager"
        if attention not in ("sdpa", "eager"):
            raise ConfigError(f"the server packs prompts with a 4D attention mask, which attention implementation "
                              f"{attention!r} does not take: load the model with attn_implementation='sdpa'")
        # transformers 5.x renamed the cache argument: `cache` where the forward takes it
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.eos = _eos_ids(model, tokenizer)
        self.context = _context_length(model)
        self.slab = KVSlab()
        self.running: list[Generation] = []  # row i of the slab is running[i]
        self.waiting: collections.deque[Generation] = collections.deque()
        self.steps = 0
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- from any thread ---------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, generations: list[Generation]) -> None:
        """Queue ``generations`` (one request's choices, admitted together); QueueFull past ``max_queue``, ConfigError
        for more than the queue can ever hold (waiting cannot help it)."""
        with self._wake:
            if not self.alive():
                raise EngineStopped("the server is not running (shutting down)")
            if len(generations) > self.max_queue:
                raise ConfigError(f"the request asks for {len(generations)} sequences (prompts × n), more than the "
                                  f"server ever queues (--max-queue {self.max_queue}); send it in smaller parts")
            if len(self.waiting) + len(generations) > self.max_queue:
                raise QueueFull(f"the server is at capacity: {len(self.waiting)} requests are waiting "
                                f"(--max-queue {self.max_queue}); retry later")
            self.waiting.extend(generations)
            self._wake.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run ``fn`` in the engine's thread between two steps; its result (or error) in the Future."""
        future: Future = Future()
        self._calls.put((fn, future))
        with self._wake:
            self._wake.notify()
        return future

    def busy_adapters(self) -> set[str]:
        """Served names of the adapters running requests use."""
        return {g.adapter for g in self.running if g.adapter is not None}

    # --- the engine's thread -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self.waiting or self.running or not self._calls.empty()):
                    self._wake.wait()
                if self._stopping:
                    break
            self._run_calls()
            try:
                self._step()
            except Exception as e:  # a bug of ours: fail what is running, keep serving the rest
                self._fail_running(f"internal error: {type(e).__name__}: {e}")
        self._fail_running("the server is shutting down", 503)
        with self._wake:
            waiting, self.waiting = list(self.waiting), collections.deque()
        for g in waiting:
            self._fail(g, "the server is shutting down", 503)

    def _step(self) -> None:
        """Admit what fits, then one decode step for every running request."""
        with torch.no_grad():
            self._drop_cancelled()
            self._admit()
            self._observe()
            if self.running:
                with self.threads.step(units=len(self.running)):
                    self._decode()

    def complete(self, generations: list[Generation]) -> None:
        """Generate ``generations`` to their end in the calling thread, batched exactly as the server batches
        requests: how ``lorakit eval``, ``generate`` and finetune's evaluations decode, on an engine not started."""
        if self.alive():
            raise ConfigError("Engine.complete runs in the caller's thread: the engine must not be started")
        self.waiting.extend(generations)
        while self.waiting or self.running:
            self._step()

    def alive(self) -> bool:
        """Whether the engine's thread is running and takes requests."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def _run_calls(self) -> None:
        while not self._calls.empty():
            fn, future = self._calls.get()
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the caller, which decides what it means
                future.set_exception(e)

    def _drop_cancelled(self) -> None:
        for row in range(len(self.running) - 1, -1, -1):
            if self.running[row].cancelled:
                self._leave(row)
        with self._wake:
            if any(g.cancelled for g in self.waiting):
                self.waiting = collections.deque(g for g in self.waiting if not g.cancelled)

    def _admit(self) -> None:
        """Prefill waiting requests (oldest first) while there are free rows and their adapters fit."""
        admitted: list[Generation] = []
        skipped: list[Generation] = []
        while len(self.running) + len(admitted) < self.max_batch:
            with self._wake:
                if not self.waiting:
                    break
                g = self.waiting.popleft()
            if g.adapter is not None:
                if g.adapter not in self.adapters.paths:
                    self._fail(g, f"the adapter {g.adapter!r} is no longer served", 404)
                    continue
                try:
                    busy = self.busy_adapters() | {a.adapter for a in admitted}
                    if not self.adapters.ensure(g.adapter, busy):
                        skipped.append(g)  # every loaded adapter is busy: it waits for one to be free
                        continue
                except LorakitError as e:
                    self._fail(g, f"cannot load the adapter {g.adapter!r}: {e}", 500)
                    continue
            admitted.append(g)
        if skipped:
            with self._wake:
                self.waiting.extendleft(reversed(skipped))
        # train= copies are routed per row, never per position: their requests get rows of their own
        alone = [g for g in admitted if self._internal(g) in self.adapters.with_copies]
        packed = [g for g in admitted if self._internal(g) not in self.adapters.with_copies]
        for rows in _pack(packed, self.prefill_tokens) + [[[g] for g in group] for group in
                                                           _prefill_groups(alone, self.prefill_tokens)]:
            self._prefill(rows)

    def _prefill(self, rows: list[list[Generation]]) -> None:
        """One routed forward over prompts laid end to end in ``rows``, each attending only to itself and counting
        positions from 0, through its own adapter; each then joins the running batch."""
        from transformers import DynamicCache

        group = [g for row in rows for g in row]
        lengths = [len(g.prompt_ids) for g in group]
        width = max(sum(len(g.prompt_ids) for g in row) for row in rows)
        try:
            dtype = self.model.get_input_embeddings().weight.dtype  # the attention's (a 4-bit model's too)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            positions = torch.zeros((len(rows), width), dtype=torch.long)
            # additive: 0 where a position may attend, the dtype's minimum elsewhere (-inf would make NaN rows)
            mask = torch.full((len(rows), 1, width, width), torch.finfo(dtype).min, dtype=dtype)
            route: list[str | None] = []
            spans = []  # (row, start, end) of each prompt of ``group``
            for r, row in enumerate(rows):
                start = 0
                for g in row:
                    end = start + len(g.prompt_ids)
                    ids[r, start:end] = torch.tensor(g.prompt_ids)
                    positions[r, start:end] = torch.arange(end - start)
                    mask[r, 0, start:end, start:end].triu_(1)  # causal within the prompt
                    route += [self._internal(g)] * (end - start)
                    spans.append((r, start, end))
                    start = end
                padding = torch.arange(start, width)
                mask[r, 0, padding, padding] = 0  # padding sees itself only: no query without a key
                route += [None] * (width - start)
            if all(len(row) == 1 for row in rows):
                route = [self._internal(row[0]) for row in rows]  # one prompt a row: route per row
            ends = sorted({end - 1 for _, _, end in spans})
            cache = DynamicCache()
            with lk.route(self.model, route):
                out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                 position_ids=positions.to(self.device), use_cache=True,
                                 logits_to_keep=torch.tensor(ends, device=self.device), **{self._cache_arg: cache})
            last = torch.stack([out.logits[r, ends.index(end - 1)] for r, _, end in spans])
            for g, (r, start, end) in zip(group, spans):
                self.slab.join(cache, row=r, start=start, end=end)
                self.running.append(g)
        except Exception as e:  # a failed prefill must not stop the requests already running
            for g in group:
                if g in self.running:
                    self._leave(self.running.index(g))
                self._fail(g, f"prefill failed: {type(e).__name__}: {e}", 500)
            return
        for g in group:
            g.cached = len(g.prompt_ids)
            if g.sampling.seed is not None or g.sampling.temperature > 0:
                g.generator = torch.Generator(device=self.device)
                g.generator.manual_seed(g.sampling.seed if g.sampling.seed is not None
                                        else int(torch.randint(2 ** 62, ()).item()))
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(sum(lengths))
        tokens = self._choose(last, group)
        first = len(self.running) - len(group)
        for i in range(len(group) - 1, -1, -1):
            self._accept(first + i, tokens[i])

    def _decode(self) -> None:
        """One forward for every running request: its last token in, its next token out."""
        try:
            self.slab.prepare_step()
            rows = self.running
            ids = torch.tensor([[g.generated[-1]] for g in rows], device=self.device)
            positions = torch.tensor([[g.cached] for g in rows], device=self.device)
            with lk.route(self.model, [self._internal(g) for g in rows]):
                out = self.model(input_ids=ids, attention_mask=self.slab.mask(self.device), position_ids=positions,
                                 use_cache=True, logits_to_keep=1, **{self._cache_arg: self.slab.cache()},
                                 cache_position=torch.tensor([self.slab.n], device=self.device))
            self.slab.advance()
            tokens = self._choose(out.logits[:, -1], rows)
        except Exception as e:  # fail the batch, keep serving
            self._fail_running(f"decode step failed: {type(e).__name__}: {e}")
            return
        self.steps += 1
        for g in rows:
            g.cached += 1
        for row in range(len(rows) - 1, -1, -1):
            self._accept(row, tokens[row])

    def _choose(self, logits: torch.Tensor, rows: list[Generation]) -> list[int]:
        """Each row's next token: a sample (temperature, top-p) from the row's own generator, or the argmax; an
        argmax that the batch's summation order could flip (``_near_ties``) is taken from ``_alone``."""
        tokens = logits.argmax(-1).tolist()
        ties = _near_ties(logits, self.tie_tolerance)
        for i, g in enumerate(rows):
            if g.sampling.temperature > 0:
                tokens[i] = _sample(logits[i].float(), g.sampling, g.generator)
            elif ties[i]:
                tokens[i] = self._alone(g)
        return tokens

    def _alone(self, g: Generation) -> int:
        """The greedy next token of ``g`` from one forward of its whole sequence, by itself, through its adapter
        alone: a function of that sequence and adapter only, whatever else the engine runs."""
        model, internal = self.model, self._internal(g)
        ids = torch.tensor([g.prompt_ids + g.generated], device=self.device)
        if internal is None:
            with lk.disabled(model):
                return int(model(input_ids=ids, logits_to_keep=1).logits[0, -1].argmax())
        before = lk.active_adapters(model)
        lk.activate(model, internal)
        try:
            return int(model(input_ids=ids, logits_to_keep=1).logits[0, -1].argmax())
        finally:
            lk.activate(model, before)

    def _accept(self, row: int, token: int) -> None:
        """Give ``token`` to the request in ``row``: send the text it completes, finish it if it is done."""
        g = self.running[row]
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.observe_token(g, now)
        g.last_token_at = now
        stop_at, reason = None, None
        if token in self.eos:
            reason = "stop"
        else:
            g.generated.append(token)
        text = self.tokenizer.decode(g.generated, skip_special_tokens=True)
        hit = _first_stop(text, g.sampling.stop, g.emitted)
        if hit is not None:
            stop_at, reason = hit, "stop"
        elif reason is None and len(g.generated) >= g.sampling.max_tokens:
            reason = "length"
        if reason is None:
            ready = len(text) - _held_back(text, g.sampling.stop)
            if text.endswith("\ufffd"):  # a character whose bytes are not all out yet
                ready = min(ready, len(text) - 1)
        else:
            ready = len(text) if stop_at is None else stop_at
        if ready > g.emitted:
            g.sink({"text": text[g.emitted:ready]})
            g.emitted = ready
        if reason is not None:
            g.finished = True
            g.sink({"done": reason, "prompt_tokens": len(g.prompt_ids), "completion_tokens": len(g.generated)})
            self._leave(row)

    def _leave(self, row: int) -> None:
        self.slab.leave(row)
        last = self.running.pop()
        if row < len(self.running):
            self.running[row] = last

    def _fail_running(self, message: str, status: int = 500) -> None:
        for g in self.running:
            if not g.finished:
                self._fail(g, message, status)
        self.running, self.slab = [], KVSlab()

    def _fail(self, g: Generation, message: str, status: int) -> None:
        g.finished = True
        g.sink({"error": message, "status": status})

    def _internal(self, g: Generation) -> str | None:
        return None if g.adapter is None else self.adapters.internal[g.adapter]

    def _observe(self) -> None:
        if self.metrics is not None:
            self.metrics.observe_state(self)


def _pack(generations: list[Generation], budget: int, width: int = PACK_WIDTH) -> list[list[list[Generation]]]:
    """``generations`` as prefill forwards, each a list of rows of prompts laid end to end: first fit by
    decreasing length into rows of ``width`` tokens (a longer prompt: a row of its own), and rows into forwards
    of at most ``budget`` positions (rows × the fullest row's tokens; one row at least)."""
    rows: list[list[Generation]] = []
    used: list[int] = []
    for g in sorted(generations, key=lambda g: -len(g.prompt_ids)):
        n = len(g.prompt_ids)
        fit = next((i for i, u in enumerate(used) if u + n <= width), None)
        if fit is None:
            rows.append([g])
            used.append(n)
        else:
            rows[fit].append(g)
            used[fit] += n
    forwards: list[list[list[Generation]]] = []
    widest = 0  # the current forward's fullest row
    for row, n in zip(rows, used):
        if forwards and (len(forwards[-1]) + 1) * max(widest, n) <= budget:
            forwards[-1].append(row)
            widest = max(widest, n)
        else:
            forwards.append([row])
            widest = n
    return forwards


def _prefill_groups(generations: list[Generation], budget: int) -> list[list[Generation]]:
    """``generations`` in prefill batches: by length, each at most ``budget`` padded positions (one prompt at
    least) and at most a third padding, so that no batch computes much that it throws away."""
    groups: list[list[Generation]] = []
    for g in sorted(generations, key=lambda g: len(g.prompt_ids)):
        group = groups[-1] if groups else None
        if group is not None:
            width, real = len(g.prompt_ids), sum(len(x.prompt_ids) for x in group) + len(g.prompt_ids)
            if width * (len(group) + 1) <= budget and real >= width * (len(group) + 1) * 2 / 3:
                group.append(g)
                continue
        groups.append([g])
    return groups


def _near_ties(logits: torch.Tensor, tolerance: float = TIE_TOLERANCE) -> list[bool]:
    """Per row, whether its two best logits are closer than ``tolerance`` (relative to the best; ``TIE_TOLERANCES``
    for a 16-bit model).

    Batched matmuls sum in an order that depends on the batch's shape (MKL's sgemm gives a row other bits at
    other row counts), which moves a logit by about 1e-6 of its size. A greedy choice with a wider margin is the
    same in any batch; a closer one is decided by ``Engine._alone``.
    """
    top = logits.float().topk(2, dim=-1).values
    return ((top[:, 0] - top[:, 1]) <= tolerance * top[:, 0].abs().clamp(min=1.0)).tolist()


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p  # keeps the token that crosses top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _first_stop(text: str, stops: tuple[str, ...], emitted: int) -> int | None:
    """Where the first stop string starts in ``text`` (searching from what may still hold one), or None."""
    starts = [i for s in stops for i in [text.find(s, max(0, emitted - len(s)))] if i >= 0]
    return min(starts, default=None)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that could be the start of a stop string, kept until they are not."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return {i for i in ids if i is not None}


def _context_length(model) -> int:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise ConfigError(f"{type(model).__name__}: its config gives no context length (max_position_embeddings)")
