"""Published numbers to reproduce, stored as data (one YAML file per table in this package), each with its source.

A reference table is a grid ``methods × datasets × shots × metrics`` of a protocol, plus the 11-dataset ``average``
row, on one ``backbone`` (``ViT-B/16`` unless the file says otherwise). Its ``cells`` hold the values that could be sourced; every cell names one of the table's ``sources`` (paper,
table, URL) and a status:

* ``published`` — read from the source as printed;
* ``derived``   — computed by someone from published cells, not printed (e.g. an average the paper omits);
* ``suspect``   — printed, but very likely a typo (the cell's ``note`` says why);
* ``secondary`` — taken from a secondary source that aggregates the paper's table (a leaderboard);
* ``unverified``— recalled, not re-read from the source.

A grid cell without an entry is missing (:meth:`ReferenceTable.missing`); the file's ``missing`` text says why.
Each file also gives the grid ``vlprompt reproduce`` runs (``grid``: methods and seeds). A file may ``extend``
another: it takes that table's numbers and sources and replaces its title and grid.

Usage::

    from vlprompt.experiments import reference
    table = reference.load("align-fewshot")
    table.value("align", "dtd", 16)            # 71.4
    table.cell("align", "average", 16).source  # Source(key='d1-average', ...)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Iterator

import yaml

from vlprompt.errors import ConfigError

AVERAGE = "average"
STATUSES = ("published", "derived", "suspect", "secondary", "unverified")


@dataclass(frozen=True)
class Source:
    """Where numbers come from: ``citation`` (authors, title, venue), ``table`` (which table or figure), ``url``,
    and ``via`` (how the numbers reached this file, when not read directly)."""

    key: str
    citation: str
    table: str
    url: str
    via: str = ""

    def __str__(self) -> str:
        via = f"; {self.via}" if self.via else ""
        return f"{self.citation}, {self.table} ({self.url}){via}"


@dataclass(frozen=True)
class ReferenceCell:
    """One published number: ``method`` on ``dataset`` (or ``"average"``) with ``shots`` shots, ``metric``."""

    method: str
    dataset: str
    shots: int
    metric: str
    value: float
    source: Source
    status: str = "published"
    note: str = ""

    @property
    def key(self) -> tuple[str, str, int, str]:
        return self.method, self.dataset, self.shots, self.metric


@dataclass
class ReferenceTable:
    """A published table (see the module docstring). ``methods`` maps vlprompt method names to the paper's names."""

    name: str
    title: str
    protocol: str
    metrics: list[str]
    methods: dict[str, str]
    datasets: list[str]
    shots: list[int]
    grid: dict[str, Any]
    sources: dict[str, Source]
    cells: dict[tuple[str, str, int, str], ReferenceCell]
    missing_note: str = ""
    notes: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    backbone: str = "ViT-B/16"

    def cell(self, method: str, dataset: str, shots: int, metric: str | None = None) -> ReferenceCell | None:
        """The stored cell, or None (``metric`` may be left out when the table has one metric)."""
        return self.cells.get((method, dataset, int(shots), metric or self.metrics[0]))

    def value(self, method: str, dataset: str, shots: int, metric: str | None = None) -> float | None:
        found = self.cell(method, dataset, shots, metric)
        return None if found is None else found.value

    @property
    def has_average_row(self) -> bool:
        """Whether the table averages over its datasets (few-shot, base-to-new); transfer tables have one training
        dataset and an ``average`` metric over the targets instead."""
        return len(self.datasets) > 1

    def grid_keys(self) -> Iterator[tuple[str, str, int, str]]:
        """Every (method, dataset, shots, metric) of the table, the ``average`` row last per (method, shots)."""
        for method in self.methods:
            for shots in self.shots:
                for dataset in [*self.datasets, *([AVERAGE] if self.has_average_row else [])]:
                    for metric in self.metrics:
                        yield method, dataset, shots, metric

    def missing(self, *, per_dataset_only: bool = False) -> list[tuple[str, str, int, str]]:
        """The grid cells that have no stored value."""
        return [key for key in self.grid_keys() if key not in self.cells
                and not (per_dataset_only and key[1] == AVERAGE)]

    def describe_coverage(self) -> str:
        """``"16 of 330 cells stored (11 per-dataset, 5 averages)"``."""
        total = sum(1 for _ in self.grid_keys())
        if not self.has_average_row:
            return f"{len(self.cells)} of {total} cells stored"
        averages = sum(1 for key in self.cells if key[1] == AVERAGE)
        return (f"{len(self.cells)} of {total} cells stored ({len(self.cells) - averages} per-dataset, "
                f"{averages} average{'s' * (averages != 1)})")


