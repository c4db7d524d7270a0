"""Regression tests of the trainer and command defects of issue 10: YAML types (6), Ctrl-C resume (7),
damaged checkpoints (8), one prompt format end to end (11), and the smaller ones (10, 12)."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
import torch
from test_train import _config, _losses, run_straight, save_tiny_model

import lorakit as lk
from lorakit import registry
from lorakit.cli import main as cli
from lorakit.train import config as cfg
from lorakit.train import data
from lorakit.train.trainer import CheckpointError, CompletionLoss, finetune


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def straight(tiny_dir, tmp_path_factory):
    return run_straight(tiny_dir, tmp_path_factory.mktemp("straight") / "run")


def _adapter_tensors(run):
    from safetensors.torch import load_file

    return load_file(run / "adapter/adapter_model.safetensors")


def _same_run(run, straight):
    """The run's loss curve and adapter are the uninterrupted run's, bit for bit."""
    assert _losses(run) == _losses(straight)
    a, b = _adapter_tensors(straight), _adapter_tensors(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- 6: YAML values take their field's type --------------------------------------------------------
def test_yaml_values_are_coerced_to_the_field_types(tmp_path):
    from lorakit.cli import build_config, parser

    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nsteps: 1e2\nrank: '4'\nalpha: 16\nbf16: 'on'\ntargets: 123\nwarmup_steps: 2.0\n"
                    "rslora: 'yes'\n")
    argv = ["finetune", "--config", str(path)]
    config = build_config(cfg.FinetuneConfig, parser(argv).parse_args(argv))
    assert (config.lr, config.steps, config.bf16, config.targets, config.warmup_steps) == (1e-3, 100, True, "123", 2)
    assert config.options == {"rank": 4, "alpha": 16.0, "rslora": True}  # the method's settings, typed too
    assert type(config.options["alpha"]) is float and type(config.steps) is int
    path.write_text("method: pissa\nalpha: none\nniter: '2'\n")  # a setting that may be unset
    config = build_config(cfg.FinetuneConfig, parser(argv).parse_args(argv))
    assert config.options == {"alpha": None, "niter": 2} and config.recipe() == lk.PiSSA(rank=16, niter=2)


@pytest.mark.parametrize("line, message", [
    ("rank: abc", "rank: expected an integer, got 'abc'"),
    ("rank: 2.5", "rank: expected an integer, got 2.5"),
    ("steps: true", "steps: expected an integer, got True"),
    ("lr: fast", "lr: expected a number, got 'fast'"),
    ("lr: [1, 2]", r"lr: expected a number, got \[1, 2\]"),
    ("bf16: maybe", "bf16: expected true or false, got 'maybe'"),
    ("data: {a: 1}", r"data: expected text, got \{.a.: 1\}"),
    ("method: lorra", r"unknown method 'lorra'; did you mean 'lora'.*Registered: lora, rslora, dora"),
    ("strategy: everything", "strategy: 'everything' is not one of"),
    ("rank: 2.5", "rank: expected an integer, got 2.5"),
    ("options: {rank: x}", "options.rank: expected an integer, got 'x'"),
    ("options: [1]", r"options: expected a mapping of setting: value, got \[1\]"),
    ("options: {niter: 2}", "options: method 'lora' has no setting 'niter'; it has rank, alpha, dropout, rslora"),
    ("niter: 2", r"unknown setting\(s\) \['niter'\].* \(niter is a setting of pissa, milora, lora_xs: --method"),
    ("method: lora_xs\ninit: ones", "init: 'ones' is not one of 'zeros', 'gaussian'"),
    ("method: pissa\nalpha: big", "alpha: expected a number or none, got 'big'"),
])
def test_a_yaml_value_of_the_wrong_kind_is_an_error_naming_file_and_key(tmp_path, capsys, line, message):
    path = tmp_path / "bad.yaml"
    path.write_text(line + "\n")
    assert cli(["finetune", "--config", str(path), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert re.search(re.escape(f"lorakit finetune: error: {path}: ") + message, err), err


# --- 7: Ctrl-C, then --resume auto, is the same run ------------------------------------------------
def test_ctrl_c_in_the_middle_of_a_step_resumes_bitwise(tiny_dir, tmp_path, monkeypatch, straight):
    """Interrupted after step 5's forward has drawn its dropout masks: the checkpoint holds step 4's random
    state, so the resumed step 5 draws the same masks as the uninterrupted run."""
    real, calls = CompletionLoss.forward, []

    def interrupt_after_the_fifth_forward(self, **batch):
        out = real(self, **batch)
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(CompletionLoss, "forward", interrupt_after_the_fifth_forward)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        finetune(_config(tiny_dir, run, steps=8, save_every=0), log=lambda m: None)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000004"]
    monkeypatch.setattr(CompletionLoss, "forward", real)
    finetune(_config(tiny_dir, run, steps=8, save_every=0, resume="auto"), log=lambda m: None)
    _same_run(run, straight)


def test_ctrl_c_while_a_step_commits_takes_effect_after_it(tiny_dir, tmp_path, straight):
    """A real SIGINT arriving inside step 5's optimizer update: the update and the step counter go together,
    so the checkpoint is step 5's (not step 4's counter over step 5's weights)."""
    steps = []

    def sigint_in_the_fifth_update(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == 5:
            os.kill(os.getpid(), signal.SIGINT)

    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(sigint_in_the_fifth_update)
    run = tmp_path / "run"
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune(_config(tiny_dir, run, steps=8, save_every=0), log=lambda m: None)
    finally:
        handle.remove()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000005"]
    finetune(_config(tiny_dir, run, steps=8, save_every=0, resume="auto"), log=lambda m: None)
    _same_run(run, straight)


# --- 8: damaged checkpoints and cut-off saves ------------------------------------------------------
def _flip_a_data_byte(path):
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10  # the end of the file is tensor data, past the JSON header
    path.write_bytes(bytes(raw))


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(tiny_dir, tmp_path, straight):
    run = tmp_path / "run"
    finetune(_config(tiny_dir, run, steps=8, save_every=3, keep_last=3), log=lambda m: None)
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000003", "step-000006", "step-000008"]
    tensors = checkpoints / "step-000008/adapter_state.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])  # truncated
    _flip_a_data_byte(checkpoints / "step-000006/adapter_state.safetensors")  # only its digest tells
    logged = []
    finetune(_config(tiny_dir, run, steps=8, save_every=3, keep_last=3, resume="auto"), log=logged.append)
    skipped = [line for line in logged if "skipping damaged checkpoint" in line]
    assert len(skipped) == 2
    assert "step-000008" in skipped[0] and "truncated or corrupt" in skipped[0]
    assert "step-000006" in skipped[1] and "does not match the checksum" in skipped[1]
    assert any(re.search(r"resumed from .*step-000003 at step 3", line) for line in logged), logged
    _same_run(run, straight)  # from step 3, it is the same run


def test_a_damaged_trainer_state_is_skipped_and_a_named_checkpoint_is_refused(tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    finetune(_config(tiny_dir, run, steps=4, save_every=2), log=lambda m: None)
    state = run / "checkpoints/step-000004/trainer_state.pt"
    state.write_bytes(state.read_bytes()[:-200])
    logged = []
    finetune(_config(tiny_dir, run, steps=4, save_every=2, resume="auto"), log=logged.append)
    assert any("skipping damaged checkpoint" in line and "trainer_state.pt: truncated or corrupt" in line
               for line in logged), logged
    # A checkpoint named by --resume is that one or none: an error naming its file.
    _flip_a_data_byte(run / "checkpoints/step-000002/adapter_state.safetensors")
    with pytest.raises(CheckpointError, match=r"step-000002/adapter_state\.safetensors: .*checksum"):
        finetune(_config(tiny_dir, run, steps=4, resume=str(run / "checkpoints/step-000002")), log=lambda m: None)
    (run / "checkpoints/step-000004/adapter_state.safetensors").write_bytes(b"garbage")
    assert cli(["finetune", "--model", str(tiny_dir), "--out", str(run), "--resume", "auto", "--steps", "4",
                "--train-examples", "40", "--eval-examples", "8", "--batch-size", "4", "--rank", "4", "--alpha", "8",
                "--dropout", "0.1"]) == 2
    assert "none of the 2 checkpoints in" in capsys.readouterr().err


@pytest.mark.parametrize("resume", [False, True])
def test_directories_of_cut_off_saves_are_removed_on_the_next_start(tiny_dir, tmp_path, resume):
    run = tmp_path / "run"
    if resume:
        finetune(_config(tiny_dir, run, steps=2, save_every=0), log=lambda m: None)
    partial = run / "checkpoints/.step-000004.tmp-4242"  # what a kill -9 during a save leaves
    partial.mkdir(parents=True)
    (partial / "adapter_state.safetensors").write_bytes(b"half")
    logged = []
    finetune(_config(tiny_dir, run, steps=3 if resume else 2, save_every=0, resume="auto" if resume else ""),
             log=logged.append)
    assert not partial.exists()
    assert any(f"removed {partial}" in line for line in logged), logged
    assert not list((run / "checkpoints").glob(".*"))


# --- 11: one prompt format end to end --------------------------------------------------------------
@pytest.fixture
def model_inputs(monkeypatch):
    """The prompt ids of each sequence the generation engine was given."""
    from lorakit.serve.engine import Engine

    seen, real = [], Engine.complete

    def recording(self, generations):
        seen.extend(g.prompt_ids for g in generations)
        return real(self, generations)

    monkeypatch.setattr(Engine, "complete", recording)
    return seen


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_an_adapter_trained_on_raw_prompts_is_asked_with_the_ids_it_trained_on(tiny_dir, tmp_path, model_inputs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    records = [{"prompt": f"Q{i}:", "completion": f" a{i}"} for i in range(10)]
    run = tmp_path / "run"
    finetune(_config(tiny_dir, run, data=str(_write(tmp_path / "d.jsonl", records)), steps=1, save_every=0,
                     val_fraction=0.2), log=lambda m: None)
    assert json.loads((run / "adapter" / data.PROMPT_FILE).read_text()) == {"prompt_format": "raw"}
    trained = data.tokenize([{"prompt": "Q7:", "completion": " a7"}], tokenizer, 64).examples[0]
    trained_prompt = [t for t, label in zip(trained["input_ids"], trained["labels"]) if label == data.IGNORE]
    model_inputs.clear()
    assert cli(["generate", "--model", str(tiny_dir), "--adapter", str(run / "adapter"), "--prompt", "Q7:",
                "--max-new-tokens", "2"]) == 0
    assert model_inputs == [trained_prompt]
    # eval of the same adapter on a built-in task asks its prompts raw too
    model_inputs.clear()
    assert cli(["eval", "--model", str(tiny_dir), "--adapter", str(run / "adapter"), "--eval-examples", "2",
                "--max-new-tokens", "2"]) == 0
    from lorakit.train import tasks

    asked = {tuple(data.prompt_ids(e.prompt, tokenizer)) for e in tasks.split("date", 0, 2)[1]}
    assert {tuple(ids) for ids in model_inputs} == asked


def test_an_adapter_trained_on_chat_is_asked_through_the_chat_template(tiny_dir, tmp_path, model_inputs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
               for i in range(10)]
    run = tmp_path / "run"
    finetune(_config(tiny_dir, run, data=str(_write(tmp_path / "d.jsonl", records)), steps=1, save_every=0,
                     val_fraction=0.2, eval_data=str(_write(tmp_path / "e.jsonl", [{"prompt": "q1", "completion": "a1"}]))),
             log=lambda m: None)
    assert data.read_prompt_format(run / "adapter") == "chat"
    chat = data.prompt_ids([{"role": "user", "content": "q1"}], tokenizer)
    assert model_inputs == [chat]  # the prompt/completion eval record was asked as the chat it trained on
    model_inputs.clear()
    assert cli(["generate", "--model", str(tiny_dir), "--adapter", str(run / "adapter"), "--prompt", "q1",
                "--max-new-tokens", "2"]) == 0
    assert model_inputs == [chat]


def test_prompt_formats_of_data_and_their_conversions(tmp_path):
    chat = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    raw, text = [{"prompt": "p", "completion": "c"}], [{"text": "t"}]
    assert data.prompt_format_of(chat + text, "f") == "chat" and data.prompt_format_of(raw + text, "f") == "raw"
    assert data.prompt_format_of(text, "f") == "raw"
    with pytest.raises(data.DataError, match="f: mixes chat messages with prompt/completion records"):
        data.prompt_format_of(chat + raw, "f")
    assert data.in_format("p", "chat") == [{"role": "user", "content": "p"}] and data.in_format("p", "raw") == "p"
    assert data.in_format([{"role": "user", "content": "q"}], "raw") == "q"
    with pytest.raises(data.DataError, match="trained on raw prompts; a conversation of 2 messages"):
        data.in_format([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "raw")
    assert data.read_prompt_format(tmp_path) is None  # PEFT's adapters have none
    (tmp_path / data.PROMPT_FILE).write_text('{"prompt_format": "xml"}')
    with pytest.raises(data.DataError, match="prompt_format must be one of"):
        data.read_prompt_format(tmp_path)


# --- 12 and 10: batch size, --help, merge --untie, params ------------------------------------------
def test_a_batch_larger_than_the_data_is_said_and_fills_whole_micro_batches(tiny_dir, tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(50)])
    logged = []
    summary = finetune(_config(tiny_dir, tmp_path / "one", data=str(path), batch_size=100, steps=1, save_every=0),
                       log=logged.append)
    assert "--batch-size 100 is more than the 45 training examples: each step uses 45" in logged
    assert summary["batch_size"] == 45 and "1 × 45" in (tmp_path / "one/report.md").read_text()
    logged.clear()
    finetune(_config(tiny_dir, tmp_path / "two", data=str(path), batch_size=100, grad_accum=2, steps=1, save_every=0),
             log=logged.append)
    assert ("--batch-size 100 is more than the 45 training examples: each step uses 44 (whole micro-batches of 22)"
            in logged)


@pytest.mark.parametrize("command, present, absent", [
    ("finetune", ["--device", "--eval-batch-size", "--train-examples", "--max-length"], ["--untie", "--prompt"]),
    ("eval", ["--device", "--eval-batch-size", "--eval-examples"], ["--train-examples", "--max-length", "--untie"]),
    ("generate", ["--device", "--max-new-tokens", "--prompt"], ["--eval-batch-size", "--eval-examples", "--task"]),
    ("merge", ["--device", "--untie", "--adapter"], ["--max-new-tokens", "--eval-batch-size"]),
    ("params", ["--rank", "--shape", "--model", "--targets"], ["--device", "--train-examples"]),
    ("spectrum", ["--model", "--targets", "--niter", "--heatmap"], ["--rank-pattern", "--train-examples", "--adapter"]),
    ("resize", ["--rank", "--energy", "--out"], ["--train-examples", "--max-new-tokens"]),
    ("advise", ["--budget", "--from", "--from-adapter", "--probe-steps"], ["--eval-batch-size", "--untie"]),
])
def test_help_lists_only_the_options_a_command_uses(command, present, absent, capsys):
    with pytest.raises(SystemExit):
        cli([command, "--help"])
    options = set(re.findall(r"--[a-z][a-z0-9-]*", capsys.readouterr().out))
    assert set(present) <= options and not set(absent) & options, options


def test_merge_untie_merges_an_adapter_on_a_tied_embedding(tiny_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tied = tmp_path / "tied"
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(AutoTokenizer.from_pretrained(tiny_dir)), hidden_size=32,
                                        intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, tie_word_embeddings=True))
    base.save_pretrained(tied)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(tied)
    adapted = lk.adapt(AutoModelForCausalLM.from_pretrained(tied), lk.LoRA(rank=2, alpha=4), ["embed_tokens"])
    assert adapted.lm_head.weight is adapted.model.embed_tokens.weight
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.5)
    lk.save(adapted, tmp_path / "adapter")
    ids = torch.arange(1, 9).reshape(1, 8)
    expected = adapted.eval()(ids).logits
    merge = ["merge", "--model", str(tied), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]
    assert cli(merge) == 2
    assert "lm_head.weight shares a weight the adapter changes (a tied output head)" in capsys.readouterr().err
    assert cli([*merge, "--untie"]) == 0
    assert "--untie: lm_head.weight now holds its own copy of the base weight" in capsys.readouterr().err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight and not merged.config.tie_word_embeddings
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)  # what the adapter computed
    torch.testing.assert_close(merged.lm_head.weight, base.lm_head.weight)  # the head as it was


