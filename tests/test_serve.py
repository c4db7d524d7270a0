"""`lorakit serve`: the OpenAI client against uvicorn on 127.0.0.1, on a tiny model with several adapters.

The batching contract is tested as stated: a request's greedy answer is the same alone, in a mixed batch
with other adapters (held back until all are queued, so they share every step), and from `lorakit generate`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import lorakit as lk
from lorakit import cli
from lorakit.serve.app import Server, discover, running
from lorakit.train import data, models
from test_train import save_tiny_model

KEY = "sk-test-key"
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["the date is", "hello", "a much longer prompt than any of the others here", "x", "tomorrow?"]


def make_adapter(tiny_dir: Path, out: Path, recipe, seed: int, prompt_format: str | None = None,
                 train: list[str] | None = None) -> Path:
    """An adapter with random (non-zero) tensors, so that every adapter changes the answers differently."""
    model, _ = models.load(str(tiny_dir), log=lambda m: None)
    lk.adapt(model, recipe, targets="all-linear", train=train)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    lk.save(model, out)
    if prompt_format:
        data.write_prompt_format(out, prompt_format)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("serve-model"))


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory) -> dict[str, Path]:
    """Served adapters: two LoRAs, a DoRA and an SVF (no low-rank factors: routed adapter by adapter), one
    trained on raw prompts, one with its own copy of the final norm (train=: prefilled a row per prompt, not
    packed), and PEFT's own files."""
    root = tmp_path_factory.mktemp("adapters")
    made = {"lora-a": make_adapter(tiny, root / "lora-a", lk.LoRA(rank=4, alpha=8), 1),
            "lora-b": make_adapter(tiny, root / "lora-b", lk.LoRA(rank=2, alpha=2), 2),
            "dora": make_adapter(tiny, root / "dora", lk.DoRA(rank=4, alpha=8), 3),
            "svf": make_adapter(tiny, root / "svf", lk.SVF(), 4),
            "raw": make_adapter(tiny, root / "raw", lk.LoRA(rank=4, alpha=8), 5, prompt_format="raw"),
            "norm": make_adapter(tiny, root / "norm", lk.LoRA(rank=2, alpha=4), 7, train=["model.norm"])}
    made["peft"] = peft_adapter(tiny, root / "peft")
    return made


def peft_adapter(tiny: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(6)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(out)
    return out


def new_server(tiny, adapters, **settings) -> Server:
    model, tokenizer = models.load(str(tiny), log=lambda m: None)
    return Server(model, tokenizer, "tiny", adapters, **{"api_key": KEY, **settings})


@pytest.fixture(scope="module")
def served(tiny, adapters):
    server = new_server(tiny, adapters, adapters_dir=next(iter(adapters.values())).parent,
                        allow_runtime_adapters=True, max_batch=8)
    with running(server) as url:
        yield server, url


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@contextlib.contextmanager
def held(server: Server, queued: int):
    """The engine stops between two steps until ``queued`` requests wait; they are then admitted together."""
    release = threading.Event()
    server.engine.call(lambda: release.wait(60))
    try:
        yield
        deadline = time.monotonic() + 30
        while len(server.engine.waiting) < queued:
            assert time.monotonic() < deadline, f"only {len(server.engine.waiting)} of {queued} requests arrived"
            time.sleep(0.005)
    finally:
        release.set()


def chat(client, model: str, prompt: str, **extra) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=12, temperature=0, **extra)
    return reply.choices[0].message.content


def together(fn, jobs: list[tuple]) -> list:
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: fn(*job), jobs))


def test_models_lists_the_base_and_every_adapter_with_the_base_as_parent(client, adapters):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", *adapters}
    assert cards["tiny"].parent is None and all(cards[n].parent == "tiny" for n in adapters)
    assert cards["lora-a"].root == str(adapters["lora-a"])


