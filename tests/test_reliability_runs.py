"""Run folders under stress: reuse only by the same experiment, one process at a time, and resume after whatever a
crash or a full disk leaves (tiny CLIP, generated image folders)."""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest_data import colour_patch_tree
from vlprompt.engine import build_config
from vlprompt.engine import checkpoint as ckpt
from vlprompt.engine.runs import RunFolder, run_dir, run_identity
from vlprompt.errors import CheckpointError, ConfigError, RunInUseError, StorageError
from vlprompt.experiments.protocols import run_experiment
from vlprompt.experiments.reproduce import finished_results
from vlprompt.experiments.sweep import write_jobs

COLOURS = {"blue": (30, 30, 220), "red": (220, 30, 30), "green": (30, 200, 30)}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return colour_patch_tree(tmp_path_factory.mktemp("data") / "patches", COLOURS, train=3, test=2, seed=1)


def config(out, root, *overrides, dataset="custom_folder"):
    return build_config(method="coop", protocol="few_shot", dataset=dataset, shots=2, seed=1, overrides=[
        "backbone.name=tiny", "backbone.pretrained=null", "device=cpu", "progress=false", f"data.root={root}",
        "data.num_workers=0", f"data.cache_dir={out / 'cache'}", f"output={out / 'runs'}", "optim.epochs=3",
        "data.batch_size=3", "method.options.text_n_ctx=2", *overrides])


def epochs(folder):
    return [record["epoch"] for record in folder.metrics()]


class Interrupt(KeyboardInterrupt):
    pass


def interrupted_after_first_checkpoint(run_config, monkeypatch):
    """Run ``run_config`` until its first epoch record is about to be written, then interrupt it (the epoch's
    checkpoint is on disk)."""
    def interrupt(self, record):
        raise Interrupt

    monkeypatch.setattr(RunFolder, "append_metrics", interrupt)
    with pytest.raises(Interrupt):
        run_experiment(run_config)
    monkeypatch.undo()


# --------------------------------------------------------------------------------------------- identity


def test_a_finished_run_is_reused_only_by_the_same_settings(tmp_path, tree, monkeypatch):
    first = run_experiment(config(tmp_path, tree))
    assert run_experiment(config(tmp_path, tree)) == first  # same identity: reported as it is
    open_file = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith((".lock", ".tmp")):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return open_file(path, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(os, "open", read_only)
        assert run_experiment(config(tmp_path, tree)) == first  # a folder we may not write: read as it is
    with pytest.raises(ConfigError) as error:
        run_experiment(config(tmp_path, tree, "optim.lr=0.5"))
    message = str(error.value)
    assert "holds a finished run with other settings (optim.lr: 0.002 -> 0.5)" in message
    assert "--overwrite" in message and "another --output" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"precision: 'fp32' -> 'bf16'"):
        run_experiment(config(tmp_path, tree, "precision=bf16"))
    with pytest.raises(ConfigError, match="finished run with other settings"):  # a sweep checks before any job
        write_jobs([config(tmp_path, tree, "optim.lr=0.5")])
    # a reproduction's report reads only the runs of its own settings
    assert finished_results([config(tmp_path, tree)]) == [first]
    assert finished_results([config(tmp_path, tree, "optim.lr=0.5")]) == []
    assert RunFolder(run_dir(config(tmp_path, tree))).results() == first  # nothing was touched
    again = run_experiment(config(tmp_path, tree, "optim.lr=0.5"), overwrite=True)
    assert again["finished_at"] >= first["finished_at"]
    assert RunFolder(run_dir(config(tmp_path, tree))).config().optim.lr == 0.5


def test_an_unfinished_run_with_other_settings_is_not_resumed(tmp_path, tree, monkeypatch):
    interrupted_after_first_checkpoint(config(tmp_path, tree), monkeypatch)
    with pytest.raises(ConfigError, match=r"holds an unfinished run with other settings \(optim.epochs: 3 -> 4\)"):
        run_experiment(config(tmp_path, tree, "optim.epochs=4"))


def test_custom_folders_are_told_apart_by_name_and_by_content(tmp_path, tree):
    other = colour_patch_tree(tmp_path / "other" / "patches", COLOURS, train=3, test=2, seed=2)  # same name
    renamed = shutil.copytree(tree, tmp_path / "flowers")
    assert run_dir(config(tmp_path, tree)).endswith(os.path.join("custom_folder-patches", "coop@tiny", "shots_2",
                                                                 "seed_1"))
    assert "custom_folder-flowers" in run_dir(config(tmp_path, renamed))
    run_experiment(config(tmp_path, tree))
    with pytest.raises(ConfigError, match=r"finished run with other settings \(data.root: 'listing-sha256:"):
        run_experiment(config(tmp_path, other))  # same folder name, other images: same path, other identity
    # moved (same names, sizes and times): the same data, the finished run is reused
    moved = tmp_path / "moved" / "patches"
    shutil.copytree(tree, moved, copy_function=shutil.copy2)
    assert run_identity(config(tmp_path, moved)) == run_identity(config(tmp_path, tree))
    assert RunFolder(run_dir(config(tmp_path, moved))).conflict(config(tmp_path, moved)) is None


