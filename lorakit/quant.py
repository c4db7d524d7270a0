"""QLoRA: a frozen 4-bit (NF4/FP4) or 8-bit (LLM.int8) base under full-precision adapters.

References: QLoRA, Dettmers et al. 2023 (arXiv 2305.14314); LLM.int8(), Dettmers et al. 2022
(arXiv 2208.07339). The quantized layers are bitsandbytes' own (``Linear4bit``, ``Linear8bitLt``);
lorakit writes no kernel and no number format.

    y = dequant(W_q)·x + b + Σ adapters(x)      W_q: NF4 in blocks of 64, absmax double-quantized

``lk.quantize(model, "nf4")`` swaps the targeted ``nn.Linear`` layers and frees their float
weights; a model that transformers loaded with ``BitsAndBytesConfig`` is recognised by its layers'
weight types the same way. Methods see the dequantized weight (``LayerSpec.weight``), so every
method that writes its update as a delta (all of lorakit's) works on a quantized base.
``lk.merge`` cannot fold a float update into 4-bit numbers without rounding it, so it replaces
the layer's weight with a dequantized float copy plus the update (the function that was trained)
and keeps the quantized original: ``lk.unmerge`` restores it bit for bit.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from typing import Sequence

import torch
from torch import nn

from lorakit.adapt import matches, walk
from lorakit.errors import ConfigError, TargetNotFoundError, UnsupportedLayerError
from lorakit.kinds import LINEAR, int8_state, kind_of, load_bitsandbytes
from lorakit.layers import AdaptedLayer

MODES = ("nf4", "fp4", "int8")


def quantized_bits(module: nn.Module) -> float | None:
    """Bits per weight a quantized layer holds (values + scales), None for a float layer."""
    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        state, numel = weight.quant_state, weight.quant_state.shape.numel()
        scales = state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            scales += state.state2.absmax.numel() * state.state2.absmax.element_size()
        return 8 * (weight.numel() * weight.element_size() + scales) / numel
    if type(weight).__name__ == "Int8Params":
        state = int8_state(module.base if isinstance(module, AdaptedLayer) else module, weight)
        return 8 * (weight.numel() + state.SCB.numel() * state.SCB.element_size()) / weight.numel()
    return None


# --- swapping float layers for quantized ones --------------------------------------------------
def _quantized_linear(linear: nn.Module, weight: torch.Tensor, mode: str, compute_dtype, double_quant: bool,
                      blocksize: int) -> nn.Module:
    """A bitsandbytes layer holding ``weight`` (d_out, d_in) quantized, with ``linear``'s bias."""
    bnb = load_bitsandbytes()
    bias = linear.bias
    # Built on the meta device: a real init would allocate (and randomise) a float weight to throw away.
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False,
                                    device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)._quantize(weight.device)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=compute_dtype,
                                  compress_statistics=double_quant, quant_type=mode, device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=blocksize,
                                         compress_statistics=double_quant, quant_type=mode,
                                         module=layer)._quantize(weight.device)
    layer.bias = bias  # the same tensor: only the weight changes storage
    return layer.train(linear.training)


def quantize(model: nn.Module, mode: str = "nf4", *, compute_dtype: torch.dtype | None = None,
             double_quant: bool = True, blocksize: int = 64, skip: Sequence[str] = ("lm_head",),
             targets=None) -> nn.Module:
    """Replace the model's ``nn.Linear`` layers by bitsandbytes quantized ones, freeing the float weights.

    ``mode``: ``"nf4"`` (QLoRA's NormalFloat4), ``"fp4"``, or ``"int8"`` (LLM.int8). ``compute_dtype``
    is the dtype the 4-bit matmul runs in (default: the input's). ``double_quant`` quantizes the
    per-block scales too (QLoRA's default; about 0.127 instead of 0.5 extra bits per weight).
    ``targets`` (names or a regex, as in ``lk.adapt``; default every linear layer) minus ``skip``
    (names or dotted suffixes; the output head by default) are swapped. Returns ``model``.

    Quantize before adapting, except for QPiSSA: on a layer that carries a PiSSA or MiLoRA adapter
    (not merged), the residual ``W − s·B0·A0`` is quantized and the adapter's start ``s·B0·A0`` stays
    in float inside the base, which so stays much closer to W than ``quantize(W)`` (arXiv 2404.02948, §4.4).
    """
    if mode not in MODES:
        raise ConfigError(f"lk.quantize: mode must be one of {MODES}, got {mode!r}")
    if mode != "int8" and (blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096)):
        raise ConfigError(f"lk.quantize: blocksize must be a power of two from 32 to 4096, got {blocksize}")
    _swap(model, mode, compute_dtype, double_quant, blocksize, skip, targets)
    _unmap(model)  # after _swap has returned: the replaced layers, and their float weights, are gone by now
    return model


def _swap(model: nn.Module, mode: str, compute_dtype, double_quant: bool, blocksize: int, skip, targets) -> None:
    """Replace the chosen linear layers (or adapted layers' bases) by quantized ones."""
    candidates = list(walk(model))
    chosen = [(p, m) for p, m in candidates if kind_of(m) is LINEAR
              and (targets is None or matches(p, targets)) and not matches(p, list(skip))]
    if not chosen:
        raise TargetNotFoundError(targets or "every nn.Linear", [p for p, _ in candidates])
    for path, module in chosen:
        if isinstance(module, AdaptedLayer):
            _quantize_adapted(module, mode, compute_dtype, double_quant, blocksize)
            continue
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf,
                _quantized_linear(module, module.weight.detach(), mode, compute_dtype, double_quant, blocksize))


def _mapped_files() -> list[tuple[int, int]]:
    """Address ranges of this process's memory-mapped data files (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        path = fields[5] if len(fields) == 6 else ""
        if path.startswith("/") and ".so" not in path.rsplit("/", 1)[-1]:
            low, high = fields[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    return ranges


def _unmap(model: nn.Module) -> None:
    """Copy tensors that still view a memory-mapped checkpoint into process memory.

    transformers maps a safetensors file and its tensors view it: the file's pages, the float
    weights just quantized among them, stay resident while any tensor of it lives (the embedding,
    the norms). Copying those few tensors lets the whole mapping go.
    """
    ranges = _mapped_files()
    for module in model.modules():
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            if tensor is not None and any(low <= tensor.data_ptr() < high for low, high in ranges):
                tensor.data = tensor.data.clone()  # in place: tied weights stay one tensor
    gc.collect()
    if sys.platform.startswith("linux"):  # glibc keeps freed heap pages (the float weights) unless asked
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # another C library
            pass


def _quantize_adapted(layer: AdaptedLayer, mode: str, compute_dtype, double_quant: bool, blocksize: int) -> None:
    """Quantize an adapted layer's base: its residual after a PiSSA/MiLoRA start (QPiSSA), else W itself."""
    starts = [start for a in layer.adapters.values() for start in [a.start()] if start is not None]
    if not starts:
        raise UnsupportedLayerError(f"lk.quantize: {layer.path} already has adapters; quantize the base first, then "
                                    "lk.adapt (only PiSSA/MiLoRA adapters come first: QPiSSA quantizes the residual)")
    if layer.merged:
        raise UnsupportedLayerError(f"lk.quantize: {layer.path} has merged adapters; lk.unmerge(model) first")
    A, B = starts[0]  # one principal part per layer: further adapters sit on that base as on any other
    with torch.no_grad():
        residual = (layer.weight.float() - B.float() @ A.float()).to(layer.weight.dtype)
    layer.replace_base(_quantized_linear(layer, residual, mode, compute_dtype, double_quant, blocksize), (A, B))