@pytest.mark.parametrize("args, message", [
    (["--rank", "0"], "LoRA: rank must be > 0, got 0"),
    (["--rank", "-3"], "LoRA: rank must be > 0, got -3"),
    (["--count", "0"], "--count must be > 0, got 0"),
    (["--shape", "8x8", "--rank", "9"], r"--rank 9 is more than min\(d_out, d_in\) = 8 of 8x8"),
    (["--shape", "8x8", "--method", "pissa", "--rank", "9"], r"--rank 9 is more than min\(d_out, d_in\) = 8 of 8x8"),
    (["--shape", "0x8"], "shape dimensions must be positive"),
    (["--method", "svft", "--pattern", "plain", "--width", "2"], "SVFT: the plain pattern is the diagonal"),
    (["--method", "lorra"], r"--method: unknown method 'lorra'; did you mean 'lora'"),
])
def test_params_refuses_nonsense(args, message, capsys):
    assert cli(["params", *args]) == 2
    assert re.search("lorakit params: error: " + message, capsys.readouterr().err)
    assert cli(["params", "--shape", "8x8", "--method", "svf"]) == 0  # svf has no rank
    with pytest.raises(SystemExit):  # ... nor a --rank flag
        cli(["params", "--shape", "8x8", "--method", "svf", "--rank", "8"])
    assert "unrecognized arguments: --rank 8" in capsys.readouterr().err


