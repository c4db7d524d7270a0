"""Spectra, learned-update spectra, resize and rank advice, on weights with planted spectra: every measure
against its closed form, resize against the truncated SVD and through PEFT, advice against the budget."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch import nn

import lorakit as lk
from conftest import randomize, tiny_llama, token_ids
from lorakit import analysis
from lorakit.cli import main as cli
from lorakit.train import config as cfg
from lorakit.train.spectra import ranks_yaml
from test_train import save_tiny_model


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]


def planted(d_out: int, d_in: int, S, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W = U·diag(S)·Vᵀ, U, V) with the given singular values and random orthonormal U, V."""
    S = torch.as_tensor(S, dtype=torch.float64)
    U, V = orthonormal(d_out, len(S), seed), orthonormal(d_in, len(S), seed + 1)
    return (U * S) @ V.t(), U, V


def linear_with(W: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(W)
    return layer


# --- measures ------------------------------------------------------------------------------------------------------
def closed_form(S: list[float]) -> dict:
    energy = sum(s * s for s in S)
    p = [s / sum(S) for s in S]
    cumulative = [sum(s * s for s in S[:k + 1]) / energy for k in range(len(S))]
    return {"sigma_max": max(S), "sigma_min": min(S), "stable_rank": energy / max(S) ** 2,
            "effective_rank": math.exp(-sum(q * math.log(q) for q in p)),
            **{f"energy_rank_{n}": next(k + 1 for k, c in enumerate(cumulative) if c >= q - 1e-12)
               for n, q in (("50", 0.5), ("90", 0.9), ("99", 0.99))},
            "share_0.1_1.1": sum(0.1 <= s <= 1.1 for s in S) / len(S),
            "share_top_decade": sum(s >= max(S) / 10 for s in S) / len(S)}


@pytest.mark.parametrize("S", [[4.0, 2.0, 1.0, 0.5, 0.05], [1.0] * 6, [3.0, 0.2, 0.2, 0.2, 0.01, 0.001, 0.0005]])
def test_measures_equal_their_closed_forms(S):
    got = analysis.measures(torch.tensor(S[::-1], dtype=torch.float64))  # any order
    for key, value in closed_form(S).items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_flat_spectrum_has_full_effective_and_stable_rank():
    got = analysis.measures(torch.ones(10))
    assert got["effective_rank"] == pytest.approx(10) and got["stable_rank"] == pytest.approx(10)
    assert (got["energy_rank_50"], got["energy_rank_90"], got["energy_rank_99"]) == (5, 9, 10)


def test_an_exact_energy_share_needs_no_extra_value():
    # Energies 0.5 / 0.4 / 0.1 of the total: 90% is reached at exactly two values.
    S = torch.tensor([0.5, 0.4, 0.1]).sqrt()
    assert analysis.measures(S)["energy_rank_90"] == 2


def test_zero_spectrum_has_rank_zero():
    got = analysis.measures(torch.zeros(4))
    assert got["stable_rank"] == 0 and got["effective_rank"] == 0 and got["energy_rank_90"] == 0


def test_spectrum_of_planted_weights():
    S0 = [5.0, 3.0, 1.0, 0.6, 0.25, 0.12, 0.05, 0.01]
    W, _, _ = planted(12, 8, S0)
    model = nn.Sequential(linear_with(W), nn.ReLU(), linear_with(planted(6, 12, [2.0] * 6, seed=5)[0]))
    rows = analysis.spectrum(model)
    assert [r["module"] for r in rows] == ["0", "2"]
    assert rows[0]["singular_values"] == pytest.approx(S0, rel=1e-5, abs=1e-6)
    for key, value in closed_form(S0).items():
        assert rows[0][key] == pytest.approx(value, rel=1e-4), key
    assert rows[1]["effective_rank"] == pytest.approx(6, rel=1e-5) and rows[1]["shape"] == [6, 12]
    # An adapted model's spectrum is its base's, whatever the adapter holds.
    lk.adapt(model, lk.LoRA(rank=2), targets=["0"])
    randomize(model)
    assert analysis.spectrum(model, ["0"])[0]["singular_values"] == pytest.approx(S0, rel=1e-5, abs=1e-6)


def test_randomized_spectrum_finds_the_top_values():
    S0 = [9.0, 7.0, 5.0, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]
    model = nn.Sequential(linear_with(planted(20, 10, S0)[0]))
    rows = analysis.spectrum(model, rank=3, niter=4)
    assert rows[0]["randomized"] and rows[0]["singular_values"] == pytest.approx(S0[:3], rel=1e-4)


# --- learned updates ------------------------------------------------------------------------------------------------
METHODS = [lk.LoRA(rank=4, alpha=8), lk.LoRA(rank=4, alpha=8, rslora=True), lk.DoRA(rank=4, alpha=8),
           lk.PiSSA(rank=4), lk.MiLoRA(rank=4), lk.LoRAXS(rank=4), lk.SVF(), lk.SVFT(),
           lk.AdaLoRA(init_rank=6, target_rank=4, total_steps=10)]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: repr(m)[:40])
