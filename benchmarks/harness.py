"""Shared pieces of the benchmark scripts: the model, round-robin timing, per-process peak memory, output.

Timings interleave the contenders (A B A B ...) after a warm-up and report medians, so slow drift
of a shared 2-core machine hits every side alike; ratios are what the scripts report.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

import torch


def smollm2_config(layers: int = 30):
    """A Llama config the size of SmolLM2-135M (random weights: no hub is reachable)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                       tie_word_embeddings=True, rms_norm_eps=1e-5)


def llama(layers: int = 30, seed: int = 0):
    """A SmolLM2-135M-sized LlamaForCausalLM in float32, eval mode, fixed seed."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(smollm2_config(layers)).eval()


def tokens(batch: int, length: int, seed: int = 1, vocab: int = 49152) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def round_robin(contenders: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each contender, calls interleaved."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def reset_peak_rss() -> None:
    """Start a new peak-RSS measurement for this process (Linux: clear_refs 5 resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    """Peak resident set size of this process since start or ``reset_peak_rss()``, MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def current_rss_mb() -> float:
    """Resident set size of this process now, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def in_child(script: str, *args: str) -> dict:
    """Run ``script args`` in a fresh Python process and return the JSON object it prints last."""
    out = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A text table: ``columns`` are (key, header, format spec)."""
    cells = [[format(r[k], f) if k in r else "-" for k, _, f in columns] for r in rows]
    headers = [h for _, h, _ in columns]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(headers)]  # rows may be none
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in cells]
    return "\n".join(lines)


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"torch": torch.__version__, "threads": torch.get_num_threads(), **data}
    path.write_text(json.dumps(data, indent=2) + "\n")
