"""Issue 21: `lorakit eval` scores the file it is given, sources are named truthfully, accuracy per group,
validation apart from the test set (its own split, early stopping, --keep best), progress bars for evaluations."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from test_train import ROOT, _config, save_tiny_model

import lorakit as lk
from lorakit.cli import main as cli
from lorakit.train import config as cfg
from lorakit.train import trainer
from lorakit.train.trainer import datasets, finetune


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _records(n, prefix="q", **fields):
    return [{"prompt": f"{prefix}{i}:", "completion": f" a{i}", **fields} for i in range(n)]


@pytest.fixture
def asked(monkeypatch):
    """Every prompt the scoring asked the model."""
    prompts, real = [], trainer.generate

    def recording(model, tokenizer, batch, *rest, **kwargs):
        prompts.extend(batch)
        return real(model, tokenizer, batch, *rest, **kwargs)

    monkeypatch.setattr(trainer, "generate", recording)
    return prompts


def _eval(tiny_dir, *args):
    return cli(["eval", "--model", str(tiny_dir), "--max-new-tokens", "1", *args])


# --- lorakit eval scores the file it is given ----------------------------------------------------
@pytest.mark.parametrize("flag", ["--data", "--eval-data"])
def test_eval_scores_every_record_of_the_file_given(tiny_dir, tmp_path, capsys, asked, flag):
    # More records than --eval-examples (a built-in task's count): a file is scored whole.
    path = _write(tmp_path / "test.jsonl", _records(7))
    assert _eval(tiny_dir, flag, str(path), "--eval-examples", "3") == 0
    assert sorted(asked) == sorted(r["prompt"] for r in _records(7))
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(f"(7 records from {path})")


def test_eval_with_both_files_scores_eval_data_and_says_so(tiny_dir, tmp_path, capsys, asked):
    train = _write(tmp_path / "train.jsonl", _records(5, "t"))
    test = _write(tmp_path / "test.jsonl", _records(3))
    assert _eval(tiny_dir, "--data", str(train), "--eval-data", str(test)) == 0
    printed = capsys.readouterr()
    assert sorted(asked) == ["q0:", "q1:", "q2:"]
    assert printed.out.strip().endswith(f"(3 records from {test})")
    assert f"scoring --eval-data {test}; --data {train} is not scored" in printed.err


def test_eval_without_a_file_scores_the_built_in_task(tiny_dir, capsys, asked):
    from lorakit.train import tasks

    assert _eval(tiny_dir, "--eval-examples", "3", "--task", "extract") == 0
    assert sorted(p[-1]["content"] for p in asked) == sorted(e.prompt for e in tasks.split("extract", 0, 3)[1])
    assert capsys.readouterr().out.strip().endswith("(task extract, 3 eval examples)")


def test_eval_says_what_it_could_not_score(tiny_dir, tmp_path, capsys, asked):
    path = _write(tmp_path / "mixed.jsonl", _records(3) + [{"text": "free text"}, {"text": "more"}])
    assert _eval(tiny_dir, "--data", str(path)) == 0
    assert len(asked) == 3
    said = capsys.readouterr().out.strip().splitlines()[-1]
    assert said.endswith(f"(5 records from {path}, 3 scored (2 text records without an answer to match))")
    _write(path, [{"text": "only text"}])
    assert _eval(tiny_dir, "--data", str(path)) == 2
    assert "nothing to score: text records have no answer to match" in capsys.readouterr().err


# --- accuracy per group -------------------------------------------------------------------------
def test_eval_shows_accuracy_per_task_and_per_any_field(tiny_dir, tmp_path, capsys, monkeypatch):
    records = [*_records(3, "d", task="date", lang="en"), *_records(2, "x", task="extract", lang="de"),
               {"prompt": "n0:", "completion": " a0"}]
    path = _write(tmp_path / "multi.jsonl", records)
    # A model that answers the "d" prompts right and the others wrong.
    monkeypatch.setattr(trainer, "generate", lambda model, tokenizer, prompts, *rest, **kwargs:
                        [" a" + p[1:-1] if p.startswith("d") else "wrong" for p in prompts])
    assert _eval(tiny_dir, "--data", str(path)) == 0
    out = capsys.readouterr().out
    for row in ("| task | records | correct | accuracy |", "| date | 3 | 3 | 100.0% |", "| extract | 2 | 0 | 0.0% |",
                "| (no task) | 1 | 0 | 0.0% |"):
        assert row in out, out
    assert out.strip().splitlines()[-1].startswith("accuracy: 50.0% ")
    assert _eval(tiny_dir, "--data", str(path), "--group-by", "lang") == 0
    out = capsys.readouterr().out
    assert "| lang | records | correct | accuracy |" in out and "| en | 3 | 3 | 100.0% |" in out
    assert _eval(tiny_dir, "--data", str(path), "--group-by", "topic") == 2
    assert "--group-by topic: none of the 6 records scored has a 'topic' field" in capsys.readouterr().err
    _write(path, _records(2))  # no task field: no table
    assert _eval(tiny_dir, "--data", str(path)) == 0
    assert "| task |" not in capsys.readouterr().out


# --- finetune names its sources truthfully --------------------------------------------------------
def test_finetune_report_names_the_true_sources_and_groups(tiny_dir, tmp_path, capsys):
    train = _write(tmp_path / "train.jsonl", _records(12, "t", task="a"))
    test = _write(tmp_path / "test.jsonl", _records(4, task="a") + _records(3, "x", task="b"))
    run = tmp_path / "run"
    assert cli(["finetune", "--model", str(tiny_dir), "--out", str(run), "--data", str(train), "--eval-data",
                str(test), "--steps", "2", "--batch-size", "4", "--max-new-tokens", "2", "--val-every", "1",
                "--rank", "2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(f"(7 records from {test})")
    report = (run / "report.md").read_text()
    assert f"| training data | 11 records from {train} |" in report
    assert "| validation data | 1 record held out of the training records (--val-fraction 0.05) |" in report
    assert f"| test data (exact match) | 7 records from {test} |" in report
    assert "train.jsonl (" not in report and "held-out examples" not in report
    assert "## Accuracy per task" in report and "| task | records | accuracy before | correct | accuracy after |" \
        in report
    for group, records in (("a", 4), ("b", 3)):  # the tiny model scores something between 0 and all, before and after
        assert re.search(rf"\| {group} \| {records} \| [\d.]+% \| \d \| [\d.]+% \|", report), report
    # the groups' accuracy before, weighted by their records, is the accuracy before
    before = {g: float(v) for g, v in re.findall(r"\| ([ab]) \| \d \| ([\d.]+)% \|", report)}
    overall = float(re.search(r"\| accuracy before \| ([\d.]+)% \|", report)[1])
    assert abs((4 * before["a"] + 3 * before["b"]) / 7 - overall) < 0.1
    settings = json.loads(re.search(r"Settings: `(.*)`", report)[1])
    assert "task" not in settings and "train_examples" not in settings and settings["eval_data"] == str(test)
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert [r["group"] for r in rows] == ["a"] * 4 + ["b"] * 3


def test_finetune_on_a_task_says_so_and_scores_eval_data_when_given(tiny_dir, tmp_path):
    test = _write(tmp_path / "test.jsonl", _records(3))
    summary = finetune(_config(tiny_dir, tmp_path / "run", steps=1, save_every=0, eval_data=str(test)),
                       log=lambda m: None)
    assert summary["test"] == f"3 records from {test}" and summary["eval_examples"] == 3
    assert summary["train"] == "task date, 40 generated examples"
    report = (tmp_path / "run/report.md").read_text()
    assert '"task": "date"' in report  # it trained on the task: the settings say so
    assert f"| test data (exact match) | 3 records from {test} |" in report


# --- validation is not the test set ---------------------------------------------------------------
def _prompts(tokenized, tokenizer):
    from lorakit.train import data

    return {tokenizer.decode([t for t, label in zip(e["input_ids"], e["labels"]) if label == data.IGNORE])
            for e in tokenized.examples}


def test_validation_comes_from_training_data_never_the_test_set(tiny_dir, tmp_path, tokenizer):
    path = _write(tmp_path / "d.jsonl", _records(40))
    made = datasets(cfg.FinetuneConfig(data=str(path), val_fraction=0.1, max_length=64), tokenizer)
    tested, validated, trained = {p for p, _ in made.evaluation}, _prompts(made.validation, tokenizer), \
        _prompts(made.train, tokenizer)
    assert (len(tested), len(validated), len(trained)) == (4, 3, 33)  # 10 % tested, 10 % of the other 36 validate
    assert not validated & tested and not validated & trained and not trained & tested
    assert made.sources.validation == "3 records held out of the training records (--val-fraction 0.1)"
    # A built-in task: validation examples are generated apart from both; training keeps its count.
    task = datasets(cfg.FinetuneConfig(train_examples=40, eval_examples=10, max_length=200), tokenizer)
    held_out = {p[-1]["content"] for p, _ in task.evaluation}
    validated = _prompts(task.validation, tokenizer)
    assert len(task.train.examples) == 40 and len(task.validation.examples) == 2  # 5 % of 40
    assert not any(prompt in v for v in validated for prompt in held_out)
    # --val-data: its records; --val-fraction 0 or --val-every 0: none, and nothing held out for it.
    val = _write(tmp_path / "v.jsonl", _records(5, "v"))
    given = datasets(cfg.FinetuneConfig(data=str(path), val_data=str(val), max_length=64), tokenizer)
    assert _prompts(given.validation, tokenizer) == {f"v{i}:" for i in range(5)} and len(given.train.examples) == 36
    assert given.sources.validation == f"5 records from {val}"
    for off in (dict(val_fraction=0.0), dict(val_every=0)):
        none = datasets(cfg.FinetuneConfig(data=str(path), max_length=64, **off), tokenizer)
        assert not none.validation.examples and len(none.train.examples) == 36
        assert none.sources.validation.startswith("none (--val-")


def test_splits_refuse_what_cannot_be_held_out(tiny_dir, tmp_path, tokenizer):
    one = _write(tmp_path / "one.jsonl", _records(1))
    with pytest.raises(lk.ConfigError, match=r"one\.jsonl: 1 training record\(s\) are too few to hold out test "
                                             r"data and train on the rest; give --eval-data FILE"):
        datasets(cfg.FinetuneConfig(data=str(one)), tokenizer)
    two = _write(tmp_path / "two.jsonl", _records(2))
    with pytest.raises(lk.ConfigError, match="too few to hold out validation data.*--val-data FILE or --val-fraction"):
        datasets(cfg.FinetuneConfig(data=str(two)), tokenizer)


@pytest.mark.parametrize("changes, message", [
    (dict(keep="best", val_every=0), "--keep best needs the validation loss, which --val-every 0 turns off"),
    (dict(early_stopping=2, val_every=0), "--early-stopping needs the validation loss"),
    (dict(val_data="v.jsonl", val_every=0), "--val-data needs the validation loss"),
    (dict(early_stopping=2, keep="best", val_fraction=0.0),
     r"--early-stopping and --keep best need validation data: --val-data FILE, or --val-fraction > 0"),
    (dict(val_data="t.jsonl", eval_data="./t.jsonl"), "--val-data and --eval-data are both"),
    (dict(early_stopping=-1), "--early-stopping must be >= 0"),
    (dict(val_fraction=1.0), r"--val-fraction must be in \[0, 1\)"),
    (dict(test_fraction=0.0), r"--test-fraction must be in \(0, 1\)"),
])
def test_validation_settings_that_cannot_work_are_refused(changes, message):
    with pytest.raises(lk.ConfigError, match=message):
        cfg.FinetuneConfig(**changes).check()


def _val_losses(monkeypatch, losses):
    """Make validation return ``losses`` in turn, one per validation."""
    given = iter(losses)
    monkeypatch.setattr(trainer, "validation_loss", lambda *args, **kwargs: next(given))


def _checkpoint_tensors(run, step):
    from lorakit.checkpoint import read_tensors

    return read_tensors(run / f"checkpoints/step-{step:06d}/adapter_state.safetensors")


def _saved_adapter(tiny_dir, run):
    from transformers import AutoModelForCausalLM

    return lk.load(AutoModelForCausalLM.from_pretrained(tiny_dir), run / "adapter").state_dict()


def _is_step(tiny_dir, run, step) -> bool:
    saved, at_step = _saved_adapter(tiny_dir, run), _checkpoint_tensors(run, step)
    return bool(at_step) and all(torch.equal(saved[k], v) for k, v in at_step.items())


def test_early_stopping_stops_after_patience_validations_without_improvement(tiny_dir, tmp_path, monkeypatch):
    _val_losses(monkeypatch, [3.0, 2.0, 2.5, 2.0, 9.0])
    run = tmp_path / "run"
    summary = finetune(_config(tiny_dir, run, steps=8, val_every=1, early_stopping=2, save_every=0),
                       log=lambda m: None)
    assert summary["steps"] == 4 and summary["stopped_early"] and summary["scored_step"] == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [1, 2, 3, 4]  # a tie is no improvement
    assert (run / "checkpoints/step-000004").is_dir()  # the run can be looked at from where it stopped
    report = (run / "report.md").read_text()
    assert ("| adapter scored | step 4 of 4: the last (--keep last); stopped early: no lower validation loss in 2 "
            "validations (--early-stopping 2) |") in report


def test_keep_best_saves_and_scores_the_lowest_validation_loss_step(tiny_dir, tmp_path, monkeypatch):
    _val_losses(monkeypatch, [3.0, 1.0, 2.0, 4.0])
    run = tmp_path / "run"
    said = []
    summary = finetune(_config(tiny_dir, run, steps=4, val_every=1, keep="best", save_every=1, keep_last=4),
                       log=said.append)
    assert summary["scored_step"] == 2 and summary["best_val_loss"] == 1.0 and summary["steps"] == 4
    assert _is_step(tiny_dir, run, 2) and not _is_step(tiny_dir, run, 4)
    assert "| adapter scored | step 2 of 4: the lowest validation loss, 1.0000 (--keep best) |" in (
        run / "report.md").read_text()
    assert any(m.startswith("scoring the adapter of step 2 on task date, 8 eval examples") for m in said)
    assert [p.name for p in (run / "checkpoints").glob("best-*")] == ["best-step-000002.safetensors"]
    # --keep last: the last step's adapter.
    _val_losses(monkeypatch, [3.0, 1.0, 2.0, 4.0])
    finetune(_config(tiny_dir, tmp_path / "last", steps=4, val_every=1, save_every=1, keep_last=4), log=said.append)
    assert _is_step(tiny_dir, tmp_path / "last", 4)


def test_keep_best_and_early_stopping_go_on_across_a_resume(tiny_dir, tmp_path, monkeypatch):
    from lorakit.train import data

    calls, real = {"n": 0}, data.collate

    def interrupt_at_step_five(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    run = tmp_path / "run"
    settings = dict(steps=8, val_every=1, keep="best", early_stopping=3, save_every=0)
    monkeypatch.setattr(data, "collate", interrupt_at_step_five)
    _val_losses(monkeypatch, [3.0, 1.0, 2.0, 4.0])
    with pytest.raises(KeyboardInterrupt):
        finetune(_config(tiny_dir, run, **settings), log=lambda m: None)
    monkeypatch.setattr(data, "collate", real)
    weights_of_step_2 = trainer.read_tensors(trainer.best_path(run, 2))
    # Two validations since the best at step 2: one more without improvement stops the run, at step 5.
    _val_losses(monkeypatch, [5.0])
    summary = finetune(_config(tiny_dir, run, resume="auto", **settings), log=lambda m: None)
    assert (summary["steps"], summary["scored_step"], summary["stopped_early"]) == (5, 2, True)
    saved = _saved_adapter(tiny_dir, run)
    assert all(torch.equal(saved[k], v) for k, v in weights_of_step_2.items())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_stop_early_together_and_keep_the_best(tiny_dir, tmp_path, strategy):
    """The main process's validation loss decides for every process: both stop at the same step (one stopping
    alone would leave the other waiting in a collective), and FSDP gathers the best weights on all of them."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from test_train import _config
        from lorakit.train import trainer

        losses = iter([2.0, 1.0, 3.0, 4.0, 5.0, 6.0])
        trainer.validation_loss = lambda *args, **kwargs: next(losses)
        config = _config({str(tiny_dir)!r}, {str(tmp_path / 'run')!r}, steps=8, val_every=1, early_stopping=2,
                         keep="best", strategy={strategy!r}, options=dict(dropout=0.0))
        summary = trainer.finetune(config, log=lambda m: None)
        print("steps=" + str(summary["steps"]))
    """))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split().count("steps=4") == 2, done.stdout  # both processes stopped at step 4
    report = (tmp_path / "run/report.md").read_text()
    assert "| adapter scored | step 2 of 4: the lowest validation loss, 1.0000 (--keep best)" in report


# --- progress bars for evaluations --------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_evaluations_show_a_progress_bar_on_a_terminal_only(tiny_dir, tmp_path, monkeypatch, terminal):
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    finetune(_config(tiny_dir, tmp_path / "run", steps=2, val_every=1, save_every=0, skip_eval_before=False),
             log=lambda m: None)
    shown = stderr.getvalue()
    for bar in ("scoring:", "validation:"):  # before and after training; the validation loss
        assert (bar in shown) == terminal, shown[-2000:]
    if terminal:
        assert re.search(r"scoring: +0%\|.*\| 0/8", shown)
    assert "training:" in shown  # the training bar as before
