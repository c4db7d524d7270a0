"""Singular value decompositions of frozen weights, reproducible and computed once.

Every SVD here runs in float32 on the canonical ``(d_out, d_in)`` weight and returns the reduced
factors ``U (d_out, k)``, ``S (k,)``, ``Vh (k, d_in)``, largest singular value first, with
canonical signs: each right singular vector's entry of largest magnitude is positive. The sign of
a singular pair is arbitrary (LAPACK builds may differ), and a learned core between frozen
singular vectors (LoRA-XS, SVFT) would silently change meaning if a reload flipped one.

Randomized SVD (``niter=``, Halko et al. 2011 as ``torch.svd_lowrank``, no oversampling, as
PEFT's ``pissa_niter_K``) runs under a fixed seed, so the same weight always gives the same factors.

Results are cached by weight (its identity, version, storage, dtype and shape), so two adapters on one layer do
not redo the decomposition; ``clear_cache()`` frees the cache, ``cache_bytes`` bounds it and
``cached_bytes()`` says how much it holds.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

cache_bytes = 1 << 30  # the cache evicts its least recently used entries beyond this size
_cache: OrderedDict[tuple, tuple[weakref.ref, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = OrderedDict()


def clear_cache() -> None:
    """Forget every cached decomposition."""
    _cache.clear()


def cached_bytes() -> int:
    """Bytes of factors the cache holds now (adapters may share some of them, e.g. SVF's U and Vh)."""
    return sum(t.numel() * t.element_size() for _, factors in _cache.values() for t in factors)


def _canonical_signs(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor):
    pivot = Vh.abs().argmax(dim=1, keepdim=True)  # (k, 1)
    signs = torch.sign(Vh.gather(1, pivot)).squeeze(1)
    signs = torch.where(signs == 0, 1.0, signs)
    # Row-major (LAPACK's factors are column-major): adapters that keep the basis (SVF, SVFT) need it
    # so, and then their buffers share the cache's storage instead of copying it. In place: the factors
    # are the decomposition's own fresh outputs.
    return U.contiguous().mul_(signs), S, Vh.contiguous().mul_(signs[:, None])


def _compute(weight: torch.Tensor, rank: int | None, niter: int | None):
    W = weight.detach().float()
    if niter is None:
        # LAPACK writes column-major factors: those of Wᵀ, transposed back, are row-major already.
        V, S, Ut = torch.linalg.svd(W.t(), full_matrices=False)
        U, Vh = Ut.t(), V.t()
    else:
        with torch.random.fork_rng(devices=[W.device] if W.device.type == "cuda" else []):
            torch.manual_seed(0)
            U, S, V = torch.svd_lowrank(W, q=rank, niter=niter)
        Vh = V.t()
    return _canonical_signs(U, S, Vh)


def svd(weight: torch.Tensor, rank: int | None = None, niter: int | None = None, *,
        source: torch.Tensor | None = None):
    """``(U, S, Vh)`` of the 2-D ``weight`` in float32: exact (all triplets) or, with ``niter``, the top ``rank``.

    ``source`` is the tensor ``weight`` was derived from (a layer's parameter); it keys the cache.
    """
    if niter is not None and rank is None:
        raise ValueError("randomized SVD needs the rank to find")
    source = weight if source is None else source
    # Storage and dtype too: .to() and .half() keep a parameter's identity and version but not its values.
    key = (id(source), source._version, source.data_ptr(), source.dtype, tuple(weight.shape), source.device,
           None if niter is None else (rank, niter))
    hit = _cache.get(key)
    if hit is not None and hit[0]() is source:
        _cache.move_to_end(key)
        return hit[1]
    factors = _compute(weight, rank, niter)
    _cache[key] = (weakref.ref(source), factors)
    while _cache and cached_bytes() > cache_bytes:
        _cache.popitem(last=False)
    return factors


def top(weight: torch.Tensor, rank: int, niter: int | None = None, *, source: torch.Tensor | None = None):
    """The ``rank`` principal singular triplets (PiSSA)."""
    U, S, Vh = svd(weight, rank, niter, source=source)
    return U[:, :rank], S[:rank], Vh[:rank]


def bottom(weight: torch.Tensor, rank: int, *, source: torch.Tensor | None = None):
    """The ``rank`` minor singular triplets (MiLoRA), from the full SVD."""
    U, S, Vh = svd(weight, source=source)
    return U[:, -rank:], S[-rank:], Vh[-rank:]
