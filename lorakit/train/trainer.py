"""The fine-tuning loop behind ``lorakit finetune``, read top to bottom from ``finetune``:

    setup:  data → evaluate (before) → adapt → optimizer          → Job
    start:  resume a checkpoint, or a fresh run                   → TrainState
    train:  [loss_step: micro-batches → backward;  commit_step: clip → AdamW → schedule → lk.step]
            → validation loss, checkpoints
    finish: save adapter → merge → evaluate (after) → report

Loss is computed only where there are labels: the output head and cross-entropy run on the
completion positions (for prompt/completion data most positions are prompt), in chunks, so the
full-vocabulary logits of the whole batch are never held. Under ``torchrun`` the global batch is
split across processes (DDP or FSDP2; each process on its own GPU with nccl, or on the CPU with
gloo), so the loss equals a one-process run's. Model, adapters, batches and optimizer state live on
``--device``; the frozen base is held and computes in ``--dtype`` (bfloat16 where the device has units for it),
the adapters, optimizer state, loss and logits in float32.

A checkpoint holds what the last completed step left: weights, optimizer and schedule, position in
the data, random state. A Ctrl-C, or a SIGTERM (what schedulers and ``kill`` send), in the middle of a
step saves the state before it (the random state included: the step's dropout draws are discarded with
it), and one that lands while a step commits waits for the commit, so a run resumed with ``--resume
auto`` is the uninterrupted run, bit for bit; the command exits 130 after a Ctrl-C, 143 after a SIGTERM.
``--resume auto`` with no checkpoint to resume (the first save was cut off) starts a fresh run.

Writes fail early or cleanly: an ``--out`` that cannot be written is refused before the model loads,
and a checkpoint that cannot be written (a full disk) stops the run with a CheckpointError, the older
checkpoints kept whole. A run whose loss says it has diverged is warned, once (``diverged``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

import lorakit as lk
from lorakit.checkpoint import atomic_write, read_tensors, write_tensors
from lorakit.errors import AdapterFileError, ConfigError, LorakitError
from lorakit.kinds import numel
from lorakit.layers import adapted_layers
from lorakit.methods.base import Method
from lorakit.serve.engine import Adapters, Engine, Generation, Sampling
from lorakit.serve.threads import Threads, threads_for
from lorakit.train import data as data_mod
from lorakit.train import models, tasks
from lorakit.train.config import FinetuneConfig

HEAD_CHUNK = 2048  # label positions per output-head chunk


class TrainingError(LorakitError, RuntimeError):
    """Training cannot go on (a NaN/Inf loss); the message says what was kept."""


class CheckpointError(LorakitError, OSError):
    """A checkpoint directory is incomplete, one of its files is truncated or corrupt, or a checkpoint cannot be
    written (a full disk); the message names it."""


class Terminated(KeyboardInterrupt):
    """A SIGTERM stopped the run, as a Ctrl-C does (a checkpoint of the last committed step saved);
    ``lorakit finetune`` exits 143 (128 + SIGTERM) on it."""


def prepare(model, recipe: Method, config, log=print) -> None:
    """Quantize the base if asked and adapt it with ``recipe``: after adapting for a recipe that
    ``quantizes_residual`` (its start is known then, so the quantized part is the residual: QPiSSA), else
    before."""
    if config.quantize:
        models.ensure_package("bitsandbytes", "bitsandbytes>=0.50", log)
    if config.quantize and not recipe.quantizes_residual:
        lk.quantize(model, config.quantize)
    lk.adapt(model, recipe, targets_of(config.targets), ranks=config.ranks or None, alphas=config.alphas or None)
    if config.quantize and recipe.quantizes_residual:
        lk.quantize(model, config.quantize)


def targets_of(text: str):
    """--targets: 'all-linear', a comma-separated name list, or a regex (anything with regex characters)."""
    if text == "all-linear" or any(c in text for c in "()[]*+?|\\^$"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


# --- data ----------------------------------------------------------------------------------------
class Sources(NamedTuple):
    """Where each split's records came from, as the output and the report name them."""

    train: str
    validation: str
    test: str


class Splits(NamedTuple):
    """A run's records: training, validation (empty: none) and test (the final score), and their sources."""

    train: list[dict]
    validation: list[dict]
    test: list[dict]
    sources: Sources


def split_records(config) -> Splits:
    """The training, validation and test records of a finetune ``config``, as chat messages for a built-in task.

    Training: --data, or --train-examples generated for --task. Test: every record of --eval-data, else a
    --test-fraction share of --data (seeded), else the task's held-out examples. Validation, only where
    --val-every measures it: every record of --val-data, else a --val-fraction share of the training records
    (seeded; for a task, as many more examples generated apart from the rest); never a test record.
    """
    validating = bool(config.val_every and (config.val_data or config.val_fraction))
    validation: list[dict] = []
    if config.data:
        train = data_mod.read(config.data, config.encoding)
    else:
        extra = max(1, int(config.train_examples * config.val_fraction)) if validating and not config.val_data else 0
        made, held_out = tasks.split(config.task, config.train_examples + extra, config.eval_examples, config.seed)
        train, validation = _as_records(made[:config.train_examples]), _as_records(made[config.train_examples:])
    if config.eval_data:
        test, test_source = _file(config.eval_data, config.encoding)
    elif config.data:
        train, test = _carve(train, config.test_fraction, config.seed, config.data, "test data",
                             "--eval-data FILE")
        test_source = f"{_n(len(test), 'record')} held out of {config.data} (--test-fraction {config.test_fraction:g})"
    else:
        test, test_source = _task_test(config.task, held_out)
    if not validating:
        val_source = "none (--val-every 0)" if not config.val_every else "none (--val-fraction 0)"
    elif config.val_data:
        validation, val_source = _file(config.val_data, config.encoding)
    elif config.data:
        train, validation = _carve(train, config.val_fraction, f"{config.seed}:validation", config.data,
                                   "validation data", "--val-data FILE or --val-fraction 0")
        val_source = (f"{_n(len(validation), 'record')} held out of the training records "
                      f"(--val-fraction {config.val_fraction:g})")
    else:
        val_source = (f"task {config.task}, {_n(len(validation), 'more generated example')} apart from training "
                      f"and test (--val-fraction {config.val_fraction:g})")
    train_source = (f"{_n(len(train), 'record')} from {config.data}" if config.data
                    else f"task {config.task}, {_n(len(train), 'generated example')}")
    return Splits(train, validation, test, Sources(train_source, val_source, test_source))


