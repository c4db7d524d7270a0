"""AdaptedLayer: a frozen base layer plus any number of named adapters.

The adapted layer *owns* the base ``weight`` and ``bias`` under their original names, so
``model.state_dict()`` keys of the base never change (base checkpoints still load) and
``lk.disabled`` is exactly the base. The original module object is kept, without its
parameters and outside the module tree, for its forward geometry and to hand back on unload.

    forward(x) = base(x) + Σ_{active, unmerged} adapter(x)      or, under lk.route, one adapter per row
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import AdapterExistsError, ConfigError, MergeError
from lorakit.methods.base import LayerSpec, adapter_dtype


@dataclass(frozen=True)
class LayerKind:
    """How one base layer type is adapted: its canonical layout, forward and geometry."""

    kind: str  # canonical layout the methods see: "linear" | "conv" | "embedding"
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    sizes: Callable[[nn.Module], tuple[int, int]]  # (d_in, d_out)
    # Plain attributes model code reads off these layers (e.g. embed_tokens.padding_idx).
    attributes: tuple[str, ...] = ()
    transposed: bool = False  # weight stored (d_in, d_out), as GPT-2's Conv1D
    # Quantized bases (lorakit/quant.py): (base, weight) -> the float weight, (d_out, d_in).
    dequantize: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    # (base, weight) -> {key: tensor} a quantized base saves beside its weight (its scales).
    extra_state: Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]] | None = None
    # Names the kind: a pickled model refers to it by this name, so ``kind is LINEAR`` survives a reload.
    label: str | None = None

    def __post_init__(self):
        if self.label is not None:
            _KINDS_BY_LABEL[self.label] = self

    def __reduce__(self):
        return (kind_named, (self.label,)) if self.label is not None else super().__reduce__()


_KINDS_BY_LABEL: dict[str, LayerKind] = {}


def kind_named(label: str) -> LayerKind:
    """The LayerKind registered under ``label`` (quantized kinds register when lorakit.quant loads)."""
    if label not in _KINDS_BY_LABEL:
        import lorakit.quant  # noqa: F401  (it registers the quantized kinds)
    return _KINDS_BY_LABEL[label]


def _linear_forward(base, x, weight, bias):
    return F.linear(x, weight, bias)


def _conv_forward(base, x, weight, bias):
    return base._conv_forward(x, weight, bias)


def linear_sizes(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer."""
    return module.in_features, module.out_features


def _conv1d_gpt2_forward(base, x, weight, bias):
    out = x.reshape(-1, x.shape[-1])
    out = torch.addmm(bias, out, weight) if bias is not None else out @ weight
    return out.view(*x.shape[:-1], weight.shape[1])


def _embedding_forward(base, x, weight, bias):
    return F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type,
                       base.scale_grad_by_freq, base.sparse)


def _gpt2_sizes(m):
    return m.nx, m.nf


def _conv_sizes(m):
    return m.in_channels, m.out_channels


def _embedding_sizes(m):
    return m.num_embeddings, m.embedding_dim


LINEAR = LayerKind("linear", _linear_forward, linear_sizes, ("in_features", "out_features"), label="linear")
GPT2_CONV1D = LayerKind("linear", _conv1d_gpt2_forward, _gpt2_sizes, ("nf", "nx"), transposed=True,
                        label="gpt2_conv1d")
CONV = LayerKind("conv", _conv_forward, _conv_sizes,
                 ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                  "padding_mode"), label="conv")
EMBEDDING = LayerKind("embedding", _embedding_forward, _embedding_sizes,
                      ("num_embeddings", "embedding_dim", "padding_idx", "max_norm"), label="embedding")

# Type → kind (minLoRA's table). Subclasses match through isinstance, in this order.
LAYER_KINDS: list[tuple[type, LayerKind]] = [
    (nn.Linear, LINEAR), (nn.Embedding, EMBEDDING), (nn.Conv1d, CONV), (nn.Conv2d, CONV), (nn.Conv3d, CONV),
]
# nn.MultiheadAttention reads out_proj.weight directly and never calls out_proj's forward, so an
# adapter there would be silently ignored.
_REFUSED = ("NonDynamicallyQuantizableLinear",)


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The LayerKind for a module, or None if no method can adapt it."""
    if type(module).__name__ in _REFUSED:
        return None
    # bitsandbytes layers subclass nn.Linear: told apart by their weight's type, whoever built them.
    if type(getattr(module, "weight", None)).__name__ in ("Params4bit", "Int8Params"):
        from lorakit.quant import KINDS  # lazily: bitsandbytes is an optional extra

        return KINDS[type(module.weight).__name__]
    for cls, kind in LAYER_KINDS:
        if isinstance(module, cls):
            return kind
    # transformers' GPT-2 Conv1D, recognised by shape of its API so core never imports transformers.
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return GPT2_CONV1D
    return None


_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_ungrouped(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Convolution of ``x`` by ``weight`` with the base layer's geometry (padding mode, stride, dilation), groups=1."""
    conv = _CONVS[len(base.kernel_size)]
    if base.padding_mode != "zeros":
        x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
        return conv(x, weight, None, base.stride, 0, base.dilation)
    return conv(x, weight, None, base.stride, base.padding, base.dilation)


