"""Reproduce a published table in one call: its whole grid of runs with the right presets, then the report that
puts every cell beside the published number.

A reproducible table is a reference table of :mod:`vlprompt.experiments.reference` (the published numbers, with sources) whose
file also names the grid that produced it (methods, seeds; datasets and shots are the table's). :func:`plan` turns
it into run configs — each method with its preset for the table's protocol, ``default`` (the original code's
values) or ``paper`` (the paper's, where the method has such a variant) — restricted by ``methods``/``datasets``/
``shots``/``seeds`` if asked; :func:`reproduce` runs them (finished runs are skipped, unfinished ones resume;
``workers`` > 1 runs them in parallel processes through :func:`vlprompt.experiments.sweep.run_sweep`) and writes the report with
the comparison (:func:`vlprompt.experiments.report.write_report` with ``compare="paper"``).

:func:`explain` lists where the two presets differ for the grid and what else the table's numbers depend on;
:func:`estimate` gives the expected time on one GPU from the epochs and image counts of every run and an assumed
throughput (:data:`THROUGHPUT`, stated estimates — not measurements).
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from vlprompt.experiments import reference
from vlprompt.engine.config import (
    DEFAULT_PRESET,
    RunConfig,
    build_config,
    preset_file,
    preset_variants,
    resolve_preset,
)
from vlprompt.engine.runs import RunFolder, run_dir
from vlprompt.errors import ConfigError, VlpromptError

log = logging.getLogger("vlprompt")

PRESET_CHOICES = ("default", "code", "paper")  # "code" is another name for "default" (the original code's values)

# Choices inside a method that no preset changes (method options; docs/methods.md), by method.
METHOD_CHOICES = {
    "align": "token-level term sign, gradient path and cost form follow the original code (options mode, cost_form, "
             "beta); prompt init 'a photo of a' on prompt 0 only; token sets as in the "
             "code; M = N forced by the linear coupling; Sinkhorn log-domain fp32",
    "upt": "the shared tokens attend to each other as the paper describes; the released code's attention acts per "
           "token",
    "plot": "visual token set = the configured ViT's patch tokens (PLOT's configs are RN50)",
    "maple": "cross-dataset / DG presets use prompt depth 3 (MaPLe's cross-dataset config)",
    "aple": "a configurable reconstruction with placeholder values; no public code or numbers",
}


# --------------------------------------------------------------------------------------------- planning


@dataclass
class Reproduction:
    """The runs of one table: the reference numbers, the configs, and the preset each method uses."""

    table: reference.ReferenceTable
    configs: list[RunConfig]
    presets: dict[str, str] = field(default_factory=dict)  # method -> preset variant used
    extra_datasets: list[str] = field(default_factory=list)  # asked for, but not in the table (no reference)

    @property
    def methods(self) -> list[str]:
        return list(self.presets)


def tables() -> list[reference.ReferenceTable]:
    """Every stored table that names a grid to run."""
    return [t for t in map(reference.load, reference.available()) if t.grid.get("methods")]


def method_preset(method: str, protocol: str, wanted: str) -> str:
    """The preset variant ``method`` runs with: ``paper`` where the method has one for ``protocol``, else
    ``default`` (its original code's values are then the only ones)."""
    if wanted not in PRESET_CHOICES:
        raise ConfigError(f"--preset must be one of {', '.join(PRESET_CHOICES)}, got {wanted!r}")
    if wanted == "code":
        return DEFAULT_PRESET
    return wanted if wanted in preset_variants(method, protocol) else DEFAULT_PRESET


def plan(name: str, *, preset: str = DEFAULT_PRESET, methods: Sequence[str] | None = None,
         datasets: Sequence[str] | None = None, shots: Sequence[int] | None = None,
         seeds: Sequence[int] | None = None, config_file: str | None = None, overrides: Sequence[str] = (),
         cli: Mapping[str, Any] | None = None) -> Reproduction:
    """The validated run configs of table ``name`` (a reference table name or alias).

    Args:
        preset: ``default``/``code`` (the original code's values) or ``paper`` (the paper's, for the methods that
            have such a variant; the others keep their only preset).
        methods, datasets, shots, seeds: restrict the grid (default: the table's). Datasets outside the table are
            allowed (e.g. the toy world or a custom folder); they run but have no published number.
        config_file, overrides, cli: as :func:`vlprompt.engine.config.build_config` (``--config``, ``--set``,
            the dedicated options such as ``--data-root`` and ``--backbone``).
    """
    table = reference.load(name)
    grid_methods = list(table.grid.get("methods") or [])
    if not grid_methods:
        raise ConfigError(f"reference table {table.name} names no grid to run")
    chosen_methods = list(methods or grid_methods)
    unknown = [m for m in chosen_methods if m not in table.methods]
    if unknown:
        raise ConfigError(f"{table.name} has no published numbers for method(s) {', '.join(unknown)}; its methods "
                          f"are {', '.join(table.methods)}")
    chosen_shots = [int(k) for k in (shots or table.shots)]
    chosen_seeds = [int(s) for s in (seeds or table.grid.get("seeds") or (1, 2, 3))]
    chosen_datasets = list(datasets or table.datasets)
    presets = {m: method_preset(m, table.protocol, preset) for m in chosen_methods}
    configs = [build_config(method=method, protocol=table.protocol, dataset=dataset, shots=k, seed=seed,
                            preset=presets[method], config_file=config_file, overrides=list(overrides), cli=cli)
               for method in chosen_methods for dataset in chosen_datasets for k in chosen_shots
               for seed in chosen_seeds]
    extra = [d for d in chosen_datasets if d not in table.datasets]
    return Reproduction(table, configs, presets, extra)


# --------------------------------------------------------------------------------------------- running


def run_grid(configs: Sequence[RunConfig], *, workers: int | None = 1, overwrite: bool = False) -> list[str]:
    """Run the configs (finished runs skipped, unfinished ones resumed); return the run folders that failed.

    ``workers`` 1 runs them one after another in this process; more (or None: one per visible GPU) runs them in
    parallel worker processes through :func:`vlprompt.experiments.sweep.run_sweep` (each job's log in ``<output>/sweep/logs``).
    """
    if workers == 1 or len(configs) <= 1:
        from vlprompt.experiments.protocols import sweep

        sweep(configs, overwrite=overwrite)
        return []
    try:
        from vlprompt.experiments.sweep import run_sweep
    except ImportError:  # the parallel runner is not part of this installation
        log.warning("the parallel sweep runner (vlprompt.experiments.sweep) is not available; running the %d runs one after "
                    "another", len(configs))
        return run_grid(configs, workers=1, overwrite=overwrite)
    outcomes = run_sweep(configs, workers=workers, overwrite=overwrite)
    failed = [o for o in outcomes if o.status == "failed"]
    for outcome in failed:
        log.warning("failed: %s (exit status %s; log %s)", outcome.run_dir, outcome.returncode, outcome.log_file)
    return [o.run_dir for o in failed]


def finished_results(configs: Sequence[RunConfig]) -> list[dict[str, Any]]:
    """The ``results.json`` contents of the configs' finished runs (of the same settings: a folder that holds a
    run with others is left out)."""
    folders = [(RunFolder(run_dir(config)), config) for config in configs]
    return [folder.results() for folder, config in folders if folder.finished and folder.matches(config)]


def default_report_dir(reproduction: Reproduction) -> str:
    return os.path.join(reproduction.configs[0].output, "reproduce", reproduction.table.name)


def reproduce(name: str, *, workers: int | None = 1, overwrite: bool = False, report_out: str | None = None,
              plots: bool = True, **plan_options: Any) -> tuple[str, list[str], Reproduction]:
    """Run table ``name``'s grid and write its report with the comparison to the published numbers.

    ``plan_options`` go to :func:`plan`. Returns the report's Markdown, the files written (``report.md``,
    ``compare_<table>.md/.csv/.png``, the usual tables and plots, in ``report_out``, default
    ``<output>/reproduce/<table>``) and the :class:`Reproduction`. Runs that failed in a parallel sweep raise
    :class:`VlpromptError` after the report of the others is written.
    """
    from vlprompt.experiments.report import write_report

    reproduction = plan(name, **plan_options)
    failed = run_grid(reproduction.configs, workers=workers, overwrite=overwrite)
    out = report_out or default_report_dir(reproduction)
    markdown, files = write_report(None, out, plots=plots, compare="paper",
                                   reference_tables=[reproduction.table.name],
                                   results=finished_results(reproduction.configs))
    if failed:
        raise VlpromptError(f"{len(failed)} run(s) failed (first: {failed[0]}); the report in {out} holds the "
                            f"others. Re-run the same command to retry them")
    return markdown, files, reproduction


# --------------------------------------------------------------------------------------------- explaining


def explain(reproduction: Reproduction) -> str:
    """Where ``default`` (original code) and ``paper`` presets differ for this grid, which one each method runs
    with, and what else the published numbers depend on."""
    table = reproduction.table
    datasets = sorted({c.data.dataset for c in reproduction.configs}, key=_dataset_order(table))
    shots = sorted({c.data.shots for c in reproduction.configs})
    lines = [f"{table.name}: {table.title}", f"protocol {table.protocol}; runs {len(reproduction.configs)} "
             f"({len(reproduction.methods)} method(s) x {len(datasets)} dataset(s) x {len(shots)} shot setting(s) "
             f"x {len({c.seed for c in reproduction.configs})} seed(s)); reference: {table.describe_coverage()}", ""]
    for method, used in reproduction.presets.items():
        data = preset_file(method, table.protocol) or {}
        lines.append(f"{method} ({table.methods[method]}): runs with preset '{used}'"
                     + ("" if "paper" in preset_variants(method, table.protocol)
                        else " (no paper variant: the original code's values are the only ones)"))
        if data.get("source"):
            lines.append(f"  source: {data['source']}")
        if data.get("notes"):
            lines.append(f"  notes: {' '.join(str(data['notes']).split())}")
        for text in _preset_differences(method, table.protocol, datasets, shots):
            lines.append(f"  differs: {text}")
        if method in METHOD_CHOICES:
            lines.append(f"  method options (both presets): {METHOD_CHOICES[method]}")
        lines.append("")
    if table.notes:
        lines += ["about the published numbers:"] + [f"  - {' '.join(n.split())}" for n in table.notes] + [""]
    if table.missing_note:
        lines += [f"missing reference cells: {' '.join(table.missing_note.split())}", ""]
    if reproduction.extra_datasets:
        lines += [f"not in the table (run, but no published number): {', '.join(reproduction.extra_datasets)}", ""]
    lines.append("more: docs/reproduce.md ('Where paper and code differ') and docs/methods.md")
    return "\n".join(lines) + "\n"


def _dataset_order(table: reference.ReferenceTable):
    order = {name: i for i, name in enumerate(table.datasets)}
    return lambda name: (order.get(name, len(order)), name)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _preset_differences(method: str, protocol: str, datasets: Sequence[str], shots: Sequence[int]) -> list[str]:
    """``"optim.lr: 0.0025 (code) -> 0.0035 (paper) [every run]"`` lines for the grid's (dataset, shots)."""
    if "paper" not in preset_variants(method, protocol):
        return []
    contexts: dict[tuple[str, Any, Any], set[tuple[str, int]]] = defaultdict(set)
    for dataset in datasets:
        for k in shots:
            code = _effective(resolve_preset(method, protocol, DEFAULT_PRESET, dataset=dataset, shots=k))
            paper = _effective(resolve_preset(method, protocol, "paper", dataset=dataset, shots=k))
            for key in sorted(set(code) | set(paper)):
                if code.get(key) != paper.get(key):
                    contexts[(key, code.get(key), paper.get(key))].add((dataset, k))
    every = {(d, k) for d in datasets for k in shots}
    lines = []
    for (key, code_value, paper_value), where in sorted(contexts.items(), key=lambda item: str(item[0])):
        lines.append(f"{key}: {code_value} (code) -> {paper_value} (paper) [{_where(where, every, datasets, shots)}]")
    return lines


def _effective(preset: Mapping[str, Any]) -> dict[str, Any]:
    """The preset's flat values; ``optim.stop_epoch`` folded into the number of epochs trained."""
    flat = _flatten(preset)
    if flat.get("optim.stop_epoch") is not None:
        flat["optim.epochs"] = f"{flat.pop('optim.epochs', '?')} (stop at {flat.pop('optim.stop_epoch')})"
    flat.pop("optim.stop_epoch", None)
    return flat


def _where(where: set[tuple[str, int]], every: set[tuple[str, int]], datasets: Sequence[str],
           shots: Sequence[int]) -> str:
    """``"every run"``, ``"shots 1, 2"``, ``"sun397"``, ``"every dataset but imagenet, shots 8, 16"``…"""
    if where == every:
        return "every run"
    groups: dict[frozenset[str], list[int]] = defaultdict(list)
    for k in shots:
        names = frozenset(d for d in datasets if (d, k) in where)
        if names:
            groups[names].append(k)
    parts = []
    for names, ks in groups.items():
        if len(names) == len(datasets):
            which = "every dataset"
        elif len(names) >= len(datasets) / 2:
            which = "every dataset but " + ", ".join(d for d in datasets if d not in names)
        else:
            which = ", ".join(d for d in datasets if d in names)
        parts.append(which if len(ks) == len(shots) else f"{which}, shots {', '.join(map(str, ks))}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------- time estimate

# ASSUMED throughput of one data-centre GPU (A100/H100 class) on ViT-B/16 with fp16 autocast, as seconds per
# item. Estimates for planning, not measurements: image encoder forward+backward to reach the prompts
# (IMAGE_TRAIN), image forward (IMAGE_EVAL), text encoder forward+backward of one 77-token prompt (TEXT_TRAIN),
# text forward (TEXT_EVAL).
THROUGHPUT = {"IMAGE_TRAIN": 1 / 450, "IMAGE_EVAL": 1 / 1500, "TEXT_TRAIN": 1 / 1800, "TEXT_EVAL": 1 / 6000}


@dataclass(frozen=True)
class CostModel:
    """How a method spends compute: image views per image, whether gradients flow through the image encoder,
    text prompts per class (0: fixed text features), text encoded per image (CoCoOp), and an overhead factor
    (optimal transport, adapters)."""

    views: int = 1
    image_backward: bool = True
    prompts: int = 1
    text_per_image: bool = False
    overhead: float = 1.0


COST_MODELS = {
    "zeroshot": CostModel(prompts=0),
    "coop": CostModel(image_backward=False),
    "cocoop": CostModel(image_backward=False, text_per_image=True),
    "plot": CostModel(image_backward=False, prompts=4, overhead=1.2),
    "upt": CostModel(),
    "vpt": CostModel(prompts=0),
    "vpt_shallow": CostModel(prompts=0),
    "ivlp_text": CostModel(image_backward=False),
    "ivlp": CostModel(),
    "maple": CostModel(),
    "align": CostModel(views=4, prompts=4, overhead=1.5),
    "aple": CostModel(overhead=1.2),
}


def estimate_seconds(config: RunConfig) -> tuple[float, float] | None:
    """(training, evaluation) seconds of one run on one GPU under :data:`THROUGHPUT`; None when the dataset's
    image counts are unknown (custom data)."""
    from vlprompt.data import dataset_info
    from vlprompt.experiments.protocols import get_protocol

    try:
        info = dataset_info(config.data.dataset)
    except VlpromptError:
        return None
    if info.counts is None:
        return None
    protocol = get_protocol(config.protocol)
    cost = COST_MODELS.get(config.method.name, CostModel())
    classes = info.counts.classes
    train_classes = math.ceil(classes / 2) if protocol.train_classes == "base" else classes
    train_images = min(config.data.shots * train_classes, info.counts.train)
    epochs = config.optim.stop_epoch if config.optim.stop_epoch is not None else config.optim.epochs
    if config.method.name == "zeroshot":
        epochs = 0
    steps = max(train_images // config.data.batch_size, 1)
    image_cost = THROUGHPUT["IMAGE_TRAIN"] if cost.image_backward else THROUGHPUT["IMAGE_EVAL"]
    text_sequences = (train_images * train_classes if cost.text_per_image else steps * train_classes) * cost.prompts
    train = epochs * cost.overhead * (train_images * cost.views * image_cost
                                      + text_sequences * THROUGHPUT["TEXT_TRAIN"])
    evaluation = 0.0
    targets = [(info.counts.test, classes)]
    if protocol.name in ("cross_dataset", "cross_domain"):
        targets += [_test_size(t) for t in (config.eval.targets or protocol.targets)]
    for images, target_classes in targets:
        per_image = cost.views * THROUGHPUT["IMAGE_EVAL"]
        if cost.text_per_image:
            per_image += target_classes * THROUGHPUT["TEXT_EVAL"]
        evaluation += cost.overhead * images * per_image
    return train, evaluation


def _test_size(target: str) -> tuple[int, int]:
    from vlprompt.data import dataset_info

    try:
        counts = dataset_info(target.partition("@")[0]).counts
    except VlpromptError:
        return 0, 0
    return (counts.test, counts.classes) if counts is not None else (0, 0)


def estimate(reproduction: Reproduction) -> str:
    """The expected time of the grid on one GPU, per method, from :func:`estimate_seconds`."""
    per_method: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    unknown = []
    for config in reproduction.configs:
        seconds = estimate_seconds(config)
        if seconds is None:
            unknown.append(config.data.dataset)
            continue
        entry = per_method[config.method.name]
        entry[0] += seconds[0]
        entry[1] += seconds[1]
        entry[2] += 1
    lines = [f"{reproduction.table.name}: estimated time on one GPU (assumed throughput, ViT-B/16, fp16: "
             f"image fwd+bwd {1 / THROUGHPUT['IMAGE_TRAIN']:.0f}/s, image fwd {1 / THROUGHPUT['IMAGE_EVAL']:.0f}/s, "
             f"prompt fwd+bwd {1 / THROUGHPUT['TEXT_TRAIN']:.0f}/s, prompt fwd {1 / THROUGHPUT['TEXT_EVAL']:.0f}/s; "
             "an estimate, not a measurement)"]
    total = 0.0
    for method, (train, evaluation, runs) in per_method.items():
        total += train + evaluation
        lines.append(f"  {method:10} {runs:4d} runs  train {train / 3600:8.1f} h  eval {evaluation / 3600:6.1f} h")
    lines.append(f"  total      {sum(e[2] for e in per_method.values()):4d} runs  {total / 3600:.1f} GPU-hours")
    if unknown:
        lines.append(f"  not estimated (no image counts): {', '.join(sorted(set(unknown)))}")
    return "\n".join(lines) + "\n"


__all__ = ["COST_MODELS", "PRESET_CHOICES", "THROUGHPUT", "Reproduction", "estimate", "estimate_seconds",
           "explain", "method_preset", "plan", "reproduce", "run_grid", "tables"]
