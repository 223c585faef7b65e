"""``vlprompt demo``: every protocol end to end on the bundled toy world, with the bundled toy CLIP.

Nothing is downloaded: the images are generated (:mod:`vlprompt.toyworld`), the CLIP is the small model
pretrained on the toy world's photos and shipped in the package (``load_clip("toy")``). The demo trains and
evaluates zero-shot CLIP, a linear probe on its frozen image features (what those features hold: the ceiling the
papers compare prompts against), CoOp, MaPLe and ALIGN on a suite of toy datasets shaped like the papers'
benchmarks:

* few-shot (16 shots) on three datasets where zero-shot CLIP sits 34 to 95 points below a linear probe on its own
  features (:data:`GAP_DATASETS`: a domain shift to sketches, fine-grained attribute combinations at dusk, unusual
  class names);
* base-to-new on the domain-shift dataset (16 shots, base = first half of the classes);
* cross-domain: trained on ``toy_objects`` photos (16 shots), where zero-shot is already strong, and tested on the
  sketch / pixel / inverted / painted / dusk domains;

then writes the run folders, ``report.md``, CSV tables and plots into the output folder.

Schedules are the demo's own (:data:`DEMO_LR`, :data:`DEMO_EPOCHS`), short enough for a few minutes on one CPU
core; the library's presets for the real datasets are in ``vlprompt/engine/presets``. Finished runs are skipped, so
re-running only reports.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from vlprompt.cli import add_threads_option
from vlprompt.cli.run_options import ints_option
from vlprompt.engine.config import RunConfig, build_config

log = logging.getLogger("vlprompt")

# The linear probe trains on cached features with its own preset (no schedule below); in base-to-new it reports base
# only, since it cannot classify unseen classes.
DEMO_METHODS = ("zeroshot", "linear_probe", "coop", "maple", "align")
# Where zero-shot CLIP is far below what its features hold (docs/toyworld.md, "The downstream suite").
GAP_DATASETS = ("toy_objects_sketch", "toy_color_textures_dusk", "toy_signs")
SOURCE = "toy_objects"  # zero-shot already strong; the cross-domain source: the pretraining domain
DOMAIN_TARGETS = ("toy_objects_sketch", "toy_objects_pixel", "toy_objects_inverted", "toy_objects_painted",
                  "toy_objects_dusk")

# Learning rate per method and epochs per number of shots (batch 32), chosen on the toy world (36 classes, a tiny
# CLIP), not the papers' values. Fewer shots get more epochs, as in CoOp's schedules, so that every run takes
# about a hundred steps.
DEMO_LR = {"coop": 0.005, "maple": 0.02, "align": 0.02}
DEMO_EPOCHS = {1: 40, 4: 15, 16: 5}
DEMO_BATCH = 32
# Method options on the toy CLIP (3 layers per tower: the presets' prompt depths clamp to 3 automatically).
# ALIGN uses M = N = 2 prompts, as its own SUN397 configuration does: a quarter of the transport problems.
DEMO_METHOD_OPTIONS = {
    "coop": dict(text_n_ctx=4, text_ctx_init="a photo of a"),
    "align": dict(n_text_prompts=2, n_visual_prompts=2),
}


@dataclass(frozen=True)
class DemoPlan:
    """What the demo runs: ``(protocol, dataset, shots, targets)`` per experiment, for each method and seed."""

    experiments: tuple[tuple[str, str, int, tuple[str, ...]], ...]
    methods: tuple[str, ...] = DEMO_METHODS
    seeds: tuple[int, ...] = (1,)


FULL = DemoPlan(experiments=(
    *(("few_shot", name, 16, ()) for name in GAP_DATASETS),
    ("base2new", GAP_DATASETS[0], 16, ()),
    ("cross_domain", SOURCE, 16, DOMAIN_TARGETS),
))
# The reduced demo CI runs: fewer experiments, same code path.
QUICK = DemoPlan(experiments=(("base2new", GAP_DATASETS[0], 16, ()),), methods=("zeroshot", "coop"))


def schedule(method: str, shots: int) -> dict:
    """The demo's ``optim`` settings for ``method`` at ``shots`` (empty for zero-shot)."""
    if method not in DEMO_LR:
        return {}
    epochs = DEMO_EPOCHS[min(DEMO_EPOCHS, key=lambda k: abs(k - shots))]
    # No warmup epoch: at 1-3 steps per epoch (1 shot) Dassl's constant warmup epoch would be a wasted tenth.
    return dict(lr=DEMO_LR[method], epochs=epochs, warmup_epochs=0, stop_epoch=None)


