"""The fine-tuning stack on a tiny model directory: data, loss masking, resume, NaN stop, DDP, CLI."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.cli import main as cli
from lorakit.train import config as cfg
from lorakit.train import data, tasks
from lorakit.train.trainer import CompletionLoss, TrainingError, finetune

ROOT = Path(__file__).resolve().parents[1]
CHAT = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny Llama with a character-level tokenizer and a chat template, saved as a model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", *sorted(set(string.printable))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", bos_token="<|im_start|>")
    tokenizer.chat_template = CHAT
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512, eos_token_id=2, pad_token_id=2,
                                         bos_token_id=1))
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _config(tiny_dir, out, **changes) -> cfg.FinetuneConfig:
    settings = dict(model=str(tiny_dir), out=str(out), steps=6, batch_size=4, train_examples=40, eval_examples=8,
                    max_new_tokens=12, eval_batch_size=8, rank=4, alpha=8.0, lr=1e-2, warmup_steps=2,
                    val_every=0, save_every=3, skip_eval_before=True, dropout=0.1)
    return cfg.FinetuneConfig(**{**settings, **changes})


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


# --- tasks and data --------------------------------------------------------------------------------
@pytest.mark.parametrize("task", tasks.TASKS)
def test_tasks_are_deterministic_and_held_out(task):
    train, evaluation = tasks.split(task, 2000, 200, seed=3)
    again, evaluation_again = tasks.split(task, 2000, 200, seed=3)
    assert train == again and evaluation == evaluation_again and len(evaluation) == 200
    assert not {e.prompt for e in train} & {e.prompt for e in evaluation}
    assert len({e.prompt for e in train}) == 2000
    assert tasks.split(task, 10, 10, seed=4)[1] != evaluation[:10]


def test_date_targets_are_iso_dates():
    import datetime

    _, evaluation = tasks.split("date", 0, 50)
    for e in evaluation:
        day = datetime.date.fromisoformat(e.completion)
        assert str(day.year) in e.prompt
    assert tasks.exact_match(" 2021-03-05\n", "2021-03-05") and not tasks.exact_match("2021-3-5", "2021-03-05")


def test_data_formats_and_line_numbered_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "completion": "b"}\n\n{"messages": [{"role": "user", "content": "q"}, '
                    '{"role": "assistant", "content": "r"}]}\n{"text": "plain"}\n')
    assert [sorted(r) for r in data.read(good)] == [["completion", "prompt"], ["messages"], ["text"]]
    table = tmp_path / "good.csv"
    table.write_text('prompt,completion\n"x, y",z\n')
    assert data.read(table) == [{"prompt": "x, y", "completion": "z"}]
    cases = {
        '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"\n': r"bad\.jsonl:2: not valid JSON",
        '{"prompt": "a"}\n': r"bad\.jsonl:1: 'prompt' and 'completion' must both be strings",
        '{"messages": [{"role": "user", "content": "q"}]}\n': r"bad\.jsonl:1: the last message must be the assistant",
        '{"answer": 1}\n': r"bad\.jsonl:1: a record needs",
        '[1, 2]\n': r"bad\.jsonl:1: expected a JSON object",
    }
    for text, message in cases.items():
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(data.DataError, match=message):
            data.read(tmp_path / "bad.jsonl")
    (tmp_path / "bad.csv").write_text("question,answer\nq,a\n")
    with pytest.raises(data.DataError, match=r"bad\.csv:2: a record needs"):
        data.read(tmp_path / "bad.csv")


def test_loss_masks_the_prompt_and_counts_truncation(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    records = [{"prompt": "abc", "completion": "de"},
               {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
               {"prompt": "x" * 50, "completion": "long answer"}, {"prompt": "p" * 43, "completion": "cut"}]
    out = data.tokenize(records, tokenizer, max_length=45)
    assert (out.truncated, out.dropped) == (2, 1) and len(out.examples) == 3
    first = out.examples[0]
    assert first["labels"][:3] == [data.IGNORE] * 3 and first["labels"][3:] == first["input_ids"][3:]
    assert tokenizer.decode(first["input_ids"][3:]) == "de<|im_end|>"
    chat = out.examples[1]
    answer = [t for t, label in zip(chat["input_ids"], chat["labels"]) if label != data.IGNORE]
    assert tokenizer.decode(answer) == "yo<|im_end|>\n"


def test_completion_loss_equals_the_model_loss_on_label_positions(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    lk.adapt(model, lk.LoRA(rank=2), "all-linear")
    records = [{"prompt": "abc", "completion": "defg"}, {"prompt": "hello there", "completion": "x"}]
    batch = data.collate(data.tokenize(records, tokenizer, 64).examples, tokenizer.pad_token_id)
    loss, n = CompletionLoss(model)(**batch)
    expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    torch.testing.assert_close(loss, expected.loss, atol=1e-5, rtol=1e-5)
    assert n == 5 + 2  # "defg<eos>" and "x<eos>"


# --- the loop ------------------------------------------------------------------------------------
def test_finetune_writes_every_output(tiny_dir, tmp_path):
    summary = finetune(_config(tiny_dir, tmp_path / "run", skip_eval_before=False, val_every=3), log=lambda m: None)
    run = tmp_path / "run"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "loss.png",
                 "report.md", "predictions.jsonl"):
        assert (run / name).is_file(), name
    assert len(_losses(run)) == 6 and summary["steps"] == 6
    assert summary["accuracy_before"] is not None and summary["eval_examples"] == 8
    assert "val_loss" in (run / "metrics.jsonl").read_text()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    report = (run / "report.md").read_text()
    assert "accuracy before" in report and "trainable parameters" in report and "Command:" in report


def test_resume_after_ctrl_c_matches_an_uninterrupted_run(tiny_dir, tmp_path, monkeypatch):
    finetune(_config(tiny_dir, tmp_path / "straight", steps=8, save_every=0), log=lambda m: None)
    calls = {"n": 0}
    real = data.collate

    def interrupt_at_step_five(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "collate", interrupt_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        finetune(_config(tiny_dir, tmp_path / "resumed", steps=8, save_every=0), log=lambda m: None)
    monkeypatch.setattr(data, "collate", real)
    assert (tmp_path / "resumed/checkpoints/step-000004").is_dir()  # Ctrl-C saved where it stopped
    finetune(_config(tiny_dir, tmp_path / "resumed", steps=8, save_every=0, resume="auto"), log=lambda m: None)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")  # bitwise, dropout included
    from safetensors.torch import load_file

    a = load_file(tmp_path / "straight/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "resumed/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dir, tmp_path, monkeypatch):
    real = CompletionLoss.forward
    calls = {"n": 0}

    def nan_at_step_five(self, **batch):
        calls["n"] += 1
        loss, n = real(self, **batch)
        return (loss * float("nan"), n) if calls["n"] == 5 else (loss, n)

    monkeypatch.setattr(CompletionLoss, "forward", nan_at_step_five)
    with pytest.raises(TrainingError, match=r"loss is nan at step 5; stopping \(the last good checkpoint is .*step-000003"):
        finetune(_config(tiny_dir, tmp_path / "run", steps=8), log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step-000003"]


@pytest.mark.parametrize("method", ["dora", "pissa", "adalora", "svft"])
def test_other_methods_train_from_the_loop(tiny_dir, tmp_path, method):
    summary = finetune(_config(tiny_dir, tmp_path / method, method=method, steps=4, save_every=0),
                       log=lambda m: None)
    assert (tmp_path / method / "adapter/adapter_config.json").is_file() and summary["steps"] == 4


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(tiny_dir, tmp_path, strategy):
    """Two gloo processes splitting each global batch give one process's losses (float sums differ in order)."""
    args = ["finetune", "--model", str(tiny_dir), "--steps", "4", "--batch-size", "4", "--train-examples", "40",
            "--eval-examples", "4", "--max-new-tokens", "4", "--skip-eval-before", "--val-every", "0",
            "--save-every", "2", "--lr", "1e-2", "--dropout", "0.0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "lorakit", *args,
                    "--strategy", strategy, "--out", str(tmp_path / "ddp")], check=True, env=env, capture_output=True,
                   cwd=ROOT)
    subprocess.run([sys.executable, "-m", "lorakit", *args, "--out", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True, cwd=ROOT)
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    # A checkpoint of the distributed run resumes in one process.
    subprocess.run([sys.executable, "-m", "lorakit", *args, "--steps", "4", "--out", str(tmp_path / "ddp"),
                    "--resume", str(tmp_path / "ddp/checkpoints/step-000002")], check=True, env=env,
                   capture_output=True, cwd=ROOT)
    assert _losses(tmp_path / "ddp")[-2:] == pytest.approx(_losses(tmp_path / "one")[-2:], rel=1e-5)


# --- configs and the command ---------------------------------------------------------------------
def test_yaml_config_round_trip_and_flags_win(tmp_path):
    import yaml

    original = cfg.FinetuneConfig(method="dora", rank=4, lr=3e-4, targets="q_proj,v_proj")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg.dataclasses.asdict(original)))
    from lorakit.cli import build_config, parser

    args = parser().parse_args(["finetune", "--config", str(tmp_path / "run.yaml"), "--rank", "8"])
    loaded = build_config(cfg.FinetuneConfig, args)
    assert loaded == cfg.dataclasses.replace(original, rank=8)
    (tmp_path / "bad.yaml").write_text("rnak: 4\n")
    with pytest.raises(lk.ConfigError, match="unknown setting.*rnak"):
        build_config(cfg.FinetuneConfig, parser().parse_args(["finetune", "--config", str(tmp_path / "bad.yaml")]))


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_config_loads(path):
    config = cfg.from_dict(cfg.FinetuneConfig, cfg.load_yaml(path), str(path))
    config.check()