# --- one registry: the method options come from the recipe -------------------------------------------
D_OUT, D_IN = 64, 32


@pytest.mark.parametrize("method, options, expected", [
    ("lora", {}, 8 * (D_IN + D_OUT)),
    ("lora", {"rank": 3}, 3 * (D_IN + D_OUT)),
    ("rslora", {}, 8 * (D_IN + D_OUT)),
    ("pissa", {"rank": 4}, 4 * (D_IN + D_OUT)),
    ("milora", {}, 8 * (D_IN + D_OUT)),
    ("dora", {}, 8 * (D_IN + D_OUT) + D_OUT),
    ("lora_xs", {"rank": 5}, 5 * 5),
    ("svf", {}, min(D_OUT, D_IN)),
    ("svft", {}, min(D_OUT, D_IN)),
    ("svft", {"pattern": "banded", "width": 2}, 32 * (2 * 2 + 1) - 2 * (2 + 1)),
    ("svft", {"pattern": "random", "width": 3}, 32 * (2 * 3 + 1) - 3 * (3 + 1)),  # as many as banded
    ("svft", {"pattern": "top_k", "width": 1}, 32 * (2 * 1 + 1) - 1 * (1 + 1)),
    ("adalora", {}, 12 * (D_IN + D_OUT + 1)),  # at init_rank
    ("adalora", {"init_rank": 6, "target_rank": 2}, 6 * (D_IN + D_OUT + 1)),
])
def test_params_counts_what_the_built_adapter_trains(method, options, expected, capsys):
    """lorakit params builds the adapter (on meta) and counts it: the formulas of METHODS.md, per method."""
    from lorakit.analysis import trainable_numel

    recipe = cfg.ParamsConfig(method=method, options=options).recipe()
    assert trainable_numel(recipe, D_OUT, D_IN) == expected
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    assert cli(["params", "--method", method, *flags, "--shape", f"{D_OUT}x{D_IN}", "--count", "3"]) == 0
    out = capsys.readouterr().out
    assert f"{D_OUT}x{D_IN} x3: {recipe!r} trains {3 * expected:,} vs {3 * D_OUT * D_IN:,} for full" in out, out
    assert f"total: {3 * expected:,} trainable vs {3 * D_OUT * D_IN:,} full" in out


