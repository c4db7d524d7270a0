"""Put adapters on a model: match targets, wrap layers, freeze the rest.

Targets follow PEFT's conventions so configs carry over:
  * a list of names: a module matches when its path equals a name or ends with ``"." + name``;
  * a string: a regular expression that must match the whole module path;
  * ``"all-linear"``: every Linear / GPT-2 Conv1D layer except the output head;
  * ``"kohya"``: kohya-ss sd-scripts' default for Stable Diffusion LoRAs: the Linear and 1×1 conv layers inside
    the UNet's transformer blocks (attention, feed-forward, proj_in/out; the transformer blocks of SD3/Flux
    transformers) and the text encoder's attention and MLP; ``"kohya-conv"`` adds the layers of the ResNet,
    down- and up-sampling blocks (the 3×3 convs kohya trains with ``conv_dim``).
``layers=[...]`` keeps modules whose first numeric path component (``model.layers.3.…``) is listed.
``ranks`` / ``alphas`` map a regex (searched in the module path, first match wins) to a value.
``train=[...]`` names other modules (heads, norms) each adapter trains a copy of (see lorakit/trained.py).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Iterator, Mapping, Sequence

from torch import nn

from lorakit.errors import AdapterExistsError, ConfigError, MergeError, TargetNotFoundError, UnsupportedLayerError
from lorakit.kinds import kind_of
from lorakit.layers import AdaptedLayer, adapted_layers, spec_of
from lorakit.methods.base import Method, check_finite, setting_names
from lorakit.methods.lora import LoRA
from lorakit.model import activate, adapter_names
from lorakit.trained import TrainedModule, add_copy, check_placement, fresh_copy

Targets = str | Sequence[str]


def walk(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every submodule of the base: not descending into adapted layers, nor into the
    trained copies of a ``train=`` module (its original's submodules are walked)."""
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        yield path, child
        if isinstance(child, TrainedModule):
            yield from walk(child.original, path)
        elif not isinstance(child, AdaptedLayer):
            yield from walk(child, path)


def is_linear(module: nn.Module) -> bool:
    """A linear layer of any storage: nn.Linear, GPT-2's Conv1D, a bitsandbytes 4/8-bit Linear."""
    kind = kind_of(module)
    return kind is not None and kind.layout == "linear"


def matches(path: str, targets: Targets) -> bool:
    """PEFT's target rule: a string is a full-match regex, a list holds names or dotted suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def layer_index(path: str) -> int | None:
    """The first numeric component of a module path (the block index), if any."""
    return next((int(part) for part in path.split(".") if part.isdigit()), None)


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if head is not None else getattr(model, "lm_head", None)


def check_regex(pattern, what: str) -> None:
    """Raise ConfigError unless ``pattern`` is a string that compiles as a regular expression."""
    if not isinstance(pattern, str):
        raise ConfigError(f"{what}: a pattern must be a regex string, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{what}: {pattern!r} is not a valid regular expression ({e})") from None


def _matching(candidates: list[tuple[str, nn.Module]], targets: Targets) -> list[tuple[str, nn.Module]]:
    if not isinstance(targets, str) and (not targets or any(not isinstance(t, str) for t in targets)):
        raise ConfigError(f"targets must be a regex string, a non-empty list of names or 'all-linear', got {targets!r}")
    if isinstance(targets, str):
        check_regex(targets, "targets")
    return [(p, m) for p, m in candidates if matches(p, targets)]


def find(model: nn.Module, names: Targets) -> list[str]:
    """Paths of the modules ``names`` matches (outermost only, any type), for ``train=``. Raises if none."""
    candidates = list(walk(model))
    paths = [p for p, _ in _matching(candidates, names)]
    if not paths:
        raise TargetNotFoundError(names, [p for p, _ in candidates])
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths)]


def _all_linear(model: nn.Module, candidates: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    head = _output_head(model)
    return [(p, m) for p, m in candidates if is_linear(m) and m is not head]


# The containers kohya-ss sd-scripts adapts (networks/lora.py's *_TARGET_REPLACE_MODULE, by class name), with
# the diffusers transformer blocks of SD3 and Flux; the second set comes with conv_dim.
_KOHYA_BLOCKS = {"Transformer2DModel", "CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP",
                 "JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock"}
_KOHYA_CONV_BLOCKS = {"ResnetBlock2D", "Downsample2D", "Upsample2D"}


def _kohya(conv: bool):
    def pick(model: nn.Module, candidates: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
        inside, inside_conv = set(), set()
        for path, module in walk(model):
            name = type(module).__name__
            if name in _KOHYA_BLOCKS:
                inside.add(path)
            elif conv and name in _KOHYA_CONV_BLOCKS:
                inside_conv.add(path)

        def within(path: str, blocks: set[str]) -> bool:
            return any(path.startswith(b + ".") for b in blocks)

        chosen = []
        for path, module in candidates:
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            one_by_one = isinstance(module, nn.Linear) or tuple(module.kernel_size) == (1, 1)
            if (within(path, inside) and one_by_one) or within(path, inside_conv):
                chosen.append((path, module))
        return chosen
    return pick


PRESETS = {"all-linear": _all_linear, "kohya": _kohya(conv=False), "kohya-conv": _kohya(conv=True)}


def select(model: nn.Module, targets: Targets, layers: Iterable[int] | None = None) -> list[tuple[str, nn.Module]]:
    """The modules ``targets`` names (or a preset of ``PRESETS`` picks), checked to be adaptable. Raises if none
    match."""
    candidates = list(walk(model))
    preset = PRESETS.get(targets) if isinstance(targets, str) else None
    chosen = preset(model, candidates) if preset else _matching(candidates, targets)
    if not chosen:
        raise TargetNotFoundError(targets, [p for p, _ in candidates])
    if layers is not None:
        wanted = set(layers)
        found = sorted({i for i in map(layer_index, (p for p, _ in chosen)) if i is not None})
        chosen = [(p, m) for p, m in chosen if layer_index(p) in wanted]
        if not chosen:
            raise TargetNotFoundError(f"{targets!r} in layers {sorted(wanted)} (they match in layers {found})",
                                      [p for p, _ in candidates])
    for path, module in chosen:
        if kind_of(module) is None:
            raise UnsupportedLayerError(
                f"{path} is a {type(module).__name__}; lorakit adapts nn.Linear, GPT-2 Conv1D, nn.Conv1d/2d/3d "
                f"and nn.Embedding (a name in targets may be matching a container module)")
    return chosen


def _override(patterns: Mapping[str, float] | None, path: str):
    for pattern, value in (patterns or {}).items():
        if re.search(pattern, path):
            return value
    return None


def recipe_for(method, path: str, ranks=None, alphas=None):
    """The method with this module's rank/alpha overrides applied."""
    changes = {key: value for key, value in (("rank", _override(ranks, path)), ("alpha", _override(alphas, path)))
               if value is not None}
    fields = setting_names(method)
    if set(changes) - fields:
        raise ConfigError(f"{type(method).__name__} has no {sorted(set(changes) - fields)} to override per layer")
    return dataclasses.replace(method, **changes) if changes else method


