"""`lorakit finetune` against a PEFT + transformers ``Trainer`` script on the same job.

    python benchmarks/bench_finetune.py [--steps 60] [--json benchmarks/results/finetune.json]

Same model (the embedded SmolLM2-135M-Instruct), task (date), training examples, tokenization
(chat template, loss on the answer only), LoRA r=16 alpha=32 on every linear layer, AdamW lr 2e-3,
6 warm-up steps then cosine, clipping at 1.0, batch 8, seed 0, and the same 200 held-out examples
scored by exact match with batched greedy decoding (KV cache) on both sides. Each side runs in its
own process (peak RSS is per process); the machine should be otherwise idle: whole runs cannot be
interleaved.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

STEPS = 60


def run_lorakit(steps: int, out: str) -> dict:
    from lorakit.train.config import FinetuneConfig
    from lorakit.train.trainer import finetune

    start = time.time()
    # The CPU, as the PEFT side's use_cpu=True: this benchmark compares the two on the same device.
    s = finetune(FinetuneConfig(steps=steps, out=out, skip_eval_before=True, val_every=0, save_every=0, device="cpu"),
                 log=lambda m: None)
    return {"wall_s": time.time() - start, "train_s": s["train_seconds"], "eval_s": s["eval_seconds"],
            "tokens_per_s": s["tokens_per_s"], "accuracy": s["accuracy_after"]}


def run_peft(steps: int, out: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from lorakit.train import data, models, tasks
    from lorakit.train.config import FinetuneConfig
    from lorakit.train.trainer import accuracy

    start = time.time()
    config = FinetuneConfig(steps=steps)
    torch.manual_seed(0)
    model, tokenizer = models.load()
    train, held_out = tasks.split("date", config.train_examples, config.eval_examples, 0)
    examples = data.tokenize([{"messages": e.messages()} for e in train], tokenizer, config.max_length).examples
    recipe = config.recipe()  # the default job's LoRA (r=16, alpha=32), for PEFT too
    model = get_peft_model(model, LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout,
                                             target_modules=config.targets, task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=8, max_steps=steps, learning_rate=2e-3,
                             warmup_steps=6, lr_scheduler_type="cosine", max_grad_norm=1.0, weight_decay=0.0,
                             logging_steps=10, save_strategy="no", report_to=[], seed=0, use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=examples,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    t0 = time.time()
    trainer.train()
    train_s = time.time() - t0
    tokens = sum(len(examples[i]["input_ids"]) for i in range(len(examples))) * steps * 8 / len(examples)
    model.eval()
    t1 = time.time()
    score, _ = accuracy(model, tokenizer, [(e.messages()[:-1], e.completion) for e in held_out], config)
    return {"wall_s": time.time() - start, "train_s": train_s, "eval_s": time.time() - t1,
            "tokens_per_s": tokens / train_s, "accuracy": score}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--json", default="benchmarks/results/finetune.json")
    parser.add_argument("--child", choices=["lorakit", "peft"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import tempfile

        with tempfile.TemporaryDirectory() as out:
            result = (run_lorakit if args.child == "lorakit" else run_peft)(args.steps, out)
        print(json.dumps({**result, "peak_mb": harness.peak_rss_mb()}))
        return
    rows = []
    for side in ("lorakit", "peft"):
        out = subprocess.run([sys.executable, __file__, "--child", side, "--steps", str(args.steps)],
                             check=True, capture_output=True, text=True)
        rows.append({"side": side, **json.loads(out.stdout.strip().splitlines()[-1])})
    ours, theirs = rows
    rows.append({"side": "lorakit / PEFT", **{k: ours[k] / theirs[k] for k in ours if k != "side"}})
    print(f"date task, {args.steps} steps of 8, LoRA r=16 all-linear, SmolLM2-135M-Instruct")
    print(harness.table(rows, [("side", "side", ""), ("wall_s", "wall s", ".2f"), ("train_s", "train s", ".2f"),
                               ("eval_s", "eval s", ".2f"), ("tokens_per_s", "tokens/s", ".2f"),
                               ("peak_mb", "peak MB", ".2f"), ("accuracy", "accuracy %", ".2f")]))
    harness.write_json(args.json, {"steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
