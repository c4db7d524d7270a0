"""The fine-tuning stack on a tiny model directory: data, loss masking, resume, NaN stop, DDP, CLI."""

from __future__ import annotations

import json
import math
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit import registry
from lorakit.cli import main as cli
from lorakit.train import config as cfg
from lorakit.train import data, tasks
from lorakit.train.trainer import CompletionLoss, TrainingError, datasets, finetune

ROOT = Path(__file__).resolve().parents[1]
CHAT = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def save_tiny_model(path: Path) -> Path:
    """A tiny Llama with a character-level tokenizer and a chat template, saved as a model directory at ``path``."""
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
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _config(tiny_dir, out, **changes) -> cfg.FinetuneConfig:
    """A small run's config; the method's options are rank 4, alpha 8, dropout 0.1 where it has those settings,
    updated by ``options=``."""
    settings = dict(model=str(tiny_dir), out=str(out), steps=6, batch_size=4, train_examples=40, eval_examples=8,
                    max_new_tokens=12, eval_batch_size=8, lr=1e-2, warmup_steps=2, val_every=0, save_every=3,
                    skip_eval_before=True)
    has = {o.name for o in registry.options(changes.get("method", "lora"))}
    options = {k: v for k, v in dict(rank=4, alpha=8.0, dropout=0.1).items() if k in has}
    return cfg.FinetuneConfig(**{**settings, **changes, "options": {**options, **changes.get("options", {})}})


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


@pytest.fixture(scope="module")
def straight(tiny_dir, tmp_path_factory) -> Path:
    return run_straight(tiny_dir, tmp_path_factory.mktemp("straight") / "run")


def run_straight(tiny_dir: Path, run: Path) -> Path:
    """An uninterrupted 8-step run into ``run``, the reference of the resume tests."""
    finetune(_config(tiny_dir, run, steps=8, save_every=0), log=lambda m: None)
    return run


# --- tasks and data --------------------------------------------------------------------------------
def test_there_are_two_built_in_tasks_and_the_default_evaluates_200():
    assert len(tasks.TASKS) >= 2 and cfg.FinetuneConfig().task in tasks.TASKS
    assert cfg.FinetuneConfig().eval_examples >= 200


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


def test_test_and_validation_splits_are_carved_off_the_data(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(20)))
    settings = dict(data=str(path), test_fraction=0.25, val_fraction=0.2, max_length=64)
    made = datasets(cfg.FinetuneConfig(**settings), tokenizer)
    held_out = {p for p, _ in made.evaluation}

    def prompts(tokenized):
        return {tokenizer.decode([t for t, label in zip(e["input_ids"], e["labels"]) if label == data.IGNORE])
                for e in tokenized.examples}

    trained, validated = prompts(made.train), prompts(made.validation)
    assert (len(held_out), len(validated), len(trained)) == (5, 3, 12)  # 20 - 5 test; a fifth of 15 validates
    assert not trained & held_out and not validated & held_out and not trained & validated  # each on one side only
    assert {p for p, _ in datasets(cfg.FinetuneConfig(**settings), tokenizer).evaluation} == held_out  # seeded
    given = datasets(cfg.FinetuneConfig(**settings, eval_data=str(path)), tokenizer)
    assert len(given.evaluation) == 20 and len(given.train.examples) == 16  # --eval-data given: no test carved off


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
    # Generation starts from the very ids training put before the completion.
    assert data.prompt_ids("abc", tokenizer) == first["input_ids"][:3]
    prompt_length = chat["labels"].count(data.IGNORE)
    assert data.prompt_ids(records[1]["messages"][:1], tokenizer) == chat["input_ids"][:prompt_length]


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
    run = tmp_path / "run"
    (run / "checkpoints/step-000099").mkdir(parents=True)  # an earlier run's: a fresh run clears it
    summary = finetune(_config(tiny_dir, run, skip_eval_before=False, val_every=3, save_every=2, max_length=100),
                       log=lambda m: None)
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "loss.png",
                 "report.md", "predictions.jsonl"):
        assert (run / name).is_file(), name
    assert len(_losses(run)) == 6 and summary["steps"] == 6
    assert summary["accuracy_before"] is not None and summary["eval_examples"] == 8
    assert summary["truncated"] > 0  # the longest date prompts (character tokens) run past 100
    assert "val_loss" in (run / "metrics.jsonl").read_text()
    # Written at steps 2, 4, 6; the last two kept; no temporary directory left behind.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    report = (run / "report.md").read_text()
    for item in ("accuracy before", "accuracy after", "trainable parameters", "| time |", "tokens/s",
                 "peak memory", f"examples truncated / dropped | {summary['truncated']} /", "Command:"):
        assert item in report, item


