"""The measuring instruments of the benchmarks: interleaved median timings, the text-length and
activation-checkpointing switches, the per-view and one-call baselines they compare against, and the process's
resident-memory probes."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from vlprompt import ot
from vlprompt.backbone import ImageOutput, PromptableCLIP
from vlprompt.methods.align import Align
from vlprompt.bench.results import BenchSettings


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
