"""The in-process sections of ``vlprompt bench``: text encoder, training step, evaluation, the share of a step
outside the encoders, and the drivers of the memory and allocator sections (whose measurements run in
:mod:`vlprompt.bench.children`)."""

from __future__ import annotations

import os
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from vlprompt.allocator import release_memory
from vlprompt.backbone import ImageOutput
from vlprompt.weights import load_clip
from vlprompt.methods import build_method
from vlprompt.bench.children import GLIBC_NO_MMAP, GLIBC_TUNED, JEMALLOC_CONF, JEMALLOC_PATHS, _memory_child, _run_child
from vlprompt.bench.measure import (_train_step, encode_views_per_view, grad_checkpointing, imagenet_names, interleaved,
                                    shipped_classnames, text_length, token_ot_one_call)
from vlprompt.bench.results import BenchSettings


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
