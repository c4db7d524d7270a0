"""Per-row adapter routing: row i of a batch goes through adapter ``route[i]`` (None: the base).

An adapted layer under ``lk.route`` (and the server's decode steps) adds, for each row, its own
adapter's update. Adapters with low-rank factors (``Adapter.factors()``: LoRA, PiSSA, LoRA-XS,
AdaLoRA) are stacked, zero-padded to one rank behind a zero slot for the base, and applied with two
batched matmuls gathering each row's factors; others (DoRA, spectral methods, conv LoRA) run once per
adapter on their rows.

Linear and embedding layers also take one name per position (rows × positions, row-major), so that
several sequences packed into one row (the server's prefill) each go through their own adapter. Then
each adapter runs once on its positions: gathering factors per position would copy them thousands of
times.

A layer's ``RoutingCache`` keeps, without grad, the stacks of every factored adapter across ``lk.route``
blocks (restacking every layer per block cost more than the routed matmuls) and the plan of the
current block; any change to a routed adapter's tensors (an optimizer step, a load, ``.to()``) is seen
through their identity, storage and version, and adding or deleting an adapter drops the stacks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import ConfigError
from lorakit.methods.base import add_update


class RoutingCache:
    """What one adapted layer keeps between routed forwards: stacked factors, and the current block's plan."""

    __slots__ = ("stacks", "plan")

    def __init__(self):
        self.stacks: tuple | None = None  # (fingerprints, references, (slots, stacks, plans)), see _inference_stacks
        self.plan: tuple | None = None  # (names, index, stacks) for one lk.route block

    def clear(self) -> None:
        """Forget everything: the adapters changed in a way fingerprints cannot see (added, deleted, moved)."""
        self.stacks = self.plan = None


def forward(layer, x: torch.Tensor, out: torch.Tensor, route: list, active: list[str]) -> torch.Tensor:
    """``out`` (the base output of ``layer``, an AdaptedLayer) plus, for row i, adapter route[i]'s update."""
    per_position = len(route) != x.shape[0]
    if per_position and not _positions_match(layer, x, len(route)):
        raise ConfigError(f"{layer.path}: lk.route was given {len(route)} names for a batch of {x.shape[0]}")
    if torch.is_grad_enabled():
        # Training restacks the routed adapters every call so gradients reach the live parameters.
        names, index, stacks = _plan(layer, x.device, None, route)
        idle = [n for n in names if n not in active]
        if idle and layer.training:
            raise ConfigError(
                f"{layer.path}: lk.route sends rows to {idle} while training, but only {active} are active, so "
                f"{idle} would get no gradient (inactive adapters are frozen): lk.activate(model, "
                f"{sorted(set(active) | set(idle))}) before training them together")
    else:
        # Inference makes one plan per `with lk.route(...)` block, from stacks kept across blocks.
        cache = layer.routing
        if cache.plan is None:
            cache.plan = _cached_plan(layer, x.device)
        names, index, stacks = cache.plan
    if not names:
        return out
    if per_position:  # each position is a row of its own
        # (positions, 1, d_in) or token ids (positions, 1); (positions, 1, d_out)
        x_rows, out_rows = x.reshape(len(route), 1, *x.shape[2:]), out.reshape(len(route), 1, out.shape[-1])
        if stacks is None:
            return _one_adapter_at_a_time(layer, x_rows, out_rows, names, index).view(out.shape)
        return _by_adapter(layer, x_rows, out_rows, index, stacks).view(out.shape)
    if stacks is None:
        return _one_adapter_at_a_time(layer, x, out, names, index)
    if len(names) == 1 and not layer.training:
        # One adapter (eval, generate, a server asked for one): its rows in one matmul, where gathering its
        # factors per row copied them batch-size times per layer and step
        return _by_adapter(layer, x, out, index, stacks)
    A, B, p = stacks
    A_rows, B_rows = A[index], B[index]  # (b, R, d_in), (b, d_out, R)
    b = x.shape[0]
    if layer.kind.layout == "embedding":
        h = A.transpose(1, 2)[index.view(b, *(1,) * (x.dim() - 1)), x]  # (b, *, R): per-row lookup
        h = h.reshape(b, -1, h.shape[-1])
    else:
        h = x.reshape(b, -1, x.shape[-1]).to(A.dtype)  # (b, T, d_in)
        if layer.training and bool(p.any()):
            keep = (1 - p[index]).view(b, 1, 1)
            h = h * (torch.rand_like(h) < keep) / keep
        h = torch.bmm(h, A_rows.transpose(1, 2))  # (b, T, R)
    delta = torch.bmm(h, B_rows.transpose(1, 2))  # (b, T, d_out)
    return add_update(out, delta.view(out.shape))


def _positions_match(layer, x: torch.Tensor, names: int) -> bool:
    """Whether ``names`` is one per position of ``x``: (rows, positions, d_in) into a linear layer, or token ids
    (rows, positions) into an embedding."""
    wanted = {"linear": 3, "embedding": 2}.get(layer.kind.layout)
    return x.dim() == wanted and x.shape[0] * x.shape[1] == names


def _by_adapter(layer, x, out, index, stacks) -> torch.Tensor:
    """``out`` plus row i's update by slot ``index[i]``, one adapter at a time on its rows (x: (rows, T, d_in), or
    (rows, T) token ids)."""
    A, B, p = stacks
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=A.shape[0]).tolist()
    delta = out.new_zeros(out.shape, dtype=A.dtype).view(len(index), -1)
    start = counts[0]  # slot 0 (the base) first: no update
    for slot, count in enumerate(counts[1:], start=1):
        if not count:
            continue
        rows = order[start:start + count]
        start += count
        if layer.kind.layout == "embedding":
            h = F.embedding(x.index_select(0, rows).reshape(-1), A[slot].t())  # (n·T, R)
        else:
            h = x.index_select(0, rows).reshape(-1, x.shape[-1]).to(A.dtype)  # (n·T, d_in)
            if layer.training and p[slot] > 0:
                h = F.dropout(h, float(p[slot]))
            h = h @ A[slot].t()
        # in place: a copy per adapter would rewrite all of delta
        delta.index_copy_(0, rows, (h @ B[slot].t()).reshape(count, -1))
    return add_update(out, delta.view(out.shape))


