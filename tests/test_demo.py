"""The reduced demo (base-to-new on the toy world, zero-shot and CoOp) lands within documented bounds.

Bounds (docs/toyworld.md): on ``toy_objects_sketch`` the shipped toy CLIP's zero-shot base and new accuracies are
at least three times chance (1/18; measured 27.8 and 30.6), CoOp's training loss goes down, and CoOp beats
zero-shot on the base classes by at least half of the measured lead (+18.3 points: 27.8 -> 46.1). A change that breaks the backbone, the
data, the engine or the schedule falls outside them; tests/test_learning.py checks learning itself with margins.
"""

import json

from vlprompt.cli.demo import QUICK, run_demo


def test_quick_demo_results_within_documented_bounds(tmp_path):
    markdown, written = run_demo(str(tmp_path / "demo"), QUICK)
    results = {json.loads(p.read_text())["method"]: json.loads(p.read_text())
               for p in (tmp_path / "demo" / "runs").rglob("results.json")}
    assert set(results) == {"zeroshot", "coop"}
    zero_shot, coop = results["zeroshot"]["metrics"], results["coop"]["metrics"]
    assert zero_shot["base"] >= 17 and zero_shot["new"] >= 17  # chance is 5.6 %
    assert coop["base"] >= zero_shot["base"] + 9.15
    losses = [json.loads(line)["loss"] for line in
              next((tmp_path / "demo" / "runs").rglob("coop-demo*/**/metrics.jsonl")).read_text().splitlines()]
    assert losses[-1] < losses[0]
    assert "toy_objects_sketch" in markdown and any(path.endswith(".png") for path in written)
