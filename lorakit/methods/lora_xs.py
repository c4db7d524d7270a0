"""LoRA-XS (Bałazy et al. 2024, arXiv 2405.17604): a trainable r×r core between frozen singular vectors.

    ΔW = s·B·R·A        B = U_r (d_out, r),  A = diag(σ_r)·V_rᵀ (r, d_in)  frozen;  R (r, r) trainable

Trainable parameters: r² per matrix. R starts at zero, so the layer starts as the base exactly and
still learns (∂L/∂R = s·Bᵀ·∂L/∂ΔW·Aᵀ is non-zero because A and B are); ``init="gaussian"`` gives the
paper's R ~ N(0, 1e-5²). A and B are saved with R: a reloaded core must sit between the very same
singular vectors (a flipped sign or a different randomized SVD would rotate it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import svd
from lorakit.errors import ConfigError
from lorakit.methods.base import (Adapter, LayerSpec, Method, add_low_rank, check_dropout, check_int, check_linear,
                                  check_positive)


@dataclass(frozen=True)
class LoRAXS(Method):
    """r×r trainable core in the top-``rank`` singular basis; ``alpha=None`` means alpha = rank (scale 1)."""

    name: ClassVar[str] = "lora_xs"
    rank: int = 8
    """rank r: the singular triplets around the trainable r×r core"""
    alpha: float | None = None
    """scale numerator (scale alpha/r); unset: alpha = r, scale 1"""
    init: Literal["zeros", "gaussian"] = "zeros"
    """the core's start: zeros (exactly the base) or gaussian (the paper's N(0, 1e-5²))"""
    niter: int | None = None
    """randomized SVD with this many subspace iterations (fast); unset: the exact SVD"""
    dropout: float = 0.0
    """dropout on the adapter's input"""

    def __post_init__(self):
        check_int("LoRAXS", 1, rank=self.rank)
        check_positive("LoRAXS", alpha=self.alpha, niter=self.niter)
        check_dropout("LoRAXS", self.dropout)
        if self.init not in ("zeros", "gaussian"):
            raise ConfigError(f"LoRAXS: init must be 'zeros' or 'gaussian', got {self.init!r}")

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank

    def build(self, spec: LayerSpec, init: bool = True) -> "LoRAXSAdapter":
        """The adapter for one layer; ``init=False`` skips the SVD (its tensors are about to be loaded)."""
        check_linear("LoRAXS", spec, self.rank)
        adapter = LoRAXSAdapter(spec, self.rank, self.scale, self.dropout)
        if init:
            U, S, Vh = svd.top(spec.weight(), self.rank, self.niter, source=spec.source)
            with torch.no_grad():
                adapter.lora_A.copy_(S[:, None] * Vh)
                adapter.lora_B.copy_(U)
                if self.init == "gaussian":
                    adapter.lora_latent.normal_(0.0, 1e-5)
        return adapter


class LoRAXSAdapter(Adapter):
    """Frozen ``lora_A`` (r, d_in) and ``lora_B`` (d_out, r); trainable ``lora_latent`` R (r, r)."""

    def __init__(self, spec: LayerSpec, rank: int, scale: float, dropout: float):
        super().__init__()
        self.spec, self.rank, self.scale, self.dropout_p = spec, rank, scale, dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        factory = dict(device=spec.device, dtype=spec.dtype)
        # Frozen but saved (persistent buffers): see the module docstring.
        self.register_buffer("lora_A", torch.zeros(rank, spec.d_in, **factory))
        self.register_buffer("lora_B", torch.zeros(spec.d_out, rank, **factory))
        self.lora_latent = nn.Parameter(torch.zeros(rank, rank, **factory))

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        h = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_latent * self.scale)  # (..., r)
        return add_low_rank(out, h, self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B·R·A, float32."""
        return self.lora_B.float() @ (self.lora_latent.float() * self.scale) @ self.lora_A.float()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(R·A, B, s) for batched per-row routing."""
        return self.lora_latent @ self.lora_A, self.lora_B, self.scale

    def export(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_latent": self.lora_latent}
