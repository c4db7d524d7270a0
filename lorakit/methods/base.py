"""The method protocol: a frozen dataclass recipe that builds an adapter for one layer.

Every method in lorakit is a small named update to a frozen layer's weight. A *recipe*
(``lk.LoRA(rank=8)``) describes it; ``recipe.build(spec)`` returns an *adapter*, an
``nn.Module`` that holds the method's tensors and math:

    adapter(x, base_out) -> base_out + contribution(x)     # forward, may add in place
    adapter.delta_weight() -> ΔW (float32, in the layer's canonical layout)
    adapter.export() / adapter.load_tensors(...)          # what goes on disk, and back

Canonical layouts: "linear" is ``(d_out, d_in)`` (GPT-2's Conv1D is transposed by the layer,
not by the method), "conv" is the base kernel's ``(out, in/groups, *kernel)``, "embedding" is
``(num_embeddings, embedding_dim)``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from lorakit.errors import ConfigError


@dataclass(frozen=True)
class LayerSpec:
    """What a method needs to know about the layer it adapts."""

    kind: str  # "linear" | "conv" | "embedding"
    d_in: int  # in_features, in_channels or num_embeddings
    d_out: int  # out_features, out_channels or embedding_dim
    device: torch.device
    dtype: torch.dtype  # dtype the adapter's tensors are created in
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: Any = 0
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_idx: int | None = None
    # Convolution with the base geometry (stride, padding and its mode, dilation) and groups=1.
    conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # Returns the frozen base weight in canonical layout, float32; for methods built on its SVD.
    weight: Callable[[], torch.Tensor] | None = None
    source: torch.Tensor | None = None  # the layer's weight parameter: identifies it to caches (svd)


@runtime_checkable
class Adapter(Protocol):
    """One method's tensors and math on one layer (an ``nn.Module``)."""

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor: ...

    def delta_weight(self) -> torch.Tensor: ...

    def export(self) -> dict[str, torch.Tensor]: ...

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None: ...


class Method(Protocol):
    """A recipe: a frozen dataclass with ``build(spec) -> Adapter``."""

    name: ClassVar[str]

    def build(self, spec: LayerSpec, init: bool = True) -> nn.Module:
        """An adapter for one layer; ``init=False`` may skip costly inits (the tensors are loaded next)."""


METHODS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a recipe loadable by its ``name`` from a saved adapter config."""
    METHODS[cls.name] = cls
    return cls


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive(owner: str, **values: float | None) -> None:
    """Raise ConfigError for any value that is not a finite number > 0 (None is allowed: 'use the default')."""
    for key, value in values.items():
        if value is not None and not (_is_number(value) and 0 < value < math.inf):
            raise ConfigError(f"{owner}: {key} must be > 0 and finite, got {value!r}")


def check_dropout(owner: str, p: float) -> None:
    """Raise ConfigError unless p is a number in [0, 1)."""
    if not (_is_number(p) and 0.0 <= p < 1.0):
        raise ConfigError(f"{owner}: dropout must be in [0, 1), got {p!r}")


def check_finite(recipe: Any) -> None:
    """Raise ConfigError for any numeric setting of ``recipe`` (a method dataclass) that is NaN or infinite."""
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        if _is_number(value) and not math.isfinite(value):
            raise ConfigError(f"{type(recipe).__name__}: {f.name} must be finite, got {value!r}")


def recipe_fields(recipe: Any) -> dict[str, Any]:
    """The recipe's settings as a JSON-ready dict (what a saved config stores)."""
    return {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)}


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters train in float32 on half-precision bases (as PEFT's autocast_adapter_dtype)."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