def test_delta_svd_equals_the_svd_of_delta_weight(method):
    model = tiny_llama()
    lk.adapt(model, method, targets=["q_proj", "down_proj"])
    randomize(model, std=0.3)
    for _, layer in lk.model.adapted_layers(model):
        adapter = layer.adapters["default"]
        U, S, Vh = analysis.delta_svd(adapter)
        dense = adapter.delta_weight()
        reference = torch.linalg.svdvals(dense)
        assert S[:len(reference)] == pytest.approx(reference[:len(S)].tolist(), abs=2e-5 * reference[0].item())
        torch.testing.assert_close((U * S) @ Vh, dense, atol=2e-5 * reference[0].item(), rtol=0)


def test_delta_svd_of_embedding_and_conv_lora_in_canonical_layout():
    model = nn.Sequential(nn.Embedding(30, 12), nn.Unflatten(-1, (3, 2, 2)))
    conv = nn.Sequential(nn.Conv2d(3, 8, 3))
    lk.adapt(model, lk.LoRA(rank=3), targets=["0"])
    lk.adapt(conv, lk.LoRA(rank=3), targets=["0"])
    for m in (model, conv):
        randomize(m, std=0.5)
        layer = m[0]
        rows = analysis.inspect(m)
        dense = layer.adapters["default"].delta_weight().flatten(1)
        assert rows[0]["singular_values"][:3] == pytest.approx(torch.linalg.svdvals(dense)[:3].tolist(), rel=1e-4)
        assert rows[0]["relative_norm"] == pytest.approx((dense.norm() / layer.base_weight().norm()).item(), rel=1e-4)


def planted_update(layer, U, S, V, rank_scale: float) -> None:
    """Set a LoRA adapter's B, A so that s·B·A = U·diag(S)·Vᵀ, padded with zero columns up to its rank."""
    adapter = layer.adapters["default"]
    k = len(S)
    with torch.no_grad():
        adapter.lora_B.zero_()
        adapter.lora_A.zero_()
        adapter.lora_B[:, :k] = (U * torch.as_tensor(S, dtype=torch.float64).sqrt() / math.sqrt(rank_scale)).float()
        adapter.lora_A[:k] = (V * torch.as_tensor(S, dtype=torch.float64).sqrt() / math.sqrt(rank_scale)).t().float()


def test_inspect_a_planted_update_of_known_rank_inside_a_larger_r():
    W, _, _ = planted(16, 12, [1.0] * 12)
    model = nn.Sequential(linear_with(W))
    lk.adapt(model, lk.LoRA(rank=8, alpha=16), targets=["0"])
    S = [3.0, 2.0, 1.0]
    planted_update(model[0], orthonormal(16, 3, 7), S, orthonormal(12, 3, 8), rank_scale=2.0)
    row = analysis.inspect(model)[0]
    assert row["singular_values"][:3] == pytest.approx(S, rel=1e-5)
    assert max(row["singular_values"][3:]) < 1e-5
    energy = sum(s * s for s in S)
    assert row["stable_rank"] == pytest.approx(energy / 9, rel=1e-5)
    assert row["energy_rank_90"] == 2 and row["energy_rank_99"] == 3  # 9/14 then 13/14 then all
    assert row["utilisation"] == pytest.approx(2 / 8)
    assert row["delta_norm"] == pytest.approx(math.sqrt(energy), rel=1e-5)
    assert row["relative_norm"] == pytest.approx(math.sqrt(energy / 12), rel=1e-5)
    assert row["rank"] == 8 and row["method"] == "LoRA"


