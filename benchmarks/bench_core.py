"""Core engine against PEFT (issue #2): training step, peak memory, inference, mixed-adapter batches.

    python benchmarks/bench_core.py [--layers 30] [--batch 8] [--seq 128] [--repeats 5] [--quick]
                                    [--sections train,memory,infer,mixed] [--wait-quiet SECONDS]
                                    [--json PATH]

Model: a Llama the size of SmolLM2-135M (hidden 576, intermediate 1536, 30 layers, 9/3 heads,
vocabulary 49152, tied embeddings), float32, random weights from a fixed seed; lorakit and PEFT get
identical base weights, identical adapter weights (ours are randomised, B != 0, and copied into
PEFT's modules) and identical inputs. Every timing is a median over ``--repeats`` calls after a
warm-up, with the contenders interleaved (A B C A B C ...), so slow drift of a shared machine hits
every side alike: the ratios are what count, not the milliseconds. A concurrent job on few cores does
not hit them alike (it slows many small ops far more than a few large ones), so every timed group
records the cores other processes used ("other load") and ``--wait-quiet`` waits for idle cores.

  1. train:  forward + backward + AdamW over the trainable parameters, LoRA r=8 on q_proj,v_proj and
             r=16 on all linear layers; ours / PEFT (target <= 1.0) and each step / a no-grad
             forward of the plain base model (same batch).
  2. memory: peak RSS of two such steps, each side in its own fresh process (target ours <= PEFT).
  3. infer:  no-grad forward, unmerged and merged, / the plain base model (merged target: 1.00 within
             the measured noise; unmerged: ours <= PEFT).
  4. mixed:  16 rows over 1, 4 or 16 distinct LoRA adapters (all linear layers, r=8), prefill 16x32 and
             decode 16x1 (a forward on one token per row, no KV cache), keeping only the last position's
             logits as ``generate`` does: ours with ``lk.route`` against PEFT's
             ``model(input_ids, adapter_names=[...])``; speed-up = PEFT time / ours (targets at 16 adapters:
             prefill >= 1.4, decode >= 3), each side / its own single-adapter forward and / the plain base.
             Prefill opens a fresh ``lk.route`` block per call (a new batch); decode is timed both with a
             fresh block per step and with ``--decode-steps`` steps per block (``with lk.route(...):
             model.generate(...)``). PEFT / base is the ceiling of the speed-up: a router that cost
             nothing would still pay for the base model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

import lorakit as lk  # noqa: E402

# name: (our targets, rank, PEFT target_modules); alpha = 2·rank on both sides.
CONFIGS = {
    "qv-r8": (["q_proj", "v_proj"], 8, ["q_proj", "v_proj"]),
    "all-linear-r16": ("all-linear", 16, "all-linear"),
}
MIXED_RANK, MIXED_ADAPTERS, MIXED_COUNTS = 8, 16, (1, 4, 16)
BUILDS = {**CONFIGS, "mixed": ("all-linear", MIXED_RANK, "all-linear")}  # what build_ours / build_peft accept


# --- building ------------------------------------------------------------------------------------
def our_layers(model) -> list[tuple[str, lk.AdaptedLayer]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, lk.AdaptedLayer)]


def build_ours(layers: int, config: str, names=("default",)):
    targets, rank, _ = BUILDS[config]
    model = harness.llama(layers)
    for name in names:
        lk.adapt(model, lk.LoRA(rank=rank, alpha=2 * rank), targets, name=name)
    return model


def build_peft(layers: int, config: str, names=("default",)):
    import peft

    _, rank, targets = BUILDS[config]
    cfg = lambda: peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)  # noqa: E731
    model = peft.get_peft_model(harness.llama(layers), cfg(), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, cfg())
    return model


def randomize(model, seed: int = 3, std: float = 0.02) -> None:
    """Non-zero A and B in every adapter of our model, so the update is real work and visible in outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in our_layers(model):
            for adapter in layer.adapters.values():
                adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=g) * std)
                adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * std)


