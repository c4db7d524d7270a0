"""Typed settings of every ``lorakit`` command: the one source of the CLI flags, help and YAML keys.

Each field's ``help`` metadata is its documentation; ``lorakit <command> --help`` prints it and
``--config file.yaml`` may set any field by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import ConfigError


def option(default, help: str, choices: tuple | None = None):
    """A config field with its help text (and allowed values)."""
    return field(default=default, metadata={"help": help, "choices": choices})


METHOD_NAMES = ("lora", "rslora", "dora", "pissa", "milora", "lora_xs", "svf", "svft", "adalora")


@dataclass
class ModelConfig:
    model: str = option("", "local Hugging Face model directory; empty = the embedded SmolLM2-135M-Instruct")
    device: str = option("auto", "where the model runs: auto (CUDA when available, else the CPU), cpu, cuda, "
                         "cuda:N or mps; under torchrun each process takes cuda:LOCAL_RANK")


@dataclass
class DataConfig:
    task: str = option("date", "built-in task (date, extract) used when --data is not given", ("date", "extract"))
    data: str = option("", "training data: JSONL (prompt/completion, messages or text) or CSV with those columns")
    eval_data: str = option("", "held-out data for exact-match evaluation; default: carved off --data")
    val_fraction: float = option(0.1, "share of --data held out when --eval-data is not given")
    eval_examples: int = option(200, "held-out examples for exact-match evaluation (at least 200 is meaningful)")
    seed: int = option(0, "seed of data generation, shuffling, initialisation and dropout")


@dataclass
class TrainingDataConfig(DataConfig):
    train_examples: int = option(2000, "training examples generated for a built-in task")
    max_length: int = option(256, "tokens per example; longer ones are cut at the end and counted")


@dataclass
class AdapterConfig:
    method: str = option("lora", "adaptation method", METHOD_NAMES)
    rank: int = option(16, "rank r (init rank for adalora)")
    alpha: float = option(32.0, "scale numerator alpha (scale = alpha/r; alpha/sqrt(r) for rslora)")
    dropout: float = option(0.0, "dropout on the adapter input")
    targets: str = option("all-linear", "'all-linear', a comma-separated list of module names, or a regex")
    svft_pattern: str = option("plain", "svft: support of M", ("plain", "banded", "random", "top_k"))
    svft_width: int = option(0, "svft: off-diagonals of the banded/random/top_k pattern")
    target_rank: int = option(8, "adalora: average rank after pruning")
    quantize: str = option("", "QLoRA: hold the frozen base in nf4 (4-bit NormalFloat, double-quantized), fp4 or "
                           "int8 (bitsandbytes); empty = full precision", ("", "nf4", "fp4", "int8"))


@dataclass
class GenerateConfig:
    max_new_tokens: int = option(32, "tokens generated per answer (greedy)")


@dataclass
class ScoringConfig(GenerateConfig):
    eval_batch_size: int = option(32, "prompts decoded together during evaluation")


@dataclass
class FinetuneConfig(ScoringConfig, AdapterConfig, TrainingDataConfig, ModelConfig):
    out: str = option("runs/finetune", "run directory: adapter, checkpoints, metrics.jsonl, loss.png, report.md")
    steps: int = option(60, "optimizer steps")
    batch_size: int = option(8, "examples per optimizer step (global, across processes)")
    grad_accum: int = option(1, "micro-batches per optimizer step (batch_size must divide by it)")
    lr: float = option(2e-3, "peak learning rate (AdamW)")
    lora_plus_ratio: float = option(0.0, "LoRA+: learning rate of B matrices = lr x ratio (0 = off; paper: 16)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(6, "linear warm-up steps before the cosine decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 = off)")
    bf16: bool = option(False, "bfloat16 autocast for the forward pass")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    val_every: int = option(20, "steps between validation-loss measurements (0 = off)")
    save_every: int = option(20, "steps between checkpoints (0 = only at the end and on Ctrl-C)")
    keep_last: int = option(2, "checkpoints kept")
    resume: str = option("", "'auto' = latest checkpoint in --out, or a checkpoint directory")
    skip_eval_before: bool = option(False, "skip the exact-match evaluation before training")
    strategy: str = option("auto", "parallelism under torchrun: ddp, fsdp, auto (ddp when WORLD_SIZE > 1) "
                           "or none (each process trains alone)",
                           ("auto", "none", "ddp", "fsdp"))

    def check(self) -> None:
        """Raise ConfigError for settings that cannot work together."""
        positive = ("steps", "batch_size", "grad_accum", "rank", "max_length", "eval_examples", "train_examples",
                    "max_new_tokens", "eval_batch_size", "keep_last")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be > 0, got {getattr(self, key)}")
        for key in ("warmup_steps", "val_every", "save_every", "max_grad_norm", "weight_decay", "lora_plus_ratio"):
            if getattr(self, key) < 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 0, got {getattr(self, key)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"--batch-size {self.batch_size} must be divisible by --grad-accum {self.grad_accum}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class EvalConfig(ScoringConfig, DataConfig, ModelConfig):
    adapter: str = option("", "adapter directory to evaluate (empty = the base model)")


@dataclass
class ChatConfig(GenerateConfig, ModelConfig):
    adapter: str = option("", "adapter directory to apply (empty = the base model)")
    prompt: str = option("", "one message to answer; empty = an interactive chat on stdin")


@dataclass
class MergeConfig(ModelConfig):
    adapter: str = option("", "adapter directory to merge into the model (required)")
    out: str = option("runs/merged", "where the merged Hugging Face model directory is written")
    untie: bool = option(False, "give the modules that share an adapted weight (a tied output head) their own copy "
                         "first, so the merge changes the adapted module only (merging a shared weight is refused)")


@dataclass
class ParamsConfig:
    shape: str = option("4096x4096", "weight shape d_out x d_in, e.g. 8192x8192 (comma-separate several)")
    rank: int = option(8, "rank r")
    method: str = option("lora", "method", METHOD_NAMES)
    count: int = option(1, "how many matrices of that shape")

    def check(self) -> None:
        """Raise ConfigError for values that count nothing."""
        for key in ("rank", "count"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"--{key} must be > 0, got {getattr(self, key)}")


def fields(config_cls) -> list[dataclasses.Field]:
    return list(dataclasses.fields(config_cls))


def from_dict(config_cls, values: dict, where: str):
    """A config from a dict (YAML), each value coerced to its field's type and checked against the field's
    choices; an unknown key, or a value that is not of its kind, is a ConfigError naming it and ``where``."""
    known = {f.name: f for f in fields(config_cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
    return config_cls(**{key: _coerced(known[key], value, where) for key, value in values.items()})


_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def _coerced(f: dataclasses.Field, value, where: str):
    """``value`` as field ``f``'s type: PyYAML reads ``1e-3`` as a string (its floats need a dot)."""
    kind = type(f.default)
    try:
        out = _as(kind, value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {f.name}: expected {_KINDS[kind]}, got {value!r}") from None
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        raise ConfigError(f"{where}: {f.name}: {out!r} is not one of {', '.join(map(repr, choices))}")
    return out


def _as(kind: type, value):
    """``value`` as a ``kind`` (bool, int, float or str); TypeError or ValueError when it is not one."""
    if kind is bool:
        if isinstance(value, str) and value.lower() in _BOOLS:
            return _BOOLS[value.lower()]
        if not isinstance(value, bool):
            raise TypeError
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):  # True is an int to Python
        raise TypeError
    if kind is str:
        return str(value)  # a bare 2024 or 1.5 in YAML is a number; the setting means its text
    if kind is float:
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)
    number = float(value)  # "1e3", 2.0
    if not number.is_integer():
        raise ValueError
    return int(number)


def load_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file."""
    import yaml

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the config ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file holds a mapping of setting: value")
    return {k.replace("-", "_"): v for k, v in values.items()}
