"""kohya and diffusers single-file LoRA formats, checked against diffusers' own readers and writers.

Tiny diffusers models from configs (the UNet as diffusers' own tests build it), fixed seeds, nothing from a hub.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

import lorakit as lk
from lorakit.layers import adapted_layers

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)


def tiny_text_encoder() -> CLIPTextModel:
    torch.manual_seed(1)
    return CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, vocab_size=1000, bos_token_id=0, eos_token_id=2,
                                        pad_token_id=1)).eval()


@pytest.fixture(scope="module")
def bases():
    return tiny_unet().eval(), tiny_text_encoder()


def trained(module, method, targets, seed=2, **kwargs):
    """``module`` adapted with ``method``, every lora_B (and magnitude) moved off its init so the update is real."""
    lk.adapt(module, method, targets, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return module


INPUTS = dict(sample=torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3)),
              timestep=torch.tensor([10, 500]),
              encoder_hidden_states=torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(4)))
IDS = torch.randint(3, 1000, (2, 7), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def outputs(unet=None, text_encoder=None):
    return ((unet(**INPUTS).sample if unet is not None else None),
            (text_encoder(IDS).last_hidden_state if text_encoder is not None else None))


def pipeline(unet, text_encoder):
    """A Stable Diffusion pipeline around ``unet`` and ``text_encoder``: what diffusers' LoRA loaders hang on
    (no tokenizer: the loaders never use it)."""
    torch.manual_seed(6)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.fixture(scope="module")
def adapted(bases):
    """A UNet and text encoder with kohya's default LoRA: per-module ranks and alphas on the UNet, rsLoRA on the
    text encoder (scales kohya's readers only see through alpha)."""
    unet, text_encoder = map(copy.deepcopy, bases)
    trained(unet, lk.LoRA(rank=4, alpha=8), "kohya", ranks={r"attn2": 2}, alphas={r"ff\.": 3.0})
    trained(text_encoder, lk.LoRA(rank=4, alpha=4, rslora=True), "kohya", seed=7)
    return unet, text_encoder


def test_kohya_file_holds_kohya_names_alphas_and_metadata(adapted, tmp_path):
    unet, text_encoder = adapted
    path = lk.save({"unet": unet, "text_encoder": text_encoder}, tmp_path / "lora.safetensors", format="kohya")
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
        assert f.get_tensor(f"{stem}.lora_down.weight").shape == (2, 32)
        assert f.get_tensor(f"{stem}.alpha").item() == 8.0  # alpha stays 8 where only the rank is overridden
        ff = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"
        assert f.get_tensor(f"{ff}.alpha").item() == 3.0
        # rsLoRA's scale alpha/sqrt(r) = 2 written as the alpha every reader divides by r: 2 * 4 = 8
        te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
        assert f.get_tensor(f"{te}.alpha").item() == pytest.approx(8.0)
    assert {k.split(".", 1)[1] for k in keys} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert len(keys) == 3 * (72 + 12)
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8"


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_round_trip_is_exact(adapted, bases, format, tmp_path):
    unet, text_encoder = adapted
    path = lk.save({"unet": unet, "text_encoder": text_encoder}, tmp_path / "lora.safetensors", format=format)
    unet2, text_encoder2 = map(copy.deepcopy, bases)
    lk.load({"unet": unet2, "text_encoder": text_encoder2}, path, name="sd")
    for ours, theirs in zip(outputs(unet, text_encoder), outputs(unet2, text_encoder2)):
        assert torch.equal(ours, theirs)
    assert lk.active_adapters(unet2) == ["sd"]
    # a pipeline object is read the same way
    pipe = pipeline(*map(copy.deepcopy, bases))
    lk.load(pipe, path)
    assert torch.equal(outputs(pipe.unet)[0], outputs(unet)[0])


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_diffusers_reads_our_files_with_equal_outputs(adapted, bases, format, tmp_path):
    unet, text_encoder = adapted
    path = lk.save({"unet": unet, "text_encoder": text_encoder}, tmp_path / "lora.safetensors", format=format)
    pipe = pipeline(*map(copy.deepcopy, bases))
    pipe.load_lora_weights(str(path))
    theirs = outputs(pipe.unet, pipe.text_encoder)
    ours = outputs(unet, text_encoder)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (ours[0] - outputs(bases[0])[0]).abs().max() > 1e-2  # the update is not a no-op


def test_conv_lora_round_trips_and_diffusers_reads_it(bases, tmp_path):
    unet = trained(copy.deepcopy(bases[0]), lk.LoRA(rank=4, alpha=4), "kohya-conv")
    path = lk.save(unet, tmp_path / "conv.safetensors", format="kohya")
    with safe_open(str(path), framework="pt") as f:
        down = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")
        assert down.shape == (4, 32, 3, 3)
        assert json.loads(f.metadata()["ss_network_args"]) == {"conv_dim": "4"}
    unet2 = copy.deepcopy(bases[0])
    lk.load(unet2, path)
    assert torch.equal(outputs(unet2)[0], outputs(unet)[0])
    pipe = pipeline(copy.deepcopy(bases[0]), copy.deepcopy(bases[1]))
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(outputs(pipe.unet)[0], outputs(unet)[0], rtol=1e-5, atol=1e-5)


def test_we_read_what_diffusers_writes(bases, tmp_path):
    """diffusers' save_lora_weights (PEFT keys under unet. / text_encoder., its LoraConfig as metadata) and its
    convert_state_dict_to_kohya: both load here with diffusers' outputs."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    unet, text_encoder = map(copy.deepcopy, bases)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_v", "proj_in"]))
    # PEFT itself for the text encoder: transformers' add_adapter wants a newer PEFT than the one we pin
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "out_proj"]), text_encoder)
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for module in (unet, text_encoder):
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    expected = outputs(unet, text_encoder)
    unet_layers, te_layers = get_peft_model_state_dict(unet), get_peft_model_state_dict(text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=unet_layers, text_encoder_lora_layers=te_layers,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text_encoder.peft_config["default"].to_dict())
    ours = dict(zip(("unet", "text_encoder"), map(copy.deepcopy, bases)))
    lk.load(ours, tmp_path / "pytorch_lora_weights.safetensors")
    for a, b in zip(outputs(ours["unet"], ours["text_encoder"]), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    kohya = convert_state_dict_to_kohya({**{f"unet.{k}": v for k, v in unet_layers.items()},
                                         **{f"text_encoder.{k}": v for k, v in te_layers.items()}})
    # diffusers' converter writes alpha = rank; give them the configs' alphas, as kohya's trainer would
    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = torch.tensor(4.0 if key.startswith("lora_te") else 2.0)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(tmp_path / "kohya.safetensors"))
    ours = dict(zip(("unet", "text_encoder"), map(copy.deepcopy, bases)))
    lk.load(ours, tmp_path / "kohya.safetensors")
    for a, b in zip(outputs(ours["unet"], ours["text_encoder"]), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_kohya_file_without_alphas_has_scale_one(bases, tmp_path):
    unet = trained(copy.deepcopy(bases[0]), lk.LoRA(rank=4, alpha=4), ["to_q"])  # alpha = rank: scale 1
    path = lk.save(unet, tmp_path / "a.safetensors", format="kohya")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.endswith(".alpha")}
    save_file(tensors, str(tmp_path / "no_alpha.safetensors"))
    unet2 = copy.deepcopy(bases[0])
    lk.load(unet2, tmp_path / "no_alpha.safetensors")
    assert torch.equal(outputs(unet2)[0], outputs(unet)[0])


def test_dora_is_written_as_dora_scale_and_round_trips(bases, tmp_path):
    unet = trained(copy.deepcopy(bases[0]), lk.DoRA(rank=4, alpha=8), ["to_q", "to_k", "conv1"])
    path = lk.save(unet, tmp_path / "dora.safetensors", format="kohya")
    with safe_open(str(path), framework="pt") as f:
        stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
        layer = unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
        scale = f.get_tensor(f"{stem}.dora_scale")
        assert scale.shape == (64, 1)  # LyCORIS's layout: one norm per output feature
        assert torch.equal(scale.flatten(), layer.adapters["default"].magnitude.detach())
        assert f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.dora_scale").shape == (32, 1, 1, 1)
    unet2 = copy.deepcopy(bases[0])
    lk.load(unet2, path)
    assert torch.equal(outputs(unet2)[0], outputs(unet)[0])
    assert type(unet2.get_submodule("down_blocks.0.resnets.0.conv1").recipes["default"]) is lk.DoRA


def test_pissa_is_written_as_the_equivalent_lora(bases, tmp_path):
    unet = trained(copy.deepcopy(bases[0]), lk.PiSSA(rank=4), ["to_q", "to_v"])
    path = lk.save(unet, tmp_path / "p.safetensors", format="kohya")
    unet2 = copy.deepcopy(bases[0])
    lk.load(unet2, path)
    torch.testing.assert_close(outputs(unet2)[0], outputs(unet)[0], rtol=1e-5, atol=1e-5)


def test_what_a_format_cannot_hold_is_refused_naming_the_way_out(bases, tmp_path):
    unet = lk.adapt(copy.deepcopy(bases[0]), lk.SVF(), ["to_q"])
    with pytest.raises(lk.ConfigError, match=r"SVF has no equivalent in this format.*lorakit resize"):
        lk.save(unet, tmp_path / "svf.safetensors", format="kohya")
    text_encoder = lk.adapt(copy.deepcopy(bases[1]), lk.LoRA(rank=2), ["token_embedding"])
    with pytest.raises(lk.ConfigError, match="no LoRA on embeddings"):
        lk.save(text_encoder, tmp_path / "e.safetensors", format="kohya")
    text_encoder = lk.adapt(copy.deepcopy(bases[1]), lk.LoRA(rank=2), ["q_proj"], train=["final_layer_norm"])
    with pytest.raises(lk.ConfigError, match="trains its own copies.*format='peft'"):
        lk.save(text_encoder, tmp_path / "t.safetensors", format="diffusers")
    assert not list(tmp_path.iterdir())  # nothing written


def _kohya_file(adapted, tmp_path, change):
    unet, text_encoder = adapted
    path = lk.save({"unet": unet, "text_encoder": text_encoder}, tmp_path / "good.safetensors", format="kohya")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    return tmp_path / "bad.safetensors"


TE_Q = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"


@pytest.mark.parametrize("change, error, message", [
    (lambda t: t.update({"lora_vae_x.lora_down.weight": torch.zeros(1)}), lk.AdapterFileError,
     r"'lora_vae_x.lora_down.weight' has none of kohya's prefixes"),
    (lambda t: t.update({f"{TE_Q}.hada_w1_a": torch.zeros(1)}), lk.AdapterFileError, "a LyCORIS LoHa file"),
    (lambda t: t.update({f"{TE_Q}.lora_up.weight": torch.zeros(32, 3)}), lk.ShapeMismatchError, "q_proj"),
    (lambda t: t.pop(f"{TE_Q}.lora_up.weight"), lk.AdapterFileError, r"encoder\.layers\.1\.self_attn\.q_proj has no lora_up"),
    (lambda t: t.update({"lora_te_text_model_encoder_layers_9_mlp_fc1.lora_down.weight": torch.zeros(4, 32)}),
     lk.ShapeMismatchError, "layers_9_mlp_fc1.lora_down.weight' names a module the text_encoder does not have"),
    (lambda t: t.update({f"{TE_Q}.alpha": torch.tensor(float("nan"))}), lk.AdapterFileError, "q_proj"),
])
def test_a_malformed_file_names_the_key_and_changes_nothing(adapted, bases, tmp_path, change, error, message):
    bad = _kohya_file(adapted, tmp_path, change)
    unet, text_encoder = map(copy.deepcopy, bases)
    with pytest.raises(error, match=message):
        lk.load({"unet": unet, "text_encoder": text_encoder}, bad)
    assert lk.adapter_names(unet) == [] and lk.adapter_names(text_encoder) == []  # the UNet's part was fine


def test_a_truncated_file_is_refused(adapted, tmp_path):
    path = lk.save(adapted[0], tmp_path / "lora.safetensors", format="kohya")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(lk.AdapterFileError, match="truncated or corrupt"):
        lk.load(tiny_unet(), path)


def test_components_the_model_lacks_are_named(adapted, bases, tmp_path):
    path = lk.save({"unet": adapted[0], "text_encoder": adapted[1]}, tmp_path / "lora.safetensors", format="kohya")
    unet = copy.deepcopy(bases[0])
    with pytest.warns(UserWarning, match="also holds LoRA for text_encoder, not loaded"):
        lk.load(unet, path)
    assert torch.equal(outputs(unet)[0], outputs(adapted[0])[0])
    only_te = lk.save(adapted[1], tmp_path / "te.safetensors", format="kohya")
    with pytest.raises(lk.AdapterFileError, match="holds LoRA for text_encoder, and the model given is unet"):
        lk.load(copy.deepcopy(bases[0]), only_te)


def test_two_text_encoders_are_te1_and_te2(bases, tmp_path):
    first = trained(copy.deepcopy(bases[1]), lk.LoRA(rank=2), ["q_proj"])
    second = trained(copy.deepcopy(bases[1]), lk.LoRA(rank=2), ["v_proj"], seed=9)
    path = lk.save({"text_encoder": first, "text_encoder_2": second}, tmp_path / "xl.safetensors", format="kohya")
    with safe_open(str(path), framework="pt") as f:
        assert {k.split("_text_model")[0] for k in f.keys()} == {"lora_te1", "lora_te2"}
    a, b = copy.deepcopy(bases[1]), copy.deepcopy(bases[1])
    lk.load({"text_encoder": a, "text_encoder_2": b}, path)
    assert torch.equal(outputs(text_encoder=a)[1], outputs(text_encoder=first)[1])
    assert torch.equal(outputs(text_encoder=b)[1], outputs(text_encoder=second)[1])


def test_transformers_adapt_and_load_in_diffusers(tmp_path):
    """SD3- and Flux-style transformers: the kohya preset picks their blocks' layers, and diffusers (through
    PEFT) loads our diffusers-format file onto the same transformer with equal outputs."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(10)
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                pooled_projection_dim=16, out_channels=4).eval()
    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                  axes_dims_rope=[4, 4, 8]).eval()
    g = torch.Generator().manual_seed(11)
    sd3_inputs = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                      pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([3]))
    flux_inputs = dict(hidden_states=torch.randn(1, 16, 4, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                       pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
                       img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3))
    for model, inputs in ((sd3, sd3_inputs), (flux, flux_inputs)):
        base = copy.deepcopy(model)
        trained(model, lk.LoRA(rank=4, alpha=8), "kohya")
        assert any(p.endswith("attn.to_q") for p, _ in adapted_layers(model))
        path = lk.save(model, tmp_path / f"{type(model).__name__}.safetensors", format="diffusers")
        with pytest.raises(lk.ConfigError, match="format='diffusers'"):
            lk.save(model, tmp_path / "k.safetensors", format="kohya")
        with torch.no_grad():
            ours = model(**inputs).sample
            before = base(**inputs).sample
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # use_safetensors: without it diffusers reads the tensors but not the metadata with the alphas
                base.load_lora_adapter(str(path), prefix="transformer", use_safetensors=True)
            theirs = base(**inputs).sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        assert (ours - before).abs().max() > 1e-3


