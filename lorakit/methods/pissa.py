"""PiSSA (Meng et al. 2024, arXiv 2404.02948) and MiLoRA (Wang et al. 2024, arXiv 2406.09044).

Both start the LoRA factors on a slice of the weight's SVD ``W = U·diag(σ)·Vᵀ``: PiSSA on the r
principal triplets, MiLoRA on the r minor ones, split symmetrically with the scale divided out:

    A0 = diag(√(σ_r/s))·V_rᵀ  (r, d_in)      B0 = U_r·diag(√(σ_r/s))  (d_out, r)      so s·B0·A0 = U_r·diag(σ_r)·V_rᵀ

The papers then replace W by the residual ``W − s·B0·A0``. Here the base stays untouched and the
adapter is the difference from its own start, with A0 and B0 frozen:

    h = W·x + s·(B·(A·dropout(x)) − B0·(A0·x))     (= the papers' W_res·x + s·B·A·dropout(x) exactly)

so the output at init (without dropout) equals the base bit for bit, ``lk.disabled`` is the base,
other adapters can sit beside it, and ``to_lora()`` is the plain rank-2r LoRA ``A' = [A; A0]``,
``B' = [B | −B0]`` that PEFT loads on the original base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import svd
from lorakit.errors import ConfigError
from lorakit.methods.base import Adapter, LayerSpec, Method, add_update, check_dropout, check_int, check_linear, check_positive
from lorakit.methods.lora import LoRA, LoRAAdapter


@dataclass(frozen=True)
class PiSSA(Method):
    """Principal singular values and vectors adaptation: LoRA started on the top-``rank`` SVD part.

    ``alpha=None`` means alpha = rank (scale 1, the paper's setting). ``niter`` uses randomized SVD
    with that many subspace iterations (fast, slightly less exact); None is the full SVD.
    """

    name: ClassVar[str] = "pissa"
    quantizes_residual: ClassVar[bool] = True  # QPiSSA: quantize W minus the adapter's start
    rank: int = 8
    """rank r: the singular triplets the adapter starts on"""
    alpha: float | None = None
    """scale numerator (scale alpha/r); unset: alpha = r, scale 1 (the paper's)"""
    niter: int | None = None
    """randomized SVD with this many subspace iterations (fast); unset: the exact SVD"""
    dropout: float = 0.0
    """dropout on the trainable chain's input"""

    def __post_init__(self):
        owner = type(self).__name__
        check_int(owner, 1, rank=self.rank)
        check_positive(owner, alpha=self.alpha, niter=self.niter)
        check_dropout(owner, self.dropout)

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank

    def triplets(self, spec: LayerSpec):
        """The singular triplets the adapter starts on."""
        return svd.top(spec.weight(), self.rank, self.niter, source=spec.source)

    def build(self, spec: LayerSpec, init: bool = True) -> "SVDStartAdapter":
        """The adapter for one layer; ``init=False`` skips the SVD (its tensors are about to be loaded)."""
        check_linear(type(self).__name__, spec, self.rank)
        if not init:
            return SVDStartAdapter(spec, self.scale, self.dropout, A0=torch.zeros(self.rank, spec.d_in),
                                   B0=torch.zeros(spec.d_out, self.rank))
        U, S, Vh = self.triplets(spec)
        root = (S / self.scale).sqrt()
        return SVDStartAdapter(spec, self.scale, self.dropout, A0=root[:, None] * Vh, B0=U * root)


@dataclass(frozen=True)
class MiLoRA(PiSSA):
    """Minor singular component LoRA: LoRA started on the bottom-``rank`` SVD part (full SVD only)."""

    name: ClassVar[str] = "milora"

    def __post_init__(self):
        super().__post_init__()
        if self.niter is not None:
            raise ConfigError("MiLoRA needs the full SVD: randomized SVD finds the largest singular values, "
                              "not the smallest; leave niter=None")

    def triplets(self, spec: LayerSpec):
        return svd.bottom(spec.weight(), self.rank, source=spec.source)


class SVDStartAdapter(Adapter):
    """Trainable ``lora_A``/``lora_B`` and their frozen starting values ``init_A``/``init_B``."""

    def __init__(self, spec: LayerSpec, scale: float, dropout: float, A0: torch.Tensor, B0: torch.Tensor):
        super().__init__()
        self.spec, self.scale, self.rank, self.dropout_p = spec, scale, A0.shape[0], dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        # Contiguous: LAPACK hands back column-major factors, and a reload (row-major) must compute the same bits.
        A0, B0 = (t.to(device=spec.device, dtype=spec.dtype).contiguous() for t in (A0, B0))
        self.lora_A = nn.Parameter(A0.clone())  # (r, d_in)
        self.lora_B = nn.Parameter(B0.clone())  # (d_out, r)
        # Frozen, and saved: a reload must not redo an SVD that randomized or LAPACK details could change.
        self.register_buffer("init_A", A0)
        self.register_buffer("init_B", B0)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.dtype)
        # Dropout belongs to the trainable chain only: the frozen one stands for the part of W the papers
        # move out of the base (W_res·x sees the whole input), so it must see x as W does.
        dropped = x if self.dropout is None else self.dropout(x)
        # Two identical chains subtracted (not one rank-2r product) so they cancel exactly while B = B0, A = A0.
        delta = (F.linear(F.linear(dropped, self.lora_A) * self.scale, self.lora_B)
                 - F.linear(F.linear(x, self.init_A) * self.scale, self.init_B))
        return add_update(out, delta)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·(B·A − B0·A0), float32."""
        A, B, A0, B0 = (t.float() for t in (self.lora_A, self.lora_B, self.init_A, self.init_B))
        return (B @ A - B0 @ A0) * self.scale

    def start(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A0, s·B0)``: the low-rank part of W the adapter starts from (QPiSSA quantizes W minus it)."""
        return self.init_A, self.init_B * self.scale

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A', B')`` of the equivalent plain LoRA of rank 2r: ``[A; A0]``, ``[B | −B0]``."""
        return torch.cat([self.lora_A, self.init_A]), torch.cat([self.lora_B, -self.init_B], dim=1)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) for batched per-row routing."""
        return (*self.lora_factors(), self.scale)

    def to_lora(self) -> tuple[LoRA, LoRAAdapter]:
        """The plain rank-2r LoRA recipe and adapter computing the same update (its dropout, if any,
        covers both halves, as in PEFT's conversion: the same function outside training)."""
        return LoRA.from_factors(self.spec, *self.lora_factors(), scale=self.scale, dropout=self.dropout_p)

    def export(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B,
                "init_A": self.init_A, "init_B": self.init_B}

