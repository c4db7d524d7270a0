"""Adapter files: targets PEFT resolves exactly, complete and consistent contents, checksums, and clear errors
for paths that cannot be read or written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit as lk
from conftest import randomize, tiny_llama, token_ids
from lorakit.checkpoint import DIGEST_KEY, read_tensors, write_tensors

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _saved(tmp_path, **kwargs) -> Path:
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=4), ["q_proj", "v_proj"], **kwargs)
    randomize(model)
    return lk.save(model, tmp_path / "adapter")


def _edit_config(directory: Path, **changes) -> None:
    path = directory / CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _flip_data_byte(path: Path, offset: int = 0) -> None:
    """Flip one bit of the tensor data (past safetensors' 8-byte length and JSON header)."""
    raw = bytearray(path.read_bytes())
    raw[8 + int.from_bytes(raw[:8], "little") + offset] ^= 0x01
    path.write_bytes(bytes(raw))


def _metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


# --- a diffusers-shaped model: targets ending in a number ------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])  # diffusers' to_out.0 / to_out.1

    def forward(self, t):  # (b, tokens, dim)
        att = torch.softmax(self.to_q(t) @ self.to_k(t).transpose(1, 2) / t.shape[-1] ** 0.5, -1) @ self.to_v(t)
        return self.to_out[1](self.to_out[0](att))


class _Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([nn.Conv2d(dim, dim, 3, padding=1)])
        self.attentions = nn.ModuleList([_Attention(dim)])

    def forward(self, x):  # (b, c, h, w)
        h = x + self.resnets[0](x)
        t = h.flatten(2).transpose(1, 2)  # (b, h·w, c)
        return h + self.attentions[0](t).transpose(1, 2).reshape(h.shape)


class DiffusersShaped(nn.Module):
    """Module names as a diffusers UNet has them: down_blocks.0.attentions.0.to_out.0 and so on."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.down_blocks = nn.ModuleList([_Block(8), _Block(8)])
        self.up_blocks = nn.ModuleList([_Block(8)])
        self.conv_out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in [*self.down_blocks, *self.up_blocks]:
            h = block(h)
        return self.conv_out(h)


def _diffusers_shaped(seed: int = 0):
    torch.manual_seed(seed)
    return DiffusersShaped().eval()


def _images():
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))


def _peft_adapted_paths(peft_model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def test_targets_ending_in_a_number_resolve_in_peft_to_exactly_the_adapted_modules(tmp_path):
    peft = pytest.importorskip("peft")
    model, x = _diffusers_shaped(), _images()
    lk.adapt(model, lk.LoRA(rank=2, alpha=4), ["to_q", "to_v", "to_out.0", "conv_in"])
    randomize(model)
    adapted = {p for p, _ in lk.model.adapted_layers(model)}
    assert "down_blocks.0.attentions.0.to_out.0" in adapted and len(adapted) == 10
    lk.save(model, tmp_path)
    targets = json.loads((tmp_path / CONFIG).read_text())["target_modules"]
    assert targets == ["conv_in", "to_out.0", "to_q", "to_v"]  # not "0": PEFT would take down_blocks.0 too
    theirs = peft.PeftModel.from_pretrained(_diffusers_shaped(), tmp_path).eval()
    assert _peft_adapted_paths(theirs) == adapted
    torch.testing.assert_close(_logits(theirs, x), _logits(model, x), atol=1e-5, rtol=1e-5)


def test_a_diffusers_shaped_peft_adapter_loads_here(tmp_path):
    peft = pytest.importorskip("peft")
    x = _images()
    theirs = peft.get_peft_model(_diffusers_shaped(), peft.LoraConfig(r=2, lora_alpha=4,
                                                                     target_modules=["to_k", "to_out.0"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
    theirs.eval().save_pretrained(tmp_path)
    ours = lk.load(_diffusers_shaped(), tmp_path)
    assert {p for p, _ in lk.model.adapted_layers(ours)} == _peft_adapted_paths(theirs)
    torch.testing.assert_close(_logits(ours, x), _logits(theirs, x), atol=1e-5, rtol=1e-5)


def _two_bs():
    model = nn.Sequential()
    model.add_module("b", nn.Linear(4, 4))
    model.add_module("x", nn.Sequential())
    model.x.add_module("b", nn.Linear(4, 4))
    return model


def test_target_names_fall_back_to_a_regex_when_no_suffix_is_unique(tmp_path):
    """``b`` is itself the end of ``x.b``: no list of names selects one without the other."""
    model = lk.adapt(_two_bs(), lk.LoRA(rank=2), r"b")  # the top-level b only
    lk.save(model, tmp_path)
    assert json.loads((tmp_path / CONFIG).read_text())["target_modules"] == "(b)"
    assert [p for p, _ in lk.model.adapted_layers(lk.load(_two_bs(), tmp_path))] == ["b"]


# --- complete, consistent contents -------------------------------------------------------------------------
def _drop_tensors(directory: Path, fragment: str) -> None:
    tensors = read_tensors(directory / WEIGHTS)
    write_tensors(directory / WEIGHTS, {k: v for k, v in tensors.items() if fragment not in k})


def test_a_file_missing_targeted_modules_is_refused_naming_them(tmp_path):
    directory = _saved(tmp_path)
    _drop_tensors(directory, "layers.1.self_attn.q_proj")
    model, x = tiny_llama(), token_ids()
    before = _logits(model, x)
    with pytest.raises(lk.AdapterFileError, match=r"no tensors for 1 module\(s\).*: model\.layers\.1\.self_attn\.q_proj; "
                                                  r"the file is incomplete"):
        lk.load(model, directory)
    assert lk.adapter_names(model) == [] and torch.equal(_logits(model, x), before)
    with pytest.warns(UserWarning, match=r"model\.layers\.1\.self_attn\.q_proj; they are left as the base"):
        lk.load(model, directory, strict=False)
    assert sorted(p for p, _ in lk.model.adapted_layers(model)) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]


def test_a_file_missing_its_trained_module_is_refused(tmp_path):
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=2), ["q_proj"], train=["lm_head"])
    directory = lk.save(model, tmp_path / "adapter")
    _drop_tensors(directory, "lm_head")
    with pytest.raises(lk.AdapterFileError, match=r"no tensors for 1 module\(s\).*: lm_head"):
        lk.load(tiny_llama(), directory)


def test_a_config_whose_rank_disagrees_with_its_tensors_is_refused(tmp_path):
    directory = _saved(tmp_path, ranks={"v_proj": 2})
    assert json.loads((directory / CONFIG).read_text())["rank_pattern"] == {
        "model\\.layers\\.0\\.self_attn\\.v_proj": 2, "model\\.layers\\.1\\.self_attn\\.v_proj": 2}
    lk.load(tiny_llama(), directory)  # rank_pattern is respected
    _edit_config(directory, r=8)
    model = tiny_llama()
    with pytest.raises(lk.ShapeMismatchError, match=r"model\.layers\.0\.self_attn\.q_proj: its tensors have rank 4 .*"
                                                    r"config gives it r=8"):
        lk.load(model, directory)
    assert lk.adapter_names(model) == []
    _edit_config(directory, r=4, rank_pattern={"v_proj": 3})
    with pytest.raises(lk.ShapeMismatchError, match=r"v_proj: its tensors have rank 2 .*r=3"):
        lk.load(model, directory)


# --- SVF / SVFT support indices ------------------------------------------------------------------------------
def _spectral() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5))  # n = 5 singular values


def _spectral_file(tmp_path, method, key, change) -> Path:
    model = lk.adapt(_spectral(), method, ["0"])
    randomize(model)
    directory = lk.save(model, tmp_path / "adapter")
    tensors = read_tensors(directory / WEIGHTS)
    tensors[f"base_model.model.0.{key}"] = change(tensors[f"base_model.model.0.{key}"])
    write_tensors(directory / WEIGHTS, tensors)
    return directory


def _set(index, value):
    index = index.clone()
    index[-1] = value
    return index


@pytest.mark.parametrize("method", [lk.SVF(), lk.SVFT(pattern="banded", width=1)], ids=["svf", "svft"])
@pytest.mark.parametrize("key, change, error, message", [
    ("rows", lambda t: _set(t, 5), lk.ShapeMismatchError, r"^0\.rows: index 5 is out of range .* 5 singular values"),
    ("cols", lambda t: _set(t, -1), lk.ShapeMismatchError, r"^0\.cols: index -1 is out of range"),
    ("rows", lambda t: t.float(), lk.AdapterFileError, r"^0\.rows: support indices must be integers"),
])
def test_support_indices_out_of_range_are_refused_on_load(tmp_path, method, key, change, error, message):
    directory = _spectral_file(tmp_path, method, key, change)
    model = _spectral()
    with pytest.raises(error, match=message):
        lk.load(model, directory)
    assert lk.adapter_names(model) == []


def test_svf_rows_and_cols_are_separate_tensors(tmp_path):
    permutation = torch.tensor([1, 0, 2, 4, 3])
    directory = _spectral_file(tmp_path, lk.SVF(), "cols", lambda t: permutation)
    adapter = lk.load(_spectral(), directory)[0].adapters["default"]
    assert torch.equal(adapter.rows, torch.arange(5)) and torch.equal(adapter.cols, permutation)
    M = torch.zeros(5, 5)
    M[torch.arange(5), permutation] = adapter.spectrum * (adapter.values - 1)
    torch.testing.assert_close(adapter.delta_weight(), adapter.U @ M @ adapter.Vh)


# --- integrity: a digest of the tensor bytes -----------------------------------------------------------------
def test_a_flipped_bit_in_tensor_data_is_refused_naming_the_file(tmp_path):
    directory = _saved(tmp_path)
    assert DIGEST_KEY in _metadata(directory / WEIGHTS)
    _flip_data_byte(directory / WEIGHTS, offset=37)
    load_file(directory / WEIGHTS)  # safetensors itself notices nothing
    model, x = tiny_llama(), token_ids()
    before = _logits(model, x)
    with pytest.raises(lk.AdapterFileError, match=r"adapter/adapter_model\.safetensors: its tensor data does not match "
                                                  r"the checksum"):
        lk.load(model, directory)
    assert lk.adapter_names(model) == [] and torch.equal(_logits(model, x), before)


def test_files_without_a_digest_load_and_peft_loads_ours(tmp_path):
    peft = pytest.importorskip("peft")
    x = token_ids()
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_()
    theirs.eval().save_pretrained(tmp_path / "peft")
    assert DIGEST_KEY not in _metadata(tmp_path / "peft" / WEIGHTS)
    ours = lk.load(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(_logits(ours, x), _logits(theirs, x), atol=1e-5, rtol=1e-5)
    lk.save(ours, tmp_path / "ours")
    assert DIGEST_KEY in _metadata(tmp_path / "ours" / WEIGHTS)
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(again, x), _logits(theirs, x), atol=1e-5, rtol=1e-5)


def test_write_and_read_tensors_round_trip_and_catch_damage(tmp_path):
    shared = torch.arange(6.0)
    tensors = {"a": shared, "b": shared, "half": torch.randn(3, 2).bfloat16(), "index": torch.arange(4),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "mask": torch.tensor([True, False]),
               "strided": torch.randn(4, 4).t()}
    path = tmp_path / "state.safetensors"
    write_tensors(path, tensors, metadata={"step": "7"})
    back = read_tensors(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    assert _metadata(path)["step"] == "7"
    _flip_data_byte(path, offset=3)
    with pytest.raises(lk.AdapterFileError, match=r"state\.safetensors: its tensor data does not match"):
        read_tensors(path)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(lk.AdapterFileError, match=r"state\.safetensors: truncated or corrupt"):
        read_tensors(path)
    with pytest.raises(lk.AdapterFileError, match=r"nothing\.safetensors: no such file"):
        read_tensors(tmp_path / "nothing.safetensors")


def test_save_never_leaves_new_weights_beside_an_old_config(tmp_path, monkeypatch):
    """Both files are written before either replaces its old version: a failed config write keeps the old pair."""
    directory = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=2), ["k_proj"])

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lorakit.checkpoint.json.dumps", fail)
    with pytest.raises(lk.AdapterFileError, match=r"adapter_config\.json: cannot write it \(disk full\)"):
        lk.save(model, directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


# --- paths that cannot be written or are not adapter directories ------------------------------------------------
@pytest.fixture
def unwritable_directory(tmp_path) -> Path:
    """A directory no file can be created in: read-only by its mode, or, for root (whom modes do not stop),
    /sys, which refuses new files even to root."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    try:
        (directory / "probe").write_text("")
    except PermissionError:
        yield directory
    else:  # running as root
        sysfs = Path("/sys")
        try:
            (sysfs / "lorakit-probe").write_text("")
        except OSError:
            yield sysfs
        else:
            pytest.skip("running as root with no directory that refuses writes")
    finally:
        directory.chmod(0o755)


def test_saving_into_a_read_only_directory_names_the_path(unwritable_directory):
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=2), ["q_proj"])
    with pytest.raises(lk.AdapterFileError, match=rf"{unwritable_directory}/adapter_model\.safetensors: cannot write it"):
        lk.save(model, unwritable_directory)
    assert not any(p.name.startswith(".adapter") for p in unwritable_directory.iterdir())


def test_saving_onto_a_file_says_so(tmp_path):
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=2), ["q_proj"])
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(lk.AdapterFileError, match=r"notes\.txt: is a file, not a directory"):
        lk.save(model, a_file)
    with pytest.raises(lk.AdapterFileError, match=r"notes\.txt/sub: cannot write it"):
        lk.save(model, a_file / "sub")
    assert a_file.read_text() == "mine"


def test_loading_a_file_path_says_it_is_a_file_not_an_adapter_directory(tmp_path):
    directory = _saved(tmp_path)
    with pytest.raises(lk.AdapterFileError, match=r"adapter_config\.json: is a file, not an adapter directory"):
        lk.load(tiny_llama(), directory / CONFIG)
    with pytest.raises(lk.AdapterFileError, match=r"missing: no such directory"):
        lk.load(tiny_llama(), tmp_path / "missing")
