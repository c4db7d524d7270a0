"""GGUF export for llama.cpp: LoRA adapter files and merged models, read back with gguf-py's reader; the slow
test runs llama.cpp itself (llama-cpp-python) on the embedded SmolLM2 as the oracle."""

from __future__ import annotations

import copy
import math

import gguf
import numpy as np
import pytest
import torch

import lorakit as lk
from conftest import randomize, tiny_gpt2, tiny_llama, token_ids
from lorakit.formats.gguf import export_lora, export_merged

# llama.cpp's names for a Llama block's linear layers, written out here rather than taken from gguf-py's map.
BLOCK_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
OTHER_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
NORM_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _gguf_name(key: str) -> str:
    """llama.cpp's tensor name for a Hugging Face Llama state-dict key (``model.layers.1.mlp.up_proj.weight``)."""
    if key in OTHER_NAMES:
        return OTHER_NAMES[key]
    _, _, block, rest = key.split(".", 3)
    module, _, suffix = rest.rpartition(".")
    return f"blk.{block}.{BLOCK_NAMES.get(module) or NORM_NAMES[module]}.{suffix}"


def _heads(config, name: str) -> int | None:
    """The head count llama.cpp's converter permutes tensor ``name``'s rows by (None: not permuted)."""
    if name.endswith(".attn_q.weight"):
        return config.num_attention_heads
    if name.endswith(".attn_k.weight"):
        return config.num_key_value_heads
    return None


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp writes q / k."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _read(path):
    """(metadata {key: value}, tensors {name: float32 torch tensor in numpy order}, reader) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in reader.tensors
               if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)}
    return fields, tensors, reader


def _file_delta(tensors, alpha: float, name: str, config) -> torch.Tensor:
    """The update llama.cpp adds to weight ``name`` from a LoRA file, in Hugging Face's row order:
    (alpha / r)·B·A with r = B's ne[0] (src/llama-adapter.cpp), B's q / k rows put back."""
    A, B = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
    heads = _heads(config, name)
    if heads is not None:
        B = _unpermute(B, heads)
    return (alpha / B.shape[1]) * (B @ A)


def _check_deltas(model, path, name: str = "default", atol: float = 1e-6) -> dict:
    """Every adapted module's lorakit ΔW equals what llama.cpp computes from the file; returns the metadata."""
    fields, tensors, _ = _read(path)
    layers = [(p, layer) for p, layer in lk.model.adapted_layers(model) if name in layer.adapters]
    assert set(tensors) == {f"{_gguf_name(p + '.weight')}.{ab}" for p, _ in layers for ab in ("lora_a", "lora_b")}
    for module_path, layer in layers:
        expected = layer.adapters[name].delta_weight()
        assert expected.abs().max() > 1e-3, module_path  # a real update, not zeros on both sides
        got = _file_delta(tensors, fields["adapter.lora.alpha"], _gguf_name(module_path + ".weight"), model.config)
        torch.testing.assert_close(got, expected, atol=atol, rtol=1e-5, msg=module_path)
    return fields


def _adapted(method, targets="all-linear", seed: int = 0, model=None, **kwargs):
    model = lk.adapt(model or tiny_llama(seed), method, targets, **kwargs)
    randomize(model, std=0.3)
    return model


