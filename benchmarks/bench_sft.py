"""`lorakit finetune` against TRL's ``SFTTrainer`` + PEFT on a multi-task data set of this script's making.

    .venv/bin/python benchmarks/bench_sft.py --install-trl      # once: TRL, PEFT, transformers in --trl-venv
    .venv/bin/python benchmarks/bench_sft.py                    # 3 seeds x {raw, chat} x {lorakit, TRL}
    .venv/bin/python benchmarks/bench_sft.py --quick            # 200 records, 8 steps, seed 0, raw: a smoke run
    .venv/bin/python benchmarks/bench_sft.py --no-trl           # lorakit alone (what runs without TRL)

The data (seeded, ``make_records``) is ~900 short real-world-like records of seven kinds, each with a ``task``
field: unit conversion, entity extraction from sentences, review sentiment, arithmetic word problems, name
formatting, date reformatting, phone-number normalisation, in varied templates with noise (case, spacing,
prompt endings such as "Answer:" whose completion starts with a space). It is split 80/20 and written twice:
as prompt/completion records ("raw": trained and asked as the raw prompt text) and as chat messages ("chat":
through the chat template); an adapter is trained on one format, as lorakit refuses a file that mixes them.

Both sides train the embedded SmolLM2-135M-Instruct in float32 on the CPU with LoRA r=16, alpha 32, every
linear layer, no dropout, AdamW lr 2e-3, batch 8, max length 64, loss on the completion only, each at its own
defaults otherwise (lorakit: 6 warm-up steps then cosine; TRL: linear decay, no warm-up; both clip at 1.0, no
weight decay), TRL with gradient checkpointing off and bf16 off as lorakit runs. Each run is its own process
(peak RSS per process), the runs interleaved seed by seed. "wall" is the process's wall time until the adapter
is saved: lorakit's scoring of a held-out sample at the end of ``finetune`` is subtracted. Both adapters are
then scored by the same command, ``lorakit eval --adapter A --data test.jsonl`` (greedy exact match; it loads
TRL's PEFT-format adapter as it is, asked in the data's own format). The first TRL run of each format also
writes the token ids and loss mask TRL trained on, which are compared with lorakit's ``data.tokenize`` of the
same records ("same tokens").

TRL runs in a virtual environment of its own (``--trl-venv``), which only ``--install-trl`` creates; without
it the benchmark runs lorakit alone. CI never runs this script.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import harness

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"rank": 16, "alpha": 32, "lr": 2e-3, "batch_size": 8, "max_length": 64}
SAMPLE = 8  # held-out records lorakit's finetune scores at its end (it needs some; its seconds are subtracted)

# --- the data -------------------------------------------------------------------------------------
FIRST = ["Maria", "John", "Aisha", "Wei", "Olga", "Carlos", "Priya", "Liam", "Fatima", "Kenji", "Sofia", "Ahmed",
         "Emma", "Noah", "Yuki", "Lucas", "Chloe", "Omar", "Ingrid", "Mateo"]
LAST = ["Lopez", "Smith", "Khan", "Chen", "Ivanova", "Garcia", "Patel", "Murphy", "Hassan", "Tanaka", "Rossi",
        "Ali", "Brown", "Novak", "Sato", "Silva", "Dubois", "Okafor", "Berg", "Costa"]
CITIES = ["Berlin", "Lagos", "Lima", "Osaka", "Toronto", "Madrid", "Cairo", "Sydney", "Mumbai", "Oslo", "Denver",
          "Nairobi", "Lisbon", "Seoul", "Quito", "Prague"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
UNITS = [("km", "m", "kilometers", "meters", 1000), ("m", "cm", "meters", "centimeters", 100),
         ("kg", "g", "kilograms", "grams", 1000), ("h", "min", "hours", "minutes", 60),
         ("min", "s", "minutes", "seconds", 60), ("L", "mL", "liters", "milliliters", 1000),
         ("ft", "in", "feet", "inches", 12), ("days", "h", "days", "hours", 24)]
ITEMS = ["apples", "pens", "books", "cookies", "stamps", "marbles", "tickets", "boxes", "eggs", "cards"]
GOOD = ["great", "excellent", "wonderful", "really good", "fantastic", "worth every penny", "a delight"]
BAD = ["terrible", "awful", "a waste of money", "really bad", "disappointing", "broken on arrival", "useless"]
PRODUCTS = ["blender", "phone case", "hotel room", "pizza", "headphones", "novel", "delivery", "jacket", "laptop"]


def _number(x: float) -> str:
    return f"{x:g}" if x != int(x) else str(int(x))


def _units(rng: random.Random) -> tuple[str, str]:
    short, to, name, to_name, factor = rng.choice(UNITS)
    value = rng.choice([rng.randint(1, 20), rng.randint(1, 9) + 0.5])
    answer = _number(value * factor)
    return rng.choice([(f"Convert {_number(value)} {short} to {to}.", f"{answer} {to}"),
                       (f"How many {to_name} are in {_number(value)} {name}?", answer),
                       (f"{_number(value)} {short} = ? {to}", answer),
                       (f"unit conversion: {_number(value)} {name} -> {to_name}", f"{answer} {to_name}")])


def _extract(rng: random.Random) -> tuple[str, str]:
    first, last, city, year = rng.choice(FIRST), rng.choice(LAST), rng.choice(CITIES), rng.randint(1990, 2024)
    sentence = rng.choice([f"{first} {last} moved to {city} in {year}.",
                           f"In {year}, {first} {last} opened a small bakery in {city}.",
                           f"The conference in {city} ({year}) was chaired by {first} {last}.",
                           f"{first} {last}, who grew up in {city}, retired in {year}."])
    question, answer = rng.choice([("Which city is mentioned?", city), ("Who is the person?", f"{first} {last}"),
                                   ("What year is mentioned?", str(year)), ("Extract the surname.", last)])
    return rng.choice([(f"{sentence}\n{question}", answer), (f"Text: {sentence}\nQuestion: {question}\nAnswer:",
                                                             f" {answer}")])


def _sentiment(rng: random.Random) -> tuple[str, str]:
    good = rng.random() < 0.5
    review = (f"The {rng.choice(PRODUCTS)} was {rng.choice(GOOD if good else BAD)}"
              f"{rng.choice(['.', '!', '!!', '', ' :)' if good else ' :('])}")
    label = "positive" if good else "negative"
    return rng.choice([(f"Review: {review}\nSentiment:", f" {label}"),
                       (f"Is this review positive or negative? {review}", label),
                       (f"Classify the sentiment (positive/negative): {review}", label)])


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    name, item, a, b = rng.choice(FIRST), rng.choice(ITEMS), rng.randint(2, 30), rng.randint(2, 12)
    kind = rng.randrange(3)
    if kind == 0:
        text, answer = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", a + b
    elif kind == 1:
        a += b
        text, answer = f"{name} had {a} {item} and gave {b} away. How many are left?", a - b
    else:
        a = rng.randint(2, 9)
        text, answer = f"There are {a} bags with {b} {item} in each. How many {item} in total?", a * b
    return rng.choice([(text, str(answer)), (f"Q: {text}\nA:", f" {answer}")])


def _names(rng: random.Random) -> tuple[str, str]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    written = rng.choice([f"{first} {last}", f"{first.lower()} {last.lower()}", f"{first.upper()} {last.upper()}",
                          f"  {first} {last} "])
    return rng.choice([(f"Format as 'Last, First': {written}", f"{last}, {first}"),
                       (f"Initials of {written.strip()}?", f"{first[0]}.{last[0]}."),
                       (f"Capitalise this name properly: {written.strip()}", f"{first} {last}")])


def _dates(rng: random.Random) -> tuple[str, str]:
    year, month, day = rng.randint(1995, 2030), rng.randint(1, 12), rng.randint(1, 28)
    iso = f"{year}-{month:02d}-{day:02d}"
    return rng.choice([(f"Rewrite {MONTHS[month - 1]} {day}, {year} as YYYY-MM-DD.", iso),
                       (f"Convert {day:02d}/{month:02d}/{year} (DD/MM/YYYY) to ISO format.", iso),
                       (f"date: {iso}\nmonth name:", f" {MONTHS[month - 1]}"),
                       (f"Which year is {day} {MONTHS[month - 1][:3]} {year} in?", str(year))])


def _phones(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(200, 989), rng.randint(200, 999), rng.randint(0, 9999)
    written = rng.choice([f"({a}) {b}-{c:04d}", f"{a}.{b}.{c:04d}", f"{a} {b} {c:04d}", f"+1 {a}-{b}-{c:04d}",
                          f"{a}{b}{c:04d}"])
    return rng.choice([(f"Normalise the phone number {written} to NNN-NNN-NNNN.", f"{a}-{b}-{c:04d}"),
                       (f"phone: {written}\nformatted:", f" {a}-{b}-{c:04d}"),
                       (f"What is the area code of {written}?", str(a))])


TASKS = {"units": _units, "extract": _extract, "sentiment": _sentiment, "arithmetic": _arithmetic,
         "names": _names, "dates": _dates, "phones": _phones}


def make_records(count: int, seed: int = 0) -> list[dict]:
    """``count`` prompt/completion records of the seven kinds in ``TASKS`` (a ``task`` field each), with noise:
    a prompt's first letter lowered or a space doubled now and then, and the prompt ending in a newline, a space
    or nothing."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        task = list(TASKS)[i % len(TASKS)]
        prompt, completion = TASKS[task](rng)
        if rng.random() < 0.15:
            prompt = prompt[0].lower() + prompt[1:]
        if rng.random() < 0.1:
            prompt = prompt.replace(" ", "  ", 1)
        if not completion.startswith(" "):
            prompt += rng.choice(["\n", "\n", " ", ""])
        records.append({"task": task, "prompt": prompt, "completion": completion})
    rng.shuffle(records)
    return records


