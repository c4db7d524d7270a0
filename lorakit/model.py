"""Model-level operations over every adapted layer: choose, disable, route, merge, remove, report."""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterator, Sequence

import torch
from torch import nn

from lorakit.errors import AdapterNotFoundError, ConfigError, MergeError
from lorakit.kinds import numel, warn_merged
from lorakit.layers import AdaptedLayer, adapted_layers, find_layers
from lorakit.trained import TrainedModule, remove_copies, trained_modules, unwrap_all, use_copies


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on the model: layer by layer in module order, each layer's in the order added."""
    return _names_on(adapted_layers(model))


def _names_on(layers: list[tuple[str, AdaptedLayer]]) -> list[str]:
    """Names of the adapters on ``layers`` ((path, layer) pairs), first seen first."""
    return list(dict.fromkeys(name for _, layer in layers for name in layer.adapters))


def _check_names(model: nn.Module, names: Sequence[str | None],
                 layers: list[tuple[str, AdaptedLayer]] | None = None) -> None:
    """Raise AdapterNotFoundError unless every name but None is on the model (``layers``: its adapted layers)."""
    layers = adapted_layers(model) if layers is None else layers
    unknown = {n for n in names if n is not None}
    for _, layer in layers:  # usually the first layer holds every adapter
        if not unknown:
            break
        unknown.difference_update(layer.adapters.keys())
    if unknown:
        raise AdapterNotFoundError(f"no adapter named {', '.join(map(repr, sorted(unknown)))} on the model; "
                                   f"it has {_names_on(layers)}")


