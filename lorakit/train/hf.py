"""Training an adapted model with Hugging Face's ``transformers.Trainer``.

An adapted model is the same ``PreTrainedModel`` with frozen base weights, so ``Trainer`` trains it
as it is: its optimizer takes the parameters that require grad (the active adapters and any
``train=`` modules), and it moves the model to its device. What ``Trainer`` cannot know is that the
adapter is the result; ``SaveAdapterCallback`` writes it, in PEFT's format where PEFT has the method::

    model = lk.adapt(AutoModelForCausalLM.from_pretrained(path), lk.LoRA(rank=16), "all-linear")
    trainer = Trainer(model=model, args=TrainingArguments("out", ...), train_dataset=data,
                      callbacks=[SaveAdapterCallback()])
    trainer.train()   # out/checkpoint-N/adapter_model.safetensors at each save, out/ at the end

``Trainer`` still writes its own checkpoints (the whole model); the adapter files sit beside them.
Gradient checkpointing needs nothing more: transformers makes the embeddings' output require grad
for models fed ``input_ids``, so reentrant checkpointing reaches the adapters too (tested).
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

import lorakit as lk
from lorakit.train.data import PROMPT_FORMATS, write_prompt_format


class SaveAdapterCallback(TrainerCallback):
    """Save adapter ``name`` into every checkpoint directory ``Trainer`` writes and into ``output_dir`` at the end.

    ``prompt_format`` ("chat" or "raw", see lorakit/train/data.py) is recorded beside each save, so
    ``lorakit eval`` / ``generate`` / ``serve`` ask the adapter the way it was trained; the callback cannot
    tell from tokenized data, so it is left unrecorded unless given.
    """

    def __init__(self, name: str = "default", format: str = "lorakit", prompt_format: str | None = None):
        if prompt_format is not None and prompt_format not in PROMPT_FORMATS:
            raise lk.ConfigError(f"prompt_format must be one of {PROMPT_FORMATS} or None, got {prompt_format!r}")
        self.name, self.format, self.prompt_format = name, format, prompt_format

    def on_save(self, args, state, control, model=None, **kwargs):
        self._save(model, Path(args.output_dir) / f"checkpoint-{state.global_step}", state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._save(model, Path(args.output_dir), state)

    def _save(self, model, directory: Path, state) -> None:
        if state.is_world_process_zero:
            lk.save(model, directory, name=self.name, format=self.format)
            if self.prompt_format is not None:
                write_prompt_format(directory, self.prompt_format)
