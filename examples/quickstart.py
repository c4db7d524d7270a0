"""lorakit in one minute: adapt a (tiny, randomly initialised) Llama, train, save, reload, merge.

    python examples/quickstart.py [--out runs/quickstart]

Until `lorakit finetune` lands this is the project's main job; it needs no download.
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="where the adapter is written")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    model = lk.adapt(tiny_llama(), lk.LoRA(rank=8, alpha=16), targets="all-linear")
    lk.summary(model)

    # The task: memorise 8 random "sentences" of 16 tokens.
    data = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(lk.lora_plus_groups(model, lr=2e-3, ratio=16))
    model.train()
    for step in range(args.steps + 1):
        loss = model(input_ids=data, labels=data).loss
        if step % 20 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}")
        if step < args.steps:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()

    with torch.no_grad():
        logits = model(data).logits
        lk.save(model, args.out)
        reloaded = lk.load(tiny_llama(), args.out)
        print(f"saved to {args.out}; reloaded max |Δlogit| = {(reloaded(data).logits - logits).abs().max():.2e}")
        lk.merge(model)
        print(f"merged (zero added latency): max |Δlogit| = {(model(data).logits - logits).abs().max():.2e}")
        lk.unmerge(model)
        with lk.disabled(model):
            base_loss = model(input_ids=data, labels=data).loss.item()
        print(f"loss: base {base_loss:.3f} -> adapted {model(input_ids=data, labels=data).loss.item():.3f}")
        try:
            from peft import PeftModel
        except ImportError:
            return
        peft_logits = PeftModel.from_pretrained(tiny_llama(), args.out)(data).logits
        print(f"PEFT loads it: max |Δlogit| vs lorakit = {(peft_logits - logits).abs().max():.2e}")


if __name__ == "__main__":
    main()