def test_intruder_dimensions():
    S0 = [float(s) for s in range(16, 0, -1)]
    W, U, V = planted(16, 16, S0)
    for direction, expected in (("new", 1), ("existing", 0)):
        model = nn.Sequential(linear_with(W))
        lk.adapt(model, lk.LoRA(rank=2, alpha=2), targets=["0"])
        # "new": along the mean of all of W's left singular vectors (cosine 1/4 with each) from W's weakest input
        # direction; "existing": along u_1 from v_1, W's own top direction made stronger.
        if direction == "new":
            planted_update(model[0], (U.sum(1) / 4)[:, None], [40.0], V[:, -1:], rank_scale=1.0)
        else:
            planted_update(model[0], U[:, :1], [40.0], V[:, :1], rank_scale=1.0)
        row = analysis.inspect(model, intruder_k=10, intruder_eps=0.5)[0]
        assert row["intruders"] == expected, direction
        if expected:
            found = row["intruder_dimensions"][0]
            # Its top vector is close to (u_16 + 40·x)/‖·‖: cosine (1 + 10)/√1621 with u_16, 10/√1621 with the others.
            assert found["index"] == 0 and found["max_cosine"] == pytest.approx(11 / math.sqrt(1621), abs=0.01)
            assert row["least_aligned"] == found["max_cosine"]
        else:  # W + ΔW keeps W's singular vectors exactly: each top one is one of W's
            assert row["least_aligned"] == pytest.approx(1.0, abs=1e-4)