# --- LoRA adapter files ---------------------------------------------------------------------------------------------
def test_a_lora_file_has_llama_cpps_metadata_names_shapes_and_the_exact_update(tmp_path):
    model = _adapted(lk.LoRA(rank=4, alpha=8))
    path = export_lora(model, tmp_path / "lora.gguf")
    assert path == tmp_path / "lora.gguf"
    fields = _check_deltas(model, path)
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    reader = gguf.GGUFReader(path)
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    # ggml's shapes, innermost first: lora_a is [d_in, r] and lora_b [r, d_out], what llama-adapter.cpp checks.
    shapes = {t.name: t.shape.tolist() for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == [32, 4] and shapes["blk.0.attn_q.weight.lora_b"] == [4, 32]
    assert shapes["blk.1.attn_k.weight.lora_b"] == [4, 16]  # 2 kv heads of 8
    assert shapes["blk.1.ffn_down.weight.lora_a"] == [64, 4] and shapes["blk.1.ffn_down.weight.lora_b"] == [4, 32]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    assert len(shapes) == 2 * 7 * 2


def test_per_module_ranks_and_alphas_each_keep_their_scale(tmp_path):
    model = _adapted(lk.LoRA(rank=4, alpha=8), ranks={"v_proj": 2, r"layers\.1\.mlp": 6}, alphas={"o_proj": 3.0})
    fields = _check_deltas(model, export_lora(model, tmp_path / "lora.gguf"))
    assert fields["adapter.lora.alpha"] == 8.0  # the most common module's
    # Modules at the file's alpha are written as they are; the others carry their own scale in B.
    _, tensors, _ = _read(tmp_path / "lora.gguf")
    layers = dict(lk.model.adapted_layers(model))
    v = layers["model.layers.0.self_attn.v_proj"].adapters["default"]
    assert torch.equal(tensors["blk.0.attn_v.weight.lora_b"], v.lora_B)
    assert not torch.equal(tensors["blk.0.attn_output.weight.lora_b"],
                           layers["model.layers.0.self_attn.o_proj"].adapters["default"].lora_B)


def test_rslora_scales_alpha_over_root_rank_as_llama_cpp_reads_alpha_over_rank(tmp_path):
    model = _adapted(lk.LoRA(rank=4, alpha=8, rslora=True), ranks={"q_proj": 2})
    fields = _check_deltas(model, export_lora(model, tmp_path / "lora.gguf"))
    assert fields["adapter.lora.alpha"] == pytest.approx(8 * math.sqrt(4))  # alpha·√r: alpha/r is 8/√4


@pytest.mark.parametrize("method", [lk.PiSSA(rank=3), lk.MiLoRA(rank=3), lk.LoRAXS(rank=3),
                                    lk.AdaLoRA(init_rank=4, target_rank=2, total_steps=10)], ids=lambda m: m.name)
def test_methods_with_a_low_rank_update_are_written_as_that_lora(tmp_path, method):
    model = _adapted(method)
    _check_deltas(model, export_lora(model, tmp_path / "lora.gguf"), atol=1e-5)


def test_pissa_is_written_as_its_plain_rank_2r_lora(tmp_path):
    model = _adapted(lk.PiSSA(rank=3), ["q_proj", "k_proj"])
    _check_deltas(model, export_lora(model, tmp_path / "lora.gguf"), atol=1e-5)
    reader = gguf.GGUFReader(tmp_path / "lora.gguf")
    assert {tuple(t.shape.tolist()) for t in reader.tensors if t.name.endswith("lora_b")} == {(6, 32), (6, 16)}


def test_f16_factors(tmp_path):
    model = _adapted(lk.LoRA(rank=4, alpha=8), ["q_proj", "v_proj"])
    path = export_lora(model, tmp_path / "lora.gguf", outtype="f16")
    assert {t.tensor_type for t in gguf.GGUFReader(path).tensors} == {gguf.GGMLQuantizationType.F16}
    _check_deltas(model, path, atol=2e-3)


def _rope_scores(q: torch.Tensor, k: torch.Tensor, heads: int, kv_heads: int, interleaved: bool) -> torch.Tensor:
    """Attention scores q·k (heads, T, T) after rotary embedding at positions 0..T-1: Hugging Face's (each head's
    first half rotates against its second) or llama.cpp's LLAMA_ROPE_TYPE_NORM (adjacent pairs rotate)."""
    T, d = q.shape[0], q.shape[1] // heads
    frequencies = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * frequencies
    cos, sin = angles.cos(), angles.sin()  # (T, d/2)

    def rotate(x, n):  # (T, n·d) -> (n, T, d)
        x = x.double().view(T, n, d).transpose(0, 1)
        if interleaved:
            a, b = x[..., 0::2], x[..., 1::2]
            return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        a, b = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    k = rotate(k, kv_heads).repeat_interleave(heads // kv_heads, dim=0)  # query head h reads kv head h // group
    return rotate(q, heads) @ k.transpose(1, 2)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_q_and_k_updates_give_llama_cpps_rotary_the_scores_they_give_hugging_faces(tmp_path, kv_heads):
    """The permutation checked by what it is for: llama.cpp's rotary on the file's rows computes the attention
    scores Hugging Face's rotary computes on the model's, with grouped-query heads (kv_heads < heads) too."""
    model = _adapted(lk.LoRA(rank=4, alpha=8), ["q_proj", "k_proj"], model=tiny_llama(num_key_value_heads=kv_heads))
    fields, tensors, _ = _read(export_lora(model, tmp_path / "lora.gguf"))
    layers = dict(lk.model.adapted_layers(model))
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    alpha = fields["adapter.lora.alpha"]

    def ours(module):
        return x @ layers[f"model.layers.0.self_attn.{module}"].adapters["default"].delta_weight().double().t()

    def theirs(name):
        A, B = tensors[f"blk.0.{name}.weight.lora_a"].double(), tensors[f"blk.0.{name}.weight.lora_b"].double()
        return x @ ((alpha / B.shape[1]) * B @ A).t()

    expected = _rope_scores(ours("q_proj"), ours("k_proj"), 4, kv_heads, interleaved=False)
    got = _rope_scores(theirs("attn_q"), theirs("attn_k"), 4, kv_heads, interleaved=True)
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# --- what a LoRA file cannot hold -----------------------------------------------------------------------------------
def test_dora_is_refused_naming_the_ways_out(tmp_path):
    model = _adapted(lk.DoRA(rank=4), ["q_proj"])
    with pytest.raises(lk.ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj: adapter 'default' is DoRA") as e:
        export_lora(model, tmp_path / "lora.gguf")
    assert "--format merged-gguf" in str(e.value) and "lorakit resize ADAPTER --rank R" in str(e.value)
    assert not (tmp_path / "lora.gguf").exists()


def test_a_model_that_is_not_llama_is_refused_naming_its_architecture(tmp_path):
    model = _adapted(lk.LoRA(rank=2), ["c_attn"], model=tiny_gpt2())
    with pytest.raises(lk.ConfigError, match=r"GPT2LMHeadModel \(model_type 'gpt2'\): GGUF export writes "
                                             r"Llama-architecture"):
        export_lora(model, tmp_path / "lora.gguf")
    with pytest.raises(lk.ConfigError, match=r"model_type 'gpt2'"):
        export_merged(model, tmp_path / "merged.gguf", base_gguf=tmp_path / "any.gguf")


def test_modules_llama_cpp_has_no_lora_tensor_for_are_refused_naming_them(tmp_path):
    embedding = _adapted(lk.LoRA(rank=2), ["embed_tokens", "q_proj"])
    with pytest.raises(lk.ConfigError, match=r"model\.embed_tokens: an embedding layer; .* linear layers only"):
        export_lora(embedding, tmp_path / "lora.gguf")
    tied = _adapted(lk.LoRA(rank=2), ["lm_head"], model=tiny_llama(tie_word_embeddings=True))
    with pytest.raises(lk.ConfigError, match=r"lm_head: the model ties its output head to the input embedding"):
        export_lora(tied, tmp_path / "lora.gguf")
    trained = _adapted(lk.LoRA(rank=2), ["q_proj"], train=["model.norm"])
    with pytest.raises(lk.ConfigError, match=r"model\.norm: adapter 'default' trains its own copy .*merged-gguf"):
        export_lora(trained, tmp_path / "lora.gguf")
    with pytest.raises(lk.ConfigError, match=r"outtype must be one of \['f16', 'f32'\], got 'q8_0'"):
        export_lora(trained, tmp_path / "lora.gguf", outtype="q8_0")
    with pytest.raises(lk.AdapterNotFoundError, match=r"no adapter named 'other'"):
        export_lora(trained, tmp_path / "lora.gguf", name="other")
    assert not list(tmp_path.iterdir())


def test_an_unwritable_path_is_an_adapter_file_error_and_leaves_no_file(tmp_path):
    model = _adapted(lk.LoRA(rank=2), ["q_proj"])
    base = _base_file(tmp_path, tiny_llama())
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    try:
        if _writable(directory):  # root ignores modes: write under a file instead
            directory = tmp_path / "a-file"
            directory.write_text("mine")
        with pytest.raises(lk.AdapterFileError, match=rf"{directory}/lora\.gguf: cannot write it"):
            export_lora(model, directory / "lora.gguf")
        with pytest.raises(lk.AdapterFileError, match=rf"{directory}/merged\.gguf: cannot write it"):
            export_merged(model, directory / "merged.gguf", base_gguf=base)
        assert [p.name for p in tmp_path.rglob("*") if "gguf" in p.name] == ["base.gguf"]  # no temporary file
    finally:
        (tmp_path / "read-only").chmod(0o755)


def test_a_write_that_fails_half_way_leaves_the_old_file_as_it_was(tmp_path, monkeypatch):
    model = _adapted(lk.LoRA(rank=2), ["q_proj"])
    path = export_lora(model, tmp_path / "lora.gguf")
    before = path.read_bytes()

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)  # after the header is on disk
    with pytest.raises(lk.AdapterFileError, match=r"lora\.gguf: cannot write it \(No space left on device\)"):
        export_lora(_adapted(lk.LoRA(rank=2), ["q_proj"], seed=1), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["lora.gguf"]


def _writable(directory) -> bool:
    try:
        (directory / "probe").write_text("")
    except PermissionError:
        return False
    (directory / "probe").unlink()
    return True


# --- merged models ----------------------------------------------------------------------------------------------
def _base_file(tmp_path, model, quantized=("token_embd.weight",), name: str = "base.gguf"):
    """A GGUF file of ``model`` as llama.cpp's convert_hf_to_gguf.py lays it out: its names, q / k permuted, a
    few hyperparameters and tokenizer keys; ``quantized`` tensors in Q8_0 (the rest f32)."""
    config = model.config
    path = tmp_path / name
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    writer.add_array("tokenizer.ggml.scores", [float(i) / 7 for i in range(config.vocab_size)])
    for key, value in model.state_dict().items():
        if "rotary" in key or (key == "lm_head.weight" and config.tie_word_embeddings):
            continue
        name_ = _gguf_name(key)
        value = value.float()
        if _heads(config, name_) is not None:
            value = _permute(value, _heads(config, name_))
        data = value.numpy()
        if name_ in quantized:
            writer.add_tensor(name_, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name_, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _raw(reader) -> dict:
    return {t.name: (t.tensor_type, t.shape.tolist(), bytes(np.asarray(t.data).tobytes())) for t in reader.tensors}


@pytest.mark.parametrize("method", [lk.LoRA(rank=4, alpha=8), lk.DoRA(rank=4), lk.SVF()], ids=lambda m: m.name)
def test_a_merged_model_copies_the_base_file_and_writes_w0_plus_delta(tmp_path, method):
    model = _adapted(method, ["q_proj", "k_proj", "v_proj", "down_proj"], model=tiny_llama(num_key_value_heads=1))
    base = _base_file(tmp_path, tiny_llama(num_key_value_heads=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = token_ids()
    with torch.no_grad():
        logits = model(x).logits
    path = export_merged(model, tmp_path / "merged.gguf", base_gguf=base, outtype="f32")

    with torch.no_grad():  # the model is as it was
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert torch.equal(model(x).logits, logits)
    base_fields, _, base_reader = _read(base)
    fields, tensors, reader = _read(path)
    assert fields == base_fields and fields["tokenizer.ggml.tokens"][5] == "t5"
    base_raw, raw = _raw(base_reader), _raw(reader)
    assert list(raw) == list(base_raw)
    reference = lk.merge(copy.deepcopy(model))  # lorakit's own merge is the oracle for W0 + ΔW
    adapted = {_gguf_name(p + ".weight"): p for p, _ in lk.model.adapted_layers(model)}
    assert len(adapted) == 8
    for name, (kind, shape, data) in raw.items():
        if name not in adapted:
            assert (kind, shape, data) == base_raw[name], name
            continue
        assert kind == gguf.GGMLQuantizationType.F32 and shape == base_raw[name][1]
        heads = _heads(model.config, name)
        got = tensors[name] if heads is None else _unpermute(tensors[name], heads)
        expected = reference.get_submodule(adapted[name]).weight
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6, msg=name)
        assert not torch.equal(got, before[adapted[name] + ".weight"])


def test_a_merged_model_in_f16_is_f16_where_merged(tmp_path):
    model = _adapted(lk.LoRA(rank=4, alpha=8), ["q_proj", "up_proj"])
    path = export_merged(model, tmp_path / "merged.gguf", base_gguf=_base_file(tmp_path, tiny_llama()))
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_up.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_k.weight"] == gguf.GGMLQuantizationType.F32
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    _, tensors, _ = _read(path)
    reference = lk.merge(copy.deepcopy(model))
    torch.testing.assert_close(tensors["blk.1.ffn_up.weight"], reference.model.layers[1].mlp.up_proj.weight,
                               atol=2e-3, rtol=1e-3)


def test_a_merged_embedding_on_a_tied_model_leaves_the_head_as_it_was(tmp_path):
    """llama.cpp reads the head from token_embd when a file has no output.weight: merging the embedding's update
    there would change the head too, which lorakit's adapter does not; the head gets its own tensor."""
    model = _adapted(lk.LoRA(rank=2), ["embed_tokens", "lm_head"], model=tiny_llama(tie_word_embeddings=True))
    base = _base_file(tmp_path, tiny_llama(tie_word_embeddings=True), quantized=())
    _, tensors, reader = _read(export_merged(model, tmp_path / "merged.gguf", base_gguf=base, outtype="f32"))
    reference = _untied_merged(model)
    torch.testing.assert_close(tensors["token_embd.weight"], reference.model.embed_tokens.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(tensors["output.weight"], reference.lm_head.weight, atol=1e-6, rtol=0)
    assert not torch.equal(tensors["output.weight"], tensors["token_embd.weight"])
    assert [t.name for t in reader.tensors][-1] == "output.weight"

    only_embedding = _adapted(lk.LoRA(rank=2), ["embed_tokens"], model=tiny_llama(tie_word_embeddings=True))
    _, tensors, _ = _read(export_merged(only_embedding, tmp_path / "merged.gguf", base_gguf=base, outtype="f32"))
    assert torch.equal(tensors["output.weight"], only_embedding.lm_head.weight.detach())


def _untied_merged(model):
    from lorakit.train.models import untie

    twin = copy.deepcopy(model)
    untie(twin)
    return lk.merge(twin)


def test_a_base_file_that_does_not_fit_is_refused_naming_the_module_and_file(tmp_path):
    model = _adapted(lk.LoRA(rank=2), ["up_proj"])
    base = _base_file(tmp_path, tiny_llama(intermediate_size=48))
    with pytest.raises(lk.ShapeMismatchError, match=rf"model\.layers\.0\.mlp\.up_proj: its merged weight has shape "
                                                    rf"\(64, 32\), but blk\.0\.ffn_up\.weight in {base} has "
                                                    r"\(48, 32\)"):
        export_merged(model, tmp_path / "merged.gguf", base_gguf=base)
    assert not (tmp_path / "merged.gguf").exists()
    deeper = _adapted(lk.LoRA(rank=2), ["up_proj"], model=tiny_llama(num_hidden_layers=3))
    with pytest.raises(lk.ShapeMismatchError, match=r"model\.layers\.2\.mlp\.up_proj: .* has no tensor blk\.2\.ffn_up"):
        export_merged(deeper, tmp_path / "merged.gguf", base_gguf=_base_file(tmp_path, tiny_llama(), name="two.gguf"))


def test_a_merged_model_needs_a_base_file_unless_it_is_the_embedded_default(tmp_path):
    model = _adapted(lk.LoRA(rank=2), ["q_proj"])
    with pytest.raises(lk.ConfigError, match=r"needs base_gguf= \(--base-gguf FILE\).*convert_hf_to_gguf"):
        export_merged(model, tmp_path / "merged.gguf")
    with pytest.raises(lk.AdapterFileError, match=r"missing\.gguf: not a readable GGUF file"):
        export_merged(model, tmp_path / "merged.gguf", base_gguf=tmp_path / "missing.gguf")
    lora = export_lora(model, tmp_path / "lora.gguf")
    with pytest.raises(lk.ConfigError, match=r"lora\.gguf: a GGUF file of type 'adapter', not a model"):
        export_merged(model, tmp_path / "merged.gguf", base_gguf=lora)


# --- llama.cpp itself as the oracle ---------------------------------------------------------------------------------
TEXT = ("The capital of France is Paris, and the capital of Italy is Rome. Water boils at one hundred degrees "
        "Celsius at sea level. To make a cup of tea, first boil the water, then pour it over the leaves and wait "
        "three minutes before you drink it.")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.mark.slow
def test_llama_cpp_runs_the_exported_lora_and_the_merged_model_as_lorakit_does(tmp_path):
    """The embedded SmolLM2 (Q4_1 in llama.cpp, the same grid dequantized to float32 here) with a random LoRA
    on attention and down_proj (logits move by about one unit on average, several at most).

    llama.cpp's base and ours differ slightly (it quantizes activations for its Q4_1 products), so the measure
    is the change the adapter makes: llama.cpp's (with --lora, minus without) against lorakit's (adapted minus
    lk.disabled), over every position's logits. Measured: cosine 0.967, argmax agreement of the adapted logits
    98.1%; the merged file against llama.cpp with the LoRA file: cosine of changes 0.978."""
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("llama-cpp-python is not installed, and this test runs llama.cpp: .venv/bin/pip install "
                    "llama-cpp-python (it compiles llama.cpp, about 10 minutes; .ci/run installs it)")
    from lorakit.train import models

    model, _ = models.load()
    lk.adapt(model, lk.LoRA(rank=8, alpha=16), ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lk.model.adapted_layers(model):
            B = layer.adapters["default"].lora_B
            B.copy_(torch.randn(B.shape, generator=g) * 0.08)
    lora = export_lora(model, tmp_path / "lora.gguf")
    merged = export_merged(model, tmp_path / "merged.gguf")  # on the embedded default's own GGUF file

    def llama_cpp_logits(model_path, **kwargs) -> tuple[list[int], np.ndarray]:
        llm = llama_cpp.Llama(model_path=str(model_path), logits_all=True, n_ctx=256, verbose=False, seed=0,
                              n_threads=2, **kwargs)
        ids = llm.tokenize(TEXT.encode())
        llm.eval(ids)
        return ids, np.array(llm.scores[: len(ids)], dtype=np.float64)

    ids, base = llama_cpp_logits(models.default_gguf())
    _, with_lora = llama_cpp_logits(models.default_gguf(), lora_path=str(lora))
    _, merged_logits = llama_cpp_logits(merged)
    assert len(ids) >= 40
    with torch.no_grad():
        x = torch.tensor([ids])
        ours = model(x).logits[0].double().numpy()
        with lk.disabled(model):
            ours_base = model(x).logits[0].double().numpy()

    ours_change, theirs_change = ours - ours_base, with_lora - base
    assert np.abs(ours_change).mean() > 0.5  # the adapter moves the logits well beyond the bases' difference
    cosine = _cosine(theirs_change, ours_change)
    agreement = float((with_lora.argmax(-1) == ours.argmax(-1)).mean())
    merged_cosine = _cosine(merged_logits - base, theirs_change)
    print(f"llama.cpp vs lorakit: cosine of logit changes {cosine:.4f}, argmax agreement {agreement:.1%}; "
          f"merged vs --lora: cosine of changes {merged_cosine:.5f}, max |logit difference| "
          f"{np.abs(merged_logits - with_lora).max():.3f}; bases' mean |difference| "
          f"{np.abs(base - ours_base).mean():.3f}")
    assert cosine >= 0.9 and agreement >= 0.9
    # Measured 0.978: the merged tensors are f16 while --lora runs on the Q4_1 base, whose CPU matmuls also
    # quantize activations to 8 bits; the two paths differ by that, not by the update.
    assert merged_cosine >= 0.95
