"""The real default run: `lorakit finetune` with no arguments on the embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_finetune_moves_accuracy_by_50_points(tmp_path):
    run = subprocess.run([sys.executable, "-m", "lorakit", "finetune", "--out", str(tmp_path / "run")],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"accuracy: ([\d.]+)% -> ([\d.]+)% \(task date, (\d+) eval examples\)", last)
    assert match, last
    before, after, n = float(match[1]), float(match[2]), int(match[3])
    assert n >= 200 and after - before >= 50, last
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "loss.png",
                 "report.md", "predictions.jsonl", "checkpoints/step-000060/trainer_state.pt"):
        assert (tmp_path / "run" / name).is_file(), name
    report = (tmp_path / "run/report.md").read_text()
    assert f"| accuracy after | {after:.1f}% |" in report and "peak memory" in report
