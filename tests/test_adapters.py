"""Targeting, many adapters on one model, training helpers and reports."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lorakit as lk
from conftest import randomize, tiny_bert, tiny_gpt2, tiny_llama, token_ids


def _adapted_paths(model):
    return [path for path, _ in lk.model.adapted_layers(model)]


def test_targets_as_names_regex_all_linear_and_layers():
    assert _adapted_paths(lk.adapt(tiny_llama(), lk.LoRA(), ["q_proj", "self_attn.v_proj"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert _adapted_paths(lk.adapt(tiny_llama(), lk.LoRA(), r".*\.1\.mlp\.(up|down)_proj")) == [
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    everything = _adapted_paths(lk.adapt(tiny_llama(), lk.LoRA(), "all-linear"))
    assert len(everything) == 14 and "lm_head" not in everything
    gpt2 = _adapted_paths(lk.adapt(tiny_gpt2(), lk.LoRA(), "all-linear"))
    assert len(gpt2) == 8 and "lm_head" not in gpt2
    assert _adapted_paths(lk.adapt(tiny_llama(), lk.LoRA(), ["o_proj"], layers=[1])) == [
        "model.layers.1.self_attn.o_proj"]


def test_per_layer_ranks_and_alphas_first_pattern_wins():
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=8, alpha=16), ["q_proj", "v_proj"],
                     ranks={r"layers\.1\.": 2, "v_proj": 4}, alphas={"q_proj": 3.0})
    recipes = {p: layer.recipes["default"] for p, layer in lk.model.adapted_layers(model)}
    assert recipes["model.layers.0.self_attn.q_proj"] == lk.LoRA(rank=8, alpha=3.0)
    assert recipes["model.layers.0.self_attn.v_proj"] == lk.LoRA(rank=4, alpha=16)
    assert recipes["model.layers.1.self_attn.v_proj"] == lk.LoRA(rank=2, alpha=16)
    assert model.model.layers[1].self_attn.q_proj.adapters["default"].lora_A.shape == (2, 32)


def test_rslora_scales_by_alpha_over_sqrt_rank():
    assert lk.LoRA(rank=16, alpha=8).scale == 0.5
    assert lk.LoRA(rank=16, alpha=8, rslora=True).scale == 2.0
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=4, alpha=8, rslora=True), ["q_proj"])
    randomize(model)
    layer = model.model.layers[0].self_attn.q_proj
    A, B = layer.adapters["default"].lora_A, layer.adapters["default"].lora_B
    x = torch.randn(2, 32)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight) + 4 * x @ A.t() @ B.t())


def test_trainable_parameters_are_the_adapters_plus_train_modules():
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=2), ["q_proj"], train=["model.norm", "lm_head"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"model.layers.0.self_attn.q_proj.adapters.default.lora_A",
                     "model.layers.0.self_attn.q_proj.adapters.default.lora_B",
                     "model.layers.1.self_attn.q_proj.adapters.default.lora_A",
                     "model.layers.1.self_attn.q_proj.adapters.default.lora_B",
                     "model.norm.adapters.default.weight", "lm_head.adapters.default.weight"}  # the adapter's copies
    assert len(lk.trainable_parameters(model)) == 6


def test_train_modules_are_saved_and_loaded(tmp_path):
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=2), ["q_proj"], train=["model.norm"])
    randomize(model)
    with torch.no_grad():
        model.model.norm.adapters["default"].weight.mul_(1.5)
    lk.save(model, tmp_path)
    fresh = lk.load(tiny_llama(), tmp_path)
    assert torch.equal(fresh.model.norm.adapters["default"].weight, model.model.norm.adapters["default"].weight)
    assert torch.equal(fresh(token_ids()).logits, model(token_ids()).logits)
    assert fresh.model.norm.adapters["default"].weight.requires_grad and not fresh.model.norm.weight.requires_grad


def test_many_adapters_activate_sum_switch_and_delete(tmp_path):
    model, x = tiny_llama(), token_ids()
    base = model(x).logits
    for i, name in enumerate(["sql", "chat"]):
        lk.adapt(model, lk.LoRA(rank=2 + i), ["q_proj", "v_proj"], name=name)
        randomize(model, name, seed=30 + i)
    assert lk.adapter_names(model) == ["sql", "chat"] and lk.active_adapters(model) == ["chat"]
    outputs = {}
    for name in ["sql", "chat"]:
        lk.activate(model, name)
        outputs[name] = model(x).logits
        trainable = {n.split(".adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {name}
    assert not torch.allclose(outputs["sql"], outputs["chat"], atol=1e-3)
    lk.activate(model, ["sql", "chat"])
    both = model(x).logits
    lk.merge(model)
    torch.testing.assert_close(model(x).logits, both, atol=1e-5, rtol=1e-5)
    lk.delete(model, "chat")  # unmerges it, keeps "sql" merged
    torch.testing.assert_close(model(x).logits, outputs["sql"], atol=1e-5, rtol=1e-5)
    assert lk.adapter_names(model) == ["sql"]
    lk.unmerge(model)
    with lk.disabled(model):
        assert torch.equal(model(x).logits, base)


def test_load_several_adapters_under_names_and_route(tmp_path):
    model, x = tiny_llama(), token_ids(batch=3)
    for i, name in enumerate(["a", "b"]):
        lk.adapt(model, lk.LoRA(rank=4), "all-linear", name=name)
        randomize(model, name, seed=40 + i)
        lk.save(model, tmp_path / name, name=name)
    served = tiny_llama()
    lk.load(served, tmp_path / "a", name="sql")
    lk.load(served, tmp_path / "b", name="chat")
    with torch.no_grad(), lk.route(served, ["chat", "sql", None]), lk.route(model, ["b", "a", None]):
        torch.testing.assert_close(served(x).logits, model(x).logits, atol=0, rtol=0)


def test_route_sees_layers_and_adapters_added_or_removed_between_blocks(tmp_path):
    """Each ``lk.route`` block finds the model's adapted layers as they are now, not as a previous block saw them."""
    model, x = tiny_llama(), token_ids(batch=3)

    def assert_routed_rows_match_each_row_alone(names):
        with torch.no_grad():
            with lk.route(model, names):
                routed = model(x).logits
            for i, name in enumerate(names):
                if name is None:
                    with lk.disabled(model):
                        alone = model(x[i:i + 1]).logits
                else:
                    lk.activate(model, name)
                    alone = model(x[i:i + 1]).logits
                torch.testing.assert_close(routed[i:i + 1], alone, atol=1e-5, rtol=1e-5)

    lk.adapt(model, lk.LoRA(rank=2), ["q_proj"], name="a")
    randomize(model, "a", seed=50)
    assert_routed_rows_match_each_row_alone(["a", None, "a"])
    lk.adapt(model, lk.LoRA(rank=2), ["v_proj", "down_proj"], name="b")  # layers no block has seen yet
    randomize(model, "b", seed=51)
    assert_routed_rows_match_each_row_alone(["b", "a", None])
    lk.save(model, tmp_path, name="b")
    lk.load(model, tmp_path, name="c")
    assert_routed_rows_match_each_row_alone(["c", "b", "a"])
    lk.delete(model, "a")
    with pytest.raises(lk.AdapterNotFoundError, match="'a'"):
        with lk.route(model, ["a", None, "b"]):
            pass
    assert_routed_rows_match_each_row_alone([None, "c", "b"])
    model = lk.unload(model, merge=False)  # every adapted layer replaced by its original module
    with pytest.raises(lk.AdapterNotFoundError, match="'b'"):
        with lk.route(model, ["b", None, None]):
            pass
    lk.adapt(model, lk.LoRA(rank=2), ["k_proj"], name="d")
    randomize(model, "d", seed=52)
    assert_routed_rows_match_each_row_alone(["d", None, "d"])


