"""Devices in the trainer and the command: --device, torchrun's per-rank GPU and
backend, and gradient accumulation without communication on the non-final micro-steps (DDP, FSDP2)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_train import _config, _losses, save_tiny_model

import lorakit as lk
from lorakit.cli import main as cli
from lorakit.train import models, trainer
from lorakit.train.trainer import finetune


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def two_gpus(monkeypatch):
    """torch sees two CUDA devices; the device each ``set_device`` call made current is recorded."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    return current


def test_device_resolution_on_a_machine_with_two_gpus(two_gpus):
    assert models.resolve_device("auto") == torch.device("cuda", 0) and two_gpus == [0]
    assert models.resolve_device("cuda:1") == torch.device("cuda", 1) and two_gpus[-1] == 1
    assert models.resolve_device("CPU") == torch.device("cpu")
    # Under torchrun each process takes its own GPU, whatever it was told.
    assert models.resolve_device("auto", local_rank=1) == torch.device("cuda", 1) and two_gpus[-1] == 1
    assert models.resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert models.resolve_device("cpu", local_rank=1) == torch.device("cpu")
    for name, message in {"cuda:2": r"has 2 CUDA device\(s\), cuda:0 to cuda:1",
                          "gpu": "choose auto, cpu, cuda, cuda:N or mps", "cuda:x": "choose auto"}.items():
        with pytest.raises(lk.ConfigError, match=message):
            models.resolve_device(name)
    with pytest.raises(lk.ConfigError, match="each process takes cuda:LOCAL_RANK"):
        models.resolve_device("cuda:0", local_rank=1)
    with pytest.raises(lk.ConfigError, match="cuda:2: this machine has 2"):
        models.resolve_device("auto", local_rank=2)


def test_device_resolution_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *_: pytest.fail("no GPU to make current"))
    assert models.resolve_device("auto") == torch.device("cpu") == models.resolve_device("auto", local_rank=1)
    for name in ("cuda", "cuda:0"):
        with pytest.raises(lk.ConfigError, match=f"--device {name}: CUDA is not available"):
            models.resolve_device(name)
    with pytest.raises(lk.ConfigError, match="MPS .* is not available"):
        models.resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert models.resolve_device("mps") == torch.device("mps")
    with pytest.raises(lk.ConfigError, match="do not run on MPS"):
        models.resolve_device("mps", local_rank=0)


@pytest.mark.parametrize("command", ["finetune", "eval", "generate", "merge"])
def test_cuda_without_cuda_is_a_clear_error(command, tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    extra = {"merge": ["--adapter", str(tmp_path)], "finetune": ["--out", str(tmp_path / "run")]}.get(command, [])
    assert cli([command, "--model", str(tiny_dir), "--device", "cuda", *extra]) == 2
    assert f"lorakit {command}: error: --device cuda: CUDA is not available" in capsys.readouterr().err
    assert cli([command, "--model", str(tiny_dir), "--device", "tpu", *extra]) == 2
    assert "--device 'tpu': choose auto, cpu, cuda, cuda:N or mps" in capsys.readouterr().err


def test_device_cpu_end_to_end(tiny_dir, tmp_path, monkeypatch, capsys):
    """Every command runs with --device cpu, and puts the model there, even where torch sees a GPU."""
    placed = []
    real_load = models.load

    def recording_load(*args, **kwargs):
        model, tokenizer = real_load(*args, **kwargs)
        placed.append({p.device for p in model.parameters()})
        return model, tokenizer

    monkeypatch.setattr(models, "load", recording_load)
    run = tmp_path / "run"
    assert cli(["finetune", "--model", str(tiny_dir), "--device", "cpu", "--out", str(run), "--steps", "2",
                "--batch-size", "4", "--train-examples", "8", "--eval-examples", "2", "--max-new-tokens", "4",
                "--rank", "2", "--skip-eval-before", "--save-every", "0", "--val-every", "0"]) == 0
    adapter = ["--adapter", str(run / "adapter"), "--device", "cpu", "--max-new-tokens", "4"]
    assert cli(["eval", "--model", str(tiny_dir), *adapter, "--eval-examples", "2"]) == 0
    assert cli(["generate", "--model", str(tiny_dir), *adapter, "--prompt", "hi"]) == 0
    assert cli(["merge", "--model", str(tiny_dir), "--adapter", str(run / "adapter"), "--device", "cpu", "--out",
                str(tmp_path / "merged")]) == 0
    assert placed == [{torch.device("cpu")}] * 4
    assert "accuracy: " in capsys.readouterr().out


@pytest.fixture
def one_process_group(tmp_path):
    """A real (gloo, one-process) process group, so DDP and FSDP2 run inside the test process."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _reductions_per_run(strategy: str, tiny_dir, tmp_path, monkeypatch, counter) -> dict[int, int]:
    """{grad_accum: gradient reductions counted by ``counter``} of 3-step runs under ``strategy``, whose losses
    must agree (accumulating without communication still sends the whole sum on the last micro-step)."""
    monkeypatch.setattr(trainer, "_distributed", lambda config: (0, 1, strategy, torch.device("cpu")))
    counts, losses = {}, {}
    for accum in (1, 2):
        counter.clear()
        run = tmp_path / f"{strategy}-{accum}"
        finetune(_config(tiny_dir, run, steps=3, save_every=0, grad_accum=accum, options=dict(dropout=0.0)),
                 log=lambda m: None)
        counts[accum], losses[accum] = len(counter), _losses(run)
    assert losses[2] == pytest.approx(losses[1], rel=1e-5)
    return counts


def test_ddp_accumulation_all_reduces_once_per_step(one_process_group, tiny_dir, tmp_path, monkeypatch):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    reduced = []

    class CountingDDP(DistributedDataParallel):  # every bucket all-reduce goes through the comm hook
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_comm_hook(None, lambda state, bucket: (reduced.append(1),
                                                                 default_hooks.allreduce_hook(None, bucket))[1])

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", CountingDDP)
    counts = _reductions_per_run("ddp", tiny_dir, tmp_path, monkeypatch, reduced)
    assert counts[1] >= 3 and counts[2] == counts[1]  # two micro-steps, one all-reduce (per bucket)


def test_fsdp2_accumulation_reduces_once_per_step(one_process_group, tiny_dir, tmp_path, monkeypatch):
    # FSDP2's gradient reduction (reduce-scatter, a copy in one process); a private name, so this test
    # follows torch's: it fails loudly, never silently, when torch moves it.
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    reduced, real = [], _fsdp_param_group.foreach_reduce
    monkeypatch.setattr(_fsdp_param_group, "foreach_reduce", lambda *a, **k: (reduced.append(1), real(*a, **k))[1])
    counts = _reductions_per_run("fsdp", tiny_dir, tmp_path, monkeypatch, reduced)
    assert counts[1] == 3 * 2 and counts[2] == counts[1]  # 3 steps x 2 blocks, whatever the micro-steps


def test_torchrun_takes_the_local_gpu_with_nccl_and_the_cpu_with_gloo(two_gpus, monkeypatch):
    backends = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", backends.append)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    config = _config("unused", "unused")
    assert trainer._distributed(config) == (1, 2, "ddp", torch.device("cuda", 1))
    assert backends == ["nccl"] and two_gpus == [1]
    config.device = "cpu"
    assert trainer._distributed(config) == (1, 2, "ddp", torch.device("cpu")) and backends[-1] == "gloo"
    config.device, config.strategy = "auto", "none"  # each process alone, on its own GPU still
    assert trainer._distributed(config) == (0, 1, "none", torch.device("cuda", 1)) and len(backends) == 2
