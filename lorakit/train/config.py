"""Typed settings of every ``lorakit`` command: the one source of the CLI flags, help and YAML keys.

Each field's ``help`` metadata is its documentation; ``lorakit <command> --help`` prints it and
``--config file.yaml`` may set any field by name.

The commands that build a method (``finetune``, ``params``) also take the chosen method's own settings,
which are not fields here: they come from its recipe (``lorakit.registry.options``), one flag and YAML key
per recipe field (``option_keys``), and land in the config's ``options`` dict.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit import registry
from lorakit.errors import ConfigError
from lorakit.methods.base import Method, setting_names
from lorakit.serve.threads import parse as parse_threads
from lorakit.train.models import DTYPES


def option(default, help: str, choices: tuple | None = None, *, item: type | None = None,
           positional: bool = False, aliases: tuple[str, ...] = ()):
    """A config field with its help text (and allowed values). A dict default makes a mapping of regex to
    ``item`` values (a YAML mapping, or repeated ``--flag REGEX=VALUE``); ``positional`` makes the flag an
    argument (``lorakit inspect ADAPTER``); ``aliases`` are other flags for it (``--from``, a Python keyword)."""
    metadata = {"help": help, "choices": choices, "item": item, "positional": positional, "aliases": aliases}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def default_of(f: dataclasses.Field):
    """A config field's default value."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def method_settings():
    """The ``options`` field: the chosen method's settings by recipe field name (not a flag itself: each
    setting is one, see ``option_keys``)."""
    return field(default_factory=dict, metadata={"flag": False})


METHOD_HELP = "adaptation method, by its registered name"

# What `lorakit finetune` trains with, unless told otherwise, for any method whose recipe has these settings
# (and whose registered name does not set them itself). The recipes' own defaults (LoRA: rank 8, alpha 16)
# are a library's neutral choice for any model; the command's default job is sized for its default model,
# the 135M-parameter SmolLM2-135M-Instruct, on which rank 16 at scale 2 lifts the built-in date task by
# more than 50 points in 60 steps (tests/test_e2e.py): the job `lorakit finetune` has always run, kept as it was.
FINETUNE_DEFAULTS: dict[str, Any] = {"rank": 16, "alpha": 32.0}


@dataclass
class ModelConfig:
    model: str = option("", "local Hugging Face model directory; empty = the embedded SmolLM2-135M-Instruct")
    device: str = option("auto", "where the model runs: auto (CUDA when available, else the CPU), cpu, cuda, "
                         "cuda:N or mps; under torchrun each process takes cuda:LOCAL_RANK")


@dataclass
class ThreadsConfig:
    threads: str = option("auto", "torch's CPU threads: a count, or auto: torch's own (one per core), or fewer where "
                          "fewer are measured to be faster, as on a CPU that other processes keep busy (measured on "
                          "the steps themselves, and again now and then)")


@dataclass
class DtypeConfig:
    dtype: str = option("auto", "the dtype the base model computes and is held in: auto = bfloat16 where the device "
                        "has bfloat16 units (a CPU reporting avx512_bf16 or amx_bf16; CUDA compute capability 8.0 on), "
                        "float32 elsewhere; adapters, optimizer state, the loss and logits stay float32",
                        DTYPES)


@dataclass
class DataConfig:
    task: str = option("date", "built-in task (date, extract) used when --data is not given", ("date", "extract"))
    data: str = option("", "training data: JSONL (prompt/completion, messages or text) or CSV with those columns")
    eval_data: str = option("", "test data: the final exact-match score is on every record of it; default: a "
                            "--test-fraction share carved off --data, or the built-in task's held-out examples")
    eval_examples: int = option(200, "held-out examples of a built-in task scored by exact match (at least 200 is "
                                "meaningful); a data file is scored whole")
    group_by: str = option("", "record field whose values group the accuracy (a table per group, and a `group` in "
                           "each prediction); default: task, where the records carry one")
    seed: int = option(0, "seed of data generation, shuffling, initialisation and dropout")
    encoding: str = option("utf-8", "text encoding of the data files, e.g. latin-1 or cp1252 (UTF-8's byte-order "
                           "mark is skipped)")


