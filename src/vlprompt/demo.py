"""``vlprompt demo``: every protocol end to end on the bundled toy world, with the bundled toy CLIP.

Nothing is downloaded: the images are generated (:mod:`vlprompt.toyworld`), the CLIP is the small model
pretrained on the toy world's photos and shipped in the package (``load_clip("toy")``). The demo trains and
evaluates zero-shot CLIP, CoOp, MaPLe and ALIGN on

* base-to-new on ``toy_objects_sketch`` (colour × shape classes drawn as sketches; 16 shots, base = first half),
* few-shot on ``toy_objects_sketch`` (1, 4, 16 shots),
* cross-domain: trained on ``toy_objects`` photos, tested on the sketch / pixel / inverted / painted domains,

one seed, then writes the run folders, ``report.md``, CSV tables and plots into the output folder.

Why sketches for base-to-new and few-shot: the toy CLIP was pretrained on photos whose captions are exactly the
class names, so on ``toy_objects`` photos zero-shot CLIP already sits at the ceiling of its image features (a
16-shot linear probe does no better) and no prompt can add much, as if CLIP were evaluated on its own training
distribution. The papers' downstream datasets differ from CLIP's pretraining data; the sketch domain plays that
part here (zero-shot 14 %, linear probe 38 %), and prompt learning has something to learn.

Schedules are the demo's own (:data:`DEMO_LR`, :data:`DEMO_EPOCHS`), short enough for a few minutes on two CPU cores; the
library's presets for the real datasets are in ``vlprompt/presets``. Finished runs are skipped, so re-running
only reports.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from vlprompt.cli import add_threads_option
from vlprompt.engine.config import RunConfig, build_config

log = logging.getLogger("vlprompt")

DEMO_METHODS = ("zeroshot", "coop", "maple", "align")
DOWNSTREAM = "toy_objects_sketch"  # base-to-new and few-shot
SOURCE = "toy_objects"  # cross-domain source: the pretraining domain
DOMAIN_TARGETS = ("toy_objects_sketch", "toy_objects_pixel", "toy_objects_inverted", "toy_objects_painted")

# Learning rate per method and epochs per number of shots (batch 16), chosen on the toy world (36 classes, a tiny
# CLIP), not the papers' values. Fewer shots get more epochs, as in CoOp's schedules, so that every run takes a
# few hundred steps at most.
DEMO_LR = {"coop": 0.005, "maple": 0.02, "align": 0.02}
DEMO_EPOCHS = {1: 40, 4: 20, 16: 10}
# Method options on the toy CLIP (3 layers per tower: the presets' prompt depths clamp to 3 automatically).
# ALIGN uses M = N = 2 prompts, as its own SUN397 configuration does: a quarter of the transport problems.
DEMO_METHOD_OPTIONS = {
    "coop": dict(text_n_ctx=4, text_ctx_init="a photo of a"),
    "align": dict(n_text_prompts=2, n_visual_prompts=2),
}


@dataclass(frozen=True)
class DemoPlan:
    """What the demo runs: ``(protocol, dataset, shots, targets)`` per experiment, for each method."""

    experiments: tuple[tuple[str, str, int, tuple[str, ...]], ...]
    methods: tuple[str, ...] = DEMO_METHODS
    seed: int = 1


FULL = DemoPlan(experiments=(("base2new", DOWNSTREAM, 16, ()), ("few_shot", DOWNSTREAM, 1, ()),
                             ("few_shot", DOWNSTREAM, 4, ()), ("few_shot", DOWNSTREAM, 16, ()),
                             ("cross_domain", SOURCE, 16, DOMAIN_TARGETS)))
# The reduced demo CI runs: fewer experiments, same code path.
QUICK = DemoPlan(experiments=(("base2new", DOWNSTREAM, 16, ()),), methods=("zeroshot", "coop"))


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
    for protocol, dataset, shots, targets in plan.experiments:
        for method in plan.methods:
            cli = {
                "backbone": {"name": "toy", "pretrained": None},
                "method": {"options": DEMO_METHOD_OPTIONS.get(method, {})},
                # A milder crop than Dassl's (0.08, 1): at 64 px the smallest crops cut the object out.
                "data": {"root": data_root, "options": data_options, "batch_size": 16, "num_workers": 0,
                         "crop_scale": [0.85, 1.0],
                         "cache_dir": os.path.join(output, "cache")},
                "optim": schedule(method, shots),
                "eval": {"batch_size": 100, "targets": list(targets)},
                "output": os.path.join(output, "runs"),
                "progress": progress,
                "device": device,
                "tag": "demo",
            }
            configs.append(build_config(method=method, protocol=protocol, dataset=dataset, shots=shots,
                                        seed=plan.seed, cli=cli))
    return configs


def run_demo(output: str = "vlprompt-demo", plan: DemoPlan = FULL, **options) -> tuple[str, list[str]]:
    """Run the demo into ``output``; return the report's Markdown and the files written."""
    from vlprompt.protocols import run_experiment
    from vlprompt.report import write_report

    started = time.perf_counter()
    configs = demo_configs(output, plan, **options)
    for index, config in enumerate(configs, 1):
        log.info("[%d/%d] %s %s %d-shot", index, len(configs), config.protocol, config.method.name,
                 config.data.shots)
        run_experiment(config)
    markdown, written = write_report(os.path.join(output, "runs"), os.path.join(output, "report"))
    log.info("demo finished in %.0f s; report in %s", time.perf_counter() - started, os.path.join(output, "report"))
    return markdown, written


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run zero-shot, CoOp, MaPLe and ALIGN on the bundled toy world (no download)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--output", default="vlprompt-demo", help="folder for run folders and the report")
    parser.add_argument("--quick", action="store_true", help="the reduced demo (base-to-new, zero-shot and CoOp)")
    parser.add_argument("--device", default="auto", help="auto (default: a GPU if there is one, else cpu), cpu, "
                        "cuda, cuda:N, mps")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    add_threads_option(parser)
    parser.set_defaults(func=_demo_command)


def _demo_command(args) -> int:
    # vlprompt's lines at INFO; the root logger stays at WARNING, which drops what open_clip logs on it at INFO
    # ("Parsing tokenizer identifier" for every tokenizer it makes)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    markdown, written = run_demo(args.output, QUICK if args.quick else FULL, device=args.device,
                                 progress=args.progress)
    print(markdown)
    print("written:", *written, sep="\n  ")
    return 0