def demo_configs(output: str, plan: DemoPlan = FULL, *, data_root: str | None = None, test_per_class: int = 20,
                 progress: bool = False, device: str = "auto") -> list[RunConfig]:
    """The run configs of the demo, writing under ``output/runs`` with data under ``data_root``."""
    data_root = data_root or os.path.join(output, "data")
    data_options = {"n_train_per_class": 16, "n_val_per_class": 4, "n_test_per_class": test_per_class}
    configs = []
    for seed in plan.seeds:
        for protocol, dataset, shots, targets in plan.experiments:
            for method in plan.methods:
                cli = {
                    "backbone": {"name": "toy", "pretrained": None},
                    "method": {"options": DEMO_METHOD_OPTIONS.get(method, {})},
                    # A milder crop than Dassl's (0.08, 1): at 64 px the smallest crops cut the object out.
                    "data": {"root": data_root, "options": data_options, "batch_size": DEMO_BATCH,
                             "num_workers": 0, "crop_scale": [0.85, 1.0],
                             "cache_dir": os.path.join(output, "cache")},
                    "optim": schedule(method, shots),
                    "eval": {"batch_size": 100, "targets": list(targets)},
                    "output": os.path.join(output, "runs"),
                    "progress": progress,
                    "device": device,
                    "tag": "demo",
                }
                configs.append(build_config(method=method, protocol=protocol, dataset=dataset, shots=shots,
                                            seed=seed, cli=cli))
    return configs


def run_demo(output: str = "vlprompt-demo", plan: DemoPlan = FULL, **options) -> tuple[str, list[str]]:
    """Run the demo into ``output``; return the report's Markdown and the files written."""
    from vlprompt.experiments.protocols import run_experiment
    from vlprompt.experiments.report import write_report

    started = time.perf_counter()
    configs = demo_configs(output, plan, **options)
    for index, config in enumerate(configs, 1):
        log.info("[%d/%d] %s %s %s %d-shot seed %d", index, len(configs), config.protocol, config.method.name,
                 config.data.dataset, config.data.shots, config.seed)
        run_experiment(config)
    markdown, written = write_report(os.path.join(output, "runs"), os.path.join(output, "report"))
    log.info("demo finished in %.0f s; report in %s", time.perf_counter() - started, os.path.join(output, "report"))
    return markdown, written


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run zero-shot, a linear probe, CoOp, MaPLe and ALIGN on the bundled toy world (no download)",
        description="Every protocol end to end on the bundled toy world with the bundled toy CLIP (nothing is "
        "downloaded): trains and evaluates zero-shot CLIP, a linear probe, CoOp, MaPLe and ALIGN, then writes the "
        "run folders, "
        "report.md, CSV tables and plots into --output. Re-running skips finished runs.",
    )
    parser.add_argument("--output", default="vlprompt-demo", help="folder for run folders and the report")
    parser.add_argument("--quick", action="store_true", help="the reduced demo (base-to-new, zero-shot and CoOp)")
    parser.add_argument("--seeds", type=ints_option, default=[1],
                        help="comma-separated seeds to run (the report gives mean ± std over them; default: 1)")
    parser.add_argument("--device", default="auto", help="auto (default: a GPU if there is one, else cpu), cpu, "
                        "cuda, cuda:N, mps")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    add_threads_option(parser)
    parser.set_defaults(func=_demo_command)


def _demo_command(args) -> int:
    from dataclasses import replace

    # vlprompt's lines at INFO; the root logger stays at WARNING, which drops what open_clip logs on it at INFO
    # ("Parsing tokenizer identifier" for every tokenizer it makes)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    plan = replace(QUICK if args.quick else FULL, seeds=tuple(args.seeds))
    markdown, written = run_demo(args.output, plan, device=args.device, progress=args.progress)
    print(markdown)
    print("written:", *written, sep="\n  ")
    return 0
