"""Command-line tools for training and evaluation: ``vlprompt train``, ``run``, ``eval``, ``methods`` (the run options
they share with sweep, reproduce and demo are in :mod:`vlprompt.cli.run_options`).

Examples::

    vlprompt run base2new --methods coop,maple --seeds 1,2,3 --data-root ~/data --output runs
    vlprompt train --method align --protocol few_shot --dataset dtd --shots 4 --seed 1 --preset paper
    vlprompt train --method coop --dataset custom_folder --data-root ./my_images --set optim.epochs=20
    torchrun --nproc-per-node 4 -m vlprompt.cli train --method align --dataset imagenet --data-root ~/data
    vlprompt eval runs/base2new/dtd/coop/shots_16/seed_1 --dataset dtd --class-set new
    vlprompt eval imported_maple.safetensors --dataset imagenet_a --data-root ~/data

``train`` and ``run`` work unchanged under ``torchrun`` (one process per GPU, data-parallel; see
:mod:`vlprompt.engine.distributed`).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from vlprompt.engine.config import (
    PROTOCOL_NAMES,
    build_config,
    normalize_protocol,
    preset_file,
    preset_variants,
    to_yaml,
)
from vlprompt.cli import BACKBONE_HELP, add_alias, add_threads_option, parse_key_values
from vlprompt.cli.run_options import (
    cli_values,
    common_arguments,
    console_logging,
    int_option,
    ints_option,
    names_option,
    sigterm_interrupts,
    summary_line,
)
from vlprompt.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train and evaluate one run (one dataset, shot count and seed)",
                                  description="Train one method on one dataset under a protocol, evaluate it as "
                                  "the protocol says, and write a run folder. Re-running resumes an unfinished run "
                                  "and skips a finished one.")
    train.add_argument("--method", required=True, help="method name (see `vlprompt methods`)")
    train.add_argument("--dataset", required=True, help="dataset name (see `vlprompt datasets`)")
    train.add_argument("--protocol", default="few_shot", help=f"one of {', '.join(PROTOCOL_NAMES)} (default few_shot)")
    train.add_argument("--shots", type=int_option, default=None, help="images per class (default: 16)")
    train.add_argument("--seed", type=int_option, default=None, help="run seed (default 1)")
    common_arguments(train)
    train.set_defaults(func=run_train)

    run = subparsers.add_parser("run", help="run a protocol: methods x datasets x shots x seeds",
                                description="Run every (method, dataset, shots, seed) of a protocol into its own "
                                "run folder, skipping finished runs and resuming unfinished ones.")
    run.add_argument("protocol", help=f"one of {', '.join(PROTOCOL_NAMES)}")
    run.add_argument("--methods", required=True, type=names_option, help="comma-separated method names")
    run.add_argument("--datasets", type=names_option, help="comma-separated datasets (default: the protocol's)")
    run.add_argument("--shots", type=ints_option, help="comma-separated shot counts (default: the protocol's)")
    run.add_argument("--seeds", type=ints_option, help="comma-separated seeds (default 1,2,3)")
    run.add_argument("--dry-run", action="store_true", help="list the runs and their status, run nothing")
    common_arguments(run)
    run.set_defaults(func=run_protocol)

    evaluate = subparsers.add_parser("eval", help="evaluate trained prompts (a run folder or a prompts file)",
                                     description="Evaluate the prompts of a run folder (its prompts.safetensors, "
                                     "backbone and options) or of a prompts.safetensors file (e.g. written by "
                                     "`vlprompt import-original`; give --dataset and the backbone) on a dataset's "
                                     "test split with that dataset's class names. Writes a JSON record next to the "
                                     "prompts (<run>/eval/<dataset>-<classes>.json).")
    evaluate.add_argument("source", help="a run folder, or a prompts.safetensors file")
    evaluate.add_argument("--dataset", help="dataset to evaluate on (default: the run's)")
    evaluate.add_argument("--class-set", dest="classes", choices=("all", "base", "new"), default="all",
                          help="the dataset's classes to test: all, base (first half) or new (second half) "
                          "(default all)")
    add_alias(evaluate, "--classes", "--class-set")
    evaluate.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                          help="dataset option (custom datasets), value read as YAML")
    evaluate.add_argument("--data-root", help="data root (default: the run's)")
    evaluate.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: the run's)")
    evaluate.add_argument("--precision", choices=("fp32", "fp16", "bf16"), help="default: the run's")
    evaluate.add_argument("--batch-size", type=int_option, help="test batch size (default: the run's)")
    evaluate.add_argument("--backbone", help=f"{BACKBONE_HELP} (default: the run's or the prompts file's)")
    evaluate.add_argument("--pretrained", help="weights: open_clip tag, file or 'none' (default: the run's, else openai)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    add_threads_option(evaluate)
    evaluate.set_defaults(func=run_eval)

    methods = subparsers.add_parser("methods", help="list the methods, their presets and their options with defaults",
                                    description="List every method with its presets per protocol and its options "
                                    "with their defaults (change one with --set method.options.KEY=VALUE), and the "
                                    "backbones the methods run on.")
    methods.add_argument("names", nargs="*", metavar="NAME", help="only these methods (default: all)")
    methods.set_defaults(func=run_methods)


# --------------------------------------------------------------------------------------------- commands


def run_train(args: argparse.Namespace) -> int:
    from vlprompt.engine import distributed
    from vlprompt.experiments.protocols import run_experiment

    config = build_config(method=args.method, protocol=args.protocol, dataset=args.dataset, shots=args.shots,
                          seed=args.seed, preset=args.preset, config_file=args.config_file,
                          overrides=args.overrides, cli=cli_values(args))
    if args.print_config:
        print(to_yaml(config), end="")
        return 0
    with console_logging(args.quiet), sigterm_interrupts(), distributed.session():
        results = run_experiment(config, overwrite=args.overwrite)
    if distributed.launched().main:
        print(summary_line(results))
    return 0


def run_protocol(args: argparse.Namespace) -> int:
    from vlprompt.engine import distributed
    from vlprompt.engine.runs import RunFolder, run_dir
    from vlprompt.experiments.protocols import plan, sweep

    protocol = normalize_protocol(args.protocol)
    configs = plan(protocol, methods=args.methods, datasets=args.datasets, shots=args.shots, seeds=args.seeds,
                   preset=args.preset, config_file=args.config_file, overrides=args.overrides,
                   cli=cli_values(args))
    if args.print_config:
        print("---\n".join(to_yaml(config) for config in configs), end="")
        return 0
    if args.dry_run:
        for config in configs:
            print(f"{RunFolder(run_dir(config)).status():9} {run_dir(config)}")
        return 0
    with console_logging(args.quiet), sigterm_interrupts(), distributed.session():
        results = sweep(configs, overwrite=args.overwrite)
    if distributed.launched().main:
        for result in results:
            print(summary_line(result))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from vlprompt.inference.predictor import backbone_for, read_prompts
    from vlprompt.weights import load_clip
    from vlprompt.data import ImageDataset, build_dataset, build_transform, subsample_classes
    from vlprompt.engine.checkpoint import atomic_write_text
    from vlprompt.engine.config import RunConfig
    from vlprompt.engine.evaluate import evaluate
    from vlprompt.engine.runs import RunFolder
    from vlprompt.engine.trainer import resolve_device
    from vlprompt.methods import build_method

    tensors, header = read_prompts(args.source)  # a run folder or a prompts file, its header checked
    if os.path.isfile(args.source):  # a prompts.safetensors file (`vlprompt export`, `vlprompt import-original`)
        if not args.dataset:
            raise ConfigError("--dataset is required to evaluate a prompts file")
        config = RunConfig()
        config.method.name, config.method.options = header["method"], dict(header.get("options") or {})
        config.data.dataset, config.data.options = args.dataset, {}
        out = f"{os.path.splitext(args.source)[0]}.eval-{args.dataset}-{args.classes}.json"
    else:
        folder = RunFolder(args.source)
        config = folder.config()
        out = os.path.join(folder.path, "eval", f"{args.dataset or config.data.dataset}-{args.classes}.json")
    # The backbone the prompts were trained on, as predict, explain and vlprompt.load choose it.
    config.backbone.name, config.backbone.pretrained = backbone_for(header, args.backbone, args.pretrained)
    dataset = args.dataset or config.data.dataset
    if dataset == config.data.dataset and not args.option:
        options = dict(config.data.options)
    else:
        options = parse_key_values(args.option)
    root = os.path.expanduser(args.data_root) if args.data_root else config.data.root
    precision = args.precision or config.precision
    device = resolve_device(args.device or config.device)
    with console_logging(args.quiet):
        splits = subsample_classes(build_dataset(dataset, root, **options), args.classes)  # data before weights
        clip = load_clip(config.backbone.name, config.backbone.pretrained, device=device)
        # Built for the classes it was trained on (a probe's rows, a cache's labels belong to them), then moved to
        # the evaluated ones as the protocols do.
        method = build_method(config.method.name, clip, header.get("classnames") or splits.classnames,
                              header.get("template") or splits.template, **config.method.options).to(device)
        method.load_prompt_state_dict(tensors)
        method.set_classnames(splits.classnames, splits.template)
        reason = method.unavailable_reason(splits.classnames)
        if reason is not None:
            raise ConfigError(f"{config.method.name} on {dataset} ({args.classes} classes): {reason}")
        transform = build_transform(False, clip.image_size, clip.image_mean, clip.image_std)
        result = evaluate(method, ImageDataset(splits.test, transform),
                          batch_size=args.batch_size or config.eval.batch_size, precision=precision, device=device,
                          num_workers=config.data.num_workers, progress=not args.quiet, desc=f"eval {dataset}")
    record = {"source": args.source, "method": config.method.name, "backbone": clip.name, "dataset": dataset,
              "class_set": args.classes, **result.to_dict()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    print(f"{config.method.name} on {dataset} ({args.classes} classes, {result.total} images"
          f"{f', {len(result.skipped)} unreadable skipped' if result.skipped else ''}): "
          f"accuracy {result.accuracy:.2f}%  -> {out}")
    return 0


def run_methods(args: argparse.Namespace) -> int:
    import textwrap

    import vlprompt.methods as methods
    from vlprompt.methods.defaults import default_options

    names = args.names or methods.available()
    unknown = sorted(set(names) - set(methods.available()))
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(methods.available())}")
    descriptions = getattr(methods, "DESCRIPTIONS", {})
    rows = []
    for name in names:
        variants = sorted({v for protocol in PROTOCOL_NAMES for v in preset_variants(name, protocol)} - {"default"})
        missing = [protocol for protocol in PROTOCOL_NAMES if preset_file(name, protocol) is None]
        presets = "default" + "".join(f", {v}" for v in variants) + (f" (none for {', '.join(missing)})"
                                                                      if missing else "")
        rows.append((name, presets, descriptions.get(name, "")))
    width = max(len(n) for n in names)
    preset_width = max(len(r[1]) for r in rows)
    print(f"{'method':{width}}  {'presets':{preset_width}}  description")
    for name, presets, description in rows:
        print(f"{name:{width}}  {presets:{preset_width}}  {description}")
    print("\nOptions and their defaults (change one with --set method.options.KEY=VALUE; a protocol's preset may "
          "set some\nalready, and --print-config shows a run's values):")
    for name in names:
        options = ", ".join(f"{key}={_option_text(value)}" for key, value in default_options(name).items())
        print(textwrap.fill(f"{name}: {options}", width=118, subsequent_indent="    ", break_on_hyphens=False))
    print("\nBackbones (--backbone): any open_clip architecture, e.g. ViT-B-16-quickgelu --pretrained openai (the "
          "papers'),\nor 'toy': the small CLIP bundled with vlprompt, pretrained only on the generated toy world "
          "(vlprompt demo,\ntrying the commands offline); it does not recognise real photographs.")
    return 0


def _option_text(value: Any) -> str:
    """A default as --set reads it back (YAML): null, true, 0.1, 1.0e-06, "a photo of a", [7.0, 3.0]."""
    import yaml

    if isinstance(value, str):
        return json.dumps(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
