"""``train=`` modules are per adapter, as PEFT's modules_to_save: each adapter trains its own copy, the original
stays frozen and is what ``lk.disabled`` computes, and delete / unload give the base back exactly."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import lorakit as lk
from conftest import randomize, tiny_llama, token_ids


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _train(model, steps: int = 3, seed: int = 0) -> None:
    """A few real optimizer steps on whatever the model says is trainable (the active adapter)."""
    optimizer = torch.optim.SGD(lk.trainable_parameters(model), lr=0.5)
    x = token_ids(batch=4, seed=seed)
    for _ in range(steps):
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _adapted(name="a", seed=10, train=("lm_head", "model.norm"), model=None):
    model = tiny_llama() if model is None else model
    lk.adapt(model, lk.LoRA(rank=2, alpha=4), ["q_proj", "v_proj"], name=name, train=list(train))
    randomize(model, name, seed=seed)
    return model


def test_training_changes_only_the_adapters_copy_and_disabled_is_the_base():
    reference, x = tiny_llama(), token_ids()
    model = _adapted()
    _train(model)
    head = model.lm_head
    assert not torch.equal(head.adapters["a"].weight, reference.lm_head.weight)  # the copy trained...
    assert torch.equal(head.weight, reference.lm_head.weight)  # ...the original did not
    assert not head.weight.requires_grad and head.adapters["a"].weight.requires_grad
    with lk.disabled(model):
        assert torch.equal(_logits(model, x), _logits(reference, x))


def test_training_one_adapter_leaves_another_adapters_copy_alone():
    model, x = _adapted("a"), token_ids()
    _train(model, seed=1)
    a_logits = _logits(model, x)
    _adapted("b", seed=11, model=model)
    _train(model, seed=2)
    b_logits = _logits(model, x)
    lk.activate(model, "a")
    assert torch.equal(_logits(model, x), a_logits)
    lk.activate(model, "b")
    assert torch.equal(_logits(model, x), b_logits)


def test_loading_an_adapter_never_overwrites_a_copy_another_adapter_uses(tmp_path):
    other = _adapted("b", seed=11)
    _train(other, seed=2)
    lk.save(other, tmp_path, name="b")
    model, x = _adapted("a"), token_ids()
    _train(model, seed=1)
    a_logits = _logits(model, x)
    lk.load(model, tmp_path, name="b")
    assert torch.equal(_logits(model, x), _logits(other, x))
    lk.activate(model, "a")
    assert torch.equal(_logits(model, x), a_logits)


def test_deleting_every_adapter_gives_the_base_back_exactly():
    reference, x = tiny_llama(), token_ids()
    model = _adapted("a")
    _train(model, seed=1)
    _adapted("b", seed=11, train=["lm_head"], model=model)
    _train(model, seed=2)
    lk.delete(model, "a")
    assert isinstance(model.model.norm, lk.trained.TrainedModule) is False  # only "a" trained it: back as it was
    lk.delete(model, "b")
    assert type(model.lm_head) is nn.Linear and type(model.model.norm) is type(reference.model.norm)
    assert set(model.state_dict()) == set(reference.state_dict())
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    assert torch.equal(_logits(model, x), _logits(reference, x))


def test_activate_switches_the_copy_in_use_and_refuses_two_owners_of_one_module():
    reference, x = tiny_llama(), token_ids()
    model = _adapted("a")
    with torch.no_grad():
        model.lm_head.adapters["a"].weight.mul_(2)
    a_logits = _logits(model, x)
    _adapted("b", seed=11, model=model)
    with torch.no_grad():
        model.lm_head.adapters["b"].weight.mul_(-1)
    b_logits = _logits(model, x)
    lk.adapt(model, lk.LoRA(rank=2), ["k_proj"], name="c")  # trains no module: its head is the original
    randomize(model, "c", seed=12)
    assert model.lm_head.active == []
    lk.activate(model, ["a", "c"])  # a's copy, c's LoRA
    assert model.lm_head.active == ["a"] and model.lm_head.adapters["a"].weight.requires_grad
    assert not model.lm_head.adapters["b"].weight.requires_grad
    lk.activate(model, "b")
    with pytest.raises(lk.ConfigError, match=r"(lm_head|model\.norm): adapters \['a', 'b'\] each train their own copy"):
        lk.activate(model, ["a", "b"])
    assert lk.active_adapters(model) == ["b"] and torch.equal(_logits(model, x), b_logits)  # nothing changed
    lk.activate(model, "a")
    assert torch.equal(_logits(model, x), a_logits)
    assert not torch.equal(a_logits, _logits(reference, x))


@pytest.mark.parametrize("merge", [True, False])
def test_unload_keeps_the_active_copy_when_merging_and_the_original_otherwise(merge):
    reference, x = tiny_llama(), token_ids()
    model = _adapted("a")
    _train(model)
    adapted_logits, trained_head = _logits(model, x), model.lm_head.adapters["a"]
    plain = lk.unload(model, merge=merge)
    assert type(plain.lm_head) is nn.Linear and not isinstance(plain.model.norm, lk.trained.TrainedModule)
    assert set(plain.state_dict()) == set(reference.state_dict())
    if merge:
        assert plain.lm_head is trained_head
        torch.testing.assert_close(_logits(plain, x), adapted_logits, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(_logits(plain, x), _logits(reference, x))


def test_base_state_dict_keys_are_kept_and_base_checkpoints_load():
    """The wrapper holds the original's tensors under their own keys; each copy adds keys under ``.adapters.``."""
    reference = tiny_llama()
    model = _adapted("a")
    keys = set(model.state_dict())
    assert set(reference.state_dict()) <= keys
    assert {k for k in keys - set(reference.state_dict()) if "lm_head" in k or "model.norm" in k} == {
        "lm_head.adapters.a.weight", "model.norm.adapters.a.weight"}
    other, x = tiny_llama(seed=1), token_ids()  # another base checkpoint, same architecture
    result = model.load_state_dict(other.state_dict(), strict=False)
    assert result.unexpected_keys == [] and all(".adapters." in k for k in result.missing_keys)
    with lk.disabled(model):
        assert torch.equal(_logits(model, x), _logits(other, x))  # the originals took the checkpoint