# --------------------------------------------------------------------------------------------- loading


def _files() -> dict[str, Any]:
    folder = resources.files("vlprompt.experiments") / "reference"
    return {item.name[:-len(".yaml")]: item for item in folder.iterdir() if item.name.endswith(".yaml")}


def _raw(name: str) -> dict[str, Any]:
    files = _files()
    if name not in files:
        raise ConfigError(f"unknown reference table {name!r}; choose one of {', '.join(available())}")
    return yaml.safe_load(files[name].read_text(encoding="utf-8")) or {}


def available() -> list[str]:
    """The names of the stored tables."""
    return sorted(_files())


def resolve_name(name: str) -> str:
    """A table name or one of its aliases (``xd`` → ``maple-xd``) → the table name."""
    if name in _files():
        return name
    for candidate in available():
        if name in (_raw(candidate).get("aliases") or []):
            return candidate
    raise ConfigError(f"unknown reference table {name!r}; choose one of {', '.join(available())} "
                      f"(aliases: {', '.join(a for t in available() for a in _raw(t).get('aliases') or [])})")


def load(name: str) -> ReferenceTable:
    """Load and check one table (by name or alias); a malformed file is a :class:`ConfigError` naming the cell."""
    name = resolve_name(name)
    data = _raw(name)
    if data.get("extends"):
        base = _raw(str(data["extends"]))
        data = {**base, **{k: v for k, v in data.items() if k != "extends"}}
    where = f"reference table {name}"
    try:
        sources = {key: Source(key=key, citation=str(s["citation"]), table=str(s["table"]), url=str(s["url"]),
                               via=str(s.get("via", ""))) for key, s in (data.get("sources") or {}).items()}
        table = ReferenceTable(
            name=name, title=str(data["title"]), protocol=str(data["protocol"]), metrics=list(data["metrics"]),
            methods=dict(data["methods"]), datasets=list(data["datasets"]), shots=[int(k) for k in data["shots"]],
            grid=dict(data.get("grid") or {}), sources=sources, cells={},
            missing_note=str(data.get("missing", "")).strip(), notes=list(data.get("notes") or []),
            aliases=list(data.get("aliases") or []), backbone=str(data.get("backbone", "ViT-B/16")))
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"{where}: malformed header ({error})") from None
    for raw in data.get("cells") or []:
        cell = _cell(raw, table, where)
        if cell.key in table.cells:
            raise ConfigError(f"{where}: cell {cell.key} appears twice")
        table.cells[cell.key] = cell
    return table


def _cell(raw: dict[str, Any], table: ReferenceTable, where: str) -> ReferenceCell:
    try:
        method, dataset, shots = str(raw["method"]), str(raw["dataset"]), int(raw["shots"])
        metric = str(raw.get("metric", table.metrics[0]))
        value, source = float(raw["value"]), str(raw["source"])
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"{where}: malformed cell {raw!r} ({error})") from None
    status = str(raw.get("status", "published"))
    checks = [
        (method in table.methods, f"method {method!r} is not one of {list(table.methods)}"),
        (dataset in table.datasets or (dataset == AVERAGE and table.has_average_row),
         f"dataset {dataset!r} is not in the table"),
        (shots in table.shots, f"shots {shots} is not one of {table.shots}"),
        (metric in table.metrics, f"metric {metric!r} is not one of {table.metrics}"),
        (source in table.sources, f"source {source!r} is not one of {list(table.sources)}"),
        (status in STATUSES, f"status {status!r} is not one of {', '.join(STATUSES)}"),
        (math.isfinite(value) and 0 <= value <= 100, f"value {value} is not a percentage"),
    ]
    for ok, problem in checks:
        if not ok:
            raise ConfigError(f"{where}: cell {raw!r}: {problem}")
    return ReferenceCell(method, dataset, shots, metric, value, table.sources[source], status, str(raw.get("note", "")))


__all__ = ["AVERAGE", "STATUSES", "ReferenceCell", "ReferenceTable", "Source", "available", "load", "resolve_name"]
