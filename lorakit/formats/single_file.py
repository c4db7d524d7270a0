"""The single-file LoRA formats of Stable Diffusion tools: kohya's and diffusers'.

kohya (kohya-ss sd-scripts, A1111, ComfyUI; diffusers reads it too): one safetensors file holding, per module,
``<prefix><module path, "." -> "_">.lora_down.weight`` (A), ``.lora_up.weight`` (B), ``.alpha`` (a scalar; every
reader scales by alpha / rank, so rsLoRA and per-module scales are folded into it) and, for DoRA, ``.dora_scale``
(the magnitude, shaped (out, 1, ...) as LyCORIS writes it). Prefixes: ``lora_unet_`` for the UNet, ``lora_te_``
for the text encoder (``lora_te1_`` / ``lora_te2_`` with two). Its metadata carries kohya's ``ss_*`` keys.

diffusers (``pipeline.save_lora_weights``): PEFT's keys under the component's name (``unet.``, ``transformer.``,
``text_encoder.``, ``text_encoder_2.``) and each component's LoraConfig, keys prefixed the same way, as JSON in
the ``lora_adapter_metadata`` metadata entry. A file without that entry has scale 1 (alpha = rank), as
diffusers reads it.

Both hold LoRA and DoRA updates only. Other methods are converted where an exact LoRA exists (PiSSA, MiLoRA)
and refused otherwise, naming ``lorakit resize``. Reading goes through the PEFT loader
(``checkpoint.prepare_peft``), so a file is checked whole against the model before anything changes.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from torch import nn

from lorakit import checkpoint
from lorakit.adapt import walk
from lorakit.errors import AdapterExistsError, AdapterFileError, AdapterNotFoundError, ConfigError, ShapeMismatchError
from lorakit.kinds import kind_of
from lorakit.model import adapter_names, delete

ROLES = ("unet", "transformer", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}
DIFFUSERS_METADATA = "lora_adapter_metadata"
_KOHYA_SUFFIXES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight",
                   "dora_scale": "lora_magnitude_vector", "alpha": "alpha"}
# LyCORIS methods other than LoRA, recognised to say what the file is instead of "unknown key".
_LYCORIS = {"hada_": "LoHa", "lokr_": "LoKr", "lora_mid": "LoCon's Tucker core", "oft_": "OFT", "diff": "a full diff"}


def components(model) -> dict[str, nn.Module]:
    """The components of ``model`` by diffusers' names: a module is one (a text model is the text encoder,
    a diffusers transformer the transformer, anything else the UNet), a mapping names them, and an object
    with ``unet`` / ``transformer`` / ``text_encoder`` / ``text_encoder_2`` attributes (a pipeline) has those."""
    if isinstance(model, nn.Module):
        return {_role(model): model}
    if isinstance(model, Mapping):
        found = dict(model)
        wrong = [k for k, v in found.items() if k not in ROLES or not isinstance(v, nn.Module)]
        if wrong or not found:
            raise ConfigError(f"a mapping of components must map {', '.join(ROLES)} to modules, got {sorted(found)}")
        return found
    found = {role: getattr(model, role) for role in ROLES if isinstance(getattr(model, role, None), nn.Module)}
    if not found:
        raise ConfigError(f"{type(model).__name__} is neither a module nor has any of the components {ROLES}")
    return found


def _role(module: nn.Module) -> str:
    name = type(module).__name__
    if "TextModel" in name or name.startswith(("CLIP", "T5")):
        return "text_encoder"
    if "Transformer" in name and type(module).__module__.startswith("diffusers"):
        return "transformer"
    return "unet"


def _kohya_path(module: nn.Module, role: str, path: str) -> str:
    """The module path kohya's names spell: a CLIP text model's with its ``text_model.`` (transformers 5
    flattened CLIPTextModel; the files A1111 and ComfyUI read keep the old name)."""
    flattened = role.startswith("text_encoder") and type(module).__name__.startswith("CLIPTextModel") \
        and not hasattr(module, "text_model")
    return f"text_model.{path}" if flattened else path


def save_file(model, path: str | os.PathLike, name: str, format: str) -> Path:
    """Write adapter ``name`` of ``model`` (a module, a pipeline or {component: module}) as one ``format``
    ("kohya" or "diffusers") safetensors file at ``path``, atomically; returns the path."""
    out = Path(path)
    if out.is_dir():
        raise AdapterFileError(f"{out}: is a directory; format={format!r} writes one .safetensors file")
    parts = {role: module for role, module in components(model).items() if name in adapter_names(module)}
    if not parts:
        raise AdapterNotFoundError(f"no adapter named {name!r} on {', '.join(components(model))}")
    forms = {role: checkpoint.peft_form(module, name, "lora") for role, module in parts.items()}
    for role, (config, _, _) in forms.items():
        if config.get("modules_to_save"):
            raise ConfigError(f"{role}: adapter {name!r} trains its own copies of {config['modules_to_save']}; "
                              f"a {format} file holds LoRA updates only (save it with format='peft')")
    write = _kohya if format == "kohya" else _diffusers
    tensors, metadata = write(parts, forms)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_tensors(out, tensors, metadata)
    return out


def _kohya(parts: dict[str, nn.Module], forms: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if "transformer" in parts:
        raise ConfigError("kohya's files name a diffusers transformer's layers by the original model's (fused) "
                          "layout, which its LoRA does not have; save it with format='diffusers'")
    tensors, ranks, alphas, conv = {}, Counter(), Counter(), Counter()
    for role, module in parts.items():
        prefix = "lora_te1_" if role == "text_encoder" and "text_encoder_2" in parts else KOHYA_PREFIXES[role][0]
        _, peft_tensors, recipes = forms[role]
        for path, recipe in recipes.items():
            layer = module.get_submodule(path)
            if layer.kind.layout == "embedding":
                raise ConfigError(f"{role}: {path}: kohya's format has no LoRA on embeddings; "
                                  "save it with format='peft'")
            stem = prefix + _kohya_path(module, role, path).replace(".", "_")
            A, B = peft_tensors[f"{path}.lora_A.weight"], peft_tensors[f"{path}.lora_B.weight"]
            alpha = recipe.scale * recipe.rank  # readers scale by alpha / rank: rsLoRA's alpha/√r folds in
            tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = A, B
            tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
            magnitude = peft_tensors.get(f"{path}.lora_magnitude_vector")
            if magnitude is not None:  # LyCORIS's shape, one norm per output feature: (out, 1, ...)
                tensors[f"{stem}.dora_scale"] = magnitude.reshape(B.shape[0], *(1,) * (B.dim() - 1))
            (conv if A.dim() > 2 and A.shape[2:].numel() > 1 else ranks).update({recipe.rank: 1})
            alphas[alpha] += 1
    rank, alpha = (ranks or conv).most_common(1)[0][0], alphas.most_common(1)[0][0]
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
                "ss_base_model_version": _base_version(parts)}
    if conv:
        metadata["ss_network_args"] = json.dumps({"conv_dim": str(conv.most_common(1)[0][0])})
    base = next((getattr(getattr(m, "config", None), "_name_or_path", None) for m in parts.values()), None)
    if base:
        metadata["ss_sd_model_name"] = str(base)
    return tensors, metadata


def _base_version(parts: dict[str, nn.Module]) -> str:
    """kohya's ``ss_base_model_version``: sdxl_base_v1-0 for a UNet with SDXL's added conditioning, else sd_v1."""
    unet = parts.get("unet")
    sdxl = getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"
    return "sdxl_base_v1-0" if sdxl else "sd_v1"


def _diffusers(parts: dict[str, nn.Module], forms: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, configs = {}, {}
    for role, (config, peft_tensors, _) in forms.items():
        tensors.update({f"{role}.{key}": tensor for key, tensor in peft_tensors.items()})
        configs.update({f"{role}.{key}": value for key, value in config.items()})
    return tensors, {DIFFUSERS_METADATA: json.dumps(configs, sort_keys=True)}


def load_file(model, path: Path, name: str, *, strict: bool = True) -> None:
    """Attach the kohya or diffusers LoRA file ``path`` to ``model`` (a module, a pipeline or {component:
    module}) as adapter ``name``: every component the file holds, each checked whole before any changes."""
    if path.name == checkpoint.WEIGHTS_NAME and (path.parent / checkpoint.CONFIG_NAME).is_file():
        parts = components(model)  # the weights file of an adapter directory: the directory is meant
        if len(parts) != 1:
            raise ConfigError(f"{path} is a PEFT adapter, which adapts one module; pass that module")
        checkpoint.load(next(iter(parts.values())), path.parent, name, strict=strict)
        return
    tensors = checkpoint.read_tensors(path)
    metadata = _metadata(path)
    if not tensors:
        raise AdapterFileError(f"{path}: holds no tensors")
    parts = components(model)
    kohya = any(key.startswith("lora_") for key in tensors)
    by_role = _kohya_read(tensors, parts, path) if kohya else _diffusers_read(tensors, metadata, parts, path)
    absent = [role for role in by_role if role not in parts]
    if absent:
        loaded = [role for role in by_role if role in parts]
        if not loaded:
            raise AdapterFileError(f"{path}: holds LoRA for {', '.join(by_role)}, and the model given is "
                                   f"{', '.join(parts)}; pass the pipeline or {{'{absent[0]}': module, ...}}")
        warnings.warn(f"{path}: also holds LoRA for {', '.join(absent)}, not loaded (only {', '.join(loaded)} was "
                      "given; pass the pipeline or a dict of its components to load all)", stacklevel=3)
    for role in by_role:
        if role in parts and name in adapter_names(parts[role]):
            raise AdapterExistsError(f"the {role} already has an adapter named {name!r}; load it under another name")
    commits = [checkpoint.prepare_peft(parts[role], name, config, role_tensors, path, path, strict=strict)
               for role, (config, role_tensors) in by_role.items() if role in parts]
    done = []
    try:
        for role, commit in zip([r for r in by_role if r in parts], commits):
            commit()
            done.append(role)
    except BaseException:
        for role in done:  # all components or none
            delete(parts[role], name)
        raise


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _kohya_read(tensors: dict[str, torch.Tensor], parts: dict[str, nn.Module], path: Path) -> dict[str, tuple]:
    """{role: (PEFT config, tensors)} of a kohya file, its names resolved against ``parts``' modules."""
    stems = {}  # kohya stem -> (role, module path), for every adaptable module of the components given
    for role, module in parts.items():
        for prefix in KOHYA_PREFIXES.get(role, ()):
            for module_path, layer in walk(module):
                if kind_of(layer) is not None:
                    # either spelling of a CLIP text model's paths (diffusers' converter writes the flattened one)
                    for spelled in {_kohya_path(module, role, module_path), module_path}:
                        stems[prefix + spelled.replace(".", "_")] = (role, module_path)
    role_of_prefix = {p: r for r, ps in KOHYA_PREFIXES.items() for p in ps}
    found: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        stem, _, suffix = key.partition(".")
        prefix = next((p for p in sorted(role_of_prefix, key=len, reverse=True) if stem.startswith(p)), None)
        if prefix is None:
            raise AdapterFileError(f"{path}: key {key!r} has none of kohya's prefixes (lora_unet_, lora_te_, "
                                   "lora_te1_, lora_te2_)")
        if suffix not in _KOHYA_SUFFIXES:
            kind = next((what for start, what in _LYCORIS.items() if suffix.startswith(start)), None)
            raise AdapterFileError(f"{path}: key {key!r}: " + (f"a LyCORIS {kind} file; lorakit reads LoRA "
                                   "(lora_down / lora_up / alpha / dora_scale)" if kind else
                                   "not a kohya LoRA tensor (lora_down.weight, lora_up.weight, alpha, dora_scale)"))
        role = role_of_prefix[prefix]
        if role not in parts:  # reported by the caller, which knows what was given
            found.setdefault(role, {})
            continue
        if stem not in stems:
            example = next((k for k, (r, _) in stems.items() if r == role), "?")
            raise ShapeMismatchError(f"{path}: key {key!r} names a module the {role} does not have (kohya names "
                                     f"the module path with '_' for '.', e.g. {example})")
        found.setdefault(role, {}).setdefault(stems[stem][1], {})[_KOHYA_SUFFIXES[suffix]] = tensor
    out = {}
    for role, modules in found.items():
        out[role] = _peft(modules, path, role) if role in parts else ({}, {})
    return out


