"""The fine-tuning loop behind ``lorakit finetune``: one readable function, top to bottom.

    data → adapt → evaluate (before) → [step: micro-batches → clip → AdamW → schedule → lk.step]
         → checkpoints, validation loss → save adapter → evaluate (after) → report

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
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

import lorakit as lk
from lorakit.checkpoint import atomic_write, read_tensors, write_tensors
from lorakit.errors import AdapterFileError, ConfigError, LorakitError, MergeError
from lorakit.train import data as data_mod
from lorakit.train import models, tasks
from lorakit.train.config import FinetuneConfig

HEAD_CHUNK = 2048  # label positions per output-head chunk


class TrainingError(LorakitError, RuntimeError):
    """Training cannot go on (a NaN/Inf loss); the message says what was kept."""


class CheckpointError(LorakitError, OSError):
    """A checkpoint directory is incomplete, or one of its files is truncated or corrupt (the message names it)."""


def recipe(config) -> object:
    """The ``lk`` method a config names."""
    r, a, p = config.rank, config.alpha, config.dropout
    makers = {
        "lora": lambda: lk.LoRA(rank=r, alpha=a, dropout=p), "rslora": lambda: lk.LoRA(rank=r, alpha=a, dropout=p,
                                                                                          rslora=True),
        "dora": lambda: lk.DoRA(rank=r, alpha=a, dropout=p), "pissa": lambda: lk.PiSSA(rank=r, alpha=a, dropout=p),
        "milora": lambda: lk.MiLoRA(rank=r, alpha=a, dropout=p),
        "lora_xs": lambda: lk.LoRAXS(rank=r, alpha=a, dropout=p), "svf": lambda: lk.SVF(dropout=p),
        "svft": lambda: lk.SVFT(pattern=config.svft_pattern, width=config.svft_width, dropout=p),
        "adalora": lambda: lk.AdaLoRA(init_rank=r, target_rank=min(config.target_rank, r),
                                      total_steps=config.steps, tinit=config.steps // 10,
                                      tfinal=config.steps // 5, alpha=a, dropout=p),
    }
    if config.method not in makers:
        raise ConfigError(f"unknown method {config.method!r}; choose from {', '.join(makers)}")
    return makers[config.method]()


def prepare(model, config, log=print) -> None:
    """Quantize the base if asked and adapt it: after a PiSSA/MiLoRA start is known, so that the
    quantized part is the residual (QPiSSA), else before."""
    if config.quantize:
        models.ensure_package("bitsandbytes", "bitsandbytes>=0.50", log)
    residual = config.method in ("pissa", "milora")
    if config.quantize and not residual:
        lk.quantize(model, config.quantize)
    lk.adapt(model, recipe(config), targets_of(config.targets))
    if config.quantize and residual:
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
    if config.strategy == "fsdp" and config.method == "adalora":
        raise ConfigError("AdaLoRA's rank allocator needs whole matrices; use --strategy ddp")
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


def merge_for_inference(model) -> None:
    """Merge the active adapters for evaluation at the base model's speed, unless merging is refused
    (a weight tied to another module): then the model runs unmerged, the same function."""
    try:
        lk.merge(model)
    except MergeError:
        pass


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
    config.check()
    rank, world, strategy, device = _distributed(config)
    main = rank == 0
    say = log if main else (lambda *_: None)
    if config.batch_size % (world * config.grad_accum):
        raise ConfigError(f"--batch-size {config.batch_size} must divide by processes x --grad-accum "
                          f"({world} x {config.grad_accum})")
    run = Path(config.out)
    started = time.time()
    random.seed(config.seed)
    torch.manual_seed(config.seed)  # every device's generator

    model, tokenizer = models.load(config.model, log=say, device=device)
    train, evaluation, validation, prompt_format = datasets(config, tokenizer)
    if not train.examples:
        raise ConfigError("no training examples left after tokenizing (all too long?)")
    say(f"data: {len(train.examples)} training examples ({train.truncated} truncated, {train.dropped} dropped), "
        f"{len(evaluation)} held out for evaluation; on {device}")
    batch_size = _batch_size(config, len(train.examples), world, say)

    before = None
    if main and not config.skip_eval_before and evaluation:
        before, _ = accuracy(model, tokenizer, evaluation, config)
        say(f"accuracy before: {before:.1f}%")

    prepare(model, config, say)  # on the device: bitsandbytes quantizes with its kernels there
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = sum(p.numel() for p in lk.trainable_parameters(model))
    total_params = sum(map(lk.quant.numel, model.parameters()))
    sharded = _shard(model, device, world) if strategy == "fsdp" else []  # before the optimizer: shards
    params = lk.trainable_parameters(model)
    groups = (lk.lora_plus_groups(model, config.lr, config.lora_plus_ratio, config.weight_decay)
              if config.lora_plus_ratio > 0 else [{"params": params, "weight_decay": config.weight_decay}])
    optimizer = _adamw(groups, config.lr, fused=strategy != "fsdp")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    say(f"{config.method} on {config.targets}: {trainable:,} trainable of {total_params:,} parameters "
        f"({100 * trainable / total_params:.3f}%)")

    if main:
        for partial in _remove_partial_saves(run):
            say(f"removed {partial}: a checkpoint save that was cut off")
    step, epoch, position, last_good = 0, 0, 0, None
    if config.resume:
        state, last_good = _resume(run, config.resume, model, optimizer, scheduler, say)
        step, epoch, position = state["step"], state["epoch"], state["batch"]
        if main:
            _drop_metrics_after(run / "metrics.jsonl", step)
        say(f"resumed from {last_good} at step {step}")
    elif main and checkpoints(run):
        # Left in place, an earlier run's checkpoints would outrank ours in the last-k pruning and in
        # --resume auto.
        shutil.rmtree(run / "checkpoints")
        say(f"fresh run: removed the checkpoints of an earlier run in {run / 'checkpoints'}")

    loss_of = CompletionLoss(model)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        loss_of = DistributedDataParallel(loss_of, device_ids=[device.index] if device.type == "cuda" else None)
    run.mkdir(parents=True, exist_ok=True)
    metrics = open(run / "metrics.jsonl", "a" if config.resume else "w") if main else None

    def record(**row):
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    micro = batch_size // (world * config.grad_accum)
    pad_id = tokenizer.pad_token_id
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)
    batches = data_mod.batch_order(train.examples, batch_size, epoch, config.seed)
    progress = _progress(config.steps, step, main)
    tokens_seen, t0 = 0, time.time()
    # The random state after the last completed step: what a checkpoint records, so that an interrupted
    # step's dropout draws do not leak into the resumed run (validation and saving draw none).
    rng = _rng_state(device)
    interrupted = False
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    model.train()
    try:
        while step < config.steps:
            if position >= len(batches):
                epoch, position = epoch + 1, 0
                batches = data_mod.batch_order(train.examples, batch_size, epoch, config.seed)
            batch_ids = batches[position]
            # This process's share of the global batch, in grad_accum micro-batches.
            mine = batch_ids[rank * micro * config.grad_accum:(rank + 1) * micro * config.grad_accum]
            labelled = sum(sum(1 for x in train.examples[i]["labels"][1:] if x != data_mod.IGNORE)
                           for i in batch_ids)
            step_loss = torch.zeros((), device=device)
            for m in range(config.grad_accum):
                batch = data_mod.collate([train.examples[i] for i in mine[m * micro:(m + 1) * micro]], pad_id)
                tokens_seen += int(batch["attention_mask"].sum())
                with _gradient_sync(loss_of, sharded, sync=m == config.grad_accum - 1):
                    with autocast:
                        loss, n = loss_of(**_on(batch, device))
                    # Weight by label count so the step's loss is the mean over the whole global batch.
                    scaled = loss * n * world / labelled
                    (scaled + lk.regularization(model) / config.grad_accum).backward()
                step_loss += scaled.detach()
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(step_loss)
                step_loss /= world
            if not torch.isfinite(step_loss):
                kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
                raise TrainingError(f"loss is {step_loss.item()} at step {step + 1}; stopping ({kept})")
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            with _ctrl_c_held():  # a step commits whole: update, counters, random state, metrics row
                optimizer.step()
                lr = scheduler.get_last_lr()[0]  # the rate this step used
                scheduler.step()
                lk.step(model, step)
                optimizer.zero_grad(set_to_none=True)
                step, position = step + 1, position + 1
                rng = _rng_state(device)
                rate = tokens_seen * world / max(time.time() - t0, 1e-9)
                record(step=step, loss=step_loss.item(), lr=lr, tokens_per_s=rate)
                progress.update(step_loss.item(), rate)
            # Under FSDP every process takes part in each forward, so all of them validate.
            validate = config.val_every and step % config.val_every == 0 and validation.examples
            if validate and (main or strategy == "fsdp"):
                record(step=step, val_loss=validation_loss(model, validation.examples, pad_id, config.eval_batch_size,
                                                           device))
            if config.save_every and step % config.save_every == 0 and step < config.steps:
                state = _full_state(model, optimizer)
                if main:
                    last_good = save_checkpoint(run, step, state, scheduler, (epoch, position), rng, config.keep_last)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGINT, previous)
        progress.close()
    train_seconds = time.time() - t0
    state = _full_state(model, optimizer)
    path = save_checkpoint(run, step, state, scheduler, (epoch, position), rng, config.keep_last) if main else None
    if interrupted:
        say(f"interrupted at step {step}: checkpoint {path}; continue with --resume auto")
        raise KeyboardInterrupt
    summary = {"task": config.task if not config.data else Path(config.data).name, "steps": step,
               "batch_size": batch_size}
    if main:
        if strategy == "fsdp":  # evaluate and save a whole copy: the trained one is sharded across processes
            model, _ = models.load(config.model, log=say, device=device)
            prepare(model, config, say)
            model.load_state_dict(state[0], strict=False)
        lk.save(model, run / "adapter")
        data_mod.write_prompt_format(run / "adapter", prompt_format)
        if not config.quantize:  # zero added latency; a quantized base would merge into a float copy
            merge_for_inference(model)
        t1 = time.time()
        after, rows = accuracy(model, tokenizer, evaluation, config) if evaluation else (None, [])
        eval_seconds = time.time() - t1
        with open(run / "predictions.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        record(accuracy_before=before, accuracy_after=after)
        metrics.close()
        summary.update(accuracy_before=before, accuracy_after=after, eval_examples=len(evaluation),
                       trainable=trainable, total=total_params, seconds=time.time() - started,
                       train_seconds=train_seconds, eval_seconds=eval_seconds,
                       tokens_per_s=tokens_seen * world / max(train_seconds, 1e-9),
                       peak_memory_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                       truncated=train.truncated, dropped=train.dropped, adapter=str(run / "adapter"))
        _plot(run)
        _report(run, config, summary)
    return summary


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


def _report(run: Path, config: FinetuneConfig, s: dict) -> None:
    def pct(v):
        return "-" if v is None else f"{v:.1f}%"

    text = f"""# lorakit finetune report

| | |
|---|---|
| task | {s['task']} ({s['eval_examples']} held-out examples, exact match) |
| accuracy before | {pct(s['accuracy_before'])} |
| accuracy after | {pct(s['accuracy_after'])} |
| method | {config.method}, rank {config.rank}, alpha {config.alpha}, targets {config.targets} |
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
