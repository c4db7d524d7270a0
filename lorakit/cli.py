"""The ``lorakit`` command: ``finetune | eval | generate | merge | serve | spectrum | inspect | resize | advise |
params``.

Every flag comes from a typed config dataclass (``lorakit/train/config.py``): its field name, type,
default and help. ``--config file.yaml`` sets any of them; flags given on the command line win.

The commands that build a method (``finetune``, ``params``) parse in two phases: first the method
(``--method``, else ``method:`` in the ``--config`` YAML, else the default), then its settings, one flag
per field of its recipe (``lorakit.registry.options``: type, choices, default, attribute docstring).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Callable, Sequence

from lorakit import registry
from lorakit.errors import LorakitError
from lorakit.methods.base import setting_names
from lorakit.train import config as cfg

TRAIN_PACKAGES = [("transformers", "transformers>=4.45"), ("gguf", "gguf>=0.10"), ("yaml", "pyyaml"),
                  ("matplotlib", "matplotlib")]
SERVE_PACKAGES = [("fastapi", "fastapi>=0.110"), ("uvicorn", "uvicorn>=0.29"),
                  ("prometheus_client", "prometheus-client>=0.20")]


def _add_fields(parser: argparse.ArgumentParser, config_cls) -> None:
    for f in cfg.fields(config_cls):
        default = cfg.default_of(f)
        flags = ("--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ()))
        # argparse reads help as a %-format; a field's help is plain text ("3.5% to 100%")
        help_text = f"{f.metadata.get('help', '').replace('%', '%%')} (default: {default!r})"
        if f.name == "method":
            help_text = f"{f.metadata['help']}: {', '.join(registry.names())} (default: {default!r})"
        if f.metadata.get("positional"):
            parser.add_argument(f.name, help=f.metadata["help"], metavar=f.name.upper())
        elif isinstance(default, bool):
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif isinstance(default, (tuple, dict)):
            parser.add_argument(*flags, dest=f.name, action="append", default=argparse.SUPPRESS, help=help_text,
                                metavar="REGEX=VALUE" if isinstance(default, dict) else f.name.upper())
        else:
            choices = f.metadata.get("choices")  # shown as the metavar, {a,b,c}, so --help lists them
            parser.add_argument(*flags, dest=f.name, type=type(default), choices=choices, default=argparse.SUPPRESS,
                                help=help_text, metavar=None if choices else f.name.upper())
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE.yaml",
                        help="YAML file of settings (flag names, with - or _); flags given here win")


def _add_method_options(parser: argparse.ArgumentParser, command: str, config_cls, method: str) -> None:
    """One flag per setting of ``method`` (``cfg.option_keys``), in a group of their own."""
    entry = registry.entry(method)
    group = parser.add_argument_group(f"{method} options (lorakit {command} --method M --help shows M's)",
                                      f"{entry.recipe.__name__}: {entry.summary}")
    defaults = config_cls.method_defaults(method)
    scheduled = set(entry.recipe.training_defaults(cfg.FinetuneConfig.steps))
    for key, o in cfg.option_keys(method).items():
        default = defaults.get(o.name, o.default)
        shown = "none" if default is None else repr(default)
        if o.name in scheduled:
            steps = cfg.FinetuneConfig.steps
            shown = (f"set from --steps; {shown} at its default {steps}" if config_cls is cfg.FinetuneConfig
                     else f"{shown}, as for a {steps}-step run")
        help_text = f"{o.help}{'; none unsets it' if o.optional else ''} (default: {shown})"
        flag = "--" + key.replace("_", "-")
        if o.type is bool:
            group.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
            continue
        choices = None if o.choices is None else (*o.choices, *((None,) if o.optional else ()))
        metavar = key.upper() + ("|none" if o.optional else "")
        if o.choices:
            metavar = "{" + ",".join(map(str, o.choices)) + (",none" if o.optional else "") + "}"
        group.add_argument(flag, dest=key, type=_flag_type(o), choices=choices, default=argparse.SUPPRESS,
                           help=help_text, metavar=metavar)


def _flag_type(o: registry.Option) -> Callable[[str], object]:
    """The argparse type of setting ``o``: its type, the YAML config's reading of it, and ``none`` as None
    where the setting allows it."""
    def read(text: str):
        if o.optional and text.lower() == "none":
            return None
        return cfg.as_kind(o.type, text)

    read.__name__ = o.type.__name__  # argparse's "invalid int value: 'x'"
    return read


def chosen_method(config_cls, args: Sequence[str]) -> str:
    """The method a command line picks: ``--method``, else ``method:`` in its ``--config`` YAML, else the
    default; a ConfigError listing the registered ones when it names none."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--method")
    pre.add_argument("--config")
    given, _ = pre.parse_known_args(list(args))
    method, where = given.method, "--method"
    if method is None and given.config is not None:
        method, where = cfg.load_yaml(given.config).get("method"), given.config
    if method is None:
        return next(f for f in cfg.fields(config_cls) if f.name == "method").default
    try:
        return registry.entry(str(method)).name
    except cfg.ConfigError as e:
        raise cfg.ConfigError(f"{where}: {e}") from None


