"""An adapted model is a normal nn.Module: casts and moves, copies, pickles, state dicts, torch.compile,
gradient checkpointing and the meta device, for every method and layer type of the shared matrix."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn

import lorakit as lk
from conftest import randomize, tiny_llama, token_ids
from test_matrix import MATRIX, METHODS, _adapted, _differs, _model, matrix

HALF = (torch.float16, torch.bfloat16)


def _inputs(case, dtype=torch.float32):
    x = case.inputs()
    return x.to(dtype) if x.is_floating_point() else x


def _adapter_tensors(model):
    return [(f"{path}.{n}", t) for path, layer in lk.model.adapted_layers(model)
            for n, t in [*layer.adapters.named_parameters(), *layer.adapters.named_buffers()]]


def _base_tensors(model):
    return [(n, t) for n, t in model.state_dict(keep_vars=True).items() if ".adapters." not in n]


def _same_adapters(target, source):
    """Copy every adapter tensor of ``source`` (persistent or not) into ``target``."""
    with torch.no_grad():
        for (n, t), (m, s) in zip(_adapter_tensors(target), _adapter_tensors(source)):
            assert n == m
            t.copy_(s)


@matrix
@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
def test_16_bit_cast_keeps_adapters_float32_and_equals_cast_then_adapt(case, dtype):
    model = _adapted(case)
    getattr(model, {torch.float16: "half", torch.bfloat16: "bfloat16"}[dtype])()
    assert all(t.dtype == dtype for _, t in _base_tensors(model) if t.is_floating_point())
    assert all(t.dtype == torch.float32 for _, t in _adapter_tensors(model) if t.is_floating_point())
    # The policy makes the order of adapt and cast irrelevant: a 16-bit base adapted afresh computes the same.
    reference = lk.adapt(_model(case).to(dtype), case.method, case.layer.targets)
    _same_adapters(reference, model)
    x = _inputs(case, dtype)
    with torch.no_grad():
        out = model(x)
        assert out.dtype == dtype and torch.equal(out, reference(x))
        assert _differs(out.float(), _model(case).to(dtype)(x).float())  # the adapters still act


@matrix
def test_double_and_back_follows_the_base(case):
    model, x = _adapted(case), case.inputs()
    with torch.no_grad():
        expected = model(x)
        model.double()
        assert all(t.dtype == torch.float64 for _, t in [*_adapter_tensors(model), *_base_tensors(model)]
                   if t.is_floating_point())
        torch.testing.assert_close(model(_inputs(case, torch.float64)).float(), expected, atol=1e-5, rtol=1e-5)
        model.float()
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


@matrix
def test_merged_model_casts_and_unmerges_to_the_cast_base(case):
    model = _adapted(case)
    lk.merge(model)
    model.to(torch.bfloat16)
    lk.unmerge(model)
    base = _model(case).to(torch.bfloat16).state_dict()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())


@matrix
def test_to_device_moves_everything_and_drops_caches(case):
    """The meta device stands in for a GPU here: every tensor, cached stack and spec must follow."""
    model, x = _adapted(case, names=("a", "b")), case.inputs()
    with torch.no_grad(), lk.route(model, ["a", "b", None]):
        model(x)  # fills the routing caches
    model.to("meta")
    assert all(t.is_meta for _, t in [*_adapter_tensors(model), *_base_tensors(model)])
    for _, layer in lk.model.adapted_layers(model):
        assert layer.routing.stacks is None and layer.routing.plan is None
        assert all(m.spec.device.type == "meta" for m in layer.adapters.modules() if hasattr(m, "spec"))
        assert layer.base_weight().is_meta


def _round_trips(model):
    buffer = io.BytesIO()
    # weights_only=False on purpose: the contract is torch.save/torch.load of a whole model, and this
    # buffer is the model this test just saved, never a file from elsewhere (lorakit's loaders never unpickle).
    torch.save(model, buffer)
    buffer.seek(0)
    return {"deepcopy": copy.deepcopy(model), "pickle": pickle.loads(pickle.dumps(model)),
            "torch.save": torch.load(buffer, weights_only=False)}


@matrix
def test_deepcopy_pickle_and_torch_save_round_trip(case, tmp_path):
    model, x = _adapted(case, names=("a", "b")), case.inputs()
    with torch.no_grad(), lk.route(model, ["b", None, "a"]):
        routed = model(x)  # a copy must not share these caches
    expected = model(x)
    for how, copied in _round_trips(model).items():
        assert torch.equal(copied(x), expected), how
        with torch.no_grad(), lk.route(copied, ["b", None, "a"]):
            assert torch.equal(copied(x), routed), how
        randomize(copied, "b", seed=40)  # its own tensors: the original must not move
        assert torch.equal(model(x), expected), how
        lk.merge(copied)
        lk.unmerge(copied)
        lk.save(copied, tmp_path / how, name="b")
        assert torch.equal(lk.load(_model(case), tmp_path / how)(x), copied(x)), how


@matrix
def test_state_dict_round_trip_into_another_adapted_model(case):
    model, x = _adapted(case), case.inputs()
    other = _model(case)
    lk.adapt(other, case.method, case.layer.targets)
    randomize(other, seed=50)
    assert _differs(other(x), model(x))
    other.load_state_dict(model.state_dict())
    if not any(True for m in other.modules() for _ in getattr(m, "_non_persistent_buffers_set", ())):
        assert torch.equal(other(x), model(x))
    else:  # a basis recomputed from the base (SVF, SVFT) is no state: it is the same base here
        torch.testing.assert_close(other(x), model(x), atol=1e-6, rtol=1e-6)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _backward(model, x, run=None):
    model.zero_grad()
    torch.manual_seed(7)  # the same dropout masks on each side
    out = (model if run is None else run)(x)
    out.float().pow(2).sum().backward()
    return out.detach(), _grads(model)


def _compiled_equals_eager(model, x, backend: str) -> None:
    """Whole-graph compiled forward and backward (no graph break) equal eager ones."""
    torch._dynamo.reset()  # each case is a new model: its recompiles must not count against the next's
    model.train()
    out, grads = _backward(model, x)
    compiled_out, compiled_grads = _backward(model, x, torch.compile(model, backend=backend, fullgraph=True))
    torch.testing.assert_close(compiled_out, out, atol=1e-5, rtol=1e-5)
    assert compiled_grads.keys() == grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(compiled_grads[n], grads[n], atol=1e-5, rtol=1e-5)


@matrix
def test_torch_compile_forward_and_backward(case):
    """Dynamo and AOT autograd (the aot_eager backend: no code generation, seconds instead of minutes)."""
    _compiled_equals_eager(_adapted(case), case.inputs(), "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("method", [lk.LoRA(rank=4, alpha=8), lk.DoRA(rank=4, alpha=8)], ids=["lora", "dora"])
def test_torch_compile_inductor_on_a_transformer(method):
    model = lk.adapt(tiny_llama(), method, "all-linear")
    randomize(model)

    class Logits(nn.Module):  # a tensor out, for _backward
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(input_ids=ids).logits

    _compiled_equals_eager(Logits(model), token_ids(), "inductor")


# Reentrant checkpointing needs an input that requires grad, which token ids cannot.
CHECKPOINTED = [pytest.param(case, reentrant, id=f"{key}-{'reentrant' if reentrant else 'non-reentrant'}")
                for key, case in MATRIX.items() for reentrant in (True, False)
                if not (reentrant and key.endswith("-embedding"))]


@pytest.mark.parametrize("case, reentrant", CHECKPOINTED)
def test_gradient_checkpointing_gives_the_same_gradients(case, reentrant):
    model, x = _adapted(case), case.inputs()
    model.train()
    out, grads = _backward(model, x)
    run = lambda inputs: torch_checkpoint.checkpoint(model, inputs, use_reentrant=reentrant)  # noqa: E731
    checkpointed_out, checkpointed = _backward(model, x.requires_grad_(reentrant), run)
    torch.testing.assert_close(checkpointed_out, out, atol=1e-6, rtol=1e-6)
    assert checkpointed.keys() >= grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(checkpointed[n], grads[n], atol=1e-6, rtol=1e-6)


# --- lk.route under gradient checkpointing and in training ---------------------------------------------
def _routed_llama_grads(checkpointing: str | None, backward_inside: bool):
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=4, alpha=8), "all-linear", name="a")
    lk.adapt(model, lk.LoRA(rank=2, alpha=8), "all-linear", name="b")
    randomize(model)
    lk.activate(model, ["a", "b"])
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
        model.model.embed_tokens.weight.requires_grad_(True)  # reentrant checkpointing needs a grad-carrying input
    ids = token_ids(3, 6)
    with lk.route(model, ["a", None, "b"]):
        loss = model(input_ids=ids, labels=ids).loss
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if ".adapters." in n}


@pytest.mark.parametrize("checkpointing", ["reentrant", "non-reentrant"])
def test_route_with_gradient_checkpointing_and_backward_after_the_block(checkpointing):
    expected = _routed_llama_grads(None, backward_inside=True)
    for inside in (True, False):
        grads = _routed_llama_grads(checkpointing, backward_inside=inside)
        assert grads.keys() == expected.keys()
        for n in expected:
            torch.testing.assert_close(grads[n], expected[n], atol=1e-5, rtol=1e-5)


def test_checkpointed_forwards_of_two_routings_before_one_backward_are_refused():
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=4), "all-linear", name="a")
    lk.adapt(model, lk.LoRA(rank=4), "all-linear", name="b")
    lk.activate(model, ["a", "b"])
    model.train()
    model.gradient_checkpointing_enable({"use_reentrant": False})
    ids = token_ids(2, 5)
    with lk.route(model, ["a", "b"]):
        first = model(input_ids=ids, labels=ids).loss
    with lk.disabled(model):
        second = model(input_ids=ids, labels=ids).loss
    with pytest.raises(lk.ConfigError, match="two settings"):
        (first + second).backward()


def test_training_an_inactive_routed_adapter_is_refused():
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=4), "all-linear", name="a")
    lk.adapt(model, lk.LoRA(rank=4), "all-linear", name="b")  # now the only active one
    randomize(model)
    model.train()
    ids = token_ids(2, 5)
    with lk.route(model, ["a", "b"]), pytest.raises(lk.ConfigError, match=r"no gradient.*lk.activate"):
        model(input_ids=ids)
    lk.activate(model, ["a", "b"])
    with lk.route(model, ["a", "b"]):
        model(input_ids=ids, labels=ids).loss.backward()
    for path, layer in lk.model.adapted_layers(model):
        assert all(p.grad.abs().sum() > 0 for p in layer.adapters.parameters()), path
    lk.activate(model, "b")
    model.eval()
    with lk.route(model, ["a", None]):  # outside training any adapter may be routed to, with grad or not
        model(input_ids=ids)


# --- the meta device and device maps -------------------------------------------------------------------
@pytest.mark.parametrize("key", ["lora", "dora", "pissa", "lora_xs", "svf", "svft-banded", "adalora"])
def test_adapt_on_the_meta_device_then_materialise(key):
    method = METHODS[key]
    with torch.device("meta"):
        model = tiny_llama()
    lk.adapt(model, method, "all-linear")
    ids = token_ids()
    model.to_empty(device="cpu")
    with pytest.raises(lk.ConfigError, match="meta device.*lk.reset"):
        model(input_ids=ids)
    real = tiny_llama()
    model.load_state_dict(real.state_dict(), strict=False)
    model.model.rotary_emb.inv_freq.copy_(real.model.rotary_emb.inv_freq)  # a buffer to_empty left unset
    params = {id(p) for p in model.parameters()}
    lk.reset(model)
    assert {id(p) for p in model.parameters()} == params  # in place: an optimizer made before keeps them
    lk.adapt(real, method, "all-linear")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, real(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        with lk.disabled(real):
            base = real(input_ids=ids).logits
    assert torch.equal(model(input_ids=ids).logits, base)  # every method starts as the base
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in lk.trainable_parameters(model))


def test_accelerate_init_empty_weights_then_load_a_full_adapted_state():
    from accelerate import init_empty_weights

    source = lk.adapt(tiny_llama(), lk.LoRA(rank=4), "all-linear")
    randomize(source)
    with init_empty_weights():
        model = tiny_llama()
    lk.adapt(model, lk.LoRA(rank=4), "all-linear")
    model.load_state_dict(source.state_dict(), assign=True)  # the whole adapted model: adapters are ready
    ids = token_ids()
    model.model.rotary_emb.inv_freq = source.model.rotary_emb.inv_freq
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, source(input_ids=ids).logits)


def test_each_adapter_lives_on_its_layers_device():
    """A model spread over devices (device_map) gets each adapter where its layer is."""
    model = tiny_llama()
    model.model.layers[1].to("meta")  # the second block elsewhere
    lk.adapt(model, lk.DoRA(rank=4), "all-linear")
    for path, layer in lk.model.adapted_layers(model):
        device = layer.weight.device
        assert all(t.device == device for _, t in [*layer.adapters.named_parameters(), *layer.adapters.named_buffers()]), path
    assert {layer.weight.device.type for _, layer in lk.model.adapted_layers(model)} == {"cpu", "meta"}


def test_reset_refuses_a_merged_adapter_and_restarts_training():
    model = lk.adapt(tiny_llama(), lk.LoRA(rank=4), "all-linear")
    randomize(model)
    ids = token_ids()
    lk.merge(model)
    with pytest.raises(lk.MergeError, match="merged"):
        lk.reset(model)
    lk.unmerge(model)
    lk.reset(model)
    with torch.no_grad(), lk.disabled(model):
        base = model(input_ids=ids).logits
    assert torch.equal(model(input_ids=ids).logits, base)


def test_quantized_model_casts_copies_and_pickles():
    pytest.importorskip("bitsandbytes")
    model = lk.quantize(tiny_llama(), "nf4")
    lk.adapt(model, lk.LoRA(rank=4), "all-linear")
    randomize(model)
    ids = token_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        for how, copied in _round_trips(model).items():
            assert torch.equal(copied(input_ids=ids).logits, expected), how
        model.to(torch.bfloat16)
        assert all(t.dtype == torch.float32 for _, t in _adapter_tensors(model))
        torch.testing.assert_close(model(input_ids=ids).logits.float(), expected, atol=0.1, rtol=0.05)
        lk.merge(model)
        merged = model(input_ids=ids).logits
        copies = _round_trips(model)
        lk.unmerge(model)
        unmerged = model(input_ids=ids).logits
        for how, copied in copies.items():
            assert torch.equal(copied(input_ids=ids).logits, merged), how
            lk.unmerge(copied)  # each copy kept its own quantized original
            assert torch.equal(copied(input_ids=ids).logits, unmerged), how