def test_learning_rate_warms_up_then_follows_a_cosine(tiny_dir, straight):
    from lorakit.train.trainer import _schedule

    config = _config(tiny_dir, "unused", steps=8)  # warm-up 2 steps
    factor = _schedule(config)
    assert [factor(s) for s in range(3)] == [0.5, 1.0, 1.0]
    decay = [factor(s) for s in range(2, 8)]
    assert decay == sorted(decay, reverse=True) and 0 < decay[-1] < 0.1
    assert factor(5) == pytest.approx(0.5)  # half-way through the cosine
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
    assert [r["lr"] for r in rows] == pytest.approx([config.lr * factor(s) for s in range(8)])


def test_accumulation_checkpointing_and_bf16_keep_the_losses(tiny_dir, tmp_path, monkeypatch):
    """Two micro-batches per step, or recomputed activations, give the plain run's losses (dropout off:
    accumulation draws its masks per micro-batch); a bfloat16 base gives close but different ones."""
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def clip_and_check(params, max_norm, *args, **kwargs):
        params = list(params)
        total = clip(params, max_norm, *args, **kwargs)
        norms.append((float(total), float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_check)
    runs = {"plain": {}, "accum": {"grad_accum": 2}, "recompute": {"gradient_checkpointing": True},
            "bf16": {"bf16": True}}
    for name, changes in runs.items():
        finetune(_config(tiny_dir, tmp_path / name, steps=3, save_every=0, options=dict(dropout=0.0),
                         max_grad_norm=0.1, **changes), log=lambda m: None)
    plain = _losses(tmp_path / "plain")
    assert _losses(tmp_path / "accum") == pytest.approx(plain, rel=1e-5)
    assert _losses(tmp_path / "recompute") == pytest.approx(plain, rel=1e-6)
    assert _losses(tmp_path / "bf16") != plain and _losses(tmp_path / "bf16") == pytest.approx(plain, rel=0.05)
    # Clipped every step: gradients above the norm come out at it.
    assert len(norms) == 3 * len(runs) and any(before > 0.1 for before, _ in norms)
    assert all(after == pytest.approx(min(before, 0.1), rel=1e-4) for before, after in norms)


def test_resume_after_ctrl_c_matches_an_uninterrupted_run(tiny_dir, tmp_path, monkeypatch, straight):
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
    assert _losses(tmp_path / "resumed") == _losses(straight)  # bitwise, dropout included
    from safetensors.torch import load_file

    a = load_file(straight / "adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "resumed/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dir, tmp_path, monkeypatch, straight):
    real = CompletionLoss.forward
    calls = {"n": 0}

    def nan_at_step_five(self, **batch):
        calls["n"] += 1
        loss, n = real(self, **batch)
        return (loss * float("nan"), n) if calls["n"] == 5 else (loss, n)

    monkeypatch.setattr(CompletionLoss, "forward", nan_at_step_five)
    kept = r"loss is nan at step 5; stopping \(the last good checkpoint is .*step-000003"
    with pytest.raises(TrainingError, match=kept):
        finetune(_config(tiny_dir, tmp_path / "run", steps=8), log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step-000003"]
    # Resuming redoes step 4, logged once: the curve reads as the uninterrupted run's.
    monkeypatch.setattr(CompletionLoss, "forward", real)
    finetune(_config(tiny_dir, tmp_path / "run", steps=8, resume="auto"), log=lambda m: None)
    assert _losses(tmp_path / "run") == _losses(straight)


def test_every_method_of_lk_is_selectable():
    """Every registered method is a --method choice of finetune and params, and builds its registered recipe
    (the name's own settings included: rslora)."""
    from lorakit.cli import build_config, parser

    for name in registry.names():
        entry = registry.entry(name)
        for command, config_cls in (("finetune", cfg.FinetuneConfig), ("params", cfg.ParamsConfig)):
            argv = [command, "--method", name]
            config = build_config(config_cls, parser(argv).parse_args(argv))
            made = config.recipe()
            assert config.method == name and type(made) is entry.recipe, (command, name)
            assert all(getattr(made, k) == v for k, v in entry.defaults.items()), (command, name)
    assert cfg.FinetuneConfig(method="rslora").recipe().rslora


def test_the_default_job_is_lora_rank_16_alpha_32():
    """FINETUNE_DEFAULTS, sized for the 135M default model, go to every method whose recipe has the field."""
    from lorakit.cli import build_config, parser

    made = build_config(cfg.FinetuneConfig, parser(["finetune"]).parse_args(["finetune"])).recipe()
    assert made == lk.LoRA(rank=16, alpha=32.0)
    assert cfg.FinetuneConfig(method="pissa").recipe() == lk.PiSSA(rank=16, alpha=32.0)
    assert cfg.FinetuneConfig(method="svf").recipe() == lk.SVF()  # no rank, no alpha
    assert cfg.FinetuneConfig(method="lora", options=dict(rank=2)).recipe() == lk.LoRA(rank=2, alpha=32.0)
    # A schedule's length comes from --steps unless given.
    made = cfg.FinetuneConfig(method="adalora", steps=50, options=dict(tinit=1)).recipe()
    assert (made.total_steps, made.tinit, made.tfinal, made.alpha) == (50, 1, 10, 32.0)
    with pytest.raises(lk.ConfigError, match="rank must be > 0, got 0"):
        cfg.FinetuneConfig(options=dict(rank=0)).recipe()


@pytest.mark.parametrize("method", [m for m in registry.names() if m != "lora"])
def test_other_methods_train_from_the_loop(tiny_dir, tmp_path, method):
    summary = finetune(_config(tiny_dir, tmp_path / method, method=method, steps=4, save_every=0),
                       log=lambda m: None)
    assert (tmp_path / method / "adapter/adapter_config.json").is_file() and summary["steps"] == 4
    assert all(math.isfinite(loss) for loss in _losses(tmp_path / method))


def test_the_loop_runs_adalora_rank_budget(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    finetune(_config(tiny_dir, tmp_path / "run", method="adalora", options=dict(init_rank=4, target_rank=2),
                     steps=10, save_every=0), log=lambda m: None)
    saved = load_file(tmp_path / "run/adapter/adapter_model.safetensors")
    kept = [t.shape[0] for k, t in saved.items() if k.endswith("lora_E")]
    assert kept and sum(kept) == 2 * len(kept)  # pruned from 4 to 2 triplets per matrix on average


def test_lora_plus_gives_b_matrices_a_larger_learning_rate(tiny_dir, tmp_path, monkeypatch):
    seen = []
    real = torch.optim.AdamW

    def recording(groups, **kwargs):
        seen.extend(g["lr"] for g in groups)
        return real(groups, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", recording)
    finetune(_config(tiny_dir, tmp_path / "run", steps=1, save_every=0, lora_plus_ratio=16), log=lambda m: None)
    assert sorted(seen) == pytest.approx([1e-2, 16e-2])


def _lorakit(*args: str, torchrun: bool = False) -> None:
    """Run ``python -m lorakit args`` (under torchrun with 2 processes), failing with its stderr."""
    # --standalone: a free port each time (the fixed default, 29500, can still be held by the run before)
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else []
    done = subprocess.run([sys.executable, *launch, "-m", "lorakit", *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(tiny_dir, tmp_path, strategy):
    """Two gloo processes splitting each global batch give one process's losses.

    Tolerance rel=1e-5: each process sums the loss over its half of the label positions and the halves
    are all-reduced, as are the gradients, so the float32 additions run in another order. That moves a
    sum by a unit or two in the last place: measured, 1e-7 relative (one float32 ulp) on the first step
    and nothing after. 1e-5 leaves room for AdamW to amplify that over four steps, while a real fault
    (a rank's rows lost or counted twice, a wrong normalisation) moves the losses by percents.
    """
    args = ["finetune", "--model", str(tiny_dir), "--steps", "4", "--batch-size", "4", "--train-examples", "40",
            "--eval-examples", "4", "--max-new-tokens", "4", "--skip-eval-before", "--val-every", "0",
            "--save-every", "2", "--lr", "1e-2", "--dropout", "0.0"]
    _lorakit(*args, "--strategy", strategy, "--out", str(tmp_path / "two"), torchrun=True)
    _lorakit(*args, "--out", str(tmp_path / "one"))
    one = _losses(tmp_path / "one")
    assert _losses(tmp_path / "two") == pytest.approx(one, rel=1e-5)
    # A checkpoint of the distributed run resumes in one process and continues its curve.
    _lorakit(*args, "--out", str(tmp_path / "two"), "--resume", str(tmp_path / "two/checkpoints/step-000002"))
    assert _losses(tmp_path / "two") == pytest.approx(one, rel=1e-5)


# --- configs and the command ---------------------------------------------------------------------
def test_yaml_config_round_trip_and_flags_win(tmp_path):
    import yaml

    original = cfg.FinetuneConfig(method="dora", options=dict(rank=4, dropout=0.1), lr=3e-4, targets="q_proj,v_proj")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg.dataclasses.asdict(original)))  # options: a mapping
    from lorakit.cli import build_config, parser

    argv = ["finetune", "--config", str(tmp_path / "run.yaml"), "--rank", "8"]
    loaded = build_config(cfg.FinetuneConfig, parser(argv).parse_args(argv))
    assert loaded == cfg.dataclasses.replace(original, options=dict(rank=8, dropout=0.1))
    (tmp_path / "bad.yaml").write_text("rnak: 4\n")
    argv = ["finetune", "--config", str(tmp_path / "bad.yaml")]
    with pytest.raises(lk.ConfigError, match="unknown setting.*rnak"):
        build_config(cfg.FinetuneConfig, parser(argv).parse_args(argv))


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_config_loads(path):
    config = cfg.from_dict(cfg.FinetuneConfig, cfg.load_yaml(path), str(path))
    config.check()
    config.recipe()  # its method's settings too


@pytest.mark.parametrize("command", ["finetune", "eval", "generate", "merge", "params"])
def test_help_explains_every_option(command, capsys):
    from lorakit.cli import COMMANDS

    with pytest.raises(SystemExit):
        cli([command, "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at spaces and after hyphens
    for f in cfg.fields(COMMANDS[command][0]):
        assert f.metadata.get("help"), f"{command} --{f.name} has no help"
        assert f"--{f.name.replace('_', '-')}" in text and "".join(f.metadata["help"].split()) in text, f.name
        if f.metadata.get("choices"):
            assert "{" + ",".join(f.metadata["choices"]) + "}" in text, f.name
    assert "--config" in text
    if cfg.takes_method(COMMANDS[command][0]):  # the default method's options, and how to see another's
        assert f"loraoptions(lorakit{command}--methodM--helpshowsM's)" in text
        assert ",".join(registry.names()) in text  # --method lists the registered methods
        for key, o in cfg.option_keys("lora").items():
            assert o.help and f"--{key.replace('_', '-')}" in text and "".join(o.help.split()) in text, key


@pytest.mark.parametrize("method", registry.names())
def test_help_explains_every_option_of_every_method(method, capsys):
    with pytest.raises(SystemExit):
        cli(["finetune", "--method", method, "--help"])
    text = "".join(capsys.readouterr().out.split())
    assert f"{method}options(lorakitfinetune--methodM--helpshowsM's)" in text
    for key, o in cfg.option_keys(method).items():
        assert o.help, f"{method}: {o.name} has no attribute docstring"
        assert f"--{key.replace('_', '-')}" in text and "".join(o.help.split()) in text, key
        if o.choices:
            assert "{" + ",".join(o.choices) in text, key


def test_cli_commands(tiny_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli(["finetune", "--model", str(tiny_dir), "--out", str(out), "--steps", "3", "--batch-size", "4",
                "--train-examples", "20", "--eval-examples", "4", "--max-new-tokens", "6", "--rank", "2"]) == 0
    printed = capsys.readouterr()
    last = printed.out.strip().splitlines()[-1]
    assert last.startswith("accuracy: ") and last.endswith("(task date, 4 eval examples)")
    assert all(item in printed.err for item in ("training: 100%", "3/3", "loss=", "tok_s="))  # progress bar
    assert re.search(r"\d(s/step|step/s)", printed.err)  # tqdm flips the rate's unit at one step per second
    assert cli(["eval", "--model", str(tiny_dir), "--adapter", str(out / "adapter"), "--eval-examples", "4",
                "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip().startswith("accuracy: ")
    assert cli(["generate", "--model", str(tiny_dir), "--adapter", str(out / "adapter"), "--prompt", "hi",
                "--max-new-tokens", "5"]) == 0
    answer = capsys.readouterr().out
    import io

    from lorakit.train import trainer

    turns, real_generate = [], trainer.generate

    def counting(model, tokenizer, prompts, *rest):
        turns.append(len(prompts[0]))  # messages in the conversation so far
        return real_generate(model, tokenizer, prompts, *rest)

    monkeypatch.setattr(trainer, "generate", counting)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nand again\n\nnot read\n"))
    assert cli(["generate", "--model", str(tiny_dir), "--adapter", str(out / "adapter"), "--max-new-tokens", "5"]) == 0
    assert turns == [1, 3] and sys.stdin.read() == "not read\n"  # the chat keeps its history; an empty line ends it
    capsys.readouterr()
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


@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_finetune_on_a_4bit_base(tiny_dir, tmp_path, method):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    logged = []
    finetune(_config(tiny_dir, run, quantize="nf4", method=method, steps=8, save_every=0,
                     options=dict(dropout=0.0)), log=logged.append)
    losses = _losses(run)
    assert losses[-1] < losses[0], losses
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    if method == "pissa":  # QPiSSA: the saved start makes the same residual to quantize
        lk.quantize(lk.load(model, run / "adapter"), "nf4")
    else:
        lk.load(lk.quantize(model, "nf4"), run / "adapter")
    layers = lk.model.adapted_layers(model)
    assert layers and all(type(layer.weight).__name__ == "Params4bit" for _, layer in layers)
    base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_dir).parameters())
    trainable, total = next(map(int, m.group(1, 2)) for line in logged  # packed 4-bit weights counted as weights
                            for m in [re.search(r"([\d]+) trainable of ([\d]+) parameters", line.replace(",", ""))] if m)
    assert total == base + trainable, logged