def copy_to_peft(ours, theirs) -> None:
    """Our adapters' lora_A / lora_B into PEFT's modules of the same path and name (and check the bases match)."""
    count = 0
    with torch.no_grad():
        for path, layer in our_layers(ours):
            module = theirs.base_model.model.get_submodule(path)
            if not torch.equal(module.base_layer.weight, layer.weight):
                raise AssertionError(f"{path}: the two sides were built with different base weights")
            for name, adapter in layer.adapters.items():
                module.lora_A[name].weight.copy_(adapter.lora_A)
                module.lora_B[name].weight.copy_(adapter.lora_B)
                assert module.scaling[name] == adapter.scale, (path, name, module.scaling[name], adapter.scale)
                count += 1
    peft_count = sum(len(m.lora_A) for m in theirs.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    assert count == peft_count, f"copied {count} adapters, PEFT has {peft_count}"


def trainable(model) -> list[torch.nn.Parameter]:
    return lk.trainable_parameters(model) if not hasattr(model, "peft_config") else \
        [p for p in model.parameters() if p.requires_grad]


def train_step(model, ids):
    """One forward + backward + AdamW step over the trainable parameters."""
    params = trainable(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def run():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run, sum(p.numel() for p in params)


def forward(model, ids, **kwargs):
    def run():
        with torch.no_grad():
            return model(input_ids=ids, **kwargs).logits

    return run


def release() -> None:
    gc.collect()


class ForeignLoad:
    """How many cores other processes kept busy while the block ran (from /proc/stat minus our own CPU time).

    The machine is shared: a second load on 2 cores slows every op that runs on both threads, and ops
    that are many and small (PEFT's per-adapter loop) far more than a few large ones. Every section
    records this number so a reader can tell a quiet measurement from a contended one.
    """

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _ours() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def __enter__(self):
        self.start = (time.perf_counter(), self._busy(), self._ours())
        return self

    def __exit__(self, *exc):
        wall, busy, ours = (b - a for a, b in zip(self.start, (time.perf_counter(), self._busy(), self._ours())))
        self.cores = max(0.0, (busy - ours) / wall)


QUIET_WAIT = 0.0  # --wait-quiet


def wait_quiet(limit: float) -> None:
    """Wait (up to ``limit`` seconds) until other processes leave the cores nearly idle for 2 s."""
    end = time.perf_counter() + limit
    while time.perf_counter() < end:
        with ForeignLoad() as load:
            time.sleep(2)
        if load.cores < 0.15:
            return


def frozen_base(layers: int):
    """The plain model, frozen as both adapted models freeze theirs (it matters: PyTorch's matmul takes a
    slower path for a frozen weight and a non-contiguous input, e.g. the lm_head on logits_to_keep=1)."""
    return harness.llama(layers).requires_grad_(False)


def timed(contenders, repeats: int, warmup: int) -> tuple[dict[str, float], float, dict[str, float]]:
    """Round-robin timing as harness.round_robin (warm-up, then A B C A B C ...): median seconds per
    contender, the cores other processes used meanwhile, and each contender's spread (half the range of
    its samples over the median: the noise a ratio of two medians should be read against)."""
    wait_quiet(QUIET_WAIT)
    with ForeignLoad() as load:
        for _ in range(warmup):
            for fn in contenders.values():
                fn()
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(repeats):
            for name, fn in contenders.items():
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(v) for name, v in samples.items()}
    spread = {name: (max(v) - min(v)) / 2 / medians[name] for name, v in samples.items()}
    return medians, load.cores, spread


# --- 1. training step ----------------------------------------------------------------------------
def bench_train(args) -> list[dict]:
    ids = harness.tokens(args.batch, args.seq)
    base = frozen_base(args.layers)
    rows = []
    for config in CONFIGS:
        ours, theirs = build_ours(args.layers, config), build_peft(args.layers, config)
        randomize(ours)
        copy_to_peft(ours, theirs)
        ours.train(), theirs.train()
        our_step, our_n = train_step(ours, ids)
        peft_step, peft_n = train_step(theirs, ids)
        assert our_n == peft_n, (our_n, peft_n)
        t, load, spread = timed({"ours": our_step, "peft": peft_step, "base_fwd": forward(base, ids)},
                                args.repeats, args.warmup)
        rows.append({"config": config, "trainable": our_n, "other_cores": load, "spread": spread,
                     "ours_ms": 1e3 * t["ours"], "peft_ms": 1e3 * t["peft"], "base_fwd_ms": 1e3 * t["base_fwd"],
                     "ours_vs_peft": t["ours"] / t["peft"],
                     "ours_vs_base_fwd": t["ours"] / t["base_fwd"], "peft_vs_base_fwd": t["peft"] / t["base_fwd"]})
        print(f"  train {config}: {rows[-1]}", file=sys.stderr, flush=True)
        del ours, theirs, our_step, peft_step
        release()
    return rows


# --- 2. peak memory (one fresh process per side) ------------------------------------------------
def memory_child(side: str, config: str, args) -> None:
    ids = harness.tokens(args.batch, args.seq)
    model = (build_ours if side == "ours" else build_peft)(args.layers, config)
    if side == "ours":
        randomize(model)
    model.train()
    step, _ = train_step(model, ids)
    gc.collect()
    before = harness.current_rss_mb()
    ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    harness.reset_peak_rss()
    step()
    step()  # the second step holds AdamW's state as well
    peak = harness.peak_rss_mb()
    ru_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"before_mb": before, "peak_mb": peak, "step_mb": peak - before,
                      "ru_maxrss_before_mb": ru_before, "ru_maxrss_after_mb": ru_after,
                      "ru_maxrss_delta_mb": ru_after - ru_before}))


