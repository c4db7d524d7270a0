"""``--threads``: torch's thread count for the engine's and the trainer's steps, fixed or chosen by timing them.

The chooser runs on a fake machine (a clock that each step advances by what that step costs at the count set),
so every decision is deterministic; nothing here is timed.
"""

from __future__ import annotations

import threading

import pytest
import torch

from lorakit import cli
from lorakit.errors import ConfigError
from lorakit.serve import threads as th
from lorakit.serve.engine import Adapters, Engine, Generation, Sampling
from lorakit.serve.threads import Threads, candidates, parse, threads_for
from lorakit.train import config as cfg
from lorakit.train import models
from lorakit.train.trainer import finetune
from test_train import _config, save_tiny_model


class Machine:
    """A fake clock and thread setting: a step at n threads takes ``per_step`` seconds plus ``cost[n]`` per unit of
    work, times ``spikes[i]`` for the i-th step (from 0)."""

    def __init__(self, cost: dict[int, float], per_step: float = 0.0, spikes: dict[int, float] | None = None):
        self.cost, self.per_step, self.spikes = dict(cost), per_step, spikes or {}
        self.now, self.threads, self.steps = 0.0, None, 0

    def clock(self) -> float:
        return self.now

    def set_threads(self, n: int) -> None:
        self.threads = n

    def chooser(self, counts) -> Threads:
        return Threads(counts, clock=self.clock, set_threads=self.set_threads)

    def run(self, threads: Threads, steps: int, units: int = 1) -> list[int]:
        """Run ``steps`` steps; the thread count each ran at."""
        ran = []
        for _ in range(steps):
            with threads.step(units):
                self.now += (self.per_step + self.cost[self.threads] * units) * self.spikes.get(self.steps, 1.0)
            ran.append(self.threads)
            self.steps += 1
        return ran

    def run_for(self, threads: Threads, seconds: float, units: int = 1) -> list[int]:
        ran, end = [], self.now + seconds
        while self.now < end:
            ran += self.run(threads, 1, units)
        return ran


# seconds per row of a decode step (a step of 8 rows takes 0.4 s quiet at two threads)
QUIET = {2: 0.05, 1: 0.065}  # one thread is slower on a quiet machine, by less than CLEAR
BUSY = {2: 0.5, 1: 0.05}  # two threads wait at every barrier for a core another process holds


def test_quiet_keeps_torchs_count_and_probing_costs_about_one_percent():
    machine = Machine(QUIET)
    threads = machine.chooser([2, 1])
    ran = machine.run(threads, 3 + 2 * th.PROBE_STEPS)
    assert ran == [2, 2] + [2] + [1, 2] * th.PROBE_STEPS  # warm-up, then the probe: each step at 1 after one at 2
    assert threads.count == 2
    ran = machine.run_for(threads, 3600)
    spent = sum(QUIET[n] for n in ran)
    assert threads.count == 2 and spent <= 1.015 * len(ran) * QUIET[2]


def test_under_contention_two_probe_steps_switch_and_it_stays():
    machine = Machine(BUSY)
    threads = machine.chooser([2, 1])
    assert machine.run(threads, 7) == [2, 2, 2, 1, 2, 1, 1]  # ten times faster: decided at DECIDE_AFTER steps
    ran = machine.run_for(threads, 3600)
    assert threads.count == 1
    assert sum(BUSY[n] for n in ran) <= 1.02 * len(ran) * BUSY[1]  # the probes of two threads cost ~1%


def test_a_probe_far_slower_ends_at_its_first_step():
    machine = Machine(BUSY)
    threads = machine.chooser([2, 1])
    machine.run(threads, 7)
    assert threads.count == 1
    machine.now += th.MAX_INTERVAL  # the next step starts a probe of two threads: one step of it, ten times slower
    assert machine.run(threads, 4) == [1, 2, 1, 1] and threads.count == 1


def test_a_clearly_slower_probe_is_cut_short():
    machine = Machine({2: 0.05, 1: 0.06 * th.CLEAR})
    threads = machine.chooser([2, 1])
    assert machine.run(threads, 8) == [2, 2, 2, 1, 2, 1, 2, 2]


@pytest.mark.parametrize("spike", [3, 4])  # the first probed step, or the current count's step after it
def test_one_slow_step_decides_nothing(spike):
    # a step twenty times its cost (greedy near-ties decided by forwards of their requests alone, say): beside busy
    # processes one thread still wins, on a quiet machine two threads still stay
    for cost, chosen in ((BUSY, 1), (QUIET, 2)):
        machine = Machine(cost, spikes={spike: 20.0})
        threads = machine.chooser([2, 1])
        machine.run(threads, 3 + 2 * th.PROBE_STEPS + 1)
        assert threads.count == chosen


def test_it_follows_the_machine_as_other_processes_come_and_go():
    machine = Machine(QUIET)
    threads = machine.chooser([2, 1])
    machine.run_for(threads, 600)
    machine.cost = dict(BUSY)
    machine.run_for(threads, th.MAX_INTERVAL + 20)
    assert threads.count == 1
    machine.cost = dict(QUIET)
    machine.run_for(threads, th.MAX_INTERVAL + 20)
    assert threads.count == 2


def test_a_difference_within_the_margin_switches_nothing():
    machine = Machine({2: 1.0, 1: 0.97})
    threads = machine.chooser([2, 1])
    machine.run_for(threads, 3600)
    assert threads.count == 2


