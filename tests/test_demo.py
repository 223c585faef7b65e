"""The reduced demo (base-to-new on the toy world, zero-shot and CoOp) lands within documented bounds.

Bounds (docs/toyworld.md): on ``toy_objects_sketch`` the shipped toy CLIP's zero-shot base and new accuracies are
at least twice chance (1/18), CoOp's training loss goes down, and CoOp beats zero-shot on the base classes by at
least 3 points (measured: +5 to +7). A change that breaks the backbone, the data, the engine or learning falls
outside them.
"""

import json

from vlprompt.demo import QUICK, run_demo


def test_quick_demo_results_within_documented_bounds(tmp_path):
    markdown, written = run_demo(str(tmp_path / "demo"), QUICK)
    results = {json.loads(p.read_text())["method"]: json.loads(p.read_text())
               for p in (tmp_path / "demo" / "runs").rglob("results.json")}
    assert set(results) == {"zeroshot", "coop"}
    zero_shot, coop = results["zeroshot"]["metrics"], results["coop"]["metrics"]
    assert zero_shot["base"] >= 11 and zero_shot["new"] >= 11  # chance is 5.6 %
    assert coop["base"] >= zero_shot["base"] + 3
    losses = [json.loads(line)["loss"] for line in
              next((tmp_path / "demo" / "runs").rglob("coop-demo@toy/**/metrics.jsonl")).read_text().splitlines()]
    assert losses[-1] < losses[0]
    assert "toy_objects_sketch" in markdown and any(path.endswith(".png") for path in written)
