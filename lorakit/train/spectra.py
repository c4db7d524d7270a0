"""The work of ``lorakit spectrum | inspect | resize | advise``: run ``lorakit.analysis`` on a model and an
adapter, and write what it finds as JSON, markdown tables and PNG plots."""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Callable, Sequence

from lorakit import analysis
from lorakit.adapt import select
from lorakit.checkpoint import atomic_write, atomic_write_all
from lorakit.errors import ConfigError
from lorakit.layers import adapted_layers

# Module types in the order a transformer block holds them; others follow alphabetically.
TYPE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def ordered_types(rows: Sequence[dict]) -> list[str]:
    """The module types of ``rows``, attention and MLP first in block order."""
    found = {r["type"] for r in rows}
    return [t for t in TYPE_ORDER if t in found] + sorted(found - set(TYPE_ORDER))


def by_type(rows: Sequence[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["type"]].append(r)
    return {t: groups[t] for t in ordered_types(rows)}


def progress_bar(total: int, what: str) -> Callable[[str], None]:
    """A tqdm bar on stderr advanced once per call (a no-op without tqdm or a terminal)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return lambda _path: None
    bar = tqdm(total=total, desc=what, unit="matrix", file=sys.stderr, leave=False, disable=None)  # None: a tty only

    def advance(_path: str) -> None:
        bar.update(1)
        if bar.n >= total:
            bar.close()
    return advance


def markdown(header: Sequence[str], lines: Sequence[Sequence]) -> str:
    """A markdown table; floats to 4 significant digits."""
    def cell(v) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in line) + " |" for line in lines]
    return "\n".join(out) + "\n"


def _pooled(rows: Sequence[dict], key: str) -> float:
    """A share over every singular value of ``rows`` together (each matrix weighted by its count of values)."""
    counts = [len(r["singular_values"]) for r in rows]
    return sum(r[key] * n for r, n in zip(rows, counts)) / sum(counts)


SPECTRUM_COLUMNS = ("sigma_max", "sigma_min", "stable_rank", "effective_rank", "energy_rank_50", "energy_rank_90",
                    "energy_rank_99", "share_0.1_1.1", "share_top_decade")
SPECTRUM_HEADER = ("σ_max", "σ_min", "stable rank", "effective rank", "rank 50%", "rank 90%", "rank 99%",
                   "in [0.1, 1.1]", "in [σ_max/10, σ_max]")


def spectrum_tables(rows: Sequence[dict]) -> tuple[str, str]:
    """(per module type, per matrix) markdown tables of a ``spectrum``: the per-type one averages over layers,
    except σ_max / σ_min (the range) and the shares (pooled over every singular value of the type)."""
    types = []
    for t, group in by_type(rows).items():
        line = [t, len(group), "x".join(map(str, group[0]["shape"])),
                f"{min(r['sigma_max'] for r in group):.3g}–{max(r['sigma_max'] for r in group):.3g}",
                f"{min(r['sigma_min'] for r in group):.3g}–{max(r['sigma_min'] for r in group):.3g}"]
        line += [mean(r[k] for r in group) for k in SPECTRUM_COLUMNS[2:7]]
        line += [_pooled(group, "share_0.1_1.1"), _pooled(group, "share_top_decade")]
        types.append(line)
    types.append(["all", len(rows), "", "", "", *[None] * 5, _pooled(rows, "share_0.1_1.1"),
                  _pooled(rows, "share_top_decade")])
    per_type = markdown(("type", "matrices", "shape", *SPECTRUM_HEADER[:2], *(f"{h} (mean)" for h in SPECTRUM_HEADER[2:7]),
                         *SPECTRUM_HEADER[7:]), types)
    per_matrix = markdown(("module", *SPECTRUM_HEADER), [[r["module"], *(r[k] for k in SPECTRUM_COLUMNS)] for r in rows])
    return per_type, per_matrix


INSPECT_COLUMNS = ("rank", "sigma_max", "stable_rank", "effective_rank", "energy_rank_90", "energy_rank_99",
                   "utilisation", "relative_norm", "least_aligned", "intruders")
INSPECT_HEADER = ("r", "σ_max(ΔW)", "stable rank", "effective rank", "rank 90%", "rank 99%", "utilisation",
                  "‖ΔW‖/‖W‖", "least aligned cos", "intruders")


def inspect_tables(rows: Sequence[dict]) -> tuple[str, str]:
    """(per module type: means over layers, and intruders summed; per module) markdown tables of ``inspect``."""
    types = []
    for t, group in by_type(rows).items():
        line = [t, len(group)]
        for k in INSPECT_COLUMNS[:-1]:
            values = [r[k] for r in group if r[k] is not None]
            line.append(mean(values) if values else None)
        types.append([*line, sum(r["intruders"] for r in group)])
    per_type = markdown(("type", "modules", *(f"{h} (mean)" for h in INSPECT_HEADER[:-1]), "intruders (sum)"), types)
    per_module = markdown(("module", *INSPECT_HEADER), [[r["module"], *(r[k] for k in INSPECT_COLUMNS)] for r in rows])
    return per_type, per_module


def _plots(rows: Sequence[dict], out: Path, measure: str, title: str, ylabel: str, bands: Sequence[float]) -> dict:
    """{name: write(path)} for spectra.png (per module type, one line per layer) and heatmap.png (``measure``
    per layer and type); empty without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    groups = by_type(rows)
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})

    def spectra(path: Path) -> None:
        columns = min(4, len(groups))
        lines = -(-len(groups) // columns)
        fig, axes = plt.subplots(lines, columns, figsize=(4 * columns, 3.2 * lines), squeeze=False)
        cmap = plt.get_cmap("viridis")
        for ax, (t, group) in zip(axes.flat, groups.items()):
            for r in group:
                shade = cmap((r["layer"] or 0) / max(1, len(layers) - 1))
                values = [v for v in r["singular_values"] if v > 0]
                ax.plot(range(1, len(values) + 1), values, color=shade, linewidth=0.8)
            for y in bands:
                ax.axhline(y, color="grey", linestyle="--", linewidth=0.7)
            ax.set_yscale("log")
            ax.set_title(t)
            ax.set_xlabel("index")
        for ax in list(axes.flat)[len(groups):]:
            ax.axis("off")
        axes[0][0].set_ylabel(ylabel)
        fig.suptitle(f"{title} (colour: layer, dark = first)")
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=110)
        plt.close(fig)

    def heatmap(path: Path) -> None:
        import numpy as np

        types = list(groups)
        grid = np.full((max(1, len(layers)), len(types)), np.nan)
        row_of = {layer: i for i, layer in enumerate(layers)}
        for j, t in enumerate(types):
            for r in groups[t]:
                if r.get(measure) is not None:
                    grid[row_of.get(r["layer"], 0), j] = r[measure]
        fig, ax = plt.subplots(figsize=(1.1 * len(types) + 2.5, 0.22 * len(layers) + 2))
        image = ax.imshow(grid, aspect="auto", cmap="magma")
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), layers)
        ax.set_ylabel("layer")
        ax.set_title(f"{title}: {measure}")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=110)
        plt.close(fig)

    return {out / "spectra.png": spectra, out / "heatmap.png": heatmap}