def eval_records(config) -> tuple[list[dict], str]:
    """The records ``lorakit eval`` scores and their source: every record of --eval-data, else of --data, else
    the built-in task's held-out examples (those ``lorakit finetune`` scores)."""
    if config.eval_data or config.data:
        return _file(config.eval_data or config.data, config.encoding)
    return _task_test(config.task, tasks.split(config.task, 0, config.eval_examples, config.seed)[1])


def _file(path: str, encoding: str) -> tuple[list[dict], str]:
    """Every record of data file ``path``, and their source."""
    records = data_mod.read(path, encoding)
    return records, f"{_n(len(records), 'record')} from {path}"


def _task_test(task: str, held_out: list[tasks.Example]) -> tuple[list[dict], str]:
    """The records of ``task``'s ``held_out`` examples, and their source."""
    return _as_records(held_out), f"task {task}, {_n(len(held_out), 'eval example')}"


def _as_records(examples: list[tasks.Example]) -> list[dict]:
    return [{"messages": e.messages()} for e in examples]


def _n(count: int, noun: str) -> str:
    """``count`` ``noun``: "1 record", "3 records"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _carve(records: list[dict], fraction: float, seed, where: str, what: str, instead: str):
    """(rest, held out) of ``records``: a ``fraction`` of them, at least one, held out after a shuffle seeded by
    ``seed``; a ConfigError (naming ``where``, ``what`` and the way out, ``instead``) where none would be left."""
    if len(records) < 2:
        raise ConfigError(f"{where}: {len(records)} training record(s) are too few to hold out {what} and train on "
                          f"the rest; give {instead}")
    records = list(records)
    random.Random(seed).shuffle(records)
    cut = min(max(1, int(len(records) * fraction)), len(records) - 1)
    return records[cut:], records[:cut]


def evaluation_pairs(records: list[dict], prompt_format: str | None,
                     group_by: str = "") -> tuple[list[tuple], list[str] | None]:
    """(prompt, target) pairs for exact match from held-out ``records`` (text records have none: left out), the
    prompts in ``prompt_format`` (``data.in_format``; None: each record's own), and each pair's group: its
    record's field ``group_by`` (default: ``task``, where the records carry one; None: not grouped). A
    ``group_by`` that no record has is a ConfigError."""
    scored = [r for r in records if "text" not in r]
    pairs = [(r["prompt"], r["completion"]) if "prompt" in r else (r["messages"][:-1], r["messages"][-1]["content"])
             for r in scored]
    if prompt_format is not None:
        pairs = [(data_mod.in_format(p, prompt_format), t) for p, t in pairs]
    field = group_by or "task"
    if not any(field in r.get("fields", {}) for r in scored):
        if group_by:
            raise ConfigError(f"--group-by {group_by}: none of the {len(scored)} records scored has a {group_by!r} "
                              "field")
        return pairs, None
    return pairs, [_group_name(r.get("fields", {}), field) for r in scored]


def _group_name(fields: dict, field: str) -> str:
    """A record's group: its ``field``'s value as text (JSON for one that is not a string)."""
    if field not in fields:
        return f"(no {field})"
    value = fields[field]
    return value if isinstance(value, str) else json.dumps(value)


def scored_source(source: str, records: int, scored: int) -> str:
    """A test set's ``source``, saying how many of its ``records`` were ``scored`` where some were not."""
    if scored == records:
        return source
    return f"{source}, {scored} scored ({_n(records - scored, 'text record')} without an answer to match)"


class Datasets(NamedTuple):
    """What a run trains on and is measured on."""

    train: data_mod.Tokenized
    evaluation: list[tuple]  # (prompt, target) for exact match; a prompt is raw text or chat messages
    validation: data_mod.Tokenized  # apart from training and evaluation, for the validation loss
    prompt_format: str  # "chat" or "raw": how the adapter is to be asked (data.py)
    groups: list[str] | None  # each evaluation pair's group (--group-by); None: not grouped
    sources: Sources


def asked_format(config, split: Splits) -> data_mod.PromptFormat:
    """How the adapter of ``config`` trained on ``split`` is asked: its records' form with ``--system-prompt`` and
    ``--chat-template``; a DataError where they do not go together."""
    return data_mod.prompt_format_of(split.train, config.data or f"task {config.task}", config.system_prompt,
                                     config.chat_template)


def datasets(config, tokenizer, split: Splits | None = None,
             prompt_format: data_mod.PromptFormat | None = None) -> Datasets:
    """The training, evaluation and validation data of ``config`` (its ``split`` and ``prompt_format``, where
    known already), its prompt format, groups and sources."""
    split = split or split_records(config)
    prompt_format = prompt_format or asked_format(config, split)
    evaluation, groups = evaluation_pairs(split.test, prompt_format, config.group_by)
    sources = split.sources._replace(test=scored_source(split.sources.test, len(split.test), len(evaluation)))
    return Datasets(data_mod.tokenize(split.train, tokenizer, config.max_length, prompt_format), evaluation,
                    data_mod.tokenize(split.validation, tokenizer, config.max_length, prompt_format), prompt_format,
                    groups, sources)


# --- loss and evaluation -------------------------------------------------------------------------
class CompletionLoss(torch.nn.Module):
    """Mean cross-entropy over label positions, with the output head run on those positions only.

    A module (not a function) so DDP can wrap it: its forward is the whole differentiable step.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels) -> tuple[torch.Tensor, int]:
        model, labels = self.model, labels[:, 1:]
        keep = labels != data_mod.IGNORE
        body, head = getattr(model, "base_model", None), model.get_output_embeddings()
        if body is None or body is model or head is None:  # not a transformers LM: let the model do it
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=torch.cat(
                [labels.new_full((len(labels), 1), data_mod.IGNORE), labels], 1))
            return out.loss, int(keep.sum())
        hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden, targets = hidden[:, :-1][keep], labels[keep]  # (N, H), (N,): positions that predict a label
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, len(targets), HEAD_CHUNK):
            logits = head(hidden[start:start + HEAD_CHUNK]).float()  # (chunk, vocab), never the whole batch
            total = total + F.cross_entropy(logits, targets[start:start + HEAD_CHUNK], reduction="sum")
        return total / max(len(targets), 1), len(targets)


def generate(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int, desc: str = "",
             threads: str | None = None) -> list[str]:
    """Greedy answers to ``prompts`` (raw text, or chat messages for the chat template) through the model's
    active adapter, or the base when none is active, encoded exactly as training encodes them.

    They are decoded by the server's engine, up to ``batch_size`` at a time: ``lorakit serve``'s answers to
    the same prompts, token for token, whatever else shares a batch (``Engine._choose``). ``desc``: a progress
    bar of that name, on a terminal. ``threads``: ``--threads`` for the decode steps (None: torch's count as it
    is)."""
    active = lk.active_adapters(model)
    if len(active) > 1:
        raise ConfigError(f"generation asks one adapter at a time; {active} are active (lk.activate one)")
    if any(layer.merged for _, layer in adapted_layers(model)):
        raise ConfigError("generation routes requests through unmerged adapters; lk.unmerge(model) first")
    adapters = Adapters(model, max_loaded=1)
    if active:
        adapters.attached(active[0])
    chooser = Threads() if threads is None else threads_for(threads, next(model.parameters()).device)
    engine = Engine(model, tokenizer, adapters, max_batch=batch_size, threads=chooser)
    answers: list[str] = [""] * len(prompts)
    progress = _progress(len(prompts), 0, None if desc else False, desc, unit="prompt", leave=False)
    failed: list[str] = []

    def sink(i: int, pieces: list[str]):
        def event(e: dict) -> None:
            if "text" in e:
                pieces.append(e["text"])
            elif "error" in e:
                failed.append(e["error"])
            if "done" in e or "error" in e:
                answers[i] = "".join(pieces)
                progress.advance(1)
        return event

    was_training = model.training
    model.eval()
    try:
        engine.complete([Generation(data_mod.prompt_ids(p, tokenizer), active[0] if active else None,
                                    Sampling(max_tokens=max_new_tokens), sink(i, [])) for i, p in enumerate(prompts)])
    finally:
        model.train(was_training)
        progress.close()
        chooser.restore()
    if failed:
        raise TrainingError(f"generation failed for {len(failed)} of {len(prompts)} prompts: {failed[0]}")
    return answers


def _on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: tensor.to(device, non_blocking=True) for key, tensor in batch.items()}


def accuracy(model, tokenizer, examples, config, groups: list[str] | None = None) -> tuple[float, list[dict]]:
    """Exact-match accuracy (%) on (prompt, target) ``examples`` and the individual predictions, each with its
    entry of ``groups`` as ``group`` where given; a progress bar on a terminal."""
    answers = generate(model, tokenizer, [p for p, _ in examples], config.max_new_tokens, config.eval_batch_size,
                       desc="scoring", threads=config.threads)
    rows = [{"prompt": p if isinstance(p, str) else p[-1]["content"], "target": t, "answer": a,
             "correct": tasks.exact_match(a, t)} for (p, t), a in zip(examples, answers)]
    for row, group in zip(rows, groups or ()):
        row["group"] = group
    return 100.0 * sum(r["correct"] for r in rows) / max(len(rows), 1), rows


def per_group(rows: list[dict]) -> dict[str, dict]:
    """{group: {records, correct, accuracy (%)}} of prediction ``rows`` with a ``group``, in order of appearance."""
    groups: dict[str, dict] = {}
    for row in rows:
        if "group" in row:
            tally = groups.setdefault(row["group"], {"records": 0, "correct": 0})
            tally["records"] += 1
            tally["correct"] += row["correct"]
    for tally in groups.values():
        tally["accuracy"] = 100.0 * tally["correct"] / tally["records"]
    return groups


def group_table(groups: dict[str, dict], field: str, before: dict[str, dict] | None = None) -> str:
    """``per_group``'s figures as a markdown table, a row per value of ``field``; with the accuracy ``before``
    training beside them where given (``per_group`` of the same records)."""
    if before is None:
        lines = [f"| {field} | records | correct | accuracy |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {g['records']} | {g['correct']} | {g['accuracy']:.1f}% |" for name, g in groups.items()]
    else:
        lines = [f"| {field} | records | accuracy before | correct | accuracy after |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {g['records']} | {before[name]['accuracy']:.1f}% | {g['correct']} | "
                  f"{g['accuracy']:.1f}% |" for name, g in groups.items()]
    return "\n".join(lines)


@torch.no_grad()
def validation_loss(model, examples: list[dict], pad_id: int, batch_size: int, device: torch.device,
                    show: bool = False) -> float:
    """Mean completion loss over ``examples`` (Tokenized examples), in eval mode, on ``device``; with ``show``,
    a progress bar on a terminal."""
    was_training = model.training
    model.eval()
    total = count = 0
    loss_of = CompletionLoss(model)
    bar = _progress(len(examples), 0, None if show else False, desc="validation", unit="example", leave=False)
    try:
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            loss, n = loss_of(**_on(data_mod.collate(batch, pad_id), device))
            total, count = total + loss.item() * n, count + n
            bar.advance(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return total / max(count, 1)


# --- checkpoints ---------------------------------------------------------------------------------
TENSORS, TRAINER_STATE = "adapter_state.safetensors", "trainer_state.pt"


def _full_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(every tensor training changes, optimizer state), whole and on CPU.

    Collective under FSDP (every process must call it); the optimizer state is keyed by parameter
    name, so a checkpoint of any strategy resumes under any other, one process included.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    model_state, optimizer_state = get_state_dict(model, optimizer,
                                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tensors = {k: v.detach().cpu() for k, v in model_state.items() if ".adapters." in k or k in trained}
    return tensors, optimizer_state


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The random states a training step draws from (dropout): the CPU's, and the accelerator's."""
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps_rng"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():  # on the current device: the one training uses
        torch.cuda.set_rng_state(state["cuda_rng"])
    if "mps_rng" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps_rng"])


def save_checkpoint(run: Path, step: int, state: tuple[dict, dict], scheduler, position: tuple[int, int],
                    rng: dict[str, torch.Tensor], keep: int) -> Path:
    """Write checkpoint ``step`` (``state`` from ``_full_state``, ``rng`` from ``_rng_state`` after that step)
    atomically and keep the last ``keep``. One that cannot be written (a full disk, a read-only file system) is a
    CheckpointError naming it, with its partial directory removed and the older checkpoints as they were."""
    final = run / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")  # what a kill leaves: see _remove_partial_saves
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write_tensors(tmp / TENSORS, state[0])  # with a digest of the tensors, which loading checks
        torch.save({"step": step, "epoch": position[0], "batch": position[1], "optimizer": state[1],
                    "scheduler": scheduler.state_dict(), **rng}, tmp / TRAINER_STATE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    # torch's writer reports a failed write (a full disk) as a RuntimeError: "[enforce fail at inline_container.cc]"
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(next(p for p in tmp.parents if p.is_dir())).free / 2**20
        kept = checkpoints(run)
        raise CheckpointError(f"{final}: cannot write the checkpoint ({_os_reason(e)}; {free:,.0f} MiB free on its "
                              f"disk); " + (f"the newest kept is {kept[0]}, which --resume auto continues from"
                                            if kept else "no checkpoint is kept")) from e
    for old in checkpoints(run)[keep:]:
        shutil.rmtree(old)
    return final


def _os_reason(e: BaseException) -> str:
    """Why a write failed: the operating system's reason ("No space left on device") where ``e`` or an error it was
    raised from has one, else ``e``'s text."""
    cause = e
    while getattr(cause, "strerror", None) is None and cause.__cause__ is not None:
        cause = cause.__cause__
    return getattr(cause, "strerror", None) or str(e)


def _remove_partial_saves(run: Path) -> list[Path]:
    """Delete the temporary directories of saves that a kill cut off; returns them."""
    partial = sorted((run / "checkpoints").glob(".step-*.tmp-*"))
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def _drop_metrics_after(path: Path, step: int) -> None:
    """Keep the metrics rows of steps up to ``step``: a run stopped after its last checkpoint logged steps
    that the resumed run redoes, and the curve must read as one uninterrupted run."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if json.loads(line).get("step", step + 1) <= step]
        atomic_write(path, lambda p: p.write_text("".join(row + "\n" for row in rows)))


def _loss_history(path: Path, step: int) -> tuple[list[float], str | None]:
    """(the training losses of steps 1 to ``step``, the divergence warning among them or None) in metrics file
    ``path``: what ``diverged`` goes on from after a resume (without the file, it starts over)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    rows = [row for row in rows if row.get("step", step + 1) <= step]  # whether or not the main process cut it yet
    losses = [row["loss"] for row in rows if "loss" in row]
    return losses, next((row["diverged"] for row in rows if "diverged" in row), None)


def checkpoints(run: Path) -> list[Path]:
    """The checkpoint directories of run directory ``run``, newest first."""
    return sorted((run / "checkpoints").glob("step-*"), reverse=True)


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, trainer state) of checkpoint ``path``; CheckpointError naming the file for anything unreadable."""
    for name in (TENSORS, TRAINER_STATE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: not a complete lorakit checkpoint (no {name})")
    try:
        tensors = read_tensors(path / TENSORS)
    except AdapterFileError as e:
        raise CheckpointError(str(e)) from None
    try:
        trainer = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path / TRAINER_STATE}: truncated or corrupt ({e})") from None
    needed = {"step", "epoch", "batch", "optimizer", "scheduler", "torch_rng"}
    missing = needed - set(trainer) if isinstance(trainer, dict) else needed
    if missing:
        raise CheckpointError(f"{path / TRAINER_STATE}: not a lorakit trainer state (no {', '.join(sorted(missing))})")
    return tensors, trainer


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore a checkpoint into the adapted model and optimizer; returns the trainer state.

    Both files are read and checked before anything is restored, so an unreadable checkpoint
    (CheckpointError) leaves the model, optimizer, schedule and random state as they were.
    """
    tensors, trainer = _read_checkpoint(path)
    state = model.state_dict()
    bad = sorted(k for k, v in tensors.items() if k not in state or state[k].shape != v.shape)
    if bad:
        raise ConfigError(f"{path}: checkpoint does not fit this model/method ({bad[:3]}...): same settings needed")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=tensors, optim_state_dict=trainer["optimizer"],
                   options=StateDictOptions(full_state_dict=True, strict=False))
    scheduler.load_state_dict(trainer["scheduler"])
    _set_rng_state(trainer)
    return trainer


