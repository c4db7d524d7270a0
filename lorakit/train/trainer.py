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
``--device``; bf16 autocasts there.

A checkpoint holds what the last completed step left: weights, optimizer and schedule, position in
the data, random state. A Ctrl-C in the middle of a step saves the state before it (the random state
included: the step's dropout draws are discarded with it), and one that lands while a step commits
waits for the commit, so a run resumed with ``--resume auto`` is the uninterrupted run, bit for bit.
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
from lorakit.methods.base import Method
from lorakit.train import data as data_mod
from lorakit.train import models, tasks
from lorakit.train.config import FinetuneConfig

HEAD_CHUNK = 2048  # label positions per output-head chunk


class TrainingError(LorakitError, RuntimeError):
    """Training cannot go on (a NaN/Inf loss); the message says what was kept."""


class CheckpointError(LorakitError, OSError):
    """A checkpoint directory is incomplete, or one of its files is truncated or corrupt (the message names it)."""


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
def split_records(config, train_examples: int) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records) of ``config``: its --data with --eval-data or the share carved
    off (seeded), or ``train_examples`` of its built-in task and the task's held-out split, as chat messages."""
    if config.data:
        records = data_mod.read(config.data)
        if config.eval_data:
            return records, data_mod.read(config.eval_data)
        random.Random(config.seed).shuffle(records)
        cut = max(1, int(len(records) * config.val_fraction))
        return records[cut:], records[:cut]
    train, held_out = tasks.split(config.task, train_examples, config.eval_examples, config.seed)
    return [{"messages": e.messages()} for e in train], [{"messages": e.messages()} for e in held_out]


def evaluation_pairs(records: list[dict], prompt_format: str | None, limit: int) -> list[tuple]:
    """(prompt, target) pairs for exact match from held-out ``records`` (text records have none), the prompts
    in ``prompt_format`` (``data.in_format``; None: each record's own)."""
    pairs = [(r["prompt"], r["completion"]) if "prompt" in r else (r["messages"][:-1], r["messages"][-1]["content"])
             for r in records if "text" not in r][:limit]
    return pairs if prompt_format is None else [(data_mod.in_format(p, prompt_format), t) for p, t in pairs]


class Datasets(NamedTuple):
    """What a run trains on and is measured on."""

    train: data_mod.Tokenized
    evaluation: list[tuple]  # (prompt, target) for exact match; a prompt is raw text or chat messages
    validation: data_mod.Tokenized  # held out, for the validation loss
    prompt_format: str  # "chat" or "raw": how the adapter is to be asked (data.py)


