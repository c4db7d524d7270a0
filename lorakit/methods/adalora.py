"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512): an SVD-shaped update whose ranks are budgeted.

    ΔW = P·diag(λ)·Q · s       P = lora_B (d_out, r), λ = lora_E (r, 1), Q = lora_A (r, d_in), s = alpha/r_init

λ starts at zero (the base exactly), P and Q at N(0, 0.02²). Training adds the orthogonality
regulariser ``lk.regularization(model)`` (mean of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F over the matrices,
times ``orth_reg_weight``, as PEFT) to the loss, and calls ``lk.step(model, step)`` after every
optimizer step (or once ``lk.track(model, optimizer)``), which

  * keeps EMAs of each entry's sensitivity |w·∂L/∂w| (Ī) and its uncertainty |I − Ī| (Ū);
  * scores triplet i as s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji) with s = Ī·Ū;
  * shrinks the total number of triplets b(t) from r_init·n to target_rank·n on a cubic schedule
    after ``tinit`` steps, zeroing the λ of the lowest-scoring triplets every ``delta_t`` steps
    (they may come back), and freezes the mask for the last ``tfinal`` steps.

Saved files are PEFT's ADALORA format: each matrix keeps only its surviving triplets, listed in
the config's ``rank_pattern``; the scale stays alpha/r_init, so a reload computes the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import ConfigError
from lorakit.methods.base import (Adapter, LayerSpec, Method, add_low_rank, check_dropout, check_finite, check_int,
                                  check_linear, check_positive, load_exported)


