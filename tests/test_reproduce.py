"""`vlprompt reproduce` end to end on a generated DTD tree (the real split file, tiny images, tiny CLIP), resume,
the comparison report against the stored reference numbers, presets, and the parallel runner's wiring."""

import csv
import json
import sys
import types
from pathlib import Path

import pytest
from conftest_data import make_split_tree

from vlprompt.experiments import reference, reproduce
from vlprompt.cli import main
from vlprompt.errors import ConfigError
from vlprompt.experiments.comparison import MIN_TOLERANCE, STD_FACTOR, compare
from vlprompt.experiments.results import Stat, harmonic_mean

# ALIGN at 16 shots on DTD: the only few-shot cells with a per-dataset published number are ALIGN's 16-shot ones.
# The tiny settings (1 prompt per side, no token level, 1 epoch, 2 steps) keep each run to seconds on a CPU.
TINY = ["--backbone", "tiny", "--pretrained", "none", "--device", "cpu", "--quiet", "--no-plots",
        "--set", "optim.epochs=1", "--set", "data.batch_size=376", "--set", "data.num_workers=0",
        "--set", "eval.batch_size=500", "--set", "method.options.n_text_prompts=1",
        "--set", "method.options.n_visual_prompts=1", "--set", "method.options.beta=0"]


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    base = tmp_path_factory.mktemp("reproduce")
    make_split_tree(base / "data", "dtd")
    args = ["reproduce", "align-fewshot", "--methods", "align", "--datasets", "dtd", "--shots", "16",
            "--seeds", "1,2", "--data-root", str(base / "data"), "--output", str(base / "runs"),
            "--set", f"data.cache_dir={base / 'cache'}", *TINY]
    assert main(args) == 0
    return base, args


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_reproduce_runs_the_grid_and_compares_every_cell_with_the_reference(reproduced, capsys):
    base, _ = reproduced
    runs = [json.loads((base / "runs/few_shot/dtd/align@tiny/shots_16" / f"seed_{s}/results.json").read_text())
            for s in (1, 2)]
    assert [(r["method"], r["dataset"], r["shots"], r["seed"], r["preset"]) for r in runs] == [
        ("align", "dtd", 16, 1, "default"), ("align", "dtd", 16, 2, "default")]
    out = base / "runs/reproduce/align-fewshot"
    assert {"report.md", "few_shot.csv", "compare_align-fewshot.md", "compare_align-fewshot.csv"} <= {
        p.name for p in out.iterdir()}
    rows = read_csv(out / "compare_align-fewshot.csv")
    table = reference.load("align-fewshot")
    assert [(r["dataset"], r["method"], r["shots"], r["metric"]) for r in rows] == [
        ("dtd", "align", "16", "accuracy"), ("average", "align", "16", "accuracy")]
    dtd, average = rows
    ours = Stat.of([r["metrics"]["accuracy"] for r in runs])
    assert float(dtd["paper"]) == table.value("align", "dtd", 16) == 71.40 and dtd["paper_status"] == "published"
    assert float(dtd["ours_mean"]) == pytest.approx(ours.mean) and float(dtd["ours_std"]) == pytest.approx(ours.std)
    assert dtd["ours_seeds"] == "2" and float(dtd["diff"]) == pytest.approx(ours.mean - 71.40)
    tolerance = max(STD_FACTOR * ours.std, MIN_TOLERANCE)
    assert dtd["flag"] == ("outside" if abs(ours.mean - 71.40) > tolerance else "ok")
    assert dtd["source"] == "d1" and dtd["source_url"] == "https://arxiv.org/abs/2309.13847"
    # the 11-dataset average: the paper's value is listed, ours needs all 11 datasets
    assert float(average["paper"]) == table.value("align", "average", 16) == 83.39
    assert average["paper_status"] == "derived" and average["ours_mean"] == "" and average["flag"] == ""
    assert "ran 1 of 11 datasets" in average["note"]
    markdown = (out / "compare_align-fewshot.md").read_text()
    assert "| dtd | align | 16 | accuracy |" in markdown and "| 71.40 |" in markdown
    assert "83.39 *(derived)*" in markdown and "arxiv.org/abs/2309.13847" in markdown
    assert (out / "report.md").read_text().count("Ours vs paper") == 1


