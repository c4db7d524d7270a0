"""The SVD family against LoRA and PEFT: training step time, peak memory, SVD init time.

    python benchmarks/bench_methods.py [--layers 30] [--batch 4] [--seq 64] [--repeats 3]

On a SmolLM2-135M-sized Llama (random weights), all linear layers adapted:
  * step: forward + backward + AdamW, round-robin; DoRA / our LoRA (target ≤ 1.4), ours / PEFT's DoRA
    (target ≤ 0.9), SVF, SVFT and LoRA-XS / our LoRA;
  * memory: peak RSS of two training steps, each contender in its own process;
  * init: time to adapt every linear layer with PiSSA (full and randomized SVD) and MiLoRA, against
    PEFT's ``init_lora_weights="pissa"`` / ``"pissa_niter_4"``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

import lorakit as lk  # noqa: E402

OURS = {
    "lora": lambda: lk.LoRA(rank=8, alpha=16),
    "dora": lambda: lk.DoRA(rank=8, alpha=16),
    "svf": lambda: lk.SVF(),
    "svft-plain": lambda: lk.SVFT(),
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
    print(f'{{"before_mb": {before:.1f}, "peak_mb": {harness.peak_rss_mb():.1f}}}')


def init_times(layers: int) -> list[dict]:
    import peft

    from lorakit import svd

    rows = []
    for name, make in [("ours PiSSA full SVD", lambda m: lk.adapt(m, lk.PiSSA(rank=16), "all-linear")),
                       ("ours PiSSA niter=4", lambda m: lk.adapt(m, lk.PiSSA(rank=16, niter=4), "all-linear")),
                       ("ours MiLoRA full SVD", lambda m: lk.adapt(m, lk.MiLoRA(rank=16), "all-linear")),
                       ("PEFT pissa", lambda m: peft.get_peft_model(m, peft.LoraConfig(
                           r=16, lora_alpha=16, target_modules="all-linear", init_lora_weights="pissa"))),
                       ("PEFT pissa_niter_4", lambda m: peft.get_peft_model(m, peft.LoraConfig(
                           r=16, lora_alpha=16, target_modules="all-linear", init_lora_weights="pissa_niter_4")))]:
        model = harness.llama(layers)
        svd.clear_cache()
        start = time.perf_counter()
        make(model)
        rows.append({"what": name, "seconds": time.perf_counter() - start})
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
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
    times = harness.round_robin(steps, args.repeats)
    del steps
    memory = {kind: harness.in_child(__file__, "--child", kind, "--layers", str(args.layers),
                                     "--batch", str(args.batch), "--seq", str(args.seq)) for kind in kinds}
    rows = [{"contender": kind, "ms": 1000 * times[kind], "vs_our_lora": times[kind] / times["lora"],
             "vs_peft_same": times[kind] / times.get(f"peft-{kind}", float("nan")),
             "peak_mb": memory[kind]["peak_mb"], "step_mb": memory[kind]["peak_mb"] - memory[kind]["before_mb"]}
            for kind in kinds]
    print(f"training step, all linear layers, batch {args.batch}x{args.seq}, {args.layers} layers")
    print(harness.table(rows, [("contender", "contender", ""), ("ms", "ms/step", ".0f"),
                               ("vs_our_lora", "/ our LoRA", ".2f"), ("vs_peft_same", "/ PEFT same", ".2f"),
                               ("peak_mb", "peak MB", ".0f"), ("step_mb", "step MB", ".0f")]))
    inits = init_times(args.layers)
    print("\nSVD init, rank 16, every linear layer")
    print(harness.table(inits, [("what", "init", ""), ("seconds", "seconds", ".2f")]))
    harness.write_json(args.json, {"args": vars(args), "steps": rows, "init": inits})


if __name__ == "__main__":
    main()
