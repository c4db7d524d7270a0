"""Regression tests of issue 22's training-run findings: SIGTERM saves a checkpoint and exits 143 (11), a full
disk or an unwritable --out is a clean error (12), --resume auto without a checkpoint starts fresh (13), and a
diverging run is warned (14)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import ROOT, _config, _losses, run_straight, save_tiny_model
from test_train_defects import _same_run

from lorakit.cli import main as cli
from lorakit.errors import LorakitError
from lorakit.train import trainer
from lorakit.train.trainer import CheckpointError, CompletionLoss, Terminated, diverged, finetune


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def straight(tiny_dir, tmp_path_factory):
    return run_straight(tiny_dir, tmp_path_factory.mktemp("straight") / "run")


def _flags(tiny_dir, out, steps: int, *more: str) -> list[str]:
    """``lorakit finetune``'s arguments for a small run of ``steps`` into ``out`` (``_config``'s settings)."""
    return ["finetune", "--model", str(tiny_dir), "--out", str(out), "--steps", str(steps), "--batch-size", "4",
            "--train-examples", "40", "--eval-examples", "4", "--max-new-tokens", "4", "--skip-eval-before",
            "--val-every", "0", "--save-every", "0", "--lr", "1e-2", "--rank", "4", "--alpha", "8", *more]


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- 11: SIGTERM is a Ctrl-C that exits 143 --------------------------------------------------------
def test_sigterm_saves_a_checkpoint_exits_143_and_the_run_resumes(tiny_dir, tmp_path):
    """A real ``python -m lorakit finetune`` process, sent SIGTERM (what schedulers and ``kill`` send) while it
    trains with --save-every 0: every step it committed is in the checkpoint, and --resume auto goes on."""
    run, env = tmp_path / "run", {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lorakit", *_flags(tiny_dir, run, 100_000)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        metrics = run / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count('"loss"') >= 3):  # training is under way
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, err[-3000:]
    done = len(_losses(run))  # the steps committed before the signal took effect
    assert done >= 3 and [p.name for p in (run / "checkpoints").iterdir()] == [f"step-{done:06d}"]
    assert f"stopped by SIGTERM at step {done}: checkpoint {run / 'checkpoints'}" in out
    resumed = subprocess.run([sys.executable, "-m", "lorakit", *_flags(tiny_dir, run, done + 2, "--resume", "auto")],
                             cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step-{done:06d}'} at step {done}" in resumed.stdout
    assert [r["step"] for r in _rows(run) if "loss" in r] == list(range(1, done + 3))


@pytest.fixture
def sigterm_fails_the_test():
    """A SIGTERM that reaches this process outside the trainer's handling fails the test instead of ending pytest."""
    def refuse(signum, frame):
        raise AssertionError("SIGTERM reached the test process: the trainer does not handle it")

    previous = signal.signal(signal.SIGTERM, refuse)
    yield
    signal.signal(signal.SIGTERM, previous)


