"""SVF, singular value fine-tuning (Transformer², Sun et al. 2025, arXiv 2501.06252).

One trainable scale per singular value of the full SVD ``W = U·diag(σ)·Vᵀ``:

    W' = U·diag(σ ⊙ z)·Vᵀ,   written against the untouched base as   ΔW = U·diag(σ ⊙ (z − 1))·Vᵀ

z starts at 1 (exactly the base). Trainable parameters: min(d_out, d_in) per matrix. Unlike the
reference code this uses z directly (no sigmoid, no Σσ renormalisation), so experts mix linearly:
``lk.combine(model, {"math": 0.6, "code": 0.4}, how="interpolate")`` is ``z = 0.6·z_math + 0.4·z_code``.

U and V are not saved: diagonal scales are unchanged by the sign of a singular pair, so a reload
recomputes the (deterministic, full) SVD and checks the saved singular values against it — they
are the base weight's fingerprint. ``SpectralAdapter`` also serves SVFT (a sparse M in this basis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lorakit import svd
from lorakit.errors import AdapterFileError, ShapeMismatchError
from lorakit.methods.base import Adapter, LayerSpec, Method, add_low_rank, check_dropout, check_linear, load_exported


def singular_basis(method: str, spec: LayerSpec):
    """The full SVD ``(U, S, Vh)`` of a linear layer's weight (other layer kinds raise)."""
    check_linear(method, spec)
    return svd.svd(spec.weight(), source=spec.source)


@dataclass(frozen=True)
class SVF(Method):
    """Trainable multiplier z per singular value; the base at z = 1."""

    name: ClassVar[str] = "svf"
    dropout: float = 0.0
    """dropout on the adapter's input"""

    def __post_init__(self):
        check_dropout("SVF", self.dropout)

    def build(self, spec: LayerSpec, init: bool = True) -> "SpectralAdapter":
        U, S, Vh = singular_basis("SVF", spec)
        n = S.shape[0]
        index = torch.arange(n)
        return SpectralAdapter(spec, U, S, Vh, rows=index, cols=index, values=torch.ones(n),
                               multiplicative=True, dropout=self.dropout)


class SpectralAdapter(Adapter):
    """``ΔW = U·M·Vᵀ`` with M sparse: ``values`` at (``rows``, ``cols``) of an n×n matrix.

    ``multiplicative=True`` (SVF) reads M's diagonal entries as ``σ ⊙ (values − 1)``.
    """

    def __init__(self, spec: LayerSpec, U, S, Vh, rows, cols, values, multiplicative: bool, dropout: float):
        super().__init__()
        self.spec, self.multiplicative = spec, multiplicative
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        factory = dict(device=spec.device, dtype=spec.dtype)
        # The basis is recomputed on load, not saved (non-persistent); S is saved as the fingerprint.
        self.register_buffer("U", U.to(**factory).contiguous(), persistent=False)  # (d_out, n)
        self.register_buffer("Vh", Vh.to(**factory).contiguous(), persistent=False)  # (n, d_in)
        self.register_buffer("spectrum", S.to(**factory).clone())  # (n,)
        # Copies: SVF passes one index as both, and a shared tensor would take a loaded `cols` into `rows` too.
        self.register_buffer("rows", rows.to(spec.device, copy=True))  # (k,) support of M
        self.register_buffer("cols", cols.to(spec.device, copy=True))
        self.values = nn.Parameter(values.to(**factory).clone())  # (k,)
        self.diagonal = _is_diagonal(rows, cols, S.shape[0])  # the arguments: still readable on a meta-built layer

    def coefficients(self) -> torch.Tensor:
        """M's non-zero entries, (k,)."""
        if self.multiplicative:
            return self.spectrum[self.rows] * (self.values - 1)
        return self.values

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        h = x.to(self.Vh.dtype) @ self.Vh.t()  # (..., n): coordinates in the right singular basis
        if self.diagonal:
            h = h * self.coefficients()
        else:
            # One n×n matmul: gathering h at each of M's k entries would keep a (tokens, k) tensor per
            # layer for backward (k = 33n for SVFT's banded d=16), gigabytes for a 135M model.
            h = h @ self.dense().to(h.dtype).t()
        return add_low_rank(out, h, self.U)

    def dense(self) -> torch.Tensor:
        """M as a dense n×n float32 matrix."""
        n = self.spectrum.shape[0]
        # index_add on the flat index (repeated entries add up), far faster than index_put's accumulate.
        M = torch.zeros(n * n, device=self.values.device)
        return M.index_add_(0, self.rows * n + self.cols, self.coefficients().float()).view(n, n)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = U·M·Vᵀ, float32."""
        return self.U.float() @ self.dense() @ self.Vh.float()

    def support(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) of M's entries, which ``values`` holds: adapters of one recipe and support mix linearly."""
        return self.rows, self.cols

    def export(self) -> dict[str, torch.Tensor]:
        return {"spectrum": self.spectrum, "rows": self.rows, "cols": self.cols, "values": self.values}

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Load M, after checking the saved singular values against this base weight's and M's support
        indices against its size (an index out of range would fail at the first forward, a negative one wrap)."""
        saved = tensors.get("spectrum")
        if saved is not None and saved.shape == self.spectrum.shape and not torch.allclose(
                saved.float(), self.spectrum.float(), rtol=1e-4, atol=1e-6 * float(self.spectrum.max())):
            raise ShapeMismatchError(f"{where}: the base weight's singular values differ from the ones the adapter "
                                     "was trained on (max rel. diff "
                                     f"{((saved - self.spectrum).abs() / self.spectrum.abs().clamp_min(1e-12)).max():.2e}); "
                                     "this is not the base model it was trained on")
        if "values" in tensors and tensors["values"].shape != self.values.shape:
            # SVFT's support size is part of the recipe; a different one is a different adapter.
            raise ShapeMismatchError(f"{where}.values: the file has {tuple(tensors['values'].shape)}, "
                                     f"the model needs {tuple(self.values.shape)}")
        n = self.spectrum.shape[0]
        for key in ("rows", "cols"):
            index = tensors.get(key)
            if index is None:
                continue  # load_exported names what is missing
            if index.dtype not in _INDEX_DTYPES:
                raise AdapterFileError(f"{where}.{key}: support indices must be integers, the file has {index.dtype}")
            bad = index[(index < 0) | (index >= n)]
            if bad.numel():
                raise ShapeMismatchError(f"{where}.{key}: index {int(bad[0])} is out of range for this layer's {n} "
                                         f"singular values (0 to {n - 1})")
        load_exported(self, tensors, where)
        self.diagonal = _is_diagonal(self.rows, self.cols, self.spectrum.shape[0])


_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _is_diagonal(rows: torch.Tensor, cols: torch.Tensor, n: int) -> bool:
    """Whether M's support is exactly its diagonal, in order: then M is an elementwise scale, no matmul."""
    if rows.is_meta:
        return False
    index = torch.arange(n, device=rows.device)
    return rows.shape == index.shape and torch.equal(rows, index) and torch.equal(cols, index)
