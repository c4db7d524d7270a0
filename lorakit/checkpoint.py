"""Save and load adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

LoRA and rsLoRA adapters are written exactly as PEFT writes them (keys prefixed
``base_model.model.``, no adapter name in keys), so PEFT, vLLM and the hub read them; adapters
written by PEFT load here too. Methods PEFT lacks use the same two files with
``"lorakit_method"`` in the config. Writes are atomic; loads check every key and shape before
touching the model, so a bad file leaves the model as it was.

Integrity: safetensors has no checksum, so every tensor file lorakit writes (``write_tensors``: adapters,
the single-file formats, the trainer's checkpoints) carries a sha256 of its tensors and metadata, which
``read_tensors`` checks; an adapter directory's weights also carry the sha256 of its config. A file lorakit
wrote must prove it: its metadata holds two ``lorakit_*`` keys, so a bit flip that renames the digest's key
leaves the other, and a file with any ``lorakit_*`` key but no valid digest is refused. Files without any
(PEFT's) read as before. Loads also refuse what the model would take silently changed: config values of the
wrong JSON type, non-float or non-finite tensors, PEFT's ``bias`` modes (which overwrite the base's biases).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pickle
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lorakit import registry
from lorakit.adapt import attach, check_regex, matches, walk
from lorakit.kinds import kind_of
from lorakit.errors import (AdapterExistsError, AdapterFileError, AdapterNotFoundError, ConfigError, LorakitError,
                            ShapeMismatchError)
from lorakit.layers import adapted_layers, spec_of
from lorakit.methods.base import check_finite, recipe_fields, setting_names
from lorakit.methods.lora import LoRA
from lorakit.model import adapter_names
from lorakit.trained import fresh_copy, trained_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
DIGEST_KEY = "lorakit_sha256"  # safetensors metadata: see tensor_digest
CONFIG_DIGEST_KEY = "lorakit_config_sha256"  # an adapter's weights: the sha256 of its adapter_config.json
VERSION_KEY = "lorakit_version"  # every file lorakit writes: the second mark beside the digest


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary sibling and a rename: readers never see half a file."""
    atomic_write_all({Path(path): write})


