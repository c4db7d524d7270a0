"""QLoRA on CPU: NF4 base vs float32 base, and lorakit vs PEFT on the same 4-bit base.

    python benchmarks/bench_quant.py [--batch 4 --seq 64] [--repeats 5] [--json benchmarks/results/quant.json]

The model is the embedded SmolLM2-135M-Instruct (real weights, converted once into the lorakit
cache); LoRA r=16, alpha=32 on every linear layer, float32 adapters. Sections:

* error:  relative Frobenius error ‖dequant(Q(W)) − W‖/‖W‖ of NF4 and FP4 (with double quantization)
          over every linear weight, and NF4 of the QPiSSA residual W − top-16 SVD part.
* memory: each side in its own fresh process: RSS once the model is ready (weights), then peak RSS
          over two training steps (forward + backward + AdamW). Sides: LoRA, our NF4 QLoRA
          (``lk.quantize``), PEFT's NF4 QLoRA on a model transformers loads with ``BitsAndBytesConfig``;
          each in every ``--dtypes`` (the model's and the compute dtype: float32, and bfloat16 as in
          the QLoRA paper), all relative to float32 LoRA.
* step:   training step time, round-robin in one process: float32 LoRA, our QLoRA, PEFT's QLoRA,
          after checking that both QLoRA sides hold bit-identical 4-bit weights and give the same logits;
          float32.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

import lorakit as lk  # noqa: E402

RANK, ALPHA = 16, 32.0
SIDES = ("lora", "qlora-lorakit", "qlora-peft")


def model_path() -> Path:
    from lorakit.train.models import model_dir

    return model_dir(log=lambda m: print(m, file=sys.stderr))


def build(side: str, dtype: torch.dtype = torch.float32):
    """The model of one side, adapted and ready to train (float32 adapters, ``dtype`` compute)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    if side == "qlora-peft":
        import peft

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(model_path(), quantization_config=config, dtype=dtype)
        return peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                          target_modules="all-linear"))
    model = AutoModelForCausalLM.from_pretrained(model_path(), dtype=dtype)
    if side == "qlora-lorakit":
        lk.quantize(model, "nf4", compute_dtype=dtype)
    return lk.adapt(model, lk.LoRA(rank=RANK, alpha=ALPHA), "all-linear")


def train_step(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def run():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


# --- sections --------------------------------------------------------------------------------------
def bench_error() -> list[dict]:
    import bitsandbytes.functional as bf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.float32)
    weights = [m.weight.detach() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]

    def error(quant_type: str, residual: bool = False) -> float:
        num = den = 0.0
        for W in weights:
            target = W
            if residual:  # QPiSSA quantizes what the top-16 part leaves
                U, S, Vh = torch.linalg.svd(W, full_matrices=False)
                target = W - (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]
            q, state = bf.quantize_4bit(target.contiguous(), blocksize=64, compress_statistics=True,
                                        quant_type=quant_type)
            num += (bf.dequantize_4bit(q, state) - target).pow(2).sum().item()
            den += W.pow(2).sum().item()  # relative to W in every row: the error the model sees
        return (num / den) ** 0.5

    rows = [{"format": "NF4 + double quant", "error": error("nf4")},
            {"format": "FP4 + double quant", "error": error("fp4")},
            {"format": "NF4, QPiSSA residual (W - top-16)", "error": error("nf4", residual=True)}]
    print(f"quantization error over {len(weights)} linear weights ({sum(w.numel() for w in weights):,} values)")
    print(harness.table(rows, [("format", "format", ""), ("error", "‖dequant(Q(W)) − W‖ / ‖W‖", ".4f")]))
    return rows


def memory_child(side: str, args) -> None:
    import json

    ids = harness.tokens(args.batch, args.seq)
    model = build(side, getattr(torch, args.dtypes)).train()
    gc.collect()
    ready = harness.current_rss_mb()
    step = train_step(model, ids)
    harness.reset_peak_rss()
    for _ in range(2):
        step()
    print(json.dumps({"side": side, "dtype": args.dtypes, "ready_mb": ready, "peak_mb": harness.peak_rss_mb()}))


