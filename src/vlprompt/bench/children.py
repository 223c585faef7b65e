"""The measurements that need a fresh process: peak memory of a training step and the CPU allocator's effect on
evaluation (the allocator is chosen when a process starts). :func:`_run_child` starts ``python -m vlprompt.bench
KIND CONFIG``; the child prints its result as one JSON line for the parent to read."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from vlprompt.weights import load_clip
from vlprompt.methods import build_method
from vlprompt.bench.measure import (_current_rss_mb, _peak_rss_mb, _reset_peak_rss, _train_step, grad_checkpointing,
                                    imagenet_names, text_length)


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


def _child_main(argv: list[str]) -> None:
    kind, config = argv[0], json.loads(argv[1])
    from vlprompt.allocator import tune_cpu_allocator

    tune_cpu_allocator()  # as the vlprompt command does, unless the variant's environment opts out
    result = _memory_child(config) if kind == "memory" else _allocator_child(config)
    print(json.dumps(result))
