"""Command-line tools for using trained prompts: ``vlprompt predict``, ``export``, ``explain`` and ``import``.

Examples::

    vlprompt predict --run runs/few_shot/dtd/align/shots_16/seed_1 --images photos/ extra.jpg \\
        --classes cat,dog,bird --top-k 2 --csv predictions.csv
    vlprompt export --run runs/few_shot/dtd/align/shots_16/seed_1 --out dtd_align.safetensors
    vlprompt explain --run dtd_align.safetensors --image photo.jpg --classes classes.txt --out plan.png
    vlprompt import --from maple --checkpoint model.pth.tar-5 --dataset imagenet --data-root ~/data \\
        --out runs/imported/maple_imagenet
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from vlprompt.cli import defer_options, parse_key_values
from vlprompt.cli.compat import add_source_option
from vlprompt.errors import ConfigError, VlpromptError


def register(subparsers: argparse._SubParsersAction) -> None:
    predict = subparsers.add_parser(
        "predict", help="classify images with trained prompts (a run folder or a prompts file)",
        description="Classify image files (or every image in the given folders) among any class names with the "
                    "prompts of a run folder or prompts file. Unreadable images are reported on stderr and "
                    "skipped (--strict: stop with an error instead).")
    _source_arguments(predict)
    predict.add_argument("--images", nargs="+", required=True, metavar="PATH",
                         help="image files and/or folders (searched recursively for image files)")
    predict.add_argument("--classes", help="class names: a,b,c or a text file with one name per line "
                                           "(default: the classes the prompts were trained on)")
    predict.add_argument("--top-k", type=int, default=1, help="show the k most probable classes (default 1)")
    predict.add_argument("--csv", help="also write the predictions to this CSV file")
    predict.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    predict.add_argument("--strict", action="store_true", help="fail on the first unreadable image")
    predict.set_defaults(func=run_predict)

    export = subparsers.add_parser(
        "export", help="write the learned prompt tensors + a JSON header to one small .safetensors file",
        description="Export the prompts of a run folder as a self-describing prompts.safetensors file (learned "
                    "tensors only, JSON header with method, options, backbone, config, training class names and "
                    "library version; no pickles). `vlprompt.load`, predict, explain and eval accept it.")
    export.add_argument("--run", required=True, help="a run folder (or a prompts file to re-header)")
    export.add_argument("--out", required=True, help="output .safetensors file")
    export.set_defaults(func=run_export)

    explain = subparsers.add_parser(
        "explain", help="draw what the model matched: token-level transport plans (ALIGN, PLOT) or similarities",
        description="For ALIGN/PLOT, render the token-level transport plan of the image against a class (a heat "
                    "map over the patches for every word token and prompt) and the prompt-level plan; for other "
                    "methods the image-text similarity per prompt. Saves a PNG.")
    _source_arguments(explain)
    explain.add_argument("--image", required=True, help="the image file")
    explain.add_argument("--classes", help="class names: a,b,c or a text file (default: the training classes)")
    explain.add_argument("--class", dest="classname", help="the class to explain (default: the predicted one)")
    explain.add_argument("--out", required=True, help="output PNG file")
    explain.set_defaults(func=run_explain)

    imports = subparsers.add_parser(
        "import", help="turn a checkpoint of the original code (CoOp, MaPLe, ALIGN, ...) into a run folder",
        description="Read a checkpoint of an original code base without executing code from it and write a run "
                    "folder (config.json + prompts.safetensors, no results) that `vlprompt eval`, predict, "
                    "explain and export accept.")
    defer_options(imports, add_source_option)
    imports.add_argument("--checkpoint", required=True, help="the original file, e.g. .../model.pth.tar-5")
    imports.add_argument("--dataset", help="the dataset the run evaluates on (class names and template read "
                                           "from it unless --classes is given)")
    imports.add_argument("--data-root", help="data root of --dataset (custom_folder: the dataset folder)")
    imports.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                         help="dataset option (custom datasets), value read as YAML")
    imports.add_argument("--classes", help="class names: a,b,c or a text file (the training classes)")
    imports.add_argument("--out", required=True, help="the run folder to write")
    imports.add_argument("--backbone", default="ViT-B-16-quickgelu",
                         help="architecture the prompts were trained on (default: ViT-B-16-quickgelu, the "
                              "released checkpoints')")
    imports.add_argument("--pretrained", default="openai",
                         help="its weights: open_clip tag, local file or 'none' (default openai)")
    imports.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                         help="method option overriding what the checkpoint implies, e.g. text_ctx_init=null")
    imports.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="config value stored with the run, e.g. --set data.num_workers=0 --set device=cpu")
    imports.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    imports.set_defaults(func=run_import)


def _source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a run folder or a prompts .safetensors file")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    parser.add_argument("--backbone", help="architecture (default: the one stored with the prompts)")
    parser.add_argument("--pretrained", help="weights: open_clip tag, local file or 'none' (default: stored)")


def read_classnames(text: str | None) -> list[str] | None:
    """``a,b,c`` or a text file with one class name per line (blank lines and ``#`` comments ignored)."""
    from vlprompt.inference.predictor import EmptyClassListError

    if text is None:
        return None
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as handle:
            names = [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
        where = f"class file {text}"
    elif text.lower().endswith((".txt", ".csv", ".lst")):
        raise ConfigError(f"class file {text} does not exist")
    else:
        names = [part.strip() for part in text.split(",") if part.strip()]
        where = "--classes"
    if not names:
        raise EmptyClassListError(f"the class list is empty ({where}); give at least one class name")
    return names


def _load(args: argparse.Namespace):
    import vlprompt

    return vlprompt.load(args.run, device=args.device, backbone=args.backbone, pretrained=args.pretrained)


# --------------------------------------------------------------------------------------------- predict


def run_predict(args: argparse.Namespace) -> int:
    from vlprompt.inference.predictor import find_images

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    classnames = read_classnames(args.classes)
    paths = find_images(args.images)
    predictor = _load(args)
    result = predictor.predict(paths, classnames, batch_size=args.batch_size, skip_unreadable=not args.strict)
    for path in result.skipped:
        print(f"vlprompt predict: skipped unreadable image {path}", file=sys.stderr)
    if not len(result):
        from vlprompt.inference.predictor import UnreadableImageError

        raise UnreadableImageError(result.skipped[0], f"none of the {len(result.skipped)} images could be read")
    k = min(args.top_k, len(result.classnames))
    top = result.top_k(k)
    header = ["image", "prediction", "probability"] + (["next"] if k > 1 else [])
    rows = [[path, ranked[0][0], f"{ranked[0][1]:.4f}"]
            + ([", ".join(f"{name} {p:.4f}" for name, p in ranked[1:])] if k > 1 else [])
            for path, ranked in zip(result.sources, top)]
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    if args.csv:
        folder = os.path.dirname(os.path.abspath(args.csv))
        os.makedirs(folder, exist_ok=True)
        with open(args.csv, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image"] + [f"{what}_{rank}" for rank in range(1, k + 1)
                                         for what in ("label", "probability")])
            for path, ranked in zip(result.sources, top):
                writer.writerow([path] + [value for name, p in ranked for value in (name, f"{p:.6f}")])
        print(f"wrote {args.csv}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------- export


def run_export(args: argparse.Namespace) -> int:
    from vlprompt.inference.predictor import export_prompts, read_prompts

    header = export_prompts(args.run, args.out)
    tensors, _ = read_prompts(args.out)
    count = sum(t.numel() for t in tensors.values())
    print(f"{args.out}: {header['method']} prompts for backbone {header.get('backbone')}, {len(tensors)} tensors "
          f"({count} values), {os.path.getsize(args.out) / 1024:.1f} KiB")
    return 0


# --------------------------------------------------------------------------------------------- explain


def run_explain(args: argparse.Namespace) -> int:
    from vlprompt.inference.explain import explain, render

    classnames = read_classnames(args.classes)
    predictor = _load(args)
    explanation = explain(predictor, args.image, classnames, args.classname)
    render(explanation, args.out)
    e = explanation
    what = {"align": "token- and prompt-level transport plans", "plot": "patch-prompt transport plan",
            "similarity": "image-text similarity per prompt"}[e.kind]
    print(f"{e.method}: class '{e.classname}' (probability {float(e.probs[e.class_index]):.4f}, logit "
          f"{float(e.logits[e.class_index]):.4f}); {what} -> {args.out}")
    if e.prompt_plan is not None:
        rows = ["  ".join(f"{float(v):.3f}" for v in row) for row in e.prompt_plan]
        print("prompt-level plan (rows: views, columns: prompts):\n  " + "\n  ".join(rows))
    return 0


# --------------------------------------------------------------------------------------------- import


def _backbone_label(name: str, pretrained: str | None) -> str:
    """The label ``load_clip`` gives this backbone (``name``, ``name/tag`` or ``name/<file name>``)."""
    if pretrained is None:
        return name
    return f"{name}/{os.path.basename(pretrained) if os.sep in pretrained else pretrained}"


def run_import(args: argparse.Namespace) -> int:
    from vlprompt import __version__
    from vlprompt.weights import load_clip
    from vlprompt.compat.convert import read_original
    from vlprompt.engine.checkpoint import atomic_write_text, save_prompts
    from vlprompt.engine.config import RunConfig, merge, parse_override, validate
    from vlprompt.engine.runs import RunFolder

    folder = RunFolder(args.out)
    if os.path.exists(folder.config_file) or os.path.exists(folder.prompts_file):
        if not args.overwrite:
            raise ConfigError(f"{args.out} already holds a run; use --overwrite to replace it")
        folder.clear()
    if not args.dataset and not args.classes:
        raise ConfigError("give --dataset (class names read from it) or --classes (a,b,c or a text file)")
    classnames = read_classnames(args.classes)
    config = RunConfig(tag="imported")
    template = "a photo of a {}."
    if args.dataset:
        from vlprompt.data import build_dataset, dataset_info
        from vlprompt.data.templates import template_for

        template = template_for(args.dataset)
        options = parse_key_values(args.dataset_option, "--dataset-option")
        root = os.path.abspath(os.path.expanduser(args.data_root or config.data.root))
        config.data.dataset, config.data.root, config.data.options = args.dataset, root, options
        info = dataset_info(args.dataset)
        quick = {"check_files": False} if "check_files" in info.options() and "check_files" not in options else {}
        try:
            splits = build_dataset(args.dataset, root, **options, **quick)
        except (VlpromptError, OSError) as error:  # only the class names are needed; --classes can give them
            if classnames is None:
                raise ConfigError(f"cannot read the class names of {args.dataset} under {root} ({error}); give "
                                  f"--data-root or --classes") from None
        else:
            template = splits.template
            classnames = classnames or list(splits.classnames)
    else:
        # No dataset: the run evaluates on a custom_folder tree inside the run folder unless eval is told otherwise.
        config.data.dataset, config.data.root = "custom_folder", os.path.abspath(os.path.join(args.out, "data"))
    pretrained = None if args.pretrained.lower() == "none" else args.pretrained
    config.backbone.name, config.backbone.pretrained = args.backbone, pretrained

    original = read_original(args.source, args.checkpoint)
    clip = load_clip(args.backbone)  # only the shapes matter here; eval/predict load the weights
    method = original.build(clip, classnames, template, **parse_key_values(args.method_option, "--method-option"))
    config.method.name, config.method.options = method.name, dict(method.options)
    values = config.to_dict()
    for text in args.overrides:
        values = merge(values, parse_override(text))
    config = RunConfig.from_dict(values)
    validate(config)

    os.makedirs(folder.path, exist_ok=True)
    atomic_write_text(folder.config_file, json.dumps(config.to_dict(), indent=2) + "\n")
    imported_from = {"source": args.source, "checkpoint": os.path.abspath(args.checkpoint), "epoch": original.epoch,
                     "ignored_tensors": len(original.ignored), "not_loaded_objects": original.not_loaded}
    header = {"format": "vlprompt.prompts/1", "method": method.name, "options": method.options,
              "backbone": _backbone_label(args.backbone, pretrained), "classnames": list(classnames),
              "template": template, "stages": [s.name for s in method.stages()], "vlprompt": __version__,
              "config": config.to_dict(), "imported_from": imported_from}
    save_prompts(folder.prompts_file, method.prompt_state_dict(), header)
    with open(folder.log_file, "a", encoding="utf-8") as handle:
        handle.write(f"imported {method.name} prompts from {args.source} checkpoint {imported_from['checkpoint']} "
                     f"(epoch {original.epoch}); ignored {len(original.ignored)} tensors; "
                     f"{len(original.not_loaded)} pickled objects not loaded\n")
    print(f"{args.out}: {method.name} run imported from {args.source} epoch {original.epoch} "
          f"({len(classnames)} classes, backbone {header['backbone']}); evaluate with `vlprompt eval {args.out}"
          f"{'' if args.dataset else ' --dataset NAME --data-root ROOT'}`")
    return 0
