"""Adapter files prove what they are (issue 22, findings 7-10): lorakit's digest covers a file's tensors, metadata
and config, and no single bit flip switches it off; loads refuse NaN/Inf and non-float tensors, config values of
the wrong JSON type and PEFT's bias modes, naming the file, module, tensor or key. PEFT's files still load."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit as lk
from conftest import randomize, tiny_gpt2, tiny_llama, token_ids
from lorakit.checkpoint import CONFIG_DIGEST_KEY, DIGEST_KEY, read_tensors, tensor_digest, write_tensors

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(token_ids()).logits


def _saved(tmp_path, method=None, **kwargs) -> Path:
    model = lk.adapt(tiny_llama(), method or lk.LoRA(rank=4), ["q_proj", "v_proj"], **kwargs)
    randomize(model)
    return lk.save(model, tmp_path / "adapter")


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _as_peft_writes_it(directory: Path, change=lambda tensors: None) -> None:
    """Rewrite the weights without lorakit's metadata, as PEFT writes them, after ``change(tensors)``."""
    tensors = load_file(directory / WEIGHTS)
    change(tensors)
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})


def _edit_config(directory: Path, **changes) -> None:
    path = directory / CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _set(key: str, value):
    """What sets the file's tensor ``key`` to ``value`` (for _as_peft_writes_it)."""
    return lambda tensors: tensors.__setitem__(key, value(tensors[key]) if callable(value) else value)


def _flip(path: Path, offset: int, bit: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


def _refused(model, directory: Path, message: str) -> None:
    """Loading ``directory`` raises an AdapterFileError matching ``message`` and leaves ``model`` as it was."""
    before = _logits(model)
    with pytest.raises(lk.AdapterFileError, match=message):
        lk.load(model, directory)
    assert lk.adapter_names(model) == [] and torch.equal(_logits(model), before)


# --- 7: tensors the model would take changed -----------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", [Q_B, "base_model.model.model.norm.weight"], ids=["lora_B", "train=norm"])
def test_non_finite_tensors_are_refused_naming_module_and_tensor(tmp_path, key, value):
    directory = _saved(tmp_path, train=["model.norm"])
    _as_peft_writes_it(directory, _set(key, lambda tensor: tensor.index_fill(0, torch.tensor([1]), value)))
    module_tensor = key.removeprefix("base_model.model.").replace(".", r"\.")
    _refused(tiny_llama(), directory, rf"adapter_model\.safetensors: {module_tensor}: holds NaN or infinite values")
    with pytest.warns(UserWarning, match=rf"{module_tensor}: holds NaN or infinite values; loaded anyway"):
        model = lk.load(tiny_llama(), directory, strict=False)
    assert lk.adapter_names(model) == ["default"]


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64])
def test_non_float_tensors_are_refused_not_cast(tmp_path, dtype):
    directory = _saved(tmp_path)
    _as_peft_writes_it(directory, _set(Q_B, lambda tensor: tensor.gt(0).to(dtype)))
    _refused(tiny_llama(), directory,
             rf"model\.layers\.0\.self_attn\.q_proj\.lora_B\.weight: is {dtype}, not a floating-point tensor")


@pytest.mark.parametrize("format, target", [("lorakit", "adapter"), ("kohya", "adapter.safetensors")])
def test_save_refuses_an_adapter_holding_nan(tmp_path, format, target):
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=2), ["q_proj", "v_proj"])
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.adapters["default"].lora_B[0, 0] = float("inf")
    with pytest.raises(lk.ConfigError, match=r"'default' holds NaN or infinite values in "
                                             r"model\.layers\.1\.self_attn\.v_proj\.lora_B\.weight; it is not saved"):
        lk.save(model, tmp_path / target, format=format)
    assert not (tmp_path / target).exists()


# --- 8: the digest cannot be switched off, and covers the config ----------------------------------------------
def test_every_lorakit_file_carries_two_marks_and_a_config_checksum(tmp_path):
    directory = _saved(tmp_path)
    metadata = _metadata(directory / WEIGHTS)
    assert sorted(k for k in metadata if k.startswith("lorakit_")) == [CONFIG_DIGEST_KEY, DIGEST_KEY, "lorakit_version"]
    assert not [k for k in json.loads((directory / CONFIG).read_text()) if k.startswith("lorakit")]  # PEFT's config


