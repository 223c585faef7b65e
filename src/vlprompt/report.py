"""Tables and plots from run folders — built from ``results.json`` files only, never from logs.

* mean ± std over seeds (population std, ``numpy.std`` as CoOp's ``parse_test_res.py`` computes it);
* base-to-new: per dataset mean base, mean new and H = 2BN/(B+N) of those means; the average row takes the mean
  base and the mean new over datasets and H of those two numbers, as the papers do;
* few-shot: datasets × shots (ALIGN App. Table D.1 layout) with the average over datasets;
* cross-dataset / cross-domain: source accuracy, each target, and the mean over targets.

Methods are told apart by ``method[-preset][-tag]``. :func:`write_report` writes ``report.md``, one CSV per
table and (if matplotlib is installed) accuracy-vs-shots, base/new/H and ablation plots.

With ``compare="paper"`` it also puts every cell next to the published number stored in :mod:`vlprompt.reference`
(:func:`compare`): ours (mean ± std over seeds), the paper's value, the difference, and a flag when the paper's value
lies outside ours ± max(2·std, 1 point) — ``compare_<table>.md``/``.csv``/``.png``.
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from vlprompt.engine.runs import find_runs

PROTOCOL_TITLES = {
    "few_shot": "Few-shot classification (top-1 %, mean ± std over seeds)",
    "base2new": "Base-to-new generalisation (top-1 %, mean ± std over seeds; H of the means)",
    "cross_dataset": "Cross-dataset transfer (top-1 %, mean ± std over seeds)",
    "cross_domain": "Cross-domain generalisation (top-1 %, mean ± std over seeds)",
}
PROTOCOL_ORDER = ("few_shot", "base2new", "cross_dataset", "cross_domain")


@dataclass
class Stat:
    """Mean and (population) standard deviation of ``n`` values; ``std`` is None for a derived number (H)."""

    mean: float
    std: float | None = None
    n: int = 1

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        values = list(values)
        mean = sum(values) / len(values)
        return cls(mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)), len(values))

    @property
    def spread(self) -> float | None:
        """The std over seeds, or None where there is none to show (a derived number, a single seed)."""
        return None if self.std is None or self.n < 2 else self.std

    def __str__(self) -> str:
        return f"{self.mean:.2f}" if self.spread is None else f"{self.mean:.2f} ± {self.std:.2f}"


@dataclass
class Table:
    """A report table: ``rows`` hold strings (labels) and :class:`Stat` cells (None = not available)."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        for row in self.rows:
            lines.append("| " + " | ".join("–" if cell is None else str(cell) for cell in row) + " |")
        return "\n".join(lines) + "\n"

    def write_csv(self, path: str) -> None:
        """Numbers unformatted: each Stat column becomes ``<column>`` (mean) and ``<column>_std``."""
        stat_columns = {i for row in self.rows for i, cell in enumerate(row) if isinstance(cell, Stat)}
        header = []
        for i, column in enumerate(self.columns):
            header.append(column)
            if i in stat_columns:
                header.append(f"{column}_std")
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for row in self.rows:
                out = []
                for i, cell in enumerate(row):
                    if i in stat_columns:
                        out += [cell.mean, "" if cell.spread is None else cell.std] if isinstance(cell, Stat) \
                            else ["", ""]
                    else:
                        out.append(cell)
                writer.writerow(out)


# --------------------------------------------------------------------------------------------- loading


def load_results(runs_dir: str, protocol: str | None = None) -> list[dict[str, Any]]:
    """Every ``results.json`` under ``runs_dir`` (optionally of one protocol), with ``_path`` added."""
    results = []
    for run in find_runs(runs_dir):
        data = run.results()
        if protocol is None or data.get("protocol") == protocol:
            results.append({**data, "_path": run.path})
    return results


def method_label(result: dict[str, Any]) -> str:
    parts = [result["method"]]
    if result.get("preset", "default") != "default":
        parts.append(result["preset"])
    if result.get("tag"):
        parts.append(result["tag"])
    return "-".join(parts)


def backbone_label(result: dict[str, Any]) -> str:
    """The backbone of a run as its results.json names it, e.g. ``ViT-B-16-quickgelu/openai`` or ``toy``
    (``–`` for results that do not say)."""
    backbone = result.get("backbone")
    return str((backbone.get("name") if isinstance(backbone, dict) else backbone) or "–")