def test_a_mixed_batch_answers_as_each_request_alone_and_as_lorakit_generate(served, client, adapters, tiny,
                                                                           capsys):
    server, _ = served
    jobs = [(client, model, prompt) for model in ["tiny", "lora-a", "lora-b", "dora", "svf", "norm", "peft"]
            for prompt in PROMPTS[:3]]
    alone = [chat(*job) for job in jobs]
    steps = server.engine.steps
    with held(server, len(jobs)):
        mixed_ = concurrent.futures.ThreadPoolExecutor(len(jobs)).map(lambda job: chat(*job), jobs)
    mixed = list(mixed_)
    assert mixed == alone
    # they shared steps: 21 answers of 12 tokens in 3 batches of at most 8 (--max-batch), not 21 x 11 steps
    assert server.engine.steps - steps <= 3 * 11
    for i in range(3):
        assert len(set(alone[i::3])) == 7, f"every adapter answers {PROMPTS[i]!r} its own way"
    for (_, model, prompt), answer in zip(jobs[::3], alone[::3]):
        adapter = ["--adapter", str(adapters[model])] if model != "tiny" else []
        assert cli.main(["generate", "--model", str(tiny), "--prompt", prompt, "--max-new-tokens", "12",
                         "--device", "cpu", *adapter]) == 0
        assert capsys.readouterr().out == answer + "\n", model


def test_joining_and_leaving_in_any_order_changes_no_answer(served, client):
    """More requests than rows, of every length: rows join, leave and move while the others decode."""
    server, _ = served
    jobs = [(i, PROMPTS[i % 5] * (1 + i % 3), ["lora-a", "tiny", "svf", "lora-b"][i % 4], 3 + (i * 7) % 17)
            for i in range(20)]

    def complete(i, prompt, model, max_tokens):
        return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0]

    alone = [complete(*job) for job in jobs]
    mixed = together(complete, jobs)
    assert [c.text for c in mixed] == [c.text for c in alone]
    assert [c.finish_reason for c in mixed] == [c.finish_reason for c in alone]


def test_prefill_batches_group_similar_lengths_within_a_token_budget():
    from lorakit.serve.engine import Generation, Sampling, _prefill_groups

    generations = [Generation([0] * n, None, Sampling(1), print) for n in (40, 3, 30, 4, 100, 5, 33)]
    groups = [[len(g.prompt_ids) for g in group] for group in _prefill_groups(generations, budget=120)]
    # 30 after 5 would be mostly padding; 100 after 40 would pass the budget (4 x 100 > 120)
    assert groups == [[3, 4, 5], [30, 33, 40], [100]]
    assert [len(g) for g in _prefill_groups(generations, budget=80)] == [3, 2, 1, 1]
    assert sorted(n for group in groups for n in group) == [3, 4, 5, 30, 33, 40, 100]
    for group in groups:
        assert len(group) == 1 or (max(group) * len(group) <= 120 and sum(group) >= max(group) * len(group) * 2 / 3)


def test_prefill_packs_prompts_end_to_end_into_rows_and_rows_into_forwards():
    from lorakit.serve.engine import Generation, Sampling, _pack

    generations = [Generation([0] * n, None, Sampling(1), print) for n in (40, 3, 30, 4, 100, 5, 33, 70)]
    forwards = [[[len(g.prompt_ids) for g in row] for row in rows] for rows in _pack(generations, budget=240,
                                                                                    width=110)]
    # first fit by decreasing length into rows of 110 tokens; rows into forwards of at most 240 positions
    assert forwards == [[[100, 5, 4], [70, 40]], [[33, 30, 3]]]
    long = Generation([0] * 300, None, Sampling(1), print)  # longer than a row: a row (and forward) of its own
    assert [[[len(g.prompt_ids) for g in row] for row in rows] for rows in _pack([long, *generations[:2]], 240, 110)
            ] == [[[300]], [[40, 3]]]


def test_an_attention_that_takes_no_4d_mask_is_refused_by_name(tiny, adapters):
    from lorakit.serve.engine import Adapters, Engine

    model, tokenizer = models.load(str(tiny), log=lambda m: None)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(lk.ConfigError, match="'flex_attention' does not take: load the model with "
                                             "attn_implementation='sdpa'"):
        Engine(model, tokenizer, Adapters(model, 1))