def bench_memory(args) -> list[dict]:
    rows = []
    for dtype in args.dtypes.split(","):
        runs = {side: harness.in_child(__file__, "--memory-child", side, "--dtypes", dtype, "--batch", str(args.batch),
                                       "--seq", str(args.seq)) for side in SIDES}
        ours, peft = runs["qlora-lorakit"], runs["qlora-peft"]
        rows += [*runs.values(), {"side": "lorakit / PEFT", "dtype": dtype, "ready_ratio": ours["ready_mb"] / peft["ready_mb"],
                                  "peak_ratio": ours["peak_mb"] / peft["peak_mb"]}]
    base = rows[0]  # float32 LoRA
    for row in rows:
        if "peak_mb" in row:
            row["ready_ratio"], row["peak_ratio"] = row["ready_mb"] / base["ready_mb"], row["peak_mb"] / base["peak_mb"]
    print(f"memory, batch {args.batch}x{args.seq}, each side in its own process")
    print(harness.table(rows, [("side", "side", ""), ("dtype", "dtype", ""), ("ready_mb", "model ready MB", ".0f"),
                               ("ready_ratio", "/ fp32 LoRA", ".3f"), ("peak_mb", "peak MB (2 steps)", ".0f"),
                               ("peak_ratio", "/ fp32 LoRA", ".3f")]))
    return rows


def bench_step(args) -> dict:
    import bitsandbytes as bnb

    ids = harness.tokens(args.batch, args.seq)
    models = {side: build(side).train() for side in SIDES}
    ours, theirs = models["qlora-lorakit"], models["qlora-peft"]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the same non-zero adapters on both 4-bit sides, on bit-identical bases
        for path, layer in lk.model.adapted_layers(ours):
            peft_layer = theirs.base_model.model.get_submodule(path)
            assert isinstance(peft_layer.base_layer, bnb.nn.Linear4bit)
            assert torch.equal(peft_layer.base_layer.weight.data, layer.weight.data), path
            adapter = layer.adapters["default"]
            for mine, other in ((adapter.lora_A, peft_layer.lora_A["default"].weight),
                                (adapter.lora_B, peft_layer.lora_B["default"].weight)):
                mine.copy_(torch.randn(mine.shape, generator=g) * 0.02)
                other.copy_(mine)
        gap = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    times = harness.round_robin({side: train_step(m, ids) for side, m in models.items()}, args.repeats, args.warmup)
    result = {"seconds": times, "logits_max_abs_diff": gap,
              "qlora_over_lora": times["qlora-lorakit"] / times["lora"],
              "peft_qlora_over_lora": times["qlora-peft"] / times["lora"],
              "ours_over_peft": times["qlora-lorakit"] / times["qlora-peft"]}
    print(f"training step, batch {args.batch}x{args.seq}, median of {args.repeats} round-robin repeats "
          f"(QLoRA logits lorakit vs PEFT: max |diff| {gap:.2e})")
    print(harness.table([{"side": s, "s": t, "ratio": t / times["lora"]} for s, t in times.items()],
                        [("side", "side", ""), ("s", "seconds/step", ".3f"), ("ratio", "/ fp32 LoRA", ".3f")]))
    print(f"ours / PEFT (QLoRA step): {result['ours_over_peft']:.3f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sections", default="error,memory,step")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="model and compute dtypes of the memory section")
    parser.add_argument("--json", default="benchmarks/results/quant.json")
    parser.add_argument("--memory-child", metavar="SIDE", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args)
        return
    sections = args.sections.split(",")
    results = {"batch": args.batch, "seq": args.seq, "rank": RANK, "alpha": ALPHA}
    if "memory" in sections:  # first, while this process is small
        results["memory"] = bench_memory(args)
    if "error" in sections:
        results["error"] = bench_error()
    if "step" in sections:
        results["step"] = bench_step(args)
    harness.write_json(args.json, results)


if __name__ == "__main__":
    main()
