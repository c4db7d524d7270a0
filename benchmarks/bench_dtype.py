"""bfloat16 against float32 (issue 23): the machine's matmul peak per dtype, a training step of the default job
per way of computing it, and its achieved GFLOP/s beside that peak (a roofline row).

    python benchmarks/bench_dtype.py [--steps 6] [--repeats 5] [--json benchmarks/results/dtype.json]

1. Matmul peak: ``(512 x n) @ (n x n)`` for n = 576, 1536, 2048 (SmolLM2's widths and one more), 2·512·n² FLOPs
   a call, median of ``--repeats`` calls after a warm-up, the best n per dtype.
2. Training step of the default job (embedded SmolLM2-135M-Instruct, LoRA r=16 alpha 32 on every linear layer,
   8 examples of the date task as ``lorakit finetune`` tokenises them, the completion loss, backward, fused
   AdamW), three ways:
   - ``float32``: the base held and computed in float32 (``--dtype float32``);
   - ``autocast``: a float32 base under ``torch.autocast(bfloat16)`` (what ``--bf16`` did before ``--dtype``);
   - ``bfloat16``: the base held in bfloat16 (``--dtype bfloat16``), adapters and optimizer state in float32.
   Each in a process of its own (peak RSS is per process), ``--steps`` steps after two warm-up ones, the
   contenders' processes one after another, ``--rounds`` rounds in alternating order; median tokens/s.
   Achieved GFLOP/s counts 4 FLOPs per weight of the adapted linear layers per token: the forward's multiply-add
   and the backward's to the input (a frozen weight gets no gradient). The head (run on completion positions
   only), attention and the adapters' own FLOPs are left out, so it is a floor.

On a CPU without bfloat16 units (no avx512_bf16, no amx_bf16: ``lscpu``) bfloat16 is emulated and slower than
float32; ``lorakit``'s ``--dtype auto`` then picks float32, and this benchmark shows why.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402

WAYS = ("float32", "autocast", "bfloat16")


def matmul_peak(dtype: torch.dtype, repeats: int) -> dict:
    """The best GFLOP/s of ``(512 x n) @ (n x n)`` in ``dtype`` over the widths, and each width's."""
    by_width = {}
    for n in (576, 1536, 2048):
        a, b = torch.randn(512, n).to(dtype), torch.randn(n, n).to(dtype)
        seconds = harness.round_robin({"mm": lambda a=a, b=b: a @ b}, repeats=repeats, warmup=2)["mm"]
        by_width[n] = 2 * 512 * n * n / seconds / 1e9
    return {"gflops": max(by_width.values()), "by_width": by_width}


def step_child(way: str, steps: int) -> None:
    """One contender's training steps in this process; JSON on stdout."""
    import lorakit as lk
    from lorakit.layers import adapted_layers
    from lorakit.train import config as cfg
    from lorakit.train import data, models, trainer

    config = cfg.FinetuneConfig(dtype="float32" if way == "autocast" else way)
    model, tokenizer = models.load(None, dtype=config.dtype, log=lambda m: None)
    made = trainer.datasets(config, tokenizer)
    trainer.prepare(model, config.recipe(), config, log=lambda m: None)
    model.train()
    linear = sum(layer.weight.numel() for _, layer in adapted_layers(model))  # the head is left out (below)
    params = lk.trainable_parameters(model)
    optimizer = trainer._adamw([{"params": params}], config.lr, fused=True)
    loss_of = trainer.CompletionLoss(model)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=way == "autocast")
    batches = data.batch_order(made.train.examples, config.batch_size, 0, config.seed)

    def step(i: int) -> int:
        batch = data.collate([made.train.examples[j] for j in batches[i]], tokenizer.pad_token_id)
        with autocast:
            loss, _ = loss_of(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum())

    step(0)
    step(1)
    start, tokens = time.perf_counter(), 0
    for i in range(2, 2 + steps):
        tokens += step(i)
    seconds = time.perf_counter() - start
    states = {v.dtype for s in optimizer.state.values() for k, v in s.items() if k != "step"}
    print(json.dumps({"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds,
                      "flops_per_token": 4 * linear, "peak_mb": harness.peak_rss_mb(),
                      "base_dtype": str(next(p for p in model.parameters() if not p.requires_grad).dtype),
                      "adapter_dtypes": sorted({str(p.dtype) for p in params}),
                      "optimizer_state_dtypes": sorted(map(str, states))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="benchmarks/results/dtype.json")
    parser.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return step_child(args.child, args.steps)

    from lorakit.train import models

    flags = sorted(set(models.BF16_CPU_FLAGS) & models.cpu_flags())
    chosen, why = models.resolve_dtype("auto", "cpu")
    peaks = {name: matmul_peak(getattr(torch, name), args.repeats) for name in ("float32", "bfloat16")}
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    for r in range(args.rounds):
        for way in (WAYS if r % 2 == 0 else WAYS[::-1]):
            out = harness.in_child(__file__, "--child", way, "--steps", str(args.steps))
            runs[way].append(out)
            print(f"round {r + 1} {way:9s} {out['tokens_per_s']:7.1f} tokens/s, peak {out['peak_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
    rows = []
    base = statistics.median(o["tokens_per_s"] for o in runs["float32"])
    base_peak = statistics.median(o["peak_mb"] for o in runs["float32"])
    for way, outs in runs.items():
        rate = statistics.median(o["tokens_per_s"] for o in outs)
        peak = statistics.median(o["peak_mb"] for o in outs)
        compute = "float32" if way == "float32" else "bfloat16"
        achieved = rate * outs[0]["flops_per_token"] / 1e9
        rows.append({"way": way, "tokens_per_s": rate, "vs_float32": rate / base, "peak_mb": peak,
                     "peak_vs_float32": peak / base_peak, "gflops": achieved,
                     "matmul_peak_gflops": peaks[compute]["gflops"],
                     "share_of_peak": achieved / peaks[compute]["gflops"], "base_dtype": outs[0]["base_dtype"],
                     "state_dtypes": "/".join(outs[0]["optimizer_state_dtypes"])})
    print(f"CPU bfloat16 flags: {', '.join(flags) or 'none'}; --dtype auto: {chosen} ({why}); "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(harness.table([{"dtype": k, **v} for k, v in peaks.items()], [
        ("dtype", "matmul dtype", ""), ("gflops", "peak GFLOP/s", ".0f")]))
    print(harness.table(rows, [
        ("way", "training step", ""), ("tokens_per_s", "tokens/s", ".1f"), ("vs_float32", "/ float32", ".2f"),
        ("peak_mb", "peak MB", ".0f"), ("peak_vs_float32", "/ float32", ".2f"), ("gflops", "GFLOP/s", ".0f"),
        ("matmul_peak_gflops", "matmul peak", ".0f"), ("share_of_peak", "of peak", ".2f"),
        ("base_dtype", "base", ""), ("state_dtypes", "optimizer state", "")]))
    harness.write_json(args.json, {"args": vars(args), "cpu_bf16_flags": flags, "auto": str(chosen),
                                   "auto_why": why, "matmul_peak": peaks, "steps": rows,
                                   "runs": runs, "loadavg": os.getloadavg()})
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
