"""Training data: read JSONL or CSV, tokenize with the loss on the completion only, batch.

Accepted records (one per JSONL line, or CSV rows with these column names):
  * ``{"prompt": ..., "completion": ...}``: plain text; the loss covers the completion and EOS;
  * ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat
    template; the loss covers the last message, which must be the assistant's;
  * ``{"text": ...}``: the loss covers every token.
A file is UTF-8 (a byte-order mark is skipped) unless ``encoding`` names another; bytes that do not
decode and a malformed line are errors naming the file, the line and the position in it. Examples
longer than ``max_length`` tokens are cut at the end; one left with no completion token is dropped;
both are counted, and named by file and line.

An adapter is asked questions in the format it was trained on, its *prompt format* (``PromptFormat``):
``"chat"`` (the chat template, for messages and the built-in tasks) or ``"raw"`` (the prompt text as
it is, for prompt/completion and text data). A chat format also holds the system prompt (the
template's default, none, or a text: ``--system-prompt``) and the chat template (the tokenizer's own,
or a Jinja text: ``--chat-template``) it was trained with. The trainer writes it beside the adapter
(``PROMPT_FILE``) and ``lorakit eval``, ``generate`` and ``serve`` read it back; ``in_format`` puts a
prompt in it and ``prompt_ids`` encodes it, for training and asking alike.
"""

from __future__ import annotations

import codecs
import csv
import functools
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.checkpoint import atomic_write
from lorakit.errors import ConfigError, LorakitError

IGNORE = -100  # label of positions without loss (prompt, padding)
# Beside adapter_config.json rather than in it: PEFT before 0.13 refuses a config key it does not know
# (TypeError) and later releases drop it with an "upgrade PEFT" warning, so the adapter's files stay PEFT's.
PROMPT_FILE = "lorakit_prompt.json"
PROMPT_FORMATS = ("chat", "raw")
NAMED = 5  # examples a summary names of those cut or dropped; the rest are counted


class DataError(LorakitError, ValueError):
    """A data file is unreadable or a record in it is malformed (the message names file and line)."""


class PromptFormat(str):
    """A prompt format: the string "chat" or "raw" (a str, so it compares and is written as the plain formats
    were), with, for chat, the ``system_prompt`` (None: the chat template's own default; "": no system message;
    else that text) and the ``chat_template`` (None: the tokenizer's own; else a Jinja text) to render with."""

    system_prompt: str | None
    chat_template: str | None

    def __new__(cls, kind: str = "chat", system_prompt: str | None = None, chat_template: str | None = None):
        if kind not in PROMPT_FORMATS:
            raise DataError(f"prompt_format must be one of {PROMPT_FORMATS}, got {kind!r}")
        if kind == "raw" and (system_prompt, chat_template) != (None, None):
            raise DataError("a raw prompt format has no system prompt or chat template: the chat template writes them")
        self = super().__new__(cls, kind)
        self.system_prompt, self.chat_template = system_prompt, chat_template
        return self

    @classmethod
    def of(cls, value: str) -> PromptFormat:
        """``value`` as a PromptFormat: itself, or the plain format "chat" or "raw" it names."""
        return value if isinstance(value, PromptFormat) else cls(value)

    def record(self) -> dict:
        """What ``PROMPT_FILE`` holds: the format, and the system prompt and chat template where not the default."""
        chosen = {"system_prompt": self.system_prompt, "chat_template": self.chat_template}
        return {"prompt_format": str(self), **{k: v for k, v in chosen.items() if v is not None}}

    def __repr__(self) -> str:
        return f"PromptFormat({', '.join(f'{k}={v!r}' for k, v in self.record().items())})"


CHAT = PromptFormat("chat")


class Conversation(list):
    """Chat messages and the ``prompt_format`` they are rendered in: what ``in_format`` makes of a prompt for a
    chat format, and ``prompt_ids`` encodes."""

    def __init__(self, messages, prompt_format: PromptFormat = CHAT):
        super().__init__(messages)
        self.prompt_format = prompt_format


