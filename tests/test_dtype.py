"""``--dtype``: the frozen base held and computed in bfloat16 where the device has units for it (issue 23).

``auto`` is decided by what the device reports, mocked here where this machine lacks it; a 16-bit base keeps the
adapters, optimizer state, loss and logits in float32; merge, save, load and export mean what they meant.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import _config, save_tiny_model

import lorakit as lk
from lorakit.cli import main as cli
from lorakit.errors import ConfigError
from lorakit.serve import engine
from lorakit.train import models, trainer
from lorakit.train.trainer import finetune, generate


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


# --- auto, per device -----------------------------------------------------------------------------
@pytest.mark.parametrize("flags, chosen, said", [
    ({"fpu", "avx2", "avx512f", "avx512_bf16"}, torch.bfloat16, "reports avx512_bf16"),
    ({"fpu", "avx2", "amx_tile", "amx_bf16"}, torch.bfloat16, "reports amx_bf16"),
    ({"fpu", "avx2", "avx512f"}, torch.float32, "neither amx_bf16 nor avx512_bf16"),
    (set(), torch.float32, "neither amx_bf16 nor avx512_bf16"),  # no /proc/cpuinfo (macOS)
])
def test_auto_on_the_cpu_follows_what_the_cpu_reports(monkeypatch, flags, chosen, said):
    monkeypatch.setattr(models, "cpu_flags", lambda: flags)
    dtype, why = models.resolve_dtype("auto", "cpu")
    assert dtype == chosen and said in why


@pytest.mark.parametrize("capability, chosen", [((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16),
                                                ((7, 5), torch.float32), ((6, 1), torch.float32)])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, chosen):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    dtype, why = models.resolve_dtype("auto", "cuda")
    assert dtype == chosen and f"{capability[0]}.{capability[1]}" in why


def test_a_named_dtype_is_taken_as_it_is_and_others_are_refused(monkeypatch):
    monkeypatch.setattr(models, "cpu_flags", lambda: set())
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("FLOAT16", torch.float16)):
        assert models.resolve_dtype(name, "cpu") == (dtype, "as --dtype asks")
    with pytest.raises(ConfigError, match="--dtype 'fp8'"):
        models.resolve_dtype("fp8", "cpu")
    with pytest.raises(SystemExit):  # argparse's choices, before anything loads
        cli(["eval", "--dtype", "half"])


def test_auto_is_the_chosen_devices_rule_not_another_devices(tiny_dir, tmp_path, monkeypatch):
    """A GPU of capability 8.0 in sight and --device cpu on a CPU without bfloat16 units: float32."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx2"})
    said = []
    summary = finetune(_config(tiny_dir, tmp_path / "run", steps=1, save_every=0, device="cpu"), log=said.append)
    assert summary["dtype"] == "float32" and any("dtype: float32 (auto: this CPU reports neither" in m for m in said)


# --- training on a 16-bit base --------------------------------------------------------------------
def test_a_bfloat16_base_trains_float32_adapters_and_optimizer_state(tiny_dir, tmp_path):
    config = _config(tiny_dir, tmp_path / "run", steps=2, save_every=2, dtype="bfloat16", val_every=1)
    job = trainer.setup(config, log=lambda m: None)
    base = [p for n, p in job.model.named_parameters() if not p.requires_grad]
    trained = lk.trainable_parameters(job.model)
    assert base and {p.dtype for p in base} == {torch.bfloat16}
    assert trained and {p.dtype for p in trained} == {torch.float32}
    state = trainer.start(job)
    with trainer._metrics(job) as record:
        trainer.train(job, state, record)
    assert {v.dtype for s in job.optimizer.state.values() for k, v in s.items() if k != "step"} == {torch.float32}
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in trained)
    loss = trainer.CompletionLoss(job.model)(**trainer._on(
        trainer.data_mod.collate(job.data.train.examples[:4], job.tokenizer.pad_token_id), job.device))[0]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    assert any("val_loss" in r for r in rows)


