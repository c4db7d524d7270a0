"""Save and load adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

LoRA and rsLoRA adapters are written exactly as PEFT writes them (keys prefixed
``base_model.model.``, no adapter name in keys), so PEFT, vLLM and the hub read them; adapters
written by PEFT load here too. Methods PEFT lacks use the same two files with
``"lorakit_method"`` in the config. Writes are atomic; loads check every key and shape before
touching the model, so a bad file leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.adapt import attach, kind_of, matches, walk
from lorakit.errors import AdapterExistsError, AdapterFileError, AdapterNotFoundError, ConfigError, ShapeMismatchError
from lorakit.layers import spec_of
from lorakit.methods.base import METHODS, recipe_fields
from lorakit.methods.adalora import AdaLoRA
from lorakit.methods.dora import DoRA
from lorakit.methods.lora import LoRA
from lorakit.model import adapted_layers, adapter_names

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary sibling and a rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorakit")
    except PackageNotFoundError:
        return "0+unknown"


def _target_modules(model: nn.Module, paths: list[str]) -> list[str] | str:
    """PEFT's ``target_modules``: leaf names when they select exactly ``paths``, else a full-match regex."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    selected = {p for p, m in walk(model) if matches(p, leaves) and kind_of(m) is not None}
    if selected == set(paths):
        return leaves
    return "(" + "|".join(re.escape(p) for p in sorted(paths)) + ")"


def _patterns(recipes: dict[str, object], key: str, default) -> dict[str, object]:
    """Per-module values that differ from the default, keyed as PEFT's rank_pattern / alpha_pattern."""
    return {re.escape(path): getattr(r, key) for path, r in recipes.items() if getattr(r, key) != default}


def _as_peft(recipe, adapter, path: str):
    """(recipe, adapter) in a form PEFT reads: as is, or converted to the equivalent plain LoRA."""
    if hasattr(recipe, "peft_config"):
        return recipe, adapter
    if hasattr(adapter, "to_lora"):
        return adapter.to_lora()
    raise ConfigError(f"{path}: {type(recipe).__name__} has no PEFT equivalent; save it with format='lorakit'")


def save(model: nn.Module, directory: str | os.PathLike, name: str = "default", format: str = "lorakit") -> Path:
    """Write adapter ``name`` (and its ``train=`` modules) to ``directory``; returns the directory.

    LoRA, rsLoRA and DoRA are always written in PEFT's format. ``format="peft"`` also converts
    PiSSA/MiLoRA adapters to the plain LoRA (rank 2r) that PEFT loads on the original base.
    """
    if format not in ("lorakit", "peft"):
        raise ConfigError(f"format must be 'lorakit' or 'peft', got {format!r}")
    layers = [(path, layer) for path, layer in adapted_layers(model) if name in layer.adapters]
    if not layers:
        raise AdapterNotFoundError(f"no adapter named {name!r} on the model; it has {adapter_names(model)}")
    entries = {path: (layer.recipes[name], layer.adapters[name]) for path, layer in layers}
    if format == "peft":
        entries = {path: _as_peft(*entry, path) for path, entry in entries.items()}
    recipes = {path: recipe for path, (recipe, _) in entries.items()}
    # The most common recipe is the config's default; the rest become per-module patterns.
    default = Counter(recipes.values()).most_common(1)[0][0]
    tensors = {}
    for path, (_, adapter) in entries.items():
        # Adapters that prune themselves (AdaLoRA) write only what they keep, as PEFT does.
        for suffix, tensor in (adapter.pruned() if hasattr(adapter, "pruned") else adapter.export()).items():
            tensors[f"{PREFIX}{path}.{suffix}"] = tensor
    train_paths = getattr(model, "_lorakit_train", {}).get(name, [])
    for path in train_paths:
        for pname, param in model.get_submodule(path).named_parameters():
            tensors[f"{PREFIX}{path}.{pname}"] = param
    # Clone: safetensors refuses tensors that share storage (tied weights), and wants them on CPU.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}

    config = {
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "bias": "none", "fan_in_fan_out": any(layer.kind.transposed for _, layer in layers),
        "inference_mode": True, "init_lora_weights": True, "layers_pattern": None, "layers_to_transform": None,
        "lora_bias": False, "modules_to_save": train_paths or None, "revision": None,
        "target_modules": _target_modules(model, [p for p, _ in layers]),
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
    }
    if hasattr(default, "peft_config"):
        config.update(default.peft_config())
        if hasattr(default, "rank"):
            config["rank_pattern"] = _patterns(recipes, "rank", default.rank)
            config["alpha_pattern"] = _patterns(recipes, "alpha", default.alpha)
        else:  # AdaLoRA: PEFT's rank_pattern lists which of the init_rank triplets each matrix keeps
            # A reloaded adapter holds only its kept triplets; PEFT still wants a mask over init_rank.
            config["rank_pattern"] = {
                f"{path}.lora_E": adapter.rank_mask.tolist() + [False] * (recipe.init_rank - adapter.rank)
                for path, (recipe, adapter) in entries.items()}
    else:
        config.update({"peft_type": None, "lorakit_version": _version(), "lorakit_method": default.name, "lorakit_recipe": recipe_fields(default),
                       "lorakit_overrides": {p: recipe_fields(r) for p, r in recipes.items() if r != default}})

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # Weights first, config last: a config on disk always describes complete weights.
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return out


