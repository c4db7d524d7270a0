"""GGUF files for llama.cpp (and Ollama): an adapter as a llama.cpp LoRA, or merged into a whole model.

    export_lora(model, "lora.gguf")                          llama-cli -m base.gguf --lora lora.gguf
    export_merged(model, "model.gguf", base_gguf="base.gguf")   llama-cli -m model.gguf

Both write what llama.cpp's own converters write for a Llama-architecture model: tensor names from gguf-py's
name map (``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q.weight``), and the rows of q_proj and k_proj
permuted per head from Hugging Face's rotary layout (halves) to llama.cpp's (interleaved pairs).

A llama.cpp LoRA adds ``(alpha / r)·B·A`` to each weight, with one ``alpha`` per file and ``r`` read off B
(src/llama-adapter.cpp). A lorakit adapter may give each module its own rank, alpha and rsLoRA scale; the
file takes the most common module's alpha (for rsLoRA, the alpha·√r that makes alpha / r its scale) and
every other module carries the rest of its scale in B, so each tensor's update is exactly the module's.

References: llama.cpp's convert_lora_to_gguf.py and convert_hf_to_gguf.py (``LlamaModel.permute``);
the GGUF format, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from lorakit.checkpoint import atomic_write
from lorakit.errors import AdapterFileError, AdapterNotFoundError, ConfigError, MergeError, ShapeMismatchError
from lorakit.layers import AdaptedLayer, adapted_layers
from lorakit.model import adapter_names
from lorakit.train import models
from lorakit.trained import trained_modules

ARCHITECTURE = "llama"
OUTTYPES = {"f32": (np.float32, gguf.LlamaFileType.ALL_F32), "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16)}
OUTPUT, TOKEN_EMBD = "output.weight", "token_embd.weight"
MERGED_INSTEAD = ("export the merged model instead (lorakit export --format merged-gguf, or "
                  "lorakit.formats.gguf.export_merged)")


def export_lora(model: nn.Module, path: str | os.PathLike, name: str = "default", *, outtype: str = "f32") -> Path:
    """Write adapter ``name`` of a Llama-architecture model as a llama.cpp LoRA adapter file (GGUF) at ``path``,
    atomically; returns the path. ``outtype``: "f32" or "f16" for the factors.

    Adapters whose update is a product ``s·B·A`` are written (LoRA, rsLoRA, PiSSA / MiLoRA as their plain
    rank-2r LoRA, AdaLoRA, LoRA-XS); others (DoRA, SVF, SVFT...) raise ConfigError, as do modules llama.cpp
    has no LoRA tensor for (embeddings, a head tied to the input embedding) and ``train=`` copies.
    """
    dtype, file_type = _outtype(outtype)
    config, names = _llama(model)
    layers = _layers(model, name)
    for path_, module in trained_modules(model):
        if name in module.adapters:
            raise ConfigError(f"{path_}: adapter {name!r} trains its own copy of this module (train=), which a "
                              f"llama.cpp LoRA file cannot hold; {MERGED_INSTEAD}")
    factors = {}  # tensor name -> (module path, A (r, d_in), B (d_out, r), the alpha that makes alpha/r its scale)
    for path_, layer in layers:
        tensor = _tensor_name(names, path_)
        if tensor == OUTPUT and getattr(config, "tie_word_embeddings", False):
            raise ConfigError(f"{path_}: the model ties its output head to the input embedding, and llama.cpp's file "
                              f"has only token_embd for both, so no LoRA of the head alone; {MERGED_INSTEAD}")
        if layer.kind.layout != "linear":
            raise ConfigError(f"{path_}: an {layer.kind.layout} layer; lorakit's llama.cpp LoRA files hold linear "
                              f"layers only; {MERGED_INSTEAD}")
        found = layer.adapters[name].factors()
        if found is None:
            raise ConfigError(f"{path_}: adapter {name!r} is {type(layer.recipes[name]).__name__}, whose update is "
                              "not a low-rank product s·B·A, so a llama.cpp LoRA file cannot hold it; "
                              f"{MERGED_INSTEAD}, or make it a LoRA first: lorakit resize ADAPTER --rank R")
        A, B, scale = found
        # Rounded to float32, as the file stores alpha: modules of one recipe then share it exactly.
        factors[tensor] = (path_, A.detach().float(), B.detach().float(), float(np.float32(scale * A.shape[0])))
    alpha = Counter(own for *_, own in factors.values()).most_common(1)[0][0]
    tensors = {}
    for tensor, (path_, A, B, own) in factors.items():
        if own != alpha:  # llama.cpp scales by the file's alpha / r: B carries the rest of this module's scale
            B = B * (own / alpha)
        tensors[f"{tensor}.lora_a"] = _array(A, dtype, path_)
        tensors[f"{tensor}.lora_b"] = _array(_permuted(tensor, B, config), dtype, path_)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            writer.add_file_type(file_type)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for tensor, array in tensors.items():
                writer.add_tensor(tensor, array)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    path = Path(path)
    atomic_write(path, write)
    return path


def export_merged(model: nn.Module, path: str | os.PathLike, name: str = "default", *,
                  base_gguf: str | os.PathLike | None = None, outtype: str = "f16") -> Path:
    """Write the model with adapter ``name`` merged in (W0 + ΔW, any method) as a GGUF model llama.cpp runs,
    atomically; returns the path. The model itself is not changed.

    ``base_gguf`` is the base model's GGUF file (default: the embedded default's, for that model; otherwise
    required, e.g. made by llama.cpp's convert_hf_to_gguf.py): its metadata (tokenizer, hyperparameters) and
    every tensor the adapter leaves alone are copied unchanged (quantized ones stay quantized); the merged
    weights, and the adapter's ``train=`` copies, are written in ``outtype`` ("f16" or "f32"; 1-D ones f32).
    A head tied to an input embedding that the adapter changes gets an ``output.weight`` of its own.
    """
    dtype, _ = _outtype(outtype)
    config, names = _llama(model)
    layers = _layers(model, name)
    base_gguf = _base_file(model, base_gguf)
    reader = _read(base_gguf)
    merged: dict[str, tuple[str, np.ndarray]] = {}  # tensor name -> (module path, weight in the file's layout)
    for path_, layer in layers:
        delta = layer.adapters[name].delta_weight()
        if not torch.isfinite(delta).all():
            raise MergeError(f"{path_}: adapter {name!r} has NaN/Inf in its update; nothing was written")
        tensor = _tensor_name(names, path_)
        merged[tensor] = (path_, _array(_permuted(tensor, layer.base_weight() + delta, config), dtype, path_))
    for path_, module in trained_modules(model):
        if name in module.adapters:
            for key, value in module.adapters[name].state_dict().items():
                tensor = _tensor_name(names, f"{path_}.{key}")
                value = _permuted(tensor, value.detach().float(), config)
                merged[tensor] = (f"{path_}.{key}", _array(value, dtype if value.dim() > 1 else np.float32, path_))

    base = {t.name: t for t in reader.tensors}
    for tensor, (path_, array) in merged.items():
        original = base.get(tensor)
        if original is None and tensor == OUTPUT:  # a head tied to the embedding gets a tensor of its own
            original = base.get(TOKEN_EMBD)
        if original is None:
            raise ShapeMismatchError(f"{path_}: {base_gguf} has no tensor {tensor} to merge it into (is it the "
                                     "GGUF file of this model's base?)")
        shape = tuple(int(n) for n in reversed(original.shape))  # ggml lists dimensions innermost first
        if array.shape != shape:
            raise ShapeMismatchError(f"{path_}: its merged weight has shape {array.shape}, but {tensor} in {base_gguf} "
                                     f"has {shape} (is it the GGUF file of this model's base?)")
    # Tensors in the file's order, each (name, new array or None for the base's own data, the base's tensor).
    plan = [(t.name, merged.get(t.name, (None, None))[1], t) for t in reader.tensors]
    if OUTPUT not in base and (OUTPUT in merged or TOKEN_EMBD in merged):
        # llama.cpp reads an output.weight when there is one: the head keeps the embedding's weight as it was
        # (or takes its own update) instead of following the merged embedding through the tie.
        plan.append((OUTPUT, merged.get(OUTPUT, (None, None))[1], base[TOKEN_EMBD]))

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE, endianess=reader.endianess)
        try:
            writer.data_alignment = reader.alignment  # the copied general.alignment must describe the file
            for field in reader.fields.values():
                # GGUF.* are the header's own counts; the writer adds general.architecture itself.
                if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
                    continue
                kind = field.types[0]
                writer.add_key_value(field.name, field.contents(), kind,
                                     sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
            for tensor, array, original in plan:
                if array is None:
                    writer.add_tensor_info(tensor, original.data.shape, original.data.dtype, original.data.nbytes,
                                           original.tensor_type)
                else:
                    writer.add_tensor_info(tensor, array.shape, array.dtype, array.nbytes)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _, array, original in plan:
                if array is None:
                    writer.write_tensor_data(original.data, tensor_endianess=reader.endianess)
                else:
                    writer.write_tensor_data(array)
        finally:
            writer.close()

    path = Path(path)
    atomic_write(path, write)
    return path


def _outtype(outtype: str) -> tuple[type, gguf.LlamaFileType]:
    if outtype not in OUTTYPES:
        raise ConfigError(f"outtype must be one of {sorted(OUTTYPES)}, got {outtype!r}")
    return OUTTYPES[outtype]


def _llama(model: nn.Module) -> tuple[object, gguf.TensorNameMap]:
    """The model's config and gguf-py's tensor-name map for it, checked to be a Llama-architecture model."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type != ARCHITECTURE:
        raise ConfigError(f"{type(model).__name__} (model_type {model_type!r}): GGUF export writes Llama-architecture "
                          "Hugging Face models only (model_type 'llama': Llama 2/3, SmolLM2, TinyLlama...)")
    return config, gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)


