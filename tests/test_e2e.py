"""The real default run: `lorakit finetune` with no arguments on the embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
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

    # Looking inside the trained adapter: every command on the real model, each within a minute or so.
    def lorakit(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "lorakit", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    adapter = str(tmp_path / "run/adapter")
    lorakit("spectrum", "--out", str(tmp_path / "spectrum"))
    rows = json.loads((tmp_path / "spectrum/spectrum.json").read_text())
    assert len(rows) == 210 and all(r["energy_rank_99"] <= min(r["shape"]) for r in rows)
    lorakit("inspect", adapter, "--out", str(tmp_path / "inspect"))
    learned = json.loads((tmp_path / "inspect/inspect.json").read_text())
    assert len(learned) == 210 and all(0 < r["utilisation"] <= 1 and r["rank"] == 16 for r in learned)
    said = lorakit("resize", adapter, "--rank", "4", "--out", str(tmp_path / "r4"))
    assert "4,884,480 -> 1,221,120 parameters" in said
    scored = lorakit("eval", "--adapter", str(tmp_path / "r4")).strip().splitlines()[-1]
    kept = float(re.fullmatch(r"accuracy: ([\d.]+)% .*", scored)[1])
    assert kept >= after - 5, (kept, after)  # a quarter of the rank keeps the skill


@pytest.mark.slow
def test_serving_two_trained_adapters_on_the_embedded_model(tmp_path):
    """`lorakit finetune` twice (date, extract), then `lorakit serve` finds both runs: concurrent requests to
    the base and both adapters answer as each alone and as `lorakit generate`, and each adapter does its task."""
    import concurrent.futures
    import os
    import socket
    import time

    import httpx
    import openai

    from lorakit.train import tasks

    runs = tmp_path / "runs"
    for task in ("date", "extract"):
        train = subprocess.run([sys.executable, "-m", "lorakit", "finetune", "--task", task, "--skip-eval-before",
                                "--eval-examples", "8", "--out", str(runs / task)],
                               cwd=ROOT, capture_output=True, text=True, timeout=1200)
        assert train.returncode == 0, train.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--adapters-dir", str(runs), "--port",
                               str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "LORAKIT_API_KEY": "k"})
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, server.stderr.read()[-3000:]
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct", "date", "extract"]
        held_out = {task: tasks.split(task, 0, 3, seed=0)[1] for task in ("date", "extract")}
        jobs = [(model, example) for task, examples in held_out.items() for example in examples
                for model in (task, "smollm2-135m-instruct")]

        def ask(model, example):
            reply = client.chat.completions.create(model=model, temperature=0, max_tokens=32,
                                                   messages=[{"role": "user", "content": example.prompt}])
            return reply.choices[0].message.content

        alone = [ask(*job) for job in jobs]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            mixed = list(pool.map(lambda job: ask(*job), jobs))
        assert mixed == alone
        right = {job: tasks.exact_match(answer, job[1].completion) for job, answer in zip(jobs, alone)}
        for task, examples in held_out.items():
            trained = sum(right[(task, e)] for e in examples)
            base = sum(right[("smollm2-135m-instruct", e)] for e in examples)
            assert trained >= 2 and trained > base, (task, [a for a in alone])
        for (model, example), answer in list(zip(jobs, alone))[:4]:
            adapter = [] if model == "smollm2-135m-instruct" else ["--adapter", str(runs / model / "adapter")]
            generated = subprocess.run([sys.executable, "-m", "lorakit", "generate", "--prompt", example.prompt,
                                        *adapter], cwd=ROOT, capture_output=True, text=True, timeout=600)
            assert generated.stdout == answer + "\n", (model, generated.stderr[-2000:])
    finally:
        server.terminate()
        server.wait(60)
