"""One file per method; each registers its recipe so saved adapters can name it."""

from lorakit.methods.base import METHODS, Adapter, LayerSpec, Method
from lorakit.methods.dora import DoRA
from lorakit.methods.lora import LoRA
from lorakit.methods.pissa import MiLoRA, PiSSA

__all__ = ["METHODS", "Adapter", "DoRA", "LayerSpec", "LoRA", "Method", "MiLoRA", "PiSSA"]
