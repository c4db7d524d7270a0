"""lorakit on a GPU: correctness against PEFT on the device, the default fine-tune, and the training step.

    python benchmarks/gpu_check.py                         # on CUDA: the full check, a few minutes on one GPU
    python benchmarks/gpu_check.py --device cpu --quick    # a smoke run of the same code on the CPU (tiny models)

Checks, for LoRA, DoRA, PiSSA and QLoRA (NF4, double-quantized, via ``lk.quantize``), all linear layers,
r=16, alpha=32, on a SmolLM2-135M-wide Llama of ``--layers`` layers (random weights, from a config):

* logits vs PEFT: ours against ``peft.get_peft_model`` with the equivalent ``LoraConfig`` on the same
  device, after randomising our adapter (it must move the logits by over 10x the limit) and copying its
  tensors into PEFT's; float32 (max |diff| <= 1e-5, TF32 off) and bfloat16 base weights (<= 2e-2),
  float32 adapters on both sides. PEFT's QLoRA base is loaded by transformers with
  ``BitsAndBytesConfig``; both sides must hold bit-identical 4-bit weights.
  PEFT's PiSSA (``init_lora_weights="pissa"``) trains on the residual base W − s·B0·A0, ours keeps W: the
  same function once PEFT's residual is formed from our start (two SVDs of a random W agree only to
  ~1e-5 in their top-r part: its singular values lie close together).
* merge: ``lk.merge`` logits against the unmerged ones (<= 1e-5), and ``lk.unmerge`` restoring every
  tensor of the state dict bit for bit.
* save/load: ``lk.save``, then ``lk.load`` onto a fresh base on the device: logits equal bit for bit.
* route: adapters "a" and "b" (same method), ``lk.route(model, ["a", None, "b", "a"])`` against each
  row run alone with its adapter (or disabled) (<= 1e-5).
* .to(device): a model adapted (and quantized) on the CPU, then moved: every tensor there, logits as
  on the CPU (<= 1e-4; on ``--device cpu`` this is CPU to CPU).
* finetune: the default ``lorakit finetune --device DEVICE`` (SmolLM2-135M-Instruct on the date task):
  ``--dtype auto`` chose the device's dtype (bfloat16 from compute capability 8.0), accuracy gain >= 50 points,
  and its wall time. Skipped with ``--quick``.
* step vs PEFT: the LoRA training step (r=16 on every linear layer of ``harness.llama()``, the 30-layer
  SmolLM2-135M size, batch 8 x 256, bfloat16 autocast, AdamW), each side after warm-up steps: tokens/s,
  and ``torch.cuda.max_memory_allocated`` on CUDA; both sides must start from the same loss.

Prints one table (check, value, limit, result), writes ``--json``, and exits 1 if any check fails;
a check that raises is recorded as failed with its exception (traceback on stderr) and the rest still run.
Nothing comes from a model hub (the finetune run converts the embedded model, see lorakit.train.models).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]  # runs from a bare checkout too (lorakit not installed)
import harness  # noqa: E402

import lorakit as lk  # noqa: E402

RANK, ALPHA = 16, 32.0
# name: (our recipe, the LoraConfig keys that make PEFT's equivalent, quantized base)
METHODS = {
    "lora": (lk.LoRA(rank=RANK, alpha=ALPHA), {}, False),
    "dora": (lk.DoRA(rank=RANK, alpha=ALPHA), {"use_dora": True}, False),
    "pissa": (lk.PiSSA(rank=RANK, alpha=ALPHA), {"init_lora_weights": "pissa"}, False),
    "qlora-nf4": (lk.LoRA(rank=RANK, alpha=ALPHA), {}, True),
}
PEFT_LIMITS = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
GROUPS = ("peft", "merge", "save", "route", "to", "finetune", "step")


@dataclass
class Context:
    device: torch.device
    quick: bool
    layers: int
    tmp: Path
    ids: torch.Tensor  # (4, T) on the device: one row per name of the routing check
    finetune_timeout: float


# --- models -----------------------------------------------------------------------------------------
def base_model(ctx: Context, dtype=torch.float32, device=None, quantized: bool = False):
    """The float32 base (seed 0), moved to ``device`` (default the context's) and ``dtype``, NF4-quantized if asked."""
    if ctx.quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                             max_position_embeddings=128)).eval()
    else:
        model = harness.llama(ctx.layers)
    model.to(device or ctx.device, dtype)
    return lk.quantize(model, "nf4", compute_dtype=dtype) if quantized else model


def adapted(ctx: Context, method: str, dtype=torch.float32, device=None, names=("default",)):
    """The base with adapter(s) ``names`` of ``method``, every adapter tensor randomised (non-zero updates)."""
    recipe, _, quantized = METHODS[method]
    model = base_model(ctx, dtype, device, quantized)
    for name in names:
        lk.adapt(model, recipe, "all-linear", name=name)
    randomize(model)
    return model