def _resume(run: Path, resume: str, model, optimizer, scheduler, say) -> tuple[dict, Path] | None:
    """(trainer state, path) of the checkpoint ``--resume`` names, loaded; for ``auto`` the newest one that
    reads, saying which newer ones are damaged and skipped, and None where there is none (a fresh run)."""
    if resume != "auto":
        return load_checkpoint(Path(resume), model, optimizer, scheduler), Path(resume)
    found = checkpoints(run)
    if not found:
        return None
    for path in found:
        try:
            return load_checkpoint(path, model, optimizer, scheduler), path
        except CheckpointError as e:
            say(f"--resume auto: skipping damaged checkpoint {path}: {e}")
    raise CheckpointError(f"--resume auto: none of the {len(found)} checkpoints in {run / 'checkpoints'} is intact")


# --- the run ---------------------------------------------------------------------------------------
def _distributed(config) -> tuple[int, int, str, torch.device]:
    """(rank, world size, strategy, device), initialising torch.distributed under torchrun: each process
    on its own GPU, cuda:LOCAL_RANK, with nccl, or on the CPU with gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, "none", models.resolve_device(config.device)
    device = models.resolve_device(config.device, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if config.strategy == "none":
        return 0, 1, "none", device
    if config.strategy == "fsdp" and type(config.recipe()).on_step is not Method.on_step:
        raise ConfigError(f"--method {config.method} runs a schedule after each step that reads whole matrices and "
                          "their gradients (its on_step), which FSDP shards across processes; use --strategy ddp")
    if config.strategy == "fsdp" and config.quantize:
        raise ConfigError("FSDP cannot shard bitsandbytes' packed 4/8-bit weights; use --strategy ddp with --quantize")
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, "fsdp" if config.strategy == "fsdp" else "ddp", device


def _shard(model, device: torch.device, world: int) -> list[torch.nn.Module]:
    """FSDP2: shard each transformer block (where the adapters live) over ``world`` processes on ``device``'s
    kind; the frozen rest stays replicated. Returns the sharded blocks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    kinds = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in kinds]
    inside = {id(p) for b in blocks for p in b.parameters()}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in inside]
    if not blocks or outside:
        raise ConfigError("--strategy fsdp shards transformer blocks; "
                          + (f"trainable {outside[0]} lies outside them" if blocks else "this model names none")
                          + ": use --strategy ddp")
    mesh = init_device_mesh(device.type, (world,))  # the default mesh takes the GPU whenever there is one
    for block in blocks:
        fully_shard(block, mesh=mesh)
    return blocks