def test_steps_are_compared_per_unit_of_work():
    # the probed count's steps carry four times the rows: each takes longer, but is faster per row
    for cost, chosen in (({2: 0.05, 1: 0.04}, 1), ({2: 0.05, 1: 0.05}, 2)):
        machine = Machine(cost)
        threads = machine.chooser([2, 1])
        ran = []
        for units in [1, 1, 1] + [4, 1] * th.PROBE_STEPS:
            ran += machine.run(threads, 1, units=units)
        assert ran == [2, 2, 2] + [1, 2] * th.PROBE_STEPS and threads.count == chosen


def test_a_probe_compares_steps_a_step_apart_never_an_older_one():
    # either count takes 0.1 s a step plus 1 ms a row: per row, a step of 64 rows is far cheaper than one of 1
    for before, after in ((1, 64), (64, 1)):
        machine = Machine({2: 0.001, 1: 0.001}, per_step=0.1)
        threads = machine.chooser([2, 1])
        machine.run(threads, 10, units=before)
        machine.now += 1000  # idle: the next step starts a probe, at another batch size
        machine.run(threads, 10, units=after)
        assert threads.count == 2


def test_it_walks_the_halvings_to_the_fastest_count():
    machine = Machine({8: 4.0, 4: 2.0, 2: 1.0, 1: 1.5})
    threads = machine.chooser(candidates(8))
    machine.run_for(threads, 3600)
    assert threads.count == 2


def test_a_step_that_raises_is_not_timed():
    machine = Machine(QUIET)
    threads = machine.chooser([2, 1])
    machine.run(threads, 3)
    with pytest.raises(RuntimeError):
        with threads.step():  # the probe's first step at one thread fails at once: that is no fast step
            machine.now += 0.01
            raise RuntimeError("a failed step")
    assert machine.run(threads, 2 * th.PROBE_STEPS + 1) == [2] + [1, 2] * th.PROBE_STEPS  # the probe again
    assert threads.count == 2


def test_a_fixed_count_is_set_for_every_step_untimed_and_no_count_is_never_set():
    calls = []
    fixed = Threads([3], set_threads=calls.append, clock=lambda: pytest.fail("a fixed count times nothing"))
    for _ in range(10):
        with fixed.step(4):
            pass
    assert calls == [3] * 10 and fixed.count == 3
    left = Threads(set_threads=calls.append)
    with left.step():
        pass
    assert calls == [3] * 10 and left.count is None


def test_the_setting_and_the_counts_it_chooses_among():
    assert parse("auto") is None and parse("AUTO") is None and parse("3") == 3 and parse(2) == 2
    for bad in ("0", "-1", "1.5", "many", ""):
        with pytest.raises(ConfigError, match="--threads"):
            parse(bad)
    assert candidates(1) == [1] and candidates(2) == [2, 1] and candidates(6) == [6, 3, 1]
    assert threads_for("auto", "cpu").counts == candidates(torch.get_num_threads())
    assert threads_for("auto", torch.device("meta")).counts == []  # an accelerator's: torch's count left alone
    assert threads_for("4", "meta").counts == [4]


def test_bad_threads_are_config_errors_before_anything_loads(capsys, tmp_path):
    with pytest.raises(ConfigError, match="--threads"):
        cfg.FinetuneConfig(threads="none").check()
    missing = tmp_path / "no-model-here"  # the flag is refused before the model would be looked for
    assert cli.main(["serve", "--threads", "0", "--model", str(missing)]) == 2
    assert "--threads must be 'auto' or a thread count >= 1" in capsys.readouterr().err


class Recorded(Threads):
    """A fixed count that records each step's units and the thread that set the count."""

    def __init__(self, count: int):
        super().__init__([count], set_threads=self._record)
        self.units: list[int] = []
        self.set_in: list[int] = []

    def _record(self, n: int) -> None:
        self.set_in.append(threading.get_ident())

    def step(self, units: int = 1):
        self.units.append(units)
        return super().step(units)


def test_the_engine_sets_the_count_in_its_own_thread_and_times_each_decode_step_by_its_rows(tmp_path):
    model, tokenizer = models.load(str(save_tiny_model(tmp_path / "tiny")), log=lambda m: None)
    recorded = Recorded(1)
    engine = Engine(model, tokenizer, Adapters(model, 1), threads=recorded)
    done: dict[int, dict] = {}
    generations = [Generation([5 + i, 6, 7], None, Sampling(max_tokens=n), lambda e, i=i: done.update({i: e}))
                   for i, n in enumerate([2, 3, 5])]
    worker = threading.Thread(target=engine.complete, args=(generations,))
    worker.start()
    worker.join()
    # a request's first token comes from its prefill, each further one (an end-of-sequence too) from a decode step
    steps = [g.sampling.max_tokens - 1 if done[i]["done"] == "length" else len(g.generated)
             for i, g in enumerate(generations)]
    assert recorded.units == [sum(s > k for s in steps) for k in range(max(steps))]
    assert set(recorded.set_in) == {worker.ident}


def test_finetune_runs_its_steps_and_its_scoring_at_threads_and_gives_the_caller_its_count_back(tmp_path, monkeypatch):
    calls, real = [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    before = torch.get_num_threads()
    n = before + 1
    finetune(_config(save_tiny_model(tmp_path / "tiny"), tmp_path / "run", threads=str(n), steps=3, save_every=0),
             log=lambda m: None)
    scoring = len(calls) - 5  # the decode steps of the final evaluation
    assert scoring > 0 and calls == [n] * 3 + [before] + [n] * scoring + [before]
    assert torch.get_num_threads() == before
