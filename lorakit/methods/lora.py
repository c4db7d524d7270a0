"""LoRA (Hu et al. 2021, arXiv 2106.09685) and rsLoRA (Kalajdzievski 2023, arXiv 2312.03732).

    h = W0·x + s · B·(A·dropout(x))        A: (r, d_in), B: (d_out, r), s = alpha/r  (rsLoRA: alpha/√r)

         x ──────────────▶ [ W0 (frozen) ] ──────────────▶ (+) ──▶ h
         └──▶ dropout ──▶ [ A ] ──▶ (r) ──▶ ×s ──▶ [ B ] ──┘

A starts Kaiming-uniform and B at zero, so the adapted layer is exactly the base at init. For
embeddings the roles swap (A = 0, B ~ N(0, 1), no dropout), as in loralib and PEFT. Conv layers
get A as a conv with the base kernel geometry and B as a 1×1 conv (PEFT's layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import ConfigError, MergeError
from lorakit.methods.base import Adapter, LayerSpec, Method, add_low_rank, add_update, check_dropout, check_int, check_positive

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class LoRA(Method):
    """Low-rank update ``s·B·A``; ``rslora=True`` scales by alpha/√rank instead of alpha/rank."""

    name: ClassVar[str] = "lora"
    rank: int = 8
    """rank r of the update B·A"""
    alpha: float = 16.0
    """scale numerator: the update is scaled by alpha/r (alpha/√r with rslora)"""
    dropout: float = 0.0
    """dropout on the adapter's input"""
    rslora: bool = False
    """rank-stabilised scale alpha/√r (Kalajdzievski 2023)"""

    def __post_init__(self):
        check_int(type(self).__name__, 1, rank=self.rank)
        check_positive(type(self).__name__, alpha=self.alpha)
        check_dropout(type(self).__name__, self.dropout)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def build(self, spec: LayerSpec, init: bool = True) -> "LoRAAdapter":
        """The adapter for one layer (``init=False``: uninitialised, its tensors are about to be loaded)."""
        return LoRAAdapter(spec, self.rank, self.scale, self.dropout, init)

    def peft_config(self) -> dict:
        """The method-specific keys of PEFT's adapter_config.json."""
        return {"peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "use_rslora": self.rslora, "use_dora": False}

    @classmethod
    def from_peft(cls, config: dict) -> "LoRA | None":
        """PEFT's LORA configs without ``use_dora`` (those are DoRA's)."""
        if config.get("peft_type") != "LORA" or config.get("use_dora"):
            return None
        return cls._from_peft_lora(config)

    @classmethod
    def _from_peft_lora(cls, config: dict) -> "LoRA":
        return cls(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                   dropout=float(config.get("lora_dropout") or 0.0), rslora=bool(config.get("use_rslora")))

    @classmethod
    def from_factors(cls, spec: LayerSpec, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0,
                     dropout: float = 0.0) -> "tuple[LoRA, LoRAAdapter]":
        """The plain LoRA (recipe, adapter) with factors ``A`` (r, d_in), ``B`` (d_out, r) and scale ``scale``
        on the layer ``spec`` describes (reshaped to a conv's or an embedding's layout where need be)."""
        rank = A.shape[0]
        recipe = LoRA(rank=rank, alpha=scale * rank, dropout=dropout)
        adapter = recipe.build(spec, init=False)
        with torch.no_grad():
            adapter.lora_A.copy_(A.reshape(adapter.lora_A.shape))
            adapter.lora_B.copy_(B.reshape(adapter.lora_B.shape))
        return recipe, adapter


class LoRAAdapter(Adapter):
    """The tensors of one LoRA update on one layer: ``lora_A`` (r, d_in) and ``lora_B`` (d_out, r)."""

    def __init__(self, spec: LayerSpec, rank: int, scale: float, dropout: float, init: bool = True):
        super().__init__()
        if spec.layout == "conv" and rank % spec.groups:
            raise ConfigError(f"LoRA on a conv with groups={spec.groups} needs a rank divisible by it, got {rank}")
        self.spec, self.rank, self.scale, self.dropout_p = spec, rank, scale, dropout
        # Dropout is applied to the input of the low-rank branch only; skipped entirely when p=0.
        self.dropout = nn.Dropout(dropout) if dropout > 0 and spec.layout != "embedding" else None
        factory = dict(device=spec.device, dtype=spec.dtype)
        if spec.layout == "conv":
            self.lora_A = nn.Parameter(torch.empty(rank, spec.d_in, *spec.kernel_size, **factory))
            self.lora_B = nn.Parameter(torch.empty(spec.d_out, rank // spec.groups, *(1,) * len(spec.kernel_size), **factory))
        else:
            self.lora_A = nn.Parameter(torch.empty(rank, spec.d_in, **factory))
            self.lora_B = nn.Parameter(torch.empty(spec.d_out, rank, **factory))
        if init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """LoRA's init: the update starts at exactly zero."""
        if self.spec.layout == "embedding":
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
        else:
            # A_ij ~ U(-1/√fan_in, 1/√fan_in), loralib's and PEFT's choice.
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """s·B·(A·x) for an input that has been through dropout already; the layer's output shape."""
        A, B, kind = self.lora_A, self.lora_B, self.spec.layout
        if kind == "embedding":
            return (F.embedding(x, A.t(), padding_idx=self.spec.padding_idx) * self.scale) @ B.t()  # via (..., r)
        x = x.to(A.dtype)
        if kind == "conv":
            h = self.spec.conv(x, A) * self.scale  # (N, r, *spatial)
            return _CONV_FN[A.dim() - 2](h, B, groups=self.spec.groups)
        return F.linear(F.linear(x, A) * self.scale, B)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        A = self.lora_A
        if self.spec.layout != "linear":
            return add_update(base_out, self.update(x))
        # Scale the rank-r intermediate (cheap) and fuse "+ base_out" into the second matmul.
        return add_low_rank(base_out, F.linear(x.to(A.dtype), A) * self.scale, self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B·A in the layer's canonical layout, float32."""
        A, B = self.lora_A.float(), self.lora_B.float()
        if self.spec.layout == "embedding":
            return (B @ A).t() * self.scale  # (num_embeddings, dim)
        if self.spec.layout == "conv":
            if self.spec.groups > 1:
                raise MergeError("LoRA on a grouped conv (groups > 1) mixes channels across groups and cannot be merged")
            return (B.flatten(1) @ A.flatten(1)).view(B.shape[0], *A.shape[1:]) * self.scale
        return (B @ A) * self.scale

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A, B, s) for batched per-row routing; None where routing must fall back (conv)."""
        return None if self.spec.layout == "conv" else (self.lora_A, self.lora_B, self.scale)

    def export(self) -> dict[str, torch.Tensor]:
        """Tensors under PEFT's key suffixes."""
        if self.spec.layout == "embedding":
            return {"lora_embedding_A": self.lora_A, "lora_embedding_B": self.lora_B}
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}