def _plan(layer, device: torch.device, every: tuple | None, route: list | None = None) -> tuple:
    """(names routed on this layer, per-row slot index with 0 = the base, stacked (A, s·B, dropout p)).

    The stacks are None when a routed adapter has no low-rank factors: then the slots number ``names`` for
    the per-adapter loop. ``every`` = (slots, stacks) of all the layer's factored adapters (inference, see
    _inference_stacks) is used when it covers the routed names; otherwise only ``names`` are stacked,
    afresh. ``route`` defaults to ``layer.route``.
    """
    route = layer.route if route is None else route
    here = layer.adapters._modules
    names = sorted({n for n in route if n is not None and n in here})
    if not names:
        return names, None, None
    if every is not None and every[1] is not None and all(n in every[0] for n in names):
        slot, stacks = every
    else:
        adapters = [layer.adapters[n] for n in names]
        factors = [a.factors() for a in adapters]
        stacks = None if any(f is None for f in factors) else stack_factors(factors, adapters)
        slot = {n: i + 1 for i, n in enumerate(names)}
    return names, torch.tensor([slot.get(n, 0) for n in route], device=device), stacks


def _cached_plan(layer, device: torch.device) -> tuple:
    """The inference plan for ``layer.route``, remembered (with the stacks) until a routed adapter changes."""
    here = layer.adapters._modules  # (a submodule lookup per name would cost more than the check)
    names = [n for n in dict.fromkeys(layer.route) if n is not None and n in here]
    slots, stacks, plans = _inference_stacks(layer, names)
    key = (tuple(layer.route), device)
    plan = plans.get(key)
    if plan is None:
        if len(plans) >= 64:
            plans.clear()
        plan = plans[key] = _plan(layer, device, (slots, stacks))
    return plan


def _inference_stacks(layer, names: list[str]) -> tuple[dict[str, int], tuple | None, dict]:
    """(slots, stacks) of every adapter of the layer that has low-rank factors, and the plans made from them.

    Reused while each adapter a block routes (``names``) holds the same tensor objects at the same storage
    and version as when stacked; rows of adapters it does not route are never read.
    """
    cache = layer.routing
    cached = cache.stacks  # it holds the objects alive, so their ids stay unique
    if cached is not None:
        here, stacked = layer.adapters._modules, cached[0]
        try:
            if all(stacked.get(n) == _fingerprint(here[n]) for n in names):
                return cached[2]
        except RuntimeError:  # inference-mode tensors keep no version
            pass
    adapters = list(layer.adapters.items())
    factored = [(n, a, f) for n, a in adapters for f in [a.factors()] if f is not None]
    try:
        stacks = stack_factors([f for _, _, f in factored], [a for _, a, _ in factored]) if factored else None
    except RuntimeError:  # adapters of different dtypes or devices: stack only the routed ones, per block
        stacks = None
    entry = ({n: i + 1 for i, (n, _, _) in enumerate(factored)}, stacks, {})
    try:
        prints = {n: _fingerprint(a) for n, a in adapters}
    except RuntimeError:  # inference-mode tensors keep no version: nothing is cached
        prints = None
    refs = (adapters, [t for _, a in adapters for t in _own_tensors(a, [])])
    cache.stacks = None if prints is None else (prints, refs, entry)
    return entry


def _one_adapter_at_a_time(layer, x, out, names, index):
    """Routing for adapters without low-rank factors: one call per adapter, on its rows."""
    base = out
    for slot, name in enumerate(names, start=1):
        rows = (index == slot).nonzero().squeeze(1)
        rows_out = base.index_select(0, rows)
        out = out.index_copy(0, rows, layer.run_adapter(layer.adapters[name], x.index_select(0, rows), rows_out,
                                                        rows_out))
    return out


def _fingerprint(adapter: nn.Module) -> list:
    """What routing reads off an adapter: its identity, scale, dropout and each tensor's identity, storage, version."""
    key = [id(adapter), adapter.scale, adapter.dropout_p]
    for t in _own_tensors(adapter, []):
        if t is not None:
            key += (id(t), t._version, t.data_ptr())
    return key


def _own_tensors(module: nn.Module, out: list) -> list:
    """``module``'s parameters and buffers, its submodules' included (a cheap walk, no names)."""
    out.extend(module._parameters.values())
    out.extend(module._buffers.values())
    for child in module._modules.values():
        if child is not None:
            _own_tensors(child, out)
    return out


def stack_factors(factors, adapters) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack (A, s·B) of several adapters, zero-padded to one rank, behind a zero slot for the base."""
    R = max(A.shape[0] for A, _, _ in factors)
    A0, B0, _ = factors[0]
    As = [A0.new_zeros(R, A0.shape[1])]
    Bs = [B0.new_zeros(B0.shape[0], R)]
    for A, B, s in factors:
        As.append(F.pad(A, (0, 0, 0, R - A.shape[0])))
        Bs.append(F.pad(B * s, (0, R - B.shape[1])))
    p = torch.tensor([0.0] + [a.dropout_p for a in adapters], device=A0.device)
    return torch.stack(As), torch.stack(Bs), p
