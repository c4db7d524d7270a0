"""A drop-in for Microsoft's ``loralib`` (LoRA, Hu et al. 2021, arXiv 2106.09685).

    import lorakit.loralib as lora          # was: import loralib as lora
    layer = lora.Linear(768, 768, r=8, lora_alpha=16)
    lora.mark_only_lora_as_trainable(model, bias="none")
    torch.save(lora.lora_state_dict(model), "lora.pt")

Same classes, arguments, attribute names (``r``, ``lora_alpha``, ``scaling``, ``merged``), state-dict
keys and tensor shapes as loralib 0.1.2, so checkpoints move both ways with ``load_state_dict``. Like
loralib, ``eval()`` merges ``s·B·A`` into the weight and ``train()`` takes it out again; unlike it:

  * unmerging restores a kept copy of the weight (bit-exact) instead of subtracting, and the merged
    update is computed in float32 and checked for NaN/Inf;
  * ``state_dict()`` always holds the *unmerged* weight, and ``load_state_dict`` into an eval-mode
    (merged) layer merges the loaded factors, so a checkpoint means the same thing in either mode;
  * conv layers apply ``lora_dropout`` (loralib accepts it and ignores it), and Conv1d/Conv3d work
    for any kernel size (loralib's layout only fits their weight when kernel_size == 1);
  * bad arguments raise :class:`lorakit.errors.ConfigError` instead of asserting late or not at all.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import ConfigError, MergeError
from lorakit.methods.base import LayerSpec, check_dropout
from lorakit.methods.lora import LoRAAdapter

__all__ = ["LoRALayer", "Linear", "Embedding", "MergedLinear", "ConvLoRA", "Conv1d", "Conv2d", "Conv3d",
           "mark_only_lora_as_trainable", "lora_state_dict"]

BIAS_MODES = ("none", "all", "lora_only")


class LoRALayer:
    """loralib's mixin: marks a module as a LoRA layer and holds its hyper-parameters.

    ``r`` is the rank (0: a plain layer), ``scaling = lora_alpha / r``, ``merged`` says whether
    the update currently sits inside the weight. Parameters named ``lora_*`` of a ``LoRALayer``
    are what :func:`mark_only_lora_as_trainable` and :func:`lora_state_dict` select.
    """

    def __init__(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool):
        owner = type(self).__name__
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ConfigError(f"{owner}: r must be an int >= 0 (0 means no LoRA), got {r!r}")
        check_dropout(owner, lora_dropout)
        self.r = r
        self.lora_alpha = lora_alpha
        # A module either way, so `layer.lora_dropout(x)` works and the layer pickles.
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.merge_weights = merge_weights


class _MergesOnEval(LoRALayer):
    """loralib's merge-on-``eval()`` / unmerge-on-``train()``, made exact.

    A subclass names the parameter the update is merged into (``_WEIGHT``) and gives the update
    itself (``_delta()``: float32, in that parameter's layout, or None when there is none).
    """

    _WEIGHT = "weight"

    def _init_lora(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool) -> None:
        LoRALayer.__init__(self, r, lora_alpha, lora_dropout, merge_weights)
        # The weight as it was before merging; restored on unmerge. Not in state_dict: see the hook.
        self.register_buffer("original_weight", None, persistent=False)
        # So state_dict() holds the unmerged weight. The private form: older torch lacks the public twin.
        self._register_state_dict_hook(_save_unmerged_weight)
        self.register_load_state_dict_post_hook(_merge_after_load)

    def _delta(self) -> torch.Tensor | None:
        raise NotImplementedError

    def train(self, mode: bool = True):
        super().train(mode)
        if self.merge_weights:
            if mode:
                self._unmerge()
            else:
                self._merge()
        return self

    @torch.no_grad()
    def _merge(self) -> None:
        if self.merged:
            return
        delta = self._delta()
        if delta is not None:
            if not torch.isfinite(delta).all():
                raise MergeError(f"{type(self).__name__}: the LoRA update has NaN/Inf values; nothing was merged")
            weight = self.get_parameter(self._WEIGHT)
            self.original_weight = weight.detach().clone()
            weight.copy_((weight.float() + delta).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def _unmerge(self) -> None:
        if self.original_weight is not None:
            self.get_parameter(self._WEIGHT).copy_(self.original_weight)
            self.original_weight = None
        self.merged = False

    def _load_from_state_dict(self, *args, **kwargs):
        # A state dict holds unmerged tensors; _merge_after_load merges them again in eval mode.
        self._unmerge()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(filter(None, [super().extra_repr(), f"r={self.r}, lora_alpha={self.lora_alpha}"]))


def _save_unmerged_weight(module: _MergesOnEval, state_dict, prefix: str, local_metadata) -> None:
    if module.original_weight is not None:
        state_dict[prefix + module._WEIGHT] = module.original_weight


def _merge_after_load(module: _MergesOnEval, incompatible_keys) -> None:
    # Runs after the module's children have loaded too (ConvLoRA's weight lives in `conv`).
    if module.merge_weights and not module.training:
        module._merge()


def _init_factors(A: torch.Tensor, B: torch.Tensor) -> None:
    """LoRA's init: A like nn.Linear's weight (Kaiming-uniform, a=√5), B = 0, so ΔW starts at 0."""
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)


def _reset_linear(layer: nn.Linear) -> None:
    """nn.Linear's init of weight and bias, on the (out, in) view when the weight is stored transposed."""
    transposed = getattr(layer, "fan_in_fan_out", False)
    if transposed:  # nn.Linear reads fan_in off the weight's shape
        layer.weight.data = layer.weight.data.t()
    nn.Linear.reset_parameters(layer)
    if transposed:
        layer.weight.data = layer.weight.data.t()


class _AdapterMath:
    """Linear and Embedding run lorakit's LoRAAdapter (init, fused forward, float32 delta) on their factors.

    The layer must own ``lora_A``/``lora_B`` under loralib's keys, so the adapter is kept outside the
    module tree as a view of them; it is re-pointed whenever the layer's parameters were replaced
    (``load_state_dict(assign=True)``, FSDP, plain assignment), so the layer stays the one owner.
    """

    def _attach_adapter(self, spec: LayerSpec, dropout: float) -> None:
        adapter = LoRAAdapter(spec, self.r, self.lora_alpha / self.r, dropout, init=False)
        # Its dropout is our registered lora_dropout, so model.train()/eval() reach it.
        adapter.dropout = self.lora_dropout if dropout > 0 else None
        object.__setattr__(self, "_adapter", adapter)  # not a submodule: its keys must not appear
        self.lora_A, self.lora_B = adapter.lora_A, adapter.lora_B

    def _lora(self) -> LoRAAdapter:
        adapter = self._adapter
        if adapter.lora_A is not self.lora_A or adapter.lora_B is not self.lora_B:
            adapter.lora_A, adapter.lora_B = self.lora_A, self.lora_B
        return adapter

    @property
    def scaling(self) -> float:
        """lora_alpha / r; assignable (loralib users rescale the update this way)."""
        if "_adapter" not in self.__dict__:
            raise AttributeError("scaling")  # r == 0, as in loralib
        return self._adapter.scale

    @scaling.setter
    def scaling(self, value: float) -> None:
        self._adapter.scale = value


class Linear(_AdapterMath, _MergesOnEval, nn.Linear):
    """``nn.Linear`` with a rank-``r`` update ``h = W·x + b + (α/r)·B·A·dropout(x)``.

    ``lora_A``: (r, in), ``lora_B``: (out, r). ``fan_in_fan_out=True`` stores the weight as
    (in, out), for layers replacing GPT-2's Conv1D.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True, **kwargs):
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)
        self.fan_in_fan_out = fan_in_fan_out
        if fan_in_fan_out:
            self.weight.data = self.weight.data.t()  # (in, out)
        if r > 0:
            spec = LayerSpec(layout="linear", d_in=in_features, d_out=out_features, device=self.weight.device,
                             dtype=self.weight.dtype)
            self._attach_adapter(spec, lora_dropout)
            self.weight.requires_grad = False
        # Draws weight, bias, then A from the RNG in loralib's order: a seed gives loralib's init.
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's init, then LoRA's (A Kaiming-uniform, B = 0)."""
        if getattr(self, "merged", False):
            self._unmerge()
        _reset_linear(self)
        if "_adapter" in self.__dict__:
            self._lora().reset_parameters()

    def _delta(self) -> torch.Tensor | None:
        if self.r == 0:
            return None
        delta = self._lora().delta_weight()  # (out, in)
        return delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight.t() if self.fan_in_fan_out else self.weight, self.bias)
        if self.r == 0 or self.merged:
            return out
        return self._lora()(x, out)


