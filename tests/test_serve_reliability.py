"""`lorakit serve` under abuse and decay (issue 22): oversized requests, adapter files changed or broken after
start-up, bad adapters at start-up, hostile run-time loads, requests larger than the whole queue.

Each test states a behaviour a client or operator relies on; every answer to a bad request is a 4xx in OpenAI's
shape that names no path of the server's.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

import lorakit as lk
from lorakit.serve.app import running
from lorakit.train import data
from test_serve import KEY, ROOT, chat, make_adapter, new_server
from test_train import save_tiny_model

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("reliability-model"))


@pytest.fixture(scope="module")
def made(tiny, tmp_path_factory) -> dict[str, Path]:
    """Three LoRA adapters that answer differently (kept pristine: tests copy them before changing files)."""
    root = tmp_path_factory.mktemp("made")
    return {name: make_adapter(tiny, root / name, lk.LoRA(rank=2, alpha=4), seed) for name, seed in
            (("a", 11), ("b", 12), ("c", 13))}


@pytest.fixture
def adapters_dir(made, tmp_path) -> Path:
    """A fresh --adapters-dir holding copies of the made adapters."""
    root = tmp_path / "adapters"
    for name, path in made.items():
        shutil.copytree(path, root / name)
    return root


def error_of(reply: httpx.Response, status: int) -> dict:
    """The OpenAI-shaped error of ``reply``, checked to have ``status``."""
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def completion(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": "tiny", "max_tokens": 2, **body}, headers=AUTH,
                      timeout=60)


def raw_response(url: str, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send ``head`` (and ``body``) on a socket of its own; the status and body the server answers with."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def _length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def posting(size: int) -> bytes:
    """The head of a POST /v1/completions announcing a body of ``size`` bytes."""
    return (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n").encode()


# --- 1. one large prompt must not stall everyone or keep the memory ----------------------------------------------
def test_a_body_past_max_body_bytes_is_refused_413_before_it_is_read(tiny):
    server = new_server(tiny, {}, max_body_bytes=1000)
    with running(server) as url:
        # 50 MB announced, not one byte of it sent: the answer comes at once (the server waits for none of it)
        status, body = raw_response(url, posting(50_000_000))
        assert status == 413
        error = json.loads(body)["error"]
        assert error["code"] == "request_too_large" and "--max-body-bytes" in error["message"]
        # no Content-Length (a chunked upload): refused once what arrived passes the limit
        chunks = (b" " * 400 for _ in range(10))
        assert error_of(httpx.post(url + "/v1/completions", content=chunks, headers=AUTH), 413)
        # a body of exactly the limit is taken
        request = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 2}).encode()
        status, body = raw_response(url, posting(1000), request.ljust(1000))
        assert status == 200 and json.loads(body)["choices"], body
        with pytest.raises(lk.ConfigError, match="--max-body-bytes must be >= 1"):
            new_server(tiny, {}, max_body_bytes=0)


def test_a_prompt_longer_than_the_context_can_hold_is_refused_untokenised(tiny, monkeypatch):
    server = new_server(tiny, {})
    tokenised: list[int] = []
    real = data.prompt_ids

    def counted(prompt, tokenizer):
        tokenised.append(len(prompt))
        return real(prompt, tokenizer)

    monkeypatch.setattr(data, "prompt_ids", counted)
    tokenizer = server.tokenizer
    longest = max((t for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) if t), key=len)
    fullest = longest * server.engine.context  # the most characters a prompt that fits the context can have
    assert len(real(fullest, tokenizer)) <= server.engine.context
    with running(server) as url:
        error = error_of(completion(url, prompt=fullest + "x"), 400)
        assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
        error = error_of(httpx.post(url + "/v1/chat/completions", headers=AUTH, json={
            "model": "tiny", "messages": [{"role": "system", "content": fullest}, {"role": "user", "content": "x"}]}),
            400)
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
        assert tokenised == []
        # a prompt that may fit is tokenised (then refused here: it leaves no room to generate)
        assert error_of(completion(url, prompt=fullest), 400)["code"] == "context_length_exceeded"
        assert tokenised == [len(fullest)]


def test_tokenising_runs_off_the_event_loop(tiny, monkeypatch):
    """While a prompt is being tokenised, /health and other requests are answered."""
    entered, release = threading.Event(), threading.Event()
    real = data.prompt_ids

    def slow(prompt, tokenizer):
        if prompt == "slow":
            entered.set()
            release.wait(30)
        return real(prompt, tokenizer)

    monkeypatch.setattr(data, "prompt_ids", slow)
    server = new_server(tiny, {})
    with running(server) as url, concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(completion, url, prompt="slow")
        try:
            assert entered.wait(30)
            assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
            assert httpx.get(url + "/v1/models", headers=AUTH, timeout=10).status_code == 200
        finally:
            release.set()
        assert pending.result().status_code == 200


def test_memory_returns_to_its_level_after_large_requests(tiny):
    """Bodies just under the default limit with prompts far past the context, and 50 MB ones: RSS stays put."""
    server = new_server(tiny, {})
    process = psutil.Process()
    request = json.dumps({"model": "tiny", "prompt": "a" * (server.max_body_bytes - 100)}).encode()
    with running(server) as url:
        for _ in range(2):  # first use of every path on the way (allocator arenas, buffers): not what is measured
            assert raw_response(url, posting(len(request)), request)[0] == 400
        gc.collect()
        before = process.memory_info().rss
        for _ in range(5):
            status, body = raw_response(url, posting(len(request)), request)
            assert status == 400 and json.loads(body)["error"]["code"] == "context_length_exceeded"
            assert raw_response(url, posting(50_000_000))[0] == 413
        gc.collect()
        grown = process.memory_info().rss - before
    # 5 x 4 MiB of prompt went in; tokenising one of them would take hundreds of MB (and keep them)
    assert grown < 48 * 2 ** 20, f"RSS grew by {grown / 2 ** 20:.0f} MiB"


# --- 2. a name stands for the tensors first loaded ----------------------------------------------------------------
def test_an_evicted_adapter_comes_back_with_its_first_tensors_whatever_happened_to_its_files(tiny, adapters_dir):
    names = {n: adapters_dir / n for n in ("a", "b", "c")}
    server = new_server(tiny, names, max_loaded_adapters=1)
    with running(server) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        first = {n: chat(client, n, "hello") for n in names}
        assert first["a"] != first["c"]
        # a's files become c's: the name "a" goes on answering as the a first loaded
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(names["c"] / file, names["a"] / file)
        loads = server.store.loads
        assert chat(client, "a", "hello") == first["a"]
        # then corrupt: still listed, still answering, never a 500
        (names["a"] / "adapter_model.safetensors").write_bytes(b"\0" * 64)
        assert chat(client, "b", "hello") == first["b"]
        assert chat(client, "a", "hello") == first["a"]
        assert server.store.loads - loads == 3, "a was evicted and attached again each time"
        assert "a" in {m.id for m in client.models.list().data}


# --- 3. a bad adapter at start-up is skipped, the rest served ----------------------------------------------------
def bad_adapters(made: Path, root: Path) -> dict[str, tuple[str, str]]:
    """Broken copies of the adapter ``made`` under ``root``: by name, the place and the reason a refusal must say."""
    config = json.loads((made / "adapter_config.json").read_text())
    weights = (made / "adapter_model.safetensors").read_bytes()
    broken = {"nested": ("adapter_config.json", "[" * 200_000, "recursion depth"),
              "wrong-type": ("adapter_config.json", json.dumps({**config, "layers_to_transform": "x"}), ""),
              "truncated": ("adapter_model.safetensors", weights[:len(weights) // 2], "truncated or corrupt"),
              "bad-format": ("lorakit_prompt.json", '{"prompt_format": "morse"}', "prompt_format")}
    expected = {}
    for name, (file, content, reason) in broken.items():
        shutil.copytree(made, root / name)
        (root / name / file).write_bytes(content if isinstance(content, bytes) else content.encode())
        # where the reader trips over a file's contents it may not know which file: the directory is named then
        expected[name] = (str(root / name) if not reason or name == "nested" else str(root / name / file), reason)
    return expected


def test_bad_adapters_are_refused_by_name(tiny, made, tmp_path):
    server = new_server(tiny, {})
    for name, (where, reason) in bad_adapters(made["a"], tmp_path).items():
        with pytest.raises(lk.LorakitError) as refused:
            server.add(name, tmp_path / name)
        assert where in str(refused.value) and reason in str(refused.value), str(refused.value)
    assert server.served() == [] and server.formats == {}
    with pytest.raises(lk.ConfigError, match="not an adapter name"):
        server.add("../escape", made["a"])


def test_lorakit_serve_skips_a_bad_adapter_with_a_warning_and_serves_the_rest(tiny, made, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(made["a"], runs / "good")
    expected = bad_adapters(made["a"], runs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(tiny), "--port", str(port),
                                "--adapters-dir", str(runs), "--device", "cpu", "--served-model-name", "tiny"],
                               cwd=ROOT, env={**os.environ, "LORAKIT_API_KEY": KEY}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120  # a bound for a busy machine, not a measure
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            assert time.monotonic() < deadline and process.poll() is None, process.communicate()
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny", "good"]
        assert chat(client, "good", "hello")
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert "Traceback" not in err, err
    for name, (where, reason) in expected.items():
        skipped = f"lorakit serve: skipping {runs / name}: "
        warning = next(line for line in err.splitlines() if line.startswith(skipped))[len(skipped):]
        assert where in warning and reason in warning, warning


# --- 4. run-time loads: every bad request a 4xx naming no server path -------------------------------------------
def test_bad_runtime_loads_are_4xx_without_server_paths(tiny, made, adapters_dir, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(made["c"], outside)
    linked = adapters_dir / "linked"
    linked.mkdir()
    shutil.copy(made["a"] / "adapter_config.json", linked)
    (linked / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    half_linked = adapters_dir / "half-linked"
    shutil.copytree(made["a"], half_linked)
    (half_linked / "adapter_config.json").unlink()
    (half_linked / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    (adapters_dir / "corrupt").mkdir()
    shutil.copy(made["a"] / "adapter_config.json", adapters_dir / "corrupt")
    (adapters_dir / "corrupt" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    server = new_server(tiny, {}, adapters_dir=adapters_dir, allow_runtime_adapters=True)
    with running(server) as url:
        for path, status, words in [("a\0b", 400, "embedded null byte"),
                                    ("a/" * 2500, 400, "File name too long"),
                                    ("x" * 300, 400, "File name too long"),
                                    ("../../..", 403, "outside --adapters-dir"),
                                    (str(outside), 403, "outside --adapters-dir"),
                                    ("linked", 403, "adapter_model.safetensors links to outside"),
                                    ("half-linked", 403, "adapter_config.json links to outside"),
                                    ("corrupt", 400, "corrupt/adapter_model.safetensors: truncated or corrupt")]:
            for endpoint, body in (("/v1/adapters", {"name": "x", "path": path}),
                                   ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path})):
                error = error_of(httpx.post(url + endpoint, json=body, headers=AUTH), status)
                assert words in error["message"] and error["param"] == "path", (path, error)
                assert str(adapters_dir) not in error["message"]
        for name in ("../x", "a\nb", "/a", "a//b", "a/./b", "a b", "-a", "é"):
            error = error_of(httpx.post(url + "/v1/adapters", json={"name": name, "path": "a"}, headers=AUTH), 400)
            assert error["param"] == "name" and "not an adapter name" in error["message"], name
        reply = httpx.post(url + "/v1/adapters", json={"name": "org/a-1.2_x", "path": "a"}, headers=AUTH)
        assert reply.status_code == 200, reply.text
        assert [m["id"] for m in httpx.get(url + "/v1/models", headers=AUTH).json()["data"]] == ["tiny", "org/a-1.2_x"]


# --- 5. a request larger than the whole queue ----------------------------------------------------------------------
def test_a_request_of_more_sequences_than_the_queue_holds_is_a_400_not_a_429(tiny):
    server = new_server(tiny, {}, max_queue=4)
    with running(server) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        for prompts, n, param in ((["a", "b", "c"], 2, "n"), (["a"] * 5, 1, "prompt")):
            reply = completion(url, prompt=prompts, n=n)
            error = error_of(reply, 400)
            assert "retry-after" not in reply.headers and error["param"] == param
            assert error["code"] == "too_many_sequences" and "--max-queue 4" in error["message"]
            with pytest.raises(openai.BadRequestError):
                client.completions.create(model="tiny", prompt=prompts, n=n, max_tokens=2)
        assert len(client.completions.create(model="tiny", prompt=["a", "b"], n=2, max_tokens=2).choices) == 4
