"""Inference latency of LoRA against Houlsby adapters: the LoRA paper's Table 1 claim, on SmolLM2-135M.

    python benchmarks/bench_latency.py                      # 32x512, 16x256, 1x128 (the paper's shapes)
    python benchmarks/bench_latency.py --shapes 32x512,16x256,1x128 [--repeats N] [--warmup N]
                                       [--adapter-width M] [--threads N] [--wait-quiet SECONDS] [--json PATH]
    python benchmarks/bench_latency.py --quick              # smoke run: 2x64, 1x16, 2 repeats (~1 minute)

Hu et al. 2021 (LoRA), Table 1, GPT-2 medium on a GPU: Houlsby adapters ("Adapter^H", two sequential
bottleneck adapters per layer) add about +3% latency at batch 32 x sequence 512, +8% at 16x256 and
+30% at 1x128; LoRA merged into the weights adds nothing. Here, on the real SmolLM2-135M-Instruct
(``lorakit.train.models.load("")``: 30 layers, hidden 576, float32, on the CPU), torch.no_grad, we time
one forward of four variants, interleaved round-robin (A B C D A B C D ...) after a warm-up, medians:

  * base:     the plain model (all weights frozen, as the adapted variants freeze theirs);
  * lora:     lorakit LoRA r=8 alpha=16 on q_proj,v_proj, unmerged (the adapter runs beside each of the
              60 layers; its A and B are randomised, so B != 0 and the update is real work);
  * merged:   the same adapter after ``lk.merge(model)`` (a separate copy, so all four can interleave);
  * houlsby:  a baseline defined in this script, not a lorakit method: in every decoder layer the
              outputs of ``self_attn.o_proj`` (the attention block's output, before its residual add) and
              of ``mlp.down_proj`` (the MLP's output) become ``y + W_up(gelu(W_down(y)))``, with biases, as
              the LoRA paper's Adapter^H. Two adapters per layer, sequential, cannot be merged. Their width
              is chosen so the trainable parameter count roughly matches the LoRA's (printed; --adapter-width
              overrides); W_up is randomised too, so the adapters change the output.

What one "forward" is: ``model.model(input_ids=ids, use_cache=False).last_hidden_state``, the decoder
stack without the LM head (and without a KV cache). The 49152-word head is identical in every variant
and at 32x512 a large share of the cost, so it would only dilute the ratios. Inputs are random token
ids from a fixed seed. Before timing, the script checks on a small batch that merged and unmerged give
the same hidden states and full logits (relative error max|a-b| / max|a| <= 1e-4) and that the LoRA and
the Houlsby adapters really change the output, and prints the numbers.

Reported per shape: median ms per forward of each variant and its ratio to the base ("+2.1%"), each
variant's spread (half the range of its samples / its median: the noise a ratio should be read
against), and the cores other processes kept busy meanwhile ("other load", as bench_core.py; on a
shared 2-core machine a ratio measured under load is not comparable with a quiet one, see --wait-quiet).
One forward at 32x512 should take on the order of a minute on this 2-core machine (~330 tokens/s at 2x64,
extrapolated; the full default run roughly 20-30 minutes), so the default repeats are few there: 3 at
>= 8192 tokens, 7 at >= 1024, 30 below (--repeats sets one count for all). Results: benchmarks/results/latency.json
(--quick: latency-quick.json, so a smoke run never replaces a full one).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from bench_core import timed, wait_quiet  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.train import models  # noqa: E402

RANK, ALPHA, TARGETS = 8, 16, ["q_proj", "v_proj"]
VARIANTS = ("base", "lora", "merged", "houlsby")
SHAPES, QUICK_SHAPES = "32x512,16x256,1x128", "2x64,1x16"
# Table 1 of the LoRA paper (GPT-2 medium, NVIDIA Quadro RTX8000, 100 trials): Adapter^H over Fine-Tune/LoRA.
PAPER_HOULSBY = {"32x512": "+3.0%", "16x256": "+8.4%", "1x128": "+30.3%"}
NUMERIC_TOL = 1e-4


# --- the Houlsby baseline -------------------------------------------------------------------------
class HoulsbyAdapter(nn.Module):
    """A Linear whose output y becomes y + up(gelu(down(y))): a bottleneck adapter after the wrapped layer."""

    def __init__(self, linear: nn.Linear, width: int):
        super().__init__()
        self.linear = linear
        d = linear.out_features
        self.down = nn.Linear(d, width, bias=True, dtype=linear.weight.dtype, device=linear.weight.device)
        self.up = nn.Linear(width, d, bias=True, dtype=linear.weight.dtype, device=linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y + self.up(nn.functional.gelu(self.down(y)))


def houlsby_params(hidden: int, width: int, layers: int) -> int:
    """Trainable parameters of two adapters per layer: down (hidden x width + width) + up (width x hidden + hidden)."""
    return layers * 2 * (2 * hidden * width + width + hidden)


def matching_width(lora_params: int, hidden: int, layers: int) -> int:
    """The bottleneck width whose parameter count is closest to ``lora_params``."""
    return max(1, round((lora_params / (2 * layers) - hidden) / (2 * hidden + 1)))


def add_houlsby(model, width: int, seed: int = 5, std: float = 0.02) -> int:
    """Wrap every decoder layer's o_proj and down_proj; freeze the base, randomise the adapters. Returns the count
    of trainable parameters."""
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        layer.self_attn.o_proj = HoulsbyAdapter(layer.self_attn.o_proj, width)
        layer.mlp.down_proj = HoulsbyAdapter(layer.mlp.down_proj, width)
        for adapter in (layer.self_attn.o_proj, layer.mlp.down_proj):
            with torch.no_grad():
                for p in (*adapter.down.parameters(), *adapter.up.parameters()):
                    p.copy_(torch.randn(p.shape, generator=g) * std)
            adapter.down.requires_grad_(True)
            adapter.up.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- building -------------------------------------------------------------------------------------
def randomize_lora(model, seed: int = 3, std: float = 0.02) -> None:
    """Non-zero A and B in every LoRA adapter (as bench_core.randomize), so the update is real work."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, lk.AdaptedLayer):
                for adapter in layer.adapters.values():
                    adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=g) * std)
                    adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * std)


