"""What weights and adapters hold: parameter and memory arithmetic, spectra of base weights, the spectrum of a
learned update, resizing an adapter to a lower rank, and rank advice for a parameter budget."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
from torch import nn

from lorakit import svd as svd_mod
from lorakit.adapt import Targets, layer_index, select
from lorakit.errors import AdapterNotFoundError, ConfigError
from lorakit.layers import AdaptedLayer, adapted_layers, spec_of
from lorakit.methods.base import Adapter, Method, check_int, shape_spec
from lorakit.methods.lora import LoRA
from lorakit.model import adapter_names, replace


def trainable_numel(recipe: Method, d_out: int, d_in: int) -> int:
    """Trainable numbers one adapter of ``recipe`` adds to a d_out × d_in linear weight: the adapter itself,
    built on the meta device (no memory, no weight, no SVD), its trainable parameters counted."""
    adapter = recipe.build(shape_spec(d_out, d_in))
    return sum(p.numel() for p in adapter.parameters() if p.requires_grad)


def parse_shape(text: str) -> tuple[int, int]:
    """'8192x4096' → (8192, 4096) (d_out, d_in)."""
    try:
        d_out, d_in = (int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise ConfigError(f"a shape is d_out x d_in, like 8192x4096; got {text!r}") from None
    if d_out <= 0 or d_in <= 0:
        raise ConfigError(f"shape dimensions must be positive, got {text!r}")
    return d_out, d_in


def training_memory_bytes(trainable: int, frozen: int, weight_bytes: int = 4) -> int:
    """Weights (frozen and trainable, ``weight_bytes`` each) + fp32 gradients and AdamW's two fp32 states
    for the trainable part. Activations are not included: they depend on batch and sequence length."""
    return (trainable + frozen) * weight_bytes + trainable * 4 * 3


# --- spectra --------------------------------------------------------------------------------------------------------
ENERGIES = (0.5, 0.9, 0.99)
IN_RANGE = (0.1, 1.1)  # the band one source says holds 99% of Gemma2-9B's singular values


def measures(S: torch.Tensor, energies: tuple[float, ...] = ENERGIES) -> dict[str, float]:
    """Summary measures of a spectrum ``S`` (singular values, any order): σ_max, σ_min, stable rank
    ‖W‖²_F/‖W‖²₂, Roy–Vetterli entropy effective rank, the rank holding each share of ``energies`` (Σσ²), the
    share of singular values in [0.1, 1.1] and the scale-free share in [σ_max/10, σ_max]. An all-zero
    spectrum (an update that has not moved) has every rank 0, and so has an empty one (an update pruned to
    rank 0, as AdaLoRA prunes)."""
    S = S.detach().double().abs().flatten().sort(descending=True).values
    if S.numel() == 0:
        S = S.new_zeros(1)
    top, energy, mass = S[0].item(), (S ** 2).sum().item(), S.sum().item()
    out = {"sigma_max": top, "sigma_min": S[-1].item()}
    if top == 0.0:
        out.update(stable_rank=0.0, effective_rank=0.0, **{f"energy_rank_{_pct(q)}": 0 for q in energies})
    else:
        p = S[S > 0] / mass
        out["stable_rank"] = energy / top ** 2
        out["effective_rank"] = math.exp(-(p * p.log()).sum().item())
        cumulative = (S ** 2).cumsum(0) / energy
        for q in energies:
            # Slack of float32 rounding: a share that is exactly q in exact arithmetic must not need one more value.
            out[f"energy_rank_{_pct(q)}"] = int((cumulative < q * (1 - 1e-6)).sum().item()) + 1
    lo, hi = IN_RANGE
    out[f"share_{lo}_{hi}"] = ((S >= lo) & (S <= hi)).double().mean().item()
    out["share_top_decade"] = (S >= top / 10).double().mean().item() if top > 0 else 0.0
    return out


def _pct(q: float) -> str:
    return f"{100 * q:g}"


def singular_values(weight: torch.Tensor, rank: int | None = None, niter: int | None = None) -> torch.Tensor:
    """Singular values of a 2-D (or conv, flattened) weight in float32, largest first: all of them, exactly,
    or with ``niter`` the top ``rank`` by randomized SVD (lorakit.svd's, seeded)."""
    W = weight.detach().float().flatten(1)
    if niter is None:
        return torch.linalg.svdvals(W)
    return svd_mod.svd(W, rank=rank, niter=niter)[1]


def _type_of(path: str) -> str:
    return path.rpartition(".")[2]


def spectrum(model: nn.Module, targets: Targets = "all-linear", *, rank: int | None = None,
             niter: int | None = None, progress=None) -> list[dict]:
    """One row per targeted weight of ``model``'s base: its path, module type (the last name in the path),
    layer index, shape, ``measures`` and the singular values. Exact unless ``niter`` (then the top ``rank``).
    ``progress`` is called with each finished path (a progress bar's update)."""
    rows = []
    for path, module in select(model, targets):
        W = module.base_weight() if isinstance(module, AdaptedLayer) else spec_of(module).weight()
        S = singular_values(W, rank, niter)
        rows.append({"module": path, "type": _type_of(path), "layer": layer_index(path), "shape": list(W.shape),
                     "randomized": niter is not None, **measures(S), "singular_values": S.tolist()})
        if progress is not None:
            progress(path)
    return rows


# --- learned updates ------------------------------------------------------------------------------------------------
@torch.no_grad()
def delta_svd(adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, Vh)`` of the adapter's update ΔW (float32, largest first, zeros kept), laid out as LoRA's B·A
    holds it: (d_out, d_in) for linear layers, (dim, num_embeddings) for embeddings, (out, in·k…) for convs.

    A factored update s·B·A is decomposed through QR of B and Aᵀ, an r × r SVD, and never formed as a
    d_out × d_in matrix; other methods' ΔW (DoRA, SVF, SVFT, conv LoRA) comes from ``delta_weight``."""
    factors = adapter.factors()
    if factors is None:
        delta = adapter.delta_weight().detach().float()
        if adapter.spec.layout == "embedding":
            delta = delta.t()
        U, S, Vh = torch.linalg.svd(delta.flatten(1), full_matrices=False)
        return U, S, Vh
    A, B, s = (t.detach().float() if isinstance(t, torch.Tensor) else t for t in factors)
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.t())
    u, S, vh = torch.linalg.svd(s * (Rb @ Ra.t()))
    return Qb @ u, S, vh @ Qa.t()


