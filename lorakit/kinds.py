"""Layer kinds: how each base layer type is adapted (its canonical layout, forward and sizes).

The bottom of lorakit's layering: ``layers``, ``model``, ``adapt`` and ``quant`` build on it, and it
imports none of them. Float kinds (``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Conv1d/2d/3d``,
``nn.Embedding``) and quantized ones (bitsandbytes' 4-bit and LLM.int8 layers, told apart by their
weight's type) live here together; bitsandbytes itself is imported on first use only (``load_bitsandbytes``), as
it is an optional extra, so ``import lorakit`` never loads it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError


@dataclass(frozen=True)
class LayerKind:
    """How one base layer type is adapted: its canonical layout, forward and geometry."""

    layout: str  # canonical layout the methods see: "linear" | "conv" | "embedding"
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    sizes: Callable[[nn.Module], tuple[int, int]]  # (d_in, d_out)
    # Plain attributes model code reads off these layers (e.g. embed_tokens.padding_idx).
    attributes: tuple[str, ...] = ()
    transposed: bool = False  # weight stored (d_in, d_out), as GPT-2's Conv1D
    # Quantized bases: (base, weight) -> the float weight, (d_out, d_in).
    dequantize: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    # (base, weight) -> {key: tensor} a quantized base saves beside its weight (its scales).
    extra_state: Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]] | None = None
    # Names the kind: a pickled model refers to it by this name, so ``kind is LINEAR`` survives a reload.
    label: str | None = None
    # QPiSSA's residual base: the layer's weight holds W − P quantized, and the low-rank P = B·A, kept in float
    # by the layer (its principal_A/principal_B), is part of the base: in its forward and its weight.
    principal: bool = False

    def __post_init__(self):
        if self.label is not None:
            _KINDS_BY_LABEL[self.label] = self

    def __reduce__(self):
        return (kind_named, (self.label,)) if self.label is not None else super().__reduce__()


_KINDS_BY_LABEL: dict[str, LayerKind] = {}


def kind_named(label: str) -> LayerKind:
    """The LayerKind registered under ``label``."""
    return _KINDS_BY_LABEL[label]


def _linear_forward(base, x, weight, bias):
    return F.linear(x, weight, bias)


def _conv_forward(base, x, weight, bias):
    return base._conv_forward(x, weight, bias)


def linear_sizes(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer."""
    return module.in_features, module.out_features


def _conv1d_gpt2_forward(base, x, weight, bias):
    out = x.reshape(-1, x.shape[-1])
    out = torch.addmm(bias, out, weight) if bias is not None else out @ weight
    return out.view(*x.shape[:-1], weight.shape[1])


def _embedding_forward(base, x, weight, bias):
    return F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type,
                       base.scale_grad_by_freq, base.sparse)


def _gpt2_sizes(m):
    return m.nx, m.nf


def _conv_sizes(m):
    return m.in_channels, m.out_channels


def _embedding_sizes(m):
    return m.num_embeddings, m.embedding_dim


LINEAR = LayerKind("linear", _linear_forward, linear_sizes, ("in_features", "out_features"), label="linear")
GPT2_CONV1D = LayerKind("linear", _conv1d_gpt2_forward, _gpt2_sizes, ("nf", "nx"), transposed=True,
                        label="gpt2_conv1d")
CONV = LayerKind("conv", _conv_forward, _conv_sizes,
                 ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                  "padding_mode"), label="conv")
EMBEDDING = LayerKind("embedding", _embedding_forward, _embedding_sizes,
                      ("num_embeddings", "embedding_dim", "padding_idx", "max_norm"), label="embedding")

# Type → kind (minLoRA's table). Subclasses match through isinstance, in this order.
LAYER_KINDS: list[tuple[type, LayerKind]] = [
    (nn.Linear, LINEAR), (nn.Embedding, EMBEDDING), (nn.Conv1d, CONV), (nn.Conv2d, CONV), (nn.Conv3d, CONV),
]
# nn.MultiheadAttention reads out_proj.weight directly and never calls out_proj's forward, so an
# adapter there would be silently ignored.
_REFUSED = ("NonDynamicallyQuantizableLinear",)


