"""APLe through every protocol of the CLI, like any other method (tiny CLIP, generated image folders)."""

import json

import pytest

from test_cli import common, make_tree
from vlprompt.cli import main


@pytest.mark.parametrize("protocol", ["few_shot", "base2new", "cross_dataset", "cross_domain"])
def test_aple_runs_through_every_protocol(tmp_path, protocol):
    tree = make_tree(tmp_path / "data")
    out = tmp_path / "runs"
    argv = ["run", protocol, "--methods", "aple", "--datasets", "custom_folder", "--shots", "2", "--seeds", "1",
            *common(tree, out, "--set", "optim.epochs=1", "--set", "method.options.text_depth=2",
                    "--set", "method.options.visual_depth=2")]
    if protocol.startswith("cross"):
        argv += ["--targets", f"custom_folder@{tree}"]
    assert main(argv) == 0
    [results] = [json.loads(p.read_text()) for p in out.rglob("results.json")]
    assert results["method"] == "aple" and results["protocol"] == protocol
    history = [json.loads(line) for line in next(out.rglob("metrics.jsonl")).read_text().splitlines()]
    assert {row.get("stage") for row in history if "stage" in row} == {"language", "vision"}
