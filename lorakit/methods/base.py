"""The method contract: a recipe (frozen dataclass) builds an adapter (``nn.Module``) for one layer.

Every method in lorakit is a small named update to a frozen layer's weight. A *recipe*
(``lk.LoRA(rank=8)``) subclasses ``Method``; ``recipe.build(spec)`` returns an *adapter*, a
subclass of ``Adapter`` that holds the method's tensors and math. Both base classes declare the
required members (abstract) and every optional capability with the default that means "not
supported", so the rest of lorakit asks for a capability one way: by calling it.

Canonical layouts: "linear" is ``(d_out, d_in)`` (GPT-2's Conv1D is transposed by the layer,
not by the method), "conv" is the base kernel's ``(out, in/groups, *kernel)``, "embedding" is
``(num_embeddings, embedding_dim)``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import ConfigError, ShapeMismatchError, UnsupportedLayerError

_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class BaseWeight(Protocol):
    """Whatever holds a layer's frozen base weight (an adapted layer, or a plain module before wrapping)."""

    def base_weight(self) -> torch.Tensor:
        """The unmerged base weight in canonical layout, float32, detached."""


@dataclass(frozen=True)
class LayerSpec:
    """What a method needs to know about the layer it adapts: plain data, and where its base weight is read."""

    layout: str  # "linear" | "conv" | "embedding"
    d_in: int  # in_features, in_channels or num_embeddings
    d_out: int  # out_features, out_channels or embedding_dim
    device: torch.device
    dtype: torch.dtype  # dtype the adapter's tensors are created in
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: Any = 0
    dilation: tuple[int, ...] = ()
    groups: int = 1
    # The explicit padding a non-"zeros" padding_mode applies first (torch's _reversed_padding_repeated_twice).
    padding_mode: str = "zeros"
    reversed_padding: tuple[int, ...] = ()
    padding_idx: int | None = None
    base: BaseWeight | None = None  # None: a spec of shapes only (the parameter calculator's, on meta)
    source: torch.Tensor | None = None  # the layer's weight parameter: identifies it to caches (svd)

    def weight(self) -> torch.Tensor:
        """The frozen base weight in canonical layout, float32; for methods built on it (SVD, DoRA's norm)."""
        if self.base is None:  # a spec of shapes only: a meta tensor of the canonical shape
            shape = {"linear": (self.d_out, self.d_in), "embedding": (self.d_in, self.d_out),
                     "conv": (self.d_out, self.d_in // self.groups, *self.kernel_size)}[self.layout]
            return torch.zeros(shape, device="meta")
        return self.base.base_weight()

    def conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Convolution of ``x`` by ``weight`` with the base layer's geometry (stride, padding and its mode,
        dilation), groups=1."""
        conv = _CONVS[len(self.kernel_size)]
        if self.padding_mode != "zeros":
            x = F.pad(x, self.reversed_padding, mode=self.padding_mode)
            return conv(x, weight, None, self.stride, 0, self.dilation)
        return conv(x, weight, None, self.stride, self.padding, self.dilation)


def shape_spec(d_out: int, d_in: int) -> LayerSpec:
    """A linear layer's spec on the meta device, no weight behind it: what an adapter of that shape holds."""
    return LayerSpec(layout="linear", d_in=d_in, d_out=d_out, device=torch.device("meta"), dtype=torch.float32)


class Adapter(nn.Module):
    """One method's tensors and math on one layer. Subclasses implement the four required members;
    the optional capabilities below default to "not supported"."""

    # --- required ---------------------------------------------------------------------------------
    spec: LayerSpec  # set at build; the layer rebinds it when it moves or casts (device, dtype, base weight)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (the base output, or the sum so far) plus this adapter's contribution for input ``x``.
        With ``needs_base`` the layer calls ``forward(x, out, base)``, ``base`` = W·x without bias."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """ΔW: what merging adds to the base weight, float32, in the layer's canonical layout."""
        raise NotImplementedError

    def export(self) -> dict[str, torch.Tensor]:
        """The tensors a saved adapter holds, by key suffix (PEFT's suffixes where PEFT has the method)."""
        raise NotImplementedError

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Copy saved ``tensors`` (``export``'s keys) in, checking every key and shape; ``where`` names the module."""
        load_exported(self, tensors, where)

    # --- optional capabilities --------------------------------------------------------------------
    needs_base: ClassVar[bool] = False  # forward also takes ``base`` = W·x, no bias (DoRA rescales it)
    scale: float = 1.0  # the update's scale; routing fingerprints it
    dropout_p: float = 0.0  # dropout on the adapter input; the routed batch applies it per row

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A, B, s)`` with ΔW = s·B·A, A (r, d_in), B (d_out, r), for batched per-row routing and
        ``combine(how="linear")``; None when the update has no such form (DoRA, spectral methods, conv LoRA)."""
        return None

    def to_lora(self) -> tuple[Method, Adapter] | None:
        """The plain LoRA (recipe, adapter) computing the same update, which PEFT loads; None if there is none."""
        return None

    def start(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A0, s·B0)``: a low-rank part of W the adapter starts from, which QPiSSA keeps in float while it
        quantizes the rest; None for adapters that start from zero."""
        return None

    def saved(self) -> dict[str, torch.Tensor]:
        """What ``lk.save`` writes: ``export()``, or less for adapters that prune themselves (AdaLoRA)."""
        return self.export()

    def support(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(rows, cols)`` of a coefficient vector ``values`` that mixes linearly across adapters of one recipe
        and support (SVF, SVFT: ``combine(how="interpolate")``); None otherwise."""
        return None


class Method:
    """Base class of recipes: frozen dataclasses whose fields are the method's settings (documented by
    attribute docstrings, which the CLI's ``--help`` shows). Subclasses set ``name`` and implement ``build``."""

    name: ClassVar[str]

    def build(self, spec: LayerSpec, init: bool = True) -> Adapter:
        """An adapter for one layer; ``init=False`` may skip costly inits (its tensors are loaded next)."""
        raise NotImplementedError

    # --- optional capabilities --------------------------------------------------------------------
    quantizes_residual: ClassVar[bool] = False  # quantize after adapting: the base becomes W − start (QPiSSA)

    def peft_config(self) -> dict | None:
        """The method-specific keys of PEFT's adapter_config.json; None when PEFT lacks the method."""
        return None

    @classmethod
    def from_peft(cls, config: dict) -> Method | None:
        """The recipe a PEFT adapter_config.json describes, if it is this method's; else None."""
        return None

    @classmethod
    def training_defaults(cls, steps: int) -> dict[str, Any]:
        """Settings a training run of ``steps`` optimizer steps fills in unless given (a schedule's length)."""
        return {}

    def on_step(self, adapters: Sequence[Adapter], step: int) -> None:
        """Run after optimizer step ``step`` over every layer's adapter of one name (AdaLoRA's rank budget)."""

    def regularization(self, adapters: Sequence[Adapter]) -> torch.Tensor | None:
        """A term to add to the training loss over every layer's adapter of one name; None for none."""
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(owner: str, minimum: int | None, **values: Any) -> None:
    """Raise ConfigError for any value that is not an int (bool is not one here) >= ``minimum`` (None: any)."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{owner}: {key} must be an int, got {value!r}")
        if minimum is not None and value < minimum:
            bound = "> 0" if minimum == 1 else f">= {minimum}"
            raise ConfigError(f"{owner}: {key} must be {bound}, got {value!r}")


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


def check_linear(owner: str, spec: LayerSpec, rank: int | None = None) -> None:
    """Raise unless ``spec`` is a linear layer (methods built on a 2-D weight's SVD) with ``rank`` <= min(d)."""
    if spec.layout != "linear":
        raise UnsupportedLayerError(f"{owner} adapts linear layers, not {spec.layout} layers")
    if rank is not None and rank > min(spec.d_in, spec.d_out):
        raise ConfigError(f"{owner}: rank {rank} exceeds the layer's {spec.d_out}x{spec.d_in} weight")


def setting_names(recipe: Any) -> set[str]:
    """The names of a recipe's (or recipe class's) settings: its dataclass fields."""
    return {f.name for f in dataclasses.fields(recipe)}


def recipe_fields(recipe: Any) -> dict[str, Any]:
    """The recipe's settings as a JSON-ready dict (what a saved config stores)."""
    return {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)}


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters train in float32 on half-precision bases (as PEFT's autocast_adapter_dtype)."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def add_update(out: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``out`` + an adapter's ``update`` of the same shape, in ``out``'s dtype.

    On a 16-bit base under float32 adapters the sum is taken in float32 and rounded once, as PEFT does
    (rounding the update to 16 bits first, then the sum, left bf16 logits 3.4e-3 from PEFT's on a tiny Llama).
    """
    if out.dtype == update.dtype:
        return out + update
    return (out.to(update.dtype) + update).to(out.dtype)


def add_low_rank(out: torch.Tensor, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``out + h·Bᵀ`` for a rank-r intermediate ``h`` (..., r) and ``B`` (d_out, r), in ``out``'s dtype: one fused
    addmm, in ``h``'s dtype (under autocast, the autocast one), rounded once to ``out``'s (see ``add_update``)."""
    rows = out.reshape(-1, B.shape[0])
    fused = torch.addmm(rows if rows.dtype == h.dtype else rows.to(h.dtype), h.reshape(-1, B.shape[1]), B.t())
    return fused.view(out.shape).to(out.dtype)


def load_exported(adapter: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``tensors`` into the tensors ``adapter.export()`` names, checking keys and shapes."""
    own = adapter.export()
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        raise ShapeMismatchError(f"{where}: adapter tensors missing {missing} / unexpected {extra}")
    for key, target in own.items():
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise ShapeMismatchError(
                f"{where}.{key}: the file has shape {tuple(tensors[key].shape)}, the model needs {tuple(target.shape)}")
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(tensors[key])
