"""Command-line tools for data: ``vlprompt datasets``, ``vlprompt data verify|sample|prepare``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from vlprompt.cli import add_alias, defer_options, parse_key_values
from vlprompt.errors import VlpromptError

SHOW_MISSING = 20


def register(subparsers: argparse._SubParsersAction) -> None:
    listing = subparsers.add_parser("datasets", help="list dataset names with their expected image counts",
                                    description="List every registered dataset: the 15 standard ones with their "
                                    "train/val/test image and class counts and the folder expected under the data "
                                    "root, then the custom and toy-world datasets.")
    listing.set_defaults(func=run_datasets)

    data = subparsers.add_parser("data", help="check, prepare and sample dataset folders",
                                 description="Dataset folders: status of all standard datasets under a data root, "
                                 "verify one, prepare one from its official archives, write a few-shot subset.")
    data.set_defaults(func=lambda args: data.print_help() or 1)
    commands = data.add_subparsers(dest="data_command", metavar="<data command>")

    verify = commands.add_parser(
        "verify", help="check a dataset folder: counts per split, missing images, split-file hash"
    )
    _dataset_arguments(verify)
    verify.set_defaults(func=run_verify)

    status = commands.add_parser(
        "status", help="one table of the 15 standard datasets under a root: present / missing / incomplete")
    status.add_argument("--data-root", required=True, help="folder holding the datasets")
    add_alias(status, "--root", "--data-root")
    status.set_defaults(func=run_status)
    sample = commands.add_parser("sample", help="write the few-shot subset of a seed as JSON (path, label, classname)")
    _dataset_arguments(sample)
    sample.add_argument("--shots", type=int, required=True, help="images per class (k)")
    sample.add_argument("--seed", type=int, required=True, help="run seed (1, 2, 3 in the papers)")
    sample.add_argument("--out", help="output JSON file (default: standard output)")
    sample.add_argument("--cache-dir", help="few-shot cache folder (default: $VLPROMPT_CACHE/fewshot or "
                        "~/.cache/vlprompt/fewshot)")
    sample.set_defaults(func=run_sample)

    prep = commands.add_parser(
        "prepare", help="arrange the official archives of a dataset into the layout the loaders read, then verify",
        description="Extract or link the official files of a dataset into ROOT (the CoOp layout), verify the "
        "result and move it into place atomically. Without --from and --download it prints what to fetch. "
        "Re-running on a prepared root does nothing; an interrupted run is simply re-run.",
    )
    prep.add_argument("--dataset", required=True, help="registry name (see `vlprompt datasets`)")
    prep.add_argument("--data-root", required=True, help="folder holding the datasets (the dataset is prepared in "
                      "its folder under it)")
    add_alias(prep, "--root", "--data-root")
    prep.add_argument("--from", dest="sources", action="append", default=[], metavar="PATH",
                      help="an official archive or file, the folder it extracts to, a folder holding the "
                      "downloads, or a user-supplied split file (repeatable)")
    prep.add_argument("--download", action="store_true",
                      help="fetch missing files from the official hosts where they still serve them "
                      "(into ROOT/downloads/)")
    defer_options(prep, _prepare_limits)  # their defaults live in vlprompt.data.prepare (urllib, the registry)
    prep.set_defaults(func=run_prepare)


def _prepare_limits(prep: argparse.ArgumentParser) -> None:
    from vlprompt.data.prepare import DEFAULT_TIMEOUT, ExtractLimits
    from vlprompt.data.prepare.files import human_bytes

    prep.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                      help=f"seconds to wait for a download host (default {DEFAULT_TIMEOUT:g})")
    limits = ExtractLimits()
    prep.add_argument("--max-extract-size", type=_size, default=limits.max_bytes, metavar="SIZE",
                      help="refuse an archive that unpacks to more than this, e.g. 500GB "
                      f"(default {human_bytes(limits.max_bytes)})")
    prep.add_argument("--max-extract-ratio", type=_ratio, default=limits.max_ratio, metavar="R",
                      help="refuse an archive that unpacks to more than R times its own size (plus "
                      f"{human_bytes(limits.allowance)}); images do not compress, so the official archives stay "
                      f"near 1 (default {limits.max_ratio:g})")


def _size(text: str) -> int:
    from vlprompt.data.prepare.files import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 1 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


def _dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="registry name (see `vlprompt datasets`)")
    parser.add_argument("--data-root", required=True, help="folder holding the datasets (custom_folder: the "
                        "dataset folder; custom_csv: the CSV file)")
    add_alias(parser, "--root", "--data-root")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="dataset option, e.g. split_file=splits.json (values are read as YAML: 0.5, true, [a, b])",
    )


def _build(args: argparse.Namespace):
    from vlprompt.data.registry import dataset_info

    info = dataset_info(args.dataset)
    options = {"check_files": False, **parse_key_values(args.option)}
    return info, info.build(args.data_root, **options)


def run_datasets(args: argparse.Namespace) -> int:
    from vlprompt.data.registry import REGISTRY

    print(f"{'name':16} {'train':>9} {'val':>7} {'test':>7} {'classes':>7}  folder under the data root")
    for info in REGISTRY.values():
        if info.counts is None:
            print(f"{info.name:16} {'-':>9} {'-':>7} {'-':>7} {'-':>7}  {info.split_source}")
            continue
        c, layout = info.counts, info.layouts[0]
        folder = os.path.join(layout.folder, layout.images)
        print(f"{info.name:16} {c.train:>9} {c.val:>7} {c.test:>7} {c.classes:>7}  {folder}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from vlprompt.data.base import missing_files
    from vlprompt.data.standard import BLOBS

    info, splits = _build(args)  # raises DataError for a missing folder, split file or a wrong hash
    ok = True
    print(f"{info.name}: {splits.num_classes} classes", end="")
    if info.counts is not None:
        good = splits.num_classes == info.counts.classes
        ok &= good
        print(f" (expected {info.counts.classes}) {'ok' if good else 'MISMATCH'}", end="")
    print()
    for which in ("train", "val", "test"):
        count = len(splits.split(which))
        line = f"  {which:5} {count:>9} images"
        if info.counts is not None:
            expected = getattr(info.counts, which)
            ok &= count == expected
            line += f" (expected {expected}) {'ok' if count == expected else 'MISMATCH'}"
        print(line)
    split_file = info.builder_options.get("split_file")
    if split_file:
        print(f"  split file {split_file}: git blob {BLOBS[split_file]} ok")
    paths = list(dict.fromkeys(d.path for which in ("train", "val", "test") for d in splits.split(which)))
    missing = missing_files(paths)
    if missing:
        ok = False
        print(f"  {len(missing)} of {len(paths)} images are missing:")
        for path in missing[:SHOW_MISSING]:
            print(f"    {path}")
        if len(missing) > SHOW_MISSING:
            print(f"    ... and {len(missing) - SHOW_MISSING} more")
    else:
        print(f"  all {len(paths)} images present")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def dataset_status(info, root: str) -> tuple[str, str]:
    """``(state, detail)`` of one standard dataset under ``root``: ``present``, ``missing`` or ``incomplete``."""
    from vlprompt.data.base import missing_files

    try:
        splits = info.build(root, check_files=False)
    except VlpromptError as error:
        text = str(error)
        return ("missing" if "does not exist" in text or "not found" in text else "incomplete"), text.split(";")[0]
    counts = tuple(len(splits.split(which)) for which in ("train", "val", "test"))
    paths = [d.path for which in ("train", "val", "test") for d in splits.split(which)]
    absent = len(missing_files(paths))
    expected = (info.counts.train, info.counts.val, info.counts.test)
    detail = f"{counts[0]}/{counts[1]}/{counts[2]} images, {splits.num_classes} classes"
    if absent or counts != expected or splits.num_classes != info.counts.classes:
        return "incomplete", detail + (f", {absent} images missing" if absent else "") + \
            f" (expected {expected[0]}/{expected[1]}/{expected[2]}, {info.counts.classes} classes)"
    return "present", detail


def run_status(args: argparse.Namespace) -> int:
    from vlprompt.data.registry import REGISTRY

    from vlprompt.data.toy import TOY_DATASETS

    print(f"{'name':16} {'state':11} details")
    states = []
    for info in REGISTRY.values():
        if info.counts is None:  # custom and toy datasets have no expected counts
            continue
        state, detail = dataset_status(info, args.data_root)
        states.append(state)
        print(f"{info.name:16} {state:11} {detail}")
    print(f"{states.count('present')} present, {states.count('incomplete')} incomplete, "
          f"{states.count('missing')} missing (vlprompt data prepare --dataset NAME --data-root {args.data_root})")
    # Toy datasets are generated on first use (deterministically): list those this root already holds.
    generated = [info.name for info in TOY_DATASETS
                 if os.path.isfile(os.path.join(os.path.expanduser(args.data_root), info.name, "split.json"))]
    print(f"toy datasets generated here: {', '.join(generated) if generated else 'none'} (the others are "
          f"generated on first use; vlprompt data verify --dataset NAME checks one)")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    import warnings

    from vlprompt.data.fewshot import (  # imports torch
        FewShotWarning,
        items_to_json,
        sample_few_shot,
        short_classes,
        shortfall_message,
    )

    info, splits = _build(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewShotWarning)  # printed below as one line
        subset = sample_few_shot(splits, args.shots, args.seed, cache_dir=args.cache_dir)
    short = short_classes(subset, args.shots)
    if short:
        print(f"warning: {shortfall_message(subset, args.shots, short)}", file=sys.stderr)
    result = {"dataset": info.name, "shots": args.shots, "seed": args.seed, "short_classes": short,
              "train": items_to_json(subset.train)}
    if splits.sample_val:
        result["val"] = items_to_json(subset.val)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as file:
            file.write(text + "\n")
        val = f" + {len(result['val'])} val" if "val" in result else ""
        print(f"wrote {len(result['train'])} train{val} items to {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from vlprompt.data.prepare import ExtractLimits, MissingFiles, prepare

    try:
        limits = ExtractLimits(max_bytes=args.max_extract_size, max_ratio=args.max_extract_ratio)
        result = prepare(args.dataset, args.data_root, args.sources, download=args.download, timeout=args.timeout,
                         log=print, limits=limits)
    except MissingFiles as missing:
        if args.sources or args.download:
            raise
        print(f"{args.dataset} is not prepared under {os.path.abspath(os.path.expanduser(args.data_root))}.")
        print(missing.instructions)
        return 1
    print(f"{result.dataset}: {result.action} in {result.folder}")
    return run_verify(argparse.Namespace(dataset=args.dataset, data_root=args.data_root, option=[]))
