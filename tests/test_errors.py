"""Bad input gets a clear LorakitError that names what is wrong, and leaves the model as it was."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lorakit as lk
from conftest import randomize, tiny_llama, token_ids


def test_every_error_is_a_lorakit_error():
    for cls in (lk.ConfigError, lk.TargetNotFoundError, lk.UnsupportedLayerError, lk.AdapterExistsError,
                lk.AdapterNotFoundError, lk.AdapterFileError, lk.ShapeMismatchError, lk.MergeError):
        assert issubclass(cls, lk.LorakitError)


def test_target_that_matches_nothing_names_it_and_shows_close_names():
    model = tiny_llama()
    with pytest.raises(lk.TargetNotFoundError, match=r"q_prj.*close module names: .*q_proj"):
        lk.adapt(model, lk.LoRA(), ["q_prj"])
    with pytest.raises(lk.TargetNotFoundError, match="k_proj"):
        lk.adapt(model, lk.LoRA(), ["k_proj"], layers=[7])
    assert lk.adapter_names(model) == [] and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank must be > 0"), (dict(rank=-2), "rank must be > 0"), (dict(rank=2.5), "rank must be an int"),
    (dict(rank=True), "rank must be an int"), (dict(alpha=0), "alpha must be > 0"), (dict(alpha=-1.0), "alpha"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"), (dict(dropout=-0.1), "dropout"),
])
def test_invalid_recipe_values(kwargs, message):
    with pytest.raises(lk.ConfigError, match=message):
        lk.LoRA(**kwargs)


def test_bad_per_layer_rank_is_caught_before_anything_changes():
    model = tiny_llama()
    with pytest.raises(lk.ConfigError, match="rank must be > 0"):
        lk.adapt(model, lk.LoRA(rank=4), ["q_proj"], ranks={"layers.1": 0})
    assert lk.adapter_names(model) == []


def test_unsupported_layers():
    with pytest.raises(lk.UnsupportedLayerError, match="model.norm is a LlamaRMSNorm"):
        lk.adapt(tiny_llama(), lk.LoRA(), ["model.norm"])
    with pytest.raises(lk.UnsupportedLayerError, match="out_proj"):  # MHA never calls out_proj's forward
        lk.adapt(nn.Sequential(nn.MultiheadAttention(8, 2)), lk.LoRA(), ["out_proj"])
    with pytest.raises(lk.ConfigError, match="targets must be"):
        lk.adapt(tiny_llama(), lk.LoRA(), [])


def test_adapter_names_that_exist_or_do_not():
    model = lk.adapt(tiny_llama(), lk.LoRA(), ["q_proj"], name="sql")
    with pytest.raises(lk.AdapterExistsError, match="'sql'"):
        lk.adapt(model, lk.LoRA(), ["v_proj"], name="sql")
    for call in (lambda: lk.activate(model, "chat"), lambda: lk.delete(model, "chat"),
                 lambda: lk.save(model, "/nonexistent", name="chat"), lambda: lk.merge(model, ["chat"])):
        with pytest.raises(lk.AdapterNotFoundError, match=r"'chat'.*\['sql'\]"):
            call()
    with pytest.raises(lk.AdapterNotFoundError):
        with lk.route(model, ["sql", "chat", None]):
            pass


def _saved(tmp_path):
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=4), ["q_proj", "v_proj"])
    randomize(model)
    return lk.save(model, tmp_path / "adapter")


def _assert_untouched(model, before):
    assert lk.adapter_names(model) == []
    assert torch.equal(model(token_ids()).logits, before)


def _legacy_garbage(weights, config):
    weights.unlink()
    weights.with_name("adapter_model.bin").write_bytes(b"not a pickle" * 10)


def _edit_config(config, **changes):
    fields = {**json.loads(config.read_text()), **changes}
    config.write_text(json.dumps({k: v for k, v in fields.items() if v is not None}))


# damage(weights path, config path), what the error must say
DAMAGES = {
    "truncate": (lambda w, c: w.write_bytes(w.read_bytes()[: w.stat().st_size // 2]),
                 r"adapter_model\.safetensors: truncated or corrupt"),
    "cut-last-bytes": (lambda w, c: w.write_bytes(w.read_bytes()[:-4]),
                       r"adapter_model\.safetensors: truncated or corrupt"),
    "garbage": (lambda w, c: w.write_bytes(b"\x00\x01not a safetensors file" * 10),
                r"adapter_model\.safetensors: truncated or corrupt"),
    "legacy-garbage": (_legacy_garbage, r"adapter_model\.bin: truncated or corrupt"),
    "delete-weights": (lambda w, c: w.unlink(), r"no adapter_model\.safetensors"),
    "bad-json": (lambda w, c: c.write_text("{not json"), r"adapter_config\.json: not valid JSON"),
    "json-list": (lambda w, c: c.write_text("[1, 2]"), r"adapter_config\.json: not a JSON object"),
    "no-rank": (lambda w, c: _edit_config(c, r=None), r"adapter_config\.json: not a valid adapter config .*'r'"),
    "zero-rank": (lambda w, c: _edit_config(c, r=0), r"adapter_config\.json: .*rank must be > 0"),
    "no-config": (lambda w, c: c.unlink(), r"no adapter_config\.json"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_corrupt_adapter_files(tmp_path, damage):
    directory = _saved(tmp_path)
    spoil, message = DAMAGES[damage]
    spoil(directory / "adapter_model.safetensors", directory / "adapter_config.json")
    model = tiny_llama()
    before = model(token_ids()).logits
    with pytest.raises(lk.AdapterFileError, match=message):
        lk.load(model, directory)
    _assert_untouched(model, before)


def test_shape_mismatch_names_the_module_and_loads_nothing(tmp_path):
    directory = _saved(tmp_path)
    model = tiny_llama(hidden=48)
    before = model(token_ids()).logits
    with pytest.raises(lk.ShapeMismatchError, match=r"model\.layers\.0\.self_attn\.q_proj.*\(4, 32\).*\(4, 48\)"):
        lk.load(model, directory)
    _assert_untouched(model, before)


def test_adapter_for_modules_the_model_lacks(tmp_path):
    directory = _saved(tmp_path)
    model = tiny_llama(num_hidden_layers=1)
    with pytest.raises(lk.ShapeMismatchError, match=r"layers\.1\.self_attn\.q_proj"):
        lk.load(model, directory)
    assert lk.adapter_names(model) == []


def test_a_refused_load_leaves_train_modules_untouched(tmp_path):
    """The file's own tensors (here a trained norm) are written only once nothing can refuse the load."""
    saved = lk.adapt(tiny_llama(), lk.LoRA(rank=2), ["q_proj"], train=["model.norm"])
    randomize(saved)
    with torch.no_grad():
        saved.model.norm.adapters["default"].weight.mul_(3)
    lk.save(saved, tmp_path / "adapter")
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=2), ["v_proj"], name="other")
    randomize(model)
    lk.merge(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lk.MergeError, match="unmerge"):
        lk.load(model, tmp_path / "adapter")
    assert lk.adapter_names(model) == ["other"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_unsupported_peft_configs_are_refused(tmp_path):
    directory = _saved(tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(lk.AdapterFileError, match="IA3"):
        lk.load(tiny_llama(), directory)


def test_save_is_atomic_and_keeps_the_old_adapter_on_failure(tmp_path, monkeypatch):
    directory = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=2), ["k_proj"])

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lorakit.checkpoint.save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        lk.save(model, directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # no temp files left either


def test_merge_refuses_non_finite_updates_and_changes_nothing():
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=2), ["q_proj", "v_proj"])
    randomize(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.adapters["default"].lora_B[0, 0] = float("nan")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lk.MergeError, match=r"layers\.1\.self_attn\.v_proj.*NaN"):
        lk.merge(model)
    assert all(torch.equal(model.state_dict()[k], v, ) for k, v in weights.items() if "lora_B" not in k)
    assert all(not layer.merged for _, layer in lk.model.adapted_layers(model))


