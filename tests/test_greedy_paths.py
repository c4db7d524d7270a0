"""One answer whatever the path: on the embedded SmolLM2 with a trained adapter, `lorakit finetune`'s evaluation,
`lorakit eval`, `lorakit generate`, `lorakit serve` and the library's `generate` give the same greedy tokens for
the same prompt, batched or alone.

Every path decodes through the server's engine, unmerged; what a batch can still change, the summation order of
its matmuls, is kept from flipping a greedy choice by deciding near-ties alone (`engine._near_ties`)."""

from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.serve import engine

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 16


def test_near_ties_are_relative_to_the_best_logit():
    logits = torch.tensor([[10.0, 9.995, 0.0], [10.0, 9.0, 0.0], [0.5, 0.4999, 0.0], [-3.0, -3.0, -9.0]])
    assert engine._near_ties(logits) == [True, False, True, True]


def test_a_near_tie_is_decided_by_the_request_alone(monkeypatch, tmp_path):
    """Whatever the batch's logits say between two close candidates, the token is the one-request forward's."""
    import lorakit as lk
    from lorakit.train import models
    from lorakit.train.trainer import generate
    from test_train import save_tiny_model

    model, tokenizer = models.load(str(save_tiny_model(tmp_path / "tiny")), log=lambda m: None)
    lk.adapt(model, lk.LoRA(rank=2), targets="all-linear")
    prompts = ["hello", "the date is", "x y z"]
    expected = generate(model, tokenizer, prompts, 6, 4)
    choose = engine.Engine._choose

    def swapped(self, logits, rows):  # the batch's best two swapped, and made a near-tie
        top = logits.topk(2, dim=-1)
        logits = logits.clone()
        logits.scatter_(1, top.indices, torch.stack([top.values[:, 0] - 1e-6, top.values[:, 0]], 1))
        return choose(self, logits, rows)

    monkeypatch.setattr(engine.Engine, "_choose", swapped)
    assert generate(model, tokenizer, prompts, 6, 4) == expected


def _lorakit(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "lorakit", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=2400)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_every_path_gives_the_same_greedy_answers_on_the_embedded_model(tmp_path):
    import httpx
    import openai

    import lorakit as lk
    from lorakit.serve.app import Server, running
    from lorakit.train import data, models, tasks
    from lorakit.train.trainer import generate

    run = tmp_path / "run"
    _lorakit("finetune", "--task", "extract", "--steps", "16", "--val-every", "0", "--skip-eval-before",
             "--eval-examples", "48", "--out", str(run))
    adapter = run / "adapter"
    model, tokenizer = models.load(None, log=lambda m: None)
    lk.load(model, adapter)
    model.eval()

    # 200 prompts of mixed lengths, both tasks: the adapter learned one and is unsure on the other.
    examples = [e for task in ("date", "extract") for e in tasks.split(task, 0, 100, seed=7)[1]]
    prompts = [e.messages()[:-1] for e in examples]
    lengths = [len(data.prompt_ids(p, tokenizer)) for p in prompts]
    assert len(prompts) == 200 and max(lengths) - min(lengths) >= 20
    batched = generate(model, tokenizer, prompts, MAX_TOKENS, 64)
    alone = [generate(model, tokenizer, [p], MAX_TOKENS, 1)[0] for p in prompts]
    assert batched == alone, [i for i, (a, b) in enumerate(zip(batched, alone)) if a != b]

    # finetune's own evaluation scored its held-out prompts with the same answers
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    asked = [[{"role": "user", "content": row["prompt"]}] for row in predictions]
    assert [row["answer"] for row in predictions] == generate(model, tokenizer, asked, 64, 1 + len(asked) // 3)

    # lorakit eval on a file of the 200 records: the score of these answers
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"messages": e.messages()}) + "\n" for e in examples))
    score = 100 * sum(tasks.exact_match(a, e.completion) for a, e in zip(alone, examples)) / len(examples)
    said = _lorakit("eval", "--adapter", str(adapter), "--data", str(records), "--max-new-tokens", str(MAX_TOKENS))
    assert re.search(rf"accuracy: {score:.1f}% ", said), (score, said)

    # lorakit serve: all 200 at once, so that they share prefills and decode steps
    with running(Server(model, tokenizer, "base", {"extract": adapter}, max_batch=64)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                               http_client=httpx.Client(timeout=600))

        def ask(prompt):
            reply = client.chat.completions.create(model="extract", messages=prompt, temperature=0,
                                                   max_tokens=MAX_TOKENS)
            return reply.choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(200) as pool:
            served = list(pool.map(ask, prompts))
    assert served == alone, [i for i, (a, b) in enumerate(zip(served, alone)) if a != b]

    # lorakit generate, a process of its own
    for prompt, answer in list(zip(prompts, alone))[::67]:
        out = _lorakit("generate", "--adapter", str(adapter), "--prompt", prompt[-1]["content"],
                       "--max-new-tokens", str(MAX_TOKENS))
        assert out == answer + "\n"