def test_method_options_reach_the_recipe_by_flag_and_by_yaml(tmp_path):
    """SVFT's seed is --svft-seed (--seed is the run's), and svft_seed in YAML; both build that recipe."""
    from lorakit.cli import build_config, parser

    expected = lk.SVFT(pattern="banded", width=2, seed=3)
    argv = ["finetune", "--method", "svft", "--pattern", "banded", "--width", "2", "--svft-seed", "3", "--seed", "5"]
    config = build_config(cfg.FinetuneConfig, parser(argv).parse_args(argv))
    assert config.recipe() == expected and config.seed == 5
    (tmp_path / "run.yaml").write_text("method: svft\npattern: banded\nwidth: 2\nsvft-seed: 3\nseed: 5\n")
    argv = ["finetune", "--config", str(tmp_path / "run.yaml")]
    config = build_config(cfg.FinetuneConfig, parser(argv).parse_args(argv))
    assert config.recipe() == expected and config.seed == 5
    argv = [*argv, "--width", "1"]  # the YAML's method's flags, and flags win
    loaded = build_config(cfg.FinetuneConfig, parser(argv).parse_args(argv))
    assert loaded.recipe() == lk.SVFT(pattern="banded", width=1, seed=3)
    assert cfg.option_keys("svft").keys() == {"pattern", "width", "svft_seed", "dropout"}
    assert cfg.flag_of("svft", "seed") == "--svft-seed" and cfg.flag_of("adalora", "init_rank") == "--init-rank"