def build_config(config_cls, args: argparse.Namespace):
    """Defaults < ``--config`` YAML < flags."""
    given = dict(vars(args))
    given.pop("command", None)
    values = cfg.load_yaml(given.pop("config")) if "config" in given else {}
    where = getattr(args, "config", "flags")
    return cfg.from_dict(config_cls, {**values, **given}, where)


def _ensure_packages(packages) -> None:
    from lorakit.train.models import ensure_package

    for module, requirement in packages:
        ensure_package(module, requirement, log=lambda m: print(m, file=sys.stderr))


def cmd_finetune(config: cfg.FinetuneConfig) -> int:
    from lorakit.train.trainer import Terminated, finetune

    try:
        s = finetune(config, log=lambda m: print(m, flush=True))
    except Terminated:  # checkpoint saved; a Ctrl-C goes on to main, 130
        return 143  # 128 + SIGTERM: what a shell reports of a process that signal ended
    if s.get("diverged"):
        print(f"warning: {s['diverged']}")  # said at the step too, but long scrolled away by the end
    if s.get("accuracy_after") is None:
        return 0
    before = "n/a" if s["accuracy_before"] is None else f"{s['accuracy_before']:.1f}%"
    print(f"report: {config.out}/report.md  adapter: {s['adapter']}")
    print(f"accuracy: {before} -> {s['accuracy_after']:.1f}% ({s['test']})")
    return 0


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _model_with_adapter(config, tokenizer: bool = True):
    """(model on --device in eval mode, tokenizer, prompt format) with --adapter loaded if given; the prompt
    format is the one the adapter was trained on, None where unknown (no adapter, or one trained elsewhere).
    Without ``tokenizer`` (weight analysis) the tokenizer is None, and a model directory needs none. The model is
    in the ``--dtype`` of a command that computes with it (``_compute_dtype``), float32 for the others."""
    import lorakit as lk
    from lorakit.train import data, models

    device = models.resolve_device(config.device)
    dtype = _compute_dtype(config, device) if isinstance(config, (cfg.EvalConfig, cfg.ChatConfig)) else None
    if tokenizer:
        model, tokenizer = models.load(config.model, dtype=dtype, log=_say, device=device)
    else:
        model, tokenizer = models.load_weights(config.model, dtype=dtype, log=_say, device=device), None
    if not config.adapter:
        return model, tokenizer, None
    lk.load(model, config.adapter)
    return model.eval(), tokenizer, data.read_prompt_format(config.adapter)