def _gradient_sync(loss_of, sharded: list, sync: bool):
    """The context of one micro-step's forward and backward: on all but a step's last (``sync`` False) the
    gradients only add up locally, without DDP's all-reduce or FSDP2's reduce-scatter; the last sends the sum."""
    for block in sharded:
        block.set_requires_gradient_sync(sync, recurse=False)
    return loss_of.no_sync() if hasattr(loss_of, "no_sync") and not sync else contextlib.nullcontext()


# The signals that stop training, saving a checkpoint, and what each raises.
_STOPS = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}


def _raise_stop(signum: int, frame) -> None:
    """The handler of a stopping signal while training: its exception (KeyboardInterrupt or Terminated)."""
    raise _STOPS[signum]


@contextlib.contextmanager
def _stops_held():
    """Hold a Ctrl-C or SIGTERM back until the block ends: a step's optimizer update and counters change together.
    The first signal held is raised then."""
    caught = []
    previous = {signum: signal.signal(signum, lambda signum, _: caught.append(signum)) for signum in _STOPS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if caught:
        raise _STOPS[caught[0]]


def _adamw(groups: list[dict], lr: float, fused: bool) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel: one op for all ~400 adapter tensors instead of a
    Python loop over them (4x faster on CPU). FSDP's sharded parameters, and torch < 2.4 on CPU, take
    the default."""
    if fused:
        try:
            return torch.optim.AdamW(groups, lr=lr, fused=True)
        except RuntimeError:  # "`fused=True` requires all the params to be ... on a supported device"
            pass
    return torch.optim.AdamW(groups, lr=lr)


def _schedule(config):
    warmup, total = config.warmup_steps, config.steps

    def factor(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return factor


def _batch_size(config, examples: int, world: int, say) -> int:
    """--batch-size, or as many of the ``examples`` as fill whole micro-batches when there are fewer (said)."""
    if config.batch_size <= examples:
        return config.batch_size
    split = world * config.grad_accum
    size = examples - examples % split
    if size == 0:
        raise ConfigError(f"{examples} training example(s) cannot fill {world} process(es) x --grad-accum "
                          f"{config.grad_accum} micro-batches")
    say(f"--batch-size {config.batch_size} is more than the {examples} training examples: each step uses {size}"
        + (f" (whole micro-batches of {size // split})" if size < examples else ""))
    return size


def finetune(config: FinetuneConfig, log=print) -> dict:
    """Run a fine-tuning job; returns the summary (accuracy before/after, figures, paths)."""
    job = setup(config, log)
    state = start(job)
    if config.resume:
        _resume_validation(job, state)
    with _metrics(job) as record:  # closed however the run ends
        train(job, state, record)
        weights = _full_state(job.model, job.optimizer)  # collective under FSDP: every process takes part
        path = _checkpoint(job, state, weights) if job.main else None
        if state.interrupted:
            what = "stopped by SIGTERM" if state.interrupted is Terminated else "interrupted"
            job.say(f"{what} at step {state.step}: checkpoint {path}; continue with --resume auto")
            raise state.interrupted
        summary = finish(job, state, weights, record)
    if job.main:
        summary["diverged"] = state.diverged
        _plot(job.run)
        _report(job.run, config, job.recipe, summary)
    return summary


@dataclass
class Job:
    """What ``setup`` makes of a config: where the run goes and runs, the adapted model, its data, the
    optimizer and schedule."""

    config: FinetuneConfig
    recipe: Method
    say: Callable[[str], None]  # the log on the main process, silent on the others
    rank: int
    world: int
    strategy: str  # "none", "ddp" or "fsdp"
    device: torch.device
    dtype: torch.dtype  # the frozen base's (--dtype)
    model: torch.nn.Module
    tokenizer: object
    data: Datasets
    batch_size: int  # global, across processes
    before: float | None  # accuracy before training (None: skipped)
    before_groups: dict | None  # and per group (``per_group``; None: skipped, or not grouped)
    trainable: int
    total: int  # parameters of the adapted model, packed 4-bit weights counted as weights
    params: list  # the trainable parameters (clipped)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sharded: list  # FSDP2's sharded blocks (empty otherwise)
    started: float

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def run(self) -> Path:
        return Path(self.config.out)

    @property
    def micro(self) -> int:
        """Examples per micro-batch of one process."""
        return self.batch_size // (self.world * self.config.grad_accum)


@dataclass
class TrainState:
    """Where training is. ``step``, ``epoch``, ``position`` and ``rng`` are what a checkpoint records."""

    step: int = 0  # optimizer steps committed
    epoch: int = 0
    position: int = 0  # index of the next batch in the epoch's order
    last_good: Path | None = None  # the newest checkpoint written or resumed from
    # The random state after the last committed step: what a checkpoint records, so that an interrupted
    # step's dropout draws do not leak into the resumed run (validation and saving draw none).
    rng: dict = field(default_factory=dict)
    batches: list = field(default_factory=list)  # the epoch's batches of example indices
    tokens_seen: int = 0  # by this process since the loop (re)started
    t0: float = 0.0  # when the loop (re)started
    train_seconds: float = 0.0
    interrupted: type[KeyboardInterrupt] | None = None  # what ended the loop: KeyboardInterrupt, or Terminated
    losses: list = field(default_factory=list)  # the training loss of every step from the first (``diverged``)
    diverged: str | None = None  # the warning that the run has diverged, once given
    best_loss: float = math.inf  # the lowest validation loss so far
    best_step: int = 0  # its step (0: none measured)
    since_best: int = 0  # validations since, none lower
    stopped: bool = False  # early stopping ended the loop


def setup(config: FinetuneConfig, log) -> Job:
    """Check the config and build its recipe, join the process group, check that --out can be written, load the
    model and data, measure accuracy before, adapt (and quantize), shard under FSDP, and make the optimizer and
    schedule."""
    config.check()
    recipe = config.recipe()
    rank, world, strategy, device = _distributed(config)
    say = log if rank == 0 else (lambda *_: None)
    if config.batch_size % (world * config.grad_accum):
        raise ConfigError(f"--batch-size {config.batch_size} must divide by processes x --grad-accum "
                          f"({world} x {config.grad_accum})")
    if rank == 0:  # the process that writes the run directory
        _check_writable(Path(config.out))
    started = time.time()
    random.seed(config.seed)
    torch.manual_seed(config.seed)  # every device's generator

    # the data files read and checked before the model loads (seconds to a minute), and how they are asked
    split = split_records(config)
    form = asked_format(config, split)
    dtype, why = models.resolve_dtype(config.dtype, device)
    say(f"dtype: {models.dtype_name(dtype)} ({why})")
    model, tokenizer = models.load(config.model, dtype=dtype, log=say, device=device)
    data = datasets(config, tokenizer, split, form)
    if not data.train.examples:
        raise ConfigError(f"no training examples left after tokenizing ({data.train.summary()}): each is cut to "
                          f"--max-length {config.max_length} tokens, and one left with no answer token is dropped")
    say(f"data: {len(data.train.examples)} training examples ({data.train.summary()}), {len(data.evaluation)} held "
        f"out for evaluation; on {device}")
    batch_size = _batch_size(config, len(data.train.examples), world, say)
    before, before_groups = None, None
    if rank == 0 and not config.skip_eval_before and data.evaluation:
        before, rows = accuracy(model, tokenizer, data.evaluation, config, data.groups)
        before_groups = per_group(rows) if data.groups else None
        say(f"accuracy before: {before:.1f}%")

    prepare(model, recipe, config, say)  # on the device: bitsandbytes quantizes with its kernels there
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = sum(p.numel() for p in lk.trainable_parameters(model))
    total = sum(map(numel, model.parameters()))
    sharded = _shard(model, device, world) if strategy == "fsdp" else []  # before the optimizer: shards
    params = lk.trainable_parameters(model)
    groups = (lk.lora_plus_groups(model, config.lr, config.lora_plus_ratio, config.weight_decay)
              if config.lora_plus_ratio > 0 else [{"params": params, "weight_decay": config.weight_decay}])
    optimizer = _adamw(groups, config.lr, fused=strategy != "fsdp")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    say(f"{config.method} on {config.targets}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.3f}%)")
    return Job(config, recipe, say, rank, world, strategy, device, dtype, model, tokenizer, data, batch_size, before,
               before_groups, trainable, total, params, optimizer, scheduler, sharded, started)


def _check_writable(run: Path) -> None:
    """A ConfigError unless run directory ``run`` can be made and a file written in it: a probe file, since
    permission bits do not stop root and say nothing of a read-only file system."""
    try:
        run.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run, prefix=".lorakit-write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"--out {run}: cannot write there ({e.strerror or e})") from None


def start(job: Job) -> TrainState:
    """Where training starts: the checkpoint --resume names loaded (weights, optimizer, schedule, random
    state; the metrics rows after it dropped, the losses up to it read back for ``diverged``), or step 0 of a
    fresh run, an earlier run's checkpoints removed. --resume auto where no checkpoint was written yet starts a
    fresh run, said. Directories of cut-off saves are removed either way."""
    state, run = TrainState(), job.run
    if job.main:
        for partial in _remove_partial_saves(run):
            job.say(f"removed {partial}: a checkpoint save that was cut off")
    if job.config.resume:
        resumed = _resume(run, job.config.resume, job.model, job.optimizer, job.scheduler, job.say)
        if resumed is None:
            job.say(f"--resume auto: no checkpoint in {run / 'checkpoints'}; starting a fresh run")
        else:
            saved, state.last_good = resumed
            state.step, state.epoch, state.position = saved["step"], saved["epoch"], saved["batch"]
            job.say(f"resumed from {state.last_good} at step {state.step}")
        if job.main:  # metrics.jsonl is appended to: the rows of steps redone go, all of them for a fresh run
            _drop_metrics_after(run / "metrics.jsonl", state.step)
        state.losses, state.diverged = _loss_history(run / "metrics.jsonl", state.step)
    elif job.main and checkpoints(run):
        # Left in place, an earlier run's checkpoints would outrank ours in the last-k pruning and in
        # --resume auto.
        shutil.rmtree(run / "checkpoints")
        job.say(f"fresh run: removed the checkpoints of an earlier run in {run / 'checkpoints'}")
    return state


@contextlib.contextmanager
def _metrics(job: Job):
    """``record(**row)``: one metrics.jsonl row, flushed, on the main process (a no-op on the others); the
    file is appended to on --resume, and closed however the block ends."""
    job.run.mkdir(parents=True, exist_ok=True)
    if not job.main:
        yield lambda **row: None
        return
    with open(job.run / "metrics.jsonl", "a" if job.config.resume else "w") as f:
        def record(**row) -> None:
            f.write(json.dumps(row) + "\n")
            f.flush()

        yield record


def train(job: Job, state: TrainState, record) -> None:
    """Optimizer steps from ``state`` up to --steps, each a ``loss_step`` and a ``commit_step``, validation and
    checkpoints between them. A Ctrl-C or SIGTERM ends it with ``state.interrupted`` (KeyboardInterrupt or
    Terminated) and ``state`` at the last commit."""
    config = job.config
    loss_of = _loss_module(job)
    state.batches = data_mod.batch_order(job.data.train.examples, job.batch_size, state.epoch, config.seed)
    progress = _progress(config.steps, state.step, job.main)
    state.tokens_seen, state.t0 = 0, time.time()
    state.rng = _rng_state(job.device)
    previous = {signum: signal.signal(signum, _raise_stop) for signum in _STOPS}
    threads = threads_for(config.threads, job.device)
    job.model.train()
    try:
        while state.step < config.steps and not state.stopped:
            with threads.step():
                loss = loss_step(job, loss_of, state)
                commit_step(job, state, loss, record, progress)
            _between_steps(job, state, record)
    except KeyboardInterrupt as stop:  # Terminated too
        state.interrupted = type(stop)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        progress.close()
        threads.restore()
    state.train_seconds = time.time() - state.t0


def loss_step(job: Job, loss_of, state: TrainState) -> torch.Tensor:
    """Forward and backward of the global batch at ``state``'s position: this process's share, in --grad-accum
    micro-batches whose gradients sync on the last only. Returns the batch's mean loss (a TrainingError
    when it is not finite)."""
    config, examples, micro = job.config, job.data.train.examples, job.micro
    if state.position >= len(state.batches):  # the epoch is done: the next one's order
        state.epoch, state.position = state.epoch + 1, 0
        state.batches = data_mod.batch_order(examples, job.batch_size, state.epoch, config.seed)
    batch_ids = state.batches[state.position]
    mine = batch_ids[job.rank * micro * config.grad_accum:(job.rank + 1) * micro * config.grad_accum]
    labelled = sum(sum(1 for x in examples[i]["labels"][1:] if x != data_mod.IGNORE) for i in batch_ids)
    step_loss = torch.zeros((), device=job.device)
    for m in range(config.grad_accum):
        batch = data_mod.collate([examples[i] for i in mine[m * micro:(m + 1) * micro]], job.tokenizer.pad_token_id)
        state.tokens_seen += int(batch["attention_mask"].sum())
        with _gradient_sync(loss_of, job.sharded, sync=m == config.grad_accum - 1):
            loss, n = loss_of(**_on(batch, job.device))
            # Weight by label count so the step's loss is the mean over the whole global batch.
            scaled = loss * n * job.world / labelled
            (scaled + lk.regularization(job.model) / config.grad_accum).backward()
        step_loss += scaled.detach()
    if job.world > 1:
        import torch.distributed as dist

        dist.all_reduce(step_loss)
        step_loss /= job.world
    if not torch.isfinite(step_loss):
        kept = f"the last good checkpoint is {state.last_good}" if state.last_good else "no checkpoint was written"
        raise TrainingError(f"loss is {step_loss.item()} at step {state.step + 1}; stopping ({kept})")
    return step_loss


def commit_step(job: Job, state: TrainState, loss: torch.Tensor, record, progress) -> None:
    """Clip the gradients, then commit the step whole (a Ctrl-C or SIGTERM waits for it): AdamW update, schedule,
    the methods' per-step hooks (``lk.step``), counters, random state, the metrics row; and the warning, once,
    when the losses say the run has diverged (``diverged``: said, and a metrics row of its own)."""
    if job.config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(job.params, job.config.max_grad_norm)
    with _stops_held():
        job.optimizer.step()
        lr = job.scheduler.get_last_lr()[0]  # the rate this step used
        job.scheduler.step()
        lk.step(job.model, state.step)
        job.optimizer.zero_grad(set_to_none=True)
        state.step, state.position = state.step + 1, state.position + 1
        state.rng = _rng_state(job.device)
        rate = state.tokens_seen * job.world / max(time.time() - state.t0, 1e-9)
        state.losses.append(loss.item())
        record(step=state.step, loss=state.losses[-1], lr=lr, tokens_per_s=rate)
        progress.update(state.losses[-1], rate)
        if state.diverged is None and (why := diverged(state.losses)):
            state.diverged = (f"the run has diverged at step {state.step}: {why}; a lower --lr than "
                              f"{job.config.lr:g} helps")
            record(step=state.step, diverged=state.diverged)
            job.say(f"warning: {state.diverged}")


# The divergence rule (``diverged``): the mean loss of the last DIVERGED_WINDOW steps against the first step's.
DIVERGED_WINDOW, DIVERGED_FACTOR, DIVERGED_NATS = 5, 2.0, 1.0


def diverged(losses: list[float]) -> str | None:
    """Why a run whose training loss at each step from its first is ``losses`` has diverged, or None.

    The rule: the mean loss of the last 5 steps is more than twice the first step's and more than 1 nat above
    it. The first step's loss is that of the model as it started, before any update, and a run that learns goes
    below it. Averaging 5 steps keeps one hard batch from tripping the rule, the factor 2 keeps the noise of the
    first batch's loss from doing so, and the nat keeps a loss near zero from doing so by doubling (0.01 to 0.03
    is no divergence; a nat more is each label's probability e times lower, on average). A diverged run is far
    past both: SmolLM2-135M at --lr 1e4 went from 0.64 to 10.80, ln 49152, the loss of a uniform guess over its
    vocabulary, and stayed there; a loss that goes on to inf or NaN is stopped by ``loss_step``. Not used: the
    size of the updates or weights, which under AdamW follows the learning rate (each step moves each weight by
    about lr) whether or not the loss gets worse, and has no scale to compare with for methods whose trained
    tensors start at zero. Neither HF Trainer nor torchtune warns of divergence.
    """
    if len(losses) <= DIVERGED_WINDOW:
        return None
    first, recent = losses[0], sum(losses[-DIVERGED_WINDOW:]) / DIVERGED_WINDOW
    if recent <= DIVERGED_FACTOR * first or recent <= first + DIVERGED_NATS:
        return None
    return (f"the mean training loss of the last {DIVERGED_WINDOW} steps, {recent:.3g}, is over twice the first "
            f"step's, {first:.3g}, and over 1 nat above it")


def _between_steps(job: Job, state: TrainState, record) -> None:
    """The validation loss every --val-every steps and at the last (``_validate``), and a checkpoint every
    --save-every (the last step's, early stopping's included, is written after the loop)."""
    config = job.config
    due = config.val_every and (state.step % config.val_every == 0 or state.step == config.steps)
    if due and job.data.validation.examples:
        _validate(job, state, record)
    if config.save_every and state.step % config.save_every == 0 and state.step < config.steps and not state.stopped:
        weights = _full_state(job.model, job.optimizer)
        if job.main:
            state.last_good = _checkpoint(job, state, weights)


def _validate(job: Job, state: TrainState, record) -> None:
    """Measure and record the validation loss; under --keep best write the weights of a new lowest one
    (``best_path``), and under --early-stopping end the loop after that many validations without one."""
    config = job.config
    # Under FSDP every process takes part in each forward, so all of them validate; under DDP the main process
    # does. Each process then takes the main's loss, so all decide alike (the best's weights are collective).
    loss = (validation_loss(job.model, job.data.validation.examples, job.tokenizer.pad_token_id,
                            config.eval_batch_size, job.device, show=job.main)
            if job.main or job.strategy == "fsdp" else math.nan)
    loss = _from_main(job, loss)
    record(step=state.step, val_loss=loss)
    if _tally(state, config, state.step, loss) and config.keep == "best":
        tensors, _ = _full_state(job.model, job.optimizer)
        if job.main:
            _write_best(job.run, state.step, tensors)
    if state.stopped:
        job.say(f"early stopping at step {state.step}: no lower validation loss in {state.since_best} validations "
                f"(the lowest, {state.best_loss:.4f}, at step {state.best_step})")


def _tally(state: TrainState, config, step: int, loss: float) -> bool:
    """Count validation ``loss`` of ``step`` into ``state``'s best and the validations since (``stopped`` after
    --early-stopping of them); whether it is the lowest so far."""
    lowest = loss < state.best_loss
    if lowest:
        state.best_loss, state.best_step, state.since_best = loss, step, 0
    else:
        state.since_best += 1
    state.stopped = bool(config.early_stopping) and state.since_best >= config.early_stopping
    return lowest


def _from_main(job: Job, value: float) -> float:
    """``value`` as the main process has it, on every process."""
    if job.world == 1:
        return value
    import torch.distributed as dist

    tensor = torch.tensor(value, dtype=torch.float64, device=job.device)
    dist.broadcast(tensor, src=0)
    return tensor.item()


def best_path(run: Path, step: int) -> Path:
    """The file of run ``run``'s trained tensors at ``step``, its lowest validation loss (--keep best)."""
    return run / "checkpoints" / f"best-step-{step:06d}.safetensors"