@dataclass(frozen=True)
class AdaLoRA(Method):
    """Budgeted SVD-form LoRA: ``init_rank`` triplets per matrix pruned to ``target_rank`` on average."""

    name: ClassVar[str] = "adalora"
    init_rank: int = 12
    """triplets per matrix at the start"""
    target_rank: int = 8
    """average triplets per matrix once the budget is spent"""
    total_steps: int = 0
    """length of training, where the schedule ends (required; a training run fills it in)"""
    tinit: int = 0
    """warm-up steps before pruning starts"""
    tfinal: int = 0
    """last steps, with the mask frozen"""
    delta_t: int = 1
    """steps between reallocations"""
    beta1: float = 0.85
    """EMA factor of the sensitivity"""
    beta2: float = 0.85
    """EMA factor of the uncertainty"""
    orth_reg_weight: float = 0.5
    """weight of the orthogonality regulariser"""
    alpha: float = 8.0
    """scale numerator: the update is scaled by alpha/init_rank"""
    dropout: float = 0.0
    """dropout on the adapter's input"""

    def __post_init__(self):
        check_int("AdaLoRA", None, total_steps=self.total_steps, tinit=self.tinit, tfinal=self.tfinal)
        check_int("AdaLoRA", 1, init_rank=self.init_rank, target_rank=self.target_rank, delta_t=self.delta_t)
        check_positive("AdaLoRA", alpha=self.alpha)
        if self.total_steps <= 0:
            raise ConfigError("AdaLoRA: total_steps (the length of training) must be given, > 0")
        if self.target_rank > self.init_rank:
            raise ConfigError(f"AdaLoRA: target_rank {self.target_rank} exceeds init_rank {self.init_rank}")
        if min(self.tinit, self.tfinal) < 0 or self.tinit >= self.total_steps - self.tfinal:
            raise ConfigError(f"AdaLoRA: tinit={self.tinit} and tfinal={self.tfinal} leave no budgeting phase in "
                              f"total_steps={self.total_steps}")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ConfigError(f"AdaLoRA: beta1 and beta2 must be in (0, 1), got {self.beta1}, {self.beta2}")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"AdaLoRA: orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        check_dropout("AdaLoRA", self.dropout)
        check_finite(self)

    @property
    def scale(self) -> float:
        return self.alpha / (self.init_rank + 1e-5)  # PEFT's ranknum: the *initial* rank, never updated

    def build(self, spec: LayerSpec, init: bool = True, rank: int | None = None) -> "AdaLoRAAdapter":
        """The adapter for one layer, with ``rank`` triplets (default ``init_rank``; fewer after pruning)."""
        check_linear("AdaLoRA", spec)
        return AdaLoRAAdapter(spec, self.init_rank if rank is None else rank, self.scale, self.dropout, init)

    def peft_config(self) -> dict:
        """The method-specific keys of PEFT's ADALORA adapter_config.json (rank_pattern comes from the masks)."""
        return {"peft_type": "ADALORA", "init_r": self.init_rank, "target_r": self.target_rank,
                "total_step": self.total_steps, "tinit": self.tinit, "tfinal": self.tfinal, "deltaT": self.delta_t,
                "beta1": self.beta1, "beta2": self.beta2, "orth_reg_weight": self.orth_reg_weight,
                "lora_alpha": self.alpha, "lora_dropout": self.dropout, "r": 8, "use_dora": False,
                "use_rslora": False}

    @classmethod
    def from_peft(cls, config: dict) -> "AdaLoRA | None":
        """The recipe a PEFT ADALORA config describes."""
        if config.get("peft_type") != "ADALORA":
            return None
        return cls(init_rank=int(config["init_r"]), target_rank=int(config["target_r"]),
                   total_steps=int(config["total_step"]), tinit=int(config.get("tinit", 0)),
                   tfinal=int(config.get("tfinal", 0)), delta_t=int(config.get("deltaT", 1)),
                   beta1=float(config.get("beta1", 0.85)), beta2=float(config.get("beta2", 0.85)),
                   orth_reg_weight=float(config.get("orth_reg_weight", 0.5)), alpha=float(config["lora_alpha"]),
                   dropout=float(config.get("lora_dropout") or 0.0))

    @classmethod
    def training_defaults(cls, steps: int) -> dict:
        """The schedule over a run of ``steps``: pruning after the first tenth, the mask frozen for the last fifth."""
        return {"total_steps": steps, "tinit": steps // 10, "tfinal": steps // 5}

    def budget(self, step: int, initial: int, target: int) -> tuple[int, bool]:
        """(total triplets allowed at ``step``, whether to reallocate now) — PEFT's schedule."""
        if step <= self.tinit:
            return initial, False
        if step > self.total_steps - self.tfinal:
            return target, True
        progress = 1 - (step - self.tinit) / (self.total_steps - self.tfinal - self.tinit)
        return int((initial - target) * progress ** 3 + target), step % self.delta_t == 0

    def on_step(self, adapters: Sequence["AdaLoRAAdapter"], step: int) -> None:
        """The rank allocator, run after each optimizer step over every matrix of one adapter."""
        final = self.total_steps - self.tfinal
        if step < final:
            for adapter in adapters:
                adapter.update_importance(self.beta1, self.beta2)
        if step > final:  # the mask is frozen: keep pruned triplets at zero
            for adapter in adapters:
                adapter.apply_mask()
            return
        initial = sum(a.rank for a in adapters)
        budget, reallocate = self.budget(step, initial, self.target_rank * len(adapters))
        if reallocate or step == final:
            _mask_to_budget(adapters, initial - budget)
        if step == final:
            for adapter in adapters:
                adapter.importance.clear()

    def regularization(self, adapters: Sequence["AdaLoRAAdapter"]) -> torch.Tensor:
        """orth_reg_weight · mean over P and Q matrices of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F."""
        terms = [torch.linalg.matrix_norm(m - torch.eye(m.shape[0], device=m.device, dtype=m.dtype))
                 for a in adapters for m in (a.lora_A @ a.lora_A.t(), a.lora_B.t() @ a.lora_B)]
        return self.orth_reg_weight * torch.stack(terms).mean()


def _mask_to_budget(adapters: Sequence["AdaLoRAAdapter"], prune: int) -> None:
    """Zero the λ of the ``prune`` lowest-scoring triplets across all matrices (ties prune together)."""
    scores = [a.triplet_scores() for a in adapters]
    threshold = torch.kthvalue(torch.cat(scores), prune).values if prune > 0 else None
    for adapter, score in zip(adapters, scores):
        adapter.rank_mask.copy_(score > threshold if threshold is not None else torch.ones_like(adapter.rank_mask))
        adapter.apply_mask()


class AdaLoRAAdapter(Adapter):
    """P (``lora_B``), λ (``lora_E``), Q (``lora_A``) and the current triplet mask."""

    def __init__(self, spec: LayerSpec, rank: int, scale: float, dropout: float, init: bool = True):
        super().__init__()
        self.spec, self.rank, self.scale, self.dropout_p = spec, rank, scale, dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        factory = dict(device=spec.device, dtype=spec.dtype)
        self.lora_A = nn.Parameter(torch.zeros(rank, spec.d_in, **factory))  # Q: right singular vectors
        self.lora_E = nn.Parameter(torch.zeros(rank, 1, **factory))  # λ: singular values, zero at init
        self.lora_B = nn.Parameter(torch.zeros(spec.d_out, rank, **factory))  # P: left singular vectors
        self.register_buffer("rank_mask", torch.ones(rank, dtype=torch.bool, device=spec.device))
        self.importance: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (Ī, Ū), training state
        if init:
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.rank == 0:  # every triplet of this matrix was pruned
            return out
        if self.dropout is not None:
            x = self.dropout(x)
        h = F.linear(x.to(self.lora_A.dtype), self.lora_A * self.lora_E) * self.scale  # (..., r)
        return add_low_rank(out, h, self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·P·diag(λ)·Q, float32."""
        return self.lora_B.float() @ (self.lora_A.float() * self.lora_E.float()) * self.scale

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(diag(λ)·Q, P, s) for batched per-row routing."""
        return self.lora_A * self.lora_E, self.lora_B, self.scale

    @torch.no_grad()
    def update_importance(self, beta1: float, beta2: float) -> None:
        """Fold this step's sensitivities |w·∂L/∂w| into the EMAs Ī and Ū."""
        for name, p in (("A", self.lora_A), ("E", self.lora_E), ("B", self.lora_B)):
            if p.grad is None:
                continue
            sensitivity = (p * p.grad).abs()
            mean, spread = self.importance.get(name, (torch.zeros_like(p), torch.zeros_like(p)))
            mean = beta1 * mean + (1 - beta1) * sensitivity
            self.importance[name] = (mean, beta2 * spread + (1 - beta2) * (sensitivity - mean).abs())

    def triplet_scores(self) -> torch.Tensor:
        """(r,) importance of each triplet: s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)."""
        zeros = {"A": self.lora_A, "E": self.lora_E, "B": self.lora_B}
        s = {k: (self.importance[k][0] * self.importance[k][1]) if k in self.importance else torch.zeros_like(v)
             for k, v in zeros.items()}
        return s["E"].view(-1) + s["A"].mean(dim=1) + s["B"].mean(dim=0)

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.lora_E.masked_fill_(~self.rank_mask[:, None], 0.0)

    def export(self) -> dict[str, torch.Tensor]:
        """PEFT's keys (no ``.weight``); only the kept triplets (see ``saved``) are written by lk.save."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}

    def saved(self) -> dict[str, torch.Tensor]:
        """The exported tensors restricted to the triplets the mask keeps (PEFT's saved shapes)."""
        keep = self.rank_mask
        return {"lora_A": self.lora_A[keep], "lora_B": self.lora_B[:, keep], "lora_E": self.lora_E[keep]}

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Load saved triplets; a pruned file (fewer triplets, PEFT's rank_pattern) shrinks the adapter to fit."""
        A = tensors.get("lora_A")
        if A is not None and A.dim() == 2 and A.shape[0] != self.rank:
            self.rank = A.shape[0]
            factory = dict(device=self.lora_A.device, dtype=self.lora_A.dtype)
            self.lora_A = nn.Parameter(torch.zeros(self.rank, self.spec.d_in, **factory))
            self.lora_E = nn.Parameter(torch.zeros(self.rank, 1, **factory))
            self.lora_B = nn.Parameter(torch.zeros(self.spec.d_out, self.rank, **factory))
            self.rank_mask = torch.ones(self.rank, dtype=torch.bool, device=self.rank_mask.device)
        load_exported(self, tensors, where)