def read(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and tensors of an adapter directory, with clear errors for anything unreadable."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterFileError(f"{directory}: no {CONFIG_NAME} (not an adapter directory)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{config_path}: not a JSON object (an adapter config maps keys to values)")
    weights = directory / WEIGHTS_NAME
    legacy = directory / "adapter_model.bin"
    try:
        if weights.is_file():
            tensors = load_file(str(weights))
        elif legacy.is_file():
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)  # never unpickles code
        else:
            raise AdapterFileError(f"{directory}: no {WEIGHTS_NAME}")
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        if isinstance(e, AdapterFileError):
            raise
        raise AdapterFileError(f"{weights if weights.is_file() else legacy}: truncated or corrupt ({e})") from None
    return config, tensors


def _recipe(config: dict, where: Path):
    """The default recipe a config describes."""
    if "lorakit_method" in config:
        cls = METHODS.get(config["lorakit_method"])
        if cls is None:
            raise AdapterFileError(f"{where}: unknown lorakit_method {config['lorakit_method']!r}")
        return cls(**config["lorakit_recipe"])
    if config.get("peft_type") == "ADALORA":
        return AdaLoRA.from_peft(config)
    if config.get("peft_type") != "LORA":
        raise AdapterFileError(f"{where}: peft_type {config.get('peft_type')!r} is not supported (LORA and "
                               "ADALORA are)")
    if config.get("lora_bias"):
        raise AdapterFileError(f"{where}: lora_bias adapters are not supported")
    return (DoRA if config.get("use_dora") else LoRA)(
        rank=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout") or 0.0),
        rslora=bool(config.get("use_rslora")))


def _peft_pattern(patterns: dict, path: str):
    """PEFT's per-module override rule: the key matches the end of the path at a dot boundary."""
    return next((v for k, v in (patterns or {}).items() if re.match(rf"(.*\.)?({k})$", path)), None)


def _module_recipe(config: dict, default, path: str, tensors: dict[str, torch.Tensor]):
    """The recipe for one module: our stored overrides, or PEFT's patterns and tensor shapes."""
    if "lorakit_method" in config:
        fields = config.get("lorakit_overrides", {}).get(path)
        return type(default)(**fields) if fields else default
    if not hasattr(default, "rank"):
        return default  # AdaLoRA: a pruned matrix sizes itself from its tensors
    A = tensors.get("lora_A.weight", tensors.get("lora_embedding_A"))
    rank = int(A.shape[0]) if A is not None else default.rank
    alpha = _peft_pattern(config.get("alpha_pattern"), path)
    return dataclasses.replace(default, rank=rank, alpha=float(alpha) if alpha is not None else default.alpha)


def load(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> nn.Module:
    """Add the adapter saved in ``directory`` (ours or PEFT's) as ``name`` and make it active.

    Every tensor is checked against the model before anything is attached.
    """
    directory = Path(directory)
    if name in adapter_names(model):
        raise AdapterExistsError(f"the model already has an adapter named {name!r}; load it under another name")
    config, tensors = read(directory)
    try:
        default = _recipe(config, directory)
    except (KeyError, TypeError, ValueError) as e:  # a field missing, of the wrong type or out of range
        raise AdapterFileError(f"{directory / CONFIG_NAME}: not a valid adapter config "
                               f"({type(e).__name__}: {e})") from None
    modules = dict(walk(model))
    saved = config.get("modules_to_save") or []
    train_paths = [p for p in modules if matches(p, saved)] if saved else []
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    trained: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise ShapeMismatchError(f"{directory / WEIGHTS_NAME}: key {key!r} lacks the {PREFIX!r} prefix")
        path, suffix = _split(key[len(PREFIX):], modules, train_paths, directory)
        if suffix.startswith("base_layer."):
            # PEFT saves a targeted embedding's full weight too (for resized vocabularies): that is
            # the base the adapter was trained on, so it is loaded like a `train=` module's tensor.
            trained.setdefault(path, {})[suffix[len("base_layer."):]] = tensor
        else:
            (trained if path in train_paths else grouped).setdefault(path, {})[suffix] = tensor
    if not grouped:
        raise AdapterFileError(f"{directory}: the adapter holds no adapter tensors")

    built = {}
    for path, module_tensors in grouped.items():
        recipe = _module_recipe(config, default, path, module_tensors)
        adapter = recipe.build(spec_of(modules[path]), init=False)
        adapter.load_tensors(module_tensors, where=path)
        built[path] = (recipe, adapter)
    copies = []  # (path, parameter name, the model's parameter, the file's tensor)
    for path, module_tensors in trained.items():
        params = dict(modules[path].named_parameters())
        for pname, tensor in module_tensors.items():
            if pname not in params or params[pname].shape != tensor.shape:
                raise ShapeMismatchError(
                    f"{path}.{pname}: the file has shape {tuple(tensor.shape)}, the model has "
                    f"{tuple(params[pname].shape) if pname in params else 'no such parameter'}")
            copies.append((path, pname, params[pname], tensor))
    # attach makes the last check (no merged adapters) before it changes anything; the copies come after it.
    attach(model, name, built, [p for p in train_paths if p in trained])
    with torch.no_grad():
        for path, pname, param, tensor in copies:
            if path not in train_paths and not torch.equal(param, tensor.to(param)):
                warnings.warn(f"{directory}: the adapter carries its own {path}.{pname} (PEFT saves targeted "
                              "embeddings whole); it replaces the model's", stacklevel=2)
            param.copy_(tensor)
    return model


def _split(key: str, modules: dict[str, nn.Module], train_paths: list[str], where: Path) -> tuple[str, str]:
    """Split ``module.path.suffix`` at the deepest adaptable module (or ``train=`` module)."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:i])
        if path in modules and (path in train_paths or kind_of(modules[path]) is not None):
            return path, ".".join(parts[i:])
    known = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in modules), None)
    raise ShapeMismatchError(
        f"{where / WEIGHTS_NAME}: tensor {key!r} names a module the model does not have"
        + (f" (the model has {known!r}, a {type(modules[known]).__name__})" if known else ""))
