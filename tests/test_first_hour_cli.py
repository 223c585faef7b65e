"""The command line as a new user meets it: fast start, help on everything, one spelling per flag, the methods'
options, the thread setting every heavy command shares."""

import argparse
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from vlprompt.cli import DEFAULT_THREADS, CommandParser, apply_threads, build_parser, main, resolve_threads

HEAVY = ("torch", "open_clip", "torchvision")


def command_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """``(command path, parser, help of the command)`` for every command and sub-command, options complete."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if isinstance(sub, CommandParser):
                    sub.complete()
                yield path + (name,), sub, helps.get(name)
                yield from command_parsers(sub, path + (name,))


def visible_options(parser: argparse.ArgumentParser) -> set[str]:
    return {string for action in parser._actions if action.help != argparse.SUPPRESS
            for string in action.option_strings}


def test_version_and_help_do_not_import_torch():
    # `vlprompt --version` and `--help` must answer without importing torch, open_clip or torchvision (seconds on a
    # loaded machine otherwise): a property of the imports, checked in a fresh interpreter.
    code = ("import contextlib, io, sys\n"
            "from vlprompt.cli import build_parser, main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    for argv in (['--version'], ['--help']):\n"
            "        try:\n"
            "            main(argv)\n"
            "        except SystemExit:\n"
            "            pass\n"
            "    build_parser().format_help()\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_every_command_and_option_has_help():
    missing = []
    for path, parser, command_help in command_parsers(build_parser()):
        name = " ".join(path)
        if not command_help:
            missing.append(f"{name} (the command)")
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
        assert "``" not in parser.format_help(), f"`vlprompt {name} --help` shows reStructuredText quotes"
    assert not missing, "no help text: " + ", ".join(missing)


def test_one_spelling_per_flag_across_commands():
    shown = {" ".join(path): visible_options(parser) for path, parser, _ in command_parsers(build_parser())}
    # the data root is --data-root everywhere; the original code base is --from; class names are --classes
    for command, options in shown.items():
        assert not options & {"--root", "--source", "--classes-file"}, (command, options)
    for command in ("train", "run", "eval", "import", "data verify", "data sample", "data status", "data prepare",
                    "toyworld materialize"):
        assert "--data-root" in shown[command], command
    assert "--from" in shown["import"] and "--from" in shown["import-original"]
    # `eval` chooses a class *set* (all/base/new); --classes always means class names
    assert "--class-set" in shown["eval"] and "--classes" not in shown["eval"]
    # --option is a dataset option (eval, data); method options are --method-option (import, import-original)
    assert "--method-option" in shown["import"] and "--method-option" in shown["import-original"]
    assert "--option" not in shown["import-original"]


@pytest.mark.parametrize("old, new", [
    (["data", "verify", "--dataset", "dtd", "--root", "R"], ["data", "verify", "--dataset", "dtd", "--data-root", "R"]),
    (["data", "status", "--root", "R"], ["data", "status", "--data-root", "R"]),
    (["toyworld", "materialize", "toy_colors", "--root", "R"], ["toyworld", "materialize", "toy_colors",
                                                                "--data-root", "R"]),
    (["import-original", "--source", "maple", "--checkpoint", "C", "--out", "O", "--classes-file", "F"],
     ["import-original", "--from", "maple", "--checkpoint", "C", "--out", "O", "--classes", "F"]),
    (["eval", "run", "--classes", "new"], ["eval", "run", "--class-set", "new"]),
    (["bench", "--classes", "10,100"], ["bench", "--num-classes", "10,100"]),
    (["import-original", "--from", "coop", "--checkpoint", "C", "--out", "O", "--option", "text_ctx_init=null"],
     ["import-original", "--from", "coop", "--checkpoint", "C", "--out", "O", "--method-option", "text_ctx_init=null"]),
])
def test_old_spellings_still_parse_as_the_new_ones(old, new):
    parser = build_parser()
    assert vars(parser.parse_args(old)) == vars(parser.parse_args(new))


def test_import_original_reads_classes_as_the_other_commands_do(tmp_path):
    from vlprompt.cli.compat import _classnames

    parser = build_parser()
    (tmp_path / "classes.txt").write_text("golden retriever\n# a comment\ntabby cat\n")
    base = ["import-original", "--from", "coop", "--checkpoint", "C", "--out", "O"]
    comma = _classnames(parser.parse_args(base + ["--classes", "golden retriever,tabby cat"]))
    from_file = _classnames(parser.parse_args(base + ["--classes", str(tmp_path / "classes.txt")]))
    spaced = _classnames(parser.parse_args(base + ["--classes", "golden retriever", "tabby cat"]))  # earlier form
    assert comma == from_file == spaced == ["golden retriever", "tabby cat"]


def test_methods_lists_each_methods_options_with_the_defaults_it_builds_with(tiny_clip, capsys):
    from vlprompt.methods import available, build_method

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    section = out.split("Options and their defaults", 1)[1].split("\n\nBackbones", 1)[0]
    listed = {}
    for entry in re.split(r"\n(?=\S)", section.split(":\n", 1)[1].strip()):
        name, options = entry.split(": ", 1)
        listed[name] = yaml.safe_load("{" + " ".join(options.split()).replace("=", ": ") + "}")
    assert sorted(listed) == available()
    for name in available():
        built = build_method(name, tiny_clip, ["cat", "dog"]).options  # what the builder really used
        assert set(listed[name]) == set(built), name
        # depths are clamped to the tiny backbone's 3 layers when built; every other default is what it used
        for key in set(built) - {"text_depth", "visual_depth"}:
            assert listed[name][key] == built[key], (name, key)
    assert "toy" in out.split("Backbones", 1)[1] and "real photographs" in out


def test_the_bundled_toy_clip_is_named_where_a_new_user_looks():
    parser = build_parser()
    for command in ("train", "run", "sweep", "reproduce", "eval"):
        (train,) = [p for path, p, _ in command_parsers(parser) if path == (command,)]
        (backbone,) = [a for a in train._actions if "--backbone" in a.option_strings]
        assert "'toy'" in backbone.help and "does not recognise real photographs" in backbone.help


HEAVY_COMMANDS = [("train",), ("eval",), ("run",), ("demo",), ("reproduce",), ("sweep",), ("bench",),
                  ("toyworld", "pretrain")]


def test_every_heavy_command_takes_threads_from_one_option():
    parsers = {path: parser for path, parser, _ in command_parsers(build_parser())}
    actions = []
    for path in HEAVY_COMMANDS:
        (threads,) = [a for a in parsers[path]._actions if "--threads" in a.option_strings]
        actions.append((threads.type, threads.default, threads.help))
    assert len(set(actions)) == 1  # the same option everywhere: one mechanism


def test_thread_count_resolution(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(None) == 3 and resolve_threads(2) == 2 and resolve_threads(0) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert resolve_threads(None) == DEFAULT_THREADS
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert resolve_threads(None) == DEFAULT_THREADS
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--threads", "-1"])


def test_main_applies_threads_before_the_command_and_exports_them(monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    before = torch.get_num_threads()
    seen = {}

    def fake_bench(args):  # stands for any heavy command: what does it see when it starts?
        seen.update(threads=args.threads, torch=torch.get_num_threads(), env=os.environ["OMP_NUM_THREADS"])
        return 0

    monkeypatch.setattr("vlprompt.cli.bench.run_bench", fake_bench)
    try:
        assert main(["bench", "--threads", "1"]) == 0
        assert seen == {"threads": 1, "torch": 1, "env": "1"}  # worker processes inherit the environment
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert main(["bench"]) == 0
        assert seen == {"threads": 2, "torch": 2, "env": "2"}  # no option: $OMP_NUM_THREADS
    finally:
        torch.set_num_threads(before)


def test_report_keeps_backbones_apart_and_shows_no_spread_for_one_seed(tmp_path):
    import json

    from vlprompt.experiments.report import build_tables, load_results

    def write(backbone, seed, accuracy):
        folder = tmp_path / backbone / f"seed_{seed}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({
            "protocol": "few_shot", "dataset": "dtd", "method": "coop", "preset": "default", "tag": "", "shots": 4,
            "seed": seed, "metrics": {"accuracy": accuracy}, "backbone": {"name": backbone}}))

    write("toy", 1, 40.0)
    write("toy", 2, 44.0)
    write("ViT-B-16-quickgelu/openai", 1, 60.0)
    (table,) = build_tables(load_results(str(tmp_path)))
    assert table.columns[:3] == ["dataset", "method", "backbone"]
    rows = {row[2]: row[3] for row in table.rows if row[0] == "dtd"}
    assert (rows["toy"].mean, rows["toy"].std) == (42.0, 2.0)  # never averaged with the other backbone's 60
    assert rows["ViT-B-16-quickgelu/openai"].mean == 60.0
    markdown = table.markdown()
    assert "| dtd | coop | toy | 42.00 ± 2.00 |" in markdown
    assert "| dtd | coop | ViT-B-16-quickgelu/openai | 60.00 |" in markdown and "± 0.00" not in markdown