# --- resize --------------------------------------------------------------------------------------------------------
def truncated(dense: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(dense.double(), full_matrices=False)
    return ((U[:, :k] * S[:k]) @ Vh[:k]).float()


@pytest.mark.parametrize("method", [lk.LoRA(rank=8, alpha=16), lk.LoRA(rank=8, alpha=4, rslora=True),
                                    lk.PiSSA(rank=4), lk.DoRA(rank=6), lk.SVF()], ids=repr)
def test_resize_equals_the_truncated_svd(method):
    model = tiny_llama()
    lk.adapt(model, method, targets=["q_proj", "v_proj", "up_proj"])
    randomize(model, std=0.3)
    layers = lk.model.adapted_layers(model)
    before = {p: layer.adapters["default"].delta_weight() for p, layer in layers}
    scales = {p: (layer.adapters["default"].factors() or (None, None, 1.0))[2] for p, layer in layers}
    report = lk.resize(model, "default", rank=3)
    for path, layer in layers:
        assert isinstance(layer.recipes["default"], lk.LoRA) and layer.recipes["default"].rank == 3
        torch.testing.assert_close(layer.adapters["default"].delta_weight(), truncated(before[path], 3),
                                   atol=1e-5 * before[path].abs().max().item() + 1e-7, rtol=0)
        S = torch.linalg.svdvals(before[path].double())
        assert report[path]["retained"] == pytest.approx(((S[:3] ** 2).sum() / (S ** 2).sum()).item(), rel=1e-5)
        recipe = layer.recipes["default"]
        assert recipe.scale == pytest.approx(scales[path], rel=1e-12)  # the scale is kept, alpha rewritten
        assert recipe.rslora == getattr(method, "rslora", False)


def test_resize_by_energy_picks_each_modules_rank():
    W, _, _ = planted(16, 12, [1.0] * 12)
    model = nn.Sequential(linear_with(W), nn.ReLU(), linear_with(W.t().contiguous()))
    lk.adapt(model, lk.LoRA(rank=8, alpha=8), targets=["0", "2"])
    planted_update(model[0], orthonormal(16, 4, 1), [4.0, 1.0, 1.0, 1.0], orthonormal(12, 4, 2), 1.0)
    planted_update(model[2], orthonormal(12, 4, 3), [1.0, 1.0, 1.0, 1.0], orthonormal(16, 4, 4), 1.0)
    report = lk.resize(model, "default", energy=0.8)
    # [16, 1, 1, 1] of 19: 84% at one value; four equal energies need all four for 80%.
    assert report["0"] == {"rank": 1, "from_rank": 8, "retained": pytest.approx(16 / 19, rel=1e-5)}
    assert report["2"]["rank"] == 4 and report["2"]["retained"] == pytest.approx(1.0, rel=1e-5)


def test_resized_adapter_loads_in_peft_with_equal_logits(tmp_path):
    from peft import PeftModel

    model = tiny_llama()
    lk.adapt(model, lk.LoRA(rank=8, alpha=16), targets="all-linear")
    randomize(model, std=0.2)
    report = lk.resize(model, "default", energy=0.7)
    assert len({r["rank"] for r in report.values()}) > 1  # per-module ranks: rank_pattern and alpha_pattern
    lk.save(model, tmp_path / "small")
    config = json.loads((tmp_path / "small" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"]
    ids = token_ids()
    ours = model(ids).logits
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "small").eval()
    torch.testing.assert_close(peft_model(ids).logits, ours, atol=1e-5, rtol=1e-5)
    reloaded = lk.load(tiny_llama(), tmp_path / "small")
    torch.testing.assert_close(reloaded(ids).logits, ours, atol=1e-5, rtol=1e-5)


def test_resize_refuses_bad_requests_and_changes_nothing(monkeypatch):
    model = tiny_llama()
    lk.adapt(model, lk.LoRA(rank=4), targets=["q_proj"])
    randomize(model)
    first = model.model.layers[0].self_attn.q_proj
    kept = first.adapters["default"]
    for kwargs in ({"rank": 0}, {}, {"rank": 2, "energy": 0.5}, {"energy": 1.5}, {"energy": 0}):
        with pytest.raises(lk.ConfigError):
            lk.resize(model, "default", **kwargs)
        assert first.adapters["default"] is kept
    with pytest.raises(lk.AdapterNotFoundError):
        lk.resize(model, "other", rank=2)
    decompose = analysis.delta_svd
    last = model.model.layers[-1].self_attn.q_proj.adapters["default"]

    def failing_on_the_last(adapter):
        if adapter is last:
            raise lk.MergeError("no decomposition")
        return decompose(adapter)
    monkeypatch.setattr(analysis, "delta_svd", failing_on_the_last)
    with pytest.raises(lk.MergeError):
        lk.resize(model, "default", rank=2)
    assert first.adapters["default"] is kept  # all or none: the first module was done, and is undone


@pytest.mark.parametrize("how", ["untrained", "pruned"])
def test_resize_of_a_zero_update_is_an_exact_rank_one_zero_lora(how, tmp_path):
    """An update that is zero (never trained, or an AdaLoRA module pruned to rank 0) resizes to a rank-1 LoRA
    of zeros: the same function, and inspect reports it with every rank 0."""
    model, ids = tiny_llama(), token_ids()
    method = lk.LoRA(rank=4) if how == "untrained" else lk.AdaLoRA(init_rank=4, target_rank=2, total_steps=10)
    lk.adapt(model, method, targets=["q_proj"])
    randomize(model)
    zero = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        if how == "untrained":
            zero.adapters["default"].lora_B.zero_()
        else:
            zero.adapters["default"].rank_mask.zero_()
    if how == "pruned":  # a reloaded AdaLoRA adapter holds only what it kept: here nothing
        lk.save(model, tmp_path / "a")
        model = lk.load(tiny_llama(), tmp_path / "a")
        assert model.model.layers[0].self_attn.q_proj.adapters["default"].rank == 0
    rows = {r["module"]: r for r in analysis.inspect(model)}
    assert rows["model.layers.0.self_attn.q_proj"]["energy_rank_90"] == 0
    with torch.no_grad():
        before = model(ids).logits
        report = lk.resize(model, "default", rank=4)  # the others' full rank: the whole function is kept
        after = model(ids).logits
    path = "model.layers.0.self_attn.q_proj"
    assert report[path]["rank"] == 1 and report[path]["retained"] == 1.0
    resized = model.get_submodule(path)
    assert type(resized.recipes["default"]) is lk.LoRA and not resized.adapters["default"].delta_weight().any()
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)


def test_resize_of_a_merged_adapter_is_refused():
    model = tiny_llama()
    lk.adapt(model, lk.LoRA(rank=4), targets=["q_proj"])
    randomize(model)
    lk.merge(model)
    with pytest.raises(lk.MergeError):
        lk.resize(model, "default", rank=2)


# --- advice --------------------------------------------------------------------------------------------------------
def test_allocate_is_greedy_by_energy_per_parameter_and_fills_the_budget():
    energies = {"big": [100.0, 50.0, 1.0], "cheap": [10.0, 9.0, 8.0], "small": [0.1]}
    costs = {"big": (20, 20), "cheap": (2, 2), "small": (1, 1)}
    # Ratios: big 5, 2.5, .05; cheap 5, 4.5, 4; small .1. Budget 47: big 2 (40) + cheap 3 (6) + small 1 (1).
    assert analysis.allocate(energies, costs, 47) == {"big": 2, "cheap": 3, "small": 1}
    assert analysis.allocate(energies, costs, 25) == {"big": 1, "cheap": 2, "small": 1}
    assert analysis.allocate(energies, costs, 1) == {"small": 1}
    with pytest.raises(lk.ConfigError):
        analysis.allocate(energies, costs, 0)


def test_advise_meets_the_budget_and_follows_the_planted_energy():
    W, _, _ = planted(16, 16, [1.0] * 16)
    model = nn.Sequential(*(linear_with(W) for _ in range(3)))
    lk.adapt(model, lk.LoRA(rank=8, alpha=8), targets=["0", "1", "2"])
    planted_update(model[0], orthonormal(16, 6, 1), [5.0, 4.0, 4.0, 3.0, 3.0, 2.0], orthonormal(16, 6, 2), 1.0)
    planted_update(model[1], orthonormal(16, 2, 3), [2.0, 1.0], orthonormal(16, 2, 4), 1.0)
    planted_update(model[2], orthonormal(16, 1, 5), [0.5], orthonormal(16, 1, 6), 1.0)
    per_rank = analysis.lora_costs(16, 16)
    assert per_rank == (32, 32)
    budget = 32 * 8
    ranks = analysis.advise(model, "default", budget)
    assert sum(r * 32 for r in ranks.values()) == budget  # met exactly
    assert ranks["0"] > ranks["1"] > ranks.get("2", 0)
    assert ranks == {"0": 6, "1": 2}  # by energy σ²: 25 16 16 9 9 4 | 4 1 | 0.25


def test_advised_yaml_trains_the_advised_ranks_within_the_budget(tmp_path):
    model = tiny_llama()
    lk.adapt(model, lk.LoRA(rank=8, alpha=16), targets="all-linear")
    randomize(model, std=0.2)
    budget = 3000
    ranks = analysis.advise(model, "default", budget)
    path = tmp_path / "ranks.yaml"
    path.write_text(ranks_yaml(ranks, {m: 2.0 * r for m, r in ranks.items()}, "advised"))
    settings = cfg.from_dict(cfg.FinetuneConfig, cfg.load_yaml(path), str(path))
    fresh = tiny_llama()
    from lorakit.train.trainer import targets_of

    lk.adapt(fresh, lk.LoRA(rank=16, alpha=32), targets_of(settings.targets), ranks=settings.ranks,
             alphas=settings.alphas)
    got = {p: layer.recipes["default"].rank for p, layer in lk.model.adapted_layers(fresh)}
    assert got == ranks
    trainable = sum(p.numel() for p in lk.trainable_parameters(fresh))
    assert trainable <= budget and trainable == sum(
        analysis.lora_costs(l.adapters["default"].spec.d_out, l.adapters["default"].spec.d_in)[1] * ranks[p]
        for p, l in lk.model.adapted_layers(fresh))
    assert all(layer.recipes["default"].scale == pytest.approx(2.0) for _, layer in lk.model.adapted_layers(fresh))


def test_ranks_option_on_the_command_line_and_in_yaml(tmp_path):
    settings = cfg.from_dict(cfg.FinetuneConfig, {"ranks": ["q_proj=4", r"layers\.1\..*=2"]}, "flags")
    assert settings.ranks == {"q_proj": 4, r"layers\.1\..*": 2}
    with pytest.raises(lk.ConfigError, match="ranks"):
        cfg.from_dict(cfg.FinetuneConfig, {"ranks": {"q_proj": "four"}}, "x.yaml")
    with pytest.raises(lk.ConfigError, match="ranks"):
        cfg.from_dict(cfg.FinetuneConfig, {"ranks": ["q_proj"]}, "flags")


# --- the commands on a tiny model directory --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-analysis"))


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    lk.adapt(model, lk.LoRA(rank=8, alpha=16), targets="all-linear")
    randomize(model, std=0.2)
    return lk.save(model, tmp_path_factory.mktemp("adapter") / "adapter")


def test_spectrum_command_writes_tables_plots_and_json(tiny_dir, tmp_path, capsys):
    assert cli(["spectrum", "--model", str(tiny_dir), "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "spectrum.json").read_text())
    assert len(rows) == 2 * 7 and {r["type"] for r in rows} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"}
    printed = capsys.readouterr().out
    assert "| q_proj | 2 |" in printed and "| all | 14 |" in printed
    assert (tmp_path / "spectra.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Per module" in (tmp_path / "spectrum.md").read_text()
    assert cli(["spectrum", "--model", str(tiny_dir), "--out", str(tmp_path), "--niter", "2"]) == 2


def test_inspect_command(tiny_dir, trained, tmp_path, capsys):
    assert cli(["inspect", str(trained), "--model", str(tiny_dir), "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "inspect.json").read_text())
    assert len(rows) == 14 and all(r["rank"] == 8 and 0 < r["utilisation"] <= 1 for r in rows)
    assert "intruders (sum)" in capsys.readouterr().out
    assert (tmp_path / "spectra.png").is_file()


def test_resize_command_writes_a_peft_adapter(tiny_dir, trained, tmp_path, capsys):
    out = tmp_path / "r2"
    assert cli(["resize", str(trained), "--model", str(tiny_dir), "--rank", "2", "--out", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == pytest.approx(4.0)
    assert "energy kept" in capsys.readouterr().out
    assert cli(["resize", str(trained), "--model", str(tiny_dir), "--out", str(out)]) == 2
    assert cli(["resize", str(trained), "--model", str(tiny_dir), "--rank", "2"]) == 2


def test_advise_command_from_an_adapter(tiny_dir, trained, tmp_path, capsys):
    out = tmp_path / "ranks.yaml"
    assert cli(["advise", "--model", str(tiny_dir), "--budget", "2000", "--from", str(trained), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert re.search(r"predicted to keep \d+\.\d% of the trained update's energy", said)
    settings = cfg.from_dict(cfg.FinetuneConfig, cfg.load_yaml(out), str(out))
    assert settings.ranks and set(settings.ranks) == set(settings.alphas)
    assert cli(["advise", "--model", str(tiny_dir), "--budget", "2000"]) == 2


def test_advise_command_from_a_probe_run(tiny_dir, tmp_path, capsys):
    out = tmp_path / "ranks.yaml"
    assert cli(["advise", "--model", str(tiny_dir), "--budget", "1500", "--probe-steps", "3", "--probe-rank", "4",
                "--out", str(out)]) == 0
    assert "probe's sensitivity score" in capsys.readouterr().out
    settings = cfg.from_dict(cfg.FinetuneConfig, cfg.load_yaml(out), str(out))
    assert 0 < max(settings.ranks.values()) <= 4


def test_params_on_a_whole_model(tiny_dir, capsys):
    assert cli(["params", "--model", str(tiny_dir), "--rank", "4"]) == 0
    out = capsys.readouterr().out
    # 2 layers of q, o (32x32), k, v (16x32), gate, up (64x32), down (32x64): rank 4 trains 4·(d_in + d_out).
    expected = 2 * 4 * (2 * 64 + 2 * 48 + 2 * 96 + 96)
    assert f"total: {expected:,} trainable" in out
    assert "32x32 x4" in out and "64x32 x4" in out
