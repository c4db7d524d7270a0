"""Torch's CPU thread count for a loop of steps: fixed (``--threads N``), or chosen by timing the steps (``auto``).

Torch runs an op on one OpenMP thread per core by default, and each parallel region ends at a barrier where the
threads that are done spin for the others. On a CPU that other processes also keep busy, a thread whose core
another process holds arrives late at every barrier, and a decode step has hundreds of them: on 2 cores with two
busy-loop processes, ``lorakit serve`` with torch's 2 threads decoded about ten times slower than with one
(BENCHMARKS.md). On a quiet machine one thread is the slower choice. vLLM's CPU backend drops its engine to one
torch thread; lorakit measures instead (``Threads``): it starts at torch's count and now and then runs a few
steps at a neighbouring count, each between two steps at the current one (a step apart, so the same work), and
keeps whichever was faster per unit of work (a decode step's rows). The wait policy (``OMP_WAIT_POLICY``) is
left as it is: libgomp reads it once, when torch loads, and a passive wait slows every quiet step.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, Sequence

import torch

from lorakit.errors import ConfigError

# Steps at the start that are not timed: the first ones allocate and warm the caches.
WARMUP_STEPS = 2
# A probe: up to this many steps at the other count, each right after one at the current count ...
PROBE_STEPS = 3
# ... and at least this many before it decides. One step can be slow for reasons of its own (a greedy near-tie
# decided by a forward of the request alone, a KV buffer that grows, a moment of another process's), so a count's
# pace is its fastest step's seconds per unit, and one step alone never decides.
DECIDE_AFTER = 2
# A pace this many times faster (or slower) than the current count's decides at DECIDE_AFTER steps: beside busy
# processes a two-thread step takes several times a one-thread one, and the probe stops paying for it.
CLEAR = 1.5
# A probed step this many times slower than the current count's pace ends the probe at once: beside busy processes a
# step at two threads took fifteen times one at one thread (BENCHMARKS.md), and each more such step costs as much
# again. A faster count's step slowed this much by something of its own is rare (one slowed less still needs
# DECIDE_AFTER steps); mistaking it costs an interval at the slower count.
CUT = 4.0
# Otherwise the other count is taken when its pace is below this share of the current count's: a smaller
# difference is within the noise of a shared machine, and switching back and forth on it gains nothing.
MARGIN = 0.95
# A probe costs what its steps at the slower count take beyond the faster count's pace. The next probe waits until
# that cost (as the last probe measured it) is at most this share of the time between them: probing costs about
# 1% of throughput, quiet or loaded ...
OVERHEAD = 0.01
# ... and at least this long, at most this long (seconds): a machine whose load changed is noticed within the
# interval plus a probe (the long ones are those where probing the other count is expensive: under contention).
MIN_INTERVAL, MAX_INTERVAL = 2.0, 300.0


def parse(setting: str | int) -> int | None:
    """``--threads``: a thread count (>= 1), or None for ``auto``; a ConfigError for anything else."""
    text = str(setting).strip().lower()
    if text == "auto":
        return None
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"--threads must be 'auto' or a thread count >= 1, got {setting!r}")
    return count


def candidates(top: int) -> list[int]:
    """The thread counts ``auto`` chooses among: ``top`` (torch's own count) and its halvings down to 1."""
    counts = [top]
    while counts[-1] > 1:
        counts.append(counts[-1] // 2)
    return counts


def threads_for(setting: str | int, device) -> "Threads":
    """The ``Threads`` of ``--threads`` for a model on ``device``: ``auto`` chooses among ``candidates`` of torch's
    count on the CPU, and leaves torch's count as it is elsewhere (the accelerator does the work)."""
    count = parse(setting)
    if count is not None:
        return Threads([count])
    if torch.device(device).type != "cpu":
        return Threads()
    return Threads(candidates(torch.get_num_threads()))


class Threads:
    """Sets torch's thread count for each step of a loop (``with threads.step(units): ...``) and, given more than
    one count, chooses among them by timing the steps (see the module docstring).

    ``counts``: the counts to choose among, the first to start with; one fixes it, none leaves torch's count as it
    is. Use one ``Threads`` from one thread: torch's count (OpenMP's and MKL's) is per thread, so it is set in the
    thread that runs the steps.
    """

    def __init__(self, counts: Sequence[int] = (), *, clock: Callable[[], float] = time.perf_counter,
                 set_threads: Callable[[int], None] | None = None):
        self.counts = list(counts)
        self.current = 0  # index into counts: the count steps run at between probes
        self._clock, self._set_threads = clock, set_threads or torch.set_num_threads
        self._callers = torch.get_num_threads()
        self._steps = 0
        self._next_probe = -float("inf")
        self._direction = 1  # the neighbour probed next: 1 fewer threads, -1 more
        # the probe under way: the index probed, the steps left (indices), seconds per unit at the current count
        # and (seconds per unit, units) at the probed one
        self._probed: int | None = None
        self._plan: list[int] = []
        self._paces: list[float] = []
        self._probe_paces: list[tuple[float, int]] = []

    @property
    def count(self) -> int | None:
        """The thread count steps run at between probes (None: torch's, left as it is)."""
        return self.counts[self.current] if self.counts else None

    def restore(self) -> None:
        """Set the calling thread's torch thread count back to what it was when this was made (for a caller that goes
        on to other work after the loop)."""
        if self.counts:
            self._set_threads(self._callers)

    @contextlib.contextmanager
    def step(self, units: int = 1) -> Iterator[None]:
        """Run one step of ``units`` units of work (a decode step's rows) at the count chosen for it, timed when it
        is part of a probe."""
        if not self.counts:
            yield
            return
        index = self._index_for_step() if len(self.counts) > 1 else 0
        self._set_threads(self.counts[index])  # every step (0.6 µs): whatever else set it meanwhile
        if self._probed is None:
            yield
            return
        start = self._clock()
        try:
            yield
        except BaseException:
            self._plan, self._probed = [], None  # a step that failed measured nothing: the probe is dropped
            raise
        self._timed(index, (self._clock() - start) / max(units, 1), max(units, 1))

    def _index_for_step(self) -> int:
        self._steps += 1
        if not self._plan and self._steps > WARMUP_STEPS and self._clock() >= self._next_probe:
            self._start_probe()
        return self._plan.pop(0) if self._plan else self.current

    def _start_probe(self) -> None:
        other = self.current + self._direction
        if not 0 <= other < len(self.counts):
            self._direction = -self._direction
            other = self.current + self._direction
        self._probed, self._paces, self._probe_paces = other, [], []
        # every probed step right after one at the current count: the two do the same work, or nearly
        self._plan = [self.current] + [other, self.current] * PROBE_STEPS

    def _timed(self, index: int, pace: float, units: int) -> None:
        if index == self.current:
            self._paces.append(pace)
            if not self._plan:
                self._decide()
            return
        self._probe_paces.append((pace, units))
        mine, probed = min(self._paces), min(p for p, _ in self._probe_paces)
        clear = probed * CLEAR <= mine or probed >= mine * CLEAR
        if probed >= mine * CUT or (clear and len(self._probe_paces) >= DECIDE_AFTER):
            self._decide()

    def _decide(self) -> None:
        """End the probe: switch to the probed count if its pace was faster, and schedule the next probe."""
        mine, probed = min(self._paces), min(p for p, _ in self._probe_paces)
        if probed < mine * MARGIN:
            self.current = self._probed
        else:
            self._direction = -self._direction
        # What the probe's steps took beyond the faster count's pace, or (after a switch) would have: the cost of
        # the next probe, which runs the slower count as long.
        excess = sum(abs(probed - mine) * units for _, units in self._probe_paces)
        self._plan, self._probed = [], None
        self._next_probe = self._clock() + min(max(excess / OVERHEAD, MIN_INTERVAL), MAX_INTERVAL)