def _write_best(run: Path, step: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` as the best of ``run`` at ``step``, atomically, and remove the best before it."""
    path = best_path(run, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(path, tensors)
    for old in path.parent.glob("best-step-*.safetensors"):
        if old != path:
            old.unlink()


def _resume_validation(job: Job, state: TrainState) -> None:
    """After --resume: the lowest validation loss, and the validations since, of metrics.jsonl's rows up to the
    resumed step, so --keep best and --early-stopping go on as in the uninterrupted run. A lowest loss whose
    weights --keep best finds no file of (a run with --keep last before) is forgotten, as said."""
    path = job.run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    for row in rows:  # up to the step read here, not trusting the main process to have cut the file yet
        if "val_loss" in row and row["step"] <= state.step:
            _tally(state, job.config, row["step"], row["val_loss"])
    if job.config.keep == "best" and state.best_step and not best_path(job.run, state.best_step).is_file():
        job.say(f"--keep best: the weights of step {state.best_step}, the lowest validation loss so far, were not "
                f"kept ({best_path(job.run, state.best_step)} is missing); the best is chosen from step "
                f"{state.step} on")
        state.best_loss, state.best_step = math.inf, 0


def _loss_module(job: Job):
    """The completion loss of the model: the differentiable step, wrapped in DDP under --strategy ddp."""
    loss_of = CompletionLoss(job.model)
    if job.strategy != "ddp":
        return loss_of
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(loss_of, device_ids=[job.device.index] if job.device.type == "cuda" else None)


def _checkpoint(job: Job, state: TrainState, weights: tuple[dict, dict]) -> Path:
    """Checkpoint ``state``'s step with ``weights`` (``_full_state``), keeping the last --keep-last."""
    return save_checkpoint(job.run, state.step, weights, job.scheduler, (state.epoch, state.position), state.rng,
                           job.config.keep_last)


def finish(job: Job, state: TrainState, weights: tuple[dict, dict], record) -> dict:
    """Put back the weights --keep names (the best step's, or the last), save the adapter and its prompt format,
    measure accuracy after, per group too; the summary (on the other processes: sources, steps and batch size
    only)."""
    config = job.config
    best = config.keep == "best" and state.best_step
    scored = state.best_step if best else state.step
    summary = {**job.data.sources._asdict(), "steps": state.step, "batch_size": job.batch_size}
    if not job.main:
        return summary
    if config.keep == "best" and not best:
        job.say(f"--keep best: no validation loss was measured; the adapter is the last step's, {state.step}")
    tensors = read_tensors(best_path(job.run, scored)) if scored != state.step else None
    model = job.model
    if job.strategy == "fsdp":  # evaluate and save a whole copy: the trained one is sharded across processes
        model, _ = models.load(config.model, dtype=job.dtype, log=job.say, device=job.device)
        prepare(model, job.recipe, config, job.say)
        model.load_state_dict(weights[0] if tensors is None else tensors, strict=False)
    elif tensors is not None:
        model.load_state_dict(tensors, strict=False)
    lk.save(model, job.run / "adapter")
    data_mod.write_prompt_format(job.run / "adapter", job.data.prompt_format)
    t1 = time.time()
    evaluation = job.data.evaluation
    if evaluation:
        job.say(f"scoring the adapter of step {scored} on {job.data.sources.test}")
    after, rows = accuracy(model, job.tokenizer, evaluation, config, job.data.groups) if evaluation else (None, [])
    eval_seconds = time.time() - t1
    atomic_write(job.run / "predictions.jsonl", lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))
    record(accuracy_before=job.before, accuracy_after=after, scored_step=scored)
    return {**summary, "dtype": models.dtype_name(job.dtype), "accuracy_before": job.before, "accuracy_after": after,
            "eval_examples": len(evaluation), "groups": per_group(rows) if job.data.groups else None,
            "groups_before": job.before_groups, "scored_step": scored,
            "best_val_loss": None if math.isinf(state.best_loss) else state.best_loss, "stopped_early": state.stopped,
            "trainable": job.trainable, "total": job.total, "seconds": time.time() - job.started,
            "train_seconds": state.train_seconds, "eval_seconds": eval_seconds,
            "tokens_per_s": state.tokens_seen * job.world / max(state.train_seconds, 1e-9),
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "truncated": job.data.train.truncated, "dropped": job.data.train.dropped,
            "adapter": str(job.run / "adapter")}


class _progress:
    """A tqdm bar on stderr: of training steps with loss and tokens/s, or of examples evaluated (``advance``).
    Silent where ``show`` is False (other ranks), off a terminal where it is None, and without tqdm; gone once
    it ends unless ``leave``."""

    def __init__(self, total: int, done: int, show: bool | None, desc: str = "training", unit: str = "step",
                 leave: bool = True):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        self.bar = tqdm(total=total, initial=done, desc=desc, unit=unit, disable=None if show is None else not show,
                        leave=leave, file=sys.stderr) if tqdm else None

    def update(self, loss: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
            self.bar.update(1)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _plot(run: Path) -> None:
    """loss.png: training loss per step and validation loss (needs matplotlib; skipped without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (completion tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(run / "loss.png", lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def _report(run: Path, config: FinetuneConfig, recipe: Method, s: dict) -> None:
    """report.md: the data's sources, accuracy before and after (per group), the adapter scored, the method,
    figures of the run, the command and the settings it used."""
    def pct(v):
        return "-" if v is None else f"{v:.1f}%"

    if config.keep == "best" and s["best_val_loss"] is not None:
        why = f"the lowest validation loss, {s['best_val_loss']:.4f} (--keep best)"
    else:
        why = "the last (--keep last)" if config.keep == "last" else "the last: no validation loss was measured"
    stopped = (f"; stopped early: no lower validation loss in {config.early_stopping} validations (--early-stopping "
               f"{config.early_stopping})" if s["stopped_early"] else "")
    warning = f"| warning | {s['diverged']} |\n" if s.get("diverged") else ""
    groups = (f"\n## Accuracy per {config.group_by or 'task'}\n\n"
              f"{group_table(s['groups'], config.group_by or 'task', s['groups_before'])}\n" if s["groups"] else "")
    text = f"""# lorakit finetune report

| | |
|---|---|
| training data | {s['train']} |
| validation data | {s['validation']} |
| test data (exact match) | {s['test']} |
| accuracy before | {pct(s['accuracy_before'])} |
| accuracy after | {pct(s['accuracy_after'])} |
| adapter scored | step {s['scored_step']} of {s['steps']}: {why}{stopped} |
| method | `{recipe!r}` ({config.method}), targets {config.targets} |
| base dtype | {s['dtype']} |
| trainable parameters | {s['trainable']:,} of {s['total']:,} ({100 * s['trainable'] / s['total']:.3f}%) |
| steps × batch | {s['steps']} × {s['batch_size']} |
| time | {s['seconds']:.0f} s (training {s['train_seconds']:.0f} s, evaluation after {s['eval_seconds']:.0f} s) |
| tokens/s (training) | {s['tokens_per_s']:,.0f} |
| peak memory (RSS) | {s['peak_memory_mb']:,.0f} MB |
| examples truncated / dropped | {s['truncated']} / {s['dropped']} |
| adapter | `{s['adapter']}` |
{warning}{groups}
Command: `{' '.join(sys.argv)}`

Settings: `{json.dumps(_used_settings(config))}`
"""
    atomic_write(run / "report.md", lambda p: p.write_text(text))


def _used_settings(config: FinetuneConfig) -> dict:
    """``config`` as a dict, less the data settings the run did not use: no built-in task where --data trained."""
    unused = {"test_fraction"} if config.eval_data or not config.data else set()
    if config.data:
        unused |= {"task", "train_examples", "eval_examples"}
    if config.val_data or not config.val_every:
        unused.add("val_fraction")
    return {k: v for k, v in asdict(config).items() if k not in unused}
