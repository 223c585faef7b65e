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
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from vlprompt import ot
from vlprompt.allocator import release_memory
from vlprompt.backbone import ImageOutput, PromptableCLIP, load_clip
from vlprompt.methods import build_method
from vlprompt.methods.align import Align

SECTIONS = ("text", "train", "memory", "eval", "allocator")

# Candidate allocator settings for the allocator benchmark (environment of a child process).
# glibc: serve allocations up to 32 MB (the largest threshold glibc accepts) from the heap instead of fresh mmaps,
# and keep up to 1 GB of freed heap instead of returning it: large tensors stop page-faulting on every allocation.
GLIBC_TUNED = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"
# glibc without any mmap: every allocation comes from the heap, trimmed only when more than 1 GB at its top is free.
GLIBC_NO_MMAP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824"
# jemalloc as PyTorch's CPU performance guides set it up: keep freed pages instead of decaying them.
JEMALLOC_CONF = ("oversize_threshold:1,background_thread:true,metadata_thp:auto,"
                 "dirty_decay_ms:9000000000,muzzy_decay_ms:9000000000")
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")


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


# --------------------------------------------------------------------------------------------- helpers


def machine_info(settings: BenchSettings) -> dict:
    """The machine, library versions and thread count of this run."""
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": settings.device,
    }
    try:
        import open_clip

        info["open_clip"] = open_clip.__version__
    except AttributeError:  # pragma: no cover
        pass
    if settings.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as file:
            names = [line.split(":", 1)[1].strip() for line in file if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    return info


def imagenet_names(count: int) -> list[str]:
    """The first ``count`` ImageNet class names (repeated with a suffix beyond 1000)."""
    from vlprompt.data.standard import imagenet_classnames

    names = list(imagenet_classnames().values())
    return [names[i % len(names)] + ("" if i < len(names) else f" {i // len(names)}") for i in range(count)]


def shipped_classnames() -> dict[str, list[str]]:
    """Class names of the standard datasets whose class lists ship with vlprompt.

    That is all of the 15 except Food101 and SUN397 (their split files are supplied by the user). ImageNet-V2 and
    ImageNet-Sketch share ImageNet's names and are folded into ``"imagenet"``.
    """
    from vlprompt.data.standard import STANDARD_DATASETS, imagenet_classnames, packaged

    imagenet = imagenet_classnames()
    result: dict[str, list[str]] = {}
    for info in STANDARD_DATASETS:
        options = info.builder_options
        if "split_file" in options:
            if not options["shipped"]:
                continue
            split = json.loads(packaged(options["split_file"]))
            by_label = {label: name for part in split.values() for _, label, name in part}
            names = [by_label[label] for label in range(len(by_label))]
            if options.get("fix_names") is not None:
                names = options["fix_names"](names)
        elif info.name == "fgvc_aircraft":
            names = [line.strip() for line in packaged("fgvc_aircraft_variants.txt").decode().splitlines()]
        elif options.get("subset"):
            names = [imagenet[wnid] for wnid in sorted(packaged(options["subset"]).decode().split())]
        elif info.name in ("imagenet_v2", "imagenet_sketch"):
            continue
        else:
            names = list(imagenet.values())
        result[info.name] = names
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(cases: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each case over ``repeats`` rounds; each round runs every case once, in rotated order."""
    names = list(cases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            start = time.perf_counter()
            cases[name]()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


@contextmanager
def text_length(clip: PromptableCLIP, truncate: bool) -> Iterator[None]:
    """Run the text encoder truncated after the last EOT (our default) or on the full context (the plain way)."""
    previous = clip.truncate_text
    clip.truncate_text = truncate
    try:
        yield
    finally:
        clip.truncate_text = previous


@contextmanager
def grad_checkpointing(clip: PromptableCLIP, enable: bool) -> Iterator[None]:
    previous = clip.grad_checkpointing
    clip.set_grad_checkpointing(enable)
    try:
        yield
    finally:
        clip.set_grad_checkpointing(previous)


def encode_views_per_view(method: Align, images: torch.Tensor) -> ImageOutput:
    """:meth:`Align.encode_views` done the plain way: one image-encoder pass per visual prompt set.

    Rows are image-major (``j * M + m``), as in the batched pass.
    """
    prompts, deep = method.visual_prompts()
    if prompts is None:
        return method.encode_views(images)
    outputs = []
    for view in range(prompts.shape[0]):
        deep_view = None if deep is None else [None if p is None else p[view] for p in deep]
        outputs.append(method.clip.encode_image(images, prompts=prompts[view], deep_prompts=deep_view,
                                                prompt_position=method.config.visual_position))
    features = torch.stack([out.features for out in outputs], dim=1).flatten(0, 1)
    tokens = torch.stack([out.tokens for out in outputs], dim=1).flatten(0, 1)
    return ImageOutput(features=features, tokens=tokens, patch_slice=outputs[0].patch_slice)


def token_ot_one_call(method: Align, views: ImageOutput, text, batch: int) -> torch.Tensor:
    """ALIGN's token-level OT similarity ``(B, K, M, N)`` as one call over all classes padded to the longest prompt
    (what :meth:`Align._token_similarity` computes, without grouping classes by token-set length)."""
    c = method.config
    tokens = views.patch_tokens if c.visual_token_set == "patches" else views.tokens
    r = F.normalize(tokens.float(), dim=-1).view(batch, -1, tokens.shape[1], tokens.shape[2])
    s = F.normalize(text.tokens.float(), dim=-1)
    mask = text.reference_mask if (c.text_token_set or c.mode) == "reference" else text.paper_mask
    stop = c.sinkhorn_stop or ("reference" if c.mode == "reference" else "per_problem")
    return ot.token_level_ot(r, s, text_mask=mask, eps=c.eps, max_iter=c.sinkhorn_iters, stop=stop).similarity


def _train_step(method, images: torch.Tensor, labels: torch.Tensor, per_view: bool = False) -> None:
    method.zero_grad(set_to_none=True)
    if per_view:
        logits = method.match(encode_views_per_view(method, images), method.encode_classes(), images.shape[0])
        loss = F.cross_entropy(logits.float(), labels)
    else:
        loss, _ = method.training_loss(images, labels)
    loss.backward()


def _current_rss_mb() -> float:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    """Peak RSS since the last :func:`_reset_peak_rss` (``VmHWM``), else since the process started."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


class _Bench:
    """Holds the backbone, inputs and settings shared by the sections of one run."""

    def __init__(self, settings: BenchSettings, log: Callable[[str], None]):
        self.settings = settings
        self.log = log
        self.device = torch.device(settings.device)
        torch.set_num_threads(settings.threads)
        self.clip = load_clip(settings.model, pretrained=None, device=self.device)
        self.image_size = self.clip.image_size
        self.generator = torch.Generator().manual_seed(0)

    def images(self, batch: int) -> torch.Tensor:
        return torch.randn(batch, 3, self.image_size, self.image_size, generator=self.generator).to(self.device)

    def labels(self, batch: int, classes: int) -> torch.Tensor:
        return torch.randint(0, classes, (batch,), generator=self.generator).to(self.device)

    def method(self, name: str, classes: int):
        torch.manual_seed(0)
        return build_method(name, self.clip, imagenet_names(classes)).to(self.device)

    def repeats(self, classes: int = 0, batch: int = 0) -> int:
        """Rounds for a configuration: fewer for K = 100, one for K = 1000 or batch 100 (and in quick mode)."""
        if self.settings.quick or classes >= 1000 or batch >= 100:
            return 1
        return max(1, self.settings.repeats - 1) if classes >= 100 else self.settings.repeats

    # ------------------------------------------------------------------------------------- text encoder
    def text(self) -> list[dict]:
        """Text encoder on each dataset's prompts ``"a photo of a <class>."``: truncated vs full context."""
        cap = 60 if self.settings.quick else 100
        datasets = shipped_classnames()
        if self.settings.quick:
            datasets = {k: datasets[k] for k in ("imagenet", "fgvc_aircraft", "eurosat") if k in datasets}
        rows = []
        for dataset, names in datasets.items():
            prompts = [f"a photo of a {name.replace('_', ' ')}." for name in names]
            token_ids = self.clip.tokenize(prompts)
            eot = self.clip.eot_index(token_ids)
            if len(prompts) > cap:  # keep the longest prompt: it sets the truncated length of the whole set
                keep = torch.cat([eot.argmax().view(1), torch.arange(cap - 1, device=eot.device)]).unique()
                token_ids, eot = token_ids[keep], eot[keep]
            calls = max(1, cap // len(token_ids))  # small class lists: several calls per sample, not a few ms

            def encode(truncate: bool) -> None:
                for _ in range(calls):
                    self.clip.encode_text(token_ids, truncate=truncate)

            with torch.no_grad():
                times = interleaved({"truncated": lambda: encode(True), "full": lambda: encode(False)},
                                    self.repeats(classes=len(token_ids)), self.device)
            times = {k: v / calls for k, v in times.items()}
            rows.append(dict(dataset=dataset, classes=len(names), measured=len(token_ids),
                             length=int(eot.max()) + 1, full_s=times["full"], truncated_s=times["truncated"],
                             speedup=times["full"] / times["truncated"]))
            self.log(f"text {dataset}: {rows[-1]['speedup']:.2f}x (L={rows[-1]['length']})")
        total_full = sum(r["full_s"] for r in rows)
        total_truncated = sum(r["truncated_s"] for r in rows)
        rows.append(dict(dataset="all", classes=sum(r["classes"] for r in rows),
                         measured=sum(r["measured"] for r in rows), length=max(r["length"] for r in rows),
                         full_s=total_full, truncated_s=total_truncated, speedup=total_full / total_truncated))
        return rows

    # ------------------------------------------------------------------------------------- training
    def train(self) -> list[dict]:
        """Training step time: defaults vs full-length text, per-view passes and checkpointing.

        For ALIGN the part of the step outside the two encoders is timed in the same rounds (see
        :meth:`_outside_encoders`).
        """
        rows = []
        batch = self.settings.train_batch
        for name in self.settings.train_methods:
            for classes in self.settings.class_counts:
                method = self.method(name, classes)
                images, labels = self.images(batch), self.labels(batch, classes)
                large = classes >= 1000
                cases: dict[str, Callable[[], None]] = {}
                if large and name == "align":
                    # 4000 prompt sequences: only with checkpointing does this fit a small machine's memory.
                    cases["checkpointing"] = lambda: self._with(method, images, labels, checkpoint=True)
                else:
                    cases["ours"] = lambda: self._with(method, images, labels)
                if not large:  # full-length text at K = 1000 needs more memory than such a machine has
                    cases["full_text"] = lambda: self._with(method, images, labels, truncate=False)
                if name == "align" and classes == 10:
                    cases["per_view"] = lambda: self._with(method, images, labels, per_view=True)
                    cases["checkpointing"] = lambda: self._with(method, images, labels, checkpoint=True)
                if name == "align" and not large:
                    cases["outside_encoders"] = self._outside_encoders(method, images, labels)
                times = interleaved(cases, self.repeats(classes), self.device)
                base = times.get("ours", times.get("checkpointing"))
                row = dict(method=name, classes=classes, batch=batch, ours_s=times.get("ours"),
                           full_text_s=times.get("full_text"), per_view_s=times.get("per_view"),
                           checkpointing_s=times.get("checkpointing"), outside_encoders_s=times.get("outside_encoders"))
                row["full_text_speedup"] = times["full_text"] / base if "full_text" in times else None
                row["per_view_speedup"] = times["per_view"] / base if "per_view" in times else None
                row["checkpointing_time_ratio"] = (
                    times["checkpointing"] / times["ours"] if "ours" in times and "checkpointing" in times else None)
                row["outside_share"] = (times["outside_encoders"] / times["ours"]
                                        if "outside_encoders" in times else None)
                rows.append(row)
                self.log(f"train {name} K={classes}: " + ", ".join(f"{k} {v:.2f}s" for k, v in times.items()))
                method = cases = None
                release_memory()  # the heap keeps a step's peak (vlprompt.allocator); children need it back
        return rows

    def _with(self, method, images, labels, truncate=True, checkpoint=False, per_view=False) -> None:
        with text_length(self.clip, truncate), grad_checkpointing(self.clip, checkpoint):
            _train_step(method, images, labels, per_view=per_view)

    def _outside_encoders(self, method, images, labels) -> Callable[[], None]:
        """Everything of an ALIGN training step but the two encoders, forward and backward.

        That is the prompt modules in front of the encoders (text input assembly, text-to-visual coupling) and,
        on leaf copies of the encoder outputs, the matching (both OT levels), the logits and the loss.
        """
        with torch.no_grad():
            text, views = method.encode_classes(), method.encode_views(images)

        def outside() -> None:
            method.zero_grad(set_to_none=True)
            method.text.input_embeddings()
            method.visual_prompts()
            text_leaf = type(text)(**{k: v.detach().requires_grad_(v.is_floating_point())
                                      for k, v in vars(text).items()})
            views_leaf = ImageOutput(views.features.detach().requires_grad_(),
                                     views.tokens.detach().requires_grad_(), views.patch_slice)
            loss = F.cross_entropy(method.match(views_leaf, text_leaf, images.shape[0]).float(), labels)
            loss.backward()

        return outside

    # ------------------------------------------------------------------------------------- memory
    def memory(self) -> list[dict]:
        """Peak memory of one training step, each configuration in a fresh subprocess (CPU) or in-process (GPU)."""
        configs = [("align", 10, "ours"), ("align", 10, "full_text"), ("align", 10, "checkpointing")]
        if not self.settings.quick:
            configs += [("align", 100, "ours"), ("align", 100, "full_text"), ("align", 100, "checkpointing"),
                        ("coop", 100, "ours"), ("coop", 100, "full_text"), ("maple", 100, "ours"),
                        ("coop", 1000, "ours"), ("align", 1000, "checkpointing")]
        rows = []
        for name, classes, variant in configs:
            config = dict(model=self.settings.model, device=self.settings.device, threads=self.settings.threads,
                          method=name, classes=classes, batch=self.settings.train_batch, variant=variant,
                          tensor_peak=classes < 1000)  # a second, profiled step: too slow at K = 1000
            result = _run_child("memory", config) if self.device.type == "cpu" else _memory_child(config)
            rows.append(dict(method=name, classes=classes, variant=variant, **result))
            self.log(f"memory {name} K={classes} {variant}: peak {result['peak_mb']:.0f} MB")
        return rows

    # ------------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> list[dict]:
        """Evaluation throughput from its per-batch parts: class side (cached or recomputed), views, matching."""
        rows = []
        small = self.settings.eval_batches[0]
        for name in self.settings.eval_methods:
            method = self.method(name, 10).eval()
            class_times = {}
            for classes in self.settings.class_counts:  # the class side depends on K only
                method.set_classnames(imagenet_names(classes))
                with torch.no_grad():
                    class_times[classes] = interleaved({
                        "full": lambda: self._classes(method, truncate=False),
                        "truncated": lambda: self._classes(method, truncate=True),
                    }, self.repeats(classes), self.device)
                self.log(f"eval {name} class side K={classes}: " +
                         ", ".join(f"{k} {v:.2f}s" for k, v in class_times[classes].items()))
            for batch in self.settings.eval_batches:
                images = self.images(batch)
                cases = {"views": lambda: method.encode_views(images)}
                if name == "align" and batch == small:
                    cases["per_view"] = lambda: encode_views_per_view(method, images)
                with torch.no_grad():
                    view_times = interleaved(cases, self.repeats(batch=batch), self.device)
                    views = method.encode_views(images)
                self.log(f"eval {name} views B={batch}: " + ", ".join(f"{k} {v:.2f}s" for k, v in view_times.items()))
                for classes in self.settings.class_counts:
                    method.set_classnames(imagenet_names(classes))
                    with torch.no_grad():
                        cached = method.encode_classes()
                        cases = {"match": lambda: method.match(views, cached, batch)}
                        if name == "align" and batch == small and classes < 1000:  # token-level OT alone
                            stop = "reference" if method.config.mode == "reference" else "per_problem"
                            cases["token_ot"] = lambda: method._token_similarity(views, cached, batch, stop)
                            cases["token_ot_one_call"] = lambda: token_ot_one_call(method, views, cached, batch)
                        match_times = interleaved(cases, self.repeats(classes, batch), self.device)
                    rows.append(self._eval_row(name, batch, classes, view_times, match_times, class_times[classes]))
            if name == "align":
                rows.append(self._end_to_end_check(method))
        return rows

    def _eval_row(self, name, batch, classes, view_times, match_times, text) -> dict:
        match = match_times["match"]
        per_batch = view_times["views"] + match
        per_view = view_times.get("per_view")
        recompute = text["full"] + per_batch
        plain = None if per_view is None else text["full"] + per_view + match
        row = dict(method=name, batch=batch, classes=classes, views_s=view_times["views"], per_view_s=per_view,
                   match_s=match, classes_full_s=text["full"], classes_truncated_s=text["truncated"],
                   cached_images_per_s=batch / per_batch, recompute_images_per_s=batch / recompute,
                   plain_images_per_s=None if plain is None else batch / plain,
                   cache_speedup=recompute / per_batch,
                   cache_speedup_vs_truncated=(text["truncated"] + per_batch) / per_batch,
                   views_speedup=None if per_view is None else per_view / view_times["views"],
                   total_speedup=None if plain is None else plain / per_batch,
                   token_ot_s=match_times.get("token_ot"), token_ot_one_call_s=match_times.get("token_ot_one_call"))
        self.log(f"eval {name} B={batch} K={classes}: {row['cached_images_per_s']:.3f} img/s cached, "
                 f"{row['cache_speedup']:.2f}x vs recomputed; "
                 + ", ".join(f"{k} {v:.2f}s" for k, v in match_times.items()))
        return row

    def _classes(self, method, truncate: bool):
        with text_length(self.clip, truncate):
            return method.encode_classes()

    def _end_to_end_check(self, method) -> dict:
        """``method(images, class_side)`` end to end vs the sum of its measured parts (views + match)."""
        batch, classes = self.settings.eval_batches[0], 10
        method.set_classnames(imagenet_names(classes))
        images = self.images(batch)
        with torch.no_grad():
            cached = method.encode_classes()
            views = method.encode_views(images)
            times = interleaved({
                "end_to_end": lambda: method(images, cached),
                "views": lambda: method.encode_views(images),
                "match": lambda: method.match(views, cached, batch),
            }, self.repeats(), self.device)
        return dict(method="align", batch=batch, classes=classes, check="end_to_end",
                    end_to_end_s=times["end_to_end"], parts_s=times["views"] + times["match"])

    # ------------------------------------------------------------------------------------- allocator
    def allocator(self) -> list[dict]:
        """ALIGN evaluation time per batch under different memory allocators (one subprocess each)."""
        if self.device.type != "cpu":
            return []
        # Children apply vlprompt.allocator's setting (as the vlprompt command does) unless the environment opts
        # out (VLPROMPT_MALLOC=default) or chooses its own (GLIBC_TUNABLES, LD_PRELOAD).
        variants = {"glibc default": {"VLPROMPT_MALLOC": "default"},
                    "glibc tuned": {"GLIBC_TUNABLES": GLIBC_TUNED},
                    "glibc no mmap": {"GLIBC_TUNABLES": GLIBC_NO_MMAP},
                    "vlprompt (mallopt at start)": {}}
        jemalloc = next((path for path in JEMALLOC_PATHS if os.path.exists(path)), None)
        if jemalloc:
            variants["jemalloc"] = {"LD_PRELOAD": jemalloc}
            variants["jemalloc tuned"] = {"LD_PRELOAD": jemalloc, "MALLOC_CONF": JEMALLOC_CONF}
        config = dict(model=self.settings.model, device="cpu", threads=self.settings.threads, method="align",
                      classes=10, batch=4, repeats=2)
        samples: dict[str, list[dict]] = {name: [] for name in variants}
        names = list(variants)
        for round_index in range(1 if self.settings.quick else 2):  # second round in reverse order
            for name in names if round_index % 2 == 0 else names[::-1]:
                samples[name].append(_run_child("allocator", config, variants[name]))
                self.log(f"allocator {name}: {samples[name][-1]['eval_s']:.2f}s per batch")
        rows = [dict(allocator=name, setting=" ".join(f"{k}={v}" for k, v in env.items())
                     or "mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, 1 GiB)",
                     classes=config["classes"], batch=config["batch"],
                     eval_s=statistics.median(r["eval_s"] for r in samples[name]),
                     peak_rss_mb=statistics.median(r.get("peak_rss_mb", float("nan")) for r in samples[name]))
                for name, env in variants.items()]
        for row in rows:
            row["speedup"] = rows[0]["eval_s"] / row["eval_s"]
        return rows


# --------------------------------------------------------------------------------------------- subprocesses


def _run_child(kind: str, config: dict, env: dict | None = None) -> dict:
    command = [sys.executable, "-m", "vlprompt.bench", kind, json.dumps(config)]
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if completed.returncode != 0:
        return dict(error=(completed.stderr.strip().splitlines() or ["failed"])[-1][:200], peak_mb=float("nan"),
                    eval_s=float("nan"))
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _child_setup(config: dict):
    torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    clip = load_clip(config["model"], pretrained=None, device=device)
    torch.manual_seed(0)
    method = build_method(config["method"], clip, imagenet_names(config["classes"])).to(device)
    images = torch.randn(config["batch"], 3, clip.image_size, clip.image_size).to(device)
    return clip, method, images, device


def _memory_child(config: dict) -> dict:
    """Peak memory of one training step of ``config`` (peak RSS on CPU, peak allocated on GPU)."""
    clip, method, images, device = _child_setup(config)
    labels = torch.randint(0, config["classes"], (config["batch"],)).to(device)
    truncate = config["variant"] != "full_text"
    checkpoint = config["variant"] == "checkpointing"
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _current_rss_mb()
        reset = _reset_peak_rss()
    start = time.perf_counter()
    with text_length(clip, truncate), grad_checkpointing(clip, checkpoint):
        _train_step(method, images, labels)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        return dict(before_mb=before, peak_mb=peak, step_mb=peak - before, step_s=seconds, measure="cuda allocated")
    peak = _peak_rss_mb()
    result = dict(before_mb=before, peak_mb=peak, step_mb=peak - before, step_s=seconds,
                  measure="VmHWM reset before the step" if reset else "ru_maxrss of the process")
    if config.get("tensor_peak", True):
        with text_length(clip, truncate), grad_checkpointing(clip, checkpoint):
            result["tensor_peak_mb"] = _peak_tensor_memory_mb(lambda: _train_step(method, images, labels))
    return result


def _peak_tensor_memory_mb(step: Callable[[], None]) -> float:
    """Peak of the bytes held by tensors allocated during ``step`` (torch.profiler's memory events).

    Unlike the RSS this counts live tensors only, not what the C allocator keeps after they are freed.
    """
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        profiler.export_chrome_trace(path)
        with open(path) as file:
            events = json.load(file)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0) / 2**20


def _allocator_child(config: dict) -> dict:
    """Median seconds of one ALIGN evaluation batch (cached class side) after a warm-up batch."""
    clip, method, images, device = _child_setup(config)
    method.eval()
    _reset_peak_rss()
    with torch.no_grad():
        cached = method.encode_classes()
        method(images, cached)  # warm-up
        times = []
        for _ in range(config["repeats"]):
            start = time.perf_counter()
            method(images, cached)
            times.append(time.perf_counter() - start)
    return dict(eval_s=statistics.median(times), peak_rss_mb=_peak_rss_mb())


# --------------------------------------------------------------------------------------------- run and report


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


def _child_main(argv: list[str]) -> None:
    kind, config = argv[0], json.loads(argv[1])
    from vlprompt.allocator import tune_cpu_allocator

    tune_cpu_allocator()  # as the vlprompt command does, unless the variant's environment opts out
    result = _memory_child(config) if kind == "memory" else _allocator_child(config)
    print(json.dumps(result))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