def load_bitsandbytes():
    """The bitsandbytes module, imported on first use (an optional extra: pip install 'lorakit[quant]')."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:  # the hot path: every 4-bit matmul asks
        return bnb
    # On import bitsandbytes tries to fetch an optional CPU inference kernel from the Hugging Face hub
    # and warns when it cannot; lorakit never takes that path (its CPU 4-bit matmul is _CpuMatmul4bit).
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401  (an attribute of bitsandbytes from now on)
    except ImportError as e:
        raise LorakitError(f"a quantized base needs bitsandbytes: pip install 'bitsandbytes>=0.48' ({e})") from e
    finally:
        quiet.setLevel(level)
    return bitsandbytes


# --- the two quantized layer kinds -------------------------------------------------------------
def _forward_4bit(base: nn.Module, x: torch.Tensor, weight, bias):
    dtype = x.dtype
    x = x.to(base.compute_dtype or dtype)
    bias = None if bias is None else bias.to(x.dtype)
    if x.device.type == "cpu":
        out = _CpuMatmul4bit.apply(x, weight, bias)
    else:  # bitsandbytes' own op: a fused kernel for single-token decoding, and a caching allocator
        out = load_bitsandbytes().matmul_4bit(x, weight, bias=bias, quant_state=weight.quant_state)
    return out.to(dtype)


def _plain_state(weight):
    """The weight's quantization state, undoing bitsandbytes' CPU repacking if it happened."""
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        bf = load_bitsandbytes().functional
        # bitsandbytes repacks CPU weights for its inference kernel on a no-grad eval forward.
        weight.data, weight.quant_state = bf._convert_weight_packed_for_cpu_inverse(weight.data, state)
    return weight.quant_state


def _dequantize_4bit(base: nn.Module, weight) -> torch.Tensor:
    bf = load_bitsandbytes().functional

    return bf.dequantize_4bit(weight.data, _plain_state(weight))  # (d_out, d_in), the dtype it was quantized from


class _CpuMatmul4bit(torch.autograd.Function):
    """x·dequant(W)ᵀ for a frozen 4-bit W on CPU, dequantizing into one reused buffer (forward and backward).

    bitsandbytes allocates a fresh float copy of W per call, and glibc keeps the pages those copies
    leave between the activations: 140 MB of peak memory in a SmolLM2 QLoRA step (BENCHMARKS.md).
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight  # frozen and packed: nothing float is kept for backward
        return F.linear(x, _scratch_dequantized(weight, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = _scratch_dequantized(ctx.weight, grad.dtype)
            # Under create_graph the matmul keeps its operand for a second backward: not the shared buffer.
            grad_x = grad @ (weight.clone() if torch.is_grad_enabled() else weight)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None  # a train= bias
        return grad_x, None, grad_bias


_scratch = threading.local()


def _scratch_dequantized(weight, dtype: torch.dtype) -> torch.Tensor:
    """dequant(W) as ``dtype``, written into this thread's buffer: valid until the next call."""
    bf = load_bitsandbytes().functional

    state = _plain_state(weight)
    rows, cols = state.shape
    # The ctypes library itself: bitsandbytes' wrapper answers any name with a function that raises.
    native = getattr(bf.lib, "_lib", None)
    kernel = getattr(native, f"cdequantize_blockwise_cpu_{state.quant_type}_{_C_DTYPES.get(state.dtype)}", None)
    if kernel is None or cols % 2 or state.blocksize >= 2048:  # shapes bitsandbytes' CPU kernel leaves to Python
        return bf.dequantize_4bit(weight.data, state).to(dtype)
    buffers = _scratch.__dict__
    flat = buffers.get(state.dtype)
    if flat is None or flat.numel() < rows * cols:
        flat = buffers[state.dtype] = torch.empty(rows * cols, dtype=state.dtype)
    out = flat[:rows * cols].view(rows, cols)
    absmax = bf.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    absmax, packed = absmax.float().contiguous(), weight.data.view(torch.uint8)  # alive through the call
    kernel(bf.get_ptr(packed), bf.get_ptr(absmax), bf.get_ptr(out), ctypes.c_longlong(state.blocksize),
           ctypes.c_longlong(rows), ctypes.c_longlong(cols))
    return out.to(dtype)  # no copy when the compute dtype is the stored one


_C_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def int8_state(base: nn.Module, weight):
    """bitsandbytes' matmul state with the row scales, which it moves off the weight on first use."""
    state = base.state
    if weight.CB is not None:
        state.CB, state.SCB = weight.CB, weight.SCB
        weight.CB = weight.SCB = None
    return state


def _forward_int8(base: nn.Module, x: torch.Tensor, weight, bias):
    state = int8_state(base, weight)
    state.is_training = base.training
    return load_bitsandbytes().matmul(x, weight, bias=None if bias is None else bias.to(x.dtype), state=state)


def _dequantize_int8(base: nn.Module, weight) -> torch.Tensor:
    state = int8_state(base, weight)
    return weight.data.float() * (state.SCB.float().unsqueeze(1) / 127)  # LLM.int8's per-row absmax scale


def _state_4bit(base: nn.Module, weight) -> dict[str, torch.Tensor]:
    return {"weight." + key: value for key, value in weight.quant_state.as_dict(packed=True).items()}


def _state_int8(base: nn.Module, weight) -> dict[str, torch.Tensor]:
    return {"SCB": int8_state(base, weight).SCB, "weight_format": torch.tensor(0, dtype=torch.uint8)}


QUANT_4BIT = LayerKind("linear", _forward_4bit, linear_sizes, ("in_features", "out_features"),
                       dequantize=_dequantize_4bit, extra_state=_state_4bit, label="4bit")
QUANT_INT8 = LayerKind("linear", _forward_int8, linear_sizes, ("in_features", "out_features"),
                       dequantize=_dequantize_int8, extra_state=_state_int8, label="int8")
QUANTIZED_KINDS = {"Params4bit": QUANT_4BIT, "Int8Params": QUANT_INT8}  # by the weight's type: subclasses of either layer
# The residual bases QPiSSA makes of them (lk.quantize on a layer carrying a PiSSA/MiLoRA start).
RESIDUAL_KINDS = {kind: dataclasses.replace(kind, label=f"{kind.label}+principal", principal=True)
                  for kind in (QUANT_4BIT, QUANT_INT8)}


def numel(parameter: torch.Tensor) -> int:
    """How many weights a parameter stands for (a packed 4-bit tensor holds two per byte)."""
    state = getattr(parameter, "quant_state", None) if type(parameter).__name__ == "Params4bit" else None
    return state.shape.numel() if state is not None else parameter.numel()


def kind_of(module: nn.Module) -> LayerKind | None:
    """The LayerKind of a module: an adapted layer's own, else how its type is adapted (None: not adaptable)."""
    own = module.__dict__.get("kind")
    if isinstance(own, LayerKind):  # an AdaptedLayer
        return own
    if type(module).__name__ in _REFUSED:
        return None
    # bitsandbytes layers subclass nn.Linear: told apart by their weight's type, whoever built them.
    if type(getattr(module, "weight", None)).__name__ in ("Params4bit", "Int8Params"):
        return QUANTIZED_KINDS[type(module.weight).__name__]
    for cls, kind in LAYER_KINDS:
        if isinstance(module, cls):
            return kind
    # transformers' GPT-2 Conv1D, recognised by shape of its API so core never imports transformers.
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return GPT2_CONV1D
    return None


def canonical(kind: LayerKind, base: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` of a ``kind`` layer (``base``) as float32 in the canonical layout, dequantized if need be."""
    w = (kind.dequantize(base, weight) if kind.dequantize else weight.detach()).float()
    return w.t() if kind.transposed else w


def warn_merged(count: int) -> None:
    """Say what merging into a quantized base did (it is not a plain in-place add)."""
    warnings.warn(f"lk.merge: {count} quantized layer(s) now hold a dequantized float copy of their weight plus the "
                  "update, which computes the trained function (re-quantizing would round the update away); the "
                  "quantized originals are kept, so lk.unmerge restores them exactly", stacklevel=3)