def randomize(model) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in lk.model.adapted_layers(model):
            for adapter in layer.adapters.values():
                for p in adapter.parameters():
                    p.add_(torch.randn(p.shape, generator=g).to(p) * 0.02)


def peft_model(ctx: Context, method: str, dtype):
    """PEFT's equivalent of ``adapted(ctx, method, dtype)`` (its own init; see ``copy_into_peft``)."""
    import peft

    _, extra, quantized = METHODS[method]
    if quantized:  # the user's path: transformers quantizes the checkpoint as it loads it
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        saved = ctx.tmp / "base"
        if not (saved / "config.json").is_file():
            base_model(ctx, device="cpu").save_pretrained(saved)
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(saved, quantization_config=config, dtype=dtype,
                                                     device_map={"": str(ctx.device)}).eval()
    else:
        model = base_model(ctx, dtype)
    return peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                      target_modules="all-linear", **extra)).eval()


def copy_into_peft(ours, theirs) -> None:
    """Give PEFT's layers our adapter's tensors (a 4-bit base must be bit-identical first)."""
    with torch.no_grad():
        for path, layer in lk.model.adapted_layers(ours):
            peft_layer = theirs.base_model.model.get_submodule(path)
            if hasattr(layer.weight, "quant_state"):
                theirs_w = peft_layer.base_layer.weight
                if not (torch.equal(theirs_w.data, layer.weight.data)
                        and torch.equal(theirs_w.quant_state.absmax, layer.weight.quant_state.absmax)):
                    raise RuntimeError(f"{path}: PEFT's 4-bit base weight differs from ours")
            mine = layer.adapters["default"].export()  # PEFT's key names
            pairs = [(mine["lora_A.weight"], peft_layer.lora_A["default"].weight),
                     (mine["lora_B.weight"], peft_layer.lora_B["default"].weight)]
            if "lora_magnitude_vector" in mine:  # DoRA
                pairs.append((mine["lora_magnitude_vector"], peft_layer.lora_magnitude_vector["default"].weight))
            if "init_A" in mine:  # PiSSA: PEFT's residual base from our start, as its pissa_init forms it
                W = peft_layer.base_layer.weight
                residual = layer.weight.float() - peft_layer.scaling["default"] * mine["init_B"] @ mine["init_A"]
                pairs.append((residual.to(W.dtype), W))
            for source, target in pairs:
                target.copy_(source)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b.to(a.device)).abs().max().item()


# --- results ------------------------------------------------------------------------------------------
def measured(check: str, value, limit=None, *, minimum: bool = False, fmt: str = ".2e") -> dict:
    """A table row: pass when ``value`` <= ``limit`` (>= with ``minimum``), info without a limit."""
    status = "info" if limit is None else "pass" if (value >= limit if minimum else value <= limit) else "fail"
    return {"check": check, "value": value, "limit": limit, "minimum": minimum, "fmt": fmt, "status": status}


def attempt(check: str, fn, *args) -> list[dict]:
    """``fn(*args)``'s rows; an exception becomes one failed row named ``check`` (traceback to stderr)."""
    start = time.perf_counter()
    print(f"gpu_check: {check} ...", file=sys.stderr, flush=True)
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001  (every failure is a result; the other checks still run)
        traceback.print_exc()
        return [{"check": check, "status": "fail", "error": f"{type(e).__name__}: {e}"}]
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"gpu_check: {check}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


# --- checks -------------------------------------------------------------------------------------------
def check_peft(ctx: Context, method: str, dtype) -> list[dict]:
    ours, theirs = adapted(ctx, method, dtype), peft_model(ctx, method, dtype)
    copy_into_peft(ours, theirs)
    limit = PEFT_LIMITS[dtype]
    mine = logits(ours, ctx.ids)
    with lk.disabled(ours):
        moved = max_diff(mine, logits(ours, ctx.ids))
    if moved <= 10 * limit:
        raise RuntimeError(f"the adapter moves the logits by only {moved:.2e}: the comparison would prove nothing")
    return [measured(peft_label(method, dtype), max_diff(mine, logits(theirs, ctx.ids)), limit)]


def peft_label(method: str, dtype) -> str:
    return f"logits vs PEFT: {method}, {str(dtype).removeprefix('torch.')}"