class Embedding(_AdapterMath, _MergesOnEval, nn.Embedding):
    """``nn.Embedding`` with a rank-``r`` update: ``lora_A`` (r, num_embeddings) starts at zero, ``lora_B``
    (embedding_dim, r) normal; row i of the table gains (α/r)·(B·A)[:, i]. No dropout, as in loralib."""

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: float = 1,
                 merge_weights: bool = True, **kwargs):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        self._init_lora(r, lora_alpha, 0.0, merge_weights)
        if r > 0:
            spec = LayerSpec(layout="embedding", d_in=num_embeddings, d_out=embedding_dim, device=self.weight.device,
                             dtype=self.weight.dtype, padding_idx=self.padding_idx)
            self._attach_adapter(spec, 0.0)
            self.weight.requires_grad = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Embedding's init, then LoRA's (A = 0, B ~ N(0, 1))."""
        if getattr(self, "merged", False):
            self._unmerge()
        nn.Embedding.reset_parameters(self)
        if "_adapter" in self.__dict__:
            self._lora().reset_parameters()

    def _delta(self) -> torch.Tensor | None:
        return None if self.r == 0 else self._lora().delta_weight()  # (num_embeddings, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.Embedding.forward(self, x)
        if self.r == 0 or self.merged:
            return out
        return self._lora()(x, out)


class MergedLinear(_MergesOnEval, nn.Linear):
    """One ``nn.Linear`` holding several stacked projections (GPT-2's fused q, k, v), LoRA on some of them.

    ``enable_lora`` splits ``out_features`` into ``len(enable_lora)`` equal groups and says which get an
    update. With k enabled groups of size g = out/len(enable_lora): ``lora_A`` is (k·r, in) and ``lora_B``
    (k·g, r); enabled group j gets ΔW_j = (α/r)·B_j·A_j (B_j, A_j: its row blocks), the others nothing.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, enable_lora: Sequence[bool] = (False,), fan_in_fan_out: bool = False,
                 merge_weights: bool = True, **kwargs):
        enable_lora = [bool(e) for e in enable_lora]
        if not enable_lora or out_features % len(enable_lora):
            raise ConfigError(f"MergedLinear: enable_lora has {len(enable_lora)} entries, which must be >= 1 "
                              f"and divide out_features={out_features}")
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)
        self.enable_lora = enable_lora
        self.fan_in_fan_out = fan_in_fan_out
        if fan_in_fan_out:
            self.weight.data = self.weight.data.t()  # (in, out)
        enabled = sum(enable_lora)
        if r > 0 and enabled:
            group = out_features // len(enable_lora)
            self.lora_A = nn.Parameter(self.weight.new_empty(enabled * r, in_features))
            self.lora_B = nn.Parameter(self.weight.new_empty(enabled * group, r))
            self.scaling = lora_alpha / r
            self.weight.requires_grad = False
            # Which output groups the update lands in; a constant that must follow the layer's device.
            index = torch.tensor([i for i, e in enumerate(enable_lora) if e], device=self.weight.device)
            self.register_buffer("enabled_groups", index, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's init, then LoRA's (A Kaiming-uniform, B = 0)."""
        if getattr(self, "merged", False):
            self._unmerge()
        _reset_linear(self)
        if hasattr(self, "lora_A"):
            _init_factors(self.lora_A, self.lora_B)

    def _has_lora(self) -> bool:
        return "lora_A" in self._parameters

    def _delta(self) -> torch.Tensor | None:
        if not self._has_lora():
            return None
        k, n = len(self.enabled_groups), len(self.enable_lora)
        A = self.lora_A.float().view(k, self.r, -1)  # (k, r, in)
        B = self.lora_B.float().view(k, -1, self.r)  # (k, g, r)
        delta = A.new_zeros(n, B.shape[1], A.shape[2])
        delta[self.enabled_groups] = torch.bmm(B, A) * self.scaling  # disabled groups stay 0
        delta = delta.view(self.out_features, self.in_features)
        return delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight.t() if self.fan_in_fan_out else self.weight, self.bias)
        if self.merged or not self._has_lora():
            return out
        A, B = self.lora_A, self.lora_B
        k, n = len(self.enabled_groups), len(self.enable_lora)
        h = F.linear(self.lora_dropout(x).to(A.dtype), A) * self.scaling  # (..., k·r), scaled while rank-sized
        h = h.reshape(-1, k, self.r).transpose(0, 1)  # (k, N, r)
        delta = torch.bmm(h, B.view(k, -1, self.r).transpose(1, 2))  # (k, N, g), never forming B·A
        # Add each enabled group's slice into its place in the output, (N, n, g).
        out = out.reshape(-1, n, delta.shape[2]).index_add(1, self.enabled_groups,
                                                            delta.transpose(0, 1).to(out.dtype))
        return out.view(*x.shape[:-1], self.out_features)


class ConvLoRA(_MergesOnEval, nn.Module):
    """A convolution (``self.conv``) whose kernel gains loralib's reshaped low-rank update.

    With kernel size k and d spatial dims, ``lora_A`` is (r·k, in·k^(d-1)) and ``lora_B`` (out/groups·k, r·k);
    ``(α/r)·B·A`` reshaped to the kernel's (out, in/groups, k, …) is added to it. For Conv2d these are
    loralib's shapes; for Conv1d/Conv3d they equal loralib's at k = 1, the only size its layout fits.
    """

    _WEIGHT = "conv.weight"

    def __init__(self, conv_module: type[nn.Module], in_channels: int, out_channels: int, kernel_size: int,
                 r: int = 0, lora_alpha: float = 1, lora_dropout: float = 0.0, merge_weights: bool = True, **kwargs):
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
            raise ConfigError(f"{type(self).__name__}: loralib's conv layout needs an int kernel_size, "
                              f"got {kernel_size!r}")
        nn.Module.__init__(self)
        self.conv = conv_module(in_channels, out_channels, kernel_size, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)
        if r > 0:
            spatial = self.conv.weight.dim() - 2
            self.lora_A = nn.Parameter(self.conv.weight.new_empty(r * kernel_size,
                                                                  in_channels * kernel_size ** (spatial - 1)))
            self.lora_B = nn.Parameter(self.conv.weight.new_empty(out_channels // self.conv.groups * kernel_size,
                                                                  r * kernel_size))
            self.scaling = lora_alpha / r
            self.conv.weight.requires_grad = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The conv's own init, then LoRA's (A Kaiming-uniform, B = 0)."""
        if getattr(self, "merged", False):
            self._unmerge()
        self.conv.reset_parameters()
        if hasattr(self, "lora_A"):
            _init_factors(self.lora_A, self.lora_B)

    def _update(self, dtype: torch.dtype) -> torch.Tensor:
        """(α/r)·B·A as a kernel, (out, in/groups, k, …)."""
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)).view(self.conv.weight.shape) * self.scaling

    def _delta(self) -> torch.Tensor | None:
        return self._update(torch.float32) if self.r > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r == 0 or self.merged:
            return self.conv(x)
        weight, bias = self.conv.weight, self.conv.bias
        # The update is a factorisation of the reshaped kernel, not a conv pipeline, so it has to be
        # formed; it is kernel-sized. Without dropout one convolution with W + ΔW does it all.
        delta = self._update(weight.dtype)
        if isinstance(self.lora_dropout, nn.Identity):
            return self.conv._conv_forward(x, weight + delta, bias)
        return self.conv._conv_forward(x, weight, bias) + self.conv._conv_forward(self.lora_dropout(x), delta, None)


