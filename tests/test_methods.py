"""Method-specific facts: SVD starts, DoRA's norm, conversions, parameter counts, PEFT parity for DoRA/PiSSA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit import svd
from conftest import randomize, train_side_by_side, tiny_gpt2, tiny_llama, tiny_unet, token_ids

peft = pytest.importorskip("peft")


def _linear(d_in=12, d_out=10, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out))


def _adapter(model):
    return model[0].adapters["default"]


@pytest.mark.parametrize("method, part", [(lk.PiSSA(rank=3, alpha=6), slice(0, 3)),
                                          (lk.MiLoRA(rank=3), slice(7, 10))])
def test_svd_start_holds_the_top_or_bottom_part_of_w(method, part):
    model = _linear()
    W = model[0].weight.detach().clone()
    U, S, Vh = torch.linalg.svd(W)
    lk.adapt(model, method, ["0"])
    adapter = _adapter(model)
    start = method.scale * adapter.init_B @ adapter.init_A
    torch.testing.assert_close(start, U[:, part] @ torch.diag(S[part]) @ Vh[part], atol=1e-5, rtol=1e-5)
    assert torch.equal(adapter.lora_A, adapter.init_A) and torch.equal(adapter.lora_B, adapter.init_B)
    assert torch.equal(model[0].weight, W)  # the base is untouched


def test_randomized_svd_is_reproducible_and_close_to_exact():
    W = torch.randn(40, 30)
    torch.manual_seed(1)
    first = svd.top(W, 4, niter=4)
    svd.clear_cache()
    torch.manual_seed(2)
    second = svd.top(W, 4, niter=4)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    exact = torch.linalg.svdvals(W)[:4]
    assert torch.all(first[1] <= exact * (1 + 1e-5)) and torch.allclose(first[1], exact, rtol=0.1)


def test_svd_signs_are_canonical_and_results_cached(monkeypatch):
    W = torch.randn(8, 6)
    svd.clear_cache()
    U, S, Vh = svd.svd(W)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, W, atol=1e-5, rtol=1e-5)
    assert torch.all(Vh.gather(1, Vh.abs().argmax(1, keepdim=True)) > 0)
    monkeypatch.setattr(svd, "_compute", lambda *a: pytest.fail("recomputed a cached SVD"))
    assert svd.svd(W)[0] is U
    model = _linear()
    monkeypatch.undo()
    lk.adapt(model, lk.PiSSA(rank=2), ["0"], name="a")
    monkeypatch.setattr(svd, "_compute", lambda *a: pytest.fail("second adapter on a layer redid the SVD"))
    lk.adapt(model, lk.PiSSA(rank=4), ["0"], name="b")
    with torch.no_grad():
        model[0].weight.add_(1.0)  # a changed weight is a new decomposition
    with pytest.raises(pytest.fail.Exception):
        lk.adapt(model, lk.PiSSA(rank=2), ["0"], name="c")


def test_svd_methods_refuse_what_they_cannot_do():
    with pytest.raises(lk.ConfigError, match="full SVD"):
        lk.MiLoRA(rank=2, niter=2)
    with pytest.raises(lk.ConfigError, match="niter must be > 0"):
        lk.PiSSA(rank=2, niter=0)
    with pytest.raises(lk.ConfigError, match="exceeds"):
        lk.adapt(_linear(), lk.PiSSA(rank=11), ["0"])
    with pytest.raises(lk.UnsupportedLayerError, match="PiSSA adapts linear layers, not conv"):
        lk.adapt(tiny_unet(), lk.PiSSA(rank=2), ["conv_in"])
    with pytest.raises(lk.UnsupportedLayerError, match="MiLoRA adapts linear layers, not embedding"):
        lk.adapt(tiny_llama(), lk.MiLoRA(rank=2), ["embed_tokens"])
    model = lk.adapt(_linear(), lk.LoRA(rank=2), ["0"])
    with pytest.raises(lk.ConfigError, match="no plain-LoRA form"):
        lk.to_lora(model)


D_IN, D_OUT, R, N, D = 12, 10, 3, 10, 2  # N = min(D_IN, D_OUT); D off-diagonals for SVFT
FORMULAS = {  # METHODS.md section 0, for one D_OUT×D_IN matrix
    "lora": (lk.LoRA(rank=R), R * (D_IN + D_OUT)),
    "rslora": (lk.LoRA(rank=R, rslora=True), R * (D_IN + D_OUT)),
    "dora": (lk.DoRA(rank=R), R * (D_IN + D_OUT) + D_OUT),
    "pissa": (lk.PiSSA(rank=R), R * (D_IN + D_OUT)),
    "pissa-niter": (lk.PiSSA(rank=R, niter=2), R * (D_IN + D_OUT)),
    "milora": (lk.MiLoRA(rank=R), R * (D_IN + D_OUT)),
    "lora_xs": (lk.LoRAXS(rank=R), R * R),
    "svf": (lk.SVF(), N),
    "svft-plain": (lk.SVFT(), N),
    "svft-banded": (lk.SVFT(pattern="banded", width=D), N * (2 * D + 1) - D * (D + 1)),
    "svft-random": (lk.SVFT(pattern="random", width=D), N * (2 * D + 1) - D * (D + 1)),
    "svft-top_k": (lk.SVFT(pattern="top_k", width=D), N * (2 * D + 1) - D * (D + 1)),
    "adalora": (lk.AdaLoRA(init_rank=R, target_rank=1, total_steps=10), R * (D_IN + D_OUT + 1)),
}


@pytest.mark.parametrize("method, expected", FORMULAS.values(), ids=FORMULAS.keys())
def test_trainable_parameter_counts_follow_the_formulas(method, expected):
    model = lk.adapt(_linear(D_IN, D_OUT), method, ["0"])
    assert sum(p.numel() for p in lk.trainable_parameters(model)) == expected


@pytest.mark.parametrize("method", [lk.PiSSA(rank=4, alpha=8), lk.PiSSA(rank=4, niter=2), lk.MiLoRA(rank=4)])
def test_trained_svd_adapter_converts_to_a_lora_peft_loads(method, tmp_path):
    model, x = tiny_llama(), token_ids()
    lk.adapt(model, method, "all-linear")
    randomize(model, std=0.05)
    expected = model(x).logits
    lk.save(model, tmp_path / "native")
    lk.save(model, tmp_path / "peft", format="peft")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    torch.testing.assert_close(theirs(x).logits, expected, atol=1e-5, rtol=1e-5)
    config = peft.LoraConfig.from_pretrained(tmp_path / "peft")
    assert config.r == 8 and config.lora_alpha == pytest.approx(8 * method.scale)
    lk.to_lora(model)
    assert type(model.model.layers[0].self_attn.q_proj.recipes["default"]) is lk.LoRA
    torch.testing.assert_close(model(x).logits, expected, atol=1e-5, rtol=1e-5)
    assert lk.trainable_parameters(model)  # the converted adapter is still the active, trainable one


def _peft_pissa(targets, **kwargs):
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=targets, **kwargs)
    return peft.get_peft_model(tiny_llama(), config)


def test_pissa_trains_like_peft_pissa():
    """PEFT moves the start into its factors and trains on the residual base; ours keeps W: same function."""
    x, targets = token_ids(batch=4, length=12), ["q_proj", "v_proj", "down_proj"]
    ours = lk.adapt(tiny_llama(), lk.PiSSA(rank=4, alpha=8), targets)
    theirs = _peft_pissa(targets)
    ours_named = {n.replace(".adapters.default.", "."): p for n, p in ours.named_parameters() if p.requires_grad}
    theirs_named = {n.removeprefix("base_model.model.").replace(".default.weight", ""): p
                    for n, p in theirs.named_parameters() if p.requires_grad}
    # Copying our factors into PEFT's is consistent with its residual: a singular pair's sign cancels in B0·A0.
    runs = train_side_by_side([(ours, ours_named), (theirs, theirs_named)], x, steps=4)
    assert runs[0] == pytest.approx(runs[1], abs=1e-5) and runs[0][-1] < runs[0][0]


def test_pissa_dropout_leaves_the_frozen_start_alone():
    """Dropout reaches only the trainable chain: W_res·x + s·B·A·dropout(x), as PEFT on its residual base."""
    x, targets = token_ids(), ["q_proj", "v_proj", "down_proj"]
    base = tiny_llama()(x).logits
    ours = lk.adapt(tiny_llama(), lk.PiSSA(rank=4, alpha=8, dropout=0.3), targets).train()
    theirs = _peft_pissa(targets, lora_dropout=0.3).train()
    torch.manual_seed(5)  # the same layers in the same order draw the same dropout masks
    ours_out = ours(x).logits
    torch.manual_seed(5)
    torch.testing.assert_close(ours_out, theirs(x).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours_out, base, atol=1e-3)  # the dropout was real


def test_svd_start_adapters_live_beside_others():
    model, x = _linear(), torch.randn(4, 12)
    lk.adapt(model, lk.PiSSA(rank=3), ["0"], name="p")
    lk.adapt(model, lk.MiLoRA(rank=2), ["0"], name="m")
    lk.adapt(model, lk.LoRA(rank=2), ["0"], name="l")
    randomize(model)
    layer, W = model[0], model[0].weight.detach().clone()
    lk.activate(model, ["p", "m", "l"])
    delta = sum(layer.adapters[n].delta_weight() for n in ("p", "m", "l"))
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ (W + delta).t() + layer.bias, atol=1e-5, rtol=1e-5)
        with lk.disabled(model):
            assert torch.equal(model(x), x @ W.t() + layer.bias)
    assert torch.equal(layer.weight, W)


def test_spectral_basis_shares_the_cached_factors():
    """SVF/SVFT keep every layer's U and Vᵀ; a copy beside the SVD cache's own would double that memory."""
    model = lk.adapt(_linear(), lk.SVF(), ["0"])
    adapter, weight = _adapter(model), model[0].weight
    U, _, Vh = svd.svd(weight.detach(), source=weight)
    assert adapter.U.data_ptr() == U.data_ptr() and adapter.Vh.data_ptr() == Vh.data_ptr()
    assert U.is_contiguous() and Vh.is_contiguous()


def test_svd_runs_in_float32_on_half_precision_weights():
    W = torch.randn(8, 6).bfloat16()
    svd.clear_cache()
    U, S, Vh = svd.svd(W)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, W.float(), atol=1e-5, rtol=1e-5)
    _, S4, _ = svd.svd(W, 4, niter=4)
    assert S4.dtype == torch.float32


def test_native_reload_never_redoes_the_svd(tmp_path, monkeypatch):
    model, x = tiny_llama(), token_ids()
    lk.adapt(model, lk.PiSSA(rank=4, niter=2), ["q_proj", "v_proj"])
    randomize(model)
    lk.save(model, tmp_path)
    monkeypatch.setattr(svd, "_compute", lambda *a: pytest.fail("reload ran an SVD"))
    fresh = lk.load(tiny_llama(), tmp_path)
    assert torch.equal(fresh(x).logits, model(x).logits)


def test_dora_norm_is_detached_and_matches_the_direct_formula():
    model = lk.adapt(_linear(), lk.DoRA(rank=3, alpha=6), ["0"])
    adapter = _adapter(model)
    W = model[0].weight.detach()
    torch.testing.assert_close(adapter.magnitude.detach(), W.norm(dim=1), atol=1e-6, rtol=1e-6)
    randomize(model)
    direct = (W + adapter.lora.delta_weight()).norm(dim=1)
    torch.testing.assert_close(adapter.weight_norm(), direct, atol=1e-5, rtol=1e-5)
    assert not adapter.weight_norm().requires_grad


DORA_SETUPS = {
    "llama-qv": (tiny_llama, dict(targets=["q_proj", "v_proj"]), dict(target_modules=["q_proj", "v_proj"])),
    "llama-all-linear": (tiny_llama, dict(targets="all-linear"), dict(target_modules="all-linear")),
    "llama-rslora": (tiny_llama, dict(targets=["q_proj", "down_proj"]),
                     dict(target_modules=["q_proj", "down_proj"], use_rslora=True)),
    "gpt2": (tiny_gpt2, dict(targets=["c_attn", "c_proj"]), dict(target_modules=["c_attn", "c_proj"],
                                                                 fan_in_fan_out=True)),
    "embedding": (tiny_llama, dict(targets=["embed_tokens", "o_proj"]), dict(target_modules=["embed_tokens", "o_proj"])),
}


@pytest.mark.parametrize("setup", DORA_SETUPS.values(), ids=DORA_SETUPS.keys())
def test_dora_parity_with_peft_both_ways(setup, tmp_path):
    build, ours_kwargs, peft_kwargs = setup
    x = token_ids()
    rslora = peft_kwargs.get("use_rslora", False)
    model = lk.adapt(build(), lk.DoRA(rank=4, alpha=8, rslora=rslora), **ours_kwargs)
    randomize(model)
    expected = model(x).logits
    lk.save(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(x).logits, expected, atol=1e-5, rtol=1e-5)

    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, **peft_kwargs))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = lk.load(build(), tmp_path / "peft")
    assert lk.model.adapted_layers(ours)[0][1].recipes["default"] == lk.DoRA(rank=4, alpha=8, rslora=rslora)
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-5, rtol=1e-5)


def test_dora_conv_parity_with_peft(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    model = lk.adapt(tiny_unet(), lk.DoRA(rank=2, alpha=4), ["conv_in", "conv_out"])
    randomize(model)
    with torch.no_grad():
        expected = model(x)
    lk.save(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_unet(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), expected, atol=1e-5, rtol=1e-5)


def test_dora_training_follows_peft():
    x = token_ids(batch=4, length=12)
    ours = lk.adapt(tiny_llama(), lk.DoRA(rank=4, alpha=8), ["q_proj", "v_proj", "down_proj"])
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                              target_modules=["q_proj", "v_proj", "down_proj"]))
    ours_named = {n.replace(".adapters.default.lora.", ".").replace(".adapters.default.magnitude", ".lora_magnitude_vector")
                  .removesuffix(".weight"): p for n, p in ours.named_parameters() if p.requires_grad}
    theirs_named = {n.removeprefix("base_model.model.").replace(".default.weight", "").replace(".default", ""): p
                    for n, p in theirs.named_parameters() if p.requires_grad}
    runs = train_side_by_side([(ours, ours_named), (theirs, theirs_named)], x, steps=4)
    assert runs[0] == pytest.approx(runs[1], abs=1e-5)


def test_lora_xs_core_sits_between_frozen_singular_vectors(tmp_path, monkeypatch):
    model = _linear()
    W = model[0].weight.detach().clone()
    U, S, Vh = torch.linalg.svd(W)
    lk.adapt(model, lk.LoRAXS(rank=3, alpha=6), ["0"])
    adapter = _adapter(model)
    signs = torch.sign((adapter.lora_B * U[:, :3]).sum(0))  # equal up to each pair's sign
    torch.testing.assert_close(adapter.lora_B, U[:, :3] * signs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter.lora_A, (S[:3, None] * Vh[:3]) * signs[:, None], atol=1e-5, rtol=1e-5)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.adapters.default.lora_latent"]
    assert torch.count_nonzero(adapter.lora_latent) == 0
    gaussian = _adapter(lk.adapt(_linear(), lk.LoRAXS(rank=3, init="gaussian"), ["0"])).lora_latent
    assert 0 < gaussian.abs().max() < 1e-4
    x = torch.randn(4, 12)
    model(x).sum().backward()
    assert adapter.lora_latent.grad.abs().sum() > 0  # learns from an exact zero start
    randomize(model)
    lk.save(model, tmp_path)
    monkeypatch.setattr(svd, "_compute", lambda *a: pytest.fail("reload ran an SVD"))
    assert torch.equal(lk.load(_linear(), tmp_path)(x), model(x))


def test_svf_scales_singular_values_and_saves_only_them(tmp_path):
    model, x = _linear(), torch.randn(4, 12)
    lk.adapt(model, lk.SVF(), ["0"])
    adapter = _adapter(model)
    assert sum(p.numel() for p in lk.trainable_parameters(model)) == 10
    with torch.no_grad():
        adapter.values.copy_(torch.linspace(0.5, 1.5, 10))
    W = model[0].weight.detach()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    expected = U @ torch.diag(S * torch.linspace(0.5, 1.5, 10)) @ Vh
    torch.testing.assert_close(W + adapter.delta_weight(), expected, atol=1e-5, rtol=1e-5)
    lk.save(model, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(t.numel() for t in saved.values()) == 4 * 10  # z, σ and the diagonal's indices: no U or V
    torch.testing.assert_close(lk.load(_linear(), tmp_path)(x), model(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", [lk.SVF(), lk.SVFT(pattern="banded", width=2)])
def test_spectral_adapters_refuse_a_different_base(method, tmp_path):
    model = lk.adapt(_linear(), method, ["0"])
    randomize(model)
    lk.save(model, tmp_path)
    other = _linear(seed=1)
    with pytest.raises(lk.ShapeMismatchError, match="singular values differ"):
        lk.load(other, tmp_path)
    assert lk.adapter_names(other) == []


@pytest.mark.parametrize("pattern, width", [("plain", 0), ("banded", 2), ("random", 2), ("top_k", 2),
                                            ("banded", 20)])
def test_svft_parameter_counts_and_support(pattern, width):
    d_in, d_out = 12, 10
    n, d = min(d_in, d_out), min(width, 9)
    model = lk.adapt(_linear(d_in, d_out), lk.SVFT(pattern=pattern, width=width), ["0"])
    adapter = _adapter(model)
    expected = n if pattern == "plain" else n * (2 * d + 1) - d * (d + 1)
    assert sum(p.numel() for p in lk.trainable_parameters(model)) == expected
    positions = set(zip(adapter.rows.tolist(), adapter.cols.tolist()))
    assert len(positions) == expected and {(i, i) for i in range(n)} <= positions  # distinct, diagonal kept
    if pattern == "banded":
        assert all(abs(i - j) <= d for i, j in positions)
    U, S, Vh, W = adapter.U, adapter.spectrum, adapter.Vh, model[0].weight.detach()
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, W, atol=1e-5, rtol=1e-5)  # the basis is W's SVD
    torch.testing.assert_close(S, torch.linalg.svdvals(W), atol=1e-5, rtol=1e-5)
    if pattern == "top_k":
        alignment = (U[:n].t() @ Vh[:, :n].t()).abs()
        off = [alignment[i, j] for i, j in positions if i != j]
        rest = [alignment[i, j] for i in range(n) for j in range(n) if i != j and (i, j) not in positions]
        assert min(off) >= max(rest)
    with torch.no_grad():
        adapter.values.normal_()
        M = torch.zeros(n, n)  # built entry by entry, not by the adapter's own scatter
        for i, j, v in zip(adapter.rows.tolist(), adapter.cols.tolist(), adapter.values.tolist()):
            M[i, j] = v
        torch.testing.assert_close(adapter.delta_weight(), U @ M @ Vh, atol=1e-5, rtol=1e-5)
        x = torch.randn(4, d_in)
        torch.testing.assert_close(model(x), x @ (W + U @ M @ Vh).t() + model[0].bias, atol=1e-5, rtol=1e-5)


def test_svft_random_pattern_is_seeded():
    first = _adapter(lk.adapt(_linear(), lk.SVFT(pattern="random", width=2, seed=3), ["0"]))
    second = _adapter(lk.adapt(_linear(), lk.SVFT(pattern="random", width=2, seed=3), ["0"]))
    third = _adapter(lk.adapt(_linear(), lk.SVFT(pattern="random", width=2, seed=4), ["0"]))
    assert torch.equal(first.rows, second.rows) and torch.equal(first.cols, second.cols)
    assert not (torch.equal(first.rows, third.rows) and torch.equal(first.cols, third.cols))


@pytest.mark.parametrize("kwargs, message", [
    (dict(pattern="diagonal"), "pattern must be one of"), (dict(pattern="plain", width=2), "plain pattern"),
    (dict(pattern="banded", width=-1), "width must be"),
])
def test_svft_bad_settings(kwargs, message):
    with pytest.raises(lk.ConfigError, match=message):
        lk.SVFT(**kwargs)