def _compute_dtype(config, device):
    """The dtype ``config.dtype`` resolves to on ``device``, said on stderr with the reason."""
    from lorakit.train import models

    dtype, why = models.resolve_dtype(config.dtype, device)
    _say(f"lorakit: computing in {models.dtype_name(dtype)} ({why})")
    return dtype


def cmd_eval(config: cfg.EvalConfig) -> int:
    from lorakit.train.trainer import accuracy, eval_records, evaluation_pairs, group_table, per_group, scored_source

    if config.data and config.eval_data and Path(config.data).resolve() != Path(config.eval_data).resolve():
        _say(f"lorakit eval: scoring --eval-data {config.eval_data}; --data {config.data} is not scored")
    records, source = eval_records(config)  # before the model loads: a bad file fails fast
    model, tokenizer, prompt_format = _model_with_adapter(config)
    evaluation, groups = evaluation_pairs(records, prompt_format, config.group_by)
    if not evaluation:
        raise cfg.ConfigError(f"{source}: nothing to score: text records have no answer to match (exact match takes "
                              "prompt/completion or messages records)")
    score, rows = accuracy(model, tokenizer, evaluation, config, groups)
    if groups:
        print(group_table(per_group(rows), config.group_by or "task"))
    print(f"accuracy: {score:.1f}% ({scored_source(source, len(records), len(evaluation))})")
    return 0


