"""Speed and memory benchmarks of the prompt methods at real backbone shapes (the library side of ``vlprompt bench``).

Every figure is measured side by side, in one run, against the plain way of doing the same work, and given as a
ratio (plain time / our time, so > 1 means faster):

* **text encoder**: the blocks run only up to the last EOT of the batch vs the full 77-token context, on the
  class names that ship with vlprompt;
* **training step** (forward + backward, batch 4): the defaults vs full-length text, vs one image-encoder pass per
  visual prompt set ("per-view"), and with activation checkpointing;
* **evaluation**: the class side computed once and cached vs recomputed at full length for every test batch;
  batched vs per-view image passes;
* **peak memory** of a training step, each configuration in a fresh subprocess: peak resident set size
  (``VmHWM``, reset after the model is built, so it is the step's high-water mark including the model), and the
  peak of the bytes held by tensors allocated during a step (torch.profiler memory events);
* the **share of an ALIGN training step outside the two encoders** (prompt modules, matching, loss: forward and
  backward);
* the CPU **memory allocator**: glibc defaults vs tuned glibc thresholds vs jemalloc, on evaluation time and peak
  RSS, each in a subprocess (the allocator is chosen when a process starts).

Timings interleave the variants they compare (round-robin, rotating the order every round) and report the median
of the repeats, so that load from other processes hits all variants alike. Weights are random (speed does not
depend on their values). Evaluation throughput is composed from its measured per-batch parts (class side, image
views, matching), which run one after the other in an evaluation loop; one end-to-end measurement checks the
composition.

Modules: :mod:`~vlprompt.bench.results` (settings, report, markdown tables), :mod:`~vlprompt.bench.measure` (timing
and memory instruments), :mod:`~vlprompt.bench.sections` (what each section measures, in process),
:mod:`~vlprompt.bench.children` (the measurements that need a fresh process); :func:`run` runs the sections.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Callable

from vlprompt.allocator import release_memory
from vlprompt.bench.measure import (encode_views_per_view, imagenet_names, interleaved, machine_info,
                                    shipped_classnames, token_ot_one_call)
from vlprompt.bench.results import BenchReport, BenchSettings, SECTIONS, render_markdown
from vlprompt.bench.sections import _Bench


def run(settings: BenchSettings, log: Callable[[str], None] = print,
        on_section: Callable[[BenchReport], None] | None = None) -> BenchReport:
    """Run the sections of ``settings`` and return their results; ``on_section`` sees the report after each."""
    unknown = sorted(set(settings.sections) - set(SECTIONS))
    if unknown:
        from vlprompt.errors import ConfigError

        raise ConfigError(f"unknown benchmark section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    started = time.perf_counter()
    bench = _Bench(settings, log)
    report = BenchReport(machine=machine_info(settings), settings=asdict(settings))
    handlers = {"text": bench.text, "train": bench.train, "memory": bench.memory, "eval": bench.evaluate,
                "allocator": bench.allocator}
    for section in SECTIONS:
        if section in settings.sections:
            report.sections[section] = handlers[section]()
            release_memory()
            report.seconds = time.perf_counter() - started
            if on_section is not None:
                on_section(report)
    return report


__all__ = ["SECTIONS", "BenchReport", "BenchSettings", "encode_views_per_view", "imagenet_names", "interleaved",
           "render_markdown", "run", "shipped_classnames", "token_ot_one_call"]
