"""AdaLoRA: the budget schedule, rank allocation and saved format follow PEFT step for step."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from conftest import randomize, tiny_llama, token_ids

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]
SCHEDULE = dict(init_rank=6, target_rank=2, total_steps=12, tinit=2, tfinal=3)


def _peft_model(**overrides):
    settings = {**SCHEDULE, **overrides}
    config = peft.AdaLoraConfig(init_r=settings["init_rank"], target_r=settings["target_rank"],
                                total_step=settings["total_steps"], tinit=settings["tinit"],
                                tfinal=settings["tfinal"], lora_alpha=8, target_modules=TARGETS)
    return peft.get_peft_model(tiny_llama(), config)


def _pairs(ours, theirs):
    ours_named = {n.replace(".adapters.default.", "."): p for n, p in ours.named_parameters() if p.requires_grad}
    theirs_named = {n.removeprefix("base_model.model.").replace(".default", ""): p
                    for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours_named.keys() == theirs_named.keys()
    return ours_named, theirs_named


def test_schedule_matches_peft_step_for_step(tmp_path):
    x = token_ids(batch=4, length=12)
    ours = lk.adapt(tiny_llama(), lk.AdaLoRA(**SCHEDULE, alpha=8), TARGETS)
    theirs = _peft_model()
    ours_named, theirs_named = _pairs(ours, theirs)
    with torch.no_grad():
        for key, p in ours_named.items():
            theirs_named[key].copy_(p)
    losses = {"ours": [], "peft": []}
    for side, model, params in (("ours", ours, ours_named), ("peft", theirs, theirs_named)):
        model.train()
        optimizer = torch.optim.AdamW(params.values(), lr=2e-2)
        if side == "ours":
            lk.track(model, optimizer)  # lk.step after every optimizer step, no call to remember
        for step in range(SCHEDULE["total_steps"] + 2):
            if side == "ours":
                loss = model(input_ids=x, labels=x).loss + lk.regularization(model)
            else:  # AdaLoraModel.forward adds the regulariser (PeftModel.forward skips it without a task_type)
                loss = model.base_model(input_ids=x, labels=x).loss
            loss.backward()
            optimizer.step()
            if side == "peft":
                model.base_model.update_and_allocate(step)
            optimizer.zero_grad()
            losses[side].append(loss.item())
    assert losses["ours"] == pytest.approx(losses["peft"], abs=1e-5)
    for key, p in ours_named.items():
        torch.testing.assert_close(p, theirs_named[key], atol=1e-5, rtol=1e-4)
    masks = {path: layer.adapters["default"].rank_mask.tolist() for path, layer in lk.model.adapted_layers(ours)}
    peft_pattern = {k.replace(".default", "").removesuffix(".lora_E"): v
                    for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert masks == peft_pattern
    kept = sum(sum(m) for m in masks.values())
    assert kept <= 2 * len(masks) and any(not all(m) for m in masks.values())

    # Both save PEFT's pruned format; each side loads the other's with the same logits.
    lk.save(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    ours.eval()
    expected = ours(x).logits
    reloaded = lk.load(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(reloaded(x).logits, expected, atol=1e-5, rtol=1e-5)
    assert sum(layer.adapters["default"].rank for _, layer in lk.model.adapted_layers(reloaded)) == kept
    from_ours = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(from_ours(x).logits, expected, atol=1e-5, rtol=1e-5)
    # A reloaded adapter holds only its kept triplets; saved again, PEFT must still read its ranks.
    lk.save(reloaded, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "again").eval()
    torch.testing.assert_close(again(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_regularization_is_the_mean_orthogonality_gap():
    model = lk.adapt(tiny_llama(), lk.AdaLoRA(init_rank=3, target_rank=1, total_steps=5, orth_reg_weight=0.1),
                     ["q_proj"])
    adapters = [layer.adapters["default"] for _, layer in lk.model.adapted_layers(model)]
    eye = torch.eye(3)
    gaps = [torch.linalg.matrix_norm(a.lora_A @ a.lora_A.t() - eye) for a in adapters]
    gaps += [torch.linalg.matrix_norm(a.lora_B.t() @ a.lora_B - eye) for a in adapters]
    torch.testing.assert_close(lk.regularization(model), 0.1 * torch.stack(gaps).mean())
    lk.regularization(model).backward()
    assert adapters[0].lora_A.grad is not None and adapters[0].lora_E.grad is None
    assert lk.regularization(lk.adapt(tiny_llama(), lk.LoRA(), ["q_proj"])) == 0


def test_budget_schedule_is_cubic_between_tinit_and_tfinal():
    recipe = lk.AdaLoRA(init_rank=8, target_rank=2, total_steps=20, tinit=4, tfinal=6, delta_t=2)
    assert recipe.budget(4, 80, 20) == (80, False)
    assert recipe.budget(9, 80, 20) == (int(60 * (1 - 5 / 10) ** 3 + 20), False)
    assert recipe.budget(10, 80, 20) == (int(60 * 0.4 ** 3 + 20), True)
    assert recipe.budget(15, 80, 20) == (20, True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "total_steps"), (dict(total_steps=10, tinit=6, tfinal=4), "no budgeting phase"),
    (dict(total_steps=10, target_rank=20), "exceeds init_rank"), (dict(total_steps=10, beta1=1.0), "beta1"),
    (dict(total_steps=10, orth_reg_weight=-1), "orth_reg_weight"), (dict(total_steps=10, init_rank=0), "> 0"),
])
def test_adalora_bad_settings(kwargs, message):
    with pytest.raises(lk.ConfigError, match=message):
        lk.AdaLoRA(**kwargs)


def test_frozen_mask_keeps_pruned_triplets_at_zero():
    model = lk.adapt(tiny_llama(), lk.AdaLoRA(init_rank=4, target_rank=1, total_steps=6, tfinal=2), ["q_proj"])
    randomize(model)
    x = token_ids()
    optimizer = torch.optim.SGD(lk.trainable_parameters(model), lr=0.1)
    for step in range(8):
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        lk.step(model, step)
        optimizer.zero_grad()
    for _, layer in lk.model.adapted_layers(model):
        adapter = layer.adapters["default"]
        assert torch.all(adapter.lora_E[~adapter.rank_mask] == 0)
    assert sum(int(layer.adapters["default"].rank_mask.sum()) for _, layer in lk.model.adapted_layers(model)) <= 2
