"""Ours vs the paper: every cell of a published table (:mod:`vlprompt.experiments.reference`) beside our mean ±
std over seeds, the difference, and a flag when the paper's value lies outside ours ± max(2·std, 1 point)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from typing import Any, Sequence

from vlprompt.experiments.plots import _pyplot, _save
from vlprompt.experiments.results import Stat, _group, harmonic_mean, method_label


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
    paper: Any | None  # vlprompt.experiments.reference.ReferenceCell
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

    table: Any  # vlprompt.experiments.reference.ReferenceTable
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
    from vlprompt.experiments.reference import AVERAGE

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
    from vlprompt.experiments import reference

    names = [reference.resolve_name(t) for t in tables] if tables else reference.available()
    found = []
    for name in names:
        result = compare(results, reference.load(name))
        if result.rows or tables:
            found.append(result)
    return found
