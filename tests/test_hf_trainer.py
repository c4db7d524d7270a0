"""An adapted model handed to transformers.Trainer trains, and the adapter comes out in PEFT's format."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from conftest import VOCAB, tiny_llama, token_ids
from lorakit.train.hf import SaveAdapterCallback


def _counting_data(n: int = 16, length: int = 12) -> list[dict]:
    start = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(0))
    rows = (start + torch.arange(length)) % VOCAB
    return [{"input_ids": r, "labels": r} for r in rows]


def _train(tmp_path, callback=None, **args):
    from transformers import Trainer, TrainingArguments

    model = lk.adapt(tiny_llama(), lk.LoRA(rank=4, alpha=8), "all-linear")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    arguments = TrainingArguments(str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=2e-2,
                                  save_steps=3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                                  dataloader_num_workers=0, **args)
    trainer = Trainer(model=model, args=arguments, train_dataset=_counting_data(),
                      callbacks=[callback or SaveAdapterCallback()])
    result = trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return model, before, losses, result


def _changed(model, before) -> tuple[set[str], set[str]]:
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    return {n for n in moved if ".adapters." in n}, {n for n in moved if ".adapters." not in n}


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant"])
def test_trainer_trains_only_the_adapter(tmp_path, checkpointing):
    args = {} if checkpointing is None else dict(
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    model, before, losses, _ = _train(tmp_path, **args)
    adapters, base = _changed(model, before)
    assert base == set()
    assert adapters == {n for n in before if ".adapters." in n}  # every layer's A and B, checkpointed blocks too
    assert losses[-1] < losses[0]


def test_trainer_saves_the_adapter_in_peft_format(tmp_path):
    from peft import PeftModel

    model, _, _, _ = _train(tmp_path)
    for directory in (tmp_path / "checkpoint-3", tmp_path / "checkpoint-6", tmp_path):
        assert (directory / "adapter_config.json").is_file() and (directory / "adapter_model.safetensors").is_file()
    ids = token_ids()
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        peft = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
        torch.testing.assert_close(peft(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-5)
        reloaded = lk.load(tiny_llama(), tmp_path / "checkpoint-6")
        assert torch.equal(reloaded(input_ids=ids).logits, ours)


def test_the_callback_records_the_prompt_format_it_is_given(tmp_path):
    from lorakit.train.data import read_prompt_format

    _train(tmp_path, callback=SaveAdapterCallback(prompt_format="raw"))
    assert read_prompt_format(tmp_path / "checkpoint-3") == "raw" and read_prompt_format(tmp_path) == "raw"
    with pytest.raises(lk.ConfigError, match="prompt_format must be one of"):
        SaveAdapterCallback(prompt_format="alpaca")