def test_streamed_answers_equal_whole_ones(client):
    for model in ("lora-a", "dora"):
        whole = chat(client, model, "hello")
        chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}],
                                                     max_tokens=12, temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
        assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 12
    text = client.completions.create(model="lora-b", prompt="hello", max_tokens=9, temperature=0).choices[0].text
    streamed = client.completions.create(model="lora-b", prompt="hello", max_tokens=9, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text


def test_a_seed_makes_sampling_repeatable_alone_and_in_a_batch(client):
    def sample(seed, model="lora-a"):
        return client.completions.create(model=model, prompt="hello", max_tokens=16, temperature=1.0, top_p=0.9,
                                         seed=seed).choices[0].text

    first = sample(7)
    assert together(sample, [(7,), (7,), (8,), (7, "tiny")])[:2] == [first, first]
    assert sample(8) != first


def test_n_choices_and_a_list_of_prompts(client):
    reply = client.completions.create(model="lora-a", prompt=["hello", "the date is"], max_tokens=5, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[1].text == client.completions.create(model="lora-a", prompt="the date is", max_tokens=5,
                                                              temperature=0).choices[0].text
    sampled = client.completions.create(model="lora-a", prompt="hello", max_tokens=8, n=3, seed=1, temperature=1)
    assert len(sampled.choices) == 3 and len({c.text for c in sampled.choices}) > 1
    assert sampled.usage.prompt_tokens == len("hello")


def test_a_stop_sequence_ends_the_answer_before_it(client):
    full = client.completions.create(model="lora-a", prompt="hello", max_tokens=20, temperature=0).choices[0].text
    stop = full[5:7]
    cut = client.completions.create(model="lora-a", prompt="hello", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="lora-a", prompt="hello", max_tokens=20, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_chat_follows_the_adapters_prompt_format(client, served):
    server, _ = served
    tokenizer = server.tokenizer
    # trained on raw prompts: one user message is its raw text, as `lorakit generate` asks it
    raw = chat(client, "raw", "the date is")
    assert raw == client.completions.create(model="raw", prompt="the date is", max_tokens=12,
                                            temperature=0).choices[0].text
    with pytest.raises(openai.BadRequestError, match="raw prompts"):
        client.chat.completions.create(model="raw", max_tokens=4, messages=[
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])
    # a chat adapter gets the chat template
    templated = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                              tokenize=False)
    assert chat(client, "lora-a", "hi") == client.completions.create(
        model="lora-a", prompt=templated, max_tokens=12, temperature=0).choices[0].text


BAD = [
    (b"{not json", 400, None),
    (b'["a list"]', 400, None),
    (b'{"prompt": "x"}', 400, "model"),
    (b'{"model": "tiny"}', 400, "prompt"),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 1000000}', 400, "max_tokens"),
    (b'{"model": "tiny", "prompt": "x", "temperature": 3}', 400, "temperature"),
    (b'{"model": "tiny", "prompt": "x", "logit_bias": {"5": 10}}', 400, "logit_bias"),
    (b'{"model": "tiny", "prompt": "x", "frequency_penalty": 0.5}', 400, "frequency_penalty"),
    (b'{"model": "tiny", "prompt": "x", "best_of": 2}', 400, "best_of"),
    (b'{"model": "tiny", "prompt": ""}', 400, "prompt"),
    (b'{"model": "tiny", "prompt": [100000]}', 400, "prompt"),
    (b'{"model": "tiny", "prompt": "x", "stop": ["", "a"]}', 400, "stop"),
    (b'{"model": "nope", "prompt": "x"}', 404, "model"),
]


@pytest.mark.parametrize("body, status, param", BAD)
def test_bad_completion_requests_get_a_4xx_in_openais_shape(served, body, status, param):
    reply = httpx.post(served[1] + "/v1/completions", content=body, headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"model": "tiny", "messages": [{"role": "user"}]}, "messages.0.content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
])
def test_bad_chat_requests_get_a_400(served, body, param):
    reply = httpx.post(served[1] + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"].startswith(param)


def test_settings_we_do_not_implement_are_accepted_at_the_value_that_changes_nothing(client):
    """As clients such as LangChain send them."""
    neutral = dict(frequency_penalty=0, presence_penalty=0.0, logit_bias={}, logprobs=False, n=1, stream=False)
    assert chat(client, "lora-a", "hello", **neutral) == chat(client, "lora-a", "hello")


def test_the_server_answers_after_every_bad_request(client):
    assert chat(client, "lora-a", "hello")


def test_every_endpoint_but_health_and_the_page_needs_the_key(served):
    url = served[1]
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("GET", "/metrics"), ("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/lora-a")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            reply = httpx.request(method, url + path, headers=headers, json={})
            assert reply.status_code == 401, (method, path, headers)
            assert reply.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/health").json()["status"] == "ok"
    assert httpx.get(url + "/").status_code == 200
    assert httpx.get(url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_a_full_queue_answers_429_and_then_recovers(tiny, adapters):
    server = new_server(tiny, {"lora-a": adapters["lora-a"]}, max_queue=2)
    with running(server) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        with held(server, 2):
            pool = concurrent.futures.ThreadPoolExecutor(2)
            waiting = [pool.submit(chat, client, "lora-a", p) for p in PROMPTS[:2]]
            while len(server.engine.waiting) < 2:
                time.sleep(0.005)
            with pytest.raises(openai.RateLimitError, match="max-queue 2"):
                chat(client, "lora-a", "one too many")
        assert all(f.result() for f in waiting)
        assert chat(client, "lora-a", "one too many")


def test_a_client_leaving_mid_stream_frees_its_row_at_once(served, client):
    server, url = served
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"model": "lora-a", "prompt": "hello", "max_tokens": 400, "temperature": 0, "stream": True})
    connection.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}",
                                                           "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.read(6) == b"data: "
    assert len(server.engine.running) == 1
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    deadline = time.monotonic() + 5
    while server.engine.running or server.engine.waiting:
        assert time.monotonic() < deadline, "the abandoned request still holds its row"
        time.sleep(0.01)
    assert chat(client, "lora-a", "hello")