def _canonical_2d(adapter: Adapter, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor):
    """``delta_svd``'s factors in the base weight's canonical layout (embeddings are stored transposed)."""
    return (Vh.t(), S, U.t()) if adapter.spec.layout == "embedding" else (U, S, Vh)


def _rank_of(recipe, adapter: Adapter) -> int | None:
    for owner, key in ((recipe, "rank"), (adapter, "rank")):
        value = getattr(owner, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def intruders(W: torch.Tensor, U_delta: torch.Tensor, S_delta: torch.Tensor, Vh_delta: torch.Tensor,
              k: int = 10, eps: float = 0.5) -> list[dict]:
    """Intruder dimensions (Shuttleworth et al. 2024, arXiv 2410.21228): each of the top ``k`` left singular
    vectors of W + ΔW as its index, singular value, largest |cosine| with any left singular vector of W, and
    whether that is below ``eps`` (an intruder)."""
    W = W.detach().float().flatten(1)
    tuned = W + (U_delta * S_delta) @ Vh_delta
    U0 = svd_mod.svd(W)[0]
    U1, S1, _ = torch.linalg.svd(tuned, full_matrices=False)
    k = min(k, S1.numel())
    best = (U1[:, :k].t() @ U0).abs().max(dim=1).values
    return [{"index": i, "sigma": S1[i].item(), "max_cosine": best[i].item(), "intruder": bool(best[i] < eps)}
            for i in range(k)]


def inspect(model: nn.Module, name: str = "default", *, intruder_k: int = 10, intruder_eps: float = 0.5,
            progress=None) -> list[dict]:
    """One row per module adapter ``name`` changes: the singular values of its update ΔW and their
    ``measures``, the adapter's rank r, utilisation (rank at 90% energy / r), ‖ΔW‖_F / ‖W‖_F, the
    ``intruders`` of W + ΔW and the least aligned of its top singular vectors (its largest |cosine| with W's)."""
    layers = [(path, layer) for path, layer in adapted_layers(model) if name in layer.adapters]
    if not layers:
        raise AdapterNotFoundError(f"no adapter named {name!r} on the model; it has {adapter_names(model)}")
    rows = []
    for path, layer in layers:
        adapter, recipe = layer.adapters[name], layer.recipes[name]
        with torch.no_grad():
            U, S, Vh = _canonical_2d(adapter, *delta_svd(adapter))
            W = layer.base_weight()
            m = measures(S, (0.9, 0.99))
            rank = _rank_of(recipe, adapter)
            norm = S.double().norm().item()
            top = intruders(W, U, S, Vh, intruder_k, intruder_eps)
            found = [t for t in top if t["intruder"]]
        rows.append({"module": path, "type": _type_of(path), "layer": layer_index(path),
                     "method": type(recipe).__name__, "rank": rank, **m,
                     "utilisation": m["energy_rank_90"] / rank if rank else None,
                     "delta_norm": norm, "relative_norm": norm / W.double().norm().item(),
                     "intruders": len(found), "intruder_dimensions": found,
                     "least_aligned": min(t["max_cosine"] for t in top), "singular_values": S.tolist()})
        if progress is not None:
            progress(path)
    return rows


# --- resize ----------------------------------------------------------------------------------------------------------
def resize(model: nn.Module, name: str = "default", *, rank: int | None = None,
           energy: float | None = None) -> dict[str, dict]:
    """Replace adapter ``name`` by the best low-rank LoRA (Eckart–Young: the truncated SVD of each module's ΔW)
    of ``rank``, or per module the smallest rank keeping ``energy`` of its ‖ΔW‖²_F; in place, all or none.

    Each module's scale is kept (alpha rewritten: alpha = s·r', or s·√r' for rsLoRA; s = 1 for methods
    without one) so its factors stay in their trained range. Returns {module: {"rank", "retained"}}, the
    retained share of ‖ΔW‖²_F. The result saves in PEFT's format (rank_pattern / alpha_pattern)."""
    if (rank is None) == (energy is None):
        raise ConfigError("resize takes rank= or energy=, one of them")
    if rank is not None:
        check_int("resize", 1, rank=rank)
    elif isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise ConfigError(f"resize: energy must be a share in (0, 1], got {energy!r}")
    report: dict[str, dict] = {}

    def truncated(layer: AdaptedLayer):
        adapter, recipe = layer.adapters[name], layer.recipes[name]
        with torch.no_grad():
            U, S, Vh = delta_svd(adapter)
            total = (S.double() ** 2).sum().item()
            if total == 0.0:  # ΔW = 0 (not trained, or pruned to rank 0 by AdaLoRA): exactly a rank-1 LoRA of zeros
                U, S, Vh = U.new_zeros(U.shape[0], 1), S.new_zeros(1), Vh.new_zeros(1, Vh.shape[1])
            k = min(rank, S.numel()) if rank is not None else max(1, int(measures(S, (energy,))[f"energy_rank_{_pct(energy)}"]))
            factors = adapter.factors()
            scale = float(factors[2]) if factors is not None else 1.0
            rslora = bool(getattr(recipe, "rslora", False))
            root = (S[:k] / scale).sqrt()
            new = LoRA(rank=k, alpha=scale * (math.sqrt(k) if rslora else k), dropout=adapter.dropout_p,
                       rslora=rslora)
            built = new.build(adapter.spec, init=False)
            built.lora_A.copy_((root[:, None] * Vh[:k]).reshape(built.lora_A.shape))
            built.lora_B.copy_((U[:, :k] * root).reshape(built.lora_B.shape))
        report[layer.path] = {"rank": k, "from_rank": _rank_of(recipe, adapter),
                              "retained": (S[:k].double() ** 2).sum().item() / total if total else 1.0}
        return new, built.to(adapter.spec.dtype)

    replace(model, name, truncated)
    return report


# --- rank advice ----------------------------------------------------------------------------------------------------
def allocate(energies: dict[str, Sequence[float]], costs: dict[str, tuple[int, int]], budget: int) -> dict[str, int]:
    """Ranks per module for at most ``budget`` trainable numbers, greedy by marginal energy per parameter:
    ``energies[m]`` are module m's energies per rank (σ², largest first; their count caps its rank) and
    ``costs[m]`` = (numbers its first rank costs, numbers each further rank costs). A module that gets no rank
    is left out. Each step takes the affordable rank of most energy per parameter, so the budget is filled
    until no further rank fits."""
    check_int("advise", 1, budget=budget)
    ranks = {m: 0 for m in energies}
    used = 0
    while True:
        best, best_ratio = None, -1.0
        for m, values in energies.items():
            r = ranks[m]
            if r >= len(values):
                continue
            cost = costs[m][0] if r == 0 else costs[m][1]
            if used + cost > budget:
                continue
            ratio = float(values[r]) / cost
            if ratio > best_ratio:
                best, best_ratio = m, ratio
        if best is None:
            break
        used += costs[best][0] if ranks[best] == 0 else costs[best][1]
        ranks[best] += 1
    return {m: r for m, r in ranks.items() if r}


def lora_costs(d_out: int, d_in: int, method: Method | None = None) -> tuple[int, int]:
    """(trainable numbers of rank 1, of each further rank) of ``method`` (default LoRA) on a d_out × d_in weight."""
    method = method or LoRA(rank=1)
    one, two = (trainable_numel(dataclasses.replace(method, rank=r), d_out, d_in) for r in (1, 2))
    return one, two - one


def update_energies(model: nn.Module, name: str, method: Method | None = None
                    ) -> tuple[dict[str, list[float]], dict[str, tuple[int, int]]]:
    """({module: σ² of adapter ``name``'s ΔW, largest first}, {module: ``lora_costs`` of ``method``}): what
    ``allocate`` weighs."""
    energies, costs = {}, {}
    for path, layer in adapted_layers(model):
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        energies[path] = (delta_svd(adapter)[1].double() ** 2).tolist()
        costs[path] = lora_costs(adapter.spec.d_out, adapter.spec.d_in, method)
    if not energies:
        raise AdapterNotFoundError(f"no adapter named {name!r} on the model; it has {adapter_names(model)}")
    return energies, costs


def advise(model: nn.Module, name: str, budget: int, method: Method | None = None) -> dict[str, int]:
    """A rank per module for a ``budget`` of trainable numbers of ``method`` (default LoRA), from the energy
    of adapter ``name``'s learned update: the σ² of each module's ΔW decide where further rank pays most.
    Modules left out (rank 0) are missing from the result."""
    return allocate(*update_energies(model, name, method), budget)