def write_report(rows: list[dict], out: Path, stem: str, title: str, tables: tuple[str, str], measure: str,
                 ylabel: str, bands: Sequence[float] = ()) -> list[Path]:
    """``stem``.json (the rows), ``stem``.md (the tables) and the plots in ``out``, each written atomically;
    returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    per_type, per_row = tables
    writes = {out / f"{stem}.json": lambda p: p.write_text(json.dumps(rows, indent=1) + "\n"),
              out / f"{stem}.md": lambda p: p.write_text(f"# {title}\n\n## Per module type\n\n{per_type}\n"
                                                          f"## Per module\n\n{per_row}")}
    for path, draw in _plots(rows, out, measure, title, ylabel, bands).items():
        writes[path] = draw
    atomic_write_all(writes)
    return list(writes)


def spectrum_report(model, config, log=print) -> list[dict]:
    """``lorakit spectrum``: the spectrum of every targeted weight, its tables printed and written to --out."""
    config.check()
    selected = select(model, _targets(config.targets))
    rows = analysis.spectrum(model, _targets(config.targets), rank=config.rank or None,
                             niter=config.niter or None, progress=progress_bar(len(selected), "spectrum"))
    tables = spectrum_tables(rows)
    paths = write_report(rows, Path(config.out), "spectrum", "Singular values of the base weights", tables,
                         config.heatmap, "σ", bands=analysis.IN_RANGE)
    log(tables[0])
    log("written: " + ", ".join(str(p) for p in paths))
    return rows


def inspect_report(model, name: str, config, log=print) -> list[dict]:
    """``lorakit inspect``: the spectrum of each module's learned update, its tables printed and written."""
    count = sum(1 for _, layer in adapted_layers(model) if name in layer.adapters)
    rows = analysis.inspect(model, name, intruder_k=config.intruder_k, intruder_eps=config.intruder_eps,
                            progress=progress_bar(count, "inspect"))
    tables = inspect_tables(rows)
    paths = write_report(rows, Path(config.out), "inspect", "Singular values of the learned update ΔW", tables,
                         "effective_rank", "σ(ΔW)")
    log(tables[0])
    log("written: " + ", ".join(str(p) for p in paths))
    return rows


def _targets(text: str):
    from lorakit.train.trainer import targets_of

    return targets_of(text)