def test_adapters_load_and_unload_at_run_time_from_under_the_adapters_dir_only(served, client, adapters, tmp_path):
    server, url = served
    auth = {"Authorization": f"Bearer {KEY}"}
    expected = chat(client, "lora-b", "hello")
    reply = httpx.post(url + "/v1/adapters", json={"name": "org/b-again", "path": "lora-b"}, headers=auth)
    assert reply.status_code == 200, reply.text
    assert reply.json()["parent"] == "tiny" and "org/b-again" in {m.id for m in client.models.list().data}
    assert chat(client, "org/b-again", "hello") == expected
    for body, status in [({"name": "org/b-again", "path": "lora-b"}, 409),
                         ({"name": "tiny", "path": "lora-b"}, 400),
                         ({"name": "x", "path": "../"}, 403),
                         ({"name": "x", "path": str(tmp_path)}, 403),
                         ({"name": "x", "path": "missing"}, 400),
                         ({"name": "x", "path": "lora-a", "extra": 1}, 400)]:
        answer = httpx.post(url + "/v1/adapters", json=body, headers=auth)
        assert answer.status_code == status, (body, answer.text)
    pickled = adapters["lora-a"].parent / "pickled"
    pickled.mkdir(exist_ok=True)
    (pickled / "adapter_config.json").write_text((adapters["lora-a"] / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not looked at")
    answer = httpx.post(url + "/v1/adapters", json={"name": "x", "path": "pickled"}, headers=auth)
    assert answer.status_code == 400 and "safetensors" in answer.json()["error"]["message"]
    assert httpx.delete(url + "/v1/adapters/org/b-again", headers=auth).json()["deleted"] is True
    assert "org/b-again" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        chat(client, "org/b-again", "hello")
    assert httpx.delete(url + "/v1/adapters/org/b-again", headers=auth).status_code == 404
    assert chat(client, "lora-b", "hello") == expected


def test_vllms_load_and_unload_endpoints_work_too(served, client, adapters):
    url, auth = served[1], {"Authorization": f"Bearer {KEY}"}
    expected = {n: chat(client, n, "hello") for n in ("lora-a", "lora-b")}
    body = {"lora_name": "v", "lora_path": str(adapters["lora-a"])}
    assert httpx.post(url + "/v1/load_lora_adapter", json=body, headers=auth).status_code == 200
    assert chat(client, "v", "hello") == expected["lora-a"]
    assert httpx.post(url + "/v1/load_lora_adapter", json=body, headers=auth).status_code == 409
    replace = {"lora_name": "v", "lora_path": str(adapters["lora-b"]), "load_inplace": True}
    assert httpx.post(url + "/v1/load_lora_adapter", json=replace, headers=auth).status_code == 200
    assert chat(client, "v", "hello") == expected["lora-b"]
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "v"}, headers=auth).status_code == 200
    assert "v" not in {m.id for m in client.models.list().data}