def activate(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapters (their outputs add up); only they are trainable."""
    names = [names] if isinstance(names, str) else list(names)
    _check_names(model, names)
    layers = adapted_layers(model)
    for path, layer in layers:
        if layer.merged and set(layer.merged) != {n for n in names if n in layer.adapters}:
            raise MergeError(f"{path} has {layer.merged} merged; lk.unmerge(model) before switching adapters")
    use_copies(model, names)  # first: it refuses two active owners of one train= module
    for _, layer in layers:
        layer.active = [n for n in names if n in layer.adapters]
        for adapter_name, adapter in layer.adapters.items():
            adapter.requires_grad_(adapter_name in layer.active)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters."""
    active: dict[str, None] = {}
    for _, layer in adapted_layers(model):
        active.update(dict.fromkeys(layer.active))
    return list(active)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes exactly its base function (merged or not)."""
    layers = [layer for _, layer in adapted_layers(model)] + [module for _, module in trained_modules(model)]
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, state in zip(layers, before):
            layer.disabled = state


@contextlib.contextmanager
def route(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row i of every batch uses adapter ``names[i]`` (None = the base).

    Linear and embedding layers also take one name per position (rows × positions, row-major): several
    sequences packed into one row then each go through their own adapter."""
    names = list(names)
    if not names:
        raise ConfigError("lk.route needs one adapter name (or None) per batch row")
    # One walk per block (each new batch opens one), for the adapted layers and the train= modules, whose rows
    # go through their adapter's copy.
    found: list[tuple[str, nn.Module]] = []
    find_layers(model, "", set(), found, (AdaptedLayer, TrainedModule))
    adapted = [(path, m) for path, m in found if isinstance(m, AdaptedLayer)]
    _check_names(model, names, adapted)
    merged = [layer.path for _, layer in adapted if layer.merged]
    if merged:
        raise MergeError(f"lk.route needs unmerged adapters; {merged[0]} is merged (lk.unmerge(model) first)")
    layers = [m for _, m in found]
    before = [layer.route for layer in layers]  # an enclosing block's routing comes back on exit
    _set_route(layers, [names] * len(layers))
    try:
        yield model
    finally:
        _set_route(layers, before)


def _set_route(layers: list[nn.Module], routes: list[list[str | None] | None]) -> None:
    """Give each layer (adapted or train=) its per-row adapter names (None: no routing) and drop its per-block plan."""
    for layer, names in zip(layers, routes):
        # A plain attribute, set past nn.Module.__setattr__: its parameter/buffer/submodule checks
        # cost a millisecond per block over 210 layers, more than the rest of lk.route.
        layer.__dict__["route"] = names
        if isinstance(layer, AdaptedLayer):
            layer.routing.plan = None


def merge(model: nn.Module, names: Sequence[str] | None = None) -> nn.Module:
    """Fold the active adapters (or ``names``) into the base weights: zero added latency.

    All or nothing: if any update is NaN/Inf, every layer is left as it was. A quantized layer
    becomes a float layer on its dequantized weight plus the update (see ``lorakit.quant``).
    """
    if names is not None:
        _check_names(model, names)
    _refuse_shared_weights(model, names)
    done: list[tuple[AdaptedLayer, list[str]]] = []
    try:
        for _, layer in adapted_layers(model):
            before = list(layer.merged)
            layer.merge(_on_layer(layer, names))
            done.append((layer, before))
    except MergeError:
        for layer, before in done:
            layer.unmerge()
            layer.merge(before)
        raise
    dequantized = sum(layer.quantized is not None and not before for layer, before in done)
    if dequantized:
        warn_merged(dequantized)
    return model


def _refuse_shared_weights(model: nn.Module, names: Sequence[str] | None) -> None:
    """Merging writes into the weight in place: one another module also holds would change it too."""
    holders: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        holders[id(p)] = holders.get(id(p), 0) + 1
    for path, layer in adapted_layers(model):
        if layer.pending(_on_layer(layer, names)) and holders.get(id(layer.weight), 0) > 1:
            raise MergeError(f"{path}: its weight is shared with another module (tied input embedding and output "
                             "head?), which merging would change too; nothing was merged. Keep the adapter "
                             "unmerged, or untie the weights first")


def _on_layer(layer: AdaptedLayer, names: Sequence[str] | None) -> list[str] | None:
    """Those of ``names`` this layer carries (None: its active adapters)."""
    return None if names is None else [n for n in names if n in layer.adapters]


_merge = merge  # unload's `merge` flag shadows the function


def unmerge(model: nn.Module) -> nn.Module:
    """Restore every merged layer's original weight exactly."""
    for _, layer in adapted_layers(model):
        layer.unmerge()
    return model


def delete(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (unmerging it first if it was merged) and its copies of ``train=`` modules."""
    _check_names(model, [name])
    for _, layer in adapted_layers(model):
        if name in layer.adapters:
            layer.delete(name)
    remove_copies(model, name)


def reset(model: nn.Module, name: str = "default") -> nn.Module:
    """Initialise adapter ``name`` afresh from each layer's base weight as it is now, as ``lk.adapt`` would,
    and its copies of ``train=`` modules from their originals.

    For an adapter built on the meta device, once the model is materialised (``to_empty``, then the base
    weights loaded). Its tensors are overwritten in place, so an optimizer made before still holds them.
    """
    _check_names(model, [name])
    layers = [layer for _, layer in adapted_layers(model) if name in layer.adapters]
    merged = next((layer.path for layer in layers if name in layer.merged), None)
    if merged is not None:
        raise MergeError(f"{merged}: adapter {name!r} is merged; lk.unmerge(model) before resetting it")
    for layer in layers:
        old, fresh = layer.adapters[name], layer.recipes[name].build(layer.spec())
        now, new = _all_tensors(old), _all_tensors(fresh)
        if now.keys() == new.keys() and all(t.shape == new[k].shape for k, t in now.items()):
            with torch.no_grad():
                for key, tensor in now.items():
                    tensor.copy_(new[key])
        else:  # the fresh adapter has other shapes (a pruned AdaLoRA): it replaces the old one
            fresh.train(old.training).requires_grad_(name in layer.active)
            layer.adapters[name] = fresh
            layer._bind_specs()
        layer.unready.discard(name)
        layer.routing.clear()
    # The adapter's copies of train= modules start again from their originals, as lk.adapt made them.
    for _, module in trained_modules(model):
        if name in module.adapters:
            original = _all_tensors(module.original)
            with torch.no_grad():
                for key, tensor in _all_tensors(module.adapters[name]).items():
                    tensor.copy_(original[key])
    return model


def _all_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, persistent or not, shared ones under each of their names."""
    return {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers(remove_duplicate=False))}


def to_lora(model: nn.Module, name: str = "default") -> nn.Module:
    """Turn adapter ``name`` (PiSSA, MiLoRA) into the plain LoRA computing the same update, in place.

    The result (rank 2r) is an ordinary LoRA on the untouched base: PEFT loads it when saved.
    """
    def plain(layer: AdaptedLayer):
        converted = layer.adapters[name].to_lora()
        if converted is None:
            raise ConfigError(f"{layer.path}: adapter {name!r} ({type(layer.recipes[name]).__name__}) "
                              "has no plain-LoRA form")
        return converted

    replace(model, name, plain)
    return model


def replace(model: nn.Module, name: str, convert) -> None:
    """Swap adapter ``name`` on every layer for ``convert(layer)``'s (recipe, adapter), all or none: every
    conversion is made before any layer changes, so one that raises leaves the model as it was."""
    _check_names(model, [name])
    layers = [layer for _, layer in adapted_layers(model) if name in layer.adapters]
    converted = []
    for layer in layers:
        if name in layer.merged:
            raise MergeError(f"{layer.path}: adapter {name!r} is merged; lk.unmerge(model) first")
        converted.append((layer, convert(layer)))
    for layer, (recipe, adapter) in converted:
        adapter.requires_grad_(name in layer.active)
        layer.adapters[name], layer.recipes[name] = adapter.train(layer.training), recipe
        layer.routing.clear()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Return the plain model with its original module classes.

    ``merge=True`` folds the active adapters in first and keeps the active adapter's copy of each ``train=``
    module in place of the original (as PEFT does); ``merge=False`` restores the base weights and modules.
    """
    (_merge if merge else unmerge)(model)
    for path, layer in adapted_layers(model):
        base = layer.unwrap()
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent), leaf, base)
    unwrap_all(model, keep_active=merge)
    return model


def _by_adapter(model: nn.Module) -> list[tuple[object, list[nn.Module]]]:
    """(recipe, [adapters]) per active adapter name: what a method's model-wide hooks run over."""
    groups: dict[str, tuple[object, list[nn.Module]]] = {}
    for _, layer in adapted_layers(model):
        for name in layer.active:
            groups.setdefault(name, (layer.recipes[name], []))[1].append(layer.adapters[name])
    return list(groups.values())


def step(model: nn.Module, n: int) -> None:
    """Run every adapter's per-step schedule (AdaLoRA's rank allocation) after optimizer step ``n`` (from 0).

    Call it after ``optimizer.step()`` and before ``optimizer.zero_grad()``: it reads the gradients.
    """
    for recipe, adapters in _by_adapter(model):
        recipe.on_step(adapters, n)


def track(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Call ``lk.step(model, n)`` automatically after the optimizer's n-th step; returns the hook handle."""
    count = itertools.count()
    return optimizer.register_step_post_hook(lambda *_: step(model, next(count)))


def regularization(model: nn.Module) -> torch.Tensor:
    """The sum of the active adapters' training regularisers (AdaLoRA's orthogonality term); add it to the loss."""
    terms = [term for recipe, adapters in _by_adapter(model) for term in [recipe.regularization(adapters)]
             if term is not None]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters to hand an optimizer: the active adapters' plus any ``train=`` modules'."""
    return [p for p in model.parameters() if p.requires_grad]


def lora_plus_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0) -> list[dict]:
    """LoRA+ optimizer groups (arXiv 2402.12354): B matrices and 1-D adapter tensors at ``lr·ratio``."""
    if not ratio > 0 or not lr > 0:
        raise ConfigError(f"lora_plus_groups needs lr > 0 and ratio > 0, got lr={lr}, ratio={ratio}")
    fast: list[nn.Parameter] = []
    for _, layer in adapted_layers(model):
        for adapter in layer.adapters.values():
            fast += [p for n, p in adapter.named_parameters() if p.requires_grad and ("lora_B" in n or p.dim() == 1)]
    fast_ids = {id(p) for p in fast}
    slow = [p for p in trainable_parameters(model) if id(p) not in fast_ids]
    groups = [{"params": slow, "lr": lr, "weight_decay": weight_decay},
              {"params": fast, "lr": lr * ratio, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


def summary(model: nn.Module, file=None) -> str:
    """Print (and return) a table of adapted modules with ranks and parameter counts."""
    rows = []
    for path, layer in adapted_layers(model):
        for name, adapter in layer.adapters.items():
            trainable = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
            recipe = layer.recipes[name]
            rows.append((path, type(layer.base).__name__, name + ("*" if name in layer.active else ""),
                         str(getattr(recipe, "rank", "-")), f"{trainable:,}"))
    header = ("module", "type", "adapter", "rank", "trainable")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    total = sum(map(numel, model.parameters()))
    trainable = sum(p.numel() for p in trainable_parameters(model))
    text = "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows),
                      f"trainable params: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.4f}%)"
                      "  (* = active)"])
    print(text, file=file)
    return text