def test_reproduce_again_skips_finished_runs_and_report_compare_gives_the_same_table(reproduced, tmp_path, capsys):
    base, args = reproduced
    results = base / "runs/few_shot/dtd/align@tiny/shots_16/seed_1/results.json"
    before = results.stat().st_mtime_ns
    assert main(["reproduce", *args[1:], "--dry-run"]) == 0
    assert capsys.readouterr().out.count("finished ") == 2
    assert main(args) == 0
    assert results.stat().st_mtime_ns == before  # read back, not run again
    # the same comparison from `vlprompt report --compare paper`
    assert main(["report", str(base / "runs"), "--out", str(tmp_path), "--compare", "paper", "--table",
                 "align-fewshot", "--no-plots"]) == 0
    assert "Ours vs paper" in capsys.readouterr().out
    assert read_csv(tmp_path / "compare_align-fewshot.csv") == read_csv(
        base / "runs/reproduce/align-fewshot/compare_align-fewshot.csv")
    assert main(["report", str(base / "runs"), "--table", "align-fewshot"]) == 2
    assert "--table needs --compare paper" in capsys.readouterr().err


def test_list_explain_estimate(capsys):
    assert main(["reproduce", "--list"]) == 0
    listing = capsys.readouterr().out
    for name in ("align-fewshot", "coop-fewshot", "maple-base2new", "maple-xd (alias xd)", "maple-dg (alias dg)"):
        assert name in listing
    assert "825 runs" in listing  # 5 methods x 11 datasets x 5 shots x 3 seeds
    assert main(["reproduce", "align-fewshot", "--preset", "paper", "--methods", "align,maple", "--explain"]) == 0
    explained = capsys.readouterr().out
    assert "align (ALIGN): runs with preset 'paper'" in explained
    assert "maple (MaPLe): runs with preset 'default' (no paper variant" in explained
    assert "optim.lr: 0.0025 (code) -> 0.0035 (paper) [every dataset but sun397]" in explained
    assert "optim.epochs: 30 (code) -> 10 (paper) [every dataset but imagenet, shots 1]" in explained
    assert "95.69" in explained and "missing reference cells" not in explained  # Table D.1 is complete
    assert main(["reproduce", "xd", "--estimate"]) == 0
    estimate = capsys.readouterr().out
    assert "GPU-hours" in estimate and "not a measurement" in estimate
    assert main(["reproduce"]) == 2 and "name a table" in capsys.readouterr().err


def test_plan_presets_and_restrictions():
    paper = reproduce.plan("align-fewshot", preset="paper", methods=["coop", "align"],
                           datasets=["dtd", "custom_folder"], shots=[1], seeds=[1])
    assert paper.presets == {"coop": "default", "align": "paper"}  # coop has no paper variant
    assert [(c.method.name, c.preset, c.data.dataset) for c in paper.configs] == [
        ("coop", "default", "dtd"), ("coop", "default", "custom_folder"), ("align", "paper", "dtd"),
        ("align", "paper", "custom_folder")]
    assert paper.extra_datasets == ["custom_folder"]  # runs, without a published number
    align = {c.data.dataset: c for c in paper.configs if c.method.name == "align"}
    assert align["dtd"].optim.lr == 0.0035 and align["dtd"].optim.epochs == 10
    code = reproduce.plan("align-fewshot", preset="code", methods=["align"], datasets=["dtd"], shots=[1], seeds=[1])
    assert code.configs[0].preset == "default" and code.configs[0].optim.epochs == 30
    full = reproduce.plan("maple-base2new")
    assert len(full.configs) == 7 * 11 * 3 and {c.protocol for c in full.configs} == {"base2new"}
    assert {c.data.dataset for c in reproduce.plan("dg").configs} == {"imagenet"}
    with pytest.raises(ConfigError, match="no published numbers for method.*cocoop"):
        reproduce.plan("align-fewshot", methods=["cocoop"])
    with pytest.raises(ConfigError, match="--preset must be one of"):
        reproduce.plan("align-fewshot", preset="fast")


def test_workers_go_through_the_sweep_runner(monkeypatch):
    configs = reproduce.plan("align-fewshot", methods=["align"], datasets=["dtd"], shots=[16], seeds=[1, 2]).configs
    calls = []

    def fake_run_sweep(configs, *, workers=None, overwrite=False, **_):
        calls.append((len(configs), workers, overwrite))
        return [types.SimpleNamespace(status="done", run_dir="a"), types.SimpleNamespace(
            status="failed", run_dir="b", returncode=1, log_file="b.log")]

    monkeypatch.setitem(sys.modules, "vlprompt.experiments.sweep", types.SimpleNamespace(run_sweep=fake_run_sweep))
    assert reproduce.run_grid(configs, workers=2) == ["b"]  # failures are returned, not hidden
    assert reproduce.run_grid(configs, workers=None, overwrite=True) == ["b"]  # None: one worker per GPU
    assert calls == [(2, 2, False), (2, None, True)]
    # without the parallel runner: one after another in this process
    sequential = []
    monkeypatch.setitem(sys.modules, "vlprompt.experiments.sweep", None)
    monkeypatch.setattr("vlprompt.experiments.protocols.sweep", lambda configs, overwrite=False: sequential.append(len(configs)))
    assert reproduce.run_grid(configs, workers=4) == [] and sequential == [2]