def _layers(model: nn.Module, name: str) -> list[tuple[str, AdaptedLayer]]:
    layers = [(path, layer) for path, layer in adapted_layers(model) if name in layer.adapters]
    if not layers:
        raise AdapterNotFoundError(f"no adapter named {name!r} on the model; it has {adapter_names(model)}")
    return layers


def _tensor_name(names: gguf.TensorNameMap, path: str) -> str:
    """llama.cpp's name of the tensor at ``path`` (a module, or a module's ``.weight`` / ``.bias``)."""
    tensor = names.get_name(path if path.endswith((".weight", ".bias")) else f"{path}.weight",
                            try_suffixes=(".weight", ".bias"))
    if tensor is None:
        raise ConfigError(f"{path}: llama.cpp has no tensor for this module in a Llama model")
    return tensor


def _permuted(tensor: str, weight: torch.Tensor, config) -> torch.Tensor:
    """``weight`` (rows = output features) with q / k rows in llama.cpp's rotary order (``LlamaModel.permute``).

    Hugging Face rotates each head's first half against its second; llama.cpp rotates adjacent pairs. A LoRA's
    B is permuted like the weight (its rows are the weight's rows); A, on the input side, is not.
    """
    if tensor.endswith(".attn_q.weight"):
        heads = config.num_attention_heads
    elif tensor.endswith(".attn_k.weight"):
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    else:
        return weight
    rows = weight.shape[0]
    # (heads, 2, d/2, ...) -> (heads, d/2, 2, ...): a head's row i becomes its row 2·(i mod d/2) + i div d/2
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _array(tensor: torch.Tensor, dtype, where: str) -> np.ndarray:
    """``tensor`` as a contiguous numpy array of ``dtype``, checked to be finite (float16 overflows to inf)."""
    array = np.ascontiguousarray(tensor.detach().cpu().float().numpy().astype(dtype))
    if not np.isfinite(array).all():
        hint = ("it exceeds float16's range: use outtype='f32'" if torch.isfinite(tensor).all()
                else "the adapter has NaN/Inf in its tensors")
        raise ConfigError(f"{where}: its tensor is not finite in {np.dtype(dtype).name}; {hint}")
    return array