def method_key(result: dict[str, Any]) -> tuple[str, str]:
    """``(method label, backbone)``: the tables keep runs on different backbones in separate rows."""
    return method_label(result), backbone_label(result)


def _group(results: Iterable[dict], *keys) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for result in results:
        groups[tuple(key(result) if callable(key) else result[key] for key in keys)].append(result)
    return groups


def harmonic_mean(base: float, new: float) -> float:
    return 2 * base * new / (base + new) if base + new else 0.0


def _ordered(names: Iterable[str]) -> list[str]:
    from vlprompt.protocols import DOMAIN_TARGETS, ELEVEN_DATASETS

    known = list(ELEVEN_DATASETS) + list(DOMAIN_TARGETS)
    return sorted(set(names), key=lambda n: (known.index(n) if n in known else len(known), n))


# --------------------------------------------------------------------------------------------- tables


def base2new_table(results: list[dict]) -> Table:
    table = Table("base2new", PROTOCOL_TITLES["base2new"],
                  ["dataset", "method", "backbone", "base", "new", "H", "seeds"])
    per_method: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    groups = _group(results, "dataset", method_key)
    methods = sorted({m for _, m in groups})
    for dataset in _ordered(d for d, _ in groups):
        for method in methods:
            runs = groups.get((dataset, method))
            if not runs:
                continue
            base = Stat.of([r["metrics"]["base"] for r in runs])
            news = [r["metrics"]["new"] for r in runs]
            if None in news:  # a method that cannot classify unseen classes (the linear probe): base only
                reason = not_available(runs, "new")
                table.rows.append([dataset, *method, base, reason, reason, len(runs)])
                per_method[method].append((base.mean, reason))
                continue
            new = Stat.of(news)
            table.rows.append([dataset, *method, base, new, Stat(harmonic_mean(base.mean, new.mean)), len(runs)])
            per_method[method].append((base.mean, new.mean))
    for method in methods:
        pairs = per_method[method]
        base = sum(b for b, _ in pairs) / len(pairs)
        reasons = [n for _, n in pairs if isinstance(n, str)]
        if reasons:
            table.rows.append([f"**Average over {len(pairs)} dataset{'s' * (len(pairs) != 1)}**", *method,
                               Stat(base), reasons[0], reasons[0], ""])
            continue
        new = sum(n for _, n in pairs) / len(pairs)
        label = f"**Average over {len(pairs)} dataset{'s' * (len(pairs) != 1)}**"
        # Papers differ in how they average H: most (CoCoOp, MaPLe, KgCoOp, PromptSRC) print H of the mean base and
        # mean new, some the mean of the per-dataset H. Both, labelled; they differ when datasets differ.
        table.rows.append([f"{label} H of mean base, mean new", *method, Stat(base), Stat(new),
                           Stat(harmonic_mean(base, new)), ""])
        if len(pairs) > 1:
            per_dataset_h = sum(harmonic_mean(b, n) for b, n in pairs) / len(pairs)
            table.rows.append([f"{label} mean of per-dataset H", *method, None, None, Stat(per_dataset_h), ""])
    return table


def not_available(runs: list[dict], label: str) -> str:
    """The table cell of an evaluation a method cannot make, with the reason its runs give."""
    reasons = {r.get("not_available", {}).get(label) for r in runs} - {None}
    return f"n/a ({'; '.join(sorted(reasons))})" if reasons else "n/a"


def few_shot_table(results: list[dict]) -> Table:
    shots = sorted({r["shots"] for r in results})
    table = Table("few_shot", PROTOCOL_TITLES["few_shot"],
                  ["dataset", "method", "backbone"] + [f"{k} shots" for k in shots])
    groups = _group(results, "dataset", method_key, "shots")
    methods = sorted({m for _, m, _ in groups})
    means: dict[tuple[tuple[str, str], int], dict[str, float]] = defaultdict(dict)
    datasets = _ordered(d for d, _, _ in groups)
    for dataset in datasets:
        for method in methods:
            row: list[Any] = [dataset, *method]
            for k in shots:
                runs = groups.get((dataset, method, k))
                stat = Stat.of([r["metrics"]["accuracy"] for r in runs]) if runs else None
                if stat is not None:
                    means[(method, k)][dataset] = stat.mean
                row.append(stat)
            if any(isinstance(cell, Stat) for cell in row[3:]):
                table.rows.append(row)
    for method in methods:
        method_datasets = {d for (m, _), values in means.items() if m == method for d in values}
        row = [f"**Average over {len(method_datasets)} dataset{'s' * (len(method_datasets) != 1)}**", *method]
        for k in shots:
            values = means.get((method, k), {})
            # only where every dataset of the method has this shot count (else the average would be biased)
            row.append(Stat(sum(values.values()) / len(values)) if values and set(values) == method_datasets
                       else None)
        table.rows.append(row)
    return table