def build(width: int | None) -> tuple[dict[str, nn.Module], dict]:
    """The four variants (copies of one loaded model) and a description of the adapters."""
    base, _ = models.load("", log=lambda msg: print(msg, file=sys.stderr))
    base.requires_grad_(False)
    cfg = base.config
    lora = copy.deepcopy(base)
    lk.adapt(lora, lk.LoRA(rank=RANK, alpha=ALPHA), targets=TARGETS)
    randomize_lora(lora)
    lora.eval()
    lora_params = sum(p.numel() for p in lk.trainable_parameters(lora))
    merged = copy.deepcopy(lora)
    lk.merge(merged)
    width = width or matching_width(lora_params, cfg.hidden_size, cfg.num_hidden_layers)
    houlsby = copy.deepcopy(base)
    houlsby_n = add_houlsby(houlsby, width)
    houlsby.eval()
    assert houlsby_n == houlsby_params(cfg.hidden_size, width, cfg.num_hidden_layers), houlsby_n
    info = {"model": models.DEFAULT_MODEL, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "lora": {"rank": RANK, "alpha": ALPHA, "targets": TARGETS, "trainable": lora_params},
            "houlsby": {"width": width, "per_layer": 2, "after": ["self_attn.o_proj", "mlp.down_proj"],
                        "activation": "gelu", "bias": True, "trainable": houlsby_n,
                        "vs_lora_params": houlsby_n / lora_params}}
    return {"base": base, "lora": lora, "merged": merged, "houlsby": houlsby}, info


def hidden(model, ids):
    """One timed forward: the decoder stack's last hidden state (no LM head, no KV cache)."""
    def run():
        with torch.no_grad():
            return model.model(input_ids=ids, use_cache=False).last_hidden_state

    return run


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def check(variants: dict[str, nn.Module], vocab: int) -> dict:
    """merged == unmerged (hidden states and full logits) within NUMERIC_TOL; LoRA and Houlsby change the output."""
    ids = harness.tokens(2, 32, seed=9, vocab=vocab)
    with torch.no_grad():
        h = {name: hidden(m, ids)() for name, m in variants.items()}
        logits = {name: variants[name](input_ids=ids, use_cache=False).logits for name in ("base", "lora", "merged")}
    out = {"input": "2x32",
           "merged_vs_lora_hidden": relative(h["lora"], h["merged"]),
           "merged_vs_lora_logits": relative(logits["lora"], logits["merged"]),
           "lora_vs_base_hidden": relative(h["base"], h["lora"]),
           "lora_vs_base_logits": relative(logits["base"], logits["lora"]),
           "houlsby_vs_base_hidden": relative(h["base"], h["houlsby"])}
    out["merged_equals_unmerged"] = max(out["merged_vs_lora_hidden"], out["merged_vs_lora_logits"]) <= NUMERIC_TOL
    out["adapters_change_output"] = min(out["lora_vs_base_hidden"], out["houlsby_vs_base_hidden"]) > 10 * NUMERIC_TOL
    return out