def check_merge(ctx: Context, method: str) -> list[dict]:
    model = adapted(ctx, method)
    unmerged = logits(model, ctx.ids)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():  # a 4-bit base says that it merges into a dequantized copy
        warnings.simplefilter("ignore", UserWarning)
        lk.merge(model)
    merged = logits(model, ctx.ids)
    lk.unmerge(model)
    after = model.state_dict()
    changed = len(before.keys() ^ after.keys())
    changed += sum(not torch.equal(v, after[k]) for k, v in before.items() if k in after)
    return [measured(f"merge vs unmerged logits: {method}", max_diff(merged, unmerged), 1e-5),
            measured(f"unmerge: state-dict tensors changed: {method}", changed, 0, fmt="d")]


def check_save_load(ctx: Context, method: str) -> list[dict]:
    model = adapted(ctx, method)
    directory = lk.save(model, ctx.tmp / f"adapter-{method}")
    loaded = lk.load(base_model(ctx, quantized=METHODS[method][2]), directory)
    return [measured(f"save/load logits: {method}", max_diff(logits(loaded, ctx.ids), logits(model, ctx.ids)), 0.0)]


def check_route(ctx: Context, method: str) -> list[dict]:
    names = ["a", None, "b", "a"]
    model = adapted(ctx, method, names=("a", "b"))
    with lk.route(model, names):
        routed = logits(model, ctx.ids)
    worst = 0.0
    for i, name in enumerate(names):
        row = ctx.ids[i:i + 1]
        if name is None:
            with lk.disabled(model):
                alone = logits(model, row)
        else:
            lk.activate(model, name)
            alone = logits(model, row)
        worst = max(worst, max_diff(routed[i:i + 1], alone))
    return [measured(f"route a/None/b/a vs rows alone: {method}", worst, 1e-5)]


def check_to_device(ctx: Context, method: str) -> list[dict]:
    model = adapted(ctx, method, device="cpu")
    on_cpu = logits(model, ctx.ids.cpu())
    model.to(ctx.device)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for path, module in model.named_modules():  # a 4-bit weight's quantization state is no tensor of the module's
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors += [(f"{path}.weight.quant_state.absmax", state.absmax)]
            tensors += [(f"{path}.weight.quant_state.state2.absmax", state.state2.absmax)] if state.nested else []
    behind = [n for n, t in tensors if t.device != ctx.device]
    if behind:
        raise RuntimeError(f"{len(behind)} tensors are not on {ctx.device} after .to(): {behind[:3]}")
    return [measured(f".to({ctx.device}) after adapt on CPU: {method}", max_diff(logits(model, ctx.ids), on_cpu), 1e-4)]