def transfer_table(results: list[dict], protocol: str) -> Table:
    targets = _ordered(k for r in results for k in r["metrics"] if k not in ("source", "average"))
    table = Table(protocol, PROTOCOL_TITLES[protocol],
                  ["source", "method", "backbone", "source acc."] + targets + ["target average", "seeds"])
    groups = _group(results, "dataset", method_key)
    for source, method in sorted(groups):
        runs = groups[(source, method)]

        def stat(key: str) -> Stat | str | None:
            values = [r["metrics"][key] for r in runs if key in r["metrics"]]
            if None in values:  # not available for this method (e.g. a linear probe on other classes)
                return not_available(runs, key) if key != "average" else "n/a"
            return Stat.of(values) if values else None

        table.rows.append([source, *method, stat("source")] + [stat(t) for t in targets] +
                          [stat("average"), len(runs)])
    return table


def build_tables(results: list[dict]) -> list[Table]:
    by_protocol = _group(results, "protocol")
    tables = []
    for protocol in PROTOCOL_ORDER:
        runs = by_protocol.get((protocol,))
        if not runs:
            continue
        if protocol == "base2new":
            tables.append(base2new_table(runs))
        elif protocol == "few_shot":
            tables.append(few_shot_table(runs))
        else:
            tables.append(transfer_table(runs, protocol))
    return tables


# --------------------------------------------------------------------------------------------- plots


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _panel_grid(plt, n_panels: int):
    """A figure with one 4 x 3.2 inch panel per item, at most 4 per row: the figure and its first n axes (the
    others are hidden)."""
    columns = min(4, n_panels)
    rows = math.ceil(n_panels / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for axis in list(axes.flat)[n_panels:]:
        axis.axis("off")
    return figure, list(axes.flat)[:n_panels]


def _save(plt, figure, path: str) -> bool:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def plot_few_shot(results: list[dict], path: str) -> bool:
    """Accuracy vs. shots, one panel per dataset (and the average), one line per method."""
    plt = _pyplot()
    if plt is None or not results:
        return False
    groups = _group(results, "dataset", method_key, "shots")
    datasets = _ordered(d for d, _, _ in groups)
    methods = sorted({m for _, m, _ in groups})
    shot_counts = sorted({k for _, _, k in groups})
    panels = datasets + (["average"] if len(datasets) > 1 else [])
    figure, axes = _panel_grid(plt, len(panels))
    for axis, panel in zip(axes, panels):
        for method in methods:
            points = []
            for k in shot_counts:
                if panel == "average":
                    values = [Stat.of([r["metrics"]["accuracy"] for r in groups[(d, method, k)]]).mean
                              for d in datasets if (d, method, k) in groups]
                    if len(values) == len(datasets):
                        points.append((k, sum(values) / len(values), 0.0))
                elif (panel, method, k) in groups:
                    stat = Stat.of([r["metrics"]["accuracy"] for r in groups[(panel, method, k)]])
                    points.append((k, stat.mean, stat.std))
            if points:
                axis.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                              marker="o", capsize=3, label=" on ".join(method))
        axis.set_xscale("log", base=2)
        axis.set_xticks(shot_counts, [str(k) for k in shot_counts])  # 1, 2, 4, ... rather than 2^0, 2^1, ...
        axis.minorticks_off()
        axis.set_title(panel)
        axis.set_xlabel("shots per class")
        axis.set_ylabel("top-1 accuracy (%)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(plt, figure, path)


def plot_base2new(table: Table, path: str) -> bool:
    """Grouped bars of base / new / H per dataset (and the average), one colour per method."""
    plt = _pyplot()
    if plt is None or not table.rows:
        return False
    panels = list(dict.fromkeys(row[0] for row in table.rows))
    methods = sorted({(row[1], row[2]) for row in table.rows})  # (method, backbone)
    values = {(row[0], row[1], row[2]): row[3:6] for row in table.rows}
    figure, axes = _panel_grid(plt, len(panels))
    width = 0.8 / len(methods)
    for axis, panel in zip(axes, panels):
        for i, method in enumerate(methods):
            stats = values.get((panel, *method))
            if stats is None:
                continue
            stats = [s if isinstance(s, Stat) else Stat(math.nan) for s in stats]  # "n/a" cells: no bar
            axis.bar([j + i * width for j in range(3)], [s.mean for s in stats], width,
                     yerr=[s.spread or 0.0 for s in stats], capsize=2, label=" on ".join(method))
        axis.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(3)], ["base", "new", "H"])
        axis.set_title(panel.replace("**", ""))
        axis.set_ylabel("top-1 accuracy (%)")
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(plt, figure, path)


