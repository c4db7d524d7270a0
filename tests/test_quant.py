"""QLoRA: adapters on a bitsandbytes 4-bit (NF4/FP4) or 8-bit base, checked against PEFT and transformers."""

from __future__ import annotations

import gc
import os
import sys
import warnings
import weakref

import pytest
import torch
from torch import nn

import lorakit as lk
import lorakit.kinds
from conftest import randomize, tiny_llama, token_ids

bnb = pytest.importorskip("bitsandbytes")

METHODS = {
    "lora": lk.LoRA(rank=4, alpha=8),
    "rslora": lk.LoRA(rank=4, alpha=8, rslora=True),
    "dora": lk.DoRA(rank=4, alpha=8),
    "pissa": lk.PiSSA(rank=4),
    "lora_xs": lk.LoRAXS(rank=4),
    "svf": lk.SVF(),
    "svft": lk.SVFT(pattern="banded", width=1),
    "adalora": lk.AdaLoRA(init_rank=4, target_rank=2, total_steps=20),
}


def _quantized(mode: str = "nf4", seed: int = 0, **kwargs) -> nn.Module:
    return lk.quantize(tiny_llama(seed, hidden=64), mode, **kwargs)


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_quantize_swaps_every_linear_but_the_head_and_frees_the_float_weights():
    model = tiny_llama(hidden=64)
    gone = weakref.ref(model.model.layers[0].mlp.up_proj.weight)
    lk.quantize(model, "nf4", compute_dtype=torch.float32)
    gc.collect()
    assert gone() is None, "the float weight is still referenced after quantizing"
    linears = {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert type(linears.pop("lm_head")) is nn.Linear
    assert linears and all(type(m) is bnb.nn.Linear4bit for m in linears.values())
    state = model.model.layers[0].mlp.up_proj.weight.quant_state
    assert state.quant_type == "nf4" and state.nested and state.blocksize == 64
    assert not any(m.weight.requires_grad for m in linears.values())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm; trims glibc's heap")
def test_quantize_gives_the_float_weights_back_to_the_system():
    # 1024 weights of 64 KB sit on the malloc heap (under glibc's mmap threshold), whose freed pages
    # stay in the process unless quantize trims it after the float layers are gone. Measured: 30 MB
    # given back; 34 MB *more* held when the trim came while the old layers were still referenced.
    # The rest is 1024 modules' worth of Python objects and bitsandbytes quantization states.
    model = nn.Sequential(*(nn.Linear(128, 128, bias=False) for _ in range(1024)))
    gc.collect()
    before = _rss_mb()
    lk.quantize(model, "nf4", skip=())
    freed = before - _rss_mb()
    assert freed > 16, f"only {freed:.1f} MB of the 64 MB of float weights went back to the system"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_nf4_with_double_quantization_holds_at_most_053_bytes_per_weight():
    layer = lk.quantize(nn.Sequential(nn.Linear(576, 1536)), "nf4", skip=())[0]
    bits = lk.quant.quantized_bits(layer)
    # 4 bits + one 8-bit absmax per 64 weights + one fp32 per 256 absmaxes = 4.127 bits.
    assert bits / 8 <= 0.53 and bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)
    plain = lk.quantize(nn.Sequential(nn.Linear(576, 1536)), "nf4", double_quant=False, skip=())[0]
    assert lk.quant.quantized_bits(plain) == pytest.approx(4 + 32 / 64, abs=1e-3)


