"""SVFT (Lingam et al. 2024, arXiv 2405.19597): a sparse trainable M in the weight's singular basis.

    ΔW = U·M·Vᵀ        U (d_out, n), V (d_in, n) frozen singular vectors, n = min(d_out, d_in)

M is zero at init (the base exactly; the reference code starts it random) and trainable only on a
fixed support Ω:
  * ``"plain"``:  the diagonal (n parameters);
  * ``"banded"``: the diagonal and ``width`` off-diagonals on each side, n(2d+1) − d(d+1) parameters;
  * ``"random"``: the diagonal plus as many distinct random off-diagonal positions as banded has (seeded);
  * ``"top_k"``:  the diagonal plus the off-diagonal (i, j) of largest alignment |u_iᵀ v_j| (over the
    first n coordinates when W is not square), as many as banded has.
Off-diagonal entries depend on the signs of the singular vectors: they are canonical (see svd.py)
and the saved singular values are checked on reload, so a reload cannot rotate M.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch

from lorakit.errors import ConfigError
from lorakit.methods.base import LayerSpec, Method, check_dropout, check_int
from lorakit.methods.svf import SpectralAdapter, singular_basis

Pattern = Literal["plain", "banded", "random", "top_k"]
PATTERNS = get_args(Pattern)


@dataclass(frozen=True)
class SVFT(Method):
    """Sparse trainable M in the singular basis; ``width`` off-diagonals (banded) or their count (random, top_k)."""

    name: ClassVar[str] = "svft"
    pattern: Pattern = "plain"
    """M's support: plain (the diagonal), banded, random or top_k"""
    width: int = 0
    """off-diagonals on each side (banded), or as many entries as that band has (random, top_k)"""
    seed: int = 0
    """seed of the random pattern's positions"""
    dropout: float = 0.0
    """dropout on the adapter's input"""

    def __post_init__(self):
        if self.pattern not in PATTERNS:
            raise ConfigError(f"SVFT: pattern must be one of {PATTERNS}, got {self.pattern!r}")
        check_int("SVFT", 0, width=self.width)
        check_int("SVFT", None, seed=self.seed)
        if self.pattern == "plain" and self.width:
            raise ConfigError("SVFT: the plain pattern is the diagonal; width needs 'banded', 'random' or 'top_k'")
        check_dropout("SVFT", self.dropout)

    def support(self, U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) of M's trainable entries, diagonal first, then the others in row-major order.

        On a meta-device basis (a spec of shapes only: ``lorakit params``) the positions are meta tensors of
        the right length: only their number is known without the weight.
        """
        n = U.shape[1]
        d = min(self.width, n - 1)
        extra = 2 * d * n - d * (d + 1)  # banded's off-diagonal count: n(2d+1) − d(d+1) − n
        diagonal = torch.arange(n)
        if U.is_meta:
            rows = torch.empty(n + extra, dtype=torch.long, device="meta")
            return rows, torch.empty_like(rows)
        if self.pattern in ("plain", "banded"):  # row by row, columns i−d … i+d but i: no n×n grid
            offsets = torch.cat([torch.arange(-d, 0), torch.arange(1, d + 1)])
            rows, cols = diagonal.repeat_interleave(len(offsets)), (diagonal[:, None] + offsets).flatten()
            inside = (cols >= 0) & (cols < n)
            rows, cols = rows[inside], cols[inside]
        else:
            off = ~torch.eye(n, dtype=torch.bool)
            if self.pattern == "random":
                g = torch.Generator().manual_seed(self.seed)
                candidates = off.flatten().nonzero().squeeze(1)
                picked = candidates[torch.randperm(len(candidates), generator=g)[:extra]]
            else:
                alignment = (U[:n].t() @ Vh[:, :n].t()).abs().cpu()  # (n, n): |u_iᵀ v_j| on the shared coordinates
                alignment[~off] = -1
                picked = alignment.flatten().topk(extra).indices
            rows, cols = picked.sort().values.div(n, rounding_mode="floor"), picked.sort().values % n
        return torch.cat([diagonal, rows]), torch.cat([diagonal, cols])

    def build(self, spec: LayerSpec, init: bool = True) -> SpectralAdapter:
        U, S, Vh = singular_basis("SVFT", spec)
        rows, cols = self.support(U, Vh)
        return SpectralAdapter(spec, U, S, Vh, rows=rows, cols=cols, values=torch.zeros(len(rows)),
                               multiplicative=False, dropout=self.dropout)
