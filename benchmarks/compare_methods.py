"""Every method fine-tunes the real SmolLM2-135M-Instruct on both built-in tasks, and its adapter is inspected.

    # the comparison: 13 methods x 2 tasks (date, extract), 30 steps of 8, 100 held-out examples each
    python benchmarks/compare_methods.py
    python benchmarks/compare_methods.py --steps 30 --train-examples 400 --eval-examples 100 \\
        --tasks date,extract --json benchmarks/results/compare_methods.json

    # the LoRA paper's "rank 1 suffices for W_q and W_v": LoRA on q_proj,v_proj at ranks 1..64, one task
    python benchmarks/compare_methods.py --sweep
    python benchmarks/compare_methods.py --sweep --ranks 1,2,4,8,16,64 --tasks date \\
        --json benchmarks/results/rank_sweep.json

    # a part of it, e.g. a quick check (rows of other methods already in the JSON are kept, see below)
    python benchmarks/compare_methods.py --methods "LoRA r=8,SVF" --tasks date --steps 2 --eval-examples 8 \\
        --train-examples 32

Each (method, task) is one ``lorakit.train.trainer.finetune`` run in a fresh Python process (this script
with ``--one NAME TASK``), so the peak resident memory it reports is that run's alone; the run's
directory is ``--out-dir/<method>-<task>`` (default ``runs/compare``). All runs share the trainer's
recipe: AdamW, 6 warm-up steps then cosine, clipping at 1.0, batch 8, seed 0, the same training and
held-out examples of the task; only the method's settings and learning rate differ (``METHODS``). The
accuracy before training (exact match, the base model) is the same for every method of a task: it is
measured by the task's first run and the others skip it. Validation and intermediate checkpoints are
off, so seconds per step is the optimizer step alone.

After each run the trained adapter is loaded onto one base model kept by this process and inspected
(``lorakit.analysis.inspect``, as ``lorakit inspect``): the mean effective rank of each module's ΔW,
the mean utilisation (rank at 90 % of ‖ΔW‖²_F / the adapter's rank; none for SVF/SVFT, which have no
rank), the total number of intruder dimensions (top singular vectors of W + ΔW unlike any of W's), and
the mean ‖ΔW‖_F / ‖W‖_F. The QLoRA adapter is inspected against the full-precision W.

Results: a markdown table on stdout and JSON (``--json``), rewritten after every run so a run that is
cut off keeps its rows. Rows already in that JSON for other (method, task) pairs are kept when the file
was made with the same steps / examples / seed, so the benchmark can be run a few methods at a time;
otherwise the file is started afresh.

Learning rates (``METHODS``): the papers tune over thousands of steps on 1–70B models; this run is 30–60
steps on 135M. The anchor is lorakit's default job, LoRA r=16 alpha=32 at 2e-3 for 60 steps (100 % on
date; the LoRA paper's own rates are 2e-4..5e-4). A paper that states its method's lr relative to
LoRA's (the same, or a ratio) gets that relation applied to 2e-3; a paper that states only an absolute
lr far from LoRA's regime gets that value, or a short-run choice of ours near it, said as such.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

LORA_LR = 2e-3  # lorakit's default `lorakit finetune` job: LoRA r=16 alpha=32, 60 steps, 100 % on date

# name: registry method, its settings, lr, extra FinetuneConfig fields, where the lr comes from.
METHODS: dict[str, dict] = {
    "LoRA r=8": dict(
        method="lora", options=dict(rank=8, alpha=16.0), lr=LORA_LR,
        source="LoRA (Hu et al. 2021) uses 2e-4..5e-4 over long runs; 2e-3 is lorakit's default 60-step job, "
               "the anchor of every rate below (alpha = 2r: the same scale 2 as r=16)"),
    "LoRA r=16": dict(
        method="lora", options=dict(rank=16, alpha=32.0), lr=LORA_LR,
        source="lorakit's default job (`lorakit finetune`: r=16, alpha=32, lr 2e-3)"),
    "rsLoRA r=16": dict(
        method="rslora", options=dict(rank=16, alpha=32.0), lr=LORA_LR,
        source="rsLoRA (Kalajdzievski 2023) compares at LoRA's alpha and lr, changing only the scale "
               "alpha/r -> alpha/sqrt(r) (here 8 instead of 2)"),
    "LoRA+ r=16": dict(
        method="lora", options=dict(rank=16, alpha=32.0), lr=LORA_LR / 4, lora_plus_ratio=16.0,
        source="LoRA+ (Hayou et al. 2024): lr of B = 16 x lr of A (ratio 2^4), lr of A at or below LoRA's; "
               "ours: A at LoRA's / 4 (B at 4x LoRA's): at A = 2e-3 a 12-step probe's loss jumped 0.65 -> 4.1 "
               "in its first warm-up step, at 5e-4 it fell as LoRA's"),
    "DoRA r=16": dict(
        method="dora", options=dict(rank=16, alpha=32.0), lr=LORA_LR,
        source="DoRA (Liu et al. 2024) trains with LoRA's recipe, lr at or a little below LoRA's; ours: equal"),
    "PiSSA r=16": dict(
        method="pissa", options=dict(rank=16, alpha=16.0), lr=LORA_LR,
        source="PiSSA (Meng et al. 2024): LoRA's lr and schedule, alpha = r (scale 1)"),
    "MiLoRA r=16": dict(
        method="milora", options=dict(rank=16, alpha=16.0), lr=LORA_LR,
        source="MiLoRA (Wang et al. 2024): LoRA's hyperparameters; alpha = r as PiSSA, which it mirrors (ours)"),
    "LoRA-XS r=16": dict(
        method="lora_xs", options=dict(rank=16, alpha=16.0), lr=1e-2,
        source="LoRA-XS (Balazy et al. 2024) reference: lr 4e-3 at r=64 (alpha = r), vs 2e-5 for its "
               "PiSSA-derived LoRA baseline; ours for 30 steps at r=16: 1e-2 (5x LoRA's)"),
    "SVF": dict(
        method="svf", options={}, lr=1e-2,
        source="Transformer^2 (Sun et al. 2025) trains z with lr 2e-3 by REINFORCE over ~2000 steps; ours "
               "for 30 supervised steps: 1e-2 (5x LoRA's, as benchmarks/train_methods.py)"),
    "SVFT plain": dict(
        method="svft", options=dict(pattern="plain"), lr=5e-2,
        source="SVFT (Lingam et al. 2024) reference scripts: 5e-2 for SVFT_P (the diagonal) on Gemma-2B"),
    "SVFT banded d=2": dict(
        method="svft", options=dict(pattern="banded", width=2), lr=1e-2,
        source="SVFT reference: 5e-2 plain, 5e-3 for banded/random d=16; ours for d=2, between them: 1e-2"),
    "AdaLoRA 16→8": dict(
        method="adalora", options=dict(init_rank=16, target_rank=8, alpha=32.0), lr=LORA_LR,
        source="AdaLoRA (Zhang et al. 2023) GLUE rates 5e-4..1.2e-3, LoRA's regime: LoRA's lr; scale "
               "alpha/init_rank = 2 as LoRA r=16; schedule from --steps (prune after 1/10, freeze last 1/5)"),
    "QLoRA r=16": dict(
        method="lora", options=dict(rank=16, alpha=32.0), lr=LORA_LR, quantize="nf4",
        source="QLoRA (Dettmers et al. 2023): LoRA's lr regime (2e-4 for 7-13B) on an nf4 base: LoRA's lr"),
}

SWEEP_RANKS = (1, 2, 4, 8, 16, 64)
SWEEP_SOURCE = ("LoRA paper Table 6 (W_q, W_v at r=1..64); alpha = 2r keeps the scale at 2 for every rank "
                "(the paper fixed alpha instead), lr 2e-3 as LoRA r=16")


def sweep_name(rank: int) -> str:
    return f"LoRA q,v r={rank}"


def spec(name: str) -> dict:
    """The settings of row ``name``: a ``METHODS`` entry or a rank-sweep row (``LoRA q,v r=N``)."""
    if name in METHODS:
        return {"targets": "all-linear", **METHODS[name]}
    found = re.fullmatch(r"LoRA q,v r=(\d+)", name)
    if found:
        rank = int(found.group(1))
        return dict(method="lora", options=dict(rank=rank, alpha=2.0 * rank), lr=LORA_LR, targets="q_proj,v_proj",
                    source=SWEEP_SOURCE)
    raise SystemExit(f"unknown method row {name!r}; rows: {', '.join(METHODS)} or 'LoRA q,v r=N'")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("→", "to").replace("+", "plus")).strip("-")


# --- one run, in its own process ------------------------------------------------------------------------------------
def run_one(name: str, task: str, args) -> dict:
    """Fine-tune row ``name`` on ``task`` (in this process); the figures of the run."""
    import torch

    from lorakit.train import config as cfg
    from lorakit.train.trainer import finetune

    s = spec(name)
    out = Path(args.out_dir) / f"{slug(name)}-{task}"
    config = cfg.FinetuneConfig(
        method=s["method"], task=task, steps=args.steps, lr=s["lr"], out=str(out), eval_examples=args.eval_examples,
        train_examples=args.train_examples, options=dict(s["options"]), targets=s["targets"],
        quantize=s.get("quantize", ""), lora_plus_ratio=s.get("lora_plus_ratio", 0.0),
        skip_eval_before=args.skip_before, val_every=0, save_every=0, device=args.device, seed=args.seed)
    summary = finetune(config, log=lambda m: print(m, file=sys.stderr, flush=True))
    result = {k: summary[k] for k in ("accuracy_before", "accuracy_after", "eval_examples", "trainable", "total",
                                      "steps", "batch_size", "seconds", "train_seconds", "eval_seconds",
                                      "tokens_per_s", "peak_memory_mb", "adapter")}  # peak RSS of this process: the run alone
    result["seconds_per_step"] = summary["train_seconds"] / max(summary["steps"], 1)
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def in_child(name: str, task: str, args, skip_before: bool) -> dict:
    """``run_one`` in a fresh Python process (its log and progress on our stderr); the JSON it prints."""
    command = [sys.executable, __file__, "--one", name, task, "--steps", str(args.steps),
               "--eval-examples", str(args.eval_examples), "--train-examples", str(args.train_examples),
               "--out-dir", args.out_dir, "--device", args.device, "--seed", str(args.seed)]
    if skip_before:
        command.append("--skip-before")
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(f"the run exited with status {done.returncode} (its log is above)")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- inspection, on one base model kept for all runs ----------------------------------------------------------------
class Inspector:
    def __init__(self):
        self.model = None

    def __call__(self, adapter: str) -> dict:
        import lorakit as lk
        from lorakit import analysis
        from lorakit.train import models

        if self.model is None:
            self.model, _ = models.load("", log=lambda m: None)
        start = time.time()
        lk.load(self.model, adapter)
        try:
            rows = analysis.inspect(self.model, "default")
        finally:
            lk.delete(self.model, "default")
        used = [r["utilisation"] for r in rows if r["utilisation"] is not None]
        return {"modules": len(rows),
                "effective_rank": statistics.fmean(r["effective_rank"] for r in rows),
                "utilisation": statistics.fmean(used) if used else None,
                "intruders": sum(r["intruders"] for r in rows),
                "relative_norm": statistics.fmean(r["relative_norm"] for r in rows),
                "inspect_seconds": time.time() - start}


# --- the table and the JSON -----------------------------------------------------------------------------------------
def _num(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def markdown(rows: list[dict]) -> str:
    head = ("| method | task | lr | trainable | acc before % | acc after % | s/step | peak MB | eff. rank ΔW "
            "| utilisation | intruders | ‖ΔW‖/‖W‖ |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['task']} | {r['lr']:g} | failed: {r['error']} |" + " |" * 8)
            continue
        i = r.get("inspect") or {}
        lines.append(
            f"| {r['method']} | {r['task']} | {r['lr']:g} | {r['trainable']:,} | {_num(r['accuracy_before'], '.1f')} "
            f"| {_num(r['accuracy_after'], '.1f')} | {r['seconds_per_step']:.2f} | {r['peak_memory_mb']:,.0f} "
            f"| {_num(i.get('effective_rank'), '.2f')} | {_num(i.get('utilisation'), '.2f')} "
            f"| {_num(i.get('intruders'), 'd')} | {_num(i.get('relative_norm'), '.4f')} |")
    return "\n".join(lines)


def settings_of(args) -> dict:
    return {"steps": args.steps, "train_examples": args.train_examples, "eval_examples": args.eval_examples,
            "seed": args.seed, "batch_size": 8}


def earlier_rows(path: Path, settings: dict) -> list[dict]:
    """The rows of an earlier run of this script at ``path`` with the same ``settings``; none otherwise."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return []
    if data.get("settings") != settings:
        print(f"{path}: made with other settings ({data.get('settings')}); starting it afresh", file=sys.stderr)
        return []
    return data.get("rows", [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of every run (batch 8)")
    parser.add_argument("--train-examples", type=int, default=400, help="training examples generated per task")
    parser.add_argument("--eval-examples", type=int, default=100, help="held-out examples scored by exact match")
    parser.add_argument("--methods", default="", help="comma-separated row names (default: all; '->' may stand for '→'): "
                        + ", ".join(METHODS))
    parser.add_argument("--tasks", default="", help="comma-separated: date, extract (default: both; --sweep: date)")
    parser.add_argument("--sweep", action="store_true", help="LoRA on q_proj,v_proj at --ranks instead")
    parser.add_argument("--ranks", default=",".join(map(str, SWEEP_RANKS)), help="--sweep: the ranks")
    parser.add_argument("--no-inspect", action="store_true", help="skip the adapter inspection (~30-40 s a run)")
    parser.add_argument("--out-dir", default="runs/compare", help="run directories: OUT_DIR/<method>-<task>")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="default: benchmarks/results/compare_methods.json "
                        "(--sweep: benchmarks/results/rank_sweep.json)")
    parser.add_argument("--one", nargs=2, metavar=("NAME", "TASK"), help=argparse.SUPPRESS)
    parser.add_argument("--skip-before", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        print(json.dumps(run_one(*args.one, args)))
        return

    if args.sweep:
        names = [sweep_name(int(r)) for r in args.ranks.split(",") if r.strip()]
        tasks = [t.strip() for t in (args.tasks or "date").split(",") if t.strip()]
        path = Path(args.json or "benchmarks/results/rank_sweep.json")
    else:
        names = ([m.strip().replace("->", "→") for m in args.methods.split(",") if m.strip()] if args.methods
                 else list(METHODS))
        tasks = [t.strip() for t in (args.tasks or "date,extract").split(",") if t.strip()]
        path = Path(args.json or "benchmarks/results/compare_methods.json")
    for name in names:
        spec(name)  # unknown names stop here, before any run
    for task in tasks:
        if task not in ("date", "extract"):
            raise SystemExit(f"unknown task {task!r}: date or extract")

    settings = settings_of(args)
    rows = earlier_rows(path, settings)
    before = {r["task"]: r["accuracy_before"] for r in rows if r.get("accuracy_before") is not None}
    inspect = Inspector()
    started = time.time()
    for task in tasks:
        for name in names:
            s = spec(name)
            row = {"method": name, "task": task, "registry_method": s["method"], "options": s["options"],
                   "targets": s["targets"], "lr": s["lr"], "lora_plus_ratio": s.get("lora_plus_ratio", 0.0),
                   "quantize": s.get("quantize", ""), "lr_source": s["source"]}
            print(f"\n=== {name} on {task} ({len(rows)} rows so far, {time.time() - started:.0f} s)", file=sys.stderr,
                  flush=True)
            try:
                result = in_child(name, task, args, skip_before=task in before)
                if result["accuracy_before"] is not None:
                    before[task] = result["accuracy_before"]
                result["accuracy_before"] = before.get(task)
                row.update(result)
                if not args.no_inspect:
                    row["inspect"] = inspect(result["adapter"])
            except Exception as e:  # a failed run is a row; the others go on
                row["error"] = f"{type(e).__name__}: {e}"
            rows = [r for r in rows if (r["method"], r["task"]) != (name, task)] + [row]
            harness.write_json(path, {"settings": settings, "sweep": args.sweep, "rows": rows,
                                      "command": " ".join([os.path.basename(sys.executable), *sys.argv])})
            print(markdown([row]).splitlines()[-1], file=sys.stderr, flush=True)
    print(f"\nSmolLM2-135M-Instruct, {args.steps} steps of 8, {args.train_examples} training / {args.eval_examples} "
          f"held-out examples per task, seed {args.seed}; {time.time() - started:.0f} s\n")
    print(markdown(rows))
    print("\nLearning rates:")
    for name in dict.fromkeys(r["method"] for r in rows):
        print(f"- {name}: {spec(name)['lr']:g} — {spec(name)['source']}")
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