class Conv1d(ConvLoRA):
    """``ConvLoRA`` around ``nn.Conv1d``."""

    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv1d, *args, **kwargs)


class Conv2d(ConvLoRA):
    """``ConvLoRA`` around ``nn.Conv2d``."""

    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv2d, *args, **kwargs)


class Conv3d(ConvLoRA):
    """``ConvLoRA`` around ``nn.Conv3d``."""

    def __init__(self, *args, **kwargs):
        super().__init__(nn.Conv3d, *args, **kwargs)


def _trained_names(model: nn.Module, bias: str) -> tuple[set[str], set[str]]:
    """(LoRA factor names, bias names) that ``bias`` mode trains and saves, as state-dict keys.

    Factors are the ``lora_*`` parameters of LoRALayer modules; a bias is a parameter whose own
    name is ``bias``: any of them for "all", those inside layers that have factors for "lora_only".
    """
    if bias not in BIAS_MODES:
        raise ConfigError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    factors, biases = set(), set()
    for path, module in model.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        if isinstance(module, LoRALayer):
            own = [name for name, _ in module.named_parameters(recurse=False) if name.startswith("lora_")]
            factors.update(prefix + name for name in own)
            if own and bias == "lora_only":
                biases.update(prefix + name for name, _ in module.named_parameters(remove_duplicate=False)
                              if name.rpartition(".")[2] == "bias")
    if bias == "all":
        biases = {name for name, _ in model.named_parameters(remove_duplicate=False)
                  if name.rpartition(".")[2] == "bias"}
    return factors, biases


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter except the LoRA factors and, per ``bias`` ("none" | "all" | "lora_only"), biases.

    Factors keep the ``requires_grad`` they have, as in loralib; the chosen biases are switched on.
    """
    factors, biases = _trained_names(model, bias)
    for name, param in model.named_parameters(remove_duplicate=False):
        if name not in factors:
            param.requires_grad = False
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in biases:
            param.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The part of ``model.state_dict()`` that :func:`mark_only_lora_as_trainable` trains, same ``bias`` modes."""
    factors, biases = _trained_names(model, bias)
    return {key: value for key, value in model.state_dict().items() if key in factors or key in biases}
