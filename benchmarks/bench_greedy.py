"""One answer whatever the path: what a batch does to greedy decoding on the embedded SmolLM2, and what the fix costs.

With a LoRA r=16 on every linear layer (random B, so the adapter changes the answers), on held-out prompts of both
built-in tasks (mixed lengths):
- the logit perturbation: the engine's logits in a batch against one forward of the same sequence alone (max
  absolute and relative difference), beside the smallest top-two gap seen and the tie tolerance
  (``engine.TIE_TOLERANCE``), and how many greedy choices were decided alone;
- evaluation wall time: ``trainer.generate`` (the engine, unmerged, what eval/generate/finetune use now) against
  transformers' ``generate`` on the merged model with left-padded batches (what they used before), and how many
  answers the two differ in.

    .venv/bin/python benchmarks/bench_greedy.py                 # 200 prompts
    .venv/bin/python benchmarks/bench_greedy.py --prompts 32    # a quick check
    .venv/bin/python benchmarks/bench_greedy.py --dtype bfloat16 --repeats 1    # bfloat16, and its answers against float32's
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.serve import engine  # noqa: E402
from lorakit.train import data, models, tasks  # noqa: E402
from lorakit.train.trainer import generate  # noqa: E402


def adapted_model(dtype: str = "float32"):
    model, tokenizer = models.load(None, dtype=dtype, log=lambda m: None)
    lk.adapt(model, lk.LoRA(rank=16, alpha=32), targets="all-linear")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.01)
    return model.eval(), tokenizer


def hf_generate_merged(model, tokenizer, prompts, max_new_tokens: int, batch_size: int) -> list[str]:
    """The evaluation path before: the adapter merged, transformers' generate on left-padded batches by length."""
    ids = [data.prompt_ids(p, tokenizer) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    answers = [""] * len(ids)
    lk.merge(model)
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                index = order[start:start + batch_size]
                width = max(len(ids[i]) for i in index)
                batch = torch.full((len(index), width), tokenizer.pad_token_id)
                mask = torch.zeros((len(index), width), dtype=torch.long)
                for row, i in enumerate(index):
                    batch[row, width - len(ids[i]):] = torch.tensor(ids[i])
                    mask[row, width - len(ids[i]):] = 1
                out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id)
                for i, row in zip(index, out[:, width:]):
                    answers[i] = tokenizer.decode(row, skip_special_tokens=True)
    finally:
        lk.unmerge(model)
    return answers


def perturbation(model, tokenizer, prompts, max_new_tokens: int, batch_size: int, sampled: int) -> dict:
    """Decode ``prompts`` batched, keeping each step's logits; then recompute ``sampled`` of those steps alone."""
    seen: list[tuple[list[int], torch.Tensor]] = []
    decided_alone = 0
    choose, alone = engine.Engine._choose, engine.Engine._alone

    def recording(self, logits, rows):
        seen.extend((g.prompt_ids + g.generated, logits[i].float().clone()) for i, g in enumerate(rows))
        return choose(self, logits, rows)

    def counting(self, g):
        nonlocal decided_alone
        decided_alone += 1
        return alone(self, g)

    engine.Engine._choose, engine.Engine._alone = recording, counting
    try:
        generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    finally:
        engine.Engine._choose, engine.Engine._alone = choose, alone
    worst = worst_relative = 0.0
    gaps = []
    with torch.no_grad():
        for sequence, logits in seen[::max(1, len(seen) // sampled)]:
            reference = model(input_ids=torch.tensor([sequence]), logits_to_keep=1).logits[0, -1].float()
            diff = (reference - logits).abs().max().item()
            worst, worst_relative = max(worst, diff), max(worst_relative, diff / reference.abs().max().item())
            top = reference.topk(2).values
            gaps.append(((top[0] - top[1]) / top[0].abs().clamp(min=1)).item())
    dtype = model.get_input_embeddings().weight.dtype
    return {"choices": len(seen), "compared": len(gaps), "max_abs_diff": worst, "max_rel_diff": worst_relative,
            "smallest_rel_gap": min(gaps), "tolerance": engine.TIE_TOLERANCES.get(dtype, engine.TIE_TOLERANCE),
            "decided_alone": decided_alone}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sampled", type=int, default=64, help="decode steps recomputed alone")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="the model's dtype; other than float32, the answers are also compared with float32's")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    args.json = args.json or f"benchmarks/results/greedy{'' if args.dtype == 'float32' else '-' + args.dtype}.json"
    model, tokenizer = adapted_model(args.dtype)
    half = args.prompts // 2
    examples = tasks.split("date", 0, half, seed=3)[1] + tasks.split("extract", 0, args.prompts - half, seed=3)[1]
    prompts = [e.messages()[:-1] for e in examples]
    drift = perturbation(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, args.sampled)
    answers = {}
    times = harness.round_robin({
        "engine, unmerged": lambda: answers.__setitem__("engine", generate(
            model, tokenizer, prompts, args.max_new_tokens, args.batch_size)),
        "transformers generate, merged": lambda: answers.__setitem__("hf", hf_generate_merged(
            model, tokenizer, prompts, args.max_new_tokens, args.batch_size))}, repeats=args.repeats, warmup=0)
    differ = sum(a != b for a, b in zip(answers["engine"], answers["hf"]))
    rows = [{"path": name, "seconds": t, "ratio": t / times["transformers generate, merged"]}
            for name, t in times.items()]
    print(f"{len(prompts)} prompts, {args.max_new_tokens} new tokens, batches of {args.batch_size}")
    print(harness.table(rows, [("path", "evaluation path", ""), ("seconds", "s (median)", ".1f"),
                               ("ratio", "vs before", ".2f")]))
    print(f"answers that differ between the two paths: {differ} of {len(prompts)}")
    print(f"batched vs alone, {drift['compared']} of {drift['choices']} greedy choices: max |dlogit| "
          f"{drift['max_abs_diff']:.2e} ({drift['max_rel_diff']:.1e} of the largest logit); smallest top-two gap "
          f"{drift['smallest_rel_gap']:.1e} of the best; tolerance {drift['tolerance']:g}; decided alone: "
          f"{drift['decided_alone']}")
    same = None
    if args.dtype != "float32":
        reference, reference_tokenizer = adapted_model()
        theirs = generate(reference, reference_tokenizer, prompts, args.max_new_tokens, args.batch_size)
        same = sum(a == b for a, b in zip(answers["engine"], theirs))
        print(f"{args.dtype} answers identical to float32's: {same} of {len(prompts)}")
    harness.write_json(args.json, {"args": vars(args), "times": times, "answers_differ": differ,
                                   "same_as_float32": same, **drift})


if __name__ == "__main__":
    main()
