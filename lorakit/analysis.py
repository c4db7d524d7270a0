"""Parameter and memory arithmetic: what a method trains on a weight of a given shape."""

from __future__ import annotations

from lorakit.errors import ConfigError
from lorakit.methods.base import Method, shape_spec


def trainable_numel(recipe: Method, d_out: int, d_in: int) -> int:
    """Trainable numbers one adapter of ``recipe`` adds to a d_out × d_in linear weight: the adapter itself,
    built on the meta device (no memory, no weight, no SVD), its trainable parameters counted."""
    adapter = recipe.build(shape_spec(d_out, d_in))
    return sum(p.numel() for p in adapter.parameters() if p.requires_grad)


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