def test_route_sends_each_row_through_its_own_adapters_copy():
    reference, x = tiny_llama(), token_ids(batch=3)
    model = _adapted("a")
    _train(model, seed=1)
    a_row = _logits(model, x[:1])
    _adapted("b", seed=11, model=model)
    _train(model, seed=2)
    b_row = _logits(model, x[2:])
    lk.activate(model, "a")
    with torch.no_grad(), lk.route(model, ["a", None, "b"]):
        routed = model(x).logits
    torch.testing.assert_close(routed, torch.cat([a_row, _logits(reference, x[1:2]), b_row]), atol=1e-5, rtol=1e-5)


class _Toy(nn.Module):
    """A body and a head; the head optionally takes a second input, which lk.route could not split by row."""

    def __init__(self, head: nn.Module, two_inputs: bool = False):
        super().__init__()
        self.body, self.head, self.two_inputs = nn.Linear(4, 4), head, two_inputs

    def forward(self, x):
        h = self.body(x)
        return self.head(h, h) if self.two_inputs else self.head(h)


class _Bilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, h, g):
        return self.proj(h) * g


@pytest.mark.parametrize("head, two_inputs, training, message", [
    (_Bilinear(), True, False, "needs one batched input"),
    (nn.BatchNorm1d(4), False, True, "batch norm"),
])
def test_route_refuses_rows_it_cannot_compute_apart(head, two_inputs, training, message):
    torch.manual_seed(0)
    model = _Toy(head, two_inputs).train(training)
    for name in ("a", "b"):
        lk.adapt(model, lk.LoRA(rank=2), ["body"], name=name, train=["head"])
    lk.activate(model, "a")
    with pytest.raises(lk.ConfigError, match=message), torch.no_grad(), lk.route(model, ["a", "b"]):
        model(torch.randn(2, 4))
    with torch.no_grad(), lk.route(model, ["a", "a"]):  # one copy for every row: nothing to split
        model(torch.randn(2, 4))


