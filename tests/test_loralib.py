"""lorakit.loralib against the real loralib (0.1.2): same keys, shapes, init, outputs and selections."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit.loralib as ours
from lorakit.errors import ConfigError, MergeError

loralib = pytest.importorskip("loralib")

# name: (build(lib) -> layer, input)
CASES = {
    "linear": (lambda L: L.Linear(6, 5, r=2, lora_alpha=4), lambda: torch.randn(3, 4, 6)),
    "linear_fan_in_fan_out_no_bias": (lambda L: L.Linear(6, 5, r=2, lora_alpha=3, fan_in_fan_out=True, bias=False),
                                      lambda: torch.randn(3, 6)),
    "embedding": (lambda L: L.Embedding(10, 6, r=3, lora_alpha=6, padding_idx=0),
                  lambda: torch.randint(0, 10, (3, 4))),
    "conv2d": (lambda L: L.Conv2d(3, 4, 3, r=2, lora_alpha=4, padding=1), lambda: torch.randn(2, 3, 7, 7)),
    "conv2d_stride_groups": (lambda L: L.Conv2d(4, 6, 3, r=2, lora_alpha=2, stride=2, padding=1, groups=2),
                             lambda: torch.randn(2, 4, 8, 8)),
    "conv1d_k1": (lambda L: L.Conv1d(3, 4, 1, r=2, lora_alpha=4), lambda: torch.randn(2, 3, 9)),
    "conv3d_k1": (lambda L: L.Conv3d(3, 4, 1, r=2, lora_alpha=4), lambda: torch.randn(2, 3, 3, 4, 5)),
    "merged_linear": (lambda L: L.MergedLinear(6, 9, r=2, lora_alpha=4, enable_lora=[True, False, True]),
                      lambda: torch.randn(3, 4, 6)),
    "merged_linear_fan_in_fan_out": (lambda L: L.MergedLinear(6, 9, r=2, lora_alpha=4, fan_in_fan_out=True,
                                                              enable_lora=[True, False, True]),
                                     lambda: torch.randn(5, 6)),
}


def build(case: str, lib, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return CASES[case][0](lib)


def inputs(case: str) -> torch.Tensor:
    torch.manual_seed(123)
    return CASES[case][1]()


@torch.no_grad()
def randomize(layer: nn.Module, seed: int = 7, std: float = 1.0) -> nn.Module:
    """Non-zero LoRA factors (B starts at 0, and A too for embeddings), so the update is visible."""
    torch.manual_seed(seed)
    for name, param in layer.named_parameters():
        if "lora_" in name:
            param.normal_(std=std)
    return layer


def lora_weight(layer: nn.Module) -> torch.Tensor:
    return layer.conv.weight if hasattr(layer, "conv") else layer.weight


@pytest.mark.parametrize("case", CASES)
def test_same_keys_shapes_and_seeded_init_as_loralib(case):
    theirs, mine = build(case, loralib).state_dict(), build(case, ours).state_dict()
    assert list(mine) == list(theirs)
    assert {k for k in mine if "lora_" in k}, "the case must have LoRA factors"
    for key in theirs:
        assert mine[key].shape == theirs[key].shape, key
        # Same RNG draws in the same order: a seed gives loralib's initial values.
        assert torch.equal(mine[key], theirs[key]), key


@pytest.mark.parametrize("case", CASES)
def test_loralib_checkpoint_gives_same_outputs_merged_and_not(case):
    ref = randomize(build(case, loralib))
    layer = build(case, ours, seed=1)
    layer.load_state_dict(ref.state_dict())
    loaded = lora_weight(layer).detach().clone()
    x = inputs(case)
    with torch.no_grad():
        out_train = layer(x)
        torch.testing.assert_close(out_train, ref(x), atol=1e-5, rtol=1e-5)
        ref.eval()
        layer.eval()
        assert layer.merged and ref.merged
        torch.testing.assert_close(lora_weight(layer), lora_weight(ref), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(lora_weight(layer), loaded)
        torch.testing.assert_close(layer(x), ref(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x), out_train, atol=1e-5, rtol=1e-5)
    layer.train()
    assert not layer.merged and torch.equal(lora_weight(layer), loaded)


@pytest.mark.parametrize("case", CASES)
def test_our_checkpoint_loads_into_loralib_even_when_saved_merged(case):
    layer = randomize(build(case, ours)).eval()
    state = layer.state_dict()
    ref = build(case, loralib, seed=1)
    ref.load_state_dict(state)  # loralib in train mode: it must get the unmerged weight
    x = inputs(case)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), layer(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(state[next(k for k in state if k.endswith("weight"))], layer.original_weight)


@pytest.mark.parametrize("case", CASES)
def test_eval_train_cycles_restore_the_weight_bit_exactly(case):
    layer = randomize(build(case, ours), std=3.0)
    before = lora_weight(layer).detach().clone()
    for _ in range(3):
        layer.eval()
        assert not torch.equal(lora_weight(layer), before)
        layer.train()
        assert torch.equal(lora_weight(layer), before)


def test_loralib_subtracting_is_not_exact_so_the_round_trip_test_has_teeth():
    ref = randomize(build("linear", loralib), std=3.0)
    before = ref.weight.detach().clone()
    ref.eval()
    ref.train()
    assert not torch.equal(ref.weight, before)


@pytest.mark.parametrize("case", ["linear", "merged_linear"])
def test_dropout_draws_the_same_mask_as_loralib(case):
    def make(lib):
        torch.manual_seed(0)
        if case == "linear":
            return lib.Linear(6, 5, r=2, lora_alpha=4, lora_dropout=0.5)
        return lib.MergedLinear(6, 9, r=2, lora_alpha=4, lora_dropout=0.5, enable_lora=[True, False, True])

    ref, layer = randomize(make(loralib)), make(ours)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 6)
    torch.manual_seed(5)
    expected = ref(x)
    torch.manual_seed(5)
    got = layer(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.manual_seed(6)
    assert not torch.allclose(layer(x), got)  # dropout is live in train mode
    ref.eval()  # loralib's train()/eval() return None
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), ref(x), atol=1e-5, rtol=1e-5)


def test_conv_applies_lora_dropout_which_loralib_ignores():
    ref = randomize(loralib.Conv2d(3, 4, 3, r=2, lora_alpha=4, lora_dropout=0.5, padding=1))
    layer = ours.Conv2d(3, 4, 3, r=2, lora_alpha=4, lora_dropout=0.5, padding=1)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert not torch.allclose(layer(x), ref(x), atol=1e-3)
        layer.lora_dropout.eval()  # dropout off, still unmerged: the two agree again
        torch.testing.assert_close(layer(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv, x", [
    (lambda: ours.Conv1d(3, 4, 3, r=2, lora_alpha=4, padding=1), torch.randn(2, 3, 9)),
    (lambda: ours.Conv3d(2, 4, 3, r=2, lora_alpha=4, padding=1, groups=2), torch.randn(1, 2, 4, 5, 6)),
])
def test_conv1d_and_conv3d_work_for_any_kernel_size(conv, x):
    layer = randomize(conv())
    k, spatial = layer.conv.kernel_size[0], layer.conv.weight.dim() - 2
    assert layer.lora_A.shape == (2 * k, layer.conv.in_channels * k ** (spatial - 1))
    assert layer.lora_B.shape == (layer.conv.out_channels // layer.conv.groups * k, 2 * k)
    with torch.no_grad():
        unmerged = layer(x)
        assert not torch.allclose(unmerged, layer.conv(x), atol=1e-3)
        torch.testing.assert_close(layer.eval()(x), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make, x", [
    (lambda L: L.Linear(6, 5), torch.randn(2, 6)),
    (lambda L: L.Embedding(10, 6), torch.randint(0, 10, (2, 3))),
    (lambda L: L.Conv2d(3, 4, 3), torch.randn(1, 3, 5, 5)),
    (lambda L: L.MergedLinear(6, 9, enable_lora=[True, False, True]), torch.randn(2, 6)),
    (lambda L: L.MergedLinear(6, 9, r=2, enable_lora=[False, False, False]), torch.randn(2, 6)),
])
def test_r0_or_nothing_enabled_is_a_plain_trainable_layer(make, x):
    torch.manual_seed(0)
    ref = make(loralib)
    torch.manual_seed(0)
    layer = make(ours)
    assert list(layer.state_dict()) == list(ref.state_dict())
    assert not any("lora_" in name for name, _ in layer.named_parameters())
    assert all(p.requires_grad for p in layer.parameters())
    with torch.no_grad():
        before = layer(x)
        if not isinstance(layer, ours.MergedLinear):  # loralib's crashes when r > 0 and nothing is enabled
            torch.testing.assert_close(before, ref(x))
        assert torch.equal(layer.eval()(x), before)
    with pytest.raises(AttributeError):
        layer.scaling


def test_loading_lora_factors_into_an_eval_model_merges_them():
    def make(lib):
        torch.manual_seed(0)
        return nn.Sequential(lib.Conv2d(3, 4, 3, r=2, lora_alpha=4, padding=1), nn.Flatten(1),
                             lib.Linear(4 * 25, 5, r=2, lora_alpha=4))

    trained = make(loralib)
    randomize(trained)
    model = make(ours).eval()  # merged, with B = 0
    model.load_state_dict(loralib.lora_state_dict(trained), strict=False)
    assert all(m.merged for m in model if isinstance(m, ours.LoRALayer))
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained.eval()(x), atol=1e-5, rtol=1e-5)
        model.train()
        torch.testing.assert_close(model(x), trained.train()(x), atol=1e-5, rtol=1e-5)


def mixed_model(lib, with_deviations: bool = False) -> nn.ModuleDict:
    torch.manual_seed(0)
    layers = {
        "emb": lib.Embedding(10, 6, r=2, lora_alpha=4),
        "qkv": lib.MergedLinear(6, 9, r=2, lora_alpha=4, enable_lora=[True, False, True]),
        "proj": lib.Linear(9, 6, r=2, lora_alpha=4),
        "norm": nn.LayerNorm(6),
        "head": nn.Linear(6, 4),
    }
    if with_deviations:
        layers["plain"] = lib.Linear(6, 6)  # r = 0
        layers["conv"] = lib.Conv2d(1, 1, 1, r=1)
    return nn.ModuleDict(layers)


def run(model: nn.ModuleDict, ids: torch.Tensor) -> torch.Tensor:
    h = model["emb"](ids)
    h = model["norm"](model["proj"](model["qkv"](h)))
    if "plain" in model:
        h = model["plain"](h)
        h = model["conv"](h.unsqueeze(1)).squeeze(1)
    return model["head"](h)


def trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_selections_match_loralib_for_every_bias_mode(bias):
    ref, model = mixed_model(loralib), mixed_model(ours)
    expected = set(loralib.lora_state_dict(ref, bias=bias))
    assert set(ours.lora_state_dict(model, bias=bias)) == expected
    assert {k for k in expected if "bias" in k} or bias == "none"
    loralib.mark_only_lora_as_trainable(ref, bias=bias)
    ours.mark_only_lora_as_trainable(model, bias=bias)
    assert trainable(model) == trainable(ref)
    assert trainable(model) != {name for name, _ in model.named_parameters()}


def test_lora_only_bias_is_that_of_layers_with_factors():
    # loralib trains an r = 0 layer's bias but never saves it, and skips ConvLoRA's bias (it sits at
    # conv.bias); here both functions agree on "the bias of every layer that has LoRA factors".
    ref, model = mixed_model(loralib, True), mixed_model(ours, True)
    saved = set(ours.lora_state_dict(model, bias="lora_only"))
    assert saved == set(loralib.lora_state_dict(ref, bias="lora_only")) | {"conv.conv.bias"}
    loralib.mark_only_lora_as_trainable(ref, bias="lora_only")
    ours.mark_only_lora_as_trainable(model, bias="lora_only")
    assert trainable(model) == (trainable(ref) - {"plain.bias"}) | {"conv.conv.bias"}
    assert trainable(model) == saved


@pytest.mark.parametrize("bias", ["none", "all"])
def test_gradients_reach_only_the_selected_parameters(bias):
    model = mixed_model(ours, True)
    ours.mark_only_lora_as_trainable(model, bias=bias)
    run(model, torch.randint(0, 10, (2, 3))).square().sum().backward()
    got = {name for name, p in model.named_parameters() if p.grad is not None}
    factors = {name for name, _ in model.named_parameters() if name.rpartition(".")[2].startswith("lora_")}
    assert len(factors) == 8
    biases = {name for name, _ in model.named_parameters() if name.endswith("bias")} if bias == "all" else set()
    assert got == factors | biases
    # B gets a gradient through A·x (embedding: A starts at 0, so A gets it through B instead).
    for name in ("emb.lora_A", "qkv.lora_B", "proj.lora_B", "conv.lora_B"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_model_eval_and_train_merge_and_restore_every_layer():
    model = mixed_model(ours)
    for layer in ("emb", "qkv", "proj"):
        randomize(model[layer])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 10, (2, 3))
    with torch.no_grad():
        unmerged = run(model, ids)
        model.eval()
        assert all(model[n].merged for n in ("emb", "qkv", "proj"))
        torch.testing.assert_close(run(model, ids), unmerged, atol=1e-5, rtol=1e-5)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # unmerged on disk
        model.train()
    assert all(torch.equal(p, before[k]) for k, p in model.state_dict().items())


def test_assigned_loads_copies_and_scaling_reach_the_math():
    ref = randomize(build("linear", loralib))
    layer = build("linear", ours, seed=1)
    layer.load_state_dict(ref.state_dict(), assign=True)  # replaces the parameter objects
    x = inputs("linear")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x), atol=1e-5, rtol=1e-5)
        twin = copy.deepcopy(layer)
        twin.lora_B.zero_()
        torch.testing.assert_close(twin(x), nn.functional.linear(x, layer.weight, layer.bias))
        torch.testing.assert_close(layer(x), ref(x), atol=1e-5, rtol=1e-5)
        layer.scaling = ref.scaling = 0.5
        torch.testing.assert_close(layer(x), ref(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(layer(x), twin(x), atol=1e-3)


def test_non_finite_update_is_not_merged():
    layer = randomize(build("linear", ours))
    before = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    with pytest.raises(MergeError, match="NaN/Inf"):
        layer.eval()
    assert not layer.merged and torch.equal(layer.weight, before)


@pytest.mark.parametrize("make, message", [
    (lambda: ours.Linear(4, 4, r=-1), "r must be an int >= 0"),
    (lambda: ours.Linear(4, 4, r=2.0), "r must be an int"),
    (lambda: ours.Linear(4, 4, r=2, lora_dropout=1.0), r"dropout must be in \[0, 1\)"),
    (lambda: ours.Linear(4, 4, r=2, lora_dropout=-0.1), "dropout"),
    (lambda: ours.Embedding(4, 4, r=-2), "r must be"),
    (lambda: ours.Conv2d(3, 4, 3, r=2, lora_dropout=1.5), "dropout"),
    (lambda: ours.Conv2d(3, 4, (3, 3), r=2), "int kernel_size"),
    (lambda: ours.MergedLinear(6, 9, r=2, enable_lora=[True, False]), "divide out_features=9"),
    (lambda: ours.MergedLinear(6, 9, r=2, enable_lora=[]), "enable_lora"),
])
def test_bad_layer_arguments(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize("fn", [ours.mark_only_lora_as_trainable, ours.lora_state_dict])
def test_bad_bias_mode_changes_nothing(fn):
    model = mixed_model(ours)
    before = trainable(model)
    with pytest.raises(ConfigError, match="bias must be one of"):
        fn(model, bias="lora")
    assert trainable(model) == before