def test_the_saved_adapter_is_float32_and_the_report_names_the_dtype(tiny_dir, tmp_path):
    finetune(_config(tiny_dir, tmp_path / "run", steps=2, save_every=0, dtype="bfloat16"), log=lambda m: None)
    tensors = load_file(tmp_path / "run/adapter/adapter_model.safetensors")
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}
    assert "| base dtype | bfloat16 |" in (tmp_path / "run/report.md").read_text()
    # the file means what it meant: it loads onto a float32 base as onto a bf16 one
    model = lk.load(models.load_weights(str(tiny_dir)), tmp_path / "run/adapter")
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}


def test_bf16_is_dtype_bfloat16_and_conflicts_are_refused(tiny_dir, tmp_path):
    config = _config(tiny_dir, tmp_path / "run", bf16=True)
    config.check()
    assert config.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="--bf16 is --dtype bfloat16, and --dtype float16"):
        _config(tiny_dir, tmp_path / "run", bf16=True, dtype="float16").check()


# --- one answer per dtype -------------------------------------------------------------------------
def test_bfloat16_greedy_answers_are_the_same_alone_and_in_a_batch(tiny_dir):
    model, tokenizer = models.load(str(tiny_dir), dtype="bfloat16", log=lambda m: None)
    lk.adapt(model, lk.LoRA(rank=4), targets="all-linear")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    assert engine.Engine(model, tokenizer, engine.Adapters(model, 1)).tie_tolerance == engine.TIE_TOLERANCES[
        torch.bfloat16]
    prompts = [f"{word} {i}" * (1 + i % 4) for i, word in enumerate(["date", "x", "hello there", "q"] * 3)]
    batched = generate(model, tokenizer, prompts, 8, 12)
    assert batched == [generate(model, tokenizer, [p], 8, 1)[0] for p in prompts]


def test_eval_and_generate_compute_in_the_dtype_asked(tiny_dir, tmp_path, monkeypatch, capsys):
    finetune(_config(tiny_dir, tmp_path / "run", steps=1, save_every=0), log=lambda m: None)
    seen = []
    real = trainer.generate

    def recording(model, *args, **kwargs):
        seen.append(next(model.parameters()).dtype)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "generate", recording)
    adapter = str(tmp_path / "run/adapter")
    assert cli(["eval", "--model", str(tiny_dir), "--adapter", adapter, "--dtype", "bfloat16",
                "--eval-examples", "4", "--max-new-tokens", "4"]) == 0
    assert cli(["generate", "--model", str(tiny_dir), "--adapter", adapter, "--dtype", "bfloat16", "--prompt", "hi",
                "--max-new-tokens", "4"]) == 0
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert "computing in bfloat16 (as --dtype asks)" in capsys.readouterr().err


# --- merge ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("stored, asked, written", [
    (torch.float32, "auto", torch.float32), (torch.bfloat16, "auto", torch.bfloat16),
    (torch.float32, "bfloat16", torch.bfloat16), (torch.bfloat16, "float32", torch.float32)])
def test_merge_writes_the_dtype_asked_computed_in_float32(tmp_path, stored, asked, written):
    from transformers import AutoModelForCausalLM

    base = save_tiny_model(tmp_path / "tiny")
    if stored != torch.float32:
        AutoModelForCausalLM.from_pretrained(base).to(stored).save_pretrained(base)
    assert models.stored_dtype(str(base)) == stored
    finetune(_config(base, tmp_path / "run", steps=2, save_every=0), log=lambda m: None)
    assert cli(["merge", "--model", str(base), "--adapter", str(tmp_path / "run/adapter"), "--out",
                str(tmp_path / "merged"), "--dtype", asked, "--untie"]) == 0
    merged = load_file(tmp_path / "merged/model.safetensors")
    assert {t.dtype for t in merged.values()} == {written}
    # the merge is taken in float32 and rounded once: the float32 merge, cast
    reference = lk.load(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "run/adapter")
    models.untie(reference)
    lk.unload(reference, merge=True)
    expected = {k: v.to(written) for k, v in reference.state_dict().items()}
    assert all(torch.equal(merged[k], expected[k]) for k in merged)