def datasets(config, tokenizer) -> Datasets:
    """The training, evaluation and validation data of ``config``, and its prompt format."""
    train, held_out = split_records(config, config.train_examples)
    prompt_format = data_mod.prompt_format_of(train, config.data or f"task {config.task}")
    validation = held_out if config.data else held_out[:64]
    return Datasets(data_mod.tokenize(train, tokenizer, config.max_length),
                    evaluation_pairs(held_out, prompt_format, config.eval_examples),
                    data_mod.tokenize(validation, tokenizer, config.max_length), prompt_format)


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


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers to ``prompts`` (raw text, or chat messages for the chat template), decoded in
    batches of similar length with the KV cache, on the model's device. Prompts are encoded exactly as
    training encodes them."""
    ids = [data_mod.prompt_ids(p, tokenizer) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    answers: list[str] = [""] * len(ids)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            batch = _on(_left_padded([ids[i] for i in index], tokenizer.pad_token_id), model.device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            for i, row in zip(index, out[:, batch["input_ids"].shape[1]:]):
                answers[i] = tokenizer.decode(row, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return answers


def _left_padded(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` padded on the left, so every row ends where generation starts."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, length - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: tensor.to(device, non_blocking=True) for key, tensor in batch.items()}


def accuracy(model, tokenizer, examples, config) -> tuple[float, list[dict]]:
    """Exact-match accuracy (%) on (prompt, target) ``examples`` and the individual predictions."""
    answers = generate(model, tokenizer, [p for p, _ in examples], config.max_new_tokens, config.eval_batch_size)
    rows = [{"prompt": p if isinstance(p, str) else p[-1]["content"], "target": t, "answer": a,
             "correct": tasks.exact_match(a, t)} for (p, t), a in zip(examples, answers)]
    return 100.0 * sum(r["correct"] for r in rows) / max(len(rows), 1), rows


@torch.no_grad()
def validation_loss(model, examples: list[dict], pad_id: int, batch_size: int, device: torch.device) -> float:
    """Mean completion loss over ``examples`` (Tokenized examples), in eval mode, on ``device``."""
    was_training = model.training
    model.eval()
    total = count = 0
    loss_of = CompletionLoss(model)
    for start in range(0, len(examples), batch_size):
        loss, n = loss_of(**_on(data_mod.collate(examples[start:start + batch_size], pad_id), device))
        total, count = total + loss.item() * n, count + n
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
    atomically and keep the last ``keep``."""
    final = run / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")  # what a kill leaves: see _remove_partial_saves
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_tensors(tmp / TENSORS, state[0])  # with a digest of the tensors, which loading checks
    torch.save({"step": step, "epoch": position[0], "batch": position[1], "optimizer": state[1],
                "scheduler": scheduler.state_dict(), **rng}, tmp / TRAINER_STATE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoints(run)[keep:]:
        shutil.rmtree(old)
    return final


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


def _resume(run: Path, resume: str, model, optimizer, scheduler, say) -> tuple[dict, Path]:
    """(trainer state, path) of the checkpoint ``--resume`` names, loaded; for ``auto`` the newest one that
    reads, saying which newer ones are damaged and skipped."""
    if resume != "auto":
        return load_checkpoint(Path(resume), model, optimizer, scheduler), Path(resume)
    found = checkpoints(run)
    if not found:
        raise ConfigError(f"--resume auto: no checkpoint in {run / 'checkpoints'}")
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


@contextlib.contextmanager
def _ctrl_c_held():
    """Hold a Ctrl-C back until the block ends: a step's optimizer update and counters change together."""
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


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


def merge_for_inference(model, log=print) -> None:
    """Merge the active adapters for evaluation at the base model's speed. Where merging is refused, for a
    weight another module shares (a tied output head) that it would change too, the model runs unmerged,
    the same function, and ``log`` says so; any other failure to merge is an error."""
    shared = models.sharing_adapted_weights(model)
    if shared:
        log(f"running unmerged (slower): {', '.join(shared)} shares a weight the adapter changes (a tied output "
            "head), which merging would change too")
        return
    lk.merge(model)


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
    with _metrics(job) as record:  # closed however the run ends
        train(job, state, record)
        weights = _full_state(job.model, job.optimizer)  # collective under FSDP: every process takes part
        path = _checkpoint(job, state, weights) if job.main else None
        if state.interrupted:
            job.say(f"interrupted at step {state.step}: checkpoint {path}; continue with --resume auto")
            raise KeyboardInterrupt
        summary = finish(job, state, weights, record)
    if job.main:
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
    model: torch.nn.Module
    tokenizer: object
    data: Datasets
    batch_size: int  # global, across processes
    before: float | None  # accuracy before training (None: skipped)
    trainable: int
    total: int  # parameters of the adapted model, packed 4-bit weights counted as weights
    params: list  # the trainable parameters (clipped)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sharded: list  # FSDP2's sharded blocks (empty otherwise)
    autocast: torch.autocast
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
    interrupted: bool = False  # a Ctrl-C ended the loop


def setup(config: FinetuneConfig, log) -> Job:
    """Check the config and build its recipe, join the process group, load the model and data, measure
    accuracy before, adapt (and quantize), shard under FSDP, and make the optimizer and schedule."""
    config.check()
    recipe = config.recipe()
    rank, world, strategy, device = _distributed(config)
    say = log if rank == 0 else (lambda *_: None)
    if config.batch_size % (world * config.grad_accum):
        raise ConfigError(f"--batch-size {config.batch_size} must divide by processes x --grad-accum "
                          f"({world} x {config.grad_accum})")
    started = time.time()
    random.seed(config.seed)
    torch.manual_seed(config.seed)  # every device's generator

    model, tokenizer = models.load(config.model, log=say, device=device)
    data = datasets(config, tokenizer)
    if not data.train.examples:
        raise ConfigError("no training examples left after tokenizing (all too long?)")
    say(f"data: {len(data.train.examples)} training examples ({data.train.truncated} truncated, "
        f"{data.train.dropped} dropped), {len(data.evaluation)} held out for evaluation; on {device}")
    batch_size = _batch_size(config, len(data.train.examples), world, say)
    before = None
    if rank == 0 and not config.skip_eval_before and data.evaluation:
        before, _ = accuracy(model, tokenizer, data.evaluation, config)
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
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)
    return Job(config, recipe, say, rank, world, strategy, device, model, tokenizer, data, batch_size, before,
               trainable, total, params, optimizer, scheduler, sharded, autocast, started)


