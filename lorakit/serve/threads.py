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
import statistics
import time
from typing import Callable, Iterator, Sequence

import torch

from lorakit.errors import ConfigError

# Steps at the start that are not timed: the first ones allocate and warm the caches.
WARMUP_STEPS = 2
# A probe: this many steps at the other count, each followed by one at the current count.
PROBE_STEPS = 3
# One probe step this many times faster (or slower) per unit than the current count's step before it decides at
# once: under contention a two-thread step can take ten times a one-thread one, and the probe stops paying for it.
CLEAR = 1.5
# The other count is taken when its median per unit is below this share of the current count's: a smaller
# difference is within the noise of a shared machine, and switching back and forth on it gains nothing.
MARGIN = 0.95
# A probe costs what its steps at the slower count take beyond the faster count's pace. The next probe waits until
# that cost (as the last probe measured it) is at most this share of the time between them: probing costs about
# 1% of throughput, quiet or loaded ...
OVERHEAD = 0.01
# ... and at least this long, at most this long (seconds): a machine whose load changed is noticed within
# MAX_INTERVAL plus a probe.
MIN_INTERVAL, MAX_INTERVAL = 2.0, 120.0


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
        before = self._paces[-1]
        if pace * CLEAR <= before or pace >= before * CLEAR:
            self._decide()

    def _decide(self) -> None:
        """End the probe: switch to the probed count if it was faster per unit, and schedule the next probe."""
        pace = statistics.median(self._paces)
        if statistics.median(p for p, _ in self._probe_paces) < pace * MARGIN:
            self.current = self._probed
        else:
            self._direction = -self._direction
        # What the probe's steps took beyond the faster count's pace, or (after a switch) would have: the cost of
        # the next probe, which runs the slower count as long.
        excess = sum(abs(p - pace) * units for p, units in self._probe_paces)
        self._plan, self._probed = [], None
        self._next_probe = self._clock() + min(max(excess / OVERHEAD, MIN_INTERVAL), MAX_INTERVAL)
