"""Data-parallel training: sharded sampling, seeded augmentation, and 2 CPU processes (torchrun + gloo) that
train, resume and evaluate exactly like one process, with rank 0 alone writing the run folder."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset, RandomSampler

from conftest_data import COLOURS, colour_patch_tree
from vlprompt.cli import main
from vlprompt.engine import distributed
from vlprompt.engine.checkpoint import load_prompts
from vlprompt.engine.runs import RunFolder
from vlprompt.engine.trainer import EpochSampler, SeededItems, make_train_loader
from vlprompt.errors import ConfigError



class Indices(Dataset):
    """Item i is (i, a random number drawn from torch's global generator): shows order and augmentation seed."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return index, torch.rand(()).item()


def loader_steps(size, batch_size, seed, world_size, epoch=(0, 0)):
    """The (index, random draw) batches every rank sees in one epoch: ``steps[rank][step]``."""
    steps = []
    for rank in range(world_size):
        loader = make_train_loader(Indices(size), batch_size, torch.Generator().manual_seed(seed), rank=rank,
                                   world_size=world_size)
        loader.sampler.set_epoch(*epoch)
        steps.append([list(zip(batch[0].tolist(), batch[1].tolist())) for batch in loader])
    return steps


@pytest.mark.parametrize("size, batch_size, world_size", [(16, 4, 2), (17, 6, 3), (5, 8, 2), (1, 4, 2)])
def test_ranks_share_the_single_process_batches_and_augmentations(size, batch_size, world_size):
    (single,) = loader_steps(size, batch_size, seed=3, world_size=1)
    ranks = loader_steps(size, batch_size, seed=3, world_size=world_size)
    # one process: the plain seeded RandomSampler order, Dassl's drop_last rule
    order = list(RandomSampler(range(size), generator=torch.Generator().manual_seed(3)))
    kept = size // batch_size * batch_size if size >= batch_size else size
    assert [i for batch in single for i, _ in batch] == order[:kept]
    # W processes: each global batch is the single-process batch, split into contiguous shares
    global_steps = len(single)
    for step in range(global_steps):
        joined = [item for rank in ranks for item in (rank[step] if step < len(rank) else [])]
        assert joined == single[step]  # same images, same random draws (augmentations)
    assert all(len(rank) <= global_steps for rank in ranks)
    if size >= batch_size:
        assert all(len(batch) == batch_size // world_size for rank in ranks for batch in rank)


def test_augmentation_depends_on_epoch_and_image_not_on_the_process():
    first, again = loader_steps(8, 4, seed=1, world_size=1), loader_steps(8, 4, seed=1, world_size=1)
    later = loader_steps(8, 4, seed=1, world_size=1, epoch=(0, 1))
    assert first == again
    draws = {i: x for batch in first[0] for i, x in batch}
    assert draws != {i: x for batch in later[0] for i, x in batch}
    state = torch.get_rng_state()
    SeededItems(Indices(3))[(1, 1234)]
    assert torch.equal(state, torch.get_rng_state())  # the caller's random state is untouched


def test_global_batch_must_split_evenly_and_single_process_helpers_are_no_ops():
    with pytest.raises(ConfigError, match=r"data.batch_size \(6\).*multiple.*\(4\)"):
        make_train_loader(Indices(8), 6, torch.Generator(), world_size=4)
    assert distributed.world() == distributed.World() and distributed.world().main
    assert distributed.shard(5) == range(5) and distributed.gather_objects("x") == ["x"]
    parameter = torch.nn.Parameter(torch.ones(2))
    parameter.grad = torch.full((2,), 3.0)
    assert distributed.average_gradients([parameter], 4, False) == (4, False)
    assert torch.equal(parameter.grad, torch.full((2,), 3.0))
    assert len(EpochSampler(5, 8, torch.Generator(), rank=1, world_size=2)) == 3


# --------------------------------------------------------------------------------------------- torchrun

SPY = '''
import os, sys

from vlprompt.engine import checkpoint, runs

def spy(kind, function, path_of):
    def wrapper(*args, **kwargs):
        with open(os.environ["VLPROMPT_TEST_WRITES"], "a") as handle:
            handle.write(f"{os.environ['RANK']} {kind} {path_of(*args)}\\n")
        return function(*args, **kwargs)
    return wrapper

runs.RunFolder.write_results = spy("results", runs.RunFolder.write_results, lambda self, *_: self.path)
runs.RunFolder.append_metrics = spy("metrics", runs.RunFolder.append_metrics, lambda self, *_: self.path)
runs.atomic_write_text = spy("text", runs.atomic_write_text, lambda path, *_: path)
checkpoint.save_checkpoint = spy("checkpoint", checkpoint.save_checkpoint, lambda path, *_: path)
checkpoint.save_prompts = spy("prompts", checkpoint.save_prompts, lambda path, *_: path)

from vlprompt.cli import main
sys.exit(main(sys.argv[1:]))
'''


def make_tree(root: Path) -> Path:
    """4 classes x 4 training images (one unreadable) and 3 test images (one unreadable)."""
    colour_patch_tree(root, COLOURS, train=4, test=3)
    (root / "train" / "red" / "0.png").write_bytes(b"broken")
    (root / "test" / "blue" / "1.png").write_bytes(b"broken")
    return root


def arguments(tree: Path, out: Path, seeds: str) -> list[str]:
    # global batch 6 of 16 images: 2 steps per epoch (3 images per process), the partial batch dropped; the
    # unreadable image makes one process's share smaller than the other's in some steps
    return ["run", "few_shot", "--methods", "coop", "--datasets", "custom_folder", "--shots", "4", "--seeds", seeds,
            "--data-root", str(tree), "--backbone", "tiny", "--pretrained", "none", "--device", "cpu",
            "--output", str(out), "--quiet", "--set", "data.num_workers=0", "--set", f"data.cache_dir={out}/cache",
            "--set", "data.batch_size=6", "--set", "optim.epochs=3", "--set", "optim.lr=0.05"]


def run_folder(out: Path, seed: int) -> RunFolder:
    return RunFolder(str(out / "few_shot" / "custom_folder-data" / "coop@tiny" / "shots_4" / f"seed_{seed}"))


def test_two_processes_train_resume_and_evaluate_like_one(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "data")
    single, multi = tmp_path / "single", tmp_path / "multi"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unreadable images
        assert main(arguments(tree, single, "1,2")) == 0

        # seed 2 in the two-process output: one process trains one epoch, then is interrupted
        append_metrics = RunFolder.append_metrics

        def append_then_interrupt(self, record):
            append_metrics(self, record)
            raise KeyboardInterrupt

        monkeypatch.setattr(RunFolder, "append_metrics", append_then_interrupt)
        assert main(arguments(tree, multi, "2")) == 130
        monkeypatch.undo()
    assert len(run_folder(multi, 2).metrics()) == 1 and os.path.isfile(run_folder(multi, 2).checkpoint_file)

    # two processes: seed 1 from scratch, seed 2 resumed from the single-process checkpoint
    spy, writes = tmp_path / "spy.py", tmp_path / "writes.txt"
    spy.write_text(SPY)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", VLPROMPT_TEST_WRITES=str(writes))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(spy)]
    done = subprocess.run(launch + arguments(tree, multi, "1,2"), env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert done.stdout.count("few_shot custom_folder coop shots 4 seed") == 2  # printed by rank 0 only

    # only rank 0 wrote, and each results file once
    records = [line.split(" ", 2) for line in writes.read_text().splitlines()]
    assert records and {rank for rank, _, _ in records} == {"0"}
    written = [(kind, os.path.basename(path)) for _, kind, path in records if kind in ("results", "metrics")]
    assert sorted(written) == sorted([("metrics", "seed_1")] * 3 + [("metrics", "seed_2")] * 2 +
                                     [("results", "seed_1"), ("results", "seed_2")])

    for seed in (1, 2):
        one, two = run_folder(single, seed), run_folder(multi, seed)
        ours, reference = two.results(), one.results()
        assert ours["processes"] == 2 and reference["processes"] == 1
        # the loss curve and the final parameters equal the single-process run's to float tolerance
        curve, reference_curve = two.metrics(), one.metrics()
        assert [r["epoch"] for r in curve] == [0, 1, 2] and [r["steps"] for r in curve] == [2, 2, 2]
        assert [r["loss"] for r in curve] == pytest.approx([r["loss"] for r in reference_curve], rel=1e-4)
        assert [r["accuracy"] for r in curve] == pytest.approx([r["accuracy"] for r in reference_curve])
        tensors, reference_tensors = load_prompts(two.prompts_file)[0], load_prompts(one.prompts_file)[0]
        assert tensors.keys() == reference_tensors.keys()
        for name in tensors:
            torch.testing.assert_close(tensors[name], reference_tensors[name], rtol=1e-4, atol=1e-5)  # values ~0.02
        # evaluation split over the two processes and gathered: the same counts, per class too
        test, reference_test = ours["evaluations"]["test"], reference["evaluations"]["test"]
        assert test["per_class_total"] == reference_test["per_class_total"] == [2, 3, 3, 3]
        assert test["correct"] == reference_test["correct"] and test["skipped"] == reference_test["skipped"]
        assert ours["training"]["skipped_images"] == reference["training"]["skipped_images"] == 1
        assert not os.path.exists(two.checkpoint_file)
    log = Path(run_folder(multi, 2).log_file).read_text()
    assert "resuming from" in log and "on 2 processes (gloo)" in log
    assert log.count("resuming run") == 1  # rank 0's log only
