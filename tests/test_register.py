"""A method from outside lorakit, registered with ``lk.register`` alone, works everywhere a built-in one does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lorakit as lk
from conftest import randomize, tiny_llama, token_ids
from lorakit import registry

# A VeRA-style method (Kopiczko et al. 2024, arXiv 2310.11454): frozen random A and B, trainable scaling
# vectors d (r) and b (d_out): ΔW = diag(b)·B·diag(d)·A. Written against lorakit's contract only.
TOY = textwrap.dedent('''
    from dataclasses import dataclass
    from typing import ClassVar

    import torch
    from torch import nn

    import lorakit as lk
    from lorakit.methods.base import add_low_rank, check_int, check_linear


    @dataclass(frozen=True)
    class ToyVeRA(lk.Method):
        """Frozen random low-rank factors with trainable scaling vectors."""

        name: ClassVar[str] = "toy_vera"
        rank: int = 4
        """rank of the frozen random factors"""
        d_init: float = 1.0
        """initial value of the rank-side scaling vector d"""
        seed: int = 0
        """seed of the frozen random factors"""

        def __post_init__(self):
            check_int("ToyVeRA", 1, rank=self.rank)

        def build(self, spec, init=True):
            check_linear("ToyVeRA", spec)
            return ToyVeRAAdapter(spec, self.rank, self.d_init, self.seed)


    class ToyVeRAAdapter(lk.Adapter):
        def __init__(self, spec, rank, d_init, seed):
            super().__init__()
            self.spec = spec
            g = torch.Generator().manual_seed(seed)
            factory = dict(device=spec.device, dtype=spec.dtype)
            self.register_buffer("vera_A", (torch.randn(rank, spec.d_in, generator=g) / spec.d_in ** 0.5).to(**factory))
            self.register_buffer("vera_B", (torch.randn(spec.d_out, rank, generator=g) / rank ** 0.5).to(**factory))
            self.lambda_d = nn.Parameter(torch.full((rank,), d_init, **factory))
            self.lambda_b = nn.Parameter(torch.zeros(spec.d_out, **factory))  # zero: exactly the base at init

        def factors(self):
            return self.lambda_d[:, None] * self.vera_A, self.lambda_b[:, None] * self.vera_B, 1.0

        def forward(self, x, out):
            A, B, _ = self.factors()
            return add_low_rank(out, torch.nn.functional.linear(x.to(A.dtype), A), B)

        def delta_weight(self):
            A, B, _ = self.factors()
            return B.float() @ A.float()

        def export(self):
            return {"vera_A": self.vera_A, "vera_B": self.vera_B, "lambda_d": self.lambda_d,
                    "lambda_b": self.lambda_b}


    lk.register(ToyVeRA)
''')


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy method, imported from a file in a temporary directory (registered for this test only)."""
    path = tmp_path / "toy_vera.py"
    path.write_text(TOY)
    monkeypatch.setattr(registry, "_ENTRIES", dict(registry._ENTRIES))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_vera", raising=False)
    import toy_vera

    yield toy_vera
    sys.modules.pop("toy_vera", None)


def test_register_makes_it_a_method_of_lk(toy):
    assert "toy_vera" in registry.names() and lk.ToyVeRA is toy.ToyVeRA and "ToyVeRA" in dir(lk)
    assert registry.create("toy_vera", rank=2) == toy.ToyVeRA(rank=2)
    assert [o.name for o in registry.options("toy_vera")] == ["rank", "d_init", "seed"]
    assert registry.options("toy_vera")[0].help == "rank of the frozen random factors"