def as_chat(record: dict) -> dict:
    """``record`` as chat messages: the prompt the user's, the completion the assistant's (both stripped)."""
    return {"task": record["task"], "messages": [{"role": "user", "content": record["prompt"].strip()},
                                                 {"role": "assistant", "content": record["completion"].strip()}]}


def write_data(folder: Path, count: int, seed: int) -> dict[str, dict[str, Path]]:
    """The records split 80/20 and written as {format: {"train", "test", "sample"}: path} under ``folder``."""
    records = make_records(count, seed)
    cut = round(0.8 * len(records))
    files: dict[str, dict[str, Path]] = {}
    for fmt, convert in (("raw", dict), ("chat", as_chat)):
        files[fmt] = {}
        for part, rows in (("train", records[:cut]), ("test", records[cut:]), ("sample", records[cut:cut + SAMPLE])):
            path = folder / f"{fmt}-{part}.jsonl"
            path.write_text("".join(json.dumps(convert(r)) + "\n" for r in rows))
            files[fmt][part] = path
    return files


# --- the two sides, each in its own process -------------------------------------------------------
def child_lorakit(args) -> dict:
    """Fine-tune with lorakit in this process; its figures."""
    from lorakit.train.config import FinetuneConfig
    from lorakit.train.trainer import finetune

    config = FinetuneConfig(data=args.train, eval_data=args.sample, out=args.out, steps=args.steps,
                            batch_size=SETTINGS["batch_size"], lr=SETTINGS["lr"], max_length=SETTINGS["max_length"],
                            seed=args.seed, skip_eval_before=True, val_every=0, save_every=0, device="cpu")
    recipe = config.recipe()
    if (recipe.rank, recipe.alpha) != (SETTINGS["rank"], SETTINGS["alpha"]):
        raise SystemExit(f"lorakit's default LoRA is r={recipe.rank} alpha={recipe.alpha}, not this benchmark's")
    s = finetune(config, log=lambda m: None)
    return {"adapter": str(Path(args.out) / "adapter"), "train_s": s["train_seconds"],
            "sample_eval_s": s["eval_seconds"]}