@pytest.mark.parametrize("key, message", [
    (DIGEST_KEY, r"lorakit wrote it \(its metadata has .*lorakit_version\), but its checksum lorakit_sha256 is "
                 "missing"),
    (CONFIG_DIGEST_KEY, "its tensor data does not match the checksum"),  # the digest covers the metadata
    ("lorakit_version", "its tensor data does not match the checksum"),
], ids=["digest", "config-checksum", "version"])
@pytest.mark.parametrize("bit", [0, 5], ids=["l-to-m", "l-to-L"])
def test_a_bit_flip_renaming_a_lorakit_key_is_refused(tmp_path, key, message, bit):
    """The flip that used to switch the check off: the key renamed, then flipped tensor bytes loaded silently."""
    directory = _saved(tmp_path)
    raw = (directory / WEIGHTS).read_bytes()
    _flip(directory / WEIGHTS, raw.index(f'"{key}"'.encode()) + 1, bit)  # its first letter: "l" -> "m" or "L"
    _flip(directory / WEIGHTS, len(raw) - 5)  # and a byte of the tensor data
    _refused(tiny_llama(), directory, rf"adapter_model\.safetensors: {message}")


def test_every_single_bit_flip_of_metadata_or_config_is_refused(tmp_path):
    directory = _saved(tmp_path)
    weights, config = directory / WEIGHTS, directory / CONFIG
    raw = weights.read_bytes()
    metadata = raw.index(b'"__metadata__"')
    offsets = [(weights, i) for i in range(metadata, raw.index(b"}", metadata) + 1)]
    offsets += [(config, i) for i in range(config.stat().st_size)]
    model, originals = tiny_llama(), {p: p.read_bytes() for p in (weights, config)}
    loaded = []
    for path, offset in offsets:  # bit 0 (the case bit of key names: test_a_bit_flip_renaming_a_lorakit_key)
        _flip(path, offset)
        try:
            lk.load(model, directory)
            loaded.append((path.name, offset))
            lk.delete(model, "default")
        except lk.LorakitError:
            pass
        path.write_bytes(originals[path])
    assert loaded == []
    assert lk.adapter_names(lk.load(model, directory)) == ["default"]


@pytest.mark.parametrize("changes, same", [
    (dict(lora_alpha=8.0), False), (dict(alpha_pattern={"v_proj": 2.0}), False), (dict(revision="main"), True),
], ids=["lora_alpha", "alpha_pattern", "unread-key"])
def test_a_valid_edit_of_the_config_is_refused_unless_not_strict(tmp_path, changes, same):
    directory = _saved(tmp_path)
    expected = _logits(lk.load(tiny_llama(), directory))
    _edit_config(directory, **changes)
    _refused(tiny_llama(), directory, r"adapter/adapter_config\.json: changed since lorakit wrote it .*"
                                      r"lk\.load\(\.\.\., strict=False\) loads it anyway")
    with pytest.warns(UserWarning, match=r"adapter_config\.json: changed since lorakit wrote it"):
        edited = lk.load(tiny_llama(), directory, strict=False)
    assert torch.equal(_logits(edited), expected) == same  # what loads is the edited config


def test_a_lorakit_config_beside_weights_without_a_checksum_is_refused(tmp_path):
    directory = _saved(tmp_path, lk.LoRAXS(rank=2))
    _as_peft_writes_it(directory)
    _refused(tiny_llama(), directory, r"adapter_config\.json: lorakit wrote it \(lorakit_method, .*\), but its "
                                      r"weights carry no lorakit checksum")


def test_the_single_file_formats_cover_their_metadata(tmp_path):
    """A diffusers file keeps its LoraConfig in the safetensors metadata: an edit there is caught too."""
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=2), ["q_proj"])
    randomize(model)
    path = lk.save(model, tmp_path / "lora.safetensors", format="diffusers")
    metadata = _metadata(path)
    configs = json.loads(metadata["lora_adapter_metadata"])
    alpha = next(key for key in configs if key.endswith(".lora_alpha"))
    configs[alpha] = 2 * configs[alpha]
    save_file(load_file(path), str(path), metadata={**metadata, "lora_adapter_metadata": json.dumps(configs)})
    _refused(tiny_llama(), path, r"lora\.safetensors: its tensor data does not match the checksum")