def test_same_packed_weights_as_transformers_bitsandbytes_loader(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(hidden=64).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
    ours = _quantized(compute_dtype=torch.float32)
    for path, module in loaded.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            mine = ours.get_submodule(path)
            assert torch.equal(mine.weight.data, module.weight.data), path
            assert torch.equal(mine.weight.quant_state.absmax, module.weight.quant_state.absmax), path


CASES = [(m, "nf4") for m in METHODS] + [(m, mode) for m in ("lora", "dora") for mode in ("fp4", "int8")]
QUICK = {("lora", "nf4"), ("dora", "nf4"), ("pissa", "nf4"), ("lora", "int8")}  # the rest run with -m slow (CI too)


@pytest.mark.parametrize("method, mode", [pytest.param(m, q, marks=() if (m, q) in QUICK else pytest.mark.slow)
                                          for m, q in CASES], ids=[f"{m}-{mode}" for m, mode in CASES])
def test_adapters_on_a_quantized_base(method, mode, tmp_path):
    method = METHODS[method]
    model, x = _quantized(mode, compute_dtype=torch.float32), token_ids()
    model.train()  # bitsandbytes' int8 matmul differs between train and eval: stay in one mode (no dropout here)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base = _logits(model, x)
    lk.adapt(model, method, "all-linear")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_state.items()), "adapting changed the base state dict"
    torch.testing.assert_close(_logits(model, x), base, atol=1e-5, rtol=0)  # init is a no-op

    optimizer = torch.optim.AdamW(lk.trainable_parameters(model), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." not in n)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01, losses
    trained = _logits(model, x)

    lk.save(model, tmp_path / "a")
    fresh = _quantized(mode, compute_dtype=torch.float32).train()
    lk.load(fresh, tmp_path / "a")
    torch.testing.assert_close(_logits(fresh, x), trained, atol=1e-5, rtol=1e-5)

    with lk.disabled(model):
        torch.testing.assert_close(_logits(model, x), base, atol=0, rtol=0)
    packed = {p: l.weight for p, l in lk.model.adapted_layers(model)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lk.merge(model)
    assert any("dequantized float copy" in str(w.message) for w in caught)
    assert all(type(l.weight) is nn.Parameter for _, l in lk.model.adapted_layers(model))
    # fp32 compute: merged and unmerged differ only by summation order
    torch.testing.assert_close(_logits(model, x), trained, atol=2e-5, rtol=1e-5)
    lk.unmerge(model)
    assert all(l.weight is packed[p] for p, l in lk.model.adapted_layers(model)), "unmerge must restore the 4-bit tensor"
    assert torch.equal(_logits(model, x), trained)


def test_unload_merges_into_plain_float_linears():
    model, x = _quantized(compute_dtype=torch.float32), token_ids()
    lk.adapt(model, lk.LoRA(rank=4, alpha=8), "all-linear")
    randomize(model)
    expected = _logits(model, x)
    with pytest.warns(UserWarning, match="dequantized float copy"):
        plain = lk.unload(model, merge=True)
    linears = [m for m in plain.modules() if isinstance(m, nn.Linear)]
    assert all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in linears)
    torch.testing.assert_close(_logits(plain, x), expected, atol=2e-5, rtol=1e-5)
    requant = _quantized(compute_dtype=torch.float32)
    lk.adapt(requant, lk.LoRA(rank=4, alpha=8), "all-linear")
    lk.unload(requant, merge=False)
    assert all(type(m) is bnb.nn.Linear4bit for n, m in requant.named_modules() if "proj" in n.rsplit(".", 1)[-1])


def test_bf16_compute_merge_error_is_bf16_rounding():
    # The 4-bit matmul runs in bf16; the merged float32 copy does not round activations, so the two
    # differ by bf16's precision (8 bits of mantissa, relative 2^-8 ≈ 0.4% per product), nothing more.
    model, x = _quantized(compute_dtype=torch.bfloat16), token_ids()
    lk.adapt(model, lk.LoRA(rank=4, alpha=8), "all-linear")
    randomize(model)
    unmerged = _logits(model, x)
    with pytest.warns(UserWarning):
        lk.merge(model)
    merged = _logits(model, x)
    relative = ((merged - unmerged).norm() / unmerged.norm()).item()
    assert relative < 2 ** -7, relative


def test_transformers_4bit_model_is_adapted_and_matches_peft(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(hidden=64).save_pretrained(tmp_path / "base")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config).train()

    x = token_ids()
    ours = lk.adapt(load(), lk.LoRA(rank=4, alpha=8), "all-linear")
    randomize(ours)
    theirs = get_peft_model(load(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    assert "bnb" in type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__
    lk.save(ours, tmp_path / "adapter")
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(theirs, load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    torch.testing.assert_close(_logits(ours, x), _logits(theirs, x), atol=1e-5, rtol=1e-5)
    losses = []
    for model in (ours, theirs):  # and one training step gives the same gradients' effect
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.5)
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        losses.append(model(input_ids=x, labels=x).loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    theirs.save_pretrained(tmp_path / "peft")  # and PEFT's QLoRA adapter loads here
    torch.testing.assert_close(_logits(lk.load(load(), tmp_path / "peft"), x), _logits(theirs, x),
                               atol=1e-5, rtol=1e-5)


def test_adapter_trained_on_4bit_loads_on_a_float_base(tmp_path):
    x = token_ids()
    quantized = lk.adapt(_quantized(compute_dtype=torch.float32), lk.LoRA(rank=4, alpha=8), "all-linear")
    randomize(quantized)
    lk.save(quantized, tmp_path)
    full = lk.load(tiny_llama(hidden=64), tmp_path)
    reference = tiny_llama(hidden=64)
    q_logits, f_logits = _logits(quantized, x), _logits(full, x)
    # The same update on W instead of dequant(NF4(W)): off by NF4's error only (about 10% of W here).
    assert not torch.allclose(q_logits, f_logits, atol=1e-4)
    base_gap = (_logits(_quantized(compute_dtype=torch.float32), x) - _logits(reference, x)).norm()
    assert (q_logits - f_logits).norm() < 2 * base_gap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(40, 96), (24, 33)])  # an odd width takes bitsandbytes' own path
def test_cpu_4bit_matmul_equals_bitsandbytes_and_reuses_one_buffer(dtype, shape):
    import bitsandbytes.functional as bf

    layers = [lk.quantize(nn.Sequential(nn.Linear(shape[1], shape[0], bias=True)).to(dtype), mode, skip=())[0]
              for mode in ("nf4", "fp4")]
    x = torch.randn(5, shape[1], dtype=dtype, requires_grad=True)
    for layer in layers:
        got = lorakit.kinds._scratch_dequantized(layer.weight, dtype)
        assert torch.equal(got, bf.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
        ours = lorakit.kinds.QUANT_4BIT.forward(layer, x, layer.weight, layer.bias)
        (grad,) = torch.autograd.grad(ours.sum(), x)
        theirs = bnb.matmul_4bit(x, layer.weight.t(), bias=layer.bias, quant_state=layer.weight.quant_state)
        (their_grad,) = torch.autograd.grad(theirs.sum(), x)
        assert torch.equal(ours, theirs) and torch.equal(grad, their_grad)
    if shape[1] % 2 == 0:  # one buffer serves every layer and call on this thread: no per-call float copy
        first, second = (lorakit.kinds._scratch_dequantized(layer.weight, dtype) for layer in layers)
        assert first.data_ptr() == second.data_ptr()


def test_cpu_4bit_double_backward_sees_each_layers_own_weight():
    # create_graph=True: the backward's matmul is itself recorded and saves the dequantized weight;
    # the next layer's backward must not overwrite it (bitsandbytes' own matmul_4bit gets this right).
    import bitsandbytes.functional as bf

    torch.manual_seed(0)
    layers = [lk.quantize(nn.Sequential(nn.Linear(64, 64, bias=False)), "nf4", skip=())[0] for _ in range(2)]
    floats = [bf.dequantize_4bit(m.weight.data, m.weight.quant_state) for m in layers]
    x = torch.randn(3, 64, requires_grad=True)

    def hessian_vector(linear):
        y = linear(1, torch.tanh(linear(0, x)))
        (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), x)[0]

    ours = hessian_vector(lambda i, t: lorakit.kinds.QUANT_4BIT.forward(layers[i], t, layers[i].weight, None))
    expected = hessian_vector(lambda i, t: t @ floats[i].t())
    torch.testing.assert_close(ours, expected)


def test_cpu_4bit_matmul_falls_back_when_bitsandbytes_has_no_cpu_kernel(monkeypatch):
    # bitsandbytes' native-library wrappers never return None for a missing symbol: they return a
    # function that raises when called. Without a CPU kernel, its own (pure torch) dequantize must serve.
    import bitsandbytes.functional as bf
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary

    layer = lk.quantize(nn.Sequential(nn.Linear(64, 48)), "nf4", skip=())[0]
    x = torch.randn(5, 64)
    expected = lorakit.kinds.QUANT_4BIT.forward(layer, x, layer.weight, layer.bias)
    monkeypatch.setattr(bf, "lib", ErrorHandlerMockBNBNativeLibrary("simulated: no native library"))
    assert torch.equal(lorakit.kinds.QUANT_4BIT.forward(layer, x, layer.weight, layer.bias), expected)


def test_a_4bit_layer_keeps_no_float_weight_for_backward():
    model = lk.adapt(_quantized(compute_dtype=torch.float32), lk.LoRA(rank=4, alpha=8), "all-linear").train()
    weight_shapes = {tuple(m.weight.quant_state.shape) for m in model.modules()
                     if hasattr(getattr(m, "weight", None), "quant_state")}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        model(token_ids()).logits.sum()
    assert weight_shapes and not weight_shapes & set(saved)


def test_errors():
    with pytest.raises(lk.ConfigError, match="mode must be one of"):
        lk.quantize(tiny_llama(), "nf3")
    with pytest.raises(lk.ConfigError, match="blocksize"):
        lk.quantize(tiny_llama(), "nf4", blocksize=48)
    adapted = lk.adapt(tiny_llama(), lk.LoRA(rank=2), ["q_proj"])
    with pytest.raises(lk.UnsupportedLayerError, match="quantize the base first"):
        lk.quantize(adapted)
    with pytest.raises(lk.TargetNotFoundError):
        lk.quantize(tiny_llama(), targets=["qq_proj"])


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` then meets: ImportError
    with pytest.raises(lk.LorakitError, match="pip install"):
        lk.quantize(tiny_llama())


@pytest.mark.parametrize("method", [lk.PiSSA(rank=8), lk.MiLoRA(rank=8)], ids=["pissa", "milora"])
def test_qpissa_quantizes_the_residual(method, tmp_path):
    x, reference = token_ids(), tiny_llama(hidden=64)
    plain_error = (_logits(_quantized(compute_dtype=torch.float32), x) - _logits(reference, x)).norm()
    model = lk.adapt(tiny_llama(hidden=64), method, "all-linear")
    lk.quantize(model, "nf4", compute_dtype=torch.float32)
    assert all(isinstance(l.weight, bnb.nn.Params4bit) and l.principal_A is not None
               for _, l in lk.model.adapted_layers(model))
    start = _logits(model, x)
    with lk.disabled(model):
        torch.testing.assert_close(_logits(model, x), start, atol=1e-5, rtol=0)  # init is still a no-op
    error = (start - _logits(reference, x)).norm()
    if isinstance(method, lk.MiLoRA):  # the minor part is small: the residual is about as hard to quantize
        assert error < 1.2 * plain_error
    else:  # the residual has a flatter spectrum and a smaller range: smaller quantization error
        assert error < 0.9 * plain_error, (error, plain_error)
    optimizer = torch.optim.AdamW(lk.trainable_parameters(model), lr=1e-2)
    first = None
    for _ in range(5):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        first = first or loss.item()
    assert loss.item() < first
    trained = _logits(model, x)
    lk.save(model, tmp_path)  # the same file as on a float base: it reloads there, then quantizes the same way
    again = lk.quantize(lk.load(tiny_llama(hidden=64), tmp_path), "nf4", compute_dtype=torch.float32)
    torch.testing.assert_close(_logits(again, x), trained, atol=1e-5, rtol=1e-5)
    with pytest.raises(lk.MergeError, match="QPiSSA"):
        lk.unload(again, merge=False)
    with pytest.warns(UserWarning):
        plain = lk.unload(model, merge=True)
    torch.testing.assert_close(_logits(plain, x), trained, atol=2e-5, rtol=1e-5)


def test_route_on_a_quantized_base_matches_each_row_alone():
    model, x = _quantized(compute_dtype=torch.float32), token_ids()
    for name in ("a", "b"):
        lk.adapt(model, lk.LoRA(rank=4, alpha=8), "all-linear", name=name)
    randomize(model)
    names = ["b", None, "a"]
    with lk.route(model, names):
        routed = _logits(model, x)
    for i, name in enumerate(names):
        if name is None:
            with lk.disabled(model):
                alone = _logits(model, x[i:i + 1])
        else:
            lk.activate(model, name)
            alone = _logits(model, x[i:i + 1])
        torch.testing.assert_close(routed[i:i + 1], alone, atol=1e-5, rtol=1e-5)
