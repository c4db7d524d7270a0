"""AdaptedLayer: a frozen base layer plus any number of named adapters.

The adapted layer *owns* the base ``weight`` and ``bias`` under their original names, so
``model.state_dict()`` keys of the base never change (base checkpoints still load) and
``lk.disabled`` is exactly the base. The original module object is kept, without its
parameters and outside the module tree, for its forward geometry and to hand back on unload.

    forward(x) = base(x) + Σ_{active, unmerged} adapter(x)      or, under lk.route, one adapter per row
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import routing
from lorakit.errors import AdapterExistsError, ConfigError, MergeError
from lorakit.kinds import LINEAR, RESIDUAL_KINDS, LayerKind, canonical, kind_of
from lorakit.methods.base import LayerSpec, add_update, adapter_dtype


def _make_spec(base: nn.Module, kind: LayerKind, weight: torch.Tensor, holder) -> LayerSpec:
    d_in, d_out = kind.sizes(base)
    extra = {}
    if kind.layout == "conv":
        extra = dict(kernel_size=tuple(base.kernel_size), stride=tuple(base.stride), padding=base.padding,
                     dilation=tuple(base.dilation), groups=base.groups, padding_mode=base.padding_mode,
                     reversed_padding=tuple(base._reversed_padding_repeated_twice))
    elif kind.layout == "embedding":
        extra = dict(padding_idx=base.padding_idx)
    dtype = torch.float32 if kind.dequantize else adapter_dtype(weight.dtype)  # adapters on a quantized base
    return LayerSpec(layout=kind.layout, d_in=d_in, d_out=d_out, device=weight.device,
                     dtype=dtype, base=holder, source=weight, **extra)


@dataclass(frozen=True)
class PlainBase:
    """The weight of a layer not yet wrapped, for the spec its first adapter is built from."""

    kind: LayerKind
    module: nn.Module
    weight: torch.Tensor

    def base_weight(self) -> torch.Tensor:
        """The weight in canonical layout, float32, detached."""
        return canonical(self.kind, self.module, self.weight)


def spec_of(module: nn.Module) -> LayerSpec:
    """The LayerSpec of a plain (adaptable) or already adapted module."""
    if isinstance(module, AdaptedLayer):
        return module.spec()
    kind, weight = kind_of(module), module.weight
    return _make_spec(module, kind, weight, PlainBase(kind, module, weight))


def adapted_layers(model: nn.Module) -> list[tuple[str, AdaptedLayer]]:
    """(path, layer) for every adapted layer of the model, in ``named_modules()`` order.

    Walked afresh on every call, so it is never stale, but without descending into adapted layers:
    nothing inside one is adapted, and their adapters are most of the tree (90% of the 4,000 modules
    of a 30-layer Llama with 16 adapters), which made every ``lk.route`` block cost milliseconds.
    """
    found: list[tuple[str, AdaptedLayer]] = []
    find_layers(model, "", set(), found, AdaptedLayer)
    return found


def find_layers(module: nn.Module, path: str, seen: set[int], found: list, types) -> None:
    """Append (path, module) for each module of one of ``types`` at or under ``module`` (at ``path``) to ``found``."""
    if id(module) in seen:  # a module registered twice counts once, at its first path, as in named_modules
        return
    seen.add(id(module))
    if isinstance(module, types):
        found.append((path, module))
        return
    for name, child in module._modules.items():
        if child is not None:
            find_layers(child, f"{path}.{name}" if path else name, seen, found, types)


class AdaptedLayer(nn.Module):
    """A frozen base layer with named adapters; see the module docstring."""

    def __init__(self, base: nn.Module, kind: LayerKind, path: str):
        super().__init__()
        self.kind, self.path = kind, path
        self.weight = base.weight
        self.register_parameter("bias", getattr(base, "bias", None))
        for attr in kind.attributes:
            setattr(self, attr, getattr(base, attr))
        # The base keeps its geometry but gives up its tensors: the only references live here,
        # so nothing can go stale when the model is moved, cast or loaded with assign=True.
        self._base_had_bias = "bias" in base._parameters
        del base.weight
        if self._base_had_bias:
            del base.bias
        object.__setattr__(self, "base", base)  # not a submodule: its keys must not appear
        self.adapters = nn.ModuleDict()
        self.recipes: dict[str, object] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self.route: list[str | None] | None = None
        self.routing = routing.RoutingCache()
        # The (disabled, route, active) of the last two differing forwards since gradient checkpointing last
        # reran one: a rerun happens inside backward, maybe after the lk.route/lk.disabled block has ended.
        self._modes: list[tuple] = []
        self._rerun = False
        # Adapters built while the base weight was on the meta device: garbage until lk.reset (or a load).
        self.unready: set[str] = set()
        self.register_buffer("original_weight", None, persistent=False)  # kept while merged
        # While merged on a quantized base: (its kind, its quantized weight), see merge.
        self.quantized: tuple[LayerKind, nn.Parameter] | None = None
        # A residual base's (QPiSSA, see LayerKind.principal) low-rank P = principal_B·principal_A, in float.
        self.register_buffer("principal_A", None)  # (r, d_in)
        self.register_buffer("principal_B", None)  # (d_out, r)

    # --- building -----------------------------------------------------------------------------
    def spec(self) -> LayerSpec:
        """What a method needs to build an adapter on this layer."""
        return _make_spec(self.base, self.kind, self.weight, self)

    def base_weight(self) -> torch.Tensor:
        """The unmerged base weight in canonical layout, float32 (detached)."""
        kind, base, weight = self._unmerged_base()
        weight = canonical(kind, base, weight)
        return weight + self._principal() if kind.principal else weight

    def _principal(self) -> torch.Tensor:
        """A residual base's float part P = B·A, float32, (d_out, d_in)."""
        return self.principal_B.float() @ self.principal_A.float()

    def _base_forward(self, kind: LayerKind, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = kind.forward(self.base, x, weight, self.bias)
        if kind.principal:  # not once merged: the merged kind is a float copy that holds P already
            A, B = self.principal_A, self.principal_B
            out = add_update(out, F.linear(F.linear(x.to(A.dtype), A), B))
        return out

    def _unmerged_base(self) -> tuple[LayerKind, nn.Module, torch.Tensor]:
        """(kind, base module, weight) of the base as it was before any merge."""
        if self.quantized is not None:
            return self.quantized[0], self.base, self.quantized[1]
        return self.kind, self.base, self.original_weight if self.merged else self.weight

    def add(self, name: str, adapter: nn.Module, recipe) -> None:
        """Attach an adapter built by ``recipe`` (kept: saving and summaries read it)."""
        if name in self.adapters:
            raise AdapterExistsError(f"{self.path} already has an adapter named {name!r}")
        self.adapters[name] = adapter
        self.recipes[name] = recipe
        self.routing.clear()
        if self.weight.is_meta:
            self.unready.add(name)
        self._bind_specs()

    def _bind_specs(self) -> None:
        """Give every adapter this layer's spec as it is now: its device and dtype, and the base weight read
        through the layer, so that no adapter keeps a tensor the layer has moved, cast or replaced."""
        spec = dataclasses.replace(self.spec(), source=None)  # source only keys SVD caches while building
        for module in self.adapters.modules():
            if isinstance(getattr(module, "spec", None), LayerSpec):
                module.spec = spec

    def _apply(self, fn, recurse: bool = True):
        """Run ``fn`` (what ``.to()``, ``.cuda()``, ``.half()``... apply) over the base and the adapters.

        Adapters never go below float32 (lorakit's dtype policy, as PEFT's at creation): where ``fn``
        would make their floating tensors 16-bit, they only move to its device. So ``adapt`` then
        ``.half()`` gives the same model as ``.half()`` then ``adapt``.
        """
        super()._apply(fn, recurse=False)
        if recurse:
            keep = _at_least_float32(fn)
            for child in self.children():
                child._apply(keep)
        if self.quantized is not None:  # the quantized original a merge keeps is not registered
            kind, weight = self.quantized
            self.quantized = (kind, fn(weight))
        for weight in (self.weight, self.quantized and self.quantized[1]):
            state = getattr(weight, "quant_state", None)
            if state is not None and state.dtype.is_floating_point:
                # A cast of the model casts what the 4-bit weight stands for: its dequantized dtype.
                state.dtype = fn(torch.empty(0, dtype=state.dtype, device=weight.device)).dtype
        self.routing.clear()  # it holds the tensors as they were
        self._bind_specs()
        return self

    def __getstate__(self):
        # Caches are rebuilt on use; a copy or a pickle must not carry (or share) the old tensors.
        return {**self.__dict__, "routing": routing.RoutingCache()}

    def replace_base(self, base: nn.Module, principal: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Put ``base`` (a quantized copy of the base layer, see lk.quantize) under the adapters.

        ``principal`` = (A, B): the base computes base(x) + B·A·x, a part of W kept in float (QPiSSA's
        residual base, a kind of its own).
        """
        if self.merged:
            raise MergeError(f"{self.path} has merged adapters; lk.unmerge(model) before replacing its base")
        self.kind = kind_of(base) if principal is None else RESIDUAL_KINDS[kind_of(base)]
        self.weight = base.weight
        del base.weight
        if "bias" in base._parameters:
            del base.bias
        object.__setattr__(self, "base", base.train(self.training))
        self.principal_A, self.principal_B = principal or (None, None)
        self.routing.clear()
        self._bind_specs()  # their specs must not pin the old float weight in memory

    def delete(self, name: str) -> None:
        if name in self.merged:
            keep = [n for n in self.merged if n != name]
            self.unmerge()
            self.merge(keep)
        del self.adapters[name]
        del self.recipes[name]
        self.unready.discard(name)
        self.routing.clear()
        self.active = [n for n in self.active if n != name]

    def train(self, mode: bool = True) -> "AdaptedLayer":
        self.base.train(mode)  # not a submodule, yet its forward may read its mode (bitsandbytes int8)
        return super().train(mode)

    # --- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        disabled, route, active = forward_mode(self)
        if disabled:
            kind, _, weight = self._unmerged_base()
            return self._base_forward(kind, x, weight)
        if self.unready:
            self._refuse_unready(route, active)
        out = self._base_forward(self.kind, x, self.weight)
        if route is not None:
            return routing.forward(self, x, out, route, active)
        base = out
        for name in active:
            if name not in self.merged:
                out = self.run_adapter(self.adapters[name], x, out, base)
        return out

    def _refuse_unready(self, route, active) -> None:
        used = set(active) if route is None else set(route)
        unready = sorted(self.unready & used)
        if unready:
            raise ConfigError(
                f"{self.path}: adapter {unready[0]!r} was built while the base weight was on the meta device and "
                "holds no values yet: materialise the model (to_empty, then load the base weights), then "
                "lk.reset(model, name) to initialise it, or lk.load it onto the materialised model")

    def run_adapter(self, adapter: nn.Module, x: torch.Tensor, out: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``adapter(x, out)``; adapters that rescale the base output (DoRA) also get ``base = W·x``, no bias."""
        if not adapter.needs_base:
            return adapter(x, out)
        if self.bias is not None:
            base = base - self.bias.view(-1, *(1,) * (base.dim() - 2)) if self.kind.layout == "conv" else base - self.bias
        return adapter(x, out, base=base)

    # --- merging ------------------------------------------------------------------------------
    def pending(self, names: list[str] | None = None) -> list[str]:
        """The adapters ``merge(names)`` would add now: ``names`` (default: the active ones) not yet merged."""
        return [n for n in (self.active if names is None else names) if n not in self.merged]

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Add the adapters' ΔW into the base weight, keeping the original for an exact unmerge."""
        names = self.pending(names)
        if not names:
            return
        delta = None
        for name in names:
            d = self.adapters[name].delta_weight()
            if not torch.isfinite(d).all():
                raise MergeError(f"{self.path}: adapter {name!r} has NaN/Inf in its update; nothing was merged")
            delta = d if delta is None else delta + d
        if self.kind.transposed:
            delta = delta.t()
        if self.kind.dequantize is not None:
            # A float update cannot be added to 4/8-bit numbers without rounding it away: the layer
            # becomes a plain linear on a dequantized copy, and keeps the quantized weight for unmerge.
            self.quantized = (self.kind, self.weight)
            weight = self.kind.dequantize(self.base, self.weight)
            if self.kind.principal:
                delta = delta + self._principal()
            self.weight = nn.Parameter((weight.float() + delta).to(weight.dtype), requires_grad=False)
            self.kind = LINEAR
        else:
            if self.original_weight is None:
                self.original_weight = self.weight.detach().clone()
            self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        self.merged += names

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original weight (bit for bit; a quantized base's very tensors)."""
        if self.quantized is not None:
            self.kind, self.weight = self.quantized
            self.quantized = None
        elif self.merged:
            self.weight.copy_(self.original_weight)
            self.original_weight = None
        self.merged = []

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # A meta-built adapter whose every tensor this load brings (none recomputed from the base) is ready.
        for name in list(self.unready):
            adapter = self.adapters[name]
            keys = adapter.state_dict().keys()
            whole = len(keys) == len(list(adapter.buffers())) + len(list(adapter.parameters()))
            if whole and all(f"{prefix}adapters.{name}.{k}" in state_dict for k in keys):
                self.unready.discard(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kind.extra_state is not None:  # a quantized base: the same keys as the bitsandbytes layer's
            for key, value in self.kind.extra_state(self.base, self.weight).items():
                destination[prefix + key] = value if keep_vars else value.detach()

    def unwrap(self) -> nn.Module:
        """The original module, holding this layer's (possibly merged) weight and bias.

        A quantized base merged into a float copy comes back as a plain ``nn.Linear``.
        """
        if self.kind.principal:
            raise MergeError(f"{self.path}: a QPiSSA base keeps part of its weight in float beside the quantized "
                             "residual; no bitsandbytes layer holds both: lk.unload(model, merge=True)")
        base = self.base
        if self.quantized is not None:
            base = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        base.weight = self.weight
        if self._base_had_bias:
            base.register_parameter("bias", self.bias)
        return base

    def extra_repr(self) -> str:
        return f"{type(self.base).__name__}, adapters={list(self.adapters)}, active={self.active}, merged={self.merged}"


def forward_mode(module: nn.Module) -> tuple[bool, list | None, list[str]]:
    """(disabled, route, active) for this forward of an adapted layer or a train= module (``module``).

    Gradient checkpointing reruns a forward inside backward, when the ``lk.route`` or ``lk.disabled``
    block it ran in may be over: a rerun takes the mode of the forward it reruns. Forwards record
    their mode; if forwards of two different modes could be the one rerun, that is an error.
    """
    mode = (module.disabled, module.route, module.active)
    if torch.compiler.is_compiling():  # a compiled graph is specialised to these attributes anyway
        return mode
    if torch._C._current_graph_task_id() == -1:  # not inside backward: a forward of its own
        modes = [] if module._rerun else module._modes
        if not modes or modes[-1] != mode:
            module.__dict__.update(_modes=(modes + [mode])[-2:], _rerun=False)  # past nn.Module's slow setattr
        return mode
    module.__dict__["_rerun"] = True
    if len(module._modes) > 1:
        raise ConfigError(
            f"{module.path}: gradient checkpointing reruns this layer's forward in backward, and it ran under two "
            "settings (lk.route / lk.disabled / lk.activate) since the last backward; call backward() before "
            "changing them")
    return module._modes[0] if module._modes else mode


def _at_least_float32(fn):
    """``fn`` for adapter tensors: as ``fn``, but a floating tensor it would make 16-bit becomes float32 there."""
    targets: dict[tuple, torch.Tensor] = {}

    def apply(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return fn(t)
        key = (t.dtype, t.device)
        if key not in targets:  # what fn does to such a tensor, read off an empty one
            targets[key] = fn(torch.empty(0, dtype=t.dtype, device=t.device))
        target = targets[key]
        kept = adapter_dtype(target.dtype)
        return fn(t) if kept == target.dtype else t.to(device=target.device, dtype=kept)

    return apply