def test_a_method_option_given_on_the_command_line_trains(tiny_dir, tmp_path):
    run = tmp_path / "run"
    assert cli(["finetune", "--model", str(tiny_dir), "--out", str(run), "--method", "svft", "--pattern", "random",
                "--width", "1", "--svft-seed", "3", "--steps", "1", "--batch-size", "4", "--train-examples", "8",
                "--eval-examples", "2", "--max-new-tokens", "2", "--skip-eval-before", "--save-every", "0"]) == 0
    saved = json.loads((run / "adapter/adapter_config.json").read_text())["lorakit_recipe"]
    assert (saved["pattern"], saved["width"], saved["seed"]) == ("random", 1, 3)
    assert "`SVFT(pattern='random', width=1, seed=3, dropout=0.0)` (svft)" in (run / "report.md").read_text()


def test_help_shows_the_chosen_methods_options(tmp_path, capsys):
    def flags(*args):
        with pytest.raises(SystemExit):
            cli(["finetune", *args, "--help"])
        return set(re.findall(r"--[a-z][a-z0-9-]*", capsys.readouterr().out))

    assert "--niter" in flags("--method", "pissa") and "--niter" not in flags()
    assert {"--rank", "--alpha", "--dropout", "--rslora"} <= flags() and "--init-rank" not in flags()
    (tmp_path / "run.yaml").write_text("method: adalora\n")
    assert {"--init-rank", "--target-rank", "--tinit"} <= flags("--config", str(tmp_path / "run.yaml"))
    assert "--niter" in flags("--config", str(tmp_path / "run.yaml"), "--method", "lora_xs")  # the flag wins


