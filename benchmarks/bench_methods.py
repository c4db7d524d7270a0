"""The SVD family against LoRA and PEFT: training step time, peak memory, SVD init time.

    python benchmarks/bench_methods.py [--layers 30] [--batch 4] [--seq 64] [--repeats 3] [--wait-quiet SECONDS]

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


def init_times(layers: int, repeats: int) -> tuple[list[dict], float]:
    """Median seconds to adapt every linear layer per contender, round-robin, and the other load meanwhile.

    Each call gets a freshly built model (untimed; PEFT's PiSSA rewrites the base weights) and an
    empty SVD cache."""
    samples: dict[str, list[float]] = {name: [] for name in INITS}
    with ForeignLoad() as load:
        for _ in range(repeats):
            for name, make in INITS.items():
                model = harness.llama(layers)
                svd.clear_cache()
                start = time.perf_counter()
                make(model)
                samples[name].append(time.perf_counter() - start)
                del model
    rows = [{"what": name, "seconds": statistics.median(t),
             "spread": (max(t) - min(t)) / 2 / statistics.median(t)} for name, t in samples.items()]
    return rows, load.cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each timed group, wait up to this long for the other cores to go idle")
    parser.add_argument("--json", default="benchmarks/results/methods.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.layers, args.batch, args.seq)

    ids = harness.tokens(args.batch, args.seq)
    kinds = [*OURS, *PEFT]
    steps = {}
    for kind in kinds:
        model, params = build(kind, args.layers)
        steps[kind] = train_step(model, params, torch.optim.AdamW(params, lr=1e-4), ids)
    wait_quiet(args.wait_quiet)
    times, step_load, spread = timed(steps, args.repeats, warmup=1)
    del steps
    memory = {kind: harness.in_child(__file__, "--child", kind, "--layers", str(args.layers),
                                     "--batch", str(args.batch), "--seq", str(args.seq)) for kind in kinds}
    rows = [{"contender": kind, "ms": 1000 * times[kind], "spread": spread[kind],
             "vs_our_lora": times[kind] / times["lora"],
             "vs_peft_same": times[kind] / times.get(f"peft-{kind}", float("nan")),
             "peak_mb": memory[kind]["peak_mb"], "step_mb": memory[kind]["peak_mb"] - memory[kind]["before_mb"],
             "cache_mb": memory[kind]["cache_mb"]}
            for kind in kinds]
    print(f"training step, all linear layers, batch {args.batch}x{args.seq}, {args.layers} layers, "
          f"other load {step_load:.2f} cores")
    print(harness.table(rows, [("contender", "contender", ""), ("ms", "ms/step", ".0f"), ("spread", "±", ".0%"),
                               ("vs_our_lora", "/ our LoRA", ".2f"), ("vs_peft_same", "/ PEFT same", ".2f"),
                               ("peak_mb", "peak MB", ".0f"), ("step_mb", "step MB", ".0f"),
                               ("cache_mb", "SVD cache MB", ".0f")]))
    wait_quiet(args.wait_quiet)
    inits, init_load = init_times(args.layers, args.repeats)
    print(f"\nSVD init, rank 16, every linear layer, other load {init_load:.2f} cores")
    print(harness.table(inits, [("what", "init", ""), ("seconds", "seconds", ".2f"), ("spread", "±", ".0%")]))
    harness.write_json(args.json, {"args": vars(args), "steps": rows, "steps_other_load": step_load,
                                   "init": inits, "init_other_load": init_load})


if __name__ == "__main__":
    main()
