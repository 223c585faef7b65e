"""The report's plots (matplotlib, when installed): accuracy vs shots, base/new/H bars, an ablation curve."""

from __future__ import annotations

import math
from collections import defaultdict

from vlprompt.experiments.results import Stat, Table, _group, _ordered, method_key


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