def start(job: Job) -> TrainState:
    """Where training starts: the checkpoint --resume names loaded (weights, optimizer, schedule, random
    state; the metrics rows after it dropped), or step 0 of a fresh run, an earlier run's checkpoints removed.
    Directories of cut-off saves are removed either way."""
    state, run = TrainState(), job.run
    if job.main:
        for partial in _remove_partial_saves(run):
            job.say(f"removed {partial}: a checkpoint save that was cut off")
    if job.config.resume:
        saved, state.last_good = _resume(run, job.config.resume, job.model, job.optimizer, job.scheduler, job.say)
        state.step, state.epoch, state.position = saved["step"], saved["epoch"], saved["batch"]
        if job.main:
            _drop_metrics_after(run / "metrics.jsonl", state.step)
        job.say(f"resumed from {state.last_good} at step {state.step}")
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
    checkpoints between them. A Ctrl-C ends it with ``state.interrupted`` and ``state`` at the last commit."""
    config = job.config
    loss_of = _loss_module(job)
    state.batches = data_mod.batch_order(job.data.train.examples, job.batch_size, state.epoch, config.seed)
    progress = _progress(config.steps, state.step, job.main)
    state.tokens_seen, state.t0 = 0, time.time()
    state.rng = _rng_state(job.device)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    job.model.train()
    try:
        while state.step < config.steps:
            loss = loss_step(job, loss_of, state)
            commit_step(job, state, loss, record, progress)
            _between_steps(job, state, record)
    except KeyboardInterrupt:
        state.interrupted = True
    finally:
        signal.signal(signal.SIGINT, previous)
        progress.close()
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
            with job.autocast:
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
    """Clip the gradients, then commit the step whole (a Ctrl-C waits for it): AdamW update, schedule, the
    methods' per-step hooks (``lk.step``), counters, random state, the metrics row."""
    if job.config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(job.params, job.config.max_grad_norm)
    with _ctrl_c_held():
        job.optimizer.step()
        lr = job.scheduler.get_last_lr()[0]  # the rate this step used
        job.scheduler.step()
        lk.step(job.model, state.step)
        job.optimizer.zero_grad(set_to_none=True)
        state.step, state.position = state.step + 1, state.position + 1
        state.rng = _rng_state(job.device)
        rate = state.tokens_seen * job.world / max(time.time() - state.t0, 1e-9)
        record(step=state.step, loss=loss.item(), lr=lr, tokens_per_s=rate)
        progress.update(loss.item(), rate)


