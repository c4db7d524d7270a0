"""One file per method; each registers its recipe so saved adapters can name it."""

from lorakit.methods.base import METHODS, Adapter, LayerSpec, Method
from lorakit.methods.lora import LoRA

__all__ = ["METHODS", "Adapter", "LayerSpec", "LoRA", "Method"]
