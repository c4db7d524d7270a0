"""lk.combine: each way of combining adapters does what its docstring promises."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from conftest import randomize, tiny_llama, tiny_unet, token_ids


def _deltas(model, name):
    return {path: layer.adapters[name].delta_weight() for path, layer in lk.model.adapted_layers(model)
            if name in layer.adapters}


def _two(method_a, method_b, targets=("q_proj", "v_proj", "embed_tokens")):
    model = tiny_llama()
    lk.adapt(model, method_a, list(targets), name="sql")
    lk.adapt(model, method_b, list(targets), name="chat")
    randomize(model)
    return model


FACTORED_PAIRS = {  # every method with low-rank factors; each pair's updates add up to rank 7
    "lora+rslora": (lk.LoRA(rank=3, alpha=6), lk.LoRA(rank=4, alpha=2, rslora=True),
                    ("q_proj", "v_proj", "embed_tokens")),
    "pissa+lora_xs": (lk.PiSSA(rank=2, alpha=4), lk.LoRAXS(rank=3, alpha=6), ("q_proj", "v_proj")),
    "milora+adalora": (lk.MiLoRA(rank=2), lk.AdaLoRA(init_rank=3, target_rank=1, total_steps=10), ("q_proj", "v_proj")),
}


@pytest.mark.parametrize("pair", FACTORED_PAIRS.values(), ids=FACTORED_PAIRS.keys())
@pytest.mark.parametrize("how, rank", [("linear", None), ("svd", 7)])
def test_linear_and_full_rank_svd_are_exact_sums(how, rank, pair):
    model = _two(*pair)
    lk.combine(model, {"sql": 0.7, "chat": -0.3}, name="mix", how=how, rank=rank)
    sql, chat, mix = _deltas(model, "sql"), _deltas(model, "chat"), _deltas(model, "mix")
    for path in mix:
        torch.testing.assert_close(mix[path], 0.7 * sql[path] - 0.3 * chat[path], atol=1e-5, rtol=1e-5)
    assert lk.active_adapters(model) == ["mix"]
    x = token_ids()
    out = model(x).logits
    lk.activate(model, ["sql", "chat"])  # sanity: the mix is not just one of them
    assert not torch.allclose(out, model(x).logits, atol=1e-4)


def test_svd_combines_any_method_and_truncation_is_the_best_approximation():
    model = _two(lk.DoRA(rank=3), lk.PiSSA(rank=2), targets=("q_proj", "v_proj"))
    lk.combine(model, {"sql": 1.0, "chat": 1.0}, name="full", how="svd", rank=32)
    lk.combine(model, {"sql": 1.0, "chat": 1.0}, name="low", how="svd", rank=2)
    for path, layer in lk.model.adapted_layers(model):
        total = layer.adapters["sql"].delta_weight() + layer.adapters["chat"].delta_weight()
        torch.testing.assert_close(layer.adapters["full"].delta_weight(), total, atol=1e-5, rtol=1e-4)
        S = torch.linalg.svdvals(total)
        error = (layer.adapters["low"].delta_weight() - total).norm()
        torch.testing.assert_close(error, S[2:].norm(), atol=1e-5, rtol=1e-4)  # Eckart–Young
        assert layer.recipes["low"] == lk.LoRA(rank=2, alpha=2.0)


def test_ties_trims_elects_and_averages():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    lk.adapt(model, lk.LoRA(rank=4, alpha=4), ["0"], name="a")
    lk.adapt(model, lk.LoRA(rank=4, alpha=4), ["0"], name="b")
    a = torch.tensor([[3.0, -1, 0.1, 0], [0, 2, 0, 0], [0, 0, -4, 0], [0.2, 0, 0, 1]])
    b = torch.tensor([[1.0, 2, 0, 0], [0, -5, 0, 0], [0, 0, -2, 0], [0, 0.3, 0, 1]])
    for name, delta in (("a", a), ("b", b)):
        adapter = model[0].adapters[name]
        with torch.no_grad():
            adapter.lora_A.copy_(torch.eye(4))
            adapter.lora_B.copy_(delta)
    lk.combine(model, {"a": 1.0, "b": 1.0}, name="ties", how="ties", density=0.375, rank=4)
    # Each keeps its 6 largest entries (a drops 0.1); signs are elected by the sum ((0,1): -1 + 2 > 0,
    # (1,1): 2 - 5 < 0); entries agreeing with the elected sign are averaged.
    expected = torch.tensor([[2.0, 2, 0, 0], [0, -5, 0, 0], [0, 0, -3, 0], [0.2, 0.3, 0, 1]])
    torch.testing.assert_close(model[0].adapters["ties"].delta_weight(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", [lk.SVF(), lk.SVFT(pattern="banded", width=1)], ids=["svf", "svft"])
def test_interpolating_spectral_experts_mixes_their_values(method):
    model = nn.Sequential(nn.Linear(6, 5))
    for i, name in enumerate(["math", "code"]):
        lk.adapt(model, method, ["0"], name=name)
        randomize(model, name, seed=i)
    lk.combine(model, {"math": 0.6, "code": 0.4}, name="mix", how="interpolate")
    adapters = model[0].adapters
    torch.testing.assert_close(adapters["mix"].values, 0.6 * adapters["math"].values + 0.4 * adapters["code"].values)
    torch.testing.assert_close(adapters["mix"].delta_weight(),
                               0.6 * adapters["math"].delta_weight() + 0.4 * adapters["code"].delta_weight(),
                               atol=1e-5, rtol=1e-5)


def test_combine_conv_and_save_the_result(tmp_path):
    model = tiny_unet()
    lk.adapt(model, lk.LoRA(rank=2), ["conv_in", "to_q"], name="a")
    lk.adapt(model, lk.LoRA(rank=3), ["conv_in", "to_q"], name="b")
    randomize(model)
    lk.combine(model, {"a": 0.5, "b": 0.5}, name="mix", how="svd", rank=5)
    x = torch.randn(2, 3, 8, 8)
    for path, layer in lk.model.adapted_layers(model):
        torch.testing.assert_close(layer.adapters["mix"].delta_weight(),
                                   0.5 * (layer.adapters["a"].delta_weight() + layer.adapters["b"].delta_weight()),
                                   atol=1e-5, rtol=1e-4)
    lk.save(model, tmp_path, name="mix")
    with torch.no_grad():
        torch.testing.assert_close(lk.load(tiny_unet(), tmp_path)(x), model(x), atol=1e-6, rtol=1e-6)


def test_combine_errors():
    model = _two(lk.DoRA(rank=2), lk.LoRA(rank=2), targets=("q_proj",))
    with pytest.raises(lk.ConfigError, match="how='svd'"):
        lk.combine(model, {"sql": 1.0, "chat": 1.0}, name="mix", how="linear")
    with pytest.raises(lk.ConfigError, match="how must be"):
        lk.combine(model, {"sql": 1.0}, name="mix", how="average")
    with pytest.raises(lk.AdapterNotFoundError, match="'math'"):
        lk.combine(model, {"math": 1.0}, name="mix")
    with pytest.raises(lk.AdapterExistsError):
        lk.combine(model, {"chat": 1.0}, name="sql")
    with pytest.raises(lk.ConfigError, match="SVF/SVFT"):
        lk.combine(model, {"chat": 1.0}, name="mix", how="interpolate")
    assert lk.adapter_names(model) == ["sql", "chat"]