def _base_file(model: nn.Module, base_gguf: str | os.PathLike | None) -> Path:
    """``base_gguf``, or the embedded default's GGUF file when ``model`` is that model."""
    if base_gguf is not None:
        return Path(base_gguf)
    source = getattr(getattr(model, "config", None), "_name_or_path", None) or ""
    if source and Path(source).expanduser().resolve() == (models.cache_dir() / models.DEFAULT_MODEL).resolve():
        return models.default_gguf()
    raise ConfigError(f"export_merged needs base_gguf= (--base-gguf FILE): the GGUF file of this model's base "
                      f"({source or type(model).__name__}), e.g. one made by llama.cpp's convert_hf_to_gguf.py; only "
                      f"the embedded default ({models.DEFAULT_MODEL}) has one built in")


def _read(path: Path) -> gguf.GGUFReader:
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise AdapterFileError(f"{path}: not a readable GGUF file ({e})") from None
    def value(key: str):
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    if value(gguf.Keys.General.ARCHITECTURE) != ARCHITECTURE:
        raise ConfigError(f"{path}: a GGUF file of architecture {value(gguf.Keys.General.ARCHITECTURE)!r}, not "
                          f"{ARCHITECTURE!r}: not the base of a Llama-architecture model")
    if value(gguf.Keys.General.TYPE) not in (None, gguf.GGUFType.MODEL):  # files before general.type are models
        raise ConfigError(f"{path}: a GGUF file of type {value(gguf.Keys.General.TYPE)!r}, not a model")
    return reader
