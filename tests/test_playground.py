"""The playground page of ``lorakit serve`` (GET /) in a real headless browser: chromium through Playwright.

A tiny model and two adapters with random weights are served with an API key; the page lists them, streams
the base's and an adapter's chat answers side by side, and each column must read exactly what the same
request answers through the API.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
import torch

import lorakit as lk
from test_train import save_tiny_model

KEY = "sk-playground"
PROMPT = "hello there"
MAX_TOKENS = 12
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The base URL of a Server for "tiny" with adapters "a" and "b", behind the API key KEY."""
    from lorakit.serve.app import Server, running
    from lorakit.train import models

    root = tmp_path_factory.mktemp("playground")
    tiny = save_tiny_model(root / "tiny")
    adapters = {}
    for seed, name in enumerate(["a", "b"], start=1):
        model, _ = models.load(str(tiny))
        lk.adapt(model, lk.LoRA(rank=4, alpha=8), targets="all-linear")
        torch.manual_seed(seed)
        for parameter_name, p in model.named_parameters():
            if "adapters" in parameter_name:
                p.data.normal_(0, 0.3)
        lk.save(model, root / name)
        adapters[name] = root / name
    model, tokenizer = models.load(str(tiny))
    with running(Server(model, tokenizer, "tiny", adapters, api_key=KEY, max_batch=8)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: the playground tests drive Debian's chromium (Playwright's own "
                    "browser download is not used). .ci/run installs it; here: "
                    "sudo apt-get install -y chromium", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, served):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(served + "/")  # the page itself needs no key
    yield page
    context.close()
    assert requested and all(u.startswith(served + "/") for u in requested), requested  # nothing from outside


def _enter_key(page, key: str) -> None:
    page.fill("#api-key", key)
    page.press("#api-key", "Tab")  # a change of key lists the models again


def _chat(url: str, model: str) -> str:
    r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                   json={"model": model, "messages": [{"role": "user", "content": PROMPT}],
                         "max_tokens": MAX_TOKENS, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _answers(page, models: list[str]) -> dict[str, str]:
    for m in models:
        page.wait_for_selector(f'#outputs [data-model="{m}"][data-done="true"]')
    return {m: page.locator(f'#outputs [data-model="{m}"] pre').text_content() for m in models}


def test_the_page_streams_the_base_and_an_adapter_side_by_side_as_the_api_answers(page, served):
    # without the key the models cannot be listed, and the page says why
    page.wait_for_selector("#status.error")
    assert "API key" in page.text_content("#status")
    _enter_key(page, KEY)
    boxes = page.locator("#models input[type=checkbox]")
    boxes.first.wait_for()
    assert [boxes.nth(i).get_attribute("value") for i in range(boxes.count())] == ["tiny", "a", "b"]
    # the base and the first adapter are chosen by default; choose b instead of a
    assert page.is_checked('#models input[value="tiny"]') and page.is_checked('#models input[value="a"]')
    assert not page.is_checked('#models input[value="b"]')
    page.check('#models input[value="b"]')
    page.uncheck('#models input[value="a"]')
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", str(MAX_TOKENS))
    assert page.input_value("#temperature") == "0"
    page.click("#run")

    shown = _answers(page, ["tiny", "b"])
    assert page.locator("#outputs .column").count() == 2
    assert shown == {"tiny": _chat(served, "tiny"), "b": _chat(served, "b")}
    assert shown["tiny"] and shown["b"] and shown["tiny"] != shown["b"]  # the adapter changes the answer
    assert page.locator("#outputs [data-error]").count() == 0

    # the key is kept: a reload lists the models at once, and Ctrl+Enter runs the prompt again
    page.reload()
    page.locator('#models input[value="b"]').wait_for()
    assert page.input_value("#api-key") == KEY
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.press("#prompt", "Control+Enter")
    assert _answers(page, ["tiny", "a"]) == {"tiny": shown["tiny"], "a": _chat(served, "a")}


def test_a_wrong_key_shows_the_servers_401_message_in_each_column(page):
    _enter_key(page, KEY)
    page.locator('#models input[value="a"]').wait_for()
    _enter_key(page, "sk-wrong")  # the list shown stays; the run is refused
    page.wait_for_selector("#status.error")
    page.fill("#prompt", PROMPT)
    page.click("#run")
    for model in ["tiny", "a"]:
        page.wait_for_selector(f'#outputs [data-model="{model}"][data-done="true"]')
        column = page.locator(f'#outputs [data-model="{model}"]')
        assert column.get_attribute("data-error") == "true"
        text = column.locator("pre").text_content()
        assert text.startswith("Error 401: ") and "missing or wrong API key" in text, text


def test_a_refused_request_shows_the_servers_400_message_in_its_column(page):
    _enter_key(page, KEY)
    page.locator('#models input[value="a"]').wait_for()
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", "100000")  # more than the context
    page.click("#run")
    page.wait_for_selector('#outputs [data-model="a"][data-done="true"]')
    text = page.locator('#outputs [data-model="a"] pre').text_content()
    assert text.startswith("Error 400: this model's maximum context length is 512 tokens"), text
