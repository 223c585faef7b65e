"""Finished runs as rows: ``results.json`` files read into dicts, labelled and grouped, and the numbers the
tables hold (:class:`Stat`: mean ± std over seeds; :class:`Table`: Markdown and CSV)."""

from __future__ import annotations

import csv
import math
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
    from vlprompt.experiments.protocols import DOMAIN_TARGETS, ELEVEN_DATASETS

    known = list(ELEVEN_DATASETS) + list(DOMAIN_TARGETS)
    return sorted(set(names), key=lambda n: (known.index(n) if n in known else len(known), n))