def _between_steps(job: Job, state: TrainState, record) -> None:
    """The validation loss every --val-every steps, and a checkpoint every --save-every (the last step's is
    written after the loop)."""
    config = job.config
    # Under FSDP every process takes part in each forward, so all of them validate.
    validate = config.val_every and state.step % config.val_every == 0 and job.data.validation.examples
    if validate and (job.main or job.strategy == "fsdp"):
        record(step=state.step, val_loss=validation_loss(job.model, job.data.validation.examples,
                                                         job.tokenizer.pad_token_id, config.eval_batch_size,
                                                         job.device))
    if config.save_every and state.step % config.save_every == 0 and state.step < config.steps:
        weights = _full_state(job.model, job.optimizer)
        if job.main:
            state.last_good = _checkpoint(job, state, weights)


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
    """Save the adapter and its prompt format, merge it for speed, measure accuracy after; the summary (on the
    other processes: task, steps and batch size only)."""
    config = job.config
    summary = {"task": config.task if not config.data else Path(config.data).name, "steps": state.step,
               "batch_size": job.batch_size}
    if not job.main:
        return summary
    model = job.model
    if job.strategy == "fsdp":  # evaluate and save a whole copy: the trained one is sharded across processes
        model, _ = models.load(config.model, log=job.say, device=job.device)
        prepare(model, job.recipe, config, job.say)
        model.load_state_dict(weights[0], strict=False)
    lk.save(model, job.run / "adapter")
    data_mod.write_prompt_format(job.run / "adapter", job.data.prompt_format)
    if not config.quantize:  # zero added latency; a quantized base would merge into a float copy
        merge_for_inference(model, job.say)
    t1 = time.time()
    evaluation = job.data.evaluation
    after, rows = accuracy(model, job.tokenizer, evaluation, config) if evaluation else (None, [])
    eval_seconds = time.time() - t1
    with open(job.run / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    record(accuracy_before=job.before, accuracy_after=after)
    return {**summary, "accuracy_before": job.before, "accuracy_after": after, "eval_examples": len(evaluation),
            "trainable": job.trainable, "total": job.total, "seconds": time.time() - job.started,
            "train_seconds": state.train_seconds, "eval_seconds": eval_seconds,
            "tokens_per_s": state.tokens_seen * job.world / max(state.train_seconds, 1e-9),
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "truncated": job.data.train.truncated, "dropped": job.data.train.dropped,
            "adapter": str(job.run / "adapter")}


class _progress:
    """A tqdm bar with loss and tokens/s (silent on other ranks or without tqdm)."""

    def __init__(self, total: int, done: int, show: bool):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        self.bar = tqdm(total=total, initial=done, desc="training", unit="step", disable=not show,
                        file=sys.stderr) if tqdm else None

    def update(self, loss: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
            self.bar.update(1)

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
    def pct(v):
        return "-" if v is None else f"{v:.1f}%"

    text = f"""# lorakit finetune report

| | |
|---|---|
| task | {s['task']} ({s['eval_examples']} held-out examples, exact match) |
| accuracy before | {pct(s['accuracy_before'])} |
| accuracy after | {pct(s['accuracy_after'])} |
| method | `{recipe!r}` ({config.method}), targets {config.targets} |
| trainable parameters | {s['trainable']:,} of {s['total']:,} ({100 * s['trainable'] / s['total']:.3f}%) |
| steps × batch | {s['steps']} × {s['batch_size']} |
| time | {s['seconds']:.0f} s (training {s['train_seconds']:.0f} s, evaluation after {s['eval_seconds']:.0f} s) |
| tokens/s (training) | {s['tokens_per_s']:,.0f} |
| peak memory (RSS) | {s['peak_memory_mb']:,.0f} MB |
| examples truncated / dropped | {s['truncated']} / {s['dropped']} |
| adapter | `{s['adapter']}` |

Command: `{' '.join(sys.argv)}`

Settings: `{json.dumps(asdict(config))}`
"""
    atomic_write(run / "report.md", lambda p: p.write_text(text))
