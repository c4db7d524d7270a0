"""The SVD family against LoRA and PEFT: training step time, peak memory, SVD init time.

    python benchmarks/bench_methods.py [--layers 30] [--batch 4] [--seq 64] [--repeats 3] [--wait-quiet SECONDS]
                                       [--sections memory,step,init] [--json PATH]

On a SmolLM2-135M-sized Llama (random weights), all linear layers adapted:
  * step: forward + backward + AdamW, round-robin; DoRA / our LoRA (target ≤ 1.4), ours / PEFT's DoRA
    (target ≤ 0.9), SVF, SVFT (plain, and banded with the paper's d=16) and LoRA-XS / our LoRA;
  * memory: peak RSS of two training steps, each contender in its own process, and how much of it
    the SVD cache holds (svd.py keeps each layer's factors for a next adapter; ``svd.clear_cache()``);
  * init: time to adapt every linear layer with PiSSA (full and randomized SVD) and MiLoRA, against
    PEFT's ``init_lora_weights="pissa"`` / ``"pissa_niter_4"``, round-robin, each call on a fresh model.
Timed groups record the cores other processes kept busy meanwhile ("other load", as bench_core.py):
on a shared 2-core machine a ratio measured under load is not comparable with a quiet one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from bench_core import ForeignLoad, timed, wait_quiet  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit import svd  # noqa: E402

OURS = {
    "lora": lambda: lk.LoRA(rank=8, alpha=16),
    "dora": lambda: lk.DoRA(rank=8, alpha=16),
    "svf": lambda: lk.SVF(),
    "svft-plain": lambda: lk.SVFT(),
    "svft-banded": lambda: lk.SVFT(pattern="banded", width=16),
    "lora_xs": lambda: lk.LoRAXS(rank=8),
}
PEFT = {"peft-lora": dict(r=8, lora_alpha=16), "peft-dora": dict(r=8, lora_alpha=16, use_dora=True)}
CONTENDERS = [*OURS, *PEFT]


def build(kind: str, layers: int):
    """(model, trainable parameters) of one contender."""
    model = harness.llama(layers)
    if kind in OURS:
        lk.adapt(model, OURS[kind](), "all-linear")
        params = lk.trainable_parameters(model)
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(target_modules="all-linear", **PEFT[kind]))
        params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    return model, params


def train_step(model, params, optimizer, ids):
    def run():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def child(kind: str, layers: int, batch: int, seq: int) -> None:
    """Peak memory of two training steps of one contender (run in its own process)."""
    model, params = build(kind, layers)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    step = train_step(model, params, optimizer, harness.tokens(batch, seq))
    before = harness.current_rss_mb()
    harness.reset_peak_rss()
    step()
    step()
    print(f'{{"before_mb": {before:.1f}, "peak_mb": {harness.peak_rss_mb():.1f}, '
          f'"cache_mb": {svd.cached_bytes() / 2**20:.1f}}}')


def peft_pissa(init: str):
    """PEFT's PiSSA init on every linear layer (rank 16, alpha 16), as a function of the model."""
    import peft

    config = peft.LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", init_lora_weights=init)
    return lambda model: peft.get_peft_model(model, config)


INITS = {
    "ours PiSSA full SVD": lambda m: lk.adapt(m, lk.PiSSA(rank=16), "all-linear"),
    "PEFT pissa": peft_pissa("pissa"),
    "ours PiSSA niter=4": lambda m: lk.adapt(m, lk.PiSSA(rank=16, niter=4), "all-linear"),
    "PEFT pissa_niter_4": peft_pissa("pissa_niter_4"),
    "ours MiLoRA full SVD": lambda m: lk.adapt(m, lk.MiLoRA(rank=16), "all-linear"),
}