def test_tensor_files_refuse_a_renamed_digest(tmp_path):
    """The trainer's checkpoints go through write_tensors / read_tensors too."""
    path = tmp_path / "state.safetensors"
    write_tensors(path, {"w": torch.randn(4, 4)})
    raw = path.read_bytes()
    _flip(path, raw.index(DIGEST_KEY.encode()) + len(DIGEST_KEY) - 1)
    _flip(path, len(raw) - 1)
    with pytest.raises(lk.AdapterFileError, match=r"state\.safetensors: lorakit wrote it .*lorakit_version.*"
                                                  r"checksum lorakit_sha256 is missing; the file is damaged"):
        read_tensors(path)


def test_files_of_lorakit_0_1_0_still_load(tmp_path):
    """They carry the digest of their tensors alone, and no config checksum."""
    directory = _saved(tmp_path)
    expected = _logits(lk.load(tiny_llama(), directory))
    tensors = load_file(directory / WEIGHTS)
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt", DIGEST_KEY: tensor_digest(tensors)})
    assert torch.equal(_logits(lk.load(tiny_llama(), directory)), expected)
    _flip(directory / WEIGHTS, (directory / WEIGHTS).stat().st_size - 2)
    _refused(tiny_llama(), directory, r"its tensor data does not match the checksum")


def test_peft_reads_our_config_without_complaint_and_we_read_peft_files(tmp_path):
    peft = pytest.importorskip("peft")
    directory = _saved(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), directory).eval()
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]
    theirs.save_pretrained(tmp_path / "peft")
    assert not [k for k in _metadata(tmp_path / "peft" / WEIGHTS) if k.startswith("lorakit")]
    torch.testing.assert_close(_logits(lk.load(tiny_llama(), tmp_path / "peft")), _logits(theirs),
                               atol=1e-5, rtol=1e-5)


# --- 9: every config value is type-checked, naming the key ----------------------------------------------------
INF = float("inf")


@pytest.mark.parametrize("key, value, message", [
    ("use_rslora", "no", "use_rslora must be true or false, got 'no'"),
    ("use_dora", 1, "use_dora must be true or false"),
    ("r", INF, "r must be an int, got inf"),
    ("r", 4.5, "r must be an int"),
    ("lora_alpha", "16", "lora_alpha must be a number, got '16'"),
    ("lora_dropout", "0.1", r"lora_dropout must be a number \(or null\)"),
    ("rank_pattern", {"v_proj": INF}, "rank_pattern must be an object mapping module patterns to ints"),
    ("alpha_pattern", {"v_proj": "2"}, "alpha_pattern must be an object mapping module patterns to numbers"),
    ("layers_to_transform", "x", "layers_to_transform must be an int or a list of ints"),
    ("layers_to_transform", [0, "1"], "layers_to_transform must be an int or a list of ints"),
    ("bias", None, "bias must be 'none', 'all' or 'lora_only', got None"),
])
def test_config_values_of_the_wrong_type_are_refused_naming_the_key(tmp_path, key, value, message):
    directory = _saved(tmp_path)
    _as_peft_writes_it(directory)
    _edit_config(directory, **{key: value})
    _refused(tiny_llama(), directory, rf"adapter_config\.json: {message}")


@pytest.mark.parametrize("key, value, message", [
    ("tinit", 1.5, "tinit must be an int"), ("init_r", INF, "init_r must be an int"),
    ("beta1", "0.85", "beta1 must be a number"),
    ("rank_pattern", {"q_proj.lora_E": [True, 1]}, "rank_pattern must be an object mapping module names to lists"),
])
def test_adalora_config_values_are_type_checked(tmp_path, key, value, message):
    directory = _saved(tmp_path, lk.AdaLoRA(init_rank=4, target_rank=2, total_steps=10))
    _as_peft_writes_it(directory)
    _edit_config(directory, **{key: value})
    _refused(tiny_llama(), directory, rf"adapter_config\.json: {message}")


# --- 10: PEFT's bias modes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_peft_bias_modes_are_refused_naming_the_mode(tmp_path, bias):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], bias=bias))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "bias" in name:
                p.add_(1.0)
    theirs.save_pretrained(tmp_path / "peft")
    model = tiny_gpt2()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lk.AdapterFileError, match=rf"peft: bias='{bias}': the adapter also trained .* lorakit keeps "
                                                  r"the base model as it is .* bias='none' adapters only.*"
                                                  r"merge_and_unload"):
        lk.load(model, tmp_path / "peft")
    assert lk.adapter_names(model) == [] and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
