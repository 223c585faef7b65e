"""``vlprompt toyworld pretrain | materialize | zeroshot``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlprompt.cli import add_alias, add_threads_option, defer_options, resolve_threads


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``toyworld`` command and its sub-commands to the ``vlprompt`` parser."""
    parser = subparsers.add_parser(
        "toyworld",
        help="the generated toy world and its tiny pretrained CLIP",
        description="The generated toy world and its tiny CLIP: pretrain it, write datasets, check zero-shot.",
    )
    parser.set_defaults(func=lambda args: parser.print_help() or 1)
    commands = parser.add_subparsers(dest="toyworld_command", metavar="<subcommand>")

    pretrain = commands.add_parser(
        "pretrain",
        help="contrastively pretrain the toy CLIP on generated image-caption pairs",
        description="Pretrain the toy CLIP (photo domain, held-out compositions excluded). Resumable: re-run the "
        "same command after an interruption.",
    )
    defer_options(pretrain, _pretrain_options)  # the defaults live in PretrainConfig, whose module imports torch
    pretrain.set_defaults(func=_pretrain)

    materialize = commands.add_parser(
        "materialize",
        help="write toy datasets as PNG folders with CoOp-format split files",
        description="Write toy datasets under ROOT/<name>/ (images/ and split.json). Idempotent.",
    )
    defer_options(materialize, _dataset_names)  # vlprompt.toyworld.world imports numpy
    materialize.add_argument("--data-root", dest="root", type=Path, required=True,
                             help="folder that receives one folder per dataset (the data root of train and run)")
    add_alias(materialize, "--root", "--data-root")
    defer_options(materialize, _size_options)
    materialize.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    materialize.set_defaults(func=_materialize)

    zeroshot = commands.add_parser("zeroshot", help="zero-shot accuracy of the shipped toy CLIP (or one's own)")
    zeroshot.add_argument("--pretrained", type=Path, metavar="DIR",
                          help="a toy CLIP written by `vlprompt toyworld pretrain --output-dir DIR` (the folder or "
                          "its toyclip.safetensors; default: the shipped one)")
    zeroshot.add_argument("--n-per-class", type=int, default=50, help="generated test images per class")
    zeroshot.add_argument("--seed", type=int, default=0, help="generation seed of the test images (default 0)")
    zeroshot.add_argument("--probe", action="store_true",
                          help="also a 16-shot linear probe on the same frozen image features, per dataset of the "
                          "downstream suite: what the features hold beyond zero-shot")
    zeroshot.set_defaults(func=_zeroshot)


def _dataset_names(parser: argparse.ArgumentParser) -> None:
    from vlprompt.toyworld.world import DATASETS

    parser.add_argument("names", nargs="+", choices=[*DATASETS, "all"], metavar="NAME",
                        help=f"datasets to write, or 'all': {', '.join(DATASETS)}")


def _size_options(parser: argparse.ArgumentParser) -> None:
    from vlprompt.toyworld.materialize import DEFAULT_PER_CLASS

    for split in ("train", "val", "test"):
        parser.add_argument(f"--n-{split}", type=int, default=DEFAULT_PER_CLASS[split],
                            help=f"{split} images per class (default {DEFAULT_PER_CLASS[split]}, as train and run "
                            "read a toy dataset)")


def _pretrain_options(parser: argparse.ArgumentParser) -> None:
    from vlprompt.toyworld.pretrain import PretrainConfig

    default = PretrainConfig()
    parser.add_argument("--steps", type=int, default=default.steps, help="optimisation steps")
    parser.add_argument("--batch-size", type=int, default=default.batch_size, help="pairs per step")
    parser.add_argument("--lr", type=float, default=default.lr, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=default.warmup_steps, help="linear warmup steps")
    parser.add_argument("--weight-decay", type=float, default=default.weight_decay, help="AdamW weight decay")
    parser.add_argument("--seed", type=int, default=default.seed, help="seeds the init and every batch")
    parser.add_argument("--no-extra-colors", dest="extra_colors", action="store_false",
                        help="draw only the six class colors (by default pretraining also shows every shape in eight "
                        "colors no dataset uses, so that shape is not learned through color)")
    add_threads_option(parser)
    parser.add_argument("--device", default=default.device, help="cpu or cuda")
    parser.add_argument(
        "--work-dir", type=Path, default=default.work_dir, help="resume checkpoint and log (default: %(default)s)"
    )
    parser.add_argument(
        "--output-dir", type=Path, default=default.output_dir,
        help="where toyclip.safetensors and toyclip.json go (default: %(default)s/ in the working directory; never "
        "inside the installed package); use them with --backbone toy --pretrained DIR",
    )


def _outside_the_package(option: str, folder: Path) -> None:
    """A :class:`ConfigError` if ``folder`` is inside the installed vlprompt package (its shipped weights)."""
    import vlprompt
    from vlprompt.errors import ConfigError

    package = Path(vlprompt.__file__).resolve().parent
    target = folder.expanduser().resolve()
    if target == package or package in target.parents:
        raise ConfigError(f"{option} {folder} is inside the installed vlprompt package ({package}), whose shipped "
                          "toy weights every toy command uses; choose a folder outside it (the result loads with "
                          "--backbone toy --pretrained DIR)")


def _pretrain(args: argparse.Namespace) -> int:
    from vlprompt.toyworld.pretrain import PretrainConfig, pretrain

    _outside_the_package("--output-dir", args.output_dir)
    _outside_the_package("--work-dir", args.work_dir)
    config = PretrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, seed=args.seed, extra_colors=args.extra_colors, device=args.device,
        work_dir=args.work_dir, output_dir=args.output_dir,
        threads=args.threads or resolve_threads(None),  # None: parsed outside main()
    )
    pretrain(config, log=lambda message: print(message, flush=True))
    return 0


def _materialize(args: argparse.Namespace) -> int:
    from vlprompt.toyworld.materialize import materialize
    from vlprompt.toyworld.world import DATASETS

    names = list(DATASETS) if "all" in args.names else args.names
    for name in names:
        path = materialize(name, args.root, args.n_train, args.n_val, args.n_test, args.seed)
        print(path)
    return 0


def _zeroshot(args: argparse.Namespace) -> int:
    from vlprompt.weights import toy_weights_folder
    from vlprompt.toyworld.model import load_toy_clip
    from vlprompt.toyworld.zeroshot import evaluate_zero_shot

    model, _ = load_toy_clip(toy_weights_folder(args.pretrained))
    if args.probe:
        from vlprompt.toyworld.zeroshot import evaluate_probe_gaps

        print(json.dumps(evaluate_probe_gaps(model, n_per_class=args.n_per_class, seed=args.seed), indent=2))
        return 0
    print(json.dumps(evaluate_zero_shot(model, n_per_class=args.n_per_class, seed=args.seed), indent=2))
    return 0