def _signal_in_update(number: int, signum: int):
    """An optimizer post-step hook sending ``signum`` to this process inside the ``number``-th update; its handle."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    updates = []

    def send(optimizer, args, kwargs):
        updates.append(1)
        if len(updates) == number:
            os.kill(os.getpid(), signum)

    return register_optimizer_step_post_hook(send)


def test_sigterm_while_a_step_commits_takes_effect_after_it(tiny_dir, tmp_path, straight, sigterm_fails_the_test):
    """As for Ctrl-C: a SIGTERM inside step 5's update waits for the commit, the checkpoint is step 5's, and the
    resumed run is the uninterrupted one, bit for bit."""
    run = tmp_path / "run"
    handle = _signal_in_update(5, signal.SIGTERM)
    try:
        with pytest.raises(Terminated):
            finetune(_config(tiny_dir, run, steps=8, save_every=0), log=lambda m: None)
    finally:
        handle.remove()
    assert signal.getsignal(signal.SIGTERM).__name__ == "refuse"  # the caller's handler is back
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000005"]
    finetune(_config(tiny_dir, run, steps=8, save_every=0, resume="auto"), log=lambda m: None)
    _same_run(run, straight)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_the_command_exits_130_on_ctrl_c_and_143_on_sigterm(tiny_dir, tmp_path, capsys, signum, code,
                                                          sigterm_fails_the_test):
    handle = _signal_in_update(2, signum)
    try:
        assert cli(_flags(tiny_dir, tmp_path / "run", 4)) == code
    finally:
        handle.remove()
    what = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted"
    assert f"{what} at step 2: checkpoint" in capsys.readouterr().out


# --- 12: a full disk, an unwritable --out ------------------------------------------------------------
def _full_disk_at_the_second_save(monkeypatch, file: str) -> None:
    """Make the second checkpoint's ``file`` meet a full disk after part of it is written, failing as each writer
    does there: torch's with a RuntimeError (the one issue 22 met), safetensors' with an OSError (ENOSPC)."""
    from lorakit import checkpoint

    module, name = (torch, "save") if file == "trainer_state.pt" else (checkpoint, "save_file")
    real, calls = getattr(module, name), []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) < 2:
            return real(obj, path, *args, **kwargs)
        Path(path).write_bytes(b"PK\x03\x04 the part that fitted")
        if module is torch:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(module, name, save)


@pytest.mark.parametrize("file", ["trainer_state.pt", "adapter_state.safetensors"])
def test_a_disk_that_fills_during_a_save_is_a_clean_error_keeping_the_older_checkpoints(
        tiny_dir, tmp_path, monkeypatch, straight, file):
    run = tmp_path / "run"
    _full_disk_at_the_second_save(monkeypatch, file)
    with pytest.raises(CheckpointError) as caught:
        finetune(_config(tiny_dir, run, steps=8, save_every=3, keep_last=3), log=lambda m: None)
    message = str(caught.value)
    assert isinstance(caught.value, LorakitError)
    assert message.startswith(f"{run / 'checkpoints' / 'step-000006'}: cannot write the checkpoint (")
    assert "MiB free on its disk" in message and f"the newest kept is {run / 'checkpoints' / 'step-000003'}" in message
    if file == "adapter_state.safetensors":
        assert "No space left on device" in message
    # No partial directory is left, and the older checkpoint is whole: the run resumes from it as if never stopped.
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000003"]
    monkeypatch.undo()
    finetune(_config(tiny_dir, run, steps=8, save_every=3, keep_last=3, resume="auto"), log=lambda m: None)
    _same_run(run, straight)


@pytest.mark.parametrize("where", ["under a file", "immutable directory"])
def test_an_unwritable_out_is_refused_before_the_model_loads(tiny_dir, tmp_path, monkeypatch, capsys, request, where):
    """Root writes through permission bits, so the unwritable places are ones that stop root too: a path under a
    regular file, and a directory marked immutable (``chattr +i``, where the file system and privileges allow)."""
    if where == "under a file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "run"
    else:
        out = tmp_path / "run"
        out.mkdir()
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode:
            pytest.skip("chattr +i is not available here")
        request.addfinalizer(lambda: subprocess.run(["chattr", "-i", str(out)]))
        try:
            (out / "probe").write_text("")
            pytest.skip("this process writes into an immutable directory")
        except OSError:
            pass

    def load(*args, **kwargs):
        raise AssertionError("the model loaded before --out was checked")

    monkeypatch.setattr(trainer.models, "load", load)
    assert cli(_flags(tiny_dir, out, 2)) == 2
    assert f"lorakit finetune: error: --out {out}: cannot write there (" in capsys.readouterr().err


# --- 13: --resume auto with no checkpoint --------------------------------------------------------------
def test_resume_auto_without_a_checkpoint_starts_a_fresh_run(tiny_dir, tmp_path, straight):
    """What a kill during the first save leaves: its cut-off directory and the rows of the steps before it. "auto"
    starts over, saying so, and the run is a fresh one, its metrics alone."""
    run = tmp_path / "run"
    partial = run / "checkpoints/.step-000005.tmp-4242"
    partial.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join((straight / "metrics.jsonl").read_text().splitlines(True)[:5]))
    logged = []
    finetune(_config(tiny_dir, run, steps=8, save_every=0, resume="auto"), log=logged.append)
    assert f"--resume auto: no checkpoint in {run / 'checkpoints'}; starting a fresh run" in logged
    assert not partial.exists()
    _same_run(run, straight)
    assert [r["step"] for r in _rows(run) if "loss" in r] == list(range(1, 9))


# --- 14: a diverging run is warned ----------------------------------------------------------------------
# SmolLM2-135M-Instruct on the date task at --lr 1e4 (issue 22): 0.64 before the first update, then the loss of
# a uniform guess over its 49,152 tokens, ln 49152 = 10.80, at every step to the end.
DIVERGED_AT_LR_1E4 = [0.6446, 27.464, *[10.8027] * 14]
# The tiny model of these tests at --lr 1e-4, 1e-2 and 1 (40 steps; 1 is far too high yet does not diverge).
HEALTHY = [[4.62, 4.63, 4.63, 4.63, 4.64, 4.63, 4.65, 4.59, 4.64, 4.64, 4.63, 4.64, 4.62, 4.60, 4.61, 4.64],
           [4.62, 4.61, 4.56, 4.53, 4.50, 4.47, 4.48, 4.47, 4.46, 4.46, 4.48, 4.46, 4.43, 4.40, 4.43, 4.39],
           [4.62, 4.63, 4.60, 4.57, 4.50, 4.48, 4.50, 4.49, 4.46, 4.46, 4.48, 4.47, 4.47, 4.46, 4.47, 4.46]]


def test_the_divergence_rule():
    assert diverged(DIVERGED_AT_LR_1E4[:5]) is None  # not before 5 steps after the first
    said = diverged(DIVERGED_AT_LR_1E4[:6])
    assert said == ("the mean training loss of the last 5 steps, 14.1, is over twice the first step's, 0.645, and "
                    "over 1 nat above it")
    assert all(diverged(losses[:n]) is None for losses in HEALTHY for n in range(1, len(losses) + 1))
    # A loss near zero that doubles has not diverged: it has moved by a hundredth of a nat.
    assert diverged([0.01, *[0.03] * 10]) is None
    assert diverged([0.01, *[1.2] * 10]) is not None
    assert diverged([3.0, *[5.9] * 10]) is None and diverged([3.0, *[6.1] * 10]) is not None


def _blow_up(monkeypatch, from_call: int, interrupt_at: int = 0) -> None:
    """Multiply the loss by 20 from the ``from_call``-th forward on (as a diverging run's loss rises); a Ctrl-C at
    forward ``interrupt_at`` (0: none)."""
    real, calls = CompletionLoss.forward, []

    def forward(self, **batch):
        calls.append(1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        loss, n = real(self, **batch)
        return (loss * 20 if len(calls) >= from_call else loss), n

    monkeypatch.setattr(CompletionLoss, "forward", forward)


def test_a_diverging_run_is_warned_once_recorded_and_said_again_at_the_end(tiny_dir, tmp_path, monkeypatch,
                                                                             capsys, straight):
    _blow_up(monkeypatch, from_call=4)
    run = tmp_path / "run"
    assert cli(_flags(tiny_dir, run, 10)) == 0  # a warning: the run goes on to the end
    printed = capsys.readouterr().out.splitlines()
    warned = [line for line in printed if line.startswith("warning: the run has diverged at step 6: the mean "
                                                          "training loss of the last 5 steps, ")]
    assert len(warned) == 2 and warned[0].endswith("; a lower --lr than 0.01 helps")
    said = [i for i, line in enumerate(printed) if line == warned[0]]
    assert said[1] > said[0] + 1 and printed[said[1] + 1].startswith("report: ")  # said again after the run
    assert [(r["step"], r["diverged"]) for r in _rows(run) if "diverged" in r] == [(6, warned[0][len("warning: "):])]
    assert f"| warning | {warned[0][len('warning: '):]} |" in (run / "report.md").read_text()
    assert not any("diverged" in r for r in _rows(straight))  # a run that learns is not warned


def test_a_resumed_run_goes_on_from_the_losses_before_its_checkpoint(tiny_dir, tmp_path, monkeypatch):
    """Interrupted at step 5, before the rule can tell: resumed, it tells at step 6, as the run would have."""
    run = tmp_path / "run"
    _blow_up(monkeypatch, from_call=4, interrupt_at=6)
    with pytest.raises(KeyboardInterrupt):
        finetune(_config(tiny_dir, run, steps=8, save_every=0), log=lambda m: None)
    assert not any("diverged" in r for r in _rows(run))
    _blow_up(monkeypatch, from_call=1)
    logged = []
    finetune(_config(tiny_dir, run, steps=8, save_every=0, resume="auto"), log=logged.append)
    assert [r["step"] for r in _rows(run) if "diverged" in r] == [6]
    assert sum("the run has diverged" in line for line in logged) == 1