def _peft(modules: dict[str, dict[str, torch.Tensor]], path: Path, role: str) -> tuple[dict, dict]:
    """PEFT's config and tensors for {module path: {lora_A.weight, lora_B.weight, alpha?, lora_magnitude_vector?}}:
    each module's rank from its A, its alpha from the file (the rank where there is none: scale 1)."""
    settings, tensors = {}, {}
    for module_path, parts in modules.items():
        A = parts.get("lora_A.weight")
        if A is None or "lora_B.weight" not in parts:
            raise AdapterFileError(f"{path}: {role}.{module_path} has " + ("no lora_down" if A is None else "no lora_up"))
        alpha = parts.pop("alpha", None)
        if alpha is not None and alpha.numel() != 1:
            raise ShapeMismatchError(f"{path}: {role}.{module_path}.alpha has shape {tuple(alpha.shape)}, not a scalar")
        settings[module_path] = (A.shape[0], float(alpha) if alpha is not None else float(A.shape[0]))
        magnitude = parts.get("lora_magnitude_vector")
        if magnitude is not None:  # PEFT's shape: (out,), or (1, out, 1, ...) for a conv
            out_features = parts["lora_B.weight"].shape[0]
            if magnitude.numel() != out_features:
                raise ShapeMismatchError(f"{path}: {role}.{module_path}: dora_scale has shape {tuple(magnitude.shape)}; "
                                         f"lorakit reads one magnitude per output feature ({out_features})")
            B = parts["lora_B.weight"]
            parts["lora_magnitude_vector"] = magnitude.reshape(-1) if B.dim() == 2 else \
                magnitude.reshape(1, -1, *(1,) * (B.dim() - 2))
        tensors.update({f"{checkpoint.PREFIX}{module_path}.{k}": v for k, v in parts.items()})
    doras = {module_path for module_path, parts in modules.items() if "lora_magnitude_vector" in parts}
    if doras and len(doras) != len(modules):
        raise AdapterFileError(f"{path}: {role}: some modules are DoRA (dora_scale) and some are not; lorakit reads "
                               "one method per adapter")
    rank, alpha = Counter(settings.values()).most_common(1)[0][0]
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_dora": bool(doras), "use_rslora": False,
              # anchored full paths: exactly these modules
              "target_modules": "(" + "|".join(re.escape(p) for p in sorted(modules)) + ")",
              "rank_pattern": {f"^{re.escape(p)}": r for p, (r, _) in settings.items() if r != rank},
              "alpha_pattern": {f"^{re.escape(p)}": a for p, (_, a) in settings.items() if a != alpha}}
    return config, tensors