def check_finetune(ctx: Context) -> list[dict]:
    out = ctx.tmp / "finetune"
    command = [sys.executable, "-m", "lorakit", "finetune", "--device", str(ctx.device), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    log = ctx.tmp / "finetune.log"
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            code = subprocess.run(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=ctx.finetune_timeout).returncode
        except subprocess.TimeoutExpired:
            code = f"a timeout after {ctx.finetune_timeout:.0f} s"
    wall = time.perf_counter() - start
    output = log.read_text()
    if code != 0:
        tail = " | ".join(line.strip()[-150:] for line in output.replace("\r", "\n").splitlines()[-3:])
        raise RuntimeError(f"lorakit finetune ended with {code}: {tail}")
    found = re.search(r"accuracy: ([\d.]+)% -> ([\d.]+)%", output)
    if found is None:
        raise RuntimeError("the run printed no 'accuracy: X% -> Y%' line")
    before, after = map(float, found.groups())
    from lorakit.train.models import resolve_dtype

    expected = str(resolve_dtype("auto", ctx.device)[0]).removeprefix("torch.")
    chosen = re.search(r"dtype: (\w+) \(auto", output)
    return [measured(f"finetune: --dtype auto chose {chosen and chosen[1]} (the device's: {expected})",
                     int(bool(chosen) and chosen[1] == expected), 1, minimum=True, fmt="d"),
            measured("finetune: accuracy gain (points)", after - before, 50.0, minimum=True, fmt=".1f"),
            measured("finetune: accuracy after (%)", after, fmt=".1f"),
            measured("finetune: wall time (s)", wall, fmt=".1f")]


def check_step(ctx: Context) -> list[dict]:
    import peft

    batch, length, warmup, steps = (2, 32, 1, 2) if ctx.quick else (8, 256, 3, 10)
    ids = harness.tokens(batch, length, vocab=256 if ctx.quick else 49152).to(ctx.device)
    sides = {"lorakit": lambda m: lk.adapt(m, lk.LoRA(rank=RANK, alpha=ALPHA), "all-linear"),
             "PEFT": lambda m: peft.get_peft_model(m, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                                      target_modules="all-linear"))}
    cuda = ctx.device.type == "cuda"
    results = {}
    for side, make in sides.items():  # one side at a time: its peak memory is its own
        model = make(base_model(ctx) if ctx.quick else harness.llama().to(ctx.device)).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step() -> torch.Tensor:
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        first = step().item()  # B = 0: both sides compute the base's loss; later steps never wait for the GPU
        for _ in range(warmup - 1):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(ctx.device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        results[side] = {"first_loss": first, "tokens_per_s": batch * length * steps / (time.perf_counter() - start),
                         "peak_mib": torch.cuda.max_memory_allocated(ctx.device) / 2**20 if cuda else None}
        del model, optimizer, step
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    ours, theirs = results["lorakit"], results["PEFT"]
    rows = [measured("step vs PEFT: first-step loss |diff|", abs(ours["first_loss"] - theirs["first_loss"]), 2e-2),
            measured("step: lorakit tokens/s", ours["tokens_per_s"], fmt=",.0f"),
            measured("step: PEFT tokens/s", theirs["tokens_per_s"], fmt=",.0f"),
            measured("step: lorakit / PEFT tokens/s", ours["tokens_per_s"] / theirs["tokens_per_s"], fmt=".3f")]
    if cuda:
        rows += [measured("step: lorakit peak MiB (max_memory_allocated)", ours["peak_mib"], fmt=",.0f"),
                 measured("step: PEFT peak MiB (max_memory_allocated)", theirs["peak_mib"], fmt=",.0f"),
                 measured("step: lorakit / PEFT peak memory", ours["peak_mib"] / theirs["peak_mib"], fmt=".3f")]
    return rows


# --- the run --------------------------------------------------------------------------------------------
def plan(ctx: Context) -> list[tuple[str, str, object, tuple]]:
    """(group, row name, check function, its arguments) of every check, in running order."""
    checks = [("peft", peft_label(method, dtype), check_peft, (ctx, method, dtype))
              for method in METHODS for dtype in PEFT_LIMITS]
    for group, label, fn in (("merge", "merge/unmerge", check_merge), ("save", "save/load", check_save_load),
                             ("route", "route", check_route), ("to", ".to(device)", check_to_device)):
        checks += [(group, f"{label}: {method}", fn, (ctx, method)) for method in METHODS]
    return checks + [("finetune", "finetune", check_finetune, (ctx,)), ("step", "step vs PEFT", check_step, (ctx,))]


def cell(row: dict) -> dict:
    value = row.get("value")
    limit = row.get("limit")
    return {"check": row["check"], "value": "-" if value is None else format(value, row["fmt"]),
            "limit": "" if limit is None else f"{'>=' if row['minimum'] else '<='} {format(limit, row['fmt'])}",
            "result": row["status"], "note": row.get("error", row.get("note", ""))[:110]}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps, no finetune run (CPU smoke run)")
    parser.add_argument("--layers", type=int, default=4, help="depth of the correctness checks' model")
    parser.add_argument("--skip", default="", help=f"comma-separated groups to leave out: {','.join(GROUPS)}")
    parser.add_argument("--finetune-timeout", type=float, default=480, help="seconds the finetune run may take")
    parser.add_argument("--json", default="benchmarks/results/gpu_check.json")
    args = parser.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(GROUPS):
        parser.error(f"--skip: unknown groups {sorted(skip - set(GROUPS))}; choose from {','.join(GROUPS)}")
    if args.quick:
        skip.add("finetune")

    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
        name = torch.cuda.get_device_name(device)
    else:
        name = "CPU"
    # float32 means float32: TF32 matmuls would make the 1e-5 comparisons meaningless.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        ids = harness.tokens(4, 16 if args.quick else 64, vocab=256 if args.quick else 49152).to(device)
        ctx = Context(device, args.quick, args.layers, Path(tmp), ids, args.finetune_timeout)
        for group, label, fn, fn_args in plan(ctx):
            if group in skip:
                rows.append({"check": label, "status": "skip", "note": "--quick" if args.quick and group == "finetune"
                             else "--skip"})
            else:
                rows += attempt(label, fn, *fn_args)
    seconds = time.perf_counter() - start
    failed = [r["check"] for r in rows if r["status"] == "fail"]
    title = (f"lorakit GPU check on {name} ({device}{', --quick' if args.quick else ''}): {len(failed)} failed, "
             f"{seconds:.0f} s")
    print(title)
    print(harness.table([cell(r) for r in rows], [("check", "check", ""), ("value", "value", ""),
                                                  ("limit", "limit", ""), ("result", "result", ""),
                                                  ("note", "note", "")]))
    harness.write_json(args.json, {"device": str(device), "device_name": name, "quick": args.quick,
                                   "layers": args.layers, "rank": RANK, "alpha": ALPHA, "versions": versions(),
                                   "seconds": seconds, "failed": failed,
                                   "checks": [{k: v for k, v in r.items() if k != "fmt"} for r in rows]})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
