"""lorakit: LoRA and its SVD-based successors for any PyTorch model.

    import lorakit as lk
    lk.adapt(model, lk.LoRA(rank=8, alpha=16), targets=["q_proj", "v_proj"])
"""

from lorakit.adapt import adapt, enable_lora
from lorakit.checkpoint import load, save
from lorakit.compose import combine
from lorakit.errors import (AdapterExistsError, AdapterFileError, AdapterNotFoundError, ConfigError, LorakitError,
                            MergeError, ShapeMismatchError, TargetNotFoundError, UnsupportedLayerError)
from lorakit.layers import AdaptedLayer
from lorakit.quant import quantize
from lorakit.methods import SVF, SVFT, AdaLoRA, DoRA, LoRA, LoRAXS, MiLoRA, PiSSA
from lorakit.model import (activate, active_adapters, adapter_names, delete, disabled, lora_plus_groups, merge,
                           regularization, reset, route, step, summary, to_lora, track, trainable_parameters, unload,
                           unmerge)

__all__ = [
    "AdaLoRA", "AdaptedLayer", "AdapterExistsError", "AdapterFileError", "AdapterNotFoundError", "ConfigError", "DoRA", "LoRA", "LoRAXS",
    "LorakitError", "MergeError", "MiLoRA", "PiSSA", "SVF", "SVFT", "ShapeMismatchError", "TargetNotFoundError", "UnsupportedLayerError", "activate",
    "active_adapters", "adapt", "adapter_names", "combine", "delete", "disabled", "enable_lora", "load", "lora_plus_groups",
    "merge", "quantize", "regularization", "reset", "route", "save", "step", "summary", "to_lora", "track", "trainable_parameters", "unload", "unmerge",
]