def test_cli_commands(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["finetune", "--model", str(tiny_dir), "--out", str(out), "--steps", "3", "--batch-size", "4",
                "--train-examples", "20", "--eval-examples", "4", "--max-new-tokens", "6", "--rank", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("accuracy: ") and last.endswith("(task date, 4 eval examples)")
    assert cli(["eval", "--model", str(tiny_dir), "--adapter", str(out / "adapter"), "--eval-examples", "4",
                "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip().startswith("accuracy: ")
    assert cli(["generate", "--model", str(tiny_dir), "--adapter", str(out / "adapter"), "--prompt", "hi",
                "--max-new-tokens", "5"]) == 0
    answer = capsys.readouterr().out
    assert cli(["merge", "--model", str(tiny_dir), "--adapter", str(out / "adapter"), "--out",
                str(tmp_path / "merged")]) == 0
    assert cli(["generate", "--model", str(tmp_path / "merged"), "--prompt", "hi", "--max-new-tokens", "5"]) == 0
    capsys.readouterr()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in k for k in merged.state_dict())
    assert cli(["params", "--shape", "8192x8192", "--rank", "8"]) == 0
    assert "131,072 vs 67,108,864" in capsys.readouterr().out
    assert answer  # generate printed something


def test_merged_model_generates_the_same_tokens(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.train.trainer import generate

    finetune(_config(tiny_dir, tmp_path / "run", steps=4, save_every=0), log=lambda m: None)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    adapted = lk.load(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "run/adapter").eval()
    assert cli(["merge", "--model", str(tiny_dir), "--adapter", str(tmp_path / "run/adapter"), "--out",
                str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    prompts = [[{"role": "user", "content": p}] for p in ("hello", "date 2020", "x")]
    assert generate(adapted, tokenizer, prompts, 10, 4) == generate(merged, tokenizer, prompts, 10, 4)


def test_cli_errors_are_clear(tiny_dir, tmp_path, capsys):
    assert cli(["finetune", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err
    assert cli(["finetune", "--model", str(tiny_dir), "--batch-size", "3", "--grad-accum", "2"]) == 2
    assert "divisible" in capsys.readouterr().err
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    assert cli(["finetune", "--model", str(tiny_dir), "--data", str(tmp_path / "d.jsonl"), "--out",
                str(tmp_path / "r")]) == 2
    assert "d.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert cli(["params", "--shape", "12by4"]) == 2
