"""Training data: read JSONL or CSV, tokenize with the loss on the completion only, batch.

Accepted records (one per JSONL line, or CSV rows with these column names):
  * ``{"prompt": ..., "completion": ...}``: plain text; the loss covers the completion and EOS;
  * ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat
    template; the loss covers the last message, which must be the assistant's;
  * ``{"text": ...}``: the loss covers every token.
A malformed line is an error naming the file and line. Examples longer than ``max_length`` tokens
are cut at the end (counted); one left with no completion token is dropped (counted).

An adapter is asked questions in the format it was trained on, its *prompt format*: ``"chat"``
(the chat template, for messages and the built-in tasks) or ``"raw"`` (the prompt text as it is,
for prompt/completion and text data). The trainer writes it beside the adapter (``PROMPT_FILE``)
and ``lorakit eval`` and ``generate`` read it back.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.checkpoint import atomic_write
from lorakit.errors import LorakitError

IGNORE = -100  # label of positions without loss (prompt, padding)
# Beside adapter_config.json rather than in it: PEFT before 0.13 refuses a config key it does not know
# (TypeError) and later releases drop it with an "upgrade PEFT" warning, so the adapter's files stay PEFT's.
PROMPT_FILE = "lorakit_prompt.json"
PROMPT_FORMATS = ("chat", "raw")


class DataError(LorakitError, ValueError):
    """A data file is unreadable or a record in it is malformed (the message names file and line)."""


def _record(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if (not isinstance(messages, list) or not messages or
                any(not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m
                    for m in messages)):
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's (it is what the model learns)")
        return {"messages": messages}
    if "prompt" in obj or "completion" in obj:
        if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("completion"), str):
            raise DataError(f"{where}: 'prompt' and 'completion' must both be strings")
        return {"prompt": obj["prompt"], "completion": obj["completion"]}
    if isinstance(obj.get("text"), str):
        return {"text": obj["text"]}
    raise DataError(f"{where}: a record needs 'prompt' and 'completion', 'messages', or 'text'; "
                    f"it has {sorted(obj)}")


def read(path: str | Path) -> list[dict]:
    """The records of a ``.jsonl`` / ``.json`` (one object per line) or ``.csv`` file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    records = []
    with open(path, encoding="utf-8", newline="") as f:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(f)
            for row in reader:
                records.append(_record({k: v for k, v in row.items() if k is not None and v is not None},
                                       f"{path}:{reader.line_num}"))
        else:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
                records.append(_record(obj, f"{path}:{number}"))
    if not records:
        raise DataError(f"{path}: no records")
    return records


@dataclass
class Tokenized:
    """Token ids with labels, and what tokenizing had to cut."""

    examples: list[dict] = field(default_factory=list)  # {"input_ids": [...], "labels": [...]}
    truncated: int = 0
    dropped: int = 0


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _chat_prefix(tokenizer, messages: list[dict]) -> str:
    """The chat template's rendering of ``messages`` up to the assistant's turn."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_ids(prompt: str | list[dict], tokenizer) -> list[int]:
    """The ids a model continues from, exactly as training encodes a prompt: chat messages through the
    chat template (which writes its own special tokens), raw text with the tokenizer's special tokens."""
    if isinstance(prompt, list):
        return _encode(tokenizer, _chat_prefix(tokenizer, prompt))
    return _encode(tokenizer, prompt, special=True)


def prompt_format_of(records: list[dict], where: str) -> str:
    """The prompt format of training ``records``: "chat" for messages, "raw" for prompt/completion or text;
    a file that mixes messages with prompt/completion records is an error (one adapter, one format)."""
    kinds = {"messages" in r for r in records if "text" not in r}
    if len(kinds) > 1:
        raise DataError(f"{where}: mixes chat messages with prompt/completion records; an adapter answers in one "
                        "format, so write them all one way")
    return "chat" if kinds == {True} else "raw"


def in_format(prompt: str | list[dict], prompt_format: str) -> str | list[dict]:
    """``prompt`` (raw text, or chat messages) as a prompt of ``prompt_format``: raw text becomes one user
    message; a conversation becomes raw text only when it is one user message."""
    if prompt_format == "chat":
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if isinstance(prompt, str):
        return prompt
    if len(prompt) != 1 or prompt[0]["role"] != "user":
        raise DataError(f"this adapter was trained on raw prompts; a conversation of {len(prompt)} messages has no "
                        "raw form (give it one user message)")
    return prompt[0]["content"]


def write_prompt_format(adapter_dir: str | Path, prompt_format: str) -> None:
    """Record the prompt format an adapter was trained on, in ``PROMPT_FILE`` in its directory."""
    record = json.dumps({"prompt_format": prompt_format}) + "\n"
    atomic_write(Path(adapter_dir) / PROMPT_FILE, lambda p: p.write_text(record))


def read_prompt_format(adapter_dir: str | Path) -> str | None:
    """The prompt format recorded beside an adapter, or None where there is none (PEFT's adapters)."""
    path = Path(adapter_dir) / PROMPT_FILE
    if not path.is_file():
        return None
    try:
        prompt_format = json.loads(path.read_text()).get("prompt_format")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise DataError(f"{path}: not a prompt-format record ({e})") from None
    if prompt_format not in PROMPT_FORMATS:
        raise DataError(f"{path}: prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    return prompt_format


def _pieces(record: dict, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one record."""
    if "messages" in record:
        messages = record["messages"]
        prefix = _chat_prefix(tokenizer, messages[:-1])
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prefix):
            raise DataError("the chat template renders the conversation and its prefix inconsistently")
        return _encode(tokenizer, prefix), _encode(tokenizer, full[len(prefix):])
    if "text" in record:
        return [], _encode(tokenizer, record["text"], special=True)
    return prompt_ids(record["prompt"], tokenizer), _encode(tokenizer, record["completion"]) + [tokenizer.eos_token_id]


def tokenize(records: list[dict], tokenizer, max_length: int) -> Tokenized:
    """Token ids and labels (prompt positions ``IGNORE``) of every record, cut to ``max_length``."""
    out = Tokenized()
    for record in records:
        prompt, completion = _pieces(record, tokenizer)
        ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
        if len(ids) > max_length:
            out.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):  # nothing left to predict
            out.dropped += 1
            continue
        out.examples.append({"input_ids": ids, "labels": labels})
    return out


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_order(examples: list[dict], batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """Batches of example indices for one epoch (``batch_size`` at most ``len(examples)``): shuffled, then
    grouped by similar length to cut padding; the incomplete ones are left out.

    Deterministic in (seed, epoch), so a resumed run sees the same batches.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(examples)))
    rng.shuffle(order)
    # Sort within windows of 16 batches by length, then shuffle the batches themselves.
    window = 16 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(examples[i]["input_ids"]))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return [b for b in batches if len(b) == batch_size]
