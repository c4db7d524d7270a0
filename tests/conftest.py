"""Tiny models built from configs (random init, fixed seeds) and helpers shared by the tests."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit as lk

VOCAB = 96

# Method files to import before collection (each calls lk.register), so that the shared matrix, which
# takes every registered method, runs them too: how tests/test_register.py puts a method from outside
# lorakit through it.
for _plugin in filter(None, os.environ.get("LORAKIT_TEST_PLUGINS", "").split(os.pathsep)):
    sys.path.insert(0, str(Path(_plugin).parent))  # importable by name: pickles of its adapters refer to it
    importlib.import_module(Path(_plugin).stem)


def tiny_llama(seed: int = 0, hidden: int = 32, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64)).eval()


class TinyUNet(nn.Module):
    """A diffusers-style block: convs (dilated, strided, reflect-padded), GroupNorm, a linear attention."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2)
        self.mid = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.to_q = nn.Linear(8, 8)
        self.to_k = nn.Linear(8, 8)
        self.to_v = nn.Linear(8, 8)
        self.conv_out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        h = self.down(torch.nn.functional.silu(self.norm(self.conv_in(x))))
        h = self.mid(h)
        b, c, H, W = h.shape
        t = h.flatten(2).transpose(1, 2)  # (b, H·W, c)
        att = torch.softmax(self.to_q(t) @ self.to_k(t).transpose(1, 2) / c ** 0.5, -1) @ self.to_v(t)
        return self.conv_out(h + att.transpose(1, 2).reshape(b, c, H, W))


def tiny_unet(seed: int = 0):
    torch.manual_seed(seed)
    return TinyUNet().eval()


def token_ids(batch: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def randomize(model: nn.Module, name: str | None = None, std: float = 0.1, seed: int = 2) -> None:
    """Add noise to every trainable adapter tensor (of adapter ``name``, or all), so updates are non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lk.model.adapted_layers(model):
            for adapter_name, adapter in layer.adapters.items():
                if name is None or adapter_name == name:
                    for p in adapter.parameters():
                        p.add_(torch.randn(p.shape, generator=g) * std)


def train_side_by_side(sides, x: torch.Tensor, steps: int, lr: float = 1e-2) -> list[list[float]]:
    """Copy the first side's trainable tensors into the others (``sides``: (model, {key: parameter}) with
    matching keys), train each with AdamW on ``x``; returns each side's losses."""
    reference = sides[0][1]
    with torch.no_grad():
        for _, params in sides[1:]:
            assert params.keys() == reference.keys()
            for key, p in reference.items():
                params[key].copy_(p)
    runs = []
    for model, params in sides:
        model.train()
        optimizer = torch.optim.AdamW(params.values(), lr=lr)
        losses = []
        for _ in range(steps):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        runs.append(losses)
    return runs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