def cmd_generate(config: cfg.ChatConfig) -> int:
    from lorakit.train.data import in_format
    from lorakit.train.trainer import generate

    model, tokenizer, recorded = _model_with_adapter(config)
    prompt_format = _asked_format(config, recorded)

    def answer(prompt) -> str:
        text = generate(model, tokenizer, [in_format(prompt, prompt_format)], config.max_new_tokens, 1)[0]
        if not text.strip():
            _say("lorakit generate: the answer is empty (the model ended at once); an adapter asked in another "
                 "prompt format than it was trained on often does that: see --prompt-format")
        return text

    if config.prompt:
        _check_markup(config.prompt, tokenizer, prompt_format, recorded)
        print(answer(config.prompt))
        return 0
    raw = prompt_format == "raw"
    history: list[dict] = []
    print("chat with the model (empty line or Ctrl-D to quit)"
          + ("; the adapter was trained on raw prompts, so each line is answered on its own" if raw else ""),
          file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        _check_markup(line, tokenizer, prompt_format, recorded)
        if raw:
            print(answer(line.rstrip("\n")), flush=True)
            continue
        history.append({"role": "user", "content": line.strip()})
        history.append({"role": "assistant", "content": answer(history)})
        print(history[-1]["content"], flush=True)
    return 0


def _asked_format(config: cfg.ChatConfig, recorded):
    """The prompt format ``lorakit generate`` asks in: --prompt-format, else the one the adapter records
    (``recorded``), else chat; said on stderr where it is not the adapter's own, or the adapter records none."""
    from lorakit.train.data import PROMPT_FILE, PromptFormat, format_mismatch

    if config.prompt_format == "auto":
        if config.adapter and recorded is None:
            _say(f"lorakit generate: {config.adapter} records no prompt format ({PROMPT_FILE}), so it is asked through "
                 "the chat template; --prompt-format raw asks with the text as it is")
        return recorded or PromptFormat("chat")
    if warning := format_mismatch(config.prompt_format, recorded):
        _say(f"lorakit generate: warning: {warning}; --prompt-format auto asks as it was trained")
    return recorded if recorded == config.prompt_format else PromptFormat(config.prompt_format)


def _check_markup(text: str, tokenizer, prompt_format: str, recorded) -> None:
    """Warn on stderr where ``text`` holds chat-template markup: a prompt rendered already, which the chat template
    would wrap again, or which an adapter trained on raw prompts never saw."""
    from lorakit.train.data import format_mismatch, markup_in

    token = markup_in(text, tokenizer)
    if token is None:
        return
    if prompt_format == "chat":
        _say(f"lorakit generate: warning: the prompt holds chat-template markup ({token}) and goes through the chat "
             "template again; give the message alone, or --prompt-format raw to send the text as it is")
    elif warning := format_mismatch("chat", recorded):
        _say(f"lorakit generate: warning: the prompt holds chat-template markup ({token}): {warning}")


def cmd_merge(config: cfg.MergeConfig) -> int:
    import torch

    import lorakit as lk
    from lorakit.train import models

    if not config.adapter:
        raise cfg.ConfigError("lorakit merge needs --adapter DIR")
    model, tokenizer, _ = _model_with_adapter(config)
    if config.untie:
        for name in models.untie(model):
            print(f"--untie: {name} now holds its own copy of the base weight (the merge leaves it as it was)",
                  file=sys.stderr)
    elif shared := models.sharing_adapted_weights(model):
        raise cfg.ConfigError(f"{', '.join(shared)} shares a weight the adapter changes (a tied output head), which "
                              "merging would change too; --untie gives it its own copy first, so the merged model "
                              "computes what the adapted one does")
    lk.unload(model, merge=True)  # in float32, the dtype the model loaded in
    dtype = models.stored_dtype(config.model) if config.dtype == "auto" else getattr(torch, config.dtype)
    model.to(dtype).save_pretrained(config.out)
    tokenizer.save_pretrained(config.out)
    print(f"merged model written to {config.out} (a plain Hugging Face model directory, "
          f"{models.dtype_name(dtype)})")
    return 0


def cmd_serve(config: cfg.ServeConfig) -> int:
    import os

    import uvicorn

    from lorakit.serve.app import Server, discover
    from lorakit.serve.threads import threads_for
    from lorakit.train import models

    pairs = {}
    for given in config.adapter:
        name, sep, directory = given.partition("=")
        if not (sep and name and directory):
            raise cfg.ConfigError(f"--adapter {given!r}: expected NAME=DIR")
        if name in pairs:
            raise cfg.ConfigError(f"--adapter: the name {name!r} is given twice")
        pairs[name] = directory
    device = models.resolve_device(config.device)
    threads = threads_for(config.threads, device)  # a bad --threads is refused before the model loads
    dtype = _compute_dtype(config, device)
    model, tokenizer = models.load(config.model, dtype=dtype, log=_say, device=device)
    base = config.served_model_name or (Path(config.model).resolve().name if config.model else models.DEFAULT_MODEL)
    server = Server(model, tokenizer, base, pairs, api_key=config.api_key or os.environ.get("LORAKIT_API_KEY"),
                    adapters_dir=config.adapters_dir, allow_runtime_adapters=config.allow_runtime_adapters,
                    max_batch=config.max_batch, max_loaded_adapters=config.max_loaded_adapters,
                    max_queue=config.max_queue, max_body_bytes=config.max_body_bytes, threads=threads)
    if not pairs:  # found, not asked for: one that does not fit this model (another model's run) is skipped
        for name, directory in discover(config.adapters_dir).items():
            try:
                server.add(name, directory)
            except LorakitError as e:
                _say(f"lorakit serve: skipping {directory}: {e}")
    shown = "localhost" if config.host in ("127.0.0.1", "::1") else config.host
    print(f"lorakit serve: http://{shown}:{config.port} (playground at /, OpenAI API at /v1)\n"
          f"  model {base!r}; adapters: {', '.join(server.served()) or 'none'}"
          + ("; API key required" if server.api_key else ""), flush=True)
    uvicorn.run(server.app, host=config.host, port=config.port, log_level="warning")
    return 0


def cmd_params(config: cfg.ParamsConfig) -> int:
    from collections import Counter

    from lorakit.analysis import parse_shape, trainable_numel, training_memory_bytes

    config.check()
    recipe = config.recipe()
    rank = recipe.rank if "rank" in setting_names(recipe) else None
    if config.model:
        shapes, frozen = _model_shapes(config)
        where = f"{config.model} ({config.targets})"
    else:
        shapes = Counter({parse_shape(text.strip()): config.count for text in config.shape.split(",")})
        frozen, where = None, None
    total_trainable = total_full = 0
    for (d_out, d_in), count in shapes.items():
        most = min(d_out, d_in)
        if rank is not None and rank > most:
            raise cfg.ConfigError(f"{cfg.flag_of(config.method, 'rank')} {rank} is more than min(d_out, d_in) = "
                                  f"{most} of {d_out}x{d_in}: an update of that shape has rank at most {most}")
        trainable = trainable_numel(recipe, d_out, d_in) * count
        full = d_out * d_in * count
        total_trainable, total_full = total_trainable + trainable, total_full + full
        print(f"{d_out}x{d_in} x{count}: {recipe!r} trains {trainable:,} "
              f"vs {full:,} for full fine-tuning ({100 * trainable / full:.4f}%)")
    mib = 2 ** 20
    frozen = total_full if frozen is None else frozen
    print(f"total: {total_trainable:,} trainable vs {total_full:,} full"
          + (f" (of the adapted weights); the model {where} has {frozen:,} parameters "
             f"({100 * total_trainable / frozen:.4f}% trained)" if where else ""))
    print(f"training memory (fp32 weights + grads + AdamW states, no activations): "
          f"{config.method} {training_memory_bytes(total_trainable, frozen) / mib:,.1f} MiB vs full "
          f"{training_memory_bytes(frozen, 0) / mib:,.1f} MiB; adapter file {total_trainable * 4 / mib:,.2f} MiB "
          f"(fp32)")
    return 0


def _model_shapes(config: cfg.ParamsConfig):
    """({(d_out, d_in): count} of the layers ``--targets`` picks on ``--model``, the model's parameter count),
    from its config alone: the model is built on the meta device, no weight read."""
    from collections import Counter

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.adapt import select
    from lorakit.layers import spec_of
    from lorakit.train import models
    from lorakit.train.trainer import targets_of

    _ensure_packages(TRAIN_PACKAGES[:1])
    path = models.model_dir("" if config.model == "default" else config.model, _say)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    except (OSError, ValueError) as e:
        raise models.ModelError(f"{path}: cannot read the model's config ({e})") from None
    specs = [spec_of(module) for _, module in select(model, targets_of(config.targets))]
    shapes = Counter((s.d_out, s.d_in) if s.layout != "embedding" else (s.d_in, s.d_out) for s in specs)
    return shapes, sum(p.numel() for p in model.parameters())


def cmd_spectrum(config: cfg.SpectrumConfig) -> int:
    from lorakit.train import models
    from lorakit.train.spectra import spectrum_report

    model = models.load_weights(config.model, log=_say, device=models.resolve_device(config.device))
    spectrum_report(model, config)
    return 0


def cmd_inspect(config: cfg.InspectConfig) -> int:
    from lorakit.train.spectra import inspect_report

    model, _, _ = _model_with_adapter(config, tokenizer=False)
    inspect_report(model, "default", config)
    return 0


def cmd_resize(config: cfg.ResizeConfig) -> int:
    import shutil

    import lorakit as lk
    from lorakit.analysis import resize
    from lorakit.train.data import PROMPT_FILE
    from lorakit.train.spectra import markdown

    if not config.out:
        raise cfg.ConfigError("lorakit resize needs --out DIR (the resized adapter is written there)")
    if bool(config.rank) == bool(config.energy):
        raise cfg.ConfigError("lorakit resize takes --rank R or --energy E (one of them)")
    model, _, _ = _model_with_adapter(config, tokenizer=False)
    before = sum(p.numel() for p in lk.trainable_parameters(model))
    report = resize(model, "default", rank=config.rank or None, energy=config.energy or None)
    after = sum(p.numel() for p in lk.trainable_parameters(model))
    out = lk.save(model, config.out, format="peft")
    prompt = Path(config.adapter) / PROMPT_FILE
    if prompt.is_file():  # the prompt format it was trained on goes with it
        shutil.copyfile(prompt, out / PROMPT_FILE)
    print(markdown(("module", "rank", "new rank", "energy kept"),
                   [[p, r["from_rank"], r["rank"], r["retained"]] for p, r in report.items()]))
    kept = min(r["retained"] for r in report.values())
    print(f"resized adapter written to {out} (PEFT format): {before:,} -> {after:,} parameters; the least energy "
          f"kept by a module is {100 * kept:.2f}%")
    return 0


def cmd_advise(config: cfg.AdviseConfig) -> int:
    from lorakit.train.spectra import advice

    if config.budget <= 0:
        raise cfg.ConfigError("lorakit advise needs --budget PARAMS (trainable numbers to allocate, > 0)")
    if bool(config.from_adapter) == bool(config.probe_steps):
        raise cfg.ConfigError("lorakit advise takes --from ADAPTER or --probe-steps N (one of them)")
    advice(config, log=print)
    return 0


def cmd_convert(config: cfg.ConvertConfig) -> int:
    import lorakit as lk
    from lorakit.formats.single_file import components
    from lorakit.train import models

    if not config.source or not config.target:
        raise cfg.ConfigError("lorakit convert needs SOURCE and TARGET")
    source, target = Path(config.source), Path(config.target)
    if target.resolve() == source.resolve():
        raise cfg.ConfigError(f"{target}: the target is the source; write the converted adapter elsewhere")
    if config.to != "peft" and target.suffix != ".safetensors":
        raise cfg.ConfigError(f"{target}: --to {config.to} writes one file; name it *.safetensors")
    model = models.load_for_adapter(config.model, log=_say)
    lk.load(model, source)
    parts = components(model)
    if config.to == "peft":
        if len(parts) > 1:  # a PEFT directory adapts one module: one directory per component that has the adapter
            written = [lk.save(m, target / role, format="peft") for role, m in parts.items()
                       if "default" in lk.adapter_names(m)]
        else:
            written = [lk.save(next(iter(parts.values())), target, format="peft")]
    else:
        written = [lk.save(model, target, format=config.to)]
    print(f"{source} -> {', '.join(map(str, written))} ({config.to} format)")
    return 0


def cmd_export(config: cfg.ExportConfig) -> int:
    from lorakit.formats import gguf

    if not config.adapter or not config.out:
        raise cfg.ConfigError("lorakit export needs ADAPTER and --out FILE.gguf")
    model, _, _ = _model_with_adapter(config)
    if config.format == "gguf":
        out = gguf.export_lora(model, config.out, outtype=config.outtype or "f32")
    else:
        out = gguf.export_merged(model, config.out, base_gguf=config.base_gguf or None, outtype=config.outtype or "f16")
    print(f"{config.adapter} -> {out} ({config.format}, {out.stat().st_size / 2**20:.1f} MiB)")
    return 0


COMMANDS: dict[str, tuple[type, Callable, str, bool]] = {
    "finetune": (cfg.FinetuneConfig, cmd_finetune, "fine-tune a model with an adapter; default: SmolLM2-135M on "
                                                   "the built-in date task, accuracy before and after", True),
    "eval": (cfg.EvalConfig, cmd_eval, "exact-match accuracy of a model (+ adapter) on a task or data file", True),
    "generate": (cfg.ChatConfig, cmd_generate, "answer a prompt, or chat, with a model (+ adapter)", True),
    "merge": (cfg.MergeConfig, cmd_merge, "merge an adapter into its model and write a Hugging Face model dir", True),
    "serve": (cfg.ServeConfig, cmd_serve, "serve the model and its adapters over an OpenAI-compatible HTTP API, "
                                          "batching requests across adapters", True),
    "spectrum": (cfg.SpectrumConfig, cmd_spectrum, "singular values of a model's weights: effective ranks, energy "
                                                   "ranks, the share in [0.1, 1.1]; tables, plots and JSON", True),
    "inspect": (cfg.InspectConfig, cmd_inspect, "what an adapter learned: the spectrum of each module's update, "
                                                "its effective rank and utilisation, intruder dimensions", True),
    "resize": (cfg.ResizeConfig, cmd_resize, "an adapter at a lower rank (the best approximation of each update), "
                                             "or per module at a kept share of energy; PEFT format", True),
    "advise": (cfg.AdviseConfig, cmd_advise, "per-module ranks for a parameter budget, from a trained adapter or a "
                                             "short probe run; a YAML for lorakit finetune --config", True),
    "convert": (cfg.ConvertConfig, cmd_convert, "an adapter in another format: PEFT directories, kohya and diffusers "
                                                "single files (Stable Diffusion tools)", True),
    "export": (cfg.ExportConfig, cmd_export, "an adapter as GGUF for llama.cpp and Ollama: a LoRA adapter file, or "
                                             "the merged model", True),
    "params": (cfg.ParamsConfig, cmd_params, "trainable parameters and memory of a method on given shapes or on "
                                             "a whole model", False),
}


def parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``lorakit`` parser. A command that builds a method has the options of the method ``argv`` picks for
    it (``chosen_method``: a ConfigError for an unknown one), the default method's for the others."""
    top = _Parser(prog="lorakit", description="LoRA and its SVD-based successors: fine-tune, "
                  "evaluate, chat, merge, count. `lorakit COMMAND --help` explains every option.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    given = list(argv)
    for name, (config_cls, _, help_text, _) in COMMANDS.items():
        # No abbreviated flags: the options differ by method, so a prefix could mean another flag per method.
        command = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        _add_fields(command, config_cls)
        method = None
        if cfg.takes_method(config_cls):
            method = chosen_method(config_cls, given[1:] if given[:1] == [name] else [])
            _add_method_options(command, name, config_cls, method)
        top.commands[name] = (command, method)
    return top


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose unrecognized flags are refused by the command's own parser (its usage, not the top
    one's), with the flags of that command close to each (``--step``: ``--steps``), or the methods whose setting
    it is."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.commands: dict[str, tuple[argparse.ArgumentParser, str | None]] = {}  # name: (parser, method)

    def parse_args(self, args=None, namespace=None):
        known, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command, method = self.commands[known.command]
            command.error(f"unrecognized arguments: {' '.join(unknown)}{_suggestions(command, unknown, method)}")
        return known


def _suggestions(command: argparse.ArgumentParser, unknown: list[str], method: str | None) -> str:
    """For each flag of ``unknown`` the flags of ``command`` it is close to (it begins one, or difflib finds them
    alike), else the registered methods other than ``method`` that have it as a setting; "" where there are none."""
    flags = sorted(f for f in command._option_string_actions if f.startswith("--"))
    said = []
    for given in dict.fromkeys(u.partition("=")[0] for u in unknown if u.startswith("--")):
        close = [f for f in flags if f.startswith(given)] or difflib.get_close_matches(given, flags, n=3, cutoff=0.6)
        if close:
            said.append(f"{given}: did you mean {' or '.join(close[:3])}?")
        elif method and (elsewhere := cfg._elsewhere([given[2:].replace("-", "_")], method)):
            said.append(elsewhere.strip(" ()"))
    return f" ({'; '.join(said)})" if said else ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else ""
    try:
        args = parser(argv).parse_args(argv)
        config_cls, run, _, needs_training_packages = COMMANDS[args.command]
        config = build_config(config_cls, args)
        if needs_training_packages:
            _ensure_packages(TRAIN_PACKAGES + (SERVE_PACKAGES if run is cmd_serve else []))
        return run(config)
    except LorakitError as e:
        print(f"lorakit {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
