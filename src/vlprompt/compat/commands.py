"""``vlprompt import-original``: an original checkpoint → our ``prompts.safetensors`` (tensors + JSON header)."""

from __future__ import annotations

import argparse
import json
import os

from vlprompt.compat.mappings import SOURCES
from vlprompt.cli import parse_key_values
from vlprompt.errors import ConfigError

PLACEHOLDER_CLASS = "object"  # builds the method when no classes are given (only shapes matter then)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-original",
        help="convert a checkpoint of the original code (CoOp, CoCoOp, PLOT, MaPLe, ALIGN, IVLP, PromptSRC, VPT) "
             "to a prompts.safetensors file, without executing code from it",
    )
    parser.add_argument("--source", required=True, choices=SOURCES, help="original code base ('align' = MMP)")
    parser.add_argument("--checkpoint", required=True, help="the original file, e.g. .../model.pth.tar-5")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--classes", nargs="+", help="class names (needed for class-specific CoOp context; "
                        "recorded in the header)")
    parser.add_argument("--classes-file", help="a text file with one class name per line")
    parser.add_argument("--backbone", default="ViT-B-16-quickgelu",
                        help="architecture the prompts were trained on; only its shapes are used "
                             "(default: ViT-B-16-quickgelu, the released checkpoints')")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="method option overriding what the checkpoint implies, e.g. text_ctx_init=null")
    parser.set_defaults(func=run_import)


def _classnames(args: argparse.Namespace) -> list[str] | None:
    if args.classes_file:
        if not os.path.isfile(args.classes_file):
            raise ConfigError(f"--classes-file {args.classes_file} does not exist")
        with open(args.classes_file, encoding="utf-8") as handle:
            return [line.strip() for line in handle if line.strip()]
    return args.classes


def run_import(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from vlprompt.backbone import load_clip
    from vlprompt.compat.convert import read_original

    classnames = _classnames(args)
    options = parse_key_values(args.option)
    original = read_original(args.source, args.checkpoint)
    clip = load_clip(args.backbone)
    method = original.build(clip, classnames or [PLACEHOLDER_CLASS], **options)
    metadata = {
        "method": method.name,
        "options": method.options,
        "backbone": clip.name,
        "classnames": classnames,
        "template": method.template,
        "imported_from": {"source": args.source, "checkpoint": os.path.abspath(args.checkpoint),
                          "epoch": original.epoch, "ignored_tensors": len(original.ignored),
                          "not_loaded_objects": original.not_loaded},
    }
    tensors = {name: tensor.contiguous() for name, tensor in method.prompt_state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(tensors, args.out, metadata={"vlprompt": json.dumps(metadata, sort_keys=True)})
    print(f"{args.out}: {method.name} ({len(tensors)} tensors) from {args.source} epoch {original.epoch}; "
          f"ignored {len(original.ignored)} tensors (class buffers, frozen CLIP weights)")
    return 0