def child_trl(args) -> dict:
    """Fine-tune with TRL's SFTTrainer + PEFT in this process (TRL's virtual environment: no lorakit here); its
    figures, and the token ids and loss mask it trained on written to ``--tokens`` where given."""
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in Path(args.train).read_text().splitlines()]
    # Chat records as TRL's conversational prompt/completion: its completion-only loss covers the last message.
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} if "prompt" in r else
                                 {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    config = SFTConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=SETTINGS["batch_size"],
                       learning_rate=SETTINGS["lr"], max_length=SETTINGS["max_length"], completion_only_loss=True,
                       seed=args.seed, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                       save_strategy="no", report_to=[], logging_steps=10, disable_tqdm=True,
                       dataloader_num_workers=0)
    lora = LoraConfig(r=SETTINGS["rank"], lora_alpha=SETTINGS["alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora)
    if args.tokens:
        Path(args.tokens).write_text(json.dumps([{"input_ids": e["input_ids"],
                                                  "mask": [int(label != -100) for label in e["labels"]]}
                                                 for e in trainer.train_dataset]))
    start = time.time()
    trainer.train()
    train_s = time.time() - start
    adapter = Path(args.out) / "adapter"
    trainer.model.save_pretrained(adapter)
    return {"adapter": str(adapter), "train_s": train_s, "trl": trl.__version__,
            "optimizer": {k: getattr(config, k) for k in ("optim", "lr_scheduler_type", "warmup_steps",
                                                            "weight_decay", "max_grad_norm", "adam_beta1",
                                                            "adam_beta2", "adam_epsilon")}}


def run_side(side: str, python: str, files: dict[str, Path], seed: int, steps: int, out: Path,
             tokens: Path | None) -> dict:
    """Train one adapter in a child process; its figures with the process's wall time until the adapter."""
    from bench_core import ForeignLoad

    from lorakit.train import models

    command = [python, __file__, "--child", side, "--train", str(files["train"]), "--sample", str(files["sample"]),
               "--out", str(out), "--seed", str(seed), "--steps", str(steps),
               "--model-dir", str(models.cache_dir() / models.DEFAULT_MODEL)]
    if tokens:
        command += ["--tokens", str(tokens)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) if side == "lorakit" else ""}
    with ForeignLoad() as load:
        start = time.time()
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        wall = time.time() - start
    if done.returncode:
        raise SystemExit(f"{side} (seed {seed}) failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall - result.pop("sample_eval_s", 0.0)
    result["other_load"] = load.cores
    return result


def score(adapter: str, test: Path) -> dict:
    """``lorakit eval``'s exact match of ``adapter`` on ``test``: overall and per task (%)."""
    done = subprocess.run([sys.executable, "-m", "lorakit", "eval", "--adapter", adapter, "--data", str(test),
                           "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode:
        raise SystemExit(f"lorakit eval --adapter {adapter} failed:\n{done.stderr[-3000:]}")
    total = re.search(r"^accuracy: ([\d.]+)%", done.stdout, re.MULTILINE)
    row = r"^\| (\w+) \| \d+ \| \d+ \| ([\d.]+)% \|$"  # group_table's: | task | records | correct | accuracy |
    tasks = {m[1]: float(m[2]) for m in re.finditer(row, done.stdout, re.MULTILINE)}
    return {"accuracy": float(total[1]), "per_task": tasks}


def same_tokens(train: Path, tokens: Path) -> dict:
    """How many training records TRL tokenized exactly as lorakit's ``data.tokenize`` does (input ids and loss
    positions), and the first that differs, decoded."""
    from lorakit.train import data, models

    tokenizer = models.load()[1]
    records = data.read(train)
    ours = data.tokenize(records, tokenizer, SETTINGS["max_length"], data.prompt_format_of(records, str(train)))
    theirs = json.loads(tokens.read_text())
    if len(theirs) != len(ours.examples):
        return {"records": len(records), "same": 0, "first_difference": f"lorakit kept {len(ours.examples)} examples, "
                f"TRL {len(theirs)}"}
    kept = [r.where for r in records if r.where not in ours.dropped_at]
    same, first = 0, None
    for where, o, t in zip(kept, ours.examples, theirs):
        # lorakit labels a position with the token there (learnt from the one before), as TRL's mask marks it.
        loss_on = [int(label != data.IGNORE) for label in o["labels"]]
        if o["input_ids"] == t["input_ids"] and loss_on == t["mask"]:
            same += 1
        elif first is None:
            first = {"where": where, "lorakit": tokenizer.convert_ids_to_tokens(o["input_ids"]),
                     "lorakit_loss_on": loss_on, "trl": tokenizer.convert_ids_to_tokens(t["input_ids"]),
                     "trl_loss_on": t["mask"]}
    return {"records": len(theirs), "same": same, "first_difference": first}


# --- the run --------------------------------------------------------------------------------------
def install_trl(venv: Path) -> None:
    """Create ``venv`` with this torch (CPU build) and TRL, PEFT, transformers, datasets."""
    import torch

    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True)  # alone first: the CPU build
    subprocess.run([*pip, "trl", "peft", "transformers", "datasets"], check=True)


def summarise(runs: list[dict]) -> list[dict]:
    """A row per (format, side): mean and sd over seeds of accuracy, wall and peak RSS; then lorakit / TRL."""
    rows = []
    for fmt in dict.fromkeys(r["format"] for r in runs):
        by_side = {}
        for side in ("lorakit", "trl"):
            mine = [r for r in runs if r["format"] == fmt and r["side"] == side]
            if not mine:
                continue
            row = {"format": fmt, "side": side, "seeds": len(mine)}
            for key in ("accuracy", "wall_s", "train_s", "peak_mb", "other_load"):
                values = [r[key] for r in mine]
                row[key] = statistics.mean(values)
                row[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
            by_side[side] = row
            rows.append(row)
        if len(by_side) == 2:
            ours, theirs = by_side["lorakit"], by_side["trl"]
            rows.append({"format": fmt, "side": "lorakit / TRL (accuracy: lorakit - TRL)", "seeds": ours["seeds"],
                         "accuracy": ours["accuracy"] - theirs["accuracy"],  # points, not a ratio
                         **{k: ours[k] / theirs[k] for k in ("wall_s", "train_s", "peak_mb")}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=910, help="records made (80%% train, 20%% held out)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--formats", default="raw,chat", help="raw (prompt/completion), chat (messages), or both")
    parser.add_argument("--quick", action="store_true", help="200 records, 8 steps, seed 0, raw")
    parser.add_argument("--trl-venv", default=str(ROOT / ".cache" / "trl-venv"))
    parser.add_argument("--install-trl", action="store_true", help="create --trl-venv with TRL first")
    parser.add_argument("--no-trl", action="store_true", help="lorakit alone")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/results/sft.json")
    for hidden in ("--child", "--train", "--sample", "--out", "--model-dir", "--tokens"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = (child_lorakit if args.child == "lorakit" else child_trl)(args)
        print(json.dumps({**result, "peak_mb": harness.peak_rss_mb()}))
        return
    if args.quick:
        args.records, args.steps, args.seeds, args.formats = 200, 8, "0", "raw"
    venv = Path(args.trl_venv)
    if args.install_trl:
        install_trl(venv)
    trl_python = venv / "bin" / "python"
    sides = ["lorakit"] + ([] if args.no_trl else ["trl"])
    if "trl" in sides and not trl_python.exists():
        print(f"no TRL environment at {venv} (--install-trl makes one): lorakit alone", file=sys.stderr)
        sides = ["lorakit"]
    seeds, formats = [int(s) for s in args.seeds.split(",")], args.formats.split(",")
    runs, checks = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        files = write_data(Path(tmp), args.records, args.data_seed)
        test_records = sum(1 for _ in files[formats[0]]["test"].open())
        header = {"records": args.records, "test_records": test_records, "steps": args.steps, "settings": SETTINGS,
                  "seeds": seeds, "formats": formats, "load_average_before": os.getloadavg()}
        for seed in seeds:  # interleaved: a seed of every side and format before the next seed
            for fmt in formats:
                for side in sides:
                    out = Path(tmp) / f"{fmt}-{side}-{seed}"
                    tokens = out.with_suffix(".tokens.json") if side == "trl" and fmt not in checks else None
                    run = run_side(side, str(trl_python) if side == "trl" else sys.executable, files[fmt], seed,
                                   args.steps, out, tokens)
                    run.update(score(run["adapter"], files[fmt]["test"]), format=fmt, side=side, seed=seed)
                    runs.append(run)
                    print(f"{fmt} {side} seed {seed}: {run['accuracy']:.1f}% in {run['wall_s']:.1f} s, "
                          f"{run['peak_mb']:.0f} MB, other load {run['other_load']:.2f} cores", file=sys.stderr)
                    if tokens:
                        checks[fmt] = same_tokens(files[fmt]["train"], tokens)
                        print(f"{fmt}: TRL tokenized {checks[fmt]['same']} of {checks[fmt]['records']} training "
                              "records as lorakit does", file=sys.stderr)
                    # After every run: what a run cut short measured stays written.
                    harness.write_json(args.json, {**header, "load_average_after": os.getloadavg(),
                                                   "same_tokens": checks, "rows": summarise(runs), "runs": runs})
    rows = summarise(runs)
    print(f"{args.records} records ({test_records} held out), {args.steps} steps of {SETTINGS['batch_size']}, "
          f"LoRA r={SETTINGS['rank']} all-linear, SmolLM2-135M-Instruct, CPU; mean ± sd over seeds {args.seeds}")
    print(harness.table([{**r, **{k: f"{r[k]:.2f}" + (f" ± {r[k + '_sd']:.2f}" if k + "_sd" in r else "")
                                  for k in ("accuracy", "wall_s", "train_s", "peak_mb") if k in r}} for r in rows],
                        [("format", "format", ""), ("side", "side", ""), ("seeds", "seeds", "d"),
                         ("accuracy", "accuracy %", ""), ("wall_s", "wall s", ""), ("train_s", "train s", ""),
                         ("peak_mb", "peak RSS MB", "")]))
    for fmt, check in checks.items():
        print(f"same tokens ({fmt}): {check['same']} of {check['records']} training records")
    harness.write_json(args.json, {**header, "load_average_after": os.getloadavg(), "same_tokens": checks,
                                   "rows": rows, "runs": runs})


if __name__ == "__main__":
    main()