# --- timing ---------------------------------------------------------------------------------------
def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            batch, seq = (int(v) for v in item.lower().strip().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is not BATCHxSEQ (e.g. 32x512)") from None
        shapes.append((batch, seq))
    return shapes


def default_repeats(tokens: int) -> int:
    return 3 if tokens >= 8192 else 7 if tokens >= 1024 else 30


def bench_shape(variants: dict[str, nn.Module], batch: int, seq: int, args, vocab: int) -> dict:
    ids = harness.tokens(batch, seq, vocab=vocab)
    repeats = args.repeats or default_repeats(batch * seq)
    warmup = args.warmup if args.warmup is not None else (1 if batch * seq >= 1024 else 3)
    wait_quiet(args.wait_quiet)
    t, load, spread = timed({name: hidden(m, ids) for name, m in variants.items()}, repeats, warmup)
    row = {"shape": f"{batch}x{seq}", "batch": batch, "seq": seq, "repeats": repeats, "warmup": warmup,
           "other_cores": load, "spread": spread, "paper_houlsby": PAPER_HOULSBY.get(f"{batch}x{seq}", "-")}
    for name in VARIANTS:
        row[f"{name}_ms"] = 1e3 * t[name]
        if name != "base":
            row[f"{name}_vs_base"] = t[name] / t["base"]
            row[f"{name}_pct"] = f"{100 * (t[name] / t['base'] - 1):+.1f}%"
            row[f"{name}_noise"] = spread["base"] + spread[name]
    print(f"  {row['shape']}: " + ", ".join(f"{n} {row[f'{n}_ms']:.1f} ms" for n in VARIANTS)
          + f", other load {load:.2f}", file=sys.stderr, flush=True)
    return row


# --- report ---------------------------------------------------------------------------------------
def report(rows: list[dict], info: dict, checks: dict) -> None:
    lo, ho = info["lora"], info["houlsby"]
    print(f"\n{info['model']} ({info['layers']} layers, hidden {info['hidden']}), fp32, CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads on {os.cpu_count()} cores; no-grad forward of the decoder stack "
          "(no LM head, no KV cache); medians of interleaved repeats")
    print(f"lora: r={lo['rank']} alpha={lo['alpha']} on {','.join(lo['targets'])}, {lo['trainable']:,} trainable; "
          f"houlsby: width {ho['width']} after o_proj and down_proj of every layer (2 per layer, gelu, biases), "
          f"{ho['trainable']:,} trainable ({ho['vs_lora_params']:.3f} x LoRA's)")
    ok = "ok" if checks["merged_equals_unmerged"] else "FAILED"
    print(f"numerics ({checks['input']}): merged vs unmerged max|Δ|/max| | hidden {checks['merged_vs_lora_hidden']:.1e}, "
          f"logits {checks['merged_vs_lora_logits']:.1e} (<= {NUMERIC_TOL:.0e}: {ok}); change from base: "
          f"lora {checks['lora_vs_base_hidden']:.1e}, houlsby {checks['houlsby_vs_base_hidden']:.1e}")
    print()
    print(harness.table(rows, [("shape", "batch x seq", ""), ("repeats", "n", "d"), ("base_ms", "base ms", ".1f"),
                               ("lora_ms", "LoRA ms", ".1f"), ("lora_pct", "LoRA", ""),
                               ("merged_ms", "merged ms", ".1f"), ("merged_pct", "merged", ""),
                               ("houlsby_ms", "Houlsby ms", ".1f"), ("houlsby_pct", "Houlsby", ""),
                               ("paper_houlsby", "paper AdapterH", ""),
                               ("merged_noise", "merged noise ±", ".3f"), ("houlsby_noise", "Houlsby noise ±", ".3f"),
                               ("other_cores", "other load", ".2f")]))
    print("\n'noise ±' = spread of the base + spread of the variant (each: half its samples' range / its median); "
          "'paper AdapterH' = LoRA paper Table 1, GPT-2 medium on a GPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=None, help=f"BATCHxSEQ,... (default {SHAPES}; --quick {QUICK_SHAPES})")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per variant for every shape (default 3 at >= 8192 tokens, 7 at >= 1024, "
                             "30 below; --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1, 3 below 1024 tokens; --quick 1)")
    parser.add_argument("--adapter-width", type=int, default=None,
                        help="Houlsby bottleneck width (default: the one matching LoRA's trainable parameter count)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's, = cores)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each shape wait up to this long for other processes to go idle")
    parser.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, 2 repeats, 1 warm-up: a smoke run")
    parser.add_argument("--json", default=None,
                        help="results file (default benchmarks/results/latency.json; with --quick latency-quick.json)")
    args = parser.parse_args()
    args.shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    if args.quick:
        args.repeats = args.repeats or 2
        args.warmup = 1 if args.warmup is None else args.warmup
    args.json = args.json or f"benchmarks/results/latency{'-quick' if args.quick else ''}.json"
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = parse_shapes(args.shapes)

    variants, info = build(args.adapter_width)
    vocab = variants["base"].config.vocab_size
    checks = check(variants, vocab)
    print(f"  check: {checks}", file=sys.stderr, flush=True)
    if not checks["merged_equals_unmerged"] or not checks["adapters_change_output"]:
        raise SystemExit(f"numerics check failed: {checks}")
    rows = [bench_shape(variants, batch, seq, args, vocab) for batch, seq in shapes]
    report(rows, info, checks)
    import transformers

    harness.write_json(args.json, {"transformers": transformers.__version__, "args": vars(args),
                                   "forward": "model.model(input_ids, use_cache=False).last_hidden_state, no_grad",
                                   **info, "check": checks, "paper_table1_houlsby": PAPER_HOULSBY, "shapes": rows})
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