def test_standard_datasets_may_move_and_the_backbone_names_the_folder(tmp_path):
    a = build_config(method="coop", protocol="few_shot", dataset="dtd", overrides=["data.root=/a"])
    b = build_config(method="coop", protocol="few_shot", dataset="dtd", overrides=["data.root=/b"])
    assert run_identity(a) == run_identity(b)  # the split ships with vlprompt: the data root may change
    assert run_dir(a) == os.path.join("runs", "few_shot", "dtd", "coop", "shots_16", "seed_1")  # default backbone
    toy = build_config(method="coop", protocol="few_shot", dataset="dtd", overrides=["backbone.name=toy"])
    laion = build_config(method="coop", protocol="few_shot", dataset="dtd", overrides=[
        "backbone.name=ViT-B-16", "backbone.pretrained=laion2b_s34b_b88k", "tag=x"])
    assert run_dir(toy).endswith(os.path.join("coop@toy", "shots_16", "seed_1"))
    assert run_dir(laion).endswith(os.path.join("coop-x@ViT-B-16.laion2b_s34b_b88k", "shots_16", "seed_1"))


def test_a_weights_file_is_identified_by_its_content(tmp_path):
    weights = tmp_path / "mine.pt"
    torch.save({"w": torch.ones(2)}, weights)
    copy = tmp_path / "elsewhere" / "copy.pt"
    copy.parent.mkdir()
    shutil.copy(weights, copy)

    def identity(path):
        return run_identity(build_config(method="coop", protocol="few_shot", dataset="dtd",
                                         overrides=["backbone.name=ViT-B-16", f"backbone.pretrained={path}"]))

    assert identity(weights)["backbone"]["pretrained"].startswith("sha256:")
    assert identity(weights) == identity(copy)
    torch.save({"w": torch.zeros(2)}, copy)
    assert identity(weights) != identity(copy)


# --------------------------------------------------------------------------------------------- lock


def test_a_second_process_cannot_train_into_a_folder_in_use(tmp_path, tree, monkeypatch):
    entered, release, outcome = threading.Event(), threading.Event(), {}
    append_metrics = RunFolder.append_metrics

    def wait_after_the_first_epoch(self, record):
        append_metrics(self, record)
        if record["epoch"] == 0:
            entered.set()
            release.wait(60)

    monkeypatch.setattr(RunFolder, "append_metrics", wait_after_the_first_epoch)
    first = threading.Thread(target=lambda: outcome.update(results=run_experiment(config(tmp_path, tree))))
    first.start()
    try:
        assert entered.wait(120)
        with pytest.raises(RunInUseError) as error:
            run_experiment(config(tmp_path, tree))
        assert f"is in use by process {os.getpid()} on " in str(error.value) and "another --output" in str(error.value)
        with pytest.raises(RunInUseError):  # a sweep cannot clear it either
            write_jobs([config(tmp_path, tree)], overwrite=True)
    finally:
        release.set()
        first.join()
    folder = RunFolder(run_dir(config(tmp_path, tree)))
    assert outcome["results"]["metrics"] and epochs(folder) == [0, 1, 2]  # the first run was not disturbed


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, tree, caplog):
    folder = RunFolder(run_dir(config(tmp_path, tree)))
    script = ("import os, signal, sys\nfrom vlprompt.engine.runs import RunFolder\n"
              f"with RunFolder({folder.path!r}).locked():\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9
    pid = json.loads(Path(folder.lock_file).read_text())["pid"]
    with caplog.at_level(logging.WARNING, logger="vlprompt"):
        run_experiment(config(tmp_path, tree))
    assert f"taking over the lock left by process {pid} on " in caplog.text
    assert Path(folder.lock_file).read_text() == ""  # released cleanly


# --------------------------------------------------------------------------------------------- crashes


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tree):
    """The epoch records of the run uninterrupted."""
    out = tmp_path_factory.mktemp("reference")
    run_experiment(config(out, tree))
    return without_times(RunFolder(run_dir(config(out, tree))).metrics())


def without_times(records):
    return [{k: v for k, v in record.items() if k != "seconds"} for record in records]


def test_a_crash_between_checkpoint_and_metrics_loses_no_epoch(tmp_path, tree, monkeypatch, reference):
    append_metrics = RunFolder.append_metrics

    def crash_before_the_second_record(self, record):
        if record["epoch"] == 1:
            raise Interrupt  # the epoch-2 checkpoint is on disk, its record is not
        append_metrics(self, record)

    monkeypatch.setattr(RunFolder, "append_metrics", crash_before_the_second_record)
    with pytest.raises(Interrupt):
        run_experiment(config(tmp_path, tree))
    monkeypatch.undo()
    folder = RunFolder(run_dir(config(tmp_path, tree)))
    assert epochs(folder) == [0] and ckpt.load_checkpoint(folder.checkpoint_file)["epoch"] == 2
    run_experiment(config(tmp_path, tree))
    assert without_times(folder.metrics()) == reference