def test_adapt_train_merge_route_and_reload_in_a_fresh_process(toy, tmp_path):
    model = lk.adapt(tiny_llama(), toy.ToyVeRA(rank=4), ["q_proj", "v_proj"])
    x = token_ids()
    with lk.disabled(model):
        base = model(x).logits
    assert torch.equal(model(x).logits, base)  # b = 0: the base exactly
    model.train()
    optimizer = torch.optim.AdamW(lk.trainable_parameters(model), lr=1e-2)
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(("lambda_d", "lambda_b")) for n in trained)
    with torch.no_grad():
        out = model(x).logits
        assert (out - base).abs().max() > 1e-4  # it learned something
        lk.merge(model)
        torch.testing.assert_close(model(x).logits, out, rtol=1e-5, atol=1e-5)
        lk.unmerge(model)
        assert torch.equal(model(x).logits, out)
        lk.adapt(model, toy.ToyVeRA(rank=2, seed=1), ["q_proj", "v_proj"], name="other")
        randomize(model, "other")
        with lk.route(model, ["default", "other", None]):
            routed = model(x).logits
        lk.activate(model, "other")
        other = model(x).logits
    torch.testing.assert_close(routed[0], out[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed[1], other[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed[2], base[2], rtol=1e-5, atol=1e-5)

    lk.save(model, tmp_path / "adapter", name="default")
    saved = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert saved["lorakit_method"] == "toy_vera" and saved["lorakit_recipe_class"] == "toy_vera:ToyVeRA"
    torch.save(out, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path[:0] = [{str(tmp_path)!r}, {str(Path(__file__).parent)!r}]
        import lorakit as lk, toy_vera
        from conftest import tiny_llama, token_ids
        model = lk.load(tiny_llama(), {str(tmp_path / "adapter")!r})
        with torch.no_grad():
            expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
            torch.testing.assert_close(model(token_ids()).logits, expected, rtol=1e-5, atol=1e-5)
        print("reloaded", type(model.model.layers[0].self_attn.q_proj.recipes["default"]).__name__)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "reloaded ToyVeRA"
    # Without the registering import, a fresh process says what to import.
    missing = subprocess.run([sys.executable, "-c", f"import lorakit as lk, sys; sys.path.insert(0, "
                              f"{str(Path(__file__).parent)!r}); from conftest import tiny_llama; "
                              f"lk.load(tiny_llama(), {str(tmp_path / 'adapter')!r})"], capture_output=True, text=True)
    assert missing.returncode != 0 and "unknown method 'toy_vera'" in missing.stderr
    assert "saved from toy_vera:ToyVeRA" in missing.stderr


def test_the_shared_matrix_takes_it_by_itself(toy, tmp_path):
    env = {**os.environ, "LORAKIT_TEST_PLUGINS": str(Path(toy.__file__))}
    tests = Path(__file__).parent
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "toy_vera",
                           str(tests / "test_matrix.py"), str(tests / "test_module_contract.py")],
                          capture_output=True, text=True, env=env, cwd=tests.parent)
    assert done.returncode == 0, done.stdout[-3000:]
    passed = int(done.stdout.strip().splitlines()[-1].split(" passed")[0].split()[-1])
    assert passed >= 40  # every invariant of the matrix × the layer kinds the method adapts


def test_the_cli_offers_it_with_its_options(toy, tmp_path, capsys):
    from lorakit.cli import main
    from test_train import save_tiny_model

    assert main(["params", "--method", "toy_vera", "--shape", "64x32", "--rank", "4"]) == 0
    out = capsys.readouterr().out
    assert "trains 68 " in out  # d (4) + b (64): what the method trains, counted from the adapter it builds
    with pytest.raises(SystemExit):
        main(["finetune", "--method", "toy_vera", "--help"])
    shown = capsys.readouterr().out
    assert "--d-init" in shown and "rank of the frozen random factors" in shown and "--toy-vera-seed" in shown
    # Its settings as flags train it: the saved adapter holds that recipe (the run's --seed is another setting).
    run = tmp_path / "run"
    assert main(["finetune", "--model", str(save_tiny_model(tmp_path / "tiny")), "--out", str(run), "--method",
                 "toy_vera", "--rank", "3", "--d-init", "0.5", "--toy-vera-seed", "7", "--seed", "1", "--steps", "2",
                 "--batch-size", "4", "--train-examples", "8", "--eval-examples", "2", "--max-new-tokens", "2",
                 "--skip-eval-before", "--save-every", "0", "--targets", "q_proj,v_proj"]) == 0
    saved = json.loads((run / "adapter/adapter_config.json").read_text())
    assert saved["lorakit_method"] == "toy_vera" and saved["lorakit_recipe"] == {"rank": 3, "d_init": 0.5, "seed": 7}