def adapt(model: nn.Module, method, targets: Targets = "all-linear", *, name: str = "default",
          layers: Iterable[int] | None = None, ranks: Mapping[str, int] | None = None,
          alphas: Mapping[str, float] | None = None, train: Sequence[str] | None = None) -> nn.Module:
    """Freeze ``model`` and add a trainable adapter called ``name`` to every targeted layer.

    The new adapter becomes the only active one. ``train`` names other modules (norms, heads) of which
    the adapter trains and saves a copy of its own; the originals stay frozen. Returns ``model``.
    """
    if not isinstance(method, Method) or not dataclasses.is_dataclass(method):
        hint = (": call the class to make one" if isinstance(method, type) else
                ": lk.Method is the base class of recipes, not a method; a method subclasses it as a frozen "
                "dataclass" if isinstance(method, Method) else "")
        raise ConfigError(f"method must be a recipe such as lk.LoRA(rank=8), got {method!r}{hint}")
    check_finite(method)
    for what, patterns in (("ranks", ranks), ("alphas", alphas)):
        for pattern in patterns or {}:
            check_regex(pattern, what)
    if name in adapter_names(model):
        raise AdapterExistsError(f"the model already has an adapter named {name!r}; pick another name or lk.delete it")
    train_paths = find(model, train) if train else []
    built = {}
    for path, module in select(model, targets, layers):
        recipe = recipe_for(method, path, ranks, alphas)
        built[path] = (recipe, recipe.build(spec_of(module)))
    attach(model, name, built, {path: fresh_copy(model.get_submodule(path)) for path in train_paths})
    return model


def attach(model: nn.Module, name: str, built: Mapping[str, tuple], trained: Mapping[str, nn.Module] | None = None
           ) -> None:
    """Wrap the modules in ``built`` ({path: (recipe, adapter)}), give ``name`` its ``trained`` copies
    ({path: copy of that ``train=`` module}) and make ``name`` the active adapter."""
    merged = next((path for path, layer in adapted_layers(model) if layer.merged), None)
    if merged is not None:
        raise MergeError(f"{merged} has merged adapters; lk.unmerge(model) before adding adapter {name!r}")
    trained = trained or {}
    check_placement(model, list(built), list(trained))
    model.requires_grad_(False)  # the base is frozen; activate() re-enables what trains
    for path, (recipe, adapter) in built.items():
        module = model.get_submodule(path)
        if not isinstance(module, AdaptedLayer):
            module = AdaptedLayer(module, kind_of(module), path).train(module.training)
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent), leaf, module)
        module.add(name, adapter.train(module.training), recipe)  # an eval-mode model stays in eval mode
    for path, trained_copy in trained.items():
        add_copy(model, path, name, trained_copy)
    activate(model, name)


def enable_lora(model: nn.Module, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
                name: str = "default") -> nn.Module:
    """Keras-style one-liner: LoRA on every linear projection inside attention blocks."""
    attention = [p for p, m in walk(model) if is_linear(m)
                 and any("attn" in part.lower() or "attention" in part.lower() for part in p.split(".")[:-1])]
    if not attention:
        raise TargetNotFoundError(["*attn*.*", "*attention*.*"], [p for p, _ in walk(model)])
    return adapt(model, LoRA(rank=rank, alpha=rank if alpha is None else alpha, dropout=dropout), attention, name=name)
