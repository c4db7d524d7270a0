"""Serving on a shared CPU (issue 22, finding 6): decode throughput quiet and beside busy-loop processes, with
``--threads auto`` against torch's default thread count.

    python benchmarks/bench_contention.py [--rows 16] [--tokens 48] [--rounds 3] [--competitors 2]
                                          [--run-seconds 30] [--phase 60] [--recover 360]
                                          [--sections steady,arrive,policy]
                                          [--wait-quiet SECONDS] [--json PATH]

Model: the embedded SmolLM2-135M-Instruct (float32, CPU), no adapter. Workload: ``--rows`` requests, each a
prompt of 32 random token ids (fixed seed) and ``--tokens`` greedy tokens (end-of-sequence ignored, so every run
does the same steps), decoded together by the server's engine (``Engine._step``: admission, packed prefill,
decode steps), from a fresh engine each run, as a server started then would. Throughput: tokens generated over
the run's wall time; a run stops after ``--run-seconds`` (and counts what it generated), so a slow contender
cannot hold the benchmark for minutes. Competitors: ``--competitors`` processes of ``while True: pass``
(each ends itself after the section's time, and is killed after its block).

Contenders: ``default``, torch's thread count fixed (what ``lorakit serve`` did before ``--threads``: one per
core); ``auto``, ``--threads auto`` (``lorakit/serve/threads.py``); ``1``, one thread fixed (vLLM's CPU choice).

  1. steady: ``--rounds`` rounds of {quiet, busy} (the order alternating), every contender once per condition,
     interleaved (the order alternating). ``auto`` is a server that has been running in the condition: one
     chooser per condition, kept across that condition's runs, after an untimed run in its first block (which
     also takes the first forwards' allocations); how fast it adapts is section 2's. Reported: median
     tokens/s per contender and condition; / default's quiet and / default in the same condition, each the median
     over rounds of the ratio within a round (the host's own speed drifts over minutes), the thread
     count auto ran at after each run, whether every run's answers are the same tokens, and the load
     meanwhile: the cores the competitors used and the cores other processes used ("other load", as
     bench_core.py).
  2. arrive: one engine with ``auto`` decoding without a break while the load changes under it: ``--phase``
     seconds quiet, then busy, then ``--recover`` seconds quiet again. Reported: tokens/s per phase, and how long after the
     competitors started (stopped) auto moved to fewer (more) threads.
  3. policy: torch's count fixed, with libgomp's wait policy as it is (threads that wait spin a while first)
     and with ``OMP_WAIT_POLICY=PASSIVE`` (they sleep at once), quiet and busy, each policy in a process of its
     own (libgomp reads it once, when torch loads), ``--rounds`` rounds in alternating order.

Targets: busy >= 0.4x quiet with auto (against default's quiet, today's), and auto's quiet throughput within 5%
of default's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
from bench_core import ForeignLoad, wait_quiet  # noqa: E402
from lorakit.serve.engine import Adapters, Engine, Generation, Sampling  # noqa: E402
from lorakit.serve.threads import Threads, threads_for  # noqa: E402
from lorakit.train import models  # noqa: E402

PROMPT_TOKENS = 32
TORCH_THREADS = torch.get_num_threads()  # torch's default, read before anything sets it


class Competitors:
    """``n`` busy-loop processes while the block runs (each ends itself after ``limit`` seconds regardless), and
    the cores they used over the block's ``mark()`` intervals."""

    def __init__(self, n: int, limit: float):
        self.n, self.limit, self.procs = n, limit, []

    def __enter__(self):
        loop = f"import time\nend = time.time() + {self.limit}\nwhile time.time() < end: pass"
        self.procs = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(self.n)]
        time.sleep(0.5)  # running before the first step
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()

    def cpu_seconds(self) -> float:
        total = 0
        for p in self.procs:
            with contextlib.suppress(OSError), open(f"/proc/{p.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / os.sysconf("SC_CLK_TCK")


def prompts(rows: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(100, 40000, (PROMPT_TOKENS,), generator=generator).tolist() for _ in range(rows)]


def run(model, tokenizer, threads: Threads, args, competitors: Competitors | None) -> dict:
    """Decode the workload on a fresh engine with ``threads``; tokens/s, answers and the load meanwhile."""
    engine = Engine(model, tokenizer, Adapters(model, 1), max_batch=args.rows, threads=threads)
    engine.eos = set()  # every request runs --tokens steps
    generations = [Generation(p, None, Sampling(max_tokens=args.tokens), lambda e: None) for p in prompts(args.rows)]
    engine.waiting.extend(generations)
    torch.set_num_threads(threads.count)  # the first prefill runs before the first decode step sets it
    before = competitors.cpu_seconds() if competitors else 0.0
    with ForeignLoad() as load:
        start = time.perf_counter()
        while (engine.waiting or engine.running) and time.perf_counter() - start < args.run_seconds:
            engine._step()
        wall = time.perf_counter() - start
        theirs = (competitors.cpu_seconds() - before) / wall if competitors else 0.0
    tokens = sum(len(g.generated) for g in generations)
    return {"tokens_per_s": tokens / wall, "tokens": tokens, "seconds": wall, "threads": threads.count,
            "answers": [g.generated for g in generations], "competitor_cores": theirs,
            "other_cores": max(0.0, load.cores - theirs)}


def steady(model, tokenizer, args) -> tuple[list[dict], dict]:
    names = ["default", "auto", "1"]
    runs: dict[tuple[str, str], list[dict]] = {}
    # auto as a server that has been running in the condition: one chooser per condition, kept across its runs
    # (settled by an untimed run first); the fixed counts are set afresh each run
    choosers = {"quiet": threads_for("auto", "cpu"), "busy": threads_for("auto", "cpu")}
    threads_of = {"default": lambda condition: Threads([TORCH_THREADS]), "auto": choosers.__getitem__,
                  "1": lambda condition: Threads([1])}
    for r in range(args.rounds):
        for condition in (("quiet", "busy") if r % 2 == 0 else ("busy", "quiet")):
            busy = condition == "busy"
            if not busy:
                wait_quiet(args.wait_quiet)
            limit = (len(names) + 1) * args.run_seconds + 60
            with Competitors(args.competitors, limit) if busy else contextlib.nullcontext() as competitors:
                if r < 2:  # the condition's first block: also the first forwards' allocations
                    run(model, tokenizer, choosers[condition], args, competitors)
                for name in (names if r % 2 == 0 else names[::-1]):
                    out = run(model, tokenizer, threads_of[name](condition), args, competitors)
                    runs.setdefault((name, condition), []).append(out)
                    print(f"round {r + 1} {condition:5s} {name:7s} {out['tokens_per_s']:7.1f} tokens/s "
                          f"({out['tokens']} in {out['seconds']:.1f} s, {out['threads']} threads at the end; "
                          f"competitors {out['competitor_cores']:.2f} cores, other load {out['other_cores']:.2f})",
                          file=sys.stderr, flush=True)
    def paired(name: str, condition: str, against: str) -> float:
        """The median over rounds of a run's tokens/s over default's in condition ``against`` of the same round: the
        machine's own speed drifts by tens of percent over minutes (a shared host), a round's runs are minutes apart."""
        return statistics.median(o["tokens_per_s"] / d["tokens_per_s"]
                                 for o, d in zip(runs[name, condition], runs["default", against]))

    rows = []
    for (name, condition), outs in runs.items():
        rate = statistics.median(o["tokens_per_s"] for o in outs)
        rows.append({"contender": name, "condition": condition, "tokens_per_s": rate,
                     "vs_default_quiet": paired(name, condition, "quiet"),
                     "vs_default": paired(name, condition, condition),
                     "threads_at_end": "/".join(str(o["threads"]) for o in outs),
                     "competitor_cores": statistics.mean(o["competitor_cores"] for o in outs),
                     "other_cores": statistics.mean(o["other_cores"] for o in outs),
                     "runs": [{k: v for k, v in o.items() if k != "answers"} for o in outs]})
    rows.sort(key=lambda row: (row["condition"] != "quiet", names.index(row["contender"])))
    # the same tokens from every run (a run cut short by --run-seconds: the tokens it got to)
    answers = [o["answers"] for outs in runs.values() for o in outs]
    same = all(a[:len(b)] == b[:len(a)] for run_a in answers for run_b in answers for a, b in zip(run_a, run_b))
    return rows, {"identical_answers": same}


def arrive(model, tokenizer, args) -> dict:
    """One engine with auto through quiet, busy, quiet phases of ``--phase`` seconds: tokens/s per phase and when
    auto moved."""
    wait_quiet(args.wait_quiet)
    torch.set_num_threads(TORCH_THREADS)  # auto chooses among torch's count and fewer: the count as a server starts
    threads = threads_for("auto", "cpu")
    engine = Engine(model, tokenizer, Adapters(model, 1), max_batch=args.rows, threads=threads)
    engine.eos = set()
    engine.waiting.extend(Generation(p, None, Sampling(max_tokens=10 ** 9), lambda e: None) for p in prompts(args.rows))
    phases = []
    for name, seconds in (("quiet", args.phase), ("busy", args.phase), ("quiet again", args.recover)):
        busy = name == "busy"
        with Competitors(args.competitors, seconds + 60) if busy else contextlib.nullcontext():
            steps, start, was, moved = 0, time.perf_counter(), threads.count, None
            while time.perf_counter() - start < seconds:
                engine._step()
                steps += 1
                if moved is None and threads.count != was and phases:
                    moved = time.perf_counter() - start
        phases.append({"phase": name, "tokens_per_s": steps * args.rows / (time.perf_counter() - start),
                       "threads_at_end": threads.count, **({} if moved is None else {"moved_after_s": moved})})
        print(f"{name}: {phases[-1]['tokens_per_s']:.1f} tokens/s, threads at the end {threads.count}"
              + ("" if moved is None else f", moved after {moved:.1f} s"), file=sys.stderr, flush=True)
    return {"phases": phases}


def policy(args) -> list[dict]:
    """Tokens/s at torch's count quiet and busy, per wait policy, each run in a child process."""
    runs: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for name in (("as is", "PASSIVE") if r % 2 == 0 else ("PASSIVE", "as is")):
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if name == "PASSIVE":
                env["OMP_WAIT_POLICY"] = "PASSIVE"
            wait_quiet(args.wait_quiet)
            child = [sys.executable, __file__, "--policy-child", "--rows", str(args.rows), "--tokens",
                     str(args.tokens), "--run-seconds", str(args.run_seconds), "--competitors", str(args.competitors)]
            out = json.loads(subprocess.run(child, env=env, check=True, capture_output=True, text=True)
                             .stdout.strip().splitlines()[-1])
            runs.setdefault(name, []).append(out)
            print(f"round {r + 1} wait policy {name}: quiet {out['quiet']:.1f}, busy {out['busy']:.1f} tokens/s "
                  f"(other load {out['other_cores']:.2f})", file=sys.stderr, flush=True)
    rows = []
    for name, outs in runs.items():
        quiet, busy = (statistics.median(o[c] for o in outs) for c in ("quiet", "busy"))
        rows.append({"policy": name, "quiet": quiet, "busy": busy, "busy_vs_quiet": busy / quiet,
                     "other_cores": statistics.mean(o["other_cores"] for o in outs)})
    return rows


def policy_child(args) -> None:
    """One process of section 3: a warm-up, then a quiet run and a busy run at torch's count; JSON on stdout."""
    model, tokenizer = models.load(None, log=lambda m: None)
    model.eval()
    run(model, tokenizer, Threads([TORCH_THREADS]), args, None)
    quiet = run(model, tokenizer, Threads([TORCH_THREADS]), args, None)
    with Competitors(args.competitors, args.run_seconds + 60) as competitors:
        busy = run(model, tokenizer, Threads([TORCH_THREADS]), args, competitors)
    print(json.dumps({"quiet": quiet["tokens_per_s"], "busy": busy["tokens_per_s"],
                      "other_cores": (quiet["other_cores"] + busy["other_cores"]) / 2}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16, help="requests decoded together")
    parser.add_argument("--tokens", type=int, default=48, help="tokens generated per request")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--competitors", type=int, default=2, help="busy-loop processes in the busy condition")
    parser.add_argument("--run-seconds", type=float, default=30.0, help="a run stops after this long")
    parser.add_argument("--phase", type=float, default=60.0, help="arrive: seconds of the quiet and busy phases")
    parser.add_argument("--recover", type=float, default=360.0,
                        help="arrive: seconds of the last, quiet phase (auto probes more threads at most every "
                             "threads.MAX_INTERVAL seconds)")
    parser.add_argument("--sections", default="steady,arrive,policy")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each quiet block wait up to this long for other processes to go idle")
    parser.add_argument("--json", default="benchmarks/results/contention.json")
    parser.add_argument("--policy-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.policy_child:
        return policy_child(args)

    model, tokenizer = models.load(None, log=lambda m: print(m, file=sys.stderr))
    model.eval()
    results: dict = {"cores": os.cpu_count(), "torch_threads": TORCH_THREADS,
                     "loadavg_before": os.getloadavg()}
    sections = args.sections.split(",")
    if "steady" in sections:
        results["steady"], results["steady_check"] = steady(model, tokenizer, args)
        print(harness.table(results["steady"], [
            ("condition", "condition", ""), ("contender", "threads", ""), ("tokens_per_s", "tokens/s", ".1f"),
            ("vs_default_quiet", "/ default quiet", ".2f"), ("vs_default", "/ default", ".2f"),
            ("threads_at_end", "threads after", ""), ("competitor_cores", "competitors", ".2f"),
            ("other_cores", "other load", ".2f")]))
        print(f"identical answers across every run: {results['steady_check']['identical_answers']}")
        by = {(r["contender"], r["condition"]): r for r in results["steady"]}
        results["targets"] = [
            {"target": "auto busy >= 0.4x default quiet", "value": by["auto", "busy"]["vs_default_quiet"],
             "met": by["auto", "busy"]["vs_default_quiet"] >= 0.4},
            {"target": "auto quiet >= 0.95x default quiet", "value": by["auto", "quiet"]["vs_default"],
             "met": by["auto", "quiet"]["vs_default"] >= 0.95}]
        for t in results["targets"]:
            print(f"{t['target']}: {t['value']:.2f} {'met' if t['met'] else 'NOT met'}")
    if "arrive" in sections:
        results["arrive"] = arrive(model, tokenizer, args)
        print(harness.table(results["arrive"]["phases"], [
            ("phase", "phase", ""), ("tokens_per_s", "tokens/s", ".1f"), ("threads_at_end", "threads at end", ""),
            ("moved_after_s", "auto moved after s", ".1f")]))
    if "policy" in sections:
        results["policy"] = policy(args)
        print(harness.table(results["policy"], [
            ("policy", "wait policy", ""), ("quiet", "quiet tokens/s", ".1f"), ("busy", "busy tokens/s", ".1f"),
            ("busy_vs_quiet", "busy / quiet", ".2f"), ("other_cores", "other load", ".2f")]))
    results["loadavg_after"] = os.getloadavg()
    harness.write_json(args.json, {"args": vars(args), **results})
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