_OLD_SUFFIXES = {"lora.down.weight": "lora_A.weight", "lora.up.weight": "lora_B.weight",
                 "lora_linear_layer.down.weight": "lora_A.weight", "lora_linear_layer.up.weight": "lora_B.weight"}


def _diffusers_read(tensors: dict[str, torch.Tensor], metadata: dict[str, str], parts: dict[str, nn.Module],
                    path: Path) -> dict[str, tuple]:
    """{role: (PEFT config, tensors)} of a file laid out as diffusers' save_lora_weights writes it."""
    try:
        configs = json.loads(metadata[DIFFUSERS_METADATA]) if DIFFUSERS_METADATA in metadata else {}
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path}: its {DIFFUSERS_METADATA} metadata is not valid JSON ({e})") from None
    found: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        role, _, rest = key.partition(".")
        if role not in ROLES:
            raise AdapterFileError(f"{path}: key {key!r} starts with none of {', '.join(ROLES)} (diffusers' layout) "
                                   "nor kohya's lora_unet_ / lora_te_")
        suffix = next((s for s in (*_OLD_SUFFIXES, "lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "alpha")
                       if rest.endswith("." + s)), None)
        if suffix is None:
            raise AdapterFileError(f"{path}: key {key!r} is not a LoRA tensor (lora_A.weight, lora_B.weight, "
                                   "lora_magnitude_vector)")
        module_path = rest[:-len(suffix) - 1]
        if role in parts and not hasattr(parts[role], "text_model"):
            module_path = module_path.removeprefix("text_model.")  # written from a CLIPTextModel before transformers 5
        found.setdefault(role, {}).setdefault(module_path, {})[_OLD_SUFFIXES.get(suffix, suffix)] = tensor
    out = {}
    for role, modules in found.items():
        own = {k[len(role) + 1:]: v for k, v in configs.items() if k.startswith(role + ".")}
        if role not in parts:
            out[role] = ({}, {})
        elif own:  # the LoraConfig diffusers saved
            flat = {f"{checkpoint.PREFIX}{p}.{k}": v for p, ts in modules.items() for k, v in ts.items()}
            out[role] = (own, flat)
        else:
            out[role] = _peft(modules, path, role)
    return out
