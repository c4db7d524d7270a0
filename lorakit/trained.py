"""Per-adapter copies of the modules ``train=`` names (heads, norms), as PEFT's ``modules_to_save``.

    lk.adapt(model, lk.LoRA(rank=8), ["q_proj"], train=["lm_head"], name="a")

puts ``lm_head`` in a TrainedModule. The original stays frozen; it computes whenever no active adapter
owns a copy of it (``lk.disabled``, or the active adapter did not train it). Adapter ``a`` trains and saves
a copy of its own, so training or loading one adapter never changes another's, and ``lk.delete`` of the
last owner or ``lk.unload`` puts the original module back. As in PEFT, at most one active adapter may own
a copy of a given module (two trained copies have no sum); under ``lk.route`` each row goes through the
copy of its own adapter.

State-dict keys: the wrapper holds the original's own parameter and buffer dicts (the very objects) and
its submodules under their names, so the base keys (``lm_head.weight``) are unchanged and base
checkpoints load as before; each copy adds keys under ``lm_head.adapters.<name>.``, as an adapted layer's
adapters do. Plain attributes of the original (``in_features``, ``eps``...) are readable on the wrapper.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.layers import AdaptedLayer, adapted_layers, forward_mode


class TrainedModule(nn.Module):
    """A frozen module and the trained copies adapters own of it; see the module docstring."""

    def __init__(self, original: nn.Module, path: str):
        super().__init__()
        if "adapters" in original._modules:
            raise ConfigError(f"{path}: train= cannot wrap a module that has a submodule named 'adapters'")
        # The original's own dicts, not copies of them: a tensor that .to(), load_state_dict(assign=True) or
        # FSDP replaces through the wrapper is replaced for the original's forward too, so none goes stale.
        self.__dict__.update(_parameters=original._parameters, _buffers=original._buffers,
                             _non_persistent_buffers_set=original._non_persistent_buffers_set)
        self._modules.update(original._modules)  # the same submodule objects, under the same names
        self.adapters = nn.ModuleDict()  # {adapter name: its trained copy}
        object.__setattr__(self, "original", original)  # not a submodule: its keys are the wrapper's own
        self.path = path
        self.active: list[str] = []  # the active adapter that owns a copy here, if any (at most one)
        self.disabled = False
        self.route: list[str | None] | None = None
        self._modes: list[tuple] = []  # what layers.forward_mode keeps for gradient checkpointing's reruns
        self._rerun = False
        for key, value in vars(original).items():
            if not key.startswith("_") and key not in self.__dict__ and key not in self._modules:
                self.__dict__[key] = value
        self.train(original.training)

    def module_for(self, name: str | None) -> nn.Module:
        """The module adapter ``name`` computes with here: its own copy, else the original."""
        return self.adapters[name] if name is not None and name in self.adapters else self.original

    def forward(self, *args, **kwargs):
        # The same (disabled, route, active) rule as adapted layers, so a checkpointed rerun in backward
        # after an lk.route / lk.disabled block computes with the copy its forward used.
        disabled, route, active = forward_mode(self)
        if disabled:
            return self.original(*args, **kwargs)
        if route is not None:
            return self._routed(route, active, args, kwargs)
        return self.module_for(active[0] if active else None)(*args, **kwargs)

    def _routed(self, route: list[str | None], active: list[str], args: tuple, kwargs: dict):
        """Row i through the module of adapter ``route[i]``: one call per distinct module, on its rows."""
        used = [self.module_for(name) for name in route]
        idle = sorted({n for n in route if n in self.adapters and n not in active})
        if idle and self.training and torch.is_grad_enabled():
            raise ConfigError(f"{self.path}: lk.route sends rows to the trained copies of {idle} while training, but "
                              f"they are not active, so they would get no gradient: lk.activate them first")
        modules = list(dict.fromkeys(used))
        if len(modules) == 1:
            return modules[0](*args, **kwargs)
        x = args[0] if len(args) == 1 and not kwargs else None
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise ConfigError(f"{self.path}: lk.route sends rows to different trained copies of this module, which "
                              "needs one batched input tensor to split by row; it was called otherwise")
        if x.shape[0] != len(route):
            raise ConfigError(f"{self.path}: lk.route was given {len(route)} names for a batch of {x.shape[0]}")
        if any(_batch_statistics(m) for m in self.original.modules()):
            raise ConfigError(f"{self.path}: a batch norm using batch statistics mixes the rows of a batch, so rows "
                              "routed to different trained copies cannot be computed apart")
        out = None
        for module in modules:
            rows = torch.tensor([i for i, m in enumerate(used) if m is module], device=x.device)
            part = module(x.index_select(0, rows))
            out = part.new_zeros((len(route), *part.shape[1:])) if out is None else out
            out = out.index_copy(0, rows, part)  # out of place: autograd sees every part
        return out

    def train(self, mode: bool = True) -> "TrainedModule":
        self.original.train(mode)  # not a submodule, yet its forward reads its own mode (dropout, batch norm)
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"{type(self.original).__name__}, adapters={list(self.adapters)}, active={self.active}"


def _batch_statistics(module: nn.Module) -> bool:
    """Whether ``module`` normalises with the statistics of the batch it is given (rows are not independent)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or not module.track_running_stats)