@dataclass
class TrainingDataConfig(DataConfig):
    train_examples: int = option(2000, "training examples generated for a built-in task")
    max_length: int = option(256, "tokens per example; longer ones are cut at the end and counted")
    system_prompt: str = option("", "chat data and the built-in tasks: the system message of every example without "
                                "one of its own: TEXT, or none for no system message at all; empty = the chat "
                                "template's default (SmolLM2's adds a 21-token one). Recorded beside the adapter, so "
                                "eval, generate and serve ask the same way")
    chat_template: str = option("", "chat data and the built-in tasks: a Jinja chat template file (as transformers "
                                "takes it) in place of the tokenizer's own; recorded beside the adapter")
    test_fraction: float = option(0.1, "share of --data held out as test data when --eval-data is not given")
    val_data: str = option("", "validation data for the validation loss (--val-every, --early-stopping, --keep "
                           "best); default: a --val-fraction share of the training records")
    val_fraction: float = option(0.05, "share of the training records held out for validation when --val-data is "
                                 "not given (at least one record; for a built-in task as many more examples are "
                                 "generated); 0 = no validation")


@dataclass
class AdapterConfig:
    method: str = option(registry.DEFAULT, METHOD_HELP)
    targets: str = option("all-linear", "'all-linear', a comma-separated list of module names, or a regex")
    ranks: dict = option({}, "per-module ranks: REGEX=RANK, the first regex found in a module's path wins (a "
                         "`ranks:` mapping in --config; lorakit advise writes one)", item=int)
    alphas: dict = option({}, "per-module alphas: REGEX=ALPHA, as --ranks", item=float)
    quantize: str = option("", "QLoRA: hold the frozen base in nf4 (4-bit NormalFloat, double-quantized), fp4 or "
                           "int8 (bitsandbytes); empty = full precision", ("", "nf4", "fp4", "int8"))
    options: dict = method_settings()


@dataclass
class GenerateConfig:
    max_new_tokens: int = option(32, "tokens generated per answer (greedy)")


@dataclass
class ScoringConfig(GenerateConfig):
    eval_batch_size: int = option(32, "prompts decoded together during evaluation")


