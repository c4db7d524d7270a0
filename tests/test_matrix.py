"""The shared matrix: every layer type × the invariants every adapter must keep."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import lorakit as lk
from conftest import VOCAB, randomize, tiny_gpt2, tiny_unet
from lorakit import registry
from lorakit.methods.base import LayerSpec


def _gpt2_conv1d_net():
    from transformers.pytorch_utils import Conv1D

    return nn.Sequential(Conv1D(12, 6), nn.Tanh(), Conv1D(5, 12))


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]  # called under a fixed seed
    targets: object
    inputs: Callable[[], torch.Tensor]


def _floats(*shape):
    return lambda: torch.randn(*shape, generator=torch.Generator().manual_seed(3))


CASES = {
    "linear": Case(lambda: nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5)), ["0", "2"], _floats(3, 4, 6)),
    "linear-nobias": Case(lambda: nn.Sequential(nn.Linear(6, 5, bias=False)), r"0", _floats(3, 6)),
    "gpt2-conv1d": Case(_gpt2_conv1d_net, ["0", "2"], _floats(3, 4, 6)),
    "conv2d": Case(lambda: nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2), nn.Tanh(),
                                         nn.Conv2d(6, 4, (1, 3), padding="same", padding_mode="reflect")),
                   ["0", "2"], _floats(3, 3, 9, 9)),
    "conv1d": Case(lambda: nn.Sequential(nn.Conv1d(3, 6, 5, padding=2, padding_mode="circular")), ["0"],
                   _floats(3, 3, 11)),
    "embedding": Case(lambda: nn.Sequential(nn.Embedding(VOCAB, 8, padding_idx=0), nn.Linear(8, 4)), ["0"],
                      lambda: torch.tensor([[0, 5, 9], [3, 3, 1], [7, 0, 2]])),
}


METHODS = {
    "lora": lk.LoRA(rank=4, alpha=8, dropout=0.1),
    "rslora": lk.LoRA(rank=4, alpha=8, rslora=True),
    "dora": lk.DoRA(rank=4, alpha=8, dropout=0.1),
    "pissa": lk.PiSSA(rank=3, alpha=6),
    "pissa-niter": lk.PiSSA(rank=2, niter=4),
    "milora": lk.MiLoRA(rank=2, dropout=0.1),
    "lora_xs": lk.LoRAXS(rank=3, alpha=6),
    "svf": lk.SVF(dropout=0.1),
    "svft-plain": lk.SVFT(),
    "svft-banded": lk.SVFT(pattern="banded", width=1),
    "svft-random": lk.SVFT(pattern="random", width=2),
    "svft-top_k": lk.SVFT(pattern="top_k", width=1),
    "adalora": lk.AdaLoRA(init_rank=4, target_rank=2, total_steps=10, dropout=0.1),
}
# Settings that fit the matrix's small layers, for methods registered without a case of their own above.
SMALL = {"rank": 2, "init_rank": 3, "target_rank": 2, "total_steps": 10}
for _name in registry.names():
    if not any(type(m) is registry.entry(_name).recipe for m in METHODS.values()):
        _fields = {f.name for f in dataclasses.fields(registry.entry(_name).recipe)}
        METHODS[_name] = registry.create(_name, **{k: v for k, v in SMALL.items() if k in _fields})


def _adapts_convs(method) -> bool:
    """Whether ``method`` builds on a conv layer (methods on a 2-D weight's SVD refuse other kinds)."""
    spec = LayerSpec(layout="conv", d_in=4, d_out=4, device=torch.device("meta"), dtype=torch.float32,
                     kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    try:
        method.build(spec)
    except lk.UnsupportedLayerError:
        return False
    return True


LINEAR_ONLY = tuple(key for key, method in METHODS.items() if not _adapts_convs(method))


def _model(case) -> nn.Module:
    torch.manual_seed(0)
    return case.layer.build().eval()


def _adapted(case, names=("default",), **changes) -> nn.Module:
    model = _model(case)
    for i, name in enumerate(names):
        lk.adapt(model, dataclasses.replace(case.method, **changes), case.layer.targets, name=name)
        randomize(model, name, seed=10 + i)
    return model


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` departs from ``b`` by more than 1% of ``b``'s scale (far beyond rounding)."""
    return bool((a - b).abs().max() > 1e-2 * b.abs().max())


@dataclass(frozen=True)
class MatrixCase:
    method: object
    layer: Case

    def inputs(self):
        return self.layer.inputs()


MATRIX = {f"{m}-{c}": MatrixCase(METHODS[m], CASES[c]) for m in METHODS for c in CASES
          if m not in LINEAR_ONLY or c in ("linear", "linear-nobias", "gpt2-conv1d")}
matrix = pytest.mark.parametrize("case", MATRIX.values(), ids=MATRIX.keys())


@matrix
def test_init_is_exactly_the_base(case):
    x = case.inputs()
    base = _model(case).requires_grad_(False)(x)
    model = lk.adapt(_model(case), case.method, case.layer.targets)
    assert torch.equal(model(x), base)


@matrix
def test_base_state_dict_keys_and_values_unchanged(case):
    base = _model(case).state_dict()
    adapted = _adapted(case).state_dict()
    assert {k: v for k, v in adapted.items() if ".adapters." not in k}.keys() == base.keys()
    assert all(torch.equal(adapted[k], v) for k, v in base.items())


@matrix
def test_merge_matches_unmerged_and_unmerge_is_exact(case):
    model, x = _adapted(case), case.inputs()
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = model(x)
        assert _differs(unmerged, _model(case)(x))  # the update is real
        lk.merge(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
        lk.merge(model)  # idempotent
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
        lk.unmerge(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in originals.items())
    assert torch.equal(model(x), unmerged)


@matrix
def test_save_load_round_trip(case, tmp_path):
    model, x = _adapted(case), case.inputs()
    lk.save(model, tmp_path / "a")
    fresh = lk.load(_model(case), tmp_path / "a")
    assert torch.equal(fresh(x), model(x))


@matrix
def test_only_adapter_parameters_get_gradients(case):
    model, x = _adapted(case), case.inputs()
    model.train()
    model(x).float().pow(2).sum().backward()
    for path, p in model.named_parameters():
        if ".adapters." in path:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, path
        else:
            assert not p.requires_grad and p.grad is None, path
    assert {id(p) for p in lk.trainable_parameters(model)} == {
        id(p) for n, p in model.named_parameters() if ".adapters." in n}


@matrix
def test_disabled_is_exactly_the_base_merged_or_not(case):
    model, x = _adapted(case), case.inputs()
    base = _model(case)(x)
    with lk.disabled(model):
        assert torch.equal(model(x), base)
    lk.merge(model)
    with lk.disabled(model):
        assert torch.equal(model(x), base)
    assert _differs(model(x), base)


@matrix
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_route_matches_each_row_alone(case, grad):
    model, x = _adapted(case, names=("a", "b")), case.inputs()
    names = ["b", None, "a"]
    with torch.set_grad_enabled(grad), lk.route(model, names):
        routed = model(x)
    for i, name in enumerate(names):
        with torch.no_grad():
            if name is None:
                with lk.disabled(model):
                    expected = model(x[i:i + 1])
            else:
                lk.activate(model, name)
                expected = model(x[i:i + 1])
        torch.testing.assert_close(routed[i:i + 1].detach(), expected, atol=1e-5, rtol=1e-5)


@matrix
def test_route_with_different_ranks_and_stacked_cache(case):
    model = _model(case)
    fields = {f.name for f in dataclasses.fields(case.method)}  # methods without a rank: two adapters of one size

    def sized(rank):
        return dataclasses.replace(case.method, **{k: v for k, v in dict(rank=rank, alpha=4).items() if k in fields})

    lk.adapt(model, sized(1), case.layer.targets, name="small")
    lk.adapt(model, sized(3), case.layer.targets, name="big")
    randomize(model)
    x = case.inputs()
    with torch.no_grad():
        with lk.route(model, ["big", "small", "big"]):
            first, second = model(x), model(x)  # the second call reuses the stacked factors
        lk.activate(model, "small")
        small = model(x[1:2])
    assert torch.equal(first, second)
    torch.testing.assert_close(first[1:2], small, atol=1e-5, rtol=1e-5)


@matrix
def test_route_cache_sees_every_change_between_blocks(case):
    """Stacks kept across ``lk.route`` blocks must never serve stale factors."""
    model, x = _adapted(case, names=("a", "b")), case.inputs()
    names = ["a", "b", None]

    def routed_equals_each_row_alone():
        with torch.no_grad():
            with lk.route(model, names):
                routed = model(x)
            for i, name in enumerate(names):
                if name is None:
                    with lk.disabled(model):
                        alone = model(x[i:i + 1])
                else:
                    lk.activate(model, name)
                    alone = model(x[i:i + 1])
                torch.testing.assert_close(routed[i:i + 1], alone, atol=1e-5, rtol=1e-5)
        return routed

    first = routed_equals_each_row_alone()
    randomize(model, "a", seed=30)  # in place, as an optimizer step
    assert _differs(routed_equals_each_row_alone()[:1], first[:1])
    lk.adapt(model, case.method, case.layer.targets, name="c")
    randomize(model, "c", seed=31)
    names[2] = "c"
    routed_equals_each_row_alone()
    lk.delete(model, "b")
    names[1] = None
    routed_equals_each_row_alone()
    with torch.no_grad():  # a tensor swapped behind the module's back, as a load may do
        for _, layer in lk.model.adapted_layers(model):
            for p in layer.adapters["a"].parameters():
                p.data = p.data * 2
    routed_equals_each_row_alone()


@matrix
def test_unload_gives_original_classes(case):
    model, x = _adapted(case), case.inputs()
    with torch.no_grad():
        expected = model(x)
        plain = lk.unload(model)
    reference = _model(case)
    assert [type(m) for m in plain.modules()] == [type(m) for m in reference.modules()]
    assert plain.state_dict().keys() == reference.state_dict().keys()
    torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_is_transposed_without_being_told():
    model, ids = tiny_gpt2(), torch.randint(0, VOCAB, (2, 5))
    lk.adapt(model, lk.LoRA(rank=4), ["c_attn"])
    layer = model.transformer.h[0].attn.c_attn
    adapter = layer.adapters["default"]
    assert adapter.lora_A.shape == (4, 32) and adapter.lora_B.shape == (96, 4)  # (r, d_in), (d_out, r)
    randomize(model)
    with torch.no_grad():
        before = model(ids).logits
        lk.merge(model)
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)


def test_diffusers_style_conv_net():
    model, x = tiny_unet(), torch.randn(2, 3, 8, 8)
    base = model.requires_grad_(False)(x)  # frozen, as adapt leaves it: torch picks other kernels otherwise
    lk.adapt(model, lk.LoRA(rank=2, alpha=2), r"(conv_in|down|mid|conv_out|to_[qkv])")
    assert torch.equal(model(x), base)
    randomize(model)
    with torch.no_grad():
        out = model(x)
        lk.merge(model)
        torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)


def test_grouped_conv_trains_and_routes_but_refuses_to_merge(tmp_path):
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, padding=1)).eval(), torch.randn(2, 4, 5, 5)
    base = model(x)
    with pytest.raises(lk.ConfigError, match="divisible"):
        lk.adapt(model, lk.LoRA(rank=3), ["0"])
    lk.adapt(model, lk.LoRA(rank=4), ["0"])
    assert torch.equal(model(x), base)
    randomize(model)
    out = model(x)
    lk.save(model, tmp_path)
    torch.manual_seed(0)
    assert torch.equal(lk.load(nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, padding=1)), tmp_path)(x), out)
    weight = model[0].weight.clone()
    with pytest.raises(lk.MergeError, match="groups"):
        lk.merge(model)
    assert torch.equal(model[0].weight, weight) and model[0].merged == []


# Methods with few trainable parameters take larger steps, as in their papers.
LEARNING_RATES = {"lora_xs": 0.2, "svf": 0.2, "adalora": 0.1, "svft-plain": 0.05, "svft-banded": 0.05,
                  "svft-random": 0.05, "svft-top_k": 0.05}


@pytest.mark.parametrize("key", METHODS)
def test_every_method_learns(key):
    """20 steps on a counting task a random base cannot do: the loss must fall for every method."""
    from conftest import tiny_llama

    method = METHODS[key]
    if "dropout" in {f.name for f in dataclasses.fields(method)}:
        method = dataclasses.replace(method, dropout=0.0)
    model = lk.adapt(tiny_llama(), method, "all-linear")
    data = (torch.randint(0, VOCAB, (8, 1), generator=torch.Generator().manual_seed(0)) + torch.arange(12)) % VOCAB
    optimizer = torch.optim.AdamW(lk.trainable_parameters(model), lr=LEARNING_RATES.get(key, 1e-2))
    lk.track(model, optimizer)
    model.train()
    losses = []
    for _ in range(20):
        loss = model(input_ids=data, labels=data).loss
        (loss + lk.regularization(model)).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