def test_an_unknown_method_is_a_clear_error(tmp_path, capsys):
    assert cli(["finetune", "--method", "qlora", "--help"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit finetune: error: --method: unknown method 'qlora'")
    assert "Registered: " + ", ".join(registry.names()) in err
    (tmp_path / "run.yaml").write_text("method: dorra\n")
    assert cli(["params", "--config", str(tmp_path / "run.yaml")]) == 2
    assert f"lorakit params: error: {tmp_path / 'run.yaml'}: unknown method 'dorra'; did you mean 'dora'" in \
        capsys.readouterr().err


def test_the_fsdp_refusal_is_for_any_method_with_a_step_schedule(monkeypatch):
    """A recipe that overrides on_step (AdaLoRA's rank allocator) needs whole gradients, which FSDP shards."""
    from lorakit.train import trainer

    monkeypatch.setenv("WORLD_SIZE", "2")
    config = cfg.FinetuneConfig(method="adalora", strategy="fsdp", device="cpu")
    with pytest.raises(lk.ConfigError, match="--method adalora runs a schedule after each step .*--strategy ddp"):
        trainer._distributed(config)


def test_the_metrics_file_is_closed_when_the_loop_raises(tiny_dir, tmp_path, monkeypatch):
    import builtins

    from lorakit.train.trainer import TrainingError

    opened, real_open = [], builtins.open

    def recording(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        if str(path).endswith("metrics.jsonl"):
            opened.append(f)
        return f

    monkeypatch.setattr(builtins, "open", recording)
    real = CompletionLoss.forward
    monkeypatch.setattr(CompletionLoss, "forward", lambda self, **b: (real(self, **b)[0] * float("nan"), 1))
    with pytest.raises(TrainingError):
        finetune(_config(tiny_dir, tmp_path / "run", steps=2, save_every=0), log=lambda m: None)
    assert opened and all(f.closed for f in opened)