@dataclass
class FinetuneConfig(ScoringConfig, AdapterConfig, TrainingDataConfig, ThreadsConfig, DtypeConfig, ModelConfig):
    out: str = option("runs/finetune", "run directory: adapter, checkpoints, metrics.jsonl, loss.png, report.md")
    steps: int = option(60, "optimizer steps")
    batch_size: int = option(8, "examples per optimizer step (global, across processes)")
    grad_accum: int = option(1, "micro-batches per optimizer step (batch_size must divide by it)")
    lr: float = option(2e-3, "peak learning rate (AdamW). 2e-3 is ten times PEFT's usual 2e-4 for the default job: "
                       "a 135M-parameter model, rank 16 at alpha 32, and only 60 steps of 8 examples, in which it "
                       "takes the date task from 3.5% to 99.5% (README); for larger models or longer runs start "
                       "from 1e-4 to 3e-4", aliases=("--learning-rate",))
    lora_plus_ratio: float = option(0.0, "LoRA+: learning rate of B matrices = lr x ratio (0 = off; paper: 16)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(6, "linear warm-up steps before the cosine decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 = off)")
    bf16: bool = option(False, "the same as --dtype bfloat16 (kept for older configs)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    val_every: int = option(20, "steps between validation-loss measurements, and at the last step (0 = off)")
    early_stopping: int = option(0, "stop after this many validations in a row without a lower validation loss "
                                 "(0 = off)")
    keep: str = option("last", "the adapter saved and scored: the last step's, or the best: the step of the lowest "
                       "validation loss", ("last", "best"))
    save_every: int = option(20, "steps between checkpoints (0 = only at the end, and on Ctrl-C or SIGTERM)")
    keep_last: int = option(2, "checkpoints kept")
    resume: str = option("", "'auto' = the newest intact checkpoint in --out (none yet: a fresh run), or a "
                         "checkpoint directory")
    skip_eval_before: bool = option(False, "skip the exact-match evaluation before training")
    strategy: str = option("auto", "parallelism under torchrun: ddp, fsdp, auto (ddp when WORLD_SIZE > 1) "
                           "or none (each process trains alone)",
                           ("auto", "none", "ddp", "fsdp"))

    def check(self) -> None:
        """Raise ConfigError for settings that cannot work together (the method's own settings: ``recipe``)."""
        positive = ("steps", "batch_size", "grad_accum", "max_length", "eval_examples", "train_examples",
                    "max_new_tokens", "eval_batch_size", "keep_last")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be > 0, got {getattr(self, key)}")
        for key in ("warmup_steps", "val_every", "save_every", "max_grad_norm", "weight_decay", "lora_plus_ratio",
                    "early_stopping"):
            if getattr(self, key) < 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 0, got {getattr(self, key)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"--batch-size {self.batch_size} must be divisible by --grad-accum {self.grad_accum}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        self._check_validation()
        parse_threads(self.threads)
        if self.bf16:
            if self.dtype not in ("auto", "bfloat16"):
                raise ConfigError(f"--bf16 is --dtype bfloat16, and --dtype {self.dtype} is given too; keep one")
            self.dtype = "bfloat16"
        if self.chat_template:  # here, before the model loads, as well as where the data's prompt format is made
            from lorakit.train.data import read_chat_template

            read_chat_template(self.chat_template)

    def _check_validation(self) -> None:
        """Raise ConfigError where validation is asked for but off, or would measure the test data."""
        asked = (("--early-stopping", self.early_stopping), ("--keep best", self.keep == "best"))
        uses = [flag for flag, given in asked if given]
        if (uses or self.val_data) and not self.val_every:
            raise ConfigError(f"{' and '.join(uses or ['--val-data'])} needs the validation loss, which --val-every 0 "
                              "turns off")
        if uses and not (self.val_data or self.val_fraction):
            raise ConfigError(f"{' and '.join(uses)} need{'s' if len(uses) == 1 else ''} validation data: --val-data "
                              "FILE, or --val-fraction > 0")
        if self.val_data and self.eval_data and Path(self.val_data).resolve() == Path(self.eval_data).resolve():
            raise ConfigError(f"--val-data and --eval-data are both {self.eval_data}: validation chooses the "
                              "checkpoint and when to stop, so the final score on the same records would not be on "
                              "held-out data; give validation records of their own")

    @classmethod
    def method_defaults(cls, method: str, steps: int | None = None) -> dict[str, Any]:
        """The settings a run of ``steps`` (default: --steps's default) gives ``method`` unless told:
        FINETUNE_DEFAULTS where its recipe has the field, and its recipe's ``training_defaults``."""
        entry = registry.entry(method)
        own = setting_names(entry.recipe) - set(entry.defaults)
        steps = cls.steps if steps is None else steps
        return {**{k: v for k, v in FINETUNE_DEFAULTS.items() if k in own}, **entry.recipe.training_defaults(steps)}

    def recipe(self) -> Method:
        """The recipe this run trains: ``method`` with ``method_defaults`` and the ``options`` given (a ConfigError
        from the recipe names the setting)."""
        return registry.entry(self.method).create(**{**self.method_defaults(self.method, self.steps), **self.options})


@dataclass
class EvalConfig(ScoringConfig, DataConfig, ThreadsConfig, DtypeConfig, ModelConfig):
    data: str = option("", "data file to score: every record of it (JSONL or CSV, as lorakit finetune reads); "
                       "empty = the built-in --task's held-out examples")
    eval_data: str = option("", "the same as --data; given with --data, --eval-data is the file scored")
    adapter: str = option("", "adapter directory to evaluate (empty = the base model)")


@dataclass
class ChatConfig(GenerateConfig, DtypeConfig, ModelConfig):
    adapter: str = option("", "adapter directory to apply (empty = the base model)")
    prompt: str = option("", "one message to answer; empty = an interactive chat on stdin")
    prompt_format: str = option("auto", "how messages are put to the model: auto = as the adapter was trained (its "
                                "lorakit_prompt.json; the chat template where it has none), chat = through the chat "
                                "template, raw = the text as it is", ("auto", "chat", "raw"))


@dataclass
class MergeConfig(ModelConfig):
    adapter: str = option("", "adapter directory to merge into the model (required)")
    dtype: str = option("auto", "the merged model's dtype (the merge itself is computed in float32): auto = the "
                        "dtype the base model directory is stored in (its config.json), float32 where it names none",
                        DTYPES)
    out: str = option("runs/merged", "where the merged Hugging Face model directory is written")
    untie: bool = option(False, "give the modules that share an adapted weight (a tied output head) their own copy "
                         "first, so the merge changes the adapted module only (merging a shared weight is refused)")


@dataclass
class ServeConfig(ThreadsConfig, DtypeConfig, ModelConfig):
    served_model_name: str = option("", "the base model's name in the API (a request's `model` field); default: "
                                    "its directory's name (smollm2-135m-instruct for the embedded model)")
    adapter: tuple = option((), "NAME=DIR: serve the adapter in DIR as model NAME (repeat for more); default: "
                            "every adapter under --adapters-dir (runs/*/adapter)")
    adapters_dir: str = option("runs", "directory of adapters: each DIR/NAME/adapter (as lorakit finetune writes "
                               "them) or DIR/NAME is served as NAME unless --adapter is given; run-time loads come "
                               "from under it only")
    host: str = option("127.0.0.1", "address to bind (0.0.0.0 exposes the server to the network)")
    port: int = option(8000, "TCP port")
    api_key: str = option("", "require 'Authorization: Bearer KEY' on every endpoint but /health and the page; "
                          "default: $LORAKIT_API_KEY, else none")
    max_batch: int = option(64, "requests decoded together in one forward (the running batch)")
    max_loaded_adapters: int = option(16, "adapters kept on the model; the least recently used idle one is "
                                      "unloaded for another and attached again on demand from host memory (each "
                                      "adapter's files are read once)")
    max_queue: int = option(256, "requests waiting for a place in the batch; more are answered 429 (a request of "
                            "more sequences than this, 400)")
    max_body_bytes: int = option(4 * 2 ** 20, "largest request body taken, in bytes; a larger one is answered 413 "
                                 "before it is read")
    allow_runtime_adapters: bool = option(False, "allow POST /v1/adapters and DELETE /v1/adapters/NAME (loads "
                                          "from under --adapters-dir only)")


@dataclass
class SpectrumConfig(ModelConfig):
    targets: str = option("all-linear", "the weights to decompose: 'all-linear', module names, or a regex")
    out: str = option("runs/spectrum", "directory for spectrum.json, spectrum.md, spectra.png and heatmap.png")
    rank: int = option(0, "with --niter: the top singular values to find (0 = exact, all of them)")
    niter: int = option(0, "randomized SVD with this many power iterations (0 = exact)")
    heatmap: str = option("effective_rank", "the measure heatmap.png shows per layer and module type",
                          ("effective_rank", "stable_rank", "energy_rank_90", "share_0.1_1.1", "share_top_decade",
                           "sigma_max"))

    def check(self) -> None:
        """Raise ConfigError for a randomized SVD without its rank, or negative counts."""
        if self.rank < 0 or self.niter < 0:
            raise ConfigError("--rank and --niter must be >= 0")
        if bool(self.rank) != bool(self.niter):
            raise ConfigError("randomized SVD takes both --rank (values to find) and --niter (power iterations); "
                              "neither gives the exact spectrum")


@dataclass
class InspectConfig(ModelConfig):
    adapter: str = option("", "adapter directory to inspect", positional=True)
    out: str = option("runs/inspect", "directory for inspect.json, inspect.md, spectra.png and heatmap.png")
    intruder_k: int = option(10, "intruder dimensions: how many top singular vectors of W + ΔW are checked")
    intruder_eps: float = option(0.5, "intruder dimensions: a vector whose largest |cosine| with W's singular "
                                 "vectors is below this is one")


@dataclass
class ResizeConfig(ModelConfig):
    adapter: str = option("", "adapter directory to resize", positional=True)
    rank: int = option(0, "the rank of every module's update (one of --rank and --energy)")
    energy: float = option(0.0, "per module, the smallest rank keeping this share of ‖ΔW‖²_F, e.g. 0.9")
    out: str = option("", "where the resized adapter (PEFT format) is written (required)")


@dataclass
class AdviseConfig(ModelConfig):
    budget: int = option(0, "trainable LoRA parameters to allocate (required)")
    from_adapter: str = option("", "a trained (higher-rank) adapter whose update's energy decides the ranks",
                               aliases=("--from",))
    probe_steps: int = option(0, "instead of --from-adapter: a probe run of this many AdaLoRA steps on the task, "
                              "whose sensitivity scores decide the ranks")
    probe_rank: int = option(32, "the probe's rank per module: the most any module can be given")
    task: str = option("date", "built-in task of the probe run", ("date", "extract"))
    targets: str = option("all-linear", "the probe's modules")
    out: str = option("runs/advise/ranks.yaml", "the YAML written: targets, ranks and alphas for "
                      "lorakit finetune --config")


@dataclass
class ConvertConfig:
    source: str = option("", "the adapter: a PEFT / lorakit directory, or a kohya or diffusers .safetensors file",
                         positional=True)
    target: str = option("", "where it is written: a directory (--to peft), a .safetensors file (kohya, diffusers)",
                         positional=True)
    to: str = option("peft", "the format written", ("peft", "kohya", "diffusers"))
    model: str = option("", "the model the adapter belongs to (module names are resolved on it): a Hugging Face "
                        "model directory, a diffusers pipeline or model directory; empty = the embedded "
                        "SmolLM2-135M-Instruct")


@dataclass
class ExportConfig(ModelConfig):
    adapter: str = option("", "the adapter to export: a directory, or a kohya / diffusers file", positional=True)
    format: str = option("gguf", "gguf: a llama.cpp LoRA adapter file; merged-gguf: the model with the adapter "
                         "merged in, as a GGUF model", ("gguf", "merged-gguf"))
    out: str = option("", "the GGUF file written (required)")
    base_gguf: str = option("", "merged-gguf: the base model's GGUF file, whose metadata and untouched tensors are "
                            "kept; default: the embedded model's own")
    outtype: str = option("", "tensor type of what is written: f32 or f16 (default: f32 for gguf, f16 for "
                          "merged-gguf)", ("", "f32", "f16"))


@dataclass
class ParamsConfig:
    shape: str = option("4096x4096", "weight shape d_out x d_in, e.g. 8192x8192 (comma-separate several)")
    model: str = option("", "count on a model's targeted layers instead of --shape: a Hugging Face model "
                        "directory, or 'default' (the embedded SmolLM2-135M-Instruct); weights are not loaded")
    targets: str = option("all-linear", "with --model: the layers adapted")
    method: str = option(registry.DEFAULT, METHOD_HELP)
    count: int = option(1, "how many matrices of that shape")
    options: dict = method_settings()

    def check(self) -> None:
        """Raise ConfigError for values that count nothing (the method's own settings: ``recipe``)."""
        if self.count <= 0:
            raise ConfigError(f"--count must be > 0, got {self.count}")

    @classmethod
    def method_defaults(cls, method: str) -> dict[str, Any]:
        """The settings counted unless given: a training schedule's (AdaLoRA's length), as a default
        ``lorakit finetune`` run's; the count does not depend on them."""
        return registry.entry(method).recipe.training_defaults(FinetuneConfig.steps)

    def recipe(self) -> Method:
        """The recipe counted: ``method`` with the ``options`` given (a ConfigError from it names the setting)."""
        return registry.entry(self.method).create(**{**self.method_defaults(self.method), **self.options})


def fields(config_cls) -> list[dataclasses.Field]:
    """The fields of ``config_cls`` that are flags (and YAML keys) by their own name."""
    return [f for f in dataclasses.fields(config_cls) if f.metadata.get("flag", True)]


def takes_method(config_cls) -> bool:
    """Whether a command's config builds a method, and so takes that method's settings."""
    return any(f.name == "options" for f in dataclasses.fields(config_cls))


def command_settings() -> set[str]:
    """Every name a command's flag or YAML key already has (and argparse's own): a method setting of one of
    these names is spelled ``<method>_<name>`` instead."""
    configs = (FinetuneConfig, EvalConfig, ChatConfig, MergeConfig, ServeConfig, ParamsConfig)
    return {f.name for c in configs for f in dataclasses.fields(c)} | {"config", "help", "command"}


def option_keys(method: str) -> dict[str, registry.Option]:
    """{YAML key (the flag: ``--`` and dashes): setting} of ``method``'s settings: each recipe field's name, or
    ``<method>_<field>`` where a command already has that name (SVFT's seed is ``svft_seed``, beside ``seed``)."""
    taken = command_settings()
    return {(f"{method}_{o.name}" if o.name in taken else o.name): o for o in registry.options(method)}


def flag_of(method: str, name: str) -> str:
    """The flag of ``method``'s setting ``name``: ``--rank``, ``--svft-seed``."""
    return "--" + next(key for key, o in option_keys(method).items() if o.name == name).replace("_", "-")


def from_dict(config_cls, values: dict, where: str):
    """A config from a dict (YAML, or YAML and flags), each value coerced to its field's type and checked
    against the field's choices; an unknown key, or a value that is not of its kind, is a ConfigError naming
    it and ``where``. For a command that builds a method the chosen method's settings are keys too (its
    ``option_keys``), as is ``options``, a mapping of them by field name; the keys win over the mapping."""
    values = dict(values)
    known = {f.name: f for f in fields(config_cls)}
    settings: dict[str, Any] = {}
    keys: dict[str, registry.Option] = {}
    if takes_method(config_cls):
        method = _coerced(known["method"], values.pop("method", known["method"].default), where)
        try:
            keys = option_keys(method)
        except ConfigError as e:
            raise ConfigError(f"{where}: method: {e}") from None
        settings["method"] = method
        settings["options"] = {**_option_mapping(values.pop("options", None) or {}, keys, method, where),
                               **{keys[k].name: _coerced_option(k, keys[k], values.pop(k), where)
                                  for k in [k for k in values if k in keys]}}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}"
                          + (f" and {settings['method']}'s settings {sorted(keys)}" if keys else "")
                          + _elsewhere(unknown, settings.get("method")))
    settings.update({key: _coerced(known[key], value, where) for key, value in values.items()})
    return config_cls(**settings)


