"""lorakit: LoRA and its SVD-based successors for any PyTorch model.

    import lorakit as lk
    lk.adapt(model, lk.LoRA(rank=8, alpha=16), targets=["q_proj", "v_proj"])

Every registered method's recipe class is exported here by its class name (``lk.LoRA``, ``lk.PiSSA``...,
and those of methods registered with ``lk.register``); see ``lorakit/registry.py``.
"""

from lorakit import registry
from lorakit.adapt import adapt, enable_lora
from lorakit.analysis import resize
from lorakit.files import load, save
from lorakit.compose import combine
from lorakit.errors import (AdapterExistsError, AdapterFileError, AdapterNotFoundError, ConfigError, LorakitError,
                            MergeError, ShapeMismatchError, TargetNotFoundError, UnsupportedLayerError)
from lorakit.layers import AdaptedLayer
from lorakit.methods.base import Adapter, LayerSpec, Method
from lorakit.model import (activate, active_adapters, adapter_names, delete, disabled, lora_plus_groups, merge,
                           regularization, reset, route, step, summary, to_lora, track, trainable_parameters, unload,
                           unmerge)
from lorakit.quant import quantize
from lorakit.registry import register

_FUNCTIONS = [
    "AdaptedLayer", "Adapter", "AdapterExistsError", "AdapterFileError", "AdapterNotFoundError", "ConfigError",
    "LayerSpec", "LorakitError", "MergeError", "Method", "ShapeMismatchError", "TargetNotFoundError",
    "UnsupportedLayerError", "activate", "active_adapters", "adapt", "adapter_names", "combine", "delete", "disabled",
    "enable_lora", "load", "lora_plus_groups", "merge", "quantize", "register", "regularization", "reset", "resize", "route",
    "save", "step", "summary", "to_lora", "track", "trainable_parameters", "unload", "unmerge",
]


def __getattr__(name: str):
    recipe = registry.classes().get(name)
    if recipe is None:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    return recipe


def __dir__() -> list[str]:
    return sorted({*globals(), *registry.classes()})


__all__ = _FUNCTIONS + list(registry.classes())