def test_convert_command_round_trips_through_peft(adapted, bases, tmp_path):
    """`lorakit convert`: kohya -> a PEFT directory (which PEFT itself loads, equal outputs) -> kohya again,
    tensor for tensor the file we started from."""
    from peft import PeftModel

    from lorakit.cli import main

    unet_dir = tmp_path / "unet"
    bases[0].save_pretrained(unet_dir)
    kohya = lk.save(adapted[0], tmp_path / "lora.safetensors", format="kohya")
    assert main(["convert", str(kohya), str(tmp_path / "peft"), "--to", "peft", "--model", str(unet_dir)]) == 0
    peft_unet = PeftModel.from_pretrained(copy.deepcopy(bases[0]), tmp_path / "peft").eval()
    torch.testing.assert_close(outputs(peft_unet)[0], outputs(adapted[0])[0], rtol=1e-5, atol=1e-5)
    ours = lk.load(copy.deepcopy(bases[0]), tmp_path / "peft" / "adapter_model.safetensors")  # the directory's file
    assert torch.equal(outputs(ours)[0], outputs(adapted[0])[0])
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "back.safetensors"), "--to", "kohya",
                 "--model", str(unet_dir)]) == 0
    with safe_open(str(kohya), framework="pt") as a, safe_open(str(tmp_path / "back.safetensors"), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    # a format that cannot hold the adapter is an error message, not a traceback
    assert main(["convert", str(kohya), str(tmp_path / "x.bin"), "--to", "kohya", "--model", str(unet_dir)]) == 2