def test_a_cut_metrics_line_and_stale_temporary_files_do_not_stop_a_resume(tmp_path, tree, monkeypatch, reference):
    append_metrics = RunFolder.append_metrics

    def crash_while_appending_the_second_record(self, record):
        if record["epoch"] == 1:
            with open(self.metrics_file, "a") as handle:
                handle.write(json.dumps(record)[:25])  # what a kill in the middle of the write leaves
            raise Interrupt
        append_metrics(self, record)

    monkeypatch.setattr(RunFolder, "append_metrics", crash_while_appending_the_second_record)
    with pytest.raises(Interrupt):
        run_experiment(config(tmp_path, tree))
    monkeypatch.undo()
    folder = RunFolder(run_dir(config(tmp_path, tree)))
    stale = Path(folder.path) / ".checkpoint.pt.0a1b2c3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert epochs(folder) == [0]  # the cut line is left out when reading
    run_experiment(config(tmp_path, tree))
    assert epochs(folder) == [0, 1, 2] and not stale.exists()
    assert without_times(folder.metrics()) == reference


def test_a_full_disk_is_one_line_and_damages_nothing(tmp_path, tree, monkeypatch, reference):
    write = os.write
    saves = []

    def full_disk_at_the_second_checkpoint(descriptor, data):
        target = os.readlink(f"/proc/self/fd/{descriptor}")
        if os.path.basename(target).startswith(".checkpoint.pt."):
            saves.append(target)
            if len(saves) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return write(descriptor, data)

    monkeypatch.setattr(os, "write", full_disk_at_the_second_checkpoint)
    with pytest.raises(StorageError) as error:
        run_experiment(config(tmp_path, tree))
    monkeypatch.undo()
    folder = RunFolder(run_dir(config(tmp_path, tree)))
    assert str(error.value).startswith(f"no space left on device while writing {folder.checkpoint_file};")
    assert ckpt.load_checkpoint(folder.checkpoint_file)["epoch"] == 1  # the epoch-1 checkpoint is intact
    assert epochs(folder) == [0] and not [n for n in os.listdir(folder.path) if n.endswith(".tmp")]
    run_experiment(config(tmp_path, tree))
    assert without_times(folder.metrics()) == reference


def test_a_failed_append_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    ckpt.append_text(str(path), '{"epoch": 0}\n')
    write = os.write

    def half_then_full(descriptor, data):
        write(descriptor, bytes(data[:5]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(StorageError, match=f"^no space left on device while writing {path}"):
        ckpt.append_text(str(path), '{"epoch": 1}\n')
    monkeypatch.undo()
    assert path.read_text() == '{"epoch": 0}\n'


def test_a_checkpoint_without_its_fields_is_one_clear_error(tmp_path, tree, monkeypatch):
    interrupted_after_first_checkpoint(config(tmp_path, tree), monkeypatch)
    folder = RunFolder(run_dir(config(tmp_path, tree)))
    state = torch.load(folder.checkpoint_file, weights_only=True)
    del state["rng"], state["counters"]
    torch.save(state, folder.checkpoint_file)
    with pytest.raises(CheckpointError, match=r"the checkpoint lacks rng, counters .*--overwrite"):
        run_experiment(config(tmp_path, tree))


def test_files_are_written_with_the_users_umask(tmp_path, tree, monkeypatch):
    previous = os.umask(0o027)
    try:
        interrupted_after_first_checkpoint(config(tmp_path, tree), monkeypatch)
        folder = RunFolder(run_dir(config(tmp_path, tree)))
        assert oct(os.stat(folder.checkpoint_file).st_mode & 0o777) == oct(0o640)
        run_experiment(config(tmp_path, tree))
    finally:
        os.umask(previous)
    for file in (folder.config_file, folder.metrics_file, folder.prompts_file, folder.results_file):
        assert oct(os.stat(file).st_mode & 0o777) == oct(0o640), file


def test_a_setting_added_after_a_run_was_made_counts_as_its_default(tmp_path, tree):
    first = run_experiment(config(tmp_path, tree))
    folder = RunFolder(run_dir(config(tmp_path, tree)))
    stored = json.loads(Path(folder.identity_file).read_text())
    del stored["optim"]["optimizer"], stored["optim"]["adam_eps"]  # as written before these settings existed
    Path(folder.identity_file).write_text(json.dumps(stored))
    assert run_experiment(config(tmp_path, tree)) == first  # the default is what the old code did
    with pytest.raises(ConfigError, match=r"optim.optimizer: 'sgd' -> 'adamw'"):
        run_experiment(config(tmp_path, tree, "optim.optimizer=adamw"))