def bench_init(args) -> dict:
    """Median seconds to adapt every linear layer per contender, round-robin, and the other load meanwhile.

    Each call gets a freshly built model (untimed; PEFT's PiSSA rewrites the base weights) and an
    empty SVD cache."""
    wait_quiet(args.wait_quiet)
    samples: dict[str, list[float]] = {name: [] for name in INITS}
    with ForeignLoad() as load:
        for _ in range(args.repeats):
            for name, make in INITS.items():
                model = harness.llama(args.layers)
                svd.clear_cache()
                start = time.perf_counter()
                make(model)
                samples[name].append(time.perf_counter() - start)
                del model
    rows = [{"what": name, "seconds": statistics.median(t),
             "spread": (max(t) - min(t)) / 2 / statistics.median(t)} for name, t in samples.items()]
    return {"rows": rows, "other_load": load.cores}


def bench_memory(args) -> dict:
    """Peak RSS of two training steps per contender, each in a fresh process, and the SVD cache's share."""
    rows = []
    for kind in CONTENDERS:
        child_out = harness.in_child(__file__, "--child", kind, "--layers", str(args.layers),
                                     "--batch", str(args.batch), "--seq", str(args.seq))
        rows.append({"contender": kind, "peak_mb": child_out["peak_mb"],
                     "step_mb": child_out["peak_mb"] - child_out["before_mb"], "cache_mb": child_out["cache_mb"]})
    return {"rows": rows}


def bench_steps(args) -> dict:
    """Median training step per contender (round-robin), ratios, each one's spread and the other load."""
    ids = harness.tokens(args.batch, args.seq)
    steps = {}
    for kind in CONTENDERS:
        model, params = build(kind, args.layers)
        steps[kind] = train_step(model, params, torch.optim.AdamW(params, lr=1e-4), ids)
    wait_quiet(args.wait_quiet)
    times, load, spread = timed(steps, args.repeats, warmup=1)
    rows = [{"contender": kind, "ms": 1000 * times[kind], "spread": spread[kind],
             "vs_our_lora": times[kind] / times["lora"],
             "vs_peft_same": times[kind] / times.get(f"peft-{kind}", float("nan"))} for kind in CONTENDERS]
    return {"rows": rows, "other_load": load}


SECTIONS = {"memory": bench_memory, "step": bench_steps, "init": bench_init}  # memory first: the parent is small
TABLES = {
    "memory": [("contender", "contender", ""), ("peak_mb", "peak MB", ".0f"), ("step_mb", "step MB", ".0f"),
               ("cache_mb", "SVD cache MB", ".0f")],
    "step": [("contender", "contender", ""), ("ms", "ms/step", ".0f"), ("spread", "±", ".0%"),
             ("vs_our_lora", "/ our LoRA", ".2f"), ("vs_peft_same", "/ PEFT same", ".2f")],
    "init": [("what", "init (rank 16, all linear)", ""), ("seconds", "seconds", ".2f"), ("spread", "±", ".0%")],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: memory, step, init")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each timed group, wait up to this long for the other cores to go idle")
    parser.add_argument("--json", default="benchmarks/results/methods.json",
                        help="results file; a run of some sections replaces those and keeps the others")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.layers, args.batch, args.seq)
    chosen = args.sections.split(",")
    if not set(chosen) <= set(SECTIONS):
        parser.error(f"--sections takes {', '.join(SECTIONS)}; got {args.sections!r}")

    results = {}
    for name, bench in SECTIONS.items():
        if name in chosen:
            results[name] = {"args": vars(args), **bench(args)}
            load = results[name].get("other_load")
            print(f"\n{name}: all linear layers, batch {args.batch}x{args.seq}, {args.layers} layers"
                  + ("" if load is None else f", other load {load:.2f} cores"))
            print(harness.table(results[name]["rows"], TABLES[name]))
    path = Path(args.json)
    recorded = json.loads(path.read_text()) if path.exists() else {}
    harness.write_json(path, {**{k: v for k, v in recorded.items() if k in SECTIONS}, **results})


if __name__ == "__main__":
    main()
