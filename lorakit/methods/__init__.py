"""One file per method; each registers its recipe so saved adapters can name it."""

from lorakit.methods.adalora import AdaLoRA
from lorakit.methods.base import METHODS, Adapter, LayerSpec, Method
from lorakit.methods.dora import DoRA
from lorakit.methods.lora import LoRA
from lorakit.methods.lora_xs import LoRAXS
from lorakit.methods.pissa import MiLoRA, PiSSA
from lorakit.methods.svf import SVF
from lorakit.methods.svft import SVFT

__all__ = ["METHODS", "AdaLoRA", "SVF", "SVFT", "Adapter", "DoRA", "LayerSpec", "LoRA", "LoRAXS", "Method", "MiLoRA", "PiSSA"]
