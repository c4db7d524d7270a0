"""Every method on one synthetic task: trainable parameters, loss before and after, time per step.

    python benchmarks/train_methods.py [--steps 80] [--json benchmarks/results/train_methods.json]

The task: a tiny random Llama (hidden 64, 2 layers, vocabulary 128) learns to continue counting
(token t+1 = token t + 1 mod 128) from random starting points — something the base cannot do.
Each method adapts all linear layers and trains with AdamW at its own learning rate (the
spectral methods train far fewer parameters and take larger steps, as in their papers).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk

VOCAB = 128
METHODS = {  # name: (recipe class, settings, learning rate)
    "LoRA r=8": (lk.LoRA, dict(rank=8, alpha=16), 1e-2),
    "rsLoRA r=8": (lk.LoRA, dict(rank=8, alpha=16, rslora=True), 1e-2),
    "DoRA r=8": (lk.DoRA, dict(rank=8, alpha=16), 1e-2),
    "PiSSA r=8": (lk.PiSSA, dict(rank=8), 1e-2),
    "PiSSA r=8 niter=4": (lk.PiSSA, dict(rank=8, niter=4), 1e-2),
    "MiLoRA r=8": (lk.MiLoRA, dict(rank=8), 1e-2),
    "LoRA-XS r=8": (lk.LoRAXS, dict(rank=8), 1e-1),
    "SVF": (lk.SVF, {}, 5e-2),
    "SVFT plain": (lk.SVFT, {}, 5e-2),
    "SVFT banded d=2": (lk.SVFT, dict(pattern="banded", width=2), 5e-2),
    "AdaLoRA 12→8": (lk.AdaLoRA, dict(init_rank=12, target_rank=8), 1e-2),
}


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    starts = torch.randint(0, VOCAB, (16, 1), generator=torch.Generator().manual_seed(seed + 1))
    return model, (starts + torch.arange(16)) % VOCAB  # (16, 16) counting sequences


def run(name: str, steps: int) -> dict:
    method, settings, lr = METHODS[name]
    recipe = method(**{**method.training_defaults(steps), **settings})  # a schedule's length: this run's (AdaLoRA)
    model, data = model_and_data()
    lk.adapt(model, recipe, "all-linear")
    trainable = sum(p.numel() for p in lk.trainable_parameters(model))
    optimizer = torch.optim.AdamW(lk.trainable_parameters(model), lr=lr, weight_decay=0.0)
    lk.track(model, optimizer)
    model.train()
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        loss = model(input_ids=data, labels=data).loss
        losses.append(loss.item())
        (loss + lk.regularization(model)).backward()
        optimizer.step()
        optimizer.zero_grad()
    seconds = (time.perf_counter() - start) / steps
    model.eval()
    with torch.no_grad():
        final = model(input_ids=data, labels=data).loss.item()
    return {"method": name, "trainable": trainable, "loss_before": losses[0], "loss_after": final,
            "ms_per_step": 1000 * seconds, "lr": lr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--json", default="benchmarks/results/train_methods.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = [run(name, args.steps) for name in METHODS]
    print(f"{'method':<20} {'trainable':>10} {'loss before':>12} {'loss after':>11} {'ms/step':>8}")
    for r in rows:
        print(f"{r['method']:<20} {r['trainable']:>10,} {r['loss_before']:>12.3f} {r['loss_after']:>11.3f} "
              f"{r['ms_per_step']:>8.1f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
