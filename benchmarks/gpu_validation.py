"""Mixed precision and speed of every method on a GPU, at ViT-B/16 shapes with random weights.

    python benchmarks/gpu_validation.py [--methods coop,maple,align] [--json out.json]

For each method and precision (fp32; bf16 and fp16 autocast, the latter with a GradScaler; fp16 *weights* as in
the original code): one training step at batch 4, K = 10 — loss and gradients finite, step time (median of 5
after 2 warm-ups, CUDA-synchronised). Then ALIGN evaluation at K = 1000, batch 100: class side cached once vs
recomputed per batch (images/s). And the backbone against open_clip's own forward on the GPU (fp32).
Needs CUDA; results go to docs/benchmarks.md by hand with the machine named.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vlprompt.weights import load_clip
from vlprompt.methods import available, build_method

CLASSNAMES = [f"class number {i}" for i in range(1000)]


def timed(fn, repeats=5, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_check(clip, name, precision, classes=10, batch=4):
    method = build_method(name, clip, CLASSNAMES[:classes]).cuda()
    images = torch.randn(batch, 3, 224, 224, device="cuda")
    labels = torch.arange(batch, device="cuda") % classes
    params = [p for _, p in method.trainable_parameters()]
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    finite = {"loss": True, "grads": True}

    def step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss, _ = method.training_loss(images, labels)
        finite["loss"] &= bool(torch.isfinite(loss))
        if params:
            scaler.scale(loss).backward()
            finite["grads"] &= all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
            for p in params:
                p.grad = None

    seconds = timed(step)
    return {"method": name, "precision": precision, "step_s": round(seconds, 4), **finite}


def eval_throughput(clip, classes=1000, batch=100, batches=3, dtype=torch.bfloat16):
    method = build_method("align", clip, CLASSNAMES[:classes]).cuda().eval()
    images = torch.randn(batch, 3, 224, 224, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        class_side = method.encode_classes()

        def cached():
            for _ in range(batches):
                method(images, class_side)

        def recomputed():
            for _ in range(batches):
                method(images, method.encode_classes())

        t_cached = timed(cached, repeats=3, warmup=1)
        t_recomputed = timed(recomputed, repeats=3, warmup=1)
    return {"K": classes, "batch": batch, "cached_img_s": round(batch * batches / t_cached, 1),
            "recomputed_img_s": round(batch * batches / t_recomputed, 1),
            "ratio": round(t_recomputed / t_cached, 2)}


def backbone_equality(clip):
    images = torch.randn(4, 3, 224, 224, device="cuda")
    tokens = clip.tokenize(["a photo of a dog.", "a centered satellite photo of forest."])
    with torch.no_grad():
        image = (clip.encode_image(images).features - clip.model.encode_image(images)).abs().max().item()
        text = (clip.encode_text(tokens).features - clip.model.encode_text(tokens)).abs().max().item()
    return {"image_max_abs_diff": image, "text_max_abs_diff": text}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default=",".join(available()))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the equality check
    clip = load_clip("ViT-B-16", pretrained=None, device="cuda")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "backbone_vs_open_clip": backbone_equality(clip), "train_steps": [], "eval": None}
    print(report["backbone_vs_open_clip"], flush=True)
    for name in args.methods.split(","):
        for precision in ("fp32", "bf16", "fp16"):
            row = train_step_check(clip, name, precision)
            report["train_steps"].append(row)
            print(row, flush=True)
    half = load_clip("ViT-B-16", pretrained=None, device="cuda", precision="fp16")
    for name in ("maple", "align", "plot"):
        row = train_step_check(half, name, "fp16-weights")
        report["train_steps"].append(row)
        print(row, flush=True)
    report["eval"] = eval_throughput(clip)
    print(report["eval"], flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