def test_runtime_loading_is_off_unless_asked(tiny, adapters):
    server = new_server(tiny, {}, adapters_dir=adapters["lora-a"].parent)
    with running(server) as url:
        reply = httpx.post(url + "/v1/adapters", json={"name": "a", "path": "lora-a"},
                           headers={"Authorization": f"Bearer {KEY}"})
        assert reply.status_code == 403 and "--allow-runtime-adapters" in reply.json()["error"]["message"]


def test_past_max_loaded_adapters_the_least_recently_used_is_unloaded_and_reloaded(tiny, adapters, client):
    names = ["lora-a", "lora-b", "dora"]
    expected = {n: chat(client, n, "hello") for n in names}
    server = new_server(tiny, {n: adapters[n] for n in names}, max_loaded_adapters=1)
    with running(server) as url:
        small = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        loads = server.store.loads
        assert [chat(small, n, "hello") for n in names + names[:1]] == [expected[n] for n in names + names[:1]]
        assert server.store.loads - loads == 4 and len(server.store.resident) == 1
        assert len(lk.adapter_names(server.engine.model)) == 1
        # three adapters at once with room for one: they take turns, and each answer is unchanged
        assert together(chat, [(small, n, "hello") for n in names]) == [expected[n] for n in names]


def test_metrics_count_requests_tokens_and_latencies(served, client):
    reply = client.completions.create(model="lora-a", prompt="hello", max_tokens=7, temperature=0)
    text = httpx.get(served[1] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("lorakit_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] >= 1
    assert samples[("lorakit_generation_tokens_total", ())] >= reply.usage.completion_tokens
    assert samples[("lorakit_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("lorakit_time_per_output_token_seconds_count", ())] >= reply.usage.completion_tokens - 1
    for name in ("lorakit_num_requests_waiting", "lorakit_num_requests_running", "lorakit_running_adapters",
                 "lorakit_waiting_adapters", "lorakit_errors"):
        assert name in families


def test_discover_finds_finetune_runs_and_plain_adapter_dirs(tmp_path, adapters):
    run = tmp_path / "date-run" / "adapter"
    run.mkdir(parents=True)
    (run / "adapter_config.json").write_text("{}")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "adapter_config.json").write_text("{}")
    (tmp_path / "not-an-adapter").mkdir()
    assert discover(tmp_path) == {"date-run": run, "plain": plain}
    assert discover(tmp_path / "missing") == {}


def test_an_adapter_for_another_model_is_refused_by_name(tiny, tmp_path):
    other = tmp_path / "other-model"
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    small = LlamaForCausalLM(LlamaConfig(vocab_size=len(models.load(str(tiny), log=lambda m: None)[1]),
                                         hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    lk.adapt(small, lk.LoRA(rank=2), targets="all-linear")
    lk.save(small, other)
    with pytest.raises(lk.ShapeMismatchError):
        new_server(tiny, {"other": other})


def test_lorakit_serve_starts_from_the_command_line_with_the_runs_it_finds(tiny, adapters, tmp_path):
    runs = tmp_path / "runs"
    (runs / "date").mkdir(parents=True)
    (runs / "date" / "adapter").symlink_to(adapters["lora-a"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LORAKIT_API_KEY": KEY}
    process = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(tiny), "--port", str(port),
                                "--adapters-dir", str(runs), "--device", "cpu", "--served-model-name", "tiny-base"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = process.stdout.readline() + process.stdout.readline()
        assert f"http://localhost:{port}" in banner and "adapters: date" in banner, banner
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-base", "date"]
        assert chat(client, "date", "hello")
    finally:
        process.terminate()
        process.wait(30)


def test_bad_serve_flags_are_errors(capsys, tiny):
    assert cli.main(["serve", "--model", str(tiny), "--adapter", "no-equals-sign"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    assert cli.main(["serve", "--model", str(tiny), "--max-batch", "0", "--adapters-dir", str(tiny)]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err
