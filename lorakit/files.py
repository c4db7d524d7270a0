"""``lk.save`` / ``lk.load``: adapter directories (lorakit/checkpoint.py) and the single files of Stable
Diffusion tools (lorakit/formats/single_file.py), one entry point above both."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from lorakit import checkpoint
from lorakit.formats import single_file

SINGLE_FILE_FORMATS = ("kohya", "diffusers")


def save(model, path: str | os.PathLike, name: str = "default", format: str = "lorakit") -> Path:
    """Write adapter ``name`` (and its copies of ``train=`` modules) to ``path``; returns the path.

    ``format``: "lorakit" or "peft" write an adapter directory. LoRA, rsLoRA and DoRA are always written in
    PEFT's format there; "peft" also converts PiSSA/MiLoRA adapters to the plain LoRA (rank 2r) that PEFT loads
    on the original base. "kohya" and "diffusers" write one safetensors file for Stable Diffusion tools;
    ``model`` may then be a pipeline or {"unet": ..., "text_encoder": ...}.
    """
    if format in SINGLE_FILE_FORMATS:
        return single_file.save_file(model, path, name, format)
    return checkpoint.save(model, path, name, format)


def load(model, path: str | os.PathLike, name: str = "default", *, strict: bool = True) -> nn.Module:
    """Add the adapter saved at ``path`` as ``name`` and make it active: an adapter directory (ours or PEFT's),
    or a kohya / diffusers safetensors file (``model`` may then be a pipeline or a dict of its components).

    Every tensor is checked against the model before anything is attached. A file missing every tensor of some
    module its config targets (or trains) is refused, naming them; ``strict=False`` warns and loads the rest. So
    are tensors the model would take changed (not float, NaN or infinite) and an adapter config lorakit's
    checksum does not cover (edited since it was saved); ``strict=False`` warns and loads them. A file lorakit
    wrote whose checksum is missing or wrong, a config value of the wrong JSON type, and PEFT's ``bias="all"`` /
    ``"lora_only"`` adapters (which overwrite the base model's biases) are always refused.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        single_file.load_file(model, path, name, strict=strict)
        return model
    return checkpoint.load(model, path, name, strict=strict)