def atomic_write_all(writes: Mapping[Path, Callable[[Path], None]]) -> None:
    """Write each file of ``writes`` ({path: write(temporary path)}) to a temporary sibling, then rename them
    all into place: a failed write (disk full, read-only directory) leaves every old file as it was.

    An OSError comes out as an AdapterFileError naming the path that could not be written.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in writes.items():
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            staged.append((tmp, path))
            with _naming(path):
                write(tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
        for tmp, path in staged:
            with _naming(path):
                os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):  # never created (read-only directory), or already renamed
                tmp.unlink()


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Raise an error from writing ``path`` (an OSError, or safetensors' own for I/O) as an AdapterFileError
    that says which path."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        if isinstance(e, LorakitError):
            raise
        raise AdapterFileError(f"{path}: cannot write it ({getattr(e, 'strerror', None) or e})") from e


def tensor_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """sha256 over the tensors' sorted names, dtypes, shapes and bytes, then ``metadata``'s sorted entries but
    the digest's own (the checksum lorakit's files carry)."""
    digest = _tensors_sha256(tensors)
    return (digest if metadata is None else _add_metadata(digest, metadata)).hexdigest()


def _tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> hashlib._Hash:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, without a copy
    return digest


def _add_metadata(digest: hashlib._Hash, metadata: Mapping[str, str]) -> hashlib._Hash:
    digest.update(json.dumps(sorted((k, v) for k, v in metadata.items() if k != DIGEST_KEY)).encode())
    return digest


def _tensors_writer(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
                    ) -> Callable[[Path], None]:
    """What writes ``tensors`` as a safetensors file with their digest (for atomic_write_all)."""
    # Copies on the CPU: safetensors wants contiguous CPU tensors and refuses ones sharing storage (tied weights).
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    metadata = {**(metadata or {}), "format": "pt", VERSION_KEY: _version()}
    metadata[DIGEST_KEY] = tensor_digest(tensors, metadata)
    return lambda tmp: save_file(tensors, str(tmp), metadata=metadata)


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (any device; shared storage is fine) to the safetensors file ``path``, atomically,
    with a digest of their bytes and the metadata that ``read_tensors`` checks. ``metadata``: more str → str."""
    atomic_write(Path(path), _tensors_writer(tensors, metadata))


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path``, on the CPU, checked against the digest lorakit writes
    (a file without any ``lorakit_*`` metadata, such as PEFT's, is read as it is).

    A missing, truncated, corrupt or altered file raises AdapterFileError naming it.
    """
    return _read_checked(Path(path))[0]


def _read_checked(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the safetensors file ``path``, checked as ``read_tensors`` says."""
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise AdapterFileError(f"{path}: truncated or corrupt ({e})") from None
    expected = metadata.get(DIGEST_KEY)
    if expected is None:
        marks = sorted(k for k in metadata if k.startswith("lorakit_"))
        if marks:
            raise AdapterFileError(f"{path}: lorakit wrote it (its metadata has {', '.join(marks)}), but its checksum "
                                   f"{DIGEST_KEY} is missing; the file is damaged")
        return tensors, metadata
    of_tensors = _tensors_sha256(tensors)
    whole = _add_metadata(of_tensors.copy(), metadata)
    # Files written before the digest covered the metadata (lorakit 0.1.0) carry the tensors' alone; no bit flip
    # turns one digest into the other.
    if expected not in (whole.hexdigest(), of_tensors.hexdigest()):
        raise AdapterFileError(f"{path}: its tensor data does not match the checksum saved with it; the file is "
                               "corrupt (its tensors or metadata changed after it was written)")
    return tensors, metadata


def _version() -> str:
    try:
        return importlib.metadata.version("lorakit")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _target_modules(model: nn.Module, paths: list[str]) -> list[str] | str:
    """PEFT's ``target_modules`` selecting exactly ``paths``: each path's shortest dotted suffix that names no
    other module, of any type (PEFT matches containers too: ``"0"`` from ``to_out.0`` would take
    ``down_blocks.0``), or a full-match regex of the paths where some path is itself the suffix of another."""
    wanted = set(paths)
    # Every dotted suffix of the other modules' paths: a name PEFT would match on one of them.
    taken = {".".join(parts[i:]) for p, _ in walk(model) if p not in wanted
             for parts in [p.split(".")] for i in range(len(parts))}
    names = set()
    for path in paths:
        parts = path.split(".")
        name = next((s for i in range(len(parts) - 1, -1, -1) for s in [".".join(parts[i:])] if s not in taken), None)
        if name is None:
            return "(" + "|".join(re.escape(p) for p in sorted(paths)) + ")"
        names.add(name)
    return sorted(names)


def _patterns(recipes: dict[str, object], key: str, default) -> dict[str, object]:
    """Per-module values that differ from the default, keyed as PEFT's rank_pattern / alpha_pattern."""
    return {re.escape(path): getattr(r, key) for path, r in recipes.items() if getattr(r, key) != default}


def _as_peft(recipe, adapter, path: str, lora_only: bool = False):
    """(recipe, adapter) in a form PEFT reads: as is, or converted to the equivalent plain LoRA.
    ``lora_only``: LoRA or DoRA only (what the single-file formats hold), converting AdaLoRA and others too."""
    if (isinstance(recipe, LoRA) if lora_only else recipe.peft_config() is not None):
        return recipe, adapter
    plain = adapter.to_lora()
    if plain is not None:
        return plain
    where = "this format" if lora_only else "PEFT"
    raise ConfigError(f"{path}: {type(recipe).__name__} has no equivalent in {where}; save it with format='lorakit', "
                      "or make it a LoRA first (lk.resize / `lorakit resize ADAPTER --rank R`)")


def peft_form(model: nn.Module, name: str = "default", format: str = "lorakit"
              ) -> tuple[dict, dict[str, torch.Tensor], dict[str, object]]:
    """Adapter ``name`` as PEFT's two files hold it: (config, tensors keyed ``<module path>.<suffix>`` without
    PEFT's prefix, {module path: recipe}). ``format``: "lorakit" (any method), "peft" (what PEFT loads) or
    "lora" (LoRA and DoRA only, as the kohya and diffusers files hold them)."""
    layers = [(path, layer) for path, layer in adapted_layers(model) if name in layer.adapters]
    if not layers:
        raise AdapterNotFoundError(f"no adapter named {name!r} on the model; it has {adapter_names(model)}")
    entries = {path: (layer.recipes[name], layer.adapters[name]) for path, layer in layers}
    if format != "lorakit":
        entries = {path: _as_peft(*entry, path, lora_only=format == "lora") for path, entry in entries.items()}
    recipes = {path: recipe for path, (recipe, _) in entries.items()}
    # The most common recipe is the config's default; the rest become per-module patterns.
    default = Counter(recipes.values()).most_common(1)[0][0]
    tensors = {}
    for path, (_, adapter) in entries.items():
        # Adapters that prune themselves (AdaLoRA) write only what they keep, as PEFT does.
        for suffix, tensor in adapter.saved().items():
            tensors[f"{path}.{suffix}"] = tensor
    # The adapter's own copies, under the module's keys (PEFT's modules_to_save: no "modules_to_save.<name>").
    trained = {path: module.adapters[name] for path, module in trained_modules(model) if name in module.adapters}
    for path, trained_copy in trained.items():
        for key, tensor in trained_copy.state_dict().items():
            tensors[f"{path}.{key}"] = tensor
    broken = [key for key, tensor in tensors.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if broken:  # lk.load refuses such a file, and lk.merge such an adapter
        listed = ", ".join(broken[:6]) + (f" and {len(broken) - 6} more" if len(broken) > 6 else "")
        raise ConfigError(f"adapter {name!r} holds NaN or infinite values in {listed}; it is not saved (training "
                          "diverged? resume from an earlier checkpoint with a lower learning rate)")

    config = {
        "base_model_name_or_path": str(getattr(getattr(model, "config", None), "_name_or_path", None) or "") or None,
        "bias": "none", "fan_in_fan_out": any(layer.kind.transposed for _, layer in layers),
        "inference_mode": True, "init_lora_weights": True, "layers_pattern": None, "layers_to_transform": None,
        "lora_bias": False, "modules_to_save": sorted(trained) or None, "revision": None,
        "target_modules": _target_modules(model, [p for p, _ in layers]),
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
    }
    peft = default.peft_config()
    if peft is not None:
        config.update(peft)
        if _has_rank(default):
            config["rank_pattern"] = _patterns(recipes, "rank", default.rank)
            config["alpha_pattern"] = _patterns(recipes, "alpha", default.alpha)
        else:  # AdaLoRA: PEFT's rank_pattern lists which of the init_rank triplets each matrix keeps
            # A reloaded adapter holds only its kept triplets; PEFT still wants a mask over init_rank.
            config["rank_pattern"] = {
                f"{path}.lora_E": adapter.rank_mask.tolist() + [False] * (recipe.init_rank - adapter.rank)
                for path, (recipe, adapter) in entries.items()}
    else:
        config.update({"peft_type": None, "lorakit_version": _version(), "lorakit_method": default.name,
                       "lorakit_recipe": recipe_fields(default),
                       # Where the recipe is defined: what a process must import (lk.register) to load a method
                       # from outside lorakit. Named only, never imported from a file's say-so.
                       "lorakit_recipe_class": f"{type(default).__module__}:{type(default).__qualname__}",
                       "lorakit_overrides": {p: recipe_fields(r) for p, r in recipes.items() if r != default}})
    return config, tensors, recipes


def save(model: nn.Module, path: str | os.PathLike, name: str = "default", format: str = "lorakit") -> Path:
    """Write adapter ``name`` (and its copies of ``train=`` modules) to ``path``; returns the path.

    ``format``: "lorakit" or "peft" write an adapter directory. LoRA, rsLoRA and DoRA are always written in
    PEFT's format there; "peft" also converts PiSSA/MiLoRA adapters to the plain LoRA (rank 2r) that PEFT loads
    on the original base. (``lk.save`` also writes the single-file formats: lorakit/files.py.)
    """
    if format not in ("lorakit", "peft"):
        raise ConfigError(f"format must be one of 'lorakit', 'peft', 'kohya', 'diffusers', got {format!r}")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise AdapterFileError(f"{out}: is a file, not a directory (lk.save writes a directory holding "
                               f"{CONFIG_NAME} and {WEIGHTS_NAME}; format='kohya' or 'diffusers' writes one file)")
    config, tensors, _ = peft_form(model, name, format)
    with _naming(out):
        out.mkdir(parents=True, exist_ok=True)
    with _naming(out / CONFIG_NAME):  # its text is made before either file is written, for its checksum
        text = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    # The config's checksum rides in the weights' metadata, under their digest: PEFT warns about any key it does
    # not know in adapter_config.json, so the config itself stays PEFT's.
    signed = {CONFIG_DIGEST_KEY: hashlib.sha256(text).hexdigest()}
    # Both files are complete on disk before either replaces an old one.
    atomic_write_all({out / WEIGHTS_NAME: _tensors_writer({PREFIX + k: v for k, v in tensors.items()}, signed),
                      out / CONFIG_NAME: lambda p: p.write_bytes(text)})
    return out


def read(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], str | None]:
    """The config and tensors of an adapter directory, with clear errors for anything unreadable, and what
    shows that the config is not the one lorakit wrote beside these tensors (None: it is, or the files are PEFT's)."""
    directory = Path(directory)
    if directory.is_file():
        raise AdapterFileError(f"{directory}: is a file, not an adapter directory (give the directory that holds "
                               f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    if not directory.is_dir():
        raise AdapterFileError(f"{directory}: no such directory")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterFileError(f"{directory}: no {CONFIG_NAME} (not an adapter directory)")
    text = config_path.read_bytes()
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{config_path}: not a JSON object (an adapter config maps keys to values)")
    weights = directory / WEIGHTS_NAME
    legacy = directory / "adapter_model.bin"
    if weights.is_file():
        tensors, metadata = _read_checked(weights)
    elif not legacy.is_file():
        raise AdapterFileError(f"{directory}: no {WEIGHTS_NAME}")
    else:
        try:
            tensors, metadata = torch.load(legacy, map_location="cpu", weights_only=True), {}  # never unpickles code
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
            raise AdapterFileError(f"{legacy}: truncated or corrupt ({e})") from None
    signed = metadata.get(CONFIG_DIGEST_KEY)
    if signed is not None and hashlib.sha256(text).hexdigest() != signed:
        return config, tensors, (f"{config_path}: changed since lorakit wrote it (it does not match the checksum "
                                 f"{weights.name} carries): damaged, or edited by hand")
    marks = sorted(k for k in config if k.startswith("lorakit_"))
    if marks and not any(k.startswith("lorakit_") for k in metadata):
        return config, tensors, (f"{config_path}: lorakit wrote it ({', '.join(marks)}), but its weights carry no "
                                 "lorakit checksum: replaced or damaged")
    return config, tensors, None


def _has_rank(recipe) -> bool:
    """Whether ``recipe`` has the ``rank`` and ``alpha`` settings PEFT's rank_pattern / alpha_pattern vary."""
    return {"rank", "alpha"} <= setting_names(recipe)


def _recipe(config: dict, where: Path):
    """The default recipe a config describes (a lorakit method's recipe checks its stored settings itself)."""
    bias = config.get("bias", "none")
    if bias != "none":
        trained = "every bias of the model" if bias == "all" else "the biases of the layers it adapts"
        raise AdapterFileError(
            f"{where}: bias={bias!r}: the adapter also trained {trained}, which PEFT writes over the model's own (so "
            "even the disabled adapter changes the model); lorakit keeps the base model as it is and reads "
            "bias='none' adapters only. Merge this one into the base with PEFT "
            "(PeftModel.from_pretrained(model, path).merge_and_unload()), or train it with bias='none'")
    if "lorakit_method" in config:
        try:
            cls = registry.entry(config["lorakit_method"]).recipe
        except ConfigError as e:
            defined = config.get("lorakit_recipe_class")
            raise AdapterFileError(f"{where}: {e}" + (f"; the file was saved from {defined}" if defined else "")) from None
        return cls(**config["lorakit_recipe"])
    if config.get("lora_bias"):
        raise AdapterFileError(f"{where}: lora_bias adapters are not supported")
    recipe = registry.from_peft(config)
    if recipe is None:
        raise AdapterFileError(f"{where}: peft_type {config.get('peft_type')!r} is not supported: no registered "
                               "method reads it (lorakit's read PEFT's LORA, with or without DoRA, and ADALORA)")
    return recipe


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_object(value) -> bool:
    return isinstance(value, dict)


def _mapping(test: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: isinstance(value, dict) and all(map(test, value.values()))


# (what a JSON value must be, its test): Python's own int() and bool() would raise OverflowError on 1e999 and
# read "no" as true.
_INT = ("an int", _is_int)
_NUMBER = ("a number", _is_number)
_BOOL = ("true or false", lambda value: isinstance(value, bool))
_STRING = ("a string", lambda value: isinstance(value, str))
_NAMES = ("a string or a list of strings",
          lambda value: isinstance(value, str) or isinstance(value, list) and all(isinstance(n, str) for n in value))
# The config keys lorakit reads (PEFT's LoraConfig and AdaLoraConfig, lorakit's own): (what the value must be,
# its test, whether null is allowed). Keys lorakit does not read are left alone, as PEFT leaves them.
_CONFIG_KEYS: dict[str, tuple[str, Callable[[object], bool], bool]] = {
    "peft_type": (*_STRING, True),
    **{key: (*_INT, False) for key in ("r", "init_r", "target_r", "total_step", "tinit", "tfinal", "deltaT")},
    **{key: (*_NUMBER, False) for key in ("lora_alpha", "beta1", "beta2", "orth_reg_weight")},
    "lora_dropout": (*_NUMBER, True),
    **{key: (*_BOOL, False) for key in ("use_rslora", "use_dora", "lora_bias")},
    "bias": ("'none', 'all' or 'lora_only'", lambda value: value in ("none", "all", "lora_only"), False),
    **{key: (*_NAMES, True) for key in ("target_modules", "exclude_modules", "layers_pattern", "modules_to_save")},
    "layers_to_transform": ("an int or a list of ints",
                            lambda value: _is_int(value) or isinstance(value, list) and all(map(_is_int, value)), True),
    "rank_pattern": ("an object mapping module patterns to ints", _mapping(_is_int), True),
    "alpha_pattern": ("an object mapping module patterns to numbers", _mapping(_is_number), True),
    **{key: (*_STRING, False) for key in ("lorakit_method", "lorakit_recipe_class", "lorakit_version")},
    "lorakit_recipe": ("an object of the method's settings", _is_object, False),
    "lorakit_overrides": ("an object mapping module paths to settings", _mapping(_is_object), False),
}
# AdaLoRA's rank_pattern says which of the init_r triplets each matrix keeps.
_ADALORA_RANKS = ("an object mapping module names to lists of true/false",
                  _mapping(lambda value: isinstance(value, list) and all(isinstance(b, bool) for b in value)), True)


def _check_config(config: dict, where: Path) -> None:
    """Refuse a config value of the wrong JSON type, or a module-name regex that does not compile, naming the
    file and key."""
    keys = {**_CONFIG_KEYS, "rank_pattern": _ADALORA_RANKS} if config.get("peft_type") == "ADALORA" else _CONFIG_KEYS
    for key, (what, test, nullable) in keys.items():
        if key in config and not (nullable and config[key] is None or test(config[key])):
            raise AdapterFileError(f"{where}: {key} must be {what}{' (or null)' if nullable else ''}, "
                                   f"got {config[key]!r}")
    # PEFT reads a target_modules / exclude_modules string, layers_pattern and modules_to_save as regexes.
    patterns = [(key, config[key]) for key in ("target_modules", "exclude_modules") if isinstance(config.get(key), str)]
    for key in ("layers_pattern", "modules_to_save"):
        value = config.get(key) or []
        patterns += [(key, name) for name in ([value] if isinstance(value, str) else value)]
    patterns += [(key, pattern) for key in ("rank_pattern", "alpha_pattern") for pattern in config.get(key) or {}]
    for key, pattern in patterns:
        try:
            check_regex(pattern, key)
        except ConfigError as e:
            raise AdapterFileError(f"{where}: {e}") from None


def _peft_pattern(patterns: dict, path: str):
    """PEFT's per-module override rule: the key matches the end of the path at a dot boundary."""
    return next((v for k, v in (patterns or {}).items() if re.match(rf"(.*\.)?({k})$", path)), None)


def _module_recipe(config: dict, default, path: str, tensors: dict[str, torch.Tensor]):
    """The recipe for one module: our stored overrides, or PEFT's r / rank_pattern and alpha_pattern.

    A PEFT-format module whose tensors have another rank than the config gives it is refused, as PEFT does.
    """
    if "lorakit_method" in config:
        fields = config.get("lorakit_overrides", {}).get(path)
        return type(default)(**fields) if fields else default
    if not _has_rank(default):
        return default  # AdaLoRA's init_rank: a pruned matrix sizes itself from its tensors
    rank = _peft_pattern(config.get("rank_pattern"), path)
    rank = default.rank if rank is None else int(rank)
    A = tensors.get("lora_A.weight", tensors.get("lora_embedding_A"))
    if A is not None and A.shape[0] != rank:
        raise ShapeMismatchError(f"{path}: its tensors have rank {A.shape[0]} (lora_A {tuple(A.shape)}), but the "
                                 f"config gives it r={rank} (r / rank_pattern); the config does not describe them")
    alpha = _peft_pattern(config.get("alpha_pattern"), path)
    return dataclasses.replace(default, rank=rank, alpha=float(alpha) if alpha is not None else default.alpha)


def _saved_modules(config: dict, modules: dict[str, nn.Module]) -> list[str]:
    """The paths the config's ``modules_to_save`` names, by PEFT's rule (a path ending with a name), outermost."""
    names = config.get("modules_to_save") or []
    found = [p for p in modules if any(p.endswith(n) for n in names)]
    return [p for p in found if not any(p.startswith(q + ".") for q in found)]


def _targeted(config: dict, modules: dict[str, nn.Module]) -> list[str]:
    """The adaptable modules the config's ``target_modules`` selects in this model, by PEFT's rule
    (``check_target_module_exists``): the modules whose tensors the file must hold."""
    targets = config.get("target_modules")
    if not targets:
        return []
    excluded = config.get("exclude_modules")
    saved = config.get("modules_to_save") or []
    chosen = []
    for path, module in modules.items():
        if kind_of(module) is None or (excluded and matches(path, excluded)):
            continue
        if any(re.match(rf"(^|.*\.){name}($|\..*)", path) for name in saved):  # PEFT never adapts these
            continue
        if isinstance(targets, str) or path in targets:
            found = matches(path, targets)
        else:  # a suffix match is limited by layers_to_transform
            found = matches(path, targets) and _in_layers(config, path)
        if found:
            chosen.append(path)
    return chosen


def _in_layers(config: dict, path: str) -> bool:
    """PEFT's ``layers_to_transform`` rule: the first ``<layers_pattern>.<index>.`` of the path has a listed index."""
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = config.get("layers_pattern")
    patterns = [pattern] if isinstance(pattern, str) and pattern else list(pattern or [])
    if patterns:
        match = next((m for p in patterns for m in [re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", path)] if m), None)
    else:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    if match is None:
        return False
    index = int(match["idx"])
    return index == layers if isinstance(layers, int) else index in layers


def load(model: nn.Module, path: str | os.PathLike, name: str = "default", *, strict: bool = True) -> nn.Module:
    """Add the adapter saved in the directory ``path`` (ours or PEFT's) as ``name`` and make it active.
    (``lk.load`` also reads the single-file formats: lorakit/files.py.)

    Every tensor is checked against the model before anything is attached. A file missing every tensor
    of some module its config targets (or trains) is refused, naming them; ``strict=False`` warns and
    loads the rest (those modules stay the base). So are tensors the model would take changed (not float, NaN
    or infinite) and a config lorakit's checksum does not cover (edited, or damaged); ``strict=False`` warns.
    """
    path = Path(path)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{path}: an adapter directory adapts one module; pass that module (pipe.unet, say), "
                          f"not a {type(model).__name__}")
    if name in adapter_names(model):
        raise AdapterExistsError(f"the model already has an adapter named {name!r}; load it under another name")
    config, tensors, unproven = read(path)
    commit = prepare_peft(model, name, config, tensors, path / CONFIG_NAME, path / WEIGHTS_NAME, strict=strict)
    # After prepare_peft's checks: a config they refuse is better told by what is wrong with it than by a checksum.
    if unproven is not None:
        if strict:
            raise AdapterFileError(f"{unproven}; lk.load(..., strict=False) loads it anyway, with a warning")
        warnings.warn(f"{unproven}; loaded anyway (strict=False)", stacklevel=3)
    commit()
    return model


def prepare_peft(model: nn.Module, name: str, config: dict, tensors: dict[str, torch.Tensor], config_path: Path,
                 weights_path: Path, *, strict: bool = True) -> Callable[[], None]:
    """Check and build the adapter that a PEFT-form ``config`` and ``tensors`` (keys with PEFT's prefix)
    describe for ``model``, changing nothing; returns what attaches it as ``name``. Errors name
    ``config_path`` / ``weights_path``."""
    directory = weights_path.parent if weights_path.name == WEIGHTS_NAME else weights_path
    _check_config(config, config_path)
    try:
        default = _recipe(config, directory)
        check_finite(default)
    except (KeyError, TypeError, ValueError) as e:  # a field missing, of the wrong type or out of range
        raise AdapterFileError(f"{config_path}: not a valid adapter config ({type(e).__name__}: {e})") from None
    modules = dict(walk(model))
    train_paths = _saved_modules(config, modules)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    trained: dict[str, dict[str, torch.Tensor]] = {}
    base_tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise ShapeMismatchError(f"{weights_path}: key {key!r} lacks the {PREFIX!r} prefix")
        path, suffix = _split(key[len(PREFIX):], modules, train_paths, weights_path)
        if path in train_paths:
            trained.setdefault(path, {})[suffix] = tensor
        elif suffix.startswith("base_layer."):
            # PEFT saves a targeted embedding's full weight too (for resized vocabularies): that is the
            # base the adapter was trained on, and it replaces the model's (for every adapter, as in PEFT).
            base_tensors.setdefault(path, {})[suffix[len("base_layer."):]] = tensor
        else:
            grouped.setdefault(path, {})[suffix] = tensor
    if not grouped:
        raise AdapterFileError(f"{directory}: the adapter holds no adapter tensors")
    missing = [p for p in _targeted(config, modules) if p not in grouped] + [p for p in train_paths if p not in trained]
    if missing:
        listed = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        message = f"{directory}: the file has no tensors for {len(missing)} module(s) its config names: {listed}"
        if strict:
            raise AdapterFileError(f"{message}; the file is incomplete (lk.load(..., strict=False) loads the rest)")
        warnings.warn(f"{message}; they are left as the base (strict=False)", stacklevel=3)

    built = {}
    for path, module_tensors in grouped.items():
        try:
            recipe = _module_recipe(config, default, path, module_tensors)
            check_finite(recipe)
        except ShapeMismatchError:
            raise
        except (TypeError, ValueError) as e:  # an override out of range (ConfigError) or no setting of the method
            raise AdapterFileError(f"{config_path}: {path}: not a valid setting ({type(e).__name__}: {e})") from None
        adapter = recipe.build(spec_of(modules[path]), init=False)
        _check_values(f"{weights_path}: {path}", module_tensors, adapter.export(), strict)
        adapter.load_tensors(module_tensors, where=path)
        built[path] = (recipe, adapter)
    for path, module_tensors in [*trained.items(), *base_tensors.items()]:
        _check_values(f"{weights_path}: {path}", module_tensors, modules[path].state_dict(), strict)
    copies = {path: _trained_copy(modules[path], path, module_tensors) for path, module_tensors in trained.items()}
    base_copies = [(path, pname, param, tensor) for path, module_tensors in base_tensors.items()
                   for pname, param, tensor in _fitting(modules[path], path, module_tensors)]

    def commit() -> None:
        # attach makes the last checks (no merged adapters, train= placement) before it changes anything.
        attach(model, name, built, copies)
        with torch.no_grad():
            for path, pname, param, tensor in base_copies:
                if not torch.equal(param, tensor.to(param)):
                    warnings.warn(f"{directory}: the adapter carries its own {path}.{pname} (PEFT saves targeted "
                                  "embeddings whole); it replaces the model's", stacklevel=3)
                param.copy_(tensor)
    return commit


def _check_values(where: str, tensors: dict[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                  strict: bool) -> None:
    """Refuse a file tensor that the model's floating-point tensor of its name would take silently changed: an
    integer or bool one (cast to float) or one holding NaN or infinities; ``strict=False`` warns instead."""
    for key, tensor in tensors.items():
        target = targets.get(key)
        if target is None or not target.is_floating_point():
            continue  # an unknown key is refused by name later; integer state (support indices) is the method's
        if not tensor.is_floating_point():
            problem = f"is {tensor.dtype}, not a floating-point tensor (the model's {target.dtype} would take it cast)"
        elif not tensor.isfinite().all():
            problem = "holds NaN or infinite values"
        else:
            continue
        if strict:
            raise AdapterFileError(f"{where}.{key}: {problem}; lk.load(..., strict=False) loads it with a warning")
        warnings.warn(f"{where}.{key}: {problem}; loaded anyway (strict=False)", stacklevel=5)  # lk.load's caller


def _fitting(module: nn.Module, path: str, tensors: dict[str, torch.Tensor]) -> list[tuple]:
    """(name, the module's tensor, the file's) for each of ``tensors``, checked to be a state tensor of
    ``module`` of the same shape."""
    own = module.state_dict(keep_vars=True)
    pairs = []
    for key, tensor in tensors.items():
        if key not in own or own[key].shape != tensor.shape:
            raise ShapeMismatchError(f"{path}.{key}: the file has shape {tuple(tensor.shape)}, the model has "
                                     f"{tuple(own[key].shape) if key in own else 'no such tensor'}")
        pairs.append((key, own[key], tensor))
    return pairs


def _trained_copy(module: nn.Module, path: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh copy of the ``train=`` module ``module`` holding the file's ``tensors`` (all of its state)."""
    trained_copy = fresh_copy(module)
    pairs = _fitting(trained_copy, path, tensors)
    missing = sorted(set(trained_copy.state_dict()) - set(tensors))
    if missing:
        raise ShapeMismatchError(f"{path}: the file trains this module but lacks its {missing}")
    with torch.no_grad():
        for _, target, tensor in pairs:
            target.copy_(tensor)
    return trained_copy


def _split(key: str, modules: dict[str, nn.Module], train_paths: list[str], weights: Path) -> tuple[str, str]:
    """Split ``module.path.suffix`` at the ``train=`` module it falls in, else at the deepest adaptable module."""
    parts = key.split(".")
    prefixes = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]  # deepest first
    for i, path in enumerate(prefixes):
        if path in train_paths:
            return path, ".".join(parts[len(parts) - 1 - i:])
    for i, path in enumerate(prefixes):
        if path in modules and kind_of(modules[path]) is not None:
            return path, ".".join(parts[len(parts) - 1 - i:])
    known = next((p for p in prefixes if p in modules), None)
    raise ShapeMismatchError(
        f"{weights}: tensor {key!r} names a module the model does not have"
        + (f" (the model has {known!r}, a {type(modules[known]).__name__})" if known else ""))