def ranks_yaml(ranks: dict[str, int], alphas: dict[str, float], header: str) -> str:
    """The YAML ``lorakit finetune --config`` takes for per-module ranks: ``targets`` (exactly these modules),
    ``ranks`` and ``alphas`` (anchored regexes), with ``header`` as comments."""
    import yaml

    if not ranks:
        raise ConfigError("the budget buys no rank in any module: raise --budget")
    exact = {f"^{re.escape(path)}$": rank for path, rank in ranks.items()}
    body = {"targets": "(" + "|".join(re.escape(p) for p in ranks) + ")", "ranks": exact,
            "alphas": {f"^{re.escape(path)}$": alphas[path] for path in ranks}}
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=1000)


def write_text(path: Path, text: str) -> None:
    """``text`` to ``path`` atomically, making its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(text))


def _probe_scores(config, log) -> tuple[dict[str, list[float]], dict[str, tuple[int, int]]]:
    """({module: its triplets' AdaLoRA sensitivity scores, largest first}, {module: LoRA's (first, further) rank
    cost}) after a probe run of --probe-steps AdaLoRA steps at --probe-rank, nothing pruned."""
    import tempfile

    from lorakit.train import config as cfg
    from lorakit.train.trainer import _metrics, setup, start, train

    with tempfile.TemporaryDirectory(prefix="lorakit-probe-") as run:
        probe = cfg.FinetuneConfig(model=config.model, device=config.device, task=config.task,
                                   targets=config.targets, method="adalora", steps=config.probe_steps, out=run,
                                   skip_eval_before=True, save_every=0, val_every=0,
                                   options={"init_rank": config.probe_rank, "target_rank": config.probe_rank,
                                            "total_steps": config.probe_steps, "tinit": 0, "tfinal": 0})
        job = setup(probe, log)
        state = start(job)
        with _metrics(job) as record:
            train(job, state, record)
    scores, costs = {}, {}
    for path, layer in adapted_layers(job.model):
        adapter = layer.adapters["default"]
        scores[path] = sorted(adapter.triplet_scores().double().tolist(), reverse=True)
        costs[path] = analysis.lora_costs(adapter.spec.d_out, adapter.spec.d_in)
    return scores, costs


def _uniform_rank(costs: dict[str, tuple[int, int]], budget: int) -> int:
    """The largest rank every module can have within ``budget`` (0 if not even rank 1 fits)."""
    rank = 0
    while sum(first + further * rank for first, further in costs.values()) <= budget:
        rank += 1
    return rank


def advice(config, log=print) -> dict[str, int]:
    """``lorakit advise``: ranks per module for --budget, from --from-adapter's update energy or a probe run's
    sensitivity; writes the YAML for ``lorakit finetune --config`` and says what it predicts."""
    from lorakit.train import models
    from lorakit.train.config import FINETUNE_DEFAULTS

    default_scale = FINETUNE_DEFAULTS["alpha"] / FINETUNE_DEFAULTS["rank"]
    if config.from_adapter:
        import lorakit as lk

        model = models.load_weights(config.model, log=lambda m: print(m, file=sys.stderr),
                                    device=models.resolve_device(config.device))
        lk.load(model, config.from_adapter)
        values, costs = analysis.update_energies(model, "default")
        scales = {path: float(factors[2]) if (factors := layer.adapters["default"].factors()) is not None
                  else default_scale for path, layer in adapted_layers(model)}
        source, what = f"the adapter {config.from_adapter}", "of the trained update's energy ‖ΔW‖²_F"
    else:
        values, costs = _probe_scores(config, log)
        scales = {path: default_scale for path in values}
        source, what = f"a {config.probe_steps}-step AdaLoRA probe at rank {config.probe_rank}", \
            "of the probe's sensitivity score"
    ranks = analysis.allocate(values, costs, config.budget)
    used = sum(costs[m][0] + costs[m][1] * (r - 1) for m, r in ranks.items())
    total = sum(sum(v) for v in values.values())
    kept = sum(sum(values[m][:r]) for m, r in ranks.items()) / total if total else 0.0
    uniform = _uniform_rank(costs, config.budget)
    kept_uniform = sum(sum(v[:uniform]) for v in values.values()) / total if total else 0.0
    alphas = {m: scales[m] * r for m, r in ranks.items()}
    summary = (f"lorakit advise --budget {config.budget:,} from {source}: {used:,} LoRA parameters in "
               f"{len(ranks)} of {len(values)} modules, ranks {min(ranks.values())}-{max(ranks.values())}; "
               f"predicted to keep {100 * kept:.1f}% {what}, against {100 * kept_uniform:.1f}% for a uniform rank "
               f"{uniform} in every module at the same budget")
    write_text(Path(config.out), ranks_yaml(ranks, alphas, summary + "\nUse: lorakit finetune --config THIS_FILE"))
    by_type_ranks = defaultdict(list)
    for m, r in ranks.items():
        by_type_ranks[m.rpartition(".")[2]].append(r)
    log(markdown(("type", "modules given rank", "mean rank", "max rank"),
                 [[t, len(v), mean(v), max(v)] for t, v in by_type_ranks.items()]))
    log(summary)
    log(f"written: {config.out} (lorakit finetune --config {config.out})")
    return ranks