def test_a_checkpointed_rerun_after_the_route_block_uses_the_copies_it_routed():
    """Reentrant checkpointing reruns the head in backward, after the block: it must route as its forward did."""
    torch.manual_seed(0)
    model = _Toy(nn.Linear(4, 3))
    for name in ("a", "b"):
        lk.adapt(model, lk.LoRA(rank=2), ["body"], name=name, train=["head"])
        with torch.no_grad():
            model.head.adapters[name].weight.normal_()
    x = torch.randn(2, 4)

    def head_grad(checkpointed: bool) -> torch.Tensor:
        model.zero_grad()
        lk.activate(model, "a")
        with lk.route(model, ["a", None]):
            h = model.body(x).requires_grad_()
            out = (torch.utils.checkpoint.checkpoint(model.head, h, use_reentrant=True) if checkpointed
                   else model.head(h))
        out.square().sum().backward()
        return model.head.adapters["a"].weight.grad.clone()

    torch.testing.assert_close(head_grad(True), head_grad(False))


def test_train_modules_that_hold_a_target_or_nest_are_refused():
    model, x = tiny_llama(), token_ids()
    before = _logits(model, x)
    with pytest.raises(lk.ConfigError, match=r"model\.layers\.0 is a train= module, which cannot be or hold an "
                                             r"adapted layer, and model\.layers\.0\.self_attn\.q_proj is targeted"):
        lk.adapt(model, lk.LoRA(rank=2), ["q_proj"], train=["model.layers.0"])
    lk.adapt(model, lk.LoRA(rank=2), ["q_proj"], name="a", train=["model.layers.1.mlp"])
    with pytest.raises(lk.ConfigError, match=r"model\.layers\.1\.mlp is a train= module.*mlp\.gate_proj is targeted"):
        lk.adapt(model, lk.LoRA(rank=2), "all-linear", name="b")  # another adapter's targets inside it
    with pytest.raises(lk.ConfigError, match=r"model\.layers\.1\.mlp\.down_proj: train= modules cannot nest"):
        lk.adapt(model, lk.LoRA(rank=2), ["v_proj"], name="b", train=["model.layers.1.mlp.down_proj"])
    assert lk.adapter_names(model) == ["a"]
    lk.delete(model, "a")
    assert torch.equal(_logits(model, x), before)


def test_copies_move_cast_copy_and_pickle_with_the_model():
    """The wrapper shares the original's tensor dicts, so a cast reaches the original's forward too."""
    reference, x = tiny_llama().double(), token_ids()
    model = _adapted("a")
    _train(model)
    expected = _logits(model, x)
    for moved in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(_logits(moved, x), expected)
        moved.double()  # the copy's wrapper and original still share their tensors
        with lk.disabled(moved):
            assert torch.equal(_logits(moved, x), _logits(reference, x))
    model.double()
    assert model.lm_head.adapters["a"].weight.dtype == torch.float64
    with lk.disabled(model):
        assert torch.equal(_logits(model, x), _logits(reference, x))
    torch.testing.assert_close(_logits(model, x).float(), expected, atol=1e-5, rtol=1e-5)


def test_peft_loads_our_trained_head_and_we_load_peft_s(tmp_path):
    peft = pytest.importorskip("peft")
    x = token_ids()
    model = _adapted("a")
    _train(model)
    expected = _logits(model, x)
    lk.save(model, tmp_path / "ours", name="a")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(theirs, x), expected, atol=1e-5, rtol=1e-5)
    with theirs.disable_adapter():  # and PEFT, too, keeps the base as it was
        assert torch.equal(_logits(theirs, x), _logits(tiny_llama(), x))

    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                   modules_to_save=["lm_head"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    ours = lk.load(tiny_llama(), tmp_path / "peft")
    assert isinstance(ours.lm_head, lk.trained.TrainedModule) and list(ours.lm_head.adapters) == ["default"]
    torch.testing.assert_close(_logits(ours, x), _logits(peft_model, x), atol=1e-5, rtol=1e-5)
    with lk.disabled(ours):
        assert torch.equal(_logits(ours, x), _logits(tiny_llama(), x))


def test_reset_restarts_the_adapters_copies_from_their_originals():
    reference, x = tiny_llama(), token_ids()
    model = _adapted()
    _train(model)
    optimizer_tensor = model.lm_head.adapters["a"].weight
    assert not torch.equal(optimizer_tensor, reference.lm_head.weight)
    lk.reset(model, "a")
    assert model.lm_head.adapters["a"].weight is optimizer_tensor  # in place: an optimizer made before still holds it
    assert torch.equal(optimizer_tensor, reference.lm_head.weight)
    assert torch.equal(model.model.norm.adapters["a"].weight, reference.model.norm.weight)
    assert torch.equal(_logits(model, x), _logits(reference, x))  # LoRA's B is zero again: the base exactly