def trained_modules(model: nn.Module) -> list[tuple[str, TrainedModule]]:
    """(path, module) for every TrainedModule of the model, in module order (none are nested)."""
    found: list[tuple[str, TrainedModule]] = []
    seen: set[int] = set()

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module._modules.items():
            if child is None or id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, TrainedModule):
                found.append((path, child))
            elif not isinstance(child, AdaptedLayer):  # nothing inside an adapted layer is trained
                visit(child, path)

    visit(model, "")
    return found


def fresh_copy(module: nn.Module) -> nn.Module:
    """A trainable copy of ``module``'s original (the frozen base, whatever copies others own)."""
    original = module.original if isinstance(module, TrainedModule) else module
    return copy.deepcopy(original)


def check_placement(model: nn.Module, adapted: Sequence[str], trained: Sequence[str]) -> None:
    """Refuse ``train=`` modules (``trained``, about to be added, and the model's) that are or hold an adapted
    layer (``adapted``, about to be added, and the model's), or that nest.

    The original's copies would not carry an adapter put inside it, nor would the original see it.
    """
    adapted = [*adapted, *(p for p, _ in adapted_layers(model))]
    wrapped = [p for p, _ in trained_modules(model)]
    for path in dict.fromkeys([*trained, *wrapped]):
        inside = next((p for p in adapted if p == path or p.startswith(path + ".")), None)
        if inside is not None:
            raise ConfigError(f"{path} is a train= module, which cannot be or hold an adapted layer, and {inside} "
                              "is targeted: leave one of them out")
    for path in trained:
        nested = next((p for p in [*wrapped, *trained] if p != path and
                       (p.startswith(path + ".") or path.startswith(p + "."))), None)
        if nested is not None:
            raise ConfigError(f"{path}: train= modules cannot nest, and {nested} is one too")


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def add_copy(model: nn.Module, path: str, name: str, trained_copy: nn.Module) -> None:
    """Give adapter ``name`` its ``trained_copy`` of the module at ``path``, wrapping that module if need be."""
    module = model.get_submodule(path)
    if not isinstance(module, TrainedModule):
        module = TrainedModule(module, path)
        _set_module(model, path, module)
    module.adapters[name] = trained_copy.train(module.training)


def use_copies(model: nn.Module, names: Sequence[str]) -> None:
    """Make the copies ``names`` own the ones in use (and trainable); raises before changing anything
    if two of them own a copy of the same module."""
    modules = trained_modules(model)
    for path, module in modules:
        owners = [n for n in names if n in module.adapters]
        if len(owners) > 1:
            raise ConfigError(f"{path}: adapters {owners} each train their own copy of it, and only one copy can "
                              "be in use at a time; activate one of them")
    for _, module in modules:
        module.active = [n for n in names if n in module.adapters]
        for name, trained_copy in module.adapters.items():
            trained_copy.requires_grad_(name in module.active)


def remove_copies(model: nn.Module, name: str) -> None:
    """Drop adapter ``name``'s copies; a module no adapter owns a copy of any more is put back as it was."""
    for path, module in trained_modules(model):
        if name in module.adapters:
            del module.adapters[name]
            module.active = [n for n in module.active if n != name]
            if not module.adapters:
                _set_module(model, path, module.original)


def unwrap_all(model: nn.Module, keep_active: bool) -> None:
    """Put a plain module back at every trained path: the active adapter's copy (``keep_active``), else the original."""
    for path, module in trained_modules(model):
        _set_module(model, path, module.module_for(module.active[0] if keep_active and module.active else None))