def _headline(result: dict) -> tuple[str, float]:
    metrics = result["metrics"]
    for key in ("hm", "accuracy", "average", "source"):
        if metrics.get(key) is not None:
            return {"hm": "H", "accuracy": "accuracy", "average": "target average", "source": "source"}[key], \
                metrics[key]
    raise KeyError("no headline metric")


def plot_ablation(results: list[dict], option: str, path: str) -> bool:
    """The headline metric (H, accuracy or target average) against a method option (β by default), one line per
    (protocol, dataset, method, shots); drawn only where at least two values of the option were run."""
    plt = _pyplot()
    if plt is None:
        return False
    groups = _group([r for r in results if option in (r.get("method_options") or {})],
                    "protocol", "dataset", "method", "preset", "shots")
    lines = []
    for key, runs in sorted(groups.items()):
        by_value: dict[float, list[float]] = defaultdict(list)
        for run in runs:
            value = run["method_options"][option]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                by_value[float(value)].append(_headline(run)[1])
        if len(by_value) >= 2:
            lines.append((key, _headline(runs[0])[0], sorted(by_value.items())))
    if not lines:
        return False
    figure, axis = plt.subplots(figsize=(6, 4))
    for (protocol, dataset, method, _, shots), metric, points in lines:
        stats = [Stat.of(values) for _, values in points]
        axis.errorbar([v for v, _ in points], [s.mean for s in stats], yerr=[s.std for s in stats], marker="o",
                      capsize=3, label=f"{method} {dataset} {protocol} {shots}-shot ({metric})")
    axis.set_xlabel(option)
    axis.set_ylabel("top-1 accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return _save(plt, figure, path)


# --------------------------------------------------------------------------------------------- ours vs paper

# A cell is flagged when the paper's value lies outside ours ± max(STD_FACTOR · std over seeds, MIN_TOLERANCE).
# The floor keeps single-seed runs (std 0) and very stable cells from flagging differences in the last digit.
STD_FACTOR = 2.0
MIN_TOLERANCE = 1.0


@dataclass
class ComparisonRow:
    """One cell: ours (None = not run / not complete) beside the paper's (None = no published value)."""

    dataset: str
    method: str  # the reference method (``align``)
    label: str  # our method label (``align-paper-tag``)
    shots: int
    metric: str
    ours: Stat | None
    paper: Any | None  # vlprompt.reference.ReferenceCell
    note: str = ""

    @property
    def diff(self) -> float | None:
        """Ours minus the paper's (points)."""
        if self.ours is None or self.paper is None:
            return None
        return self.ours.mean - self.paper.value

    @property
    def tolerance(self) -> float | None:
        if self.ours is None:
            return None
        return max(STD_FACTOR * (self.ours.std or 0.0), MIN_TOLERANCE)

    @property
    def flag(self) -> str:
        """``outside`` (the paper's value lies outside ours ± tolerance), ``ok``, or ``""`` (nothing to compare)."""
        if self.diff is None:
            return ""
        return "outside" if abs(self.diff) > self.tolerance else "ok"


@dataclass
class Comparison:
    """Our results for every cell of a reference table that we ran, beside the published numbers."""

    table: Any  # vlprompt.reference.ReferenceTable
    rows: list[ComparisonRow] = field(default_factory=list)

    def summary(self) -> str:
        compared = [r for r in self.rows if r.flag]
        outside = sum(r.flag == "outside" for r in compared)
        unpublished = sum(r.paper is None for r in self.rows)
        return (f"{len(self.rows)} cells: {len(compared)} compared ({len(compared) - outside} within, {outside} "
                f"outside ours ± max({STD_FACTOR:g}·std, {MIN_TOLERANCE:g} point)), {unpublished} without a "
                f"stored paper value")

    def markdown(self) -> str:
        table = self.table
        lines = [f"### Ours vs paper: {table.title} (`{table.name}`)", "",
                 f"Flag: `outside` when the paper's value lies outside ours ± max({STD_FACTOR:g}·std over seeds, "
                 f"{MIN_TOLERANCE:g} point); std is the population std over seeds. Paper values marked "
                 f"*(derived)*, *(unverified)*, *(secondary)* or *(suspect)* are not plain published numbers "
                 f"(see the sources).", "",
                 "| dataset | method | shots | metric | ours (mean ± std, seeds) | paper | diff | flag | source |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for row in self.rows:
            ours = "–" if row.ours is None else (f"{row.ours} ({row.ours.n})" if row.ours.std is not None
                                                 else f"{row.ours.mean:.2f}")
            if row.note:
                ours += f" — {row.note}"
            if row.paper is None:
                paper, source = "–", ""
            else:
                status = "" if row.paper.status == "published" else f" *({row.paper.status})*"
                paper, source = f"{row.paper.value:.2f}{status}", row.paper.source.key
            diff = "–" if row.diff is None else f"{row.diff:+.2f}"
            flag = f"**{row.flag}**" if row.flag == "outside" else row.flag
            dataset = f"**{row.dataset}**" if row.dataset == "average" else row.dataset
            lines.append(f"| {dataset} | {row.label} | {row.shots} | {row.metric} | {ours} | {paper} | {diff} | "
                         f"{flag} | {source} |")
        lines += ["", self.summary() + ".", ""]
        used = {row.paper.source.key: row.paper.source for row in self.rows if row.paper is not None}
        lines += [f"- `{key}`: {source}" for key, source in sorted(used.items())]
        if table.missing_note:
            lines += [f"- missing cells: {table.missing_note}"]
        lines += [f"- note: {note}" for note in table.notes]
        return "\n".join(lines) + "\n"

    def write_csv(self, path: str) -> None:
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["table", "dataset", "method", "method_label", "shots", "metric", "ours_mean", "ours_std",
                             "ours_seeds", "paper", "paper_status", "diff", "tolerance", "flag", "source",
                             "source_url", "note"])
            for row in self.rows:
                ours, paper = row.ours, row.paper
                writer.writerow([
                    self.table.name, row.dataset, row.method, row.label, row.shots, row.metric,
                    "" if ours is None else ours.mean, "" if ours is None or ours.std is None else ours.std,
                    "" if ours is None else ours.n, "" if paper is None else paper.value,
                    "" if paper is None else paper.status, "" if row.diff is None else row.diff,
                    "" if row.tolerance is None else row.tolerance, row.flag,
                    "" if paper is None else paper.source.key, "" if paper is None else paper.source.url,
                    "; ".join(n for n in (row.note, "" if paper is None else paper.note) if n)])

    def plot(self, path: str) -> bool:
        """Ours against the paper's value, one point per compared cell (error bar: std over seeds), the line
        ours = paper with the ±1 point band; flagged cells are circled in red and labelled."""
        plt = _pyplot()
        points = [row for row in self.rows if row.diff is not None]
        if plt is None or not points:
            return False
        figure, axis = plt.subplots(figsize=(6, 6))
        low = min(min(r.paper.value, r.ours.mean) for r in points) - 5
        high = max(max(r.paper.value, r.ours.mean) for r in points) + 5
        axis.plot([low, high], [low, high], color="grey", linewidth=1)
        axis.fill_between([low, high], [low - MIN_TOLERANCE, high - MIN_TOLERANCE],
                          [low + MIN_TOLERANCE, high + MIN_TOLERANCE], color="grey", alpha=0.15)
        for label in sorted({r.label for r in points}):
            mine = [r for r in points if r.label == label]
            axis.errorbar([r.paper.value for r in mine], [r.ours.mean for r in mine],
                          yerr=[r.ours.std or 0.0 for r in mine], fmt="o", capsize=3, label=label)
        for row in points:
            if row.flag == "outside":
                axis.scatter([row.paper.value], [row.ours.mean], s=160, facecolors="none", edgecolors="red")
                axis.annotate(f"{row.dataset} {row.shots}-shot {row.metric}", (row.paper.value, row.ours.mean),
                              fontsize=7, xytext=(4, 4), textcoords="offset points")
        axis.set_xlim(low, high)
        axis.set_ylim(low, high)
        axis.set_xlabel("paper (top-1 %)")
        axis.set_ylabel("ours (top-1 %, mean ± std over seeds)")
        axis.set_title(self.table.name)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        return _save(plt, figure, path)


def _run_values(runs: list[dict], metric: str) -> list[float]:
    return [r["metrics"][metric] for r in runs if r["metrics"].get(metric) is not None]


def _ours(runs: list[dict], metric: str) -> Stat | None:
    """Our number for one cell. Base-to-new H is H of the mean base and mean new (the papers' convention); its
    spread is the std of the per-seed H values."""
    if metric == "hm" and all(r["metrics"].get(k) is not None for r in runs for k in ("base", "new")):
        base, new = Stat.of(_run_values(runs, "base")), Stat.of(_run_values(runs, "new"))
        return Stat(harmonic_mean(base.mean, new.mean), Stat.of(_run_values(runs, "hm")).std, len(runs))
    values = _run_values(runs, metric)
    return Stat.of(values) if values else None


def _average_over_datasets(by_dataset: dict[str, list[dict]], datasets: Sequence[str], metric: str) -> Stat | None:
    """The average over ``datasets`` (all present) of each dataset's mean — the papers' average row; its spread
    is the std over seeds of the per-seed averages (seeds run on every dataset). Base-to-new H is H of the
    averaged base and new."""
    if metric == "hm":
        base = _average_over_datasets(by_dataset, datasets, "base")
        new = _average_over_datasets(by_dataset, datasets, "new")
        if base is None or new is None:
            return None
        per_seed = _per_seed_averages(by_dataset, datasets, "base"), _per_seed_averages(by_dataset, datasets, "new")
        seeds = sorted(set(per_seed[0]) & set(per_seed[1]))
        spread = Stat.of([harmonic_mean(per_seed[0][s], per_seed[1][s]) for s in seeds]).std if seeds else None
        return Stat(harmonic_mean(base.mean, new.mean), spread, len(seeds))
    means = [Stat.of(_run_values(by_dataset[d], metric)).mean for d in datasets if _run_values(by_dataset[d], metric)]
    if len(means) != len(datasets):
        return None
    per_seed = _per_seed_averages(by_dataset, datasets, metric)
    spread = Stat.of(list(per_seed.values())).std if per_seed else None
    return Stat(sum(means) / len(means), spread, len(per_seed))


def _per_seed_averages(by_dataset: dict[str, list[dict]], datasets: Sequence[str], metric: str) -> dict[int, float]:
    per_dataset = [{r["seed"]: r["metrics"][metric] for r in by_dataset[d] if metric in r["metrics"]}
                   for d in datasets]
    seeds = set.intersection(*(set(values) for values in per_dataset)) if per_dataset else set()
    return {s: sum(values[s] for values in per_dataset) / len(per_dataset) for s in sorted(seeds)}


def compare(results: list[dict], table) -> Comparison:
    """Our runs of ``table``'s protocol and methods, cell by cell, beside ``table``'s published numbers.

    Rows: every (method label, dataset, shots) we ran, for each of the table's metrics (transfer tables: the
    metrics the runs measured or the paper reports), then the average over the table's datasets for each
    (method label, shots) — computed only when every dataset of the table was run, else noted.
    """
    from vlprompt.reference import AVERAGE

    runs = [r for r in results if r.get("protocol") == table.protocol and r.get("method") in table.methods]
    comparison = Comparison(table)
    groups = _group(runs, method_label, "dataset", "shots")
    order = {name: i for i, name in enumerate(table.datasets)}
    method_of = {method_label(r): r["method"] for r in runs}
    for label in sorted(method_of, key=lambda label: (list(table.methods).index(method_of[label]), label)):
        method = method_of[label]
        for shots in sorted({k for l, _, k in groups if l == label}):
            datasets = sorted({d for l, d, k in groups if l == label and k == shots},
                              key=lambda d: (order.get(d, len(order)), d))
            for dataset in datasets:
                cell_runs = groups[(label, dataset, shots)]
                for metric in _metrics_of(table, cell_runs, method, dataset, shots):
                    note = "" if dataset in order else "not in the paper's table"
                    comparison.rows.append(ComparisonRow(dataset, method, label, shots, metric,
                                                         _ours(cell_runs, metric),
                                                         table.cell(method, dataset, shots, metric), note))
            if not table.has_average_row:
                continue
            by_dataset = {d: groups[(label, d, shots)] for d in table.datasets if (label, d, shots) in groups}
            ran = len(by_dataset)
            for metric in table.metrics:
                ours = _average_over_datasets(by_dataset, table.datasets, metric) if ran == len(table.datasets) \
                    else None
                note = "" if ours is not None else f"ran {ran} of {len(table.datasets)} datasets"
                comparison.rows.append(ComparisonRow(AVERAGE, method, label, shots, metric, ours,
                                                     table.cell(method, AVERAGE, shots, metric), note))
    return comparison


def _metrics_of(table, runs: list[dict], method: str, dataset: str, shots: int) -> list[str]:
    if table.has_average_row:
        return list(table.metrics)
    measured = {key for r in runs for key in r["metrics"]}
    return [m for m in table.metrics if m in measured or table.cell(method, dataset, shots, m) is not None] + \
        sorted(measured - set(table.metrics))


def comparisons(results: list[dict], tables: Sequence[str] | None = None) -> list[Comparison]:
    """One :class:`Comparison` per reference table (``tables``: names or aliases; default: every stored table
    that has runs of its protocol and methods)."""
    from vlprompt import reference

    names = [reference.resolve_name(t) for t in tables] if tables else reference.available()
    found = []
    for name in names:
        result = compare(results, reference.load(name))
        if result.rows or tables:
            found.append(result)
    return found


# --------------------------------------------------------------------------------------------- entry point


def render(tables: Sequence[Table]) -> str:
    if not tables:
        return "No finished runs (results.json) found.\n"
    return "\n".join(table.markdown() for table in tables)


def write_report(runs_dir: str | None, out: str, *, protocol: str | None = None, plots: bool = True,
                 ablate: str = "beta", compare: str | None = None, reference_tables: Sequence[str] | None = None,
                 results: list[dict] | None = None) -> tuple[str, list[str]]:
    """Build the tables of every finished run under ``runs_dir``; write ``report.md``, CSVs and plots to ``out``.

    Args:
        compare: ``"paper"`` adds, per reference table (:mod:`vlprompt.reference`), our numbers beside the
            published ones (:func:`compare`): a section of ``report.md`` and ``compare_<table>.md/.csv/.png``.
        reference_tables: which reference tables to compare with (names or aliases; default: every table with
            matching runs).
        results: use these ``results.json`` contents instead of reading ``runs_dir``.

    Returns the Markdown text and the paths written.
    """
    if compare not in (None, "paper"):
        from vlprompt.errors import ConfigError

        raise ConfigError(f"compare must be 'paper' (the published numbers stored in vlprompt.reference), "
                          f"got {compare!r}")
    if results is None:
        results = load_results(runs_dir, protocol)
    elif protocol is not None:
        results = [r for r in results if r.get("protocol") == protocol]
    tables = build_tables(results)
    markdown = render(tables)
    found = comparisons(results, reference_tables) if compare else []
    if compare:
        markdown += "\n" + ("\n".join(c.markdown() for c in found) if found else
                            "No finished runs match a stored reference table (see `vlprompt reproduce --list`).\n")
    os.makedirs(out, exist_ok=True)
    written = [os.path.join(out, "report.md")]
    with open(written[0], "w", encoding="utf-8") as handle:
        handle.write(markdown)
    for table in tables:
        path = os.path.join(out, f"{table.name}.csv")
        table.write_csv(path)
        written.append(path)
    for comparison in found:
        stem = os.path.join(out, f"compare_{comparison.table.name}")
        with open(stem + ".md", "w", encoding="utf-8") as handle:
            handle.write(comparison.markdown())
        comparison.write_csv(stem + ".csv")
        written += [stem + ".md", stem + ".csv"]
        if plots and comparison.plot(stem + ".png"):
            written.append(stem + ".png")
    if plots:
        few_shot = [r for r in results if r["protocol"] == "few_shot"]
        if few_shot and plot_few_shot(few_shot, os.path.join(out, "few_shot_curves.png")):
            written.append(os.path.join(out, "few_shot_curves.png"))
        for table in tables:
            if table.name == "base2new" and plot_base2new(table, os.path.join(out, "base2new_bars.png")):
                written.append(os.path.join(out, "base2new_bars.png"))
        if plot_ablation(results, ablate, os.path.join(out, f"ablation_{ablate}.png")):
            written.append(os.path.join(out, f"ablation_{ablate}.png"))
    return markdown, written