def bench_memory(args) -> list[dict]:
    rows = []
    common = ["--layers", str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq),
              "--threads", str(torch.get_num_threads())]
    for config in CONFIGS:
        row = {"config": config}
        for side in ("ours", "peft"):
            m = harness.in_child(__file__, "--memory-child", side, config, *common)
            row.update({f"{side}_{k}": v for k, v in m.items()})
        row["ours_vs_peft_peak"] = row["ours_peak_mb"] / row["peft_peak_mb"]
        row["ours_vs_peft_step"] = row["ours_step_mb"] / row["peft_step_mb"]
        rows.append(row)
        print(f"  memory {config}: {row}", file=sys.stderr, flush=True)
    return rows


# --- 3. inference ---------------------------------------------------------------------------------
def bench_infer(args) -> list[dict]:
    ids = harness.tokens(args.batch, args.seq)
    base = frozen_base(args.layers)
    rows = []
    for config in CONFIGS:
        ours, theirs = build_ours(args.layers, config).eval(), build_peft(args.layers, config).eval()
        randomize(ours)
        copy_to_peft(ours, theirs)
        small = ids[:2, :16]
        torch.testing.assert_close(forward(ours, small)(), forward(theirs, small)(), atol=1e-4, rtol=1e-4)
        contenders = {"base": forward(base, ids), "ours": forward(ours, ids), "peft": forward(theirs, ids)}
        unmerged, load_u, spread_u = timed(contenders, args.repeats, args.warmup)
        expected = forward(ours, small)()
        lk.merge(ours)
        theirs.merge_adapter()
        torch.testing.assert_close(forward(ours, small)(), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(forward(theirs, small)(), expected, atol=1e-4, rtol=1e-4)
        merged, load_m, spread_m = timed(contenders, args.repeats, args.warmup)
        rows.append({"config": config, "other_cores": (load_u + load_m) / 2, "base_ms": 1e3 * unmerged["base"],
                     "spread_unmerged": spread_u, "spread_merged": spread_m,
                     "merged_noise": spread_m["base"] + spread_m["ours"],
                     "ours_unmerged_ms": 1e3 * unmerged["ours"], "peft_unmerged_ms": 1e3 * unmerged["peft"],
                     "ours_unmerged_vs_base": unmerged["ours"] / unmerged["base"],
                     "peft_unmerged_vs_base": unmerged["peft"] / unmerged["base"],
                     "ours_vs_peft_unmerged": unmerged["ours"] / unmerged["peft"],
                     "ours_merged_vs_base": merged["ours"] / merged["base"],
                     "peft_merged_vs_base": merged["peft"] / merged["base"]})
        print(f"  infer {config}: {rows[-1]}", file=sys.stderr, flush=True)
        del ours, theirs, contenders
        release()
    return rows


# --- 4. mixed-adapter batches ---------------------------------------------------------------------
def routed(model, ids, names, steps: int = 1):
    """``steps`` forwards inside one ``lk.route`` block (a fresh block per call: a new batch)."""
    def run():
        with torch.no_grad(), lk.route(model, names):
            for _ in range(steps):
                out = model(input_ids=ids, logits_to_keep=1).logits
        return out

    return run


def plain(model, ids, steps: int = 1, **kwargs):
    """``steps`` no-grad forwards keeping the last position's logits (as generate does), ``kwargs`` to the model."""
    def run():
        with torch.no_grad():
            for _ in range(steps):
                out = model(input_ids=ids, logits_to_keep=1, **kwargs).logits
        return out

    return run


def bench_mixed(args) -> tuple[list[dict], dict]:
    names = [f"a{i}" for i in range(MIXED_ADAPTERS)]
    ours = build_ours(args.layers, "mixed", names).eval()
    theirs = build_peft(args.layers, "mixed", names).eval()
    base = frozen_base(args.layers)
    randomize(ours)
    copy_to_peft(ours, theirs)
    rows_n = args.mixed_rows

    # Equal work: the same per-row adapters give the same logits on both sides (and differ from the base).
    ids = harness.tokens(rows_n, 8, seed=7)
    route = [names[i % MIXED_ADAPTERS] for i in range(rows_n - 2)] + [None, names[0]]
    with torch.no_grad(), lk.route(ours, route):
        mine = ours(input_ids=ids).logits
    with torch.no_grad():
        peft_out = theirs(input_ids=ids, adapter_names=[n if n is not None else "__base__" for n in route]).logits
        base_out = base(input_ids=ids).logits
    diff = (mine - peft_out).abs().max().item()
    torch.testing.assert_close(mine, peft_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mine[-2], base_out[-2], atol=1e-5, rtol=1e-5)  # the None row is the base
    assert (mine[:-2] - base_out[:-2]).abs().amax(dim=(1, 2)).min() > 1e-3  # every adapted row really changes
    check = {"max_abs_diff_ours_vs_peft": diff, "rows": rows_n, "adapters": MIXED_ADAPTERS,
             "min_row_logit_change_from_adapters": (mine[:-2] - base_out[:-2]).abs().amax(dim=(1, 2)).min().item()}
    print(f"  mixed check: {check}", file=sys.stderr, flush=True)

    lk.activate(ours, names[0])
    theirs.set_adapter(names[0])
    rows = []
    phases = [("prefill", args.prefill_len, 1, args.repeats),
              ("decode", 1, 1, args.repeats * args.decode_factor),
              ("decode", 1, args.decode_steps, args.repeats)]
    for phase, length, steps, repeats in phases:
        ids = harness.tokens(rows_n, length, seed=11)
        contenders = {"base": plain(base, ids, steps), "ours_single": plain(ours, ids, steps),
                      "peft_single": plain(theirs, ids, steps)}
        for n in MIXED_COUNTS:
            route = [names[i % n] for i in range(rows_n)]
            contenders[f"ours_{n}"] = routed(ours, ids, route, steps)
            contenders[f"peft_{n}"] = plain(theirs, ids, steps, adapter_names=route)
        t, load, spread = timed(contenders, repeats, args.warmup)
        t = {k: v / steps for k, v in t.items()}
        tokens = rows_n * length
        label = f"{phase} {rows_n}x{length}" + (f", {steps} steps/route" if phase == "decode" else "")
        for n in MIXED_COUNTS:
            rows.append({"phase": label, "adapters": n, "steps_per_route": steps, "other_cores": load,
                         "spread": {k: spread[k] for k in ("base", "ours_single", "peft_single",
                                                           f"ours_{n}", f"peft_{n}")},
                         "ours_ms": 1e3 * t[f"ours_{n}"], "peft_ms": 1e3 * t[f"peft_{n}"],
                         "ours_tok_s": tokens / t[f"ours_{n}"], "peft_tok_s": tokens / t[f"peft_{n}"],
                         "speedup_vs_peft": t[f"peft_{n}"] / t[f"ours_{n}"],
                         "ours_vs_own_single": t[f"ours_{n}"] / t["ours_single"],
                         "peft_vs_own_single": t[f"peft_{n}"] / t["peft_single"],
                         "ours_vs_base": t[f"ours_{n}"] / t["base"], "peft_vs_base": t[f"peft_{n}"] / t["base"],
                         "base_ms": 1e3 * t["base"],
                         "ours_single_ms": 1e3 * t["ours_single"], "peft_single_ms": 1e3 * t["peft_single"]})
            print(f"  mixed: {rows[-1]}", file=sys.stderr, flush=True)
    del ours, theirs, base
    release()
    return rows, check


# --- report ---------------------------------------------------------------------------------------
def targets_met(results: dict) -> list[dict]:
    out = []
    for r in results.get("train", []):
        out.append({"target": f"train step {r['config']}: ours/PEFT <= 1.00", "value": r["ours_vs_peft"],
                    "met": r["ours_vs_peft"] <= 1.0})
    for r in results.get("memory", []):
        out.append({"target": f"peak RSS {r['config']}: ours/PEFT <= 1.00", "value": r["ours_vs_peft_peak"],
                    "met": r["ours_vs_peft_peak"] <= 1.0})
    for r in results.get("infer", []):
        noise = max(0.01, r["merged_noise"])
        out.append({"target": f"merged/base {r['config']}: 1.00 within noise (±{noise:.3f})",
                    "value": r["ours_merged_vs_base"], "met": abs(r["ours_merged_vs_base"] - 1) <= noise})
        out.append({"target": f"unmerged {r['config']}: ours/PEFT <= 1.00", "value": r["ours_vs_peft_unmerged"],
                    "met": r["ours_vs_peft_unmerged"] <= 1.0})
    for r in results.get("mixed", []):
        if r["adapters"] == MIXED_COUNTS[-1]:
            goal = 1.4 if r["phase"].startswith("prefill") else 3.0
            out.append({"target": f"mixed {r['phase']}, {r['adapters']} adapters: PEFT/ours >= {goal}",
                        "ceiling": r["peft_vs_base"],
                        "value": r["speedup_vs_peft"], "met": r["speedup_vs_peft"] >= goal})
    return out


def report(results: dict, args) -> None:
    t = harness.table
    print(f"\nSmolLM2-135M-sized Llama, {args.layers} layers, fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads on {os.cpu_count()} cores; "
          f"medians of {args.repeats} interleaved repeats; "
          "'other load' = cores kept busy by other processes meanwhile")
    if "train" in results:
        print(f"\n1. training step (fwd+bwd+AdamW), batch {args.batch}x{args.seq}")
        print(t(results["train"], [("config", "config", ""), ("ours_ms", "ours ms", ".0f"),
                                   ("peft_ms", "PEFT ms", ".0f"),
                                   ("ours_vs_peft", "ours/PEFT", ".3f"), ("ours_vs_base_fwd", "ours/base fwd", ".2f"),
                                   ("peft_vs_base_fwd", "PEFT/base fwd", ".2f"), ("other_cores", "other load", ".2f")]))
    if "memory" in results:
        print(f"\n2. peak RSS of two training steps, own process per side, batch {args.batch}x{args.seq}")
        print(t(results["memory"], [("config", "config", ""), ("ours_before_mb", "ours before", ".0f"),
                                    ("ours_peak_mb", "ours peak", ".0f"), ("peft_before_mb", "PEFT before", ".0f"),
                                    ("peft_peak_mb", "PEFT peak", ".0f"),
                                    ("ours_vs_peft_peak", "peak ours/PEFT", ".3f"),
                                    ("ours_vs_peft_step", "step ours/PEFT", ".3f"),
                                    ("ours_ru_maxrss_delta_mb", "ours ru_maxrss Δ", ".0f"),
                                    ("peft_ru_maxrss_delta_mb", "PEFT ru_maxrss Δ", ".0f")]))
    if "infer" in results:
        print(f"\n3. inference (no-grad forward), batch {args.batch}x{args.seq}, time / plain base model")
        print(t(results["infer"], [("config", "config", ""), ("base_ms", "base ms", ".0f"),
                                   ("ours_merged_vs_base", "ours merged", ".3f"),
                                   ("peft_merged_vs_base", "PEFT merged", ".3f"),
                                   ("ours_unmerged_vs_base", "ours unmerged", ".3f"),
                                   ("peft_unmerged_vs_base", "PEFT unmerged", ".3f"),
                                   ("ours_vs_peft_unmerged", "unmerged ours/PEFT", ".3f"),
                                   ("merged_noise", "merged noise ±", ".3f"), ("other_cores", "other load", ".2f")]))
    if "mixed" in results:
        print(f"\n4. mixed batch, {MIXED_ADAPTERS} LoRA adapters r={MIXED_RANK} on all linear layers; "
              "lk.route vs PEFT adapter_names "
              f"(max |Δlogit| {results['mixed_check']['max_abs_diff_ours_vs_peft']:.1e}); "
              "time per forward, logits of the last position")
        print(t(results["mixed"], [("phase", "phase", ""), ("adapters", "adapters", "d"), ("ours_ms", "ours ms", ".1f"),
                                   ("peft_ms", "PEFT ms", ".1f"), ("ours_tok_s", "ours tok/s", ".0f"),
                                   ("peft_tok_s", "PEFT tok/s", ".0f"), ("speedup_vs_peft", "PEFT/ours", ".2f"),
                                   ("ours_vs_own_single", "ours/single", ".2f"),
                                   ("peft_vs_own_single", "PEFT/single", ".2f"), ("ours_vs_base", "ours/base", ".2f"),
                                   ("peft_vs_base", "PEFT/base", ".2f"), ("other_cores", "other load", ".2f")]))
    goals = targets_met(results)
    print("\ntargets")
    print(t([{**g, "met": "yes" if g["met"] else "NO"} for g in goals],
            [("target", "target", ""), ("value", "value", ".3f"), ("met", "met", ""),
             ("ceiling", "ceiling (PEFT/base)", ".2f")]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 30, --quick 4)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per contender (default 5, --quick 3)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mixed-rows", type=int, default=16)
    parser.add_argument("--prefill-len", type=int, default=32)
    parser.add_argument("--decode-factor", type=int, default=4, help="decode calls are short: repeats x this")
    parser.add_argument("--decode-steps", type=int, default=8,
                        help="decode forwards per route block in the generation-like rows "
                             "(as `with lk.route(...): model.generate(...)`)")
    parser.add_argument("--sections", default="train,memory,infer,mixed")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's, = cores)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each timed group wait up to this long for other processes to go idle")
    parser.add_argument("--quick", action="store_true", help="4 layers, 3 repeats: a smoke run in about a minute")
    parser.add_argument("--json", default=None,
                        help="results file (default benchmarks/results/core.json; with --quick core-quick.json, so "
                             "a smoke run never replaces the recorded full run)")
    parser.add_argument("--memory-child", nargs=2, metavar=("SIDE", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.layers = args.layers or (4 if args.quick else 30)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.json = args.json or f"benchmarks/results/core{'-quick' if args.quick else ''}.json"
    if args.threads:
        torch.set_num_threads(args.threads)
    global QUIET_WAIT
    QUIET_WAIT = args.wait_quiet
    if args.memory_child:
        return memory_child(*args.memory_child, args)

    sections = args.sections.split(",")
    results: dict = {}
    if "memory" in sections:  # first, while this process is small: a child's ru_maxrss starts at its parent's RSS
        results["memory"] = bench_memory(args)
    if "train" in sections:
        results["train"] = bench_train(args)
    if "infer" in sections:
        results["infer"] = bench_infer(args)
    if "mixed" in sections:
        results["mixed"], results["mixed_check"] = bench_mixed(args)
    report(results, args)
    import peft
    import transformers

    harness.write_json(args.json, {"peft": peft.__version__, "transformers": transformers.__version__,
                                   "args": vars(args), **results, "targets": targets_met(results)})
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
