"""Adapter arithmetic: combine named adapters into a new one.

``how`` and when the result is exact (ΔW_new = Σ_k w_k·ΔW_k on every layer):
  * ``"linear"``: concatenates low-rank factors, ``A = [A_1; A_2; …]``, ``B = [w_1 s_1 B_1 | w_2 s_2 B_2 | …]``.
    Always exact; the rank is the sum of the input ranks. Needs factored updates (LoRA, rsLoRA,
    PiSSA/MiLoRA, LoRA-XS), not DoRA or the spectral methods.
  * ``"svd"``: sums the full updates of any method and truncates to ``rank`` (default: the largest
    input rank). Exact when ``rank`` is at least the rank of the sum (e.g. the sum of the input
    ranks); otherwise the best rank-``rank`` approximation (Eckart–Young).
  * ``"ties"``: TIES-merging (Yadav et al. 2023, arXiv 2306.01708) of the weighted updates: keep each
    update's top ``density`` fraction of entries by magnitude, elect each entry's sign by the sign of
    the sum, average the entries that agree with it, then truncate to ``rank`` as ``"svd"``. Not a
    sum by design: it drops conflicting and small entries.
  * ``"interpolate"``: ``z = Σ_k w_k·z_k`` for SVF experts (and SVFT adapters on one support). SVFT's
    M is additive, so its mix is always the exact weighted sum; SVF's z multiplies σ around 1, so its
    mix is that sum when the weights add up to 1.
The result is a new adapter ``name`` (plain LoRA for the first three) and becomes the active one.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from lorakit.adapt import attach
from lorakit.errors import AdapterExistsError, ConfigError
from lorakit.layers import AdaptedLayer, adapted_layers
from lorakit.methods.lora import LoRA
from lorakit.model import _check_names, adapter_names

HOWS = ("linear", "svd", "ties", "interpolate")


def combine(model: nn.Module, weights: Mapping[str, float], name: str, how: str = "linear",
            rank: int | None = None, density: float = 0.2) -> nn.Module:
    """Add adapter ``name``, a weighted combination of the adapters in ``weights``; see the module docstring."""
    if how not in HOWS:
        raise ConfigError(f"combine: how must be one of {HOWS}, got {how!r}")
    if not weights:
        raise ConfigError("combine needs at least one adapter to combine")
    if not 0 < density <= 1:
        raise ConfigError(f"combine: density must be in (0, 1], got {density!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ConfigError(f"combine: rank must be a positive int, got {rank!r}")
    _check_names(model, list(weights))
    if name in adapter_names(model):
        raise AdapterExistsError(f"the model already has an adapter named {name!r}")
    combiner = {"linear": _linear, "svd": _svd, "ties": _ties, "interpolate": _interpolate}[how]
    built = {}
    for path, layer in adapted_layers(model):
        present = {n: w for n, w in weights.items() if n in layer.adapters}
        if present:
            built[path] = combiner(layer, present, rank, density)
    attach(model, name, built)
    return model


def _linear(layer: AdaptedLayer, weights: Mapping[str, float], rank, density):
    As, Bs = [], []
    for n, w in weights.items():
        factors = layer.adapters[n].factors()
        if factors is None or layer.kind.layout == "conv":
            raise ConfigError(f"{layer.path}: adapter {n!r} ({type(layer.recipes[n]).__name__}) has no low-rank "
                              "factors to concatenate; use how='svd'")
        A, B, s = factors
        As.append(A.detach())
        Bs.append(B.detach() * (w * s))
    return LoRA.from_factors(layer.spec(), torch.cat(As), torch.cat(Bs, dim=1))  # scale 1: weights, scales in B


def _weighted_deltas(layer: AdaptedLayer, weights: Mapping[str, float]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [w * layer.adapters[n].delta_weight() for n, w in weights.items()]


def _default_rank(layer: AdaptedLayer, weights) -> int:
    return max(getattr(layer.recipes[n], "rank", 1) for n in weights)


def _svd(layer: AdaptedLayer, weights: Mapping[str, float], rank, density):
    return lora_from_delta(layer, sum(_weighted_deltas(layer, weights)), rank or _default_rank(layer, weights))


def _ties(layer: AdaptedLayer, weights: Mapping[str, float], rank, density):
    deltas = torch.stack(_weighted_deltas(layer, weights))  # (K, *ΔW)
    flat = deltas.flatten(1)
    keep = max(1, int(round(density * flat.shape[1])))
    threshold = flat.abs().kthvalue(flat.shape[1] - keep + 1, dim=1, keepdim=True).values
    trimmed = torch.where(flat.abs() >= threshold, flat, torch.zeros_like(flat))
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)
    return lora_from_delta(layer, merged.view(deltas.shape[1:]), rank or _default_rank(layer, weights))


def _interpolate(layer: AdaptedLayer, weights: Mapping[str, float], rank, density):
    names = list(weights)
    first = layer.adapters[names[0]].support()
    recipe = layer.recipes[names[0]]
    for n in names:
        support = layer.adapters[n].support()
        if first is None or support is None or layer.recipes[n] != recipe or not (
                torch.equal(support[0], first[0]) and torch.equal(support[1], first[1])):
            raise ConfigError(f"{layer.path}: how='interpolate' mixes SVF/SVFT adapters of one recipe and support; "
                              f"{n!r} is {type(layer.recipes[n]).__name__}")
    adapter = recipe.build(layer.spec())
    with torch.no_grad():
        adapter.values.copy_(sum(w * layer.adapters[n].values for n, w in weights.items()))
    return recipe, adapter


def lora_from_delta(layer: AdaptedLayer, delta: torch.Tensor, rank: int):
    """(recipe, adapter): the plain LoRA (scale 1) best approximating ``delta`` (canonical layout) at ``rank``."""
    kind = layer.kind.layout
    matrix = delta.t() if kind == "embedding" else delta.flatten(1)  # (rows the B side, columns the A side)
    rank = min(rank, *matrix.shape)
    U, S, Vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    root = S[:rank].sqrt()
    return LoRA.from_factors(layer.spec(), root[:, None] * Vh[:rank], U[:, :rank] * root)

