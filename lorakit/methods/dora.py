"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

The adapted weight is a learned magnitude times a unit direction, per output feature j:

    W'_j = m_j · (W + s·B·A)_j / n_j        n_j = ‖(W + s·B·A)_j‖₂   (detached, paper §4.3 and PEFT)

computed without materialising W' (PEFT's form):

    h = W·x + b + (m/n − 1) ⊙ (W·x) + (m/n) ⊙ s·B·(A·x)

m starts at ‖W_j‖ (so the layer starts as the base) and, like A and B, is trained. For a linear layer
n is computed from ‖W_j‖², W·Aᵀ and A·Aᵀ (d_out × r and r × r), never from a d_out × d_in matrix:

    n_j² = ‖W_j‖² + 2s·Σ_k B_jk (W·Aᵀ)_jk + s²·B_j (A·Aᵀ) B_jᵀ

Rows are output features for linear layers (``(d_out, d_in)``), output channels for convs (norm over
in × kernel) and embedding dimensions for embeddings (norm over the vocabulary), as in PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import MergeError
from lorakit.methods.base import Adapter, LayerSpec, add_update
from lorakit.methods.lora import LoRA, LoRAAdapter


@dataclass(frozen=True)
class DoRA(LoRA):
    """LoRA on the direction of each output row, plus a trainable magnitude per row."""

    name: ClassVar[str] = "dora"

    def build(self, spec: LayerSpec, init: bool = True) -> "DoRAAdapter":
        return DoRAAdapter(spec, self.rank, self.scale, self.dropout, init)

    def peft_config(self) -> dict:
        return {**super().peft_config(), "use_dora": True}

    @classmethod
    def from_peft(cls, config: dict) -> "DoRA | None":
        """PEFT's LORA configs with ``use_dora``."""
        return cls._from_peft_lora(config) if config.get("peft_type") == "LORA" and config.get("use_dora") else None


class DoRAAdapter(Adapter):
    """A LoRA update (``lora``) and the magnitude vector ``m`` (d_out,)."""

    needs_base = True  # the layer passes W·x (no bias) to rescale it

    def __init__(self, spec: LayerSpec, rank: int, scale: float, dropout: float, init: bool = True):
        super().__init__()
        if spec.layout == "conv" and spec.groups > 1:
            raise MergeError("DoRA needs the full update B·A, which a grouped conv's LoRA cannot form")
        self.spec, self.scale = spec, scale
        self.lora = LoRAAdapter(spec, rank, scale, dropout, init)
        # Per output feature: dim 0 of the canonical weight for convs and linears, dim 1 for embeddings.
        self.magnitude = nn.Parameter(torch.empty(spec.d_out, device=spec.device, dtype=spec.dtype))
        if init:
            with torch.no_grad():
                self.magnitude.copy_(self.weight_norm())

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """n = per-row ‖W + s·B·A‖₂ in float32 (no gradient flows through it)."""
        W = self.spec.weight()
        A, B, s = self.lora.lora_A.float(), self.lora.lora_B.float(), self.scale
        if self.spec.layout == "linear":
            WA = W @ A.t()  # (d_out, r)
            squared = W.pow(2).sum(1) + 2 * s * (B * WA).sum(1) + s * s * ((B @ (A @ A.t())) * B).sum(1)
            return squared.clamp_min(0).sqrt()
        if self.spec.layout == "embedding":
            return (W + self.lora.delta_weight()).norm(dim=0)  # (dim,): over the vocabulary
        return (W + self.lora.delta_weight()).flatten(1).norm(dim=1)

    def _feature_view(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``v`` (d_out,) shaped to broadcast over ``like``'s feature axis (last, or 1 for convs)."""
        return v.view(-1, *(1,) * (like.dim() - 2)) if self.spec.layout == "conv" else v

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        dropout = self.lora.dropout
        if dropout is not None:
            x = dropout(x)
            if self.training:  # the rescaled base term must see the same dropped-out input (as PEFT)
                W = self.spec.weight().to(x.dtype)
                base = self.spec.conv(x, W) if self.spec.layout == "conv" else F.linear(x, W)
        g = self._feature_view(self.magnitude / self.weight_norm().to(self.magnitude.dtype), out)  # m/n
        return add_update(out, (g - 1) * base.to(g.dtype) + g * self.lora.update(x))

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (m/n)·(W + s·B·A) − W, float32."""
        W = self.spec.weight()
        g = self.magnitude.float() / self.weight_norm()
        shape = (1, -1) if self.spec.layout == "embedding" else (-1, *(1,) * (W.dim() - 1))
        return g.view(shape) * (W + self.lora.delta_weight()) - W

    def export(self) -> dict[str, torch.Tensor]:
        """PEFT's keys; a conv's magnitude is stored as PEFT stores it, (1, out, 1, ...)."""
        magnitude = self.magnitude
        if self.spec.layout == "conv":
            magnitude = magnitude.view(1, -1, *(1,) * len(self.spec.kernel_size))
        return {**self.lora.export(), "lora_magnitude_vector": magnitude}
