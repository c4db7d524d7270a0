"""Parameter and memory arithmetic: what a method trains on a weight of a given shape."""

from __future__ import annotations

from lorakit.errors import ConfigError


def trainable_count(method: str, d_out: int, d_in: int, rank: int = 8, width: int = 0) -> int:
    """Trainable numbers one adapter of ``method`` adds to a d_out × d_in weight (METHODS.md formulas)."""
    n = min(d_out, d_in)
    d = min(width, n - 1)
    counts = {
        "lora": rank * (d_in + d_out), "rslora": rank * (d_in + d_out), "pissa": rank * (d_in + d_out),
        "milora": rank * (d_in + d_out), "dora": rank * (d_in + d_out) + d_out, "lora_xs": rank * rank,
        "svf": n, "svft": n * (2 * d + 1) - d * (d + 1), "adalora": rank * (d_in + d_out + 1),
    }
    if method not in counts:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(counts)}")
    return counts[method]


def parse_shape(text: str) -> tuple[int, int]:
    """'8192x4096' → (8192, 4096) (d_out, d_in)."""
    try:
        d_out, d_in = (int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise ConfigError(f"a shape is d_out x d_in, like 8192x4096; got {text!r}") from None
    if d_out <= 0 or d_in <= 0:
        raise ConfigError(f"shape dimensions must be positive, got {text!r}")
    return d_out, d_in


def training_memory_bytes(trainable: int, frozen: int, weight_bytes: int = 4) -> int:
    """Weights (frozen and trainable, ``weight_bytes`` each) + fp32 gradients and AdamW's two fp32 states
    for the trainable part. Activations are not included: they depend on batch and sequence length."""
    return (trainable + frozen) * weight_bytes + trainable * 4 * 3
