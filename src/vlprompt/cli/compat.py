"""``vlprompt import-original``: an original checkpoint → our ``prompts.safetensors`` (tensors + JSON header)."""

from __future__ import annotations

import argparse
import json
import os

from vlprompt.cli import add_alias, defer_options, parse_key_values

PLACEHOLDER_CLASS = "object"  # builds the method when no classes are given (only shapes matter then)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-original",
        help="convert a checkpoint of the original code (CoOp, CoCoOp, PLOT, MaPLe, ALIGN, IVLP, PromptSRC, VPT) "
             "to a prompts.safetensors file, without executing code from it",
    )
    defer_options(parser, add_source_option)
    parser.add_argument("--checkpoint", required=True, help="the original file, e.g. .../model.pth.tar-5")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    # nargs="+": the earlier spelling `--classes a b` still works for one release (joined as a,b)
    parser.add_argument("--classes", nargs="+", metavar="NAMES",
                        help="class names: a,b,c or a text file with one name per line (needed for class-specific "
                        "CoOp context; recorded in the header)")
    add_alias(parser, "--classes-file", "--classes")
    parser.add_argument("--backbone", default="ViT-B-16-quickgelu",
                        help="architecture the prompts were trained on; only its shapes are used "
                             "(default: ViT-B-16-quickgelu, the released checkpoints')")
    parser.add_argument("--method-option", dest="option", action="append", default=[], metavar="KEY=VALUE",
                        help="method option overriding what the checkpoint implies, e.g. text_ctx_init=null "
                        "(repeatable; as in `vlprompt import`)")
    add_alias(parser, "--option", "--method-option")  # --option means a dataset option in eval and data
    parser.set_defaults(func=run_import)


def add_source_option(parser: argparse.ArgumentParser) -> None:
    """``--from SOURCE`` (earlier spelling ``--source``): the original code base, shared by ``import-original`` and
    ``import``. Deferred by the callers: the names come from vlprompt.compat.mappings, which imports torch."""
    from vlprompt.compat.mappings import SOURCES

    parser.add_argument("--from", dest="source", required=True, choices=SOURCES,
                        help="the original code base ('align' = the MMP trainer)")
    add_alias(parser, "--source", "--from")


def _classnames(args: argparse.Namespace) -> list[str] | None:
    from vlprompt.cli.use import read_classnames

    return read_classnames(",".join(args.classes)) if args.classes else None


def run_import(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from vlprompt.weights import load_clip
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