class Record(dict):
    """A record's fields, and ``where`` it was read (``file:line``), by which tokenizing names the cut ones."""

    def __init__(self, fields: dict, where: str):
        super().__init__(fields)
        self.where = where


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
        if len(messages) < 2:
            raise DataError(f"{where}: the assistant's message needs one before it to answer (a text alone is a "
                            "'text' record)")
        return {"messages": messages}
    if "prompt" in obj or "completion" in obj:
        if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("completion"), str):
            raise DataError(f"{where}: 'prompt' and 'completion' must both be strings")
        return {"prompt": obj["prompt"], "completion": obj["completion"]}
    if isinstance(obj.get("text"), str):
        return {"text": obj["text"]}
    raise DataError(f"{where}: a record needs 'prompt' and 'completion', 'messages', or 'text'; "
                    f"it has {sorted(obj)}")


def _with_fields(record: dict, obj: dict) -> dict:
    """``record`` with ``obj``'s other fields (a ``task``, an id) under ``"fields"``, apart from the keys that
    make its kind: ``--group-by`` reads them."""
    fields = {k: v for k, v in obj.items() if k is not None and k not in ("messages", "prompt", "completion", "text")}
    return {**record, "fields": fields} if fields else record


def read(path: str | Path, encoding: str = "utf-8") -> list[dict]:
    """The records of a ``.jsonl`` / ``.json`` (one object per line) or ``.csv`` file in ``encoding``, each a
    ``Record`` that knows its line; fields beside the record's own are kept under ``"fields"``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    text = _text(path, encoding)
    records = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            for row in reader:
                where = f"{path}:{reader.line_num}"
                records.append(Record(_with_fields(_record({k: v for k, v in row.items() if k is not None and
                                                            v is not None}, where), row), where))
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    else:
        # Lines end at "\n" alone: a JSON string may hold other line separators (U+2028) as they are.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}, after "
                                f"{line[max(0, e.pos - 30):e.pos]!r})") from None
            records.append(Record(_with_fields(_record(obj, where), obj), where))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _text(path: Path, encoding: str) -> str:
    """The text of ``path`` in ``encoding`` (UTF-8's byte-order mark skipped, as Windows editors write one); a
    byte that does not decode is a DataError naming its line, byte offset and ``--encoding``."""
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise ConfigError(f"--encoding {encoding!r}: no such text encoding (utf-8, latin-1, cp1252, utf-16, "
                          "...)") from None
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the data file ({e.strerror})") from None
    try:
        return raw.decode("utf-8-sig" if codec == "utf-8" else codec)
    except UnicodeDecodeError as e:
        line, start = raw.count(b"\n", 0, e.start) + 1, raw.rfind(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not {codec} text: byte 0x{raw[e.start]:02x} at byte offset {e.start} "
                        f"(byte {e.start - start + 1} of the line) does not decode ({e.reason}); a file in another "
                        "encoding needs --encoding, e.g. --encoding latin-1") from None


@dataclass
class Tokenized:
    """Token ids with labels, and what tokenizing had to cut: where each record cut or dropped was read."""

    examples: list[dict] = field(default_factory=list)  # {"input_ids": [...], "labels": [...]}
    truncated_at: list[str] = field(default_factory=list)  # file:line ("example N" for generated ones), in order
    dropped_at: list[str] = field(default_factory=list)
    hint: str = ""  # what would leave more of the examples, where tokenizing knows

    @property
    def truncated(self) -> int:
        return len(self.truncated_at)

    @property
    def dropped(self) -> int:
        return len(self.dropped_at)

    def summary(self) -> str:
        """"T truncated, D dropped", naming the first few of each by file and line, and the hint if any was cut."""
        text = f"{_named(self.truncated_at, 'truncated')}, {_named(self.dropped_at, 'dropped')}"
        return f"{text}; {self.hint}" if self.hint and self.truncated_at else text


def _named(places: list[str], what: str) -> str:
    if not places:
        return f"0 {what}"
    more = f" and {len(places) - NAMED} more" if len(places) > NAMED else ""
    return f"{len(places)} {what} ({', '.join(places[:NAMED])}{more})"


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


_PROBE = "lorakit-system-probe"  # the system text a rendering is cut at (--system-prompt none)


def chat_text(messages: list[dict], tokenizer, prompt_format: PromptFormat = CHAT,
              generation_prompt: bool = True) -> str:
    """``messages`` rendered by ``prompt_format``'s chat template and with its system prompt where they have no
    system message of their own (the template's default, none, or the text); with ``generation_prompt``, up to
    the opening of the assistant's turn."""
    template, system = prompt_format.chat_template, prompt_format.system_prompt
    if system is None or (messages and messages[0]["role"] == "system"):
        return _render(tokenizer, messages, template, generation_prompt)
    if system:
        return _render(tokenizer, [{"role": "system", "content": system}, *messages], template, generation_prompt)
    # None at all: a template that writes a default system prompt where there is no system message (SmolLM2's,
    # Qwen2's) has no switch for it, and an empty system message still writes an empty turn (4 tokens). So the
    # conversation is rendered after a system turn, which is then cut out.
    preamble, turn = _system_turn(tokenizer, template or _template_of(tokenizer))
    text = _render(tokenizer, [{"role": "system", "content": _PROBE}, *messages], template, generation_prompt)
    if not text.startswith(preamble + turn):
        raise DataError("--system-prompt none: the chat template writes its system turn differently before these "
                        "messages; give --chat-template FILE with a template that writes none")
    return preamble + text[len(preamble + turn):]


def _template_of(tokenizer) -> str:
    try:
        return tokenizer.get_chat_template()
    except ValueError as e:
        raise DataError(f"the tokenizer has no chat template ({e})") from None


def _render(tokenizer, messages: list[dict], template: str | None, generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=generation_prompt,
                                             tokenize=False)
    except (TemplateError, ValueError) as e:
        line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise DataError(f"the chat template cannot render the conversation{line}: {e}") from None


@functools.lru_cache(maxsize=8)
def _system_turn(tokenizer, template: str) -> tuple[str, str]:
    """(what ``template`` writes before the first message, the turn it writes for a system message ``_PROBE``).

    The turn's start is where its header, with "system" read as "user", is the header of the user turn after it
    (ChatML's ``<|im_start|>system``, Llama 3's ``<|start_header_id|>system<|end_header_id|>``); what is before is
    the preamble (Llama 3's ``<|begin_of_text|>``). A DataError where there is no such point: a template that
    writes a system turn of its own into every conversation (Llama 3.1's dates) cannot leave it out.
    """
    system, user = {"role": "system", "content": _PROBE}, {"role": "user", "content": _PROBE}
    try:
        alone = _render(tokenizer, [system], template, False)
        pair = _render(tokenizer, [system, user], template, False)
    except DataError as e:
        raise DataError(f"--system-prompt none: {e}") from None
    head = alone.partition(_PROBE)[0]
    user_head = pair[len(alone):].partition(_PROBE)[0] if pair.startswith(alone) and _PROBE in alone else None
    for cut in range(len(head) + 1):
        if "system" in head[cut:] and head[cut:].replace("system", "user") == user_head:
            return alone[:cut], alone[cut:]
    raise DataError("--system-prompt none: this chat template writes no system turn that lorakit can find the bounds "
                    "of and leave out; give --chat-template FILE with a template that writes none")


def default_system_tokens(tokenizer, prompt_format: PromptFormat = CHAT) -> int:
    """Tokens that ``prompt_format``'s chat template adds to every conversation without a system message of its
    own, its default system prompt (0 where it adds none, or where it cannot be left out to measure)."""
    question = [{"role": "user", "content": "?"}]
    try:
        none = PromptFormat("chat", "", prompt_format.chat_template)
        return (len(prompt_ids(Conversation(question, PromptFormat("chat", None, prompt_format.chat_template)),
                               tokenizer)) - len(prompt_ids(Conversation(question, none), tokenizer)))
    except DataError:
        return 0


def prompt_ids(prompt: str | list[dict], tokenizer) -> list[int]:
    """The ids a model continues from, exactly as training encodes a prompt: chat messages through the chat template
    (which writes its own special tokens), as a ``Conversation`` has its prompt format render them (plain messages:
    the template's defaults); raw text with the tokenizer's special tokens."""
    if isinstance(prompt, list):
        return _encode(tokenizer, chat_text(prompt, tokenizer, getattr(prompt, "prompt_format", CHAT)))
    return _encode(tokenizer, prompt, special=True)


def chat_settings(system_prompt: str = "", chat_template: str = "") -> dict:
    """``PromptFormat``'s system_prompt and chat_template as ``--system-prompt`` (a text; none: no system message;
    empty: the template's default) and ``--chat-template`` (a Jinja file; empty: the tokenizer's own) choose them,
    those given only."""
    settings = {}
    if system_prompt:
        settings["system_prompt"] = "" if system_prompt.strip().lower() == "none" else system_prompt
    if chat_template:
        settings["chat_template"] = read_chat_template(chat_template)
    return settings


def read_chat_template(path: str | Path) -> str:
    """The text of the Jinja chat template file ``path``, compiled as transformers compiles it (a ConfigError
    names the line of a syntax error)."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--chat-template {path}: cannot read the template ({e})") from None
    if not text.strip():
        raise ConfigError(f"--chat-template {path}: the file is empty")
    try:
        _compile_jinja_template(text)
    except TemplateSyntaxError as e:
        raise ConfigError(f"--chat-template {path}:{e.lineno}: not a Jinja template ({e.message})") from None
    return text


def prompt_format_of(records: list[dict], where: str, system_prompt: str = "", chat_template: str = "") -> PromptFormat:
    """The prompt format of training ``records``: chat for messages, raw for prompt/completion or text, with
    ``--system-prompt`` and ``--chat-template`` as given (``chat_settings``). A file that mixes messages with
    prompt/completion records is an error (one adapter, one format), as is raw data with either flag."""
    kinds = {"messages" in r for r in records if "text" not in r}
    if len(kinds) > 1:
        raise DataError(f"{where}: mixes chat messages with prompt/completion records; an adapter answers in one "
                        "format, so write them all one way")
    kind = "chat" if kinds == {True} else "raw"
    settings = chat_settings(system_prompt, chat_template)
    if kind == "raw" and settings:
        flags = " and ".join(f"--{k.replace('_', '-')}" for k in settings)
        raise ConfigError(f"{where}: {flags} shape chat prompts, and this data is prompt/completion (or text) "
                          "records, trained and asked as the raw prompt text; write it as messages to train through "
                          "the chat template")
    return PromptFormat(kind, **settings)


def in_format(prompt: str | list[dict], prompt_format: str) -> str | Conversation:
    """``prompt`` (raw text, or chat messages) as a prompt of ``prompt_format`` (a ``PromptFormat``, or "chat" or
    "raw"), which ``prompt_ids`` encodes as training did: for chat a ``Conversation``, raw text as one user
    message; for raw the text, a conversation only where it is one user message."""
    prompt_format = PromptFormat.of(prompt_format)
    if prompt_format == "chat":
        return Conversation([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt,
                            prompt_format)
    if isinstance(prompt, str):
        return prompt
    if len(prompt) != 1 or prompt[0]["role"] != "user":
        raise DataError(f"this adapter was trained on raw prompts; a conversation of {len(prompt)} messages has no "
                        "raw form (give it one user message)")
    return prompt[0]["content"]


ASKED = {"chat": "through the chat template", "raw": "as raw prompt text"}


def format_mismatch(asked: str, recorded: str | None) -> str | None:
    """A warning where a prompt put ``asked`` ("chat" or "raw") goes to an adapter trained on ``recorded``
    prompts; None where they agree or the adapter records none."""
    if recorded is None or str(asked) == str(recorded):
        return None
    return (f"the adapter was trained on prompts {ASKED[recorded]} ({PROMPT_FILE}) but is asked {ASKED[asked]}: "
            "expect empty or unrelated answers")


def markup_in(text: str, tokenizer) -> str | None:
    """The first special token written out in ``text`` (chat-template markup such as ``<|im_start|>``), or None:
    a prompt that holds one has been through a chat template already."""
    return next((t for t in tokenizer.all_special_tokens if t and t in text), None)


def write_prompt_format(adapter_dir: str | Path, prompt_format: str) -> None:
    """Record the prompt format an adapter was trained on (a ``PromptFormat``, or "chat" or "raw"), in
    ``PROMPT_FILE`` in its directory."""
    record = json.dumps(PromptFormat.of(prompt_format).record()) + "\n"
    atomic_write(Path(adapter_dir) / PROMPT_FILE, lambda p: p.write_text(record))


def read_prompt_format(adapter_dir: str | Path) -> PromptFormat | None:
    """The prompt format recorded beside an adapter, or None where there is none (PEFT's adapters). A record
    without a system prompt or chat template (older lorakit's) means the template's default and the tokenizer's."""
    path = Path(adapter_dir) / PROMPT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        settings = {k: record.get(k) for k in ("system_prompt", "chat_template")}
        kind = record.get("prompt_format")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise DataError(f"{path}: not a prompt-format record ({e})") from None
    if not all(v is None or isinstance(v, str) for v in settings.values()):
        raise DataError(f"{path}: system_prompt and chat_template must be text, got {settings}")
    try:
        return PromptFormat(kind, **settings)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


def _pieces(record: dict, tokenizer, prompt_format: PromptFormat) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one record."""
    if "messages" in record:
        messages = record["messages"]
        prefix = chat_text(messages[:-1], tokenizer, prompt_format)
        full = chat_text(messages, tokenizer, prompt_format, generation_prompt=False)
        if not full.startswith(prefix):
            raise DataError("the chat template renders the conversation and its prefix inconsistently")
        return _encode(tokenizer, prefix), _encode(tokenizer, full[len(prefix):])
    if "text" in record:
        return [], _encode(tokenizer, record["text"], special=True)
    return prompt_ids(record["prompt"], tokenizer), _encode(tokenizer, record["completion"]) + [tokenizer.eos_token_id]


def tokenize(records: list[dict], tokenizer, max_length: int, prompt_format: str = CHAT) -> Tokenized:
    """Token ids and labels (prompt positions ``IGNORE``) of every record, chat records rendered in
    ``prompt_format``, cut to ``max_length``; the cut and dropped are named (``Tokenized.summary``)."""
    prompt_format = PromptFormat.of(prompt_format)
    out = Tokenized()
    for number, record in enumerate(records, start=1):
        where = getattr(record, "where", f"example {number}")
        try:
            prompt, completion = _pieces(record, tokenizer, prompt_format)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
        if len(ids) > max_length:
            out.truncated_at.append(where)
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):  # nothing left to predict
            out.dropped_at.append(where)
            continue
        out.examples.append({"input_ids": ids, "labels": labels})
    if out.truncated_at and prompt_format == "chat" and prompt_format.system_prompt is None:
        added = default_system_tokens(tokenizer, prompt_format)
        if added:
            out.hint = (f"the chat template's default system prompt takes {added} of the {max_length} tokens of "
                        "each (--system-prompt none leaves it out)")
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