def result(method, dataset, seed, metrics, protocol="few_shot", shots=16, preset="default"):
    return {"protocol": protocol, "method": method, "dataset": dataset, "shots": shots, "seed": seed,
            "preset": preset, "tag": "", "metrics": metrics}


def test_compare_averages_flags_and_base_to_new_h():
    table = reference.load("align-fewshot")
    # ALIGN on all 11 datasets, 2 seeds: the paper's value plus 0.4 / -0.4 per dataset -> averages equal
    results = [result("align", d, s, {"accuracy": table.value("align", d, 16) + (0.4 if s == 1 else -0.4)})
               for d in table.datasets for s in (1, 2)]
    results += [result("align", "dtd", s, {"accuracy": 60.0 + s}, preset="paper") for s in (1, 2)]
    rows = {(r.label, r.dataset): r for r in compare(results, table).rows}
    dtd = rows[("align", "dtd")]
    assert dtd.ours.std == pytest.approx(0.4) and dtd.tolerance == MIN_TOLERANCE and dtd.flag == "ok"
    average = rows[("align", "average")]
    assert average.ours.mean == pytest.approx(sum(table.value("align", d, 16) for d in table.datasets) / 11)
    assert average.ours.std == pytest.approx(0.4) and average.ours.n == 2 and average.flag == "ok"
    paper = rows[("align-paper", "dtd")]  # the paper preset's runs are compared with the same published cell
    assert paper.paper.value == 71.40 and paper.diff == pytest.approx(61.5 - 71.40) and paper.flag == "outside"
    assert rows[("align-paper", "average")].ours is None and "ran 1 of 11" in rows[("align-paper", "average")].note
    # base-to-new: the average row's H is H of the mean base and mean new
    b2n = reference.load("maple-base2new")
    runs = [result("maple", d, 1, {"base": 80.0 + i, "new": 70.0 - i, "hm": harmonic_mean(80.0 + i, 70.0 - i)},
                   protocol="base2new") for i, d in enumerate(b2n.datasets)]
    rows = {(r.dataset, r.metric): r for r in compare(runs, b2n).rows}
    base, new = sum(80.0 + i for i in range(11)) / 11, sum(70.0 - i for i in range(11)) / 11
    assert rows[("average", "hm")].ours.mean == pytest.approx(harmonic_mean(base, new))
    assert rows[("average", "hm")].paper.value == 78.55 and rows[("average", "base")].paper.value == 82.28
    assert rows[("dtd", "base")].paper is None and rows[("dtd", "base")].flag == ""  # not sourced per dataset


def test_compare_transfer_tables_use_the_metrics_the_runs_measured():
    dg = reference.load("dg")
    runs = [result("maple", "imagenet", s, {"source": 70.0, "imagenet_v2": 64.0, "imagenet_a": 51.0 + s,
                                            "average": 57.5}, protocol="cross_domain") for s in (1, 2, 3)]
    rows = {r.metric: r for r in compare(runs, dg).rows}
    assert set(rows) == set(dg.metrics)  # the sketch / R cells are listed with their paper value, ours missing
    assert rows["imagenet_sketch"].ours is None and rows["imagenet_sketch"].paper.value == 49.15
    assert rows["imagenet_a"].paper.status == "secondary" and rows["imagenet_a"].ours.mean == pytest.approx(53.0)
    assert rows["source"].flag == "ok" and rows["source"].paper.status == "unverified"


def test_comparison_plot_and_markdown(tmp_path):
    pytest.importorskip("matplotlib")
    table = reference.load("align-fewshot")
    results = [result("align", "dtd", s, {"accuracy": 70.0 + s}) for s in (1, 2)]
    comparison = compare(results, table)
    assert comparison.plot(str(tmp_path / "c.png")) and Path(tmp_path / "c.png").stat().st_size > 1000
    assert "2 cells: 1 compared (1 within, 0 outside" in comparison.markdown()