def _option_mapping(given, keys: dict[str, registry.Option], method: str, where: str) -> dict[str, Any]:
    """``options:`` (a mapping of setting name: value, as a saved config holds them), coerced."""
    if not isinstance(given, dict):
        raise ConfigError(f"{where}: options: expected a mapping of setting: value, got {given!r}")
    by_name = {o.name: o for o in keys.values()}
    out = {}
    for name, value in given.items():
        name = str(name).replace("-", "_")
        if name not in by_name:
            raise ConfigError(f"{where}: options: method {method!r} has no setting {name!r}; it has "
                              f"{', '.join(by_name) or 'none'}")
        out[name] = _coerced_option(f"options.{name}", by_name[name], value, where)
    return out


def _elsewhere(unknown: list[str], method: str | None) -> str:
    """A hint for unknown keys that are settings of other registered methods than ``method``."""
    if method is None:
        return ""
    owners = {key: [m for m in registry.names() if m != method and key in option_keys(m)] for key in unknown}
    said = [f"{key} is a setting of {', '.join(found)}" for key, found in owners.items() if found]
    return f" ({'; '.join(said)}: --method chooses the method)" if said else ""


_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "text", tuple: "a list of text",
          dict: "a mapping of regex: value (REGEX=VALUE on the command line)"}


