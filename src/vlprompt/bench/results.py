"""What ``vlprompt bench`` measures (:class:`BenchSettings`), what it found (:class:`BenchReport`), and the
markdown tables of docs/benchmarks.md made from it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field




SECTIONS = ("text", "train", "memory", "eval", "allocator")


@dataclass
class BenchSettings:
    """What to measure and how often.

    Args:
        model: backbone architecture (random weights).
        device: ``"cpu"`` or ``"cuda"``.
        threads: torch CPU threads (also used by the subprocesses).
        quick: a few-minute subset (fewer methods, classes and repeats).
        repeats: rounds for the cheap configurations (K = 10); K = 100 runs one round fewer, K = 1000 and
            batch 100 run once.
        sections: which parts to run (:data:`SECTIONS`).
        train_batch: images per training step.
        methods: restrict the training and evaluation sections to these methods (default: coop, maple, align).
        classes: restrict the class counts K (default: 10, 100, 1000).
    """

    model: str = "ViT-B-16"
    device: str = "cpu"
    threads: int = 2
    quick: bool = False
    repeats: int = 3
    sections: tuple[str, ...] = SECTIONS
    train_batch: int = 4
    methods: tuple[str, ...] | None = None
    classes: tuple[int, ...] | None = None

    @property
    def class_counts(self) -> tuple[int, ...]:
        return self.classes or ((10, 100) if self.quick else (10, 100, 1000))

    @property
    def eval_batches(self) -> tuple[int, ...]:
        return (16,) if self.quick else (16, 100)

    @property
    def train_methods(self) -> tuple[str, ...]:
        return self.methods or (("coop", "align") if self.quick else ("coop", "maple", "align"))

    @property
    def eval_methods(self) -> tuple[str, ...]:
        return self.methods or (("align",) if self.quick else ("coop", "maple", "align"))


@dataclass
class BenchReport:
    """Results of :func:`run`: one list of row dicts per section, plus the machine they were measured on."""

    machine: dict
    settings: dict
    sections: dict[str, list[dict]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def to_markdown(self) -> str:
        return render_markdown(self)


def _fmt(value, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        return f"{value:.{digits}f}{suffix}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(cell) if not isinstance(cell, str) else cell for cell in row) + " |"
              for row in rows]
    return "\n".join(lines)


def render_markdown(report: BenchReport) -> str:
    """Markdown tables of a :class:`BenchReport` (the format of docs/benchmarks.md)."""
    m = report.machine
    parts = [f"Machine: {m.get('cpu')} ({m.get('cpu_cores')} cores), torch {m.get('torch')}, open_clip "
             f"{m.get('open_clip')}, {m.get('threads')} threads, device {m.get('device')}"
             + (f" ({m['gpu']})" if m.get("gpu") else "")
             + f"; backbone {report.settings['model']} (random weights, fp32); run took {report.seconds / 60:.1f} min."]
    s = report.sections
    if "text" in s:
        parts.append("**Text encoder**, prompts `a photo of a <class>.` (no grad; at most 100 prompts per dataset, "
                     "always including the longest): full 77-token context vs truncated after the last EOT.\n\n"
                     + _table(["dataset", "classes", "prompts timed", "truncated length", "full (s)",
                               "truncated (s)", "speed-up"],
                              [[r["dataset"], r["classes"], r["measured"], r["length"], r["full_s"],
                                r["truncated_s"], _fmt(r["speedup"], 2, "×")] for r in s["text"]]))
    if "train" in s:
        parts.append(f"**Training step** (forward + backward, batch {report.settings['train_batch']}): seconds per "
                     "step, and how much slower the plain way is.\n\n"
                     + _table(["method", "K", "ours (s)", "full-length text (s)", "speed-up vs full text",
                               "per-view passes (s)", "speed-up vs per-view", "checkpointing (s)",
                               "checkpointing time ratio"],
                              [[r["method"], r["classes"], r["ours_s"], r["full_text_s"],
                                _fmt(r["full_text_speedup"], 2, "×"), r["per_view_s"],
                                _fmt(r["per_view_speedup"], 2, "×"), r["checkpointing_s"],
                                _fmt(r["checkpointing_time_ratio"], 2, "×")] for r in s["train"]]))
        outside = [r for r in s["train"] if r.get("outside_share") is not None]
        if outside:
            parts.append("**Outside the encoders** (ALIGN training step: prompt modules, both OT levels, logits, "
                         "loss; forward and backward, timed in the same rounds as the step).\n\n"
                         + _table(["K", "step (s)", "outside the encoders (s)", "share"],
                                  [[r["classes"], r["ours_s"], _fmt(r["outside_encoders_s"], 3),
                                    _fmt(100 * r["outside_share"], 2, "%")] for r in outside]))
    if "memory" in s:
        parts.append("**Peak memory of a training step** (fresh process per row). Peak RSS (`VmHWM`, reset after "
                     "the model is built; includes the model and what the C allocator keeps), the RSS before the "
                     "step, and the peak of the bytes held by tensors allocated during a second step "
                     "(torch.profiler memory events: activations, gradients, temporaries).\n\n"
                     + _table(["method", "K", "variant", "RSS before (MB)", "peak RSS (MB)", "RSS growth (MB)",
                               "peak tensors (MB)", "step (s)"],
                              [[r["method"], r["classes"], r["variant"], _fmt(r.get("before_mb"), 0),
                                _fmt(r.get("peak_mb"), 0), _fmt(r.get("step_mb"), 0),
                                _fmt(r.get("tensor_peak_mb"), 0), r.get("step_s")] for r in s["memory"]]))
    if "eval" in s:
        rows = [r for r in s["eval"] if "check" not in r]
        parts.append("**Evaluation** (no grad): seconds per batch for the image views and the matching, seconds per "
                     "class side, and images/s with the class side cached (ours), recomputed at full length for "
                     "every batch, and the plain way (recomputed at full length + per-view image passes).\n\n"
                     + _table(["method", "B", "K", "views (s)", "per-view (s)", "match (s)", "class side full (s)",
                               "class side truncated (s)", "ours (img/s)", "recomputed (img/s)", "plain (img/s)",
                               "cache speed-up", "total speed-up"],
                              [[r["method"], r["batch"], r["classes"], r["views_s"], r["per_view_s"], r["match_s"],
                                r["classes_full_s"], r["classes_truncated_s"], r["cached_images_per_s"],
                                r["recompute_images_per_s"], r["plain_images_per_s"],
                                _fmt(r["cache_speedup"], 2, "×"), _fmt(r["total_speedup"], 2, "×")] for r in rows]))
        token_rows = [r for r in rows if r.get("token_ot_s") is not None]
        if token_rows:
            parts.append("Token-level OT alone (no grad): classes grouped by where their token sets end, each group "
                         "cut there (ours), vs one call padded to the longest prompt.\n\n"
                         + _table(["method", "B", "K", "one padded call (s)", "grouped (s)", "speed-up"],
                                  [[r["method"], r["batch"], r["classes"], r["token_ot_one_call_s"], r["token_ot_s"],
                                    _fmt(r["token_ot_one_call_s"] / r["token_ot_s"], 2, "×")] for r in token_rows]))
        for r in s["eval"]:
            if r.get("check") == "end_to_end":
                parts.append(f"Composition check (ALIGN, B = {r['batch']}, K = {r['classes']}): end to end "
                             f"{r['end_to_end_s']:.2f} s per batch vs views + match {r['parts_s']:.2f} s.")
    if "allocator" in s and s["allocator"]:
        parts.append("**Memory allocator** (ALIGN evaluation batch, class side cached; one process per setting and "
                     "round, two rounds in opposite orders; peak RSS while evaluating, model included).\n\n"
                     + _table(["allocator", "setting", "K", "B", "s per batch", "speed-up vs glibc default",
                               "peak RSS (MB)"],
                              [[r["allocator"], f"`{r['setting']}`", r["classes"], r["batch"], r["eval_s"],
                                _fmt(r["speedup"], 2, "×"), _fmt(r.get("peak_rss_mb"), 0)] for r in s["allocator"]]))
    return "\n\n".join(parts) + "\n"