@pytest.mark.parametrize("recipe", [lk.LoRA(rank=3), lk.DoRA(rank=2), lk.SVF()], ids=lambda r: r.name)
def test_route_takes_one_name_per_position_for_packed_sequences(recipe):
    """Linear and embedding layers route per position (rows × positions names): each position gets its own
    adapter's update, as if its row had been routed to that adapter (the layers here are position-wise)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16))
    targets = ["0", "1", "3"] if isinstance(recipe, lk.LoRA) and recipe.name == "lora" else ["1", "3"]
    for name in ("a", "b"):
        lk.adapt(model, recipe, targets, name=name)
        randomize(model, name, seed=len(name) + ord(name))
    model.eval()
    ids = torch.randint(0, 50, (2, 5))
    names = ["a", "b", None, "a", "a", None, "b", "b", "a", None]
    with torch.no_grad():
        with lk.route(model, names):
            packed = model(ids)
        for position, name in enumerate(names):
            row, column = divmod(position, 5)
            with lk.route(model, [name]):
                alone = model(ids[row:row + 1, column:column + 1])
            torch.testing.assert_close(packed[row, column], alone[0, 0], atol=1e-6, rtol=1e-5)
        with lk.disabled(model):
            assert not torch.allclose(packed, model(ids))
    lk.activate(model, ["a", "b"])  # with grad: the same outputs, and gradients reach both adapters
    with lk.route(model, names):
        trained = model(ids)
    torch.testing.assert_close(trained, packed)
    trained.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lk.trainable_parameters(model))
    with pytest.raises(lk.ConfigError, match="9 names for a batch of 2"):
        with lk.route(model, names[:-1]):
            model(ids)


def test_unload_without_merge_gives_back_the_base():
    reference, x = tiny_llama(), token_ids()
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=2), "all-linear")
    randomize(model)
    lk.merge(model)
    plain = lk.unload(model, merge=False)
    assert lk.adapter_names(plain) == [] and not hasattr(plain, "_lorakit_train")
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    assert torch.equal(plain(x).logits, reference(x).logits)


def test_lora_plus_groups_put_b_at_ratio_times_lr():
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=2), ["q_proj"], train=["model.norm"])
    slow, fast = lk.lora_plus_groups(model, lr=1e-4, ratio=16, weight_decay=0.01)
    assert slow["lr"] == 1e-4 and fast["lr"] == pytest.approx(1.6e-3) and fast["weight_decay"] == 0.01
    named = {id(p): n for n, p in model.named_parameters()}
    assert sorted(named[id(p)].rsplit(".", 1)[-1] for p in fast["params"]) == ["lora_B", "lora_B"]
    assert sorted(named[id(p)] for p in slow["params"])[-1] == "model.norm.adapters.default.weight"  # train=: base lr
    assert len(slow["params"]) == 3
    torch.optim.AdamW(lk.lora_plus_groups(model, lr=1e-4))
    with pytest.raises(lk.ConfigError):
        lk.lora_plus_groups(model, lr=1e-4, ratio=0)


@pytest.mark.parametrize("build, expected", [
    (tiny_llama, {"q_proj", "k_proj", "v_proj", "o_proj"}),
    (tiny_gpt2, {"c_attn", "c_proj"}),
    (tiny_bert, {"query", "key", "value", "dense"}),
])
def test_enable_lora_finds_the_attention_projections(build, expected):
    model = lk.enable_lora(build(), rank=4)
    paths = _adapted_paths(model)
    assert {p.rsplit(".", 1)[-1] for p in paths} == expected
    assert all("attn" in p or "attention" in p for p in paths) and not any("mlp" in p for p in paths)
    recipe = lk.model.adapted_layers(model)[0][1].recipes["default"]
    assert recipe == lk.LoRA(rank=4, alpha=4)


def test_summary_table_counts(capsys):
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=4), ["q_proj", "v_proj"], ranks={"v_proj": 2})
    text = lk.summary(model)
    assert capsys.readouterr().out.strip() == text
    total = sum(p.numel() for p in model.parameters())
    trainable = 2 * (4 * (32 + 32) + 2 * (32 + 16))
    assert f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)" in text
    assert "model.layers.1.self_attn.v_proj" in text and "Linear" in text
    assert [line.split()[3] for line in text.splitlines()[2:6]] == ["4", "2", "4", "2"]
    assert [line.split()[4] for line in text.splitlines()[2:6]] == ["256", "96", "256", "96"]  # r·(d_in + d_out)
    lk.adapt(model, lk.LoRA(rank=1), ["q_proj"], name="other")
    rows = [line.split() for line in lk.summary(model).splitlines()[2:-1]]
    assert [(row[2], row[4]) for row in rows if row[0].endswith("0.self_attn.q_proj")] == [
        ("default", "0"), ("other*", "64")]  # only the active adapter (*) trains


def test_training_moves_only_adapters_and_lowers_the_loss():
    model, x = tiny_llama(), token_ids(batch=4, length=12)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    lk.adapt(model, lk.LoRA(rank=4, alpha=8, dropout=0.05), "all-linear")
    model.train()
    optimizer = torch.optim.AdamW(lk.trainable_parameters(model), lr=2e-2)
    losses = []
    for _ in range(30):
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3  # ln(96) = 4.56 → ~4.06 (PEFT: ~4.03)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())


def test_half_precision_base_trains_float32_adapters():
    model = tiny_llama().to(torch.bfloat16)
    x = token_ids()
    base = model(x).logits
    lk.adapt(model, lk.LoRA(rank=4), ["q_proj", "v_proj"])
    assert model.model.layers[0].self_attn.q_proj.adapters["default"].lora_A.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert torch.equal(model(x).logits, base)
    randomize(model)
    model(x, labels=x).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.adapters["default"].lora_B.grad.dtype == torch.float32


def test_merge_on_a_half_precision_base_adds_a_float32_delta_and_unmerges_exactly():
    model = lk.adapt(tiny_llama().to(torch.bfloat16), lk.LoRA(rank=4, alpha=8), ["q_proj"])
    randomize(model)
    layer = model.model.layers[0].self_attn.q_proj
    adapter, weight = layer.adapters["default"], layer.weight.detach().clone()
    delta = adapter.scale * adapter.lora_B.detach() @ adapter.lora_A.detach()  # float32
    expected = (weight.float() + delta).to(torch.bfloat16)  # one rounding, at the end
    assert not torch.equal(expected, weight + delta.to(torch.bfloat16))  # a bf16 delta would round twice
    lk.merge(model)
    assert torch.equal(layer.weight, expected)
    lk.unmerge(model)
    assert torch.equal(layer.weight, weight)


def test_merge_refuses_a_weight_tied_to_another_module_and_changes_nothing():
    # An in-place merge into a tied embedding would change the output head too (SmolLM2, the default
    # model, ties them); lorakit finetune/eval/generate then evaluate unmerged.
    model = lk.adapt(tiny_llama(tie_word_embeddings=True), lk.LoRA(rank=4, alpha=8), ["embed_tokens", "q_proj"])
    randomize(model)
    with torch.no_grad():
        before = model(token_ids()).logits
        with pytest.raises(lk.MergeError, match="embed_tokens.*shared"):
            lk.merge(model)
        assert not any(layer.merged for _, layer in lk.model.adapted_layers(model))
        assert torch.equal(model(token_ids()).logits, before)
        untied = lk.adapt(tiny_llama(tie_word_embeddings=True), lk.LoRA(rank=4, alpha=8), ["q_proj"])
        randomize(untied)
        before = untied(token_ids()).logits
        torch.testing.assert_close(lk.merge(untied)(token_ids()).logits, before, rtol=1e-5, atol=1e-5)


def test_adapted_model_state_dict_round_trips_through_torch():
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=2), ["q_proj"])
    randomize(model)
    other = lk.adapt(tiny_llama(seed=9), lk.LoRA(rank=2), ["q_proj"])
    other.load_state_dict(model.state_dict())
    assert torch.equal(other(token_ids()).logits, model(token_ids()).logits)


def test_embedding_init_follows_peft():
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=4, dropout=0.5), ["embed_tokens"])
    adapter = model.model.embed_tokens.adapters["default"]
    assert torch.count_nonzero(adapter.lora_A) == 0 and adapter.dropout is None
    assert math.isclose(adapter.lora_B.std().item(), 1.0, rel_tol=0.2)
    assert model.model.embed_tokens.padding_idx == model.config.pad_token_id