def test_switching_or_routing_while_merged_is_refused():
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=2), ["q_proj"], name="a")
    lk.adapt(model, lk.LoRA(rank=2), ["q_proj"], name="b")
    lk.merge(model)
    with pytest.raises(lk.MergeError, match="unmerge"):
        lk.activate(model, "a")
    with pytest.raises(lk.MergeError, match="unmerge"):
        with lk.route(model, ["a", "b", None]):
            pass
    with pytest.raises(lk.MergeError, match="unmerge"):
        lk.adapt(model, lk.LoRA(rank=2), ["k_proj"], name="c")
    assert lk.adapter_names(model) == ["a", "b"]
    lk.unmerge(model)
    lk.activate(model, "a")


def test_route_with_the_wrong_batch_size():
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=2), ["q_proj"], name="a")
    randomize(model)
    with pytest.raises(lk.ConfigError, match="2 names for a batch of 3"):
        with lk.route(model, ["a", None]):
            model(token_ids(batch=3))


def test_layers_that_filter_out_every_match_are_named():
    with pytest.raises(lk.TargetNotFoundError, match=r"in layers \[7\] \(they match in layers \[0, 1\]\)"):
        lk.adapt(tiny_llama(), lk.LoRA(rank=2), ["q_proj"], layers=[7])


