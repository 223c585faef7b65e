"""Tables and plots from run folders — built from ``results.json`` files only, never from logs.

* mean ± std over seeds (population std, ``numpy.std`` as CoOp's ``parse_test_res.py`` computes it);
* base-to-new: per dataset mean base, mean new and H = 2BN/(B+N) of those means; the average row takes the mean
  base and the mean new over datasets and H of those two numbers, as the papers do;
* few-shot: datasets × shots (ALIGN App. Table D.1 layout) with the average over datasets;
* cross-dataset / cross-domain: source accuracy, each target, and the mean over targets.

Methods are told apart by ``method[-preset][-tag]``. :func:`write_report` writes ``report.md``, one CSV per
table and (if matplotlib is installed) accuracy-vs-shots, base/new/H and ablation plots.

With ``compare="paper"`` it also puts every cell next to the published number stored in :mod:`vlprompt.experiments.reference`
(:func:`vlprompt.experiments.comparison.compare`): ours (mean ± std over seeds), the paper's value, the difference, and a flag when the paper's value
lies outside ours ± max(2·std, 1 point) — ``compare_<table>.md``/``.csv``/``.png``.

Modules: :mod:`~vlprompt.experiments.results` (reading runs, :class:`Stat`, :class:`Table`), this one (the tables
and :func:`write_report`), :mod:`~vlprompt.experiments.plots`, :mod:`~vlprompt.experiments.comparison`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Sequence

from vlprompt.experiments.comparison import comparisons
from vlprompt.experiments.plots import plot_ablation, plot_base2new, plot_few_shot
from vlprompt.experiments.results import (PROTOCOL_ORDER, PROTOCOL_TITLES, Stat, Table, _group, _ordered, harmonic_mean,
                                          load_results, method_key)


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
        compare: ``"paper"`` adds, per reference table (:mod:`vlprompt.experiments.reference`), our numbers beside the
            published ones (:func:`compare`): a section of ``report.md`` and ``compare_<table>.md/.csv/.png``.
        reference_tables: which reference tables to compare with (names or aliases; default: every table with
            matching runs).
        results: use these ``results.json`` contents instead of reading ``runs_dir``.

    Returns the Markdown text and the paths written.
    """
    if compare not in (None, "paper"):
        from vlprompt.errors import ConfigError

        raise ConfigError(f"compare must be 'paper' (the published numbers stored in vlprompt.experiments.reference), "
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