def _coerced(f: dataclasses.Field, value, where: str):
    """``value`` as field ``f``'s type: PyYAML reads ``1e-3`` as a string (its floats need a dot)."""
    kind = type(default_of(f))
    try:
        out = as_mapping(value, f.metadata["item"]) if kind is dict else as_kind(kind, value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {f.name}: expected {_KINDS[kind]}, got {value!r}") from None
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        raise ConfigError(f"{where}: {f.name}: {out!r} is not one of {', '.join(map(repr, choices))}")
    return out


def _coerced_option(key: str, o: registry.Option, value, where: str):
    """``value`` as method setting ``o`` (given as ``key``): its type, one of its choices, or None (``none``) where
    the setting allows it."""
    if o.optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    try:
        out = as_kind(o.type, value)
    except (TypeError, ValueError):
        unset = " or none" if o.optional else ""
        raise ConfigError(f"{where}: {key}: expected {_KINDS[o.type]}{unset}, got {value!r}") from None
    if o.choices and out not in o.choices:
        raise ConfigError(f"{where}: {key}: {out!r} is not one of {', '.join(map(repr, o.choices))}")
    return out


def as_kind(kind: type, value):
    """``value`` as a ``kind`` (bool, int, float, str, or tuple of str); TypeError or ValueError when it is not one."""
    if kind is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise TypeError
        return tuple(as_kind(str, item) for item in items)
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


def as_mapping(value, item: type) -> dict[str, Any]:
    """``value`` (a mapping, or ``REGEX=VALUE`` texts: the value after the last '=') as {regex: ``item``}."""
    if isinstance(value, dict):
        pairs = list(value.items())
    else:
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) and "=" in t for t in texts):
            raise TypeError
        pairs = [t.rsplit("=", 1) for t in texts]
    return {as_kind(str, k): as_kind(item, v) for k, v in pairs}


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
