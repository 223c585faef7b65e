"""Report tables from synthetic results.json files: the papers' averaging, mean ± std, CSV and plots."""

import csv
import json
from pathlib import Path

import pytest

from vlprompt.cli import main
from vlprompt.experiments.report import Stat, build_tables, load_results, write_report


def write_run(root: Path, protocol: str, dataset: str, method: str, seed: int, metrics: dict, shots: int = 16,
              preset: str = "default", tag: str = "", options: dict | None = None) -> None:
    name = "-".join(part for part in (method, "" if preset == "default" else preset, tag) if part)
    folder = root / protocol / dataset / name / f"shots_{shots}" / f"seed_{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({
        "protocol": protocol, "dataset": dataset, "method": method, "preset": preset, "tag": tag, "shots": shots,
        "seed": seed, "metrics": metrics, "method_options": options or {},
    }))


def row(table, *prefix):
    return next(r for r in table.rows if tuple(r[:len(prefix)]) == prefix)


def test_base2new_average_is_h_of_the_mean_base_and_mean_new(tmp_path):
    # per-dataset H values average to something else than H of the averages: the report must use the latter
    data = {"dtd": [(80.0, 50.0), (82.0, 52.0)], "eurosat": [(95.0, 60.0), (93.0, 70.0)]}
    for dataset, seeds in data.items():
        for seed, (base, new) in enumerate(seeds, 1):
            write_run(tmp_path, "base2new", dataset, "coop", seed, {"base": base, "new": new,
                                                                     "hm": 2 * base * new / (base + new)})
    (table,) = build_tables(load_results(str(tmp_path)))
    dtd = row(table, "dtd", "coop", "–")  # no backbone in these results.json
    assert (dtd[3].mean, dtd[3].std, dtd[4].mean, dtd[4].std) == (81.0, 1.0, 51.0, 1.0)
    assert dtd[5].mean == pytest.approx(2 * 81 * 51 / 132) and dtd[6] == 2
    average = next(r for r in table.rows if str(r[0]).startswith("**Average over 2 datasets"))
    base, new = (81.0 + 94.0) / 2, (51.0 + 65.0) / 2
    assert average[3].mean == base and average[4].mean == new
    assert average[5].mean == pytest.approx(2 * base * new / (base + new))
    assert str(average[5]) == f"{2 * base * new / (base + new):.2f}"
    # the papers' check: CoOp 82.69 / 63.22 -> 71.66
    assert f"{2 * 82.69 * 63.22 / (82.69 + 63.22):.2f}" == "71.66"


def test_few_shot_table_has_shots_as_columns_and_a_complete_average(tmp_path):
    for dataset, offset in (("dtd", 0.0), ("eurosat", 10.0)):
        for shots in (1, 2, 4):
            for seed in (1, 2, 3):
                write_run(tmp_path, "few_shot", dataset, "align", seed, {"accuracy": 50 + offset + shots + seed},
                          shots=shots)
    write_run(tmp_path, "few_shot", "dtd", "coop", 1, {"accuracy": 40.0}, shots=1)
    (table,) = build_tables(load_results(str(tmp_path)))
    assert table.columns == ["dataset", "method", "backbone", "1 shots", "2 shots", "4 shots"]
    cell = row(table, "eurosat", "align")[4]
    assert (cell.mean, cell.std, cell.n) == (pytest.approx(64.0), pytest.approx((2 / 3) ** 0.5), 3)
    assert str(cell) == "64.00 ± 0.82"
    average = next(r for r in table.rows if r[1] == "align" and str(r[0]).startswith("**Average"))
    assert [c.mean for c in average[3:]] == pytest.approx([58.0, 59.0, 61.0])
    coop_average = next(r for r in table.rows if r[1] == "coop" and str(r[0]).startswith("**Average"))
    assert coop_average[3].mean == 40.0 and coop_average[4] is None  # no run -> no number
    assert "| dtd | coop | – | 40.00 | – | – |" in table.markdown()  # one seed: no "± 0.00"


def test_transfer_tables_and_method_labels(tmp_path):
    for seed in (1, 2):
        write_run(tmp_path, "cross_domain", "imagenet", "maple", seed,
                  {"source": 70.0 + seed, "imagenet_v2": 64.0, "imagenet_sketch": 49.0, "imagenet_a": 50.0,
                   "imagenet_r": 77.0, "average": 60.0})
        write_run(tmp_path, "cross_domain", "imagenet", "align", seed, {"source": 71.0, "imagenet_v2": 65.0,
                                                                        "average": 65.0}, preset="paper", tag="t1")
    (table,) = build_tables(load_results(str(tmp_path)))
    assert table.columns == ["source", "method", "backbone", "source acc.", "imagenet_v2", "imagenet_sketch",
                             "imagenet_a", "imagenet_r", "target average", "seeds"]
    maple = row(table, "imagenet", "maple")
    assert maple[3].mean == 71.5 and maple[3].std == 0.5 and maple[-1] == 2
    align = row(table, "imagenet", "align-paper-t1")
    assert align[4].mean == 65.0 and align[5] is None


def test_write_report_markdown_csv_and_plots(tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        for beta in (0.0, 0.5, 1.0):
            write_run(runs, "base2new", "dtd", "align", seed, {"base": 80 + beta, "new": 60 + seed, "hm": 70 + beta},
                      tag=f"beta{beta}", options={"beta": beta})
        for shots in (1, 2):
            write_run(runs, "few_shot", "dtd", "coop", seed, {"accuracy": 40.0 + shots}, shots=shots)
    markdown, files = write_report(str(runs), str(tmp_path / "out"))
    names = {Path(f).name for f in files}
    assert {"report.md", "base2new.csv", "few_shot.csv", "few_shot_curves.png", "base2new_bars.png",
            "ablation_beta.png"} <= names
    assert markdown.index("Few-shot") < markdown.index("Base-to-new")
    with open(tmp_path / "out" / "few_shot.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["dataset"] == "dtd" and float(rows[0]["1 shots"]) == 41.0 and float(rows[0]["1 shots_std"]) == 0


def test_report_command_on_an_empty_folder_and_a_missing_one(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--no-plots"]) == 0
    assert "No finished runs" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_stat_formatting():
    assert str(Stat.of([1.0, 2.0, 3.0])) == "2.00 ± 0.82"
    assert str(Stat(71.664)) == "71.66"
