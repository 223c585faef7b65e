"""Sweeps: grid expansion, parallel local workers that survive an interruption, and SLURM job lists."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from conftest_data import colour_patch_tree
from vlprompt.cli import main
from vlprompt.engine.runs import RunFolder, run_dir
from vlprompt.errors import ConfigError
from vlprompt.experiments.sweep import expand_grid, read_events, read_job, run_sweep, write_slurm
from vlprompt.cli.sweep_job import main as job_main

COLOURS = {"blue": (30, 30, 220), "green": (30, 200, 30), "red": (220, 30, 30)}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return colour_patch_tree(tmp_path_factory.mktemp("data"), COLOURS)


def grid(tree: Path, out: Path, **changes) -> dict:
    return {"protocol": "few_shot", "methods": ["coop"], "datasets": ["custom_folder"], "shots": [2],
            "seeds": [1, 2, 3], "set": ["optim.epochs=2"],
            "config": {"output": str(out), "device": "cpu", "progress": False,
                       "backbone": {"name": "tiny", "pretrained": None},
                       "data": {"root": str(tree), "num_workers": 0, "batch_size": 3,
                                "cache_dir": str(out / "cache")}},
            **changes}


def test_grid_expansion_from_a_file_and_options(tree, tmp_path, capsys):
    configs = expand_grid(grid(tree, tmp_path, protocols=["few_shot", "base2new"], methods="coop,maple"),
                          overrides=["optim.lr=0.01"])
    assert len(configs) == 2 * 2 * 3  # protocols x methods x seeds (base2new: its own 16 shots)
    assert {(c.protocol, c.data.shots) for c in configs} == {("few_shot", 2), ("base2new", 2)}
    assert all(c.optim.epochs == 2 and c.optim.lr == 0.01 and c.backbone.name == "tiny" for c in configs)
    with pytest.raises(ConfigError, match="unknown sweep grid key.*seed"):
        expand_grid({**grid(tree, tmp_path), "seed": 1})
    with pytest.raises(ConfigError, match="appear more than once"):
        expand_grid(grid(tree, tmp_path, seeds=[1, 1]))
    with pytest.raises(ConfigError, match="needs protocols and methods"):
        expand_grid({"methods": ["coop"]})

    # the command line: a grid file, options winning over it
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid(tree, tmp_path)))
    capsys.readouterr()
    assert main(["sweep", str(grid_file), "--seeds", "4,5", "--dry-run"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == ["new", "new"] and listed[1].endswith("shots_2/seed_5")


def test_slurm_array_script_and_jobs_file(tree, tmp_path, capsys):
    out = tmp_path / "runs"
    configs = expand_grid(grid(tree, out))
    script, jobs, count = write_slurm(configs, gpus_per_job=2, max_parallel=2,
                                      options=["--partition=gpu", "--time=01:00:00"])
    assert count == 3 and [read_job(jobs, i)["run_dir"] for i in range(3)] == [run_dir(c) for c in configs]
    text = Path(script).read_text()
    assert text.startswith("#!/bin/bash\n") and os.access(script, os.X_OK)
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --gres=gpu:2", "#SBATCH --partition=gpu",
                 "#SBATCH --time=01:00:00", "set -euo pipefail", f"cd {os.getcwd()}"):
        assert line + "\n" in text, line
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert srun == (f"srun {sys.executable} -m torch.distributed.run --standalone --nproc-per-node=2 -m "
                    f'vlprompt.cli.sweep_job {os.path.abspath(jobs)} "$SLURM_ARRAY_TASK_ID"')
    assert f"--output={os.path.abspath(out / 'sweep' / 'logs')}/slurm-" in text
    # every #SBATCH line comes before the first command (sbatch stops reading them there)
    lines = text.splitlines()
    assert max(i for i, l in enumerate(lines) if l.startswith("#SBATCH")) < lines.index("set -euo pipefail")

    # what an array task runs: job 1 (python -m vlprompt.cli.sweep_job JOBS 1), here in-process
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert job_main([jobs, "1"]) == 0
    assert RunFolder(run_dir(configs[1])).finished
    # a new script leaves the finished run out (CLI, one GPU per task: plain python)
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid(tree, out)))
    capsys.readouterr()
    assert main(["sweep", str(grid_file), "--slurm", "--gpus-per-job", "1"]) == 0
    printed = capsys.readouterr().out
    assert "(2 of 3 runs to do)" in printed and "sbatch " in printed
    new_script = printed.split("sbatch ")[1].split()[0]
    assert "#SBATCH --array=0-1\n" in Path(new_script).read_text()
    assert f"srun {sys.executable} -m vlprompt.cli.sweep_job " in Path(new_script).read_text()


INTERRUPTING_JOB = '''
import os, signal, sys, time

from vlprompt.cli import sweep_job
from vlprompt.experiments import sweep
from vlprompt.engine import runs

jobs_file, index = sys.argv[3], int(sys.argv[4])  # argv: -m vlprompt.cli.sweep_job JOBS_FILE INDEX
if index == 1:
    first = sweep.read_job(jobs_file, 0)["run_dir"]
    append_metrics = runs.RunFolder.append_metrics

    def append_then_interrupt_the_sweep(self, record):
        append_metrics(self, record)  # after the epoch-1 checkpoint
        while not os.path.exists(os.path.join(first, "results.json")):  # let job 0 finish first
            time.sleep(0.05)
        os.kill(os.getppid(), signal.SIGTERM)  # the sweep stops: it stops this job too
        time.sleep(300)

    runs.RunFolder.append_metrics = append_then_interrupt_the_sweep
sys.exit(sweep_job.main([jobs_file, str(index)]))
'''


def test_interrupted_sweep_finishes_only_what_is_missing(tree, tmp_path, capsys):
    out = tmp_path / "runs"
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid(tree, out)))
    helper = tmp_path / "interrupting_job.py"
    helper.write_text(INTERRUPTING_JOB)
    configs = expand_grid(str(grid_file))
    folders = [RunFolder(run_dir(config)) for config in configs]

    # 1. two workers; job 1 interrupts the whole sweep (SIGTERM) after its first epoch, once job 0 has finished
    first = subprocess.run([sys.executable, "-m", "vlprompt.cli", "sweep", str(grid_file), "--workers", "2",
                            "--launcher", f"{sys.executable} {helper}"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 130, first.stdout + first.stderr
    assert "interrupted" in first.stderr
    assert [f.status() for f in folders[:2]] == ["finished", "partial"] and folders[2].status() != "finished"
    assert len(folders[1].metrics()) == 1 and os.path.isfile(folders[1].checkpoint_file)
    first_events = read_events(str(out / "sweep"))
    assert {e["job"] for e in first_events if e["event"] == "interrupted"} >= {1}
    finished_result = Path(folders[0].results_file)
    stamp, partial_epoch = finished_result.stat().st_mtime_ns, folders[1].metrics()[0]

    # 2. the same sweep again (library call): runs 2 and 3 only; run 2 resumes at its second epoch
    outcomes = run_sweep(configs, workers=2)
    assert [o.status for o in outcomes] == ["finished_before", "done", "done"]
    assert all(f.finished for f in folders)
    second_id = {e["sweep"] for e in read_events(str(out / "sweep"))} - {e["sweep"] for e in first_events}
    started = [e["run_dir"] for e in read_events(str(out / "sweep")) if e["event"] == "start" and
               e["sweep"] in second_id]
    assert sorted(started) == [folders[1].path, folders[2].path]
    assert finished_result.stat().st_mtime_ns == stamp  # the finished run was left alone
    assert [r["epoch"] for r in folders[1].metrics()] == [0, 1] and folders[1].metrics()[0] == partial_epoch
    log = Path(folders[1].log_file).read_text()
    assert "resuming from" in log and "epochs 2..2 of 2" in log
    job_log = Path(outcomes[1].log_file).read_text()
    assert "few_shot custom_folder coop shots 2 seed 2" in job_log

    # 3. the tables come from the sweep's run folders
    capsys.readouterr()
    assert main(["report", str(out), "--no-plots"]) == 0
    assert "custom_folder" in capsys.readouterr().out
    assert json.loads(Path(folders[2].results_file).read_text())["seed"] == 3