def test_enable_lora_refuses_alpha_zero():
    with pytest.raises(lk.ConfigError, match="alpha must be > 0"):
        lk.enable_lora(tiny_llama(), rank=4, alpha=0)


def test_nested_route_gives_the_outer_routing_back():
    model, x = lk.adapt(tiny_llama(), lk.LoRA(rank=2), ["q_proj"], name="a"), token_ids(batch=2)
    lk.adapt(model, lk.LoRA(rank=2), ["q_proj"], name="b")
    randomize(model)
    with torch.no_grad(), lk.route(model, ["a", "b"]):
        outer = model(x).logits
        with lk.route(model, ["b", "a"]):
            model(x)
        torch.testing.assert_close(model(x).logits, outer, atol=0, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(targets="q_proj("), dict(targets=["q_proj"], ranks={"layers.(": 2}),
                                    dict(targets=["q_proj"], alphas={"[v": 2.0}), dict(targets=["q_proj"], train="norm(")],
                         ids=["targets", "ranks", "alphas", "train"])
def test_an_invalid_regex_is_a_config_error_and_changes_nothing(kwargs):
    model = tiny_llama()
    with pytest.raises(lk.ConfigError, match="is not a valid regular expression"):
        lk.adapt(model, lk.LoRA(rank=2), **kwargs)
    assert lk.adapter_names(model) == [] and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("field, value", [("alpha_pattern", {"v_proj(": 2.0}), ("rank_pattern", {"[q": 2}),
                                          ("target_modules", "model.*proj("), ("modules_to_save", ["norm("]),
                                          ("rank_pattern", ["v_proj"]), ("target_modules", [3])])
def test_a_loaded_config_with_a_bad_pattern_names_the_file(tmp_path, field, value):
    directory = _saved(tmp_path)
    _edit_config(directory / "adapter_config.json", **{field: value})
    model = tiny_llama()
    with pytest.raises(lk.AdapterFileError, match=rf"adapter_config\.json: {field}"):
        lk.load(model, directory)
    assert lk.adapter_names(model) == []


def test_a_method_class_instead_of_an_instance_is_a_config_error():
    model = tiny_llama()
    with pytest.raises(lk.ConfigError, match=r"lk\.LoRA\(rank=8\).*call the class"):
        lk.adapt(model, lk.LoRA, ["q_proj"])
    with pytest.raises(lk.ConfigError, match="method must be a recipe"):
        lk.adapt(model, "lora", ["q_proj"])
    with pytest.raises(lk.ConfigError, match="lk.Method is the base class of recipes, not a method"):
        lk.adapt(model, lk.Method(), ["q_proj"])
    assert lk.adapter_names(model) == []


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("make, message", [
    (lambda: lk.LoRA(alpha=INF), "alpha must be > 0 and finite"), (lambda: lk.LoRA(alpha=NAN), "alpha"),
    (lambda: lk.LoRA(alpha="16"), "alpha"), (lambda: lk.LoRA(dropout=NAN), "dropout"),
    (lambda: lk.LoRA(dropout="0.1"), "dropout"), (lambda: lk.DoRA(alpha=INF), "alpha"),
    (lambda: lk.PiSSA(alpha=INF), "alpha"), (lambda: lk.PiSSA(niter=INF), "niter"),
    (lambda: lk.MiLoRA(alpha=NAN), "alpha"), (lambda: lk.LoRAXS(alpha=INF), "alpha"),
    (lambda: lk.AdaLoRA(total_steps=10, alpha=INF), "alpha"), (lambda: lk.SVF(dropout=INF), "dropout"),
    (lambda: lk.SVFT(dropout=NAN), "dropout"), (lambda: lk.SVFT(seed=1.5), "seed must be an int"),
])
def test_every_numeric_setting_must_be_finite(make, message):
    with pytest.raises(lk.ConfigError, match=message):
        make()


def test_a_non_finite_setting_no_constructor_checks_is_refused_by_adapt_and_load(tmp_path):
    model = tiny_llama()
    with pytest.raises(lk.ConfigError, match="AdaLoRA: orth_reg_weight must be finite"):
        lk.adapt(model, lk.AdaLoRA(total_steps=10, orth_reg_weight=INF), ["q_proj"])
    assert lk.adapter_names(model) == []
    directory = _saved(tmp_path)
    _edit_config(directory / "adapter_config.json", lora_alpha=INF)  # JSON's Infinity
    with pytest.raises(lk.AdapterFileError, match=r"adapter_config\.json: .*alpha must be > 0 and finite"):
        lk.load(model, directory)