def _canonical(kind: LayerKind, base: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    w = (kind.dequantize(base, weight) if kind.dequantize else weight.detach()).float()
    return w.t() if kind.transposed else w


def _make_spec(base: nn.Module, kind: LayerKind, weight: torch.Tensor, base_weight) -> LayerSpec:
    d_in, d_out = kind.sizes(base)
    extra = {}
    if kind.kind == "conv":
        extra = dict(kernel_size=tuple(base.kernel_size), stride=tuple(base.stride), padding=base.padding,
                     dilation=tuple(base.dilation), groups=base.groups, conv=functools.partial(_conv_ungrouped, base))
    elif kind.kind == "embedding":
        extra = dict(padding_idx=base.padding_idx)
    dtype = torch.float32 if kind.dequantize else adapter_dtype(weight.dtype)  # adapters on a quantized base
    return LayerSpec(kind=kind.kind, d_in=d_in, d_out=d_out, device=weight.device,
                     dtype=dtype, weight=base_weight, source=weight, **extra)


def spec_of(module: nn.Module) -> LayerSpec:
    """The LayerSpec of a plain (adaptable) or already adapted module."""
    if isinstance(module, AdaptedLayer):
        return module.spec()
    kind, weight = layer_kind(module), module.weight
    # A partial, not a lambda: adapters keep their spec, and a model holding them must pickle.
    return _make_spec(module, kind, weight, functools.partial(_canonical, kind, module, weight))


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
        self._route_cache: tuple | None = None  # (names, index, stacks) for one lk.route block, no grad
        # The (disabled, route, active) of the last two differing forwards since gradient checkpointing last
        # reran one: a rerun happens inside backward, maybe after the lk.route/lk.disabled block has ended.
        self._modes: list[tuple] = []
        self._rerun = False
        # Adapters built while the base weight was on the meta device: garbage until lk.reset (or a load).
        self.unready: set[str] = set()
        self._stack_cache: tuple | None = None  # kept across lk.route blocks, see _inference_stacks
        self.register_buffer("original_weight", None, persistent=False)  # kept while merged
        # While merged on a quantized base: (its kind, its quantized weight), see merge.
        self.quantized: tuple[LayerKind, nn.Parameter] | None = None
        # QPiSSA: the base is quantize(W − P) + P, the low-rank P = principal_B·principal_A kept in float.
        self.register_buffer("principal_A", None)  # (r, d_in)
        self.register_buffer("principal_B", None)  # (d_out, r)

    # --- building -----------------------------------------------------------------------------
    def spec(self) -> LayerSpec:
        """What a method needs to build an adapter on this layer."""
        return _make_spec(self.base, self.kind, self.weight, self.base_weight)

    def base_weight(self) -> torch.Tensor:
        """The unmerged base weight in canonical layout, float32 (detached)."""
        weight = _canonical(*self._unmerged_base())
        return weight if self.principal_A is None else weight + self.principal_B.float() @ self.principal_A.float()

    def _base_forward(self, kind: LayerKind, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = kind.forward(self.base, x, weight, self.bias)
        if self.principal_A is not None and kind.dequantize is not None:  # not once merged: P is in the float copy
            out = out + F.linear(F.linear(x.to(self.principal_A.dtype), self.principal_A), self.principal_B).to(out.dtype)
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
        self._stack_cache = None
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
        self._stack_cache = self._route_cache = None  # they hold the tensors as they were
        self._bind_specs()
        return self

    def __getstate__(self):
        # Caches are rebuilt on use; a copy or a pickle must not carry (or share) the old tensors.
        return {**self.__dict__, "_stack_cache": None, "_route_cache": None}

    def replace_base(self, base: nn.Module, principal: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Put ``base`` (a quantized copy of the base layer, see lk.quantize) under the adapters.

        ``principal`` = (A, B): the base computes base(x) + B·A·x, a part of W kept in float (QPiSSA).
        """
        if self.merged:
            raise MergeError(f"{self.path} has merged adapters; lk.unmerge(model) before replacing its base")
        self.kind = layer_kind(base)
        self.weight = base.weight
        del base.weight
        if "bias" in base._parameters:
            del base.bias
        object.__setattr__(self, "base", base.train(self.training))
        self.principal_A, self.principal_B = principal or (None, None)
        self._stack_cache = None
        self._bind_specs()  # their specs must not pin the old float weight in memory

    def delete(self, name: str) -> None:
        if name in self.merged:
            keep = [n for n in self.merged if n != name]
            self.unmerge()
            self.merge(keep)
        del self.adapters[name]
        del self.recipes[name]
        self.unready.discard(name)
        self._stack_cache = None
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
            return self._routed(x, out, route, active)
        base = out
        for name in active:
            if name not in self.merged:
                out = self._run_adapter(self.adapters[name], x, out, base)
        return out

    def _refuse_unready(self, route, active) -> None:
        used = set(active) if route is None else set(route)
        unready = sorted(self.unready & used)
        if unready:
            raise ConfigError(
                f"{self.path}: adapter {unready[0]!r} was built while the base weight was on the meta device and "
                "holds no values yet: materialise the model (to_empty, then load the base weights), then "
                "lk.reset(model, name) to initialise it, or lk.load it onto the materialised model")

    def _run_adapter(self, adapter: nn.Module, x: torch.Tensor, out: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``adapter(x, out)``; adapters that rescale the base output (DoRA) also get ``base = W·x``, no bias."""
        if not getattr(adapter, "needs_base", False):
            return adapter(x, out)
        if self.bias is not None:
            base = base - self.bias.view(-1, *(1,) * (base.dim() - 2)) if self.kind.kind == "conv" else base - self.bias
        return adapter(x, out, base=base)

    def _routed(self, x: torch.Tensor, out: torch.Tensor, route: list, active: list[str]) -> torch.Tensor:
        """Row i of the batch gets adapter route[i] (None or absent here = the base)."""
        if x.shape[0] != len(route):
            raise ConfigError(f"{self.path}: lk.route was given {len(route)} names for a batch of {x.shape[0]}")
        if torch.is_grad_enabled():
            # Training restacks the routed adapters every call so gradients reach the live parameters.
            names, index, stacks = self._plan(x.device, None, route)
            idle = [n for n in names if n not in active]
            if idle and self.training:
                raise ConfigError(
                    f"{self.path}: lk.route sends rows to {idle} while training, but only {active} are active, so "
                    f"{idle} would get no gradient (inactive adapters are frozen): lk.activate(model, "
                    f"{sorted(set(active) | set(idle))}) before training them together")
        else:
            # Inference makes one plan per `with lk.route(...)` block, from stacks kept across blocks.
            if self._route_cache is None:
                self._route_cache = self._cached_plan(x.device)
            names, index, stacks = self._route_cache
        if not names:
            return out
        if stacks is None:
            return self._routed_loop(x, out, names, index)
        A, B, p = stacks
        A_rows, B_rows = A[index], B[index]  # (b, R, d_in), (b, d_out, R)
        b = x.shape[0]
        if self.kind.kind == "embedding":
            h = A.transpose(1, 2)[index.view(b, *(1,) * (x.dim() - 1)), x]  # (b, *, R): per-row lookup
            h = h.reshape(b, -1, h.shape[-1])
        else:
            h = x.reshape(b, -1, x.shape[-1]).to(A.dtype)  # (b, T, d_in)
            if self.training and bool(p.any()):
                keep = (1 - p[index]).view(b, 1, 1)
                h = h * (torch.rand_like(h) < keep) / keep
            h = torch.bmm(h, A_rows.transpose(1, 2))  # (b, T, R)
        delta = torch.bmm(h, B_rows.transpose(1, 2))  # (b, T, d_out)
        return out + delta.view(out.shape).to(out.dtype)

    def _plan(self, device: torch.device, every: tuple | None, route: list | None = None) -> tuple:
        """(names routed on this layer, per-row slot index with 0 = the base, stacked (A, s·B, dropout p)).

        The stacks are None when a routed adapter has no low-rank factors (conv LoRA, DoRA...): then the
        slots number ``names`` for the per-adapter loop. ``every`` = (slots, stacks) of all the layer's
        factored adapters (inference, see _inference_stacks) is used when it covers the routed names;
        otherwise only ``names`` are stacked, afresh. ``route`` defaults to ``self.route``.
        """
        route = self.route if route is None else route
        here = self.adapters._modules
        names = sorted({n for n in route if n is not None and n in here})
        if not names:
            return names, None, None
        if every is not None and every[1] is not None and all(n in every[0] for n in names):
            slot, stacks = every
        else:
            adapters = [self.adapters[n] for n in names]
            factors = [a.factors() if hasattr(a, "factors") else None for a in adapters]
            stacks = None if any(f is None for f in factors) else _stack_factors(factors, adapters)
            slot = {n: i + 1 for i, n in enumerate(names)}
        return names, torch.tensor([slot.get(n, 0) for n in route], device=device), stacks

    def _cached_plan(self, device: torch.device) -> tuple:
        """The inference plan for ``self.route``, remembered (with the stacks) until a routed adapter changes."""
        here = self.adapters._modules  # (a submodule lookup per name would cost more than the check)
        names = [n for n in dict.fromkeys(self.route) if n is not None and n in here]
        slots, stacks, plans = self._inference_stacks(names)
        key = (tuple(self.route), device)
        plan = plans.get(key)
        if plan is None:
            if len(plans) >= 64:
                plans.clear()
            plan = plans[key] = self._plan(device, (slots, stacks))
        return plan

    def _inference_stacks(self, names: list[str]) -> tuple[dict[str, int], tuple | None, dict]:
        """(slots, stacks) of every adapter of the layer that has low-rank factors, and the plans made from them.

        Stacking every adapter of every layer cost more than the routed matmuls, so without grad the
        stacks outlive the ``lk.route`` block: a later block reuses them, whichever adapters it routes,
        while each adapter it routes (``names``) holds the same tensor objects at the same storage and
        version as when stacked (an in-place update, optimizer step, load or ``.to()`` changes one of
        these); rows of adapters it does not route are never read. Adding or deleting an adapter drops them.
        """
        cached = getattr(self, "_stack_cache", None)  # it holds the objects alive, so their ids stay unique
        if cached is not None:
            here, stacked = self.adapters._modules, cached[0]
            try:
                if all(stacked.get(n) == _fingerprint(here[n]) for n in names):
                    return cached[2]
            except RuntimeError:  # inference-mode tensors keep no version
                pass
        adapters = list(self.adapters.items())
        factored = [(n, a, f) for n, a in adapters for f in [a.factors() if hasattr(a, "factors") else None]
                    if f is not None]
        try:
            stacks = _stack_factors([f for _, _, f in factored], [a for _, a, _ in factored]) if factored else None
        except RuntimeError:  # adapters of different dtypes or devices: stack only the routed ones, per block
            stacks = None
        entry = ({n: i + 1 for i, (n, _, _) in enumerate(factored)}, stacks, {})
        try:
            prints = {n: _fingerprint(a) for n, a in adapters}
        except RuntimeError:  # inference-mode tensors keep no version: nothing is cached
            prints = None
        refs = (adapters, [t for _, a in adapters for t in _own_tensors(a, [])])
        self._stack_cache = None if prints is None else (prints, refs, entry)
        return entry

    def _routed_loop(self, x, out, names, index):
        """Routing for adapters without low-rank factors (conv, other methods): one call per adapter."""
        base = out
        for slot, name in enumerate(names, start=1):
            rows = (index == slot).nonzero().squeeze(1)
            rows_out = base.index_select(0, rows)
            out = out.index_copy(0, rows, self._run_adapter(self.adapters[name], x.index_select(0, rows), rows_out, rows_out))
        return out

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
            if self.principal_A is not None:
                delta = delta + self.principal_B.float() @ self.principal_A.float()
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
        if self.principal_A is not None and self.quantized is None:
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


def _fingerprint(adapter: nn.Module) -> list:
    """What routing reads off an adapter: its identity, scale, dropout and each tensor's identity, storage, version."""
    key = [id(adapter), getattr(adapter, "scale", None), getattr(adapter, "dropout_p", None)]
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


def _stack_factors(factors, adapters) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack (A, s·B) of several adapters, zero-padded to one rank, behind a zero slot for the base."""
    R = max(A.shape[0] for A, _, _ in factors)
    A0, B0, _ = factors[0]
    As = [A0.new_zeros(R, A0.shape[1])]
    Bs = [B0.new_zeros(B0.shape[0], R)]
    for A, B, s in factors:
        As.append(F.pad(A, (0, 0, 0, R - A.shape[0])))
        Bs.append(F.pad(B * s, (0, R - B.shape[1])))
    p = torch.tensor([0.0] + [getattr(a, "dropout_p", 0.0) for a in adapters], device=A0.device)
    return torch.stack(As), torch.stack(Bs), p
