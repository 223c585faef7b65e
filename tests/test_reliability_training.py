"""Training that can be trusted: the same seed gives bit-identical results for any number of data-loader
workers, after a resume and on re-running; non-finite values stop a run with one clear error; one progress
bar per run; a worker default that fits the machine."""

import importlib
import json
import logging
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset, RandomSampler
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from conftest_data import COLOURS, colour_patch_tree
from vlprompt.cli import main
from vlprompt.engine import OptimConfig, evaluate, fit, load_checkpoint
from vlprompt.engine import optim as optim_module
from vlprompt.engine import trainer
from vlprompt.engine.checkpoint import load_prompts, save_prompts
from vlprompt.engine.config import DataConfig, build_config
from vlprompt.errors import CheckpointError, ConfigError, NonFiniteTrainingError, VlpromptError
from vlprompt.methods import build_method

CLASSES = ["cat", "dog", "bird"]
evaluate_module = importlib.import_module("vlprompt.engine.evaluate")  # the package exports the function


class MarkedImages(Dataset):
    """Image ``i`` carries its index in pixel (0, 0, 0) and a random augmentation drawn from torch, Python's
    ``random`` and NumPy (all three must be seeded per image for the result not to depend on the workers)."""

    def __init__(self, n: int = 8):
        self.base = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image = self.base[index].clone()
        image[1] += 0.1 * torch.randn(32, 32)
        image[2, 0, 0] += random.random() + float(np.random.rand())
        image[0, 0, 0] = index
        return image, index % len(CLASSES)


def coop(tiny_clip, seed=0):
    torch.manual_seed(seed)
    return build_method("coop", tiny_clip, CLASSES, text_n_ctx=4)


def params(method):
    return {name: p.detach().clone() for name, p in method.prompt_parameters()}


def recording(method):
    """``method`` with its training batches recorded (``method.seen``: one images tensor per step)."""
    method.seen = []
    original = method.training_loss

    def training_loss(images, labels):
        method.seen.append(images.clone())
        return original(images, labels)

    method.training_loss = training_loss
    return method


def train(tiny_clip, workers, epochs=3, **kwargs):
    method = recording(coop(tiny_clip))
    summary = fit(method, MarkedImages(), optim=OptimConfig(lr=0.01, epochs=epochs), batch_size=4, seed=3,
                  num_workers=workers, progress=False, **kwargs)
    return method, summary


# --------------------------------------------------------------------------------------------- workers


def test_epoch_orders_are_the_seeded_sampler_orders_and_batches_do_not_depend_on_workers(tiny_clip):
    epochs = 3
    expected_sampler = RandomSampler(range(8), generator=torch.Generator().manual_seed(3))
    expected = [list(expected_sampler) for _ in range(epochs)]  # one draw per epoch, nothing spent in between
    runs = {}
    for workers in (0, 2):
        torch.manual_seed(0)
        method, summary = train(tiny_clip, workers, epochs)
        orders = [[int(i) for i in images[:, 0, 0, 0]] for images in method.seen]
        per_epoch = [sum(orders[e * 2:(e + 1) * 2], []) for e in range(epochs)]  # 2 batches of 4 per epoch
        assert per_epoch == expected, f"{workers} workers"
        runs[workers] = (method, summary, torch.get_rng_state())
    (zero, zero_summary, zero_rng), (two, two_summary, two_rng) = runs[0], runs[2]
    assert all(torch.equal(a, b) for a, b in zip(zero.seen, two.seen))  # same images, same augmentation
    assert [r["loss"] for r in zero_summary.history] == [r["loss"] for r in two_summary.history]
    assert all(torch.equal(v, params(two)[k]) for k, v in params(zero).items())
    assert torch.equal(zero_rng, two_rng)  # the loader never draws from the global random state


def killed_at_step(method, step: int):
    """``method`` whose training is interrupted (Ctrl-C) at its ``step``-th training step (1-based)."""
    original, calls = method.training_loss, {"n": 0}

    def training_loss(images, labels):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return original(images, labels)

    method.training_loss = training_loss
    return method


def test_resume_with_workers_equals_an_uninterrupted_run_without(tiny_clip, tmp_path):
    reference, full = train(tiny_clip, 0, 3)
    method = killed_at_step(coop(tiny_clip), 2 * 2 + 2)  # 2 steps per epoch: the second step of the third
    path = str(tmp_path / "ckpt.pt")
    with pytest.raises(KeyboardInterrupt):
        fit(method, MarkedImages(), optim=OptimConfig(lr=0.01, epochs=3), batch_size=4, seed=3, num_workers=2,
            progress=False, checkpoint_path=path)
    assert load_checkpoint(path)["epoch"] == 2
    torch.manual_seed(999)
    random.seed(999)
    resumed, summary = train(tiny_clip, 2, 3, checkpoint_path=path)
    assert [r["loss"] for r in summary.history] == [r["loss"] for r in full.history[2:]]
    assert all(torch.equal(v, params(resumed)[k]) for k, v in params(reference).items())


def test_workers_start_once_per_training_and_once_per_evaluation(tiny_clip, monkeypatch):
    starts = {"n": 0}
    original = _MultiProcessingDataLoaderIter.__init__

    def counting(self, loader):
        starts["n"] += 1
        original(self, loader)

    monkeypatch.setattr(_MultiProcessingDataLoaderIter, "__init__", counting)
    method, _ = train(tiny_clip, 2, epochs=2)
    assert starts["n"] == 1  # persistent workers, and nothing but the loop iterates the loader
    starts["n"] = 0
    evaluate(method, MarkedImages(), batch_size=4, num_workers=2, progress=False)
    assert starts["n"] == 1


def test_default_workers_follow_the_cpus_this_process_may_use(monkeypatch):
    for cpus, expected in ((1, 1), (2, 2), (3, 3), (16, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        assert DataConfig().num_workers == expected
    assert trainer.make_train_loader(MarkedImages(), 4, torch.Generator(), num_workers=2).persistent_workers


def make_tree(root: Path) -> Path:
    return colour_patch_tree(root, COLOURS, 4, 2)


def cli_run(tree: Path, out: Path, *extra: str) -> int:
    return main(["train", "--method", "coop", "--dataset", "custom_folder", "--shots", "4", "--seed", "5",
                 "--data-root", str(tree), "--backbone", "tiny", "--pretrained", "none", "--output", str(out),
                 "--quiet", "--set", f"data.cache_dir={out / 'cache'}", "--set", "data.batch_size=4",
                 "--set", "optim.epochs=2", "--set", "optim.lr=0.01", *extra])


def run_outputs(out: Path):
    run = next(out.rglob("results.json")).parent
    results = json.loads((run / "results.json").read_text())
    records = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluations = {label: {k: v for k, v in e.items() if k != "seconds"} for label, e in results["evaluations"].items()}
    return load_file(run / "prompts.safetensors"), results["metrics"], evaluations, records


def test_cli_results_are_bit_identical_for_zero_and_two_workers_and_on_rerunning(tmp_path):
    tree = make_tree(tmp_path / "data")
    outputs = []
    for name, workers in (("w0", 0), ("w2", 2), ("w2_again", 2)):
        assert cli_run(tree, tmp_path / name, "--set", f"data.num_workers={workers}") == 0
        outputs.append(run_outputs(tmp_path / name))
    first = outputs[0]
    for other in outputs[1:]:
        assert first[0].keys() == other[0].keys()
        assert all(torch.equal(first[0][k], other[0][k]) for k in first[0])
        assert first[1:] == other[1:]


# --------------------------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("override, key", [
    ("optim.lr=.inf", "optim.lr"), ("optim.lr=-.inf", "optim.lr"), ("optim.lr=.nan", "optim.lr"),
    ("optim.lr=3.5e+38", "optim.lr"),  # infinite in float32
    ("optim.weight_decay=.nan", "optim.weight_decay"), ("optim.warmup_lr=.inf", "optim.warmup_lr"),
    ("optim.per_stage.main.lr=.inf", "optim.per_stage.main.lr"),
    ("method.options.text_ctx_std=.nan", "method.options.text_ctx_std"),
])
def test_non_finite_numeric_options_are_config_errors(override, key):
    with pytest.raises(ConfigError) as error:
        build_config(method="coop", protocol="few_shot", dataset="dtd", overrides=[override])
    assert key in str(error.value) and "finite" in str(error.value)


def test_cli_infinite_learning_rate_is_one_line_and_makes_no_run_folder(tmp_path, capsys):
    tree = make_tree(tmp_path / "data")
    capsys.readouterr()
    assert cli_run(tree, tmp_path / "runs", "--set", "optim.lr=.inf") == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vlprompt train: error: optim.lr"), lines
    assert not list((tmp_path / "runs").rglob("config.json"))


def test_infinite_rate_stops_training_and_keeps_the_last_finite_checkpoint(tiny_clip, tmp_path):
    method = coop(tiny_clip)
    path = tmp_path / "ckpt.pt"
    with pytest.raises(NonFiniteTrainingError) as error:  # epoch 1 runs at warmup_lr, epoch 2 at lr = inf
        fit(method, MarkedImages(), optim=OptimConfig(lr=math.inf, epochs=3), batch_size=4, seed=1,
            progress=False, checkpoint_path=str(path))
    message = str(error.value)
    assert "non-finite" in message and "epoch 2/3" in message and str(path) in message, message
    state = load_checkpoint(str(path))
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["prompts"].values())


def poisoned(method, at_step):
    """``method`` whose loss is NaN at the (1-based) steps where ``at_step(step)`` is true."""
    original, calls = method.training_loss, {"n": 0}

    def training_loss(images, labels):
        calls["n"] += 1
        loss, logits = original(images, labels)
        return (loss * math.nan if at_step(calls["n"]) else loss), logits

    method.training_loss = training_loss
    return method


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_non_finite_loss_without_a_loss_scaler_stops_the_run(tiny_clip, precision):
    method = poisoned(coop(tiny_clip), lambda step: step >= 2)
    with pytest.raises(NonFiniteTrainingError, match="loss is nan"):
        fit(method, MarkedImages(8), optim=OptimConfig(lr=0.05, epochs=2), batch_size=4, seed=1,
            precision=precision, progress=False)
    assert all(torch.isfinite(v).all() for v in params(method).values())


def test_a_non_finite_gradient_without_a_loss_scaler_stops_the_run(tiny_clip):
    method = coop(tiny_clip)
    original = method.training_loss

    def infinite_gradient(images, labels):
        loss, logits = original(images, labels)
        ctx = next(p for _, p in method.trainable_parameters())
        return loss + torch.sqrt((ctx - ctx).sum()), logits  # finite value 0, gradient nan

    method.training_loss = infinite_gradient
    with pytest.raises(NonFiniteTrainingError, match="gradient"):
        fit(method, MarkedImages(4), optim=OptimConfig(lr=0.05, epochs=2), batch_size=4, seed=1, progress=False)


def test_fp16_skips_a_transient_non_finite_loss_but_stops_when_it_persists(tiny_clip, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="vlprompt"):
        summary = fit(poisoned(coop(tiny_clip), lambda step: step == 2), MarkedImages(8),
                      optim=OptimConfig(lr=0.05, epochs=2), batch_size=4, seed=1, precision="fp16", progress=False)
    assert [r["nonfinite_loss"] for r in summary.history] == [1, 0]  # (gradient overflows are counted apart)
    assert any("loss is nan" in record.message for record in caplog.records)

    monkeypatch.setattr(trainer, "FP16_SKIPS_IN_A_ROW", 3)
    with pytest.raises(NonFiniteTrainingError, match="in a row"):
        fit(poisoned(coop(tiny_clip), lambda step: True), MarkedImages(8), optim=OptimConfig(lr=0.05, epochs=3),
            batch_size=4, seed=1, precision="fp16", progress=False)


def test_a_checkpoint_with_non_finite_prompts_does_not_resume(tiny_clip, tmp_path):
    path = tmp_path / "ckpt.pt"
    optim = OptimConfig(lr=0.01, epochs=2)
    fit(coop(tiny_clip), MarkedImages(4), optim=optim, batch_size=4, seed=1, progress=False,
        checkpoint_path=str(path))
    state = torch.load(path, weights_only=True)
    state["prompts"] = {name: torch.full_like(t, math.nan) for name, t in state["prompts"].items()}
    torch.save(state, path)  # a finished training whose prompts are NaN
    with pytest.raises(CheckpointError, match="non-finite"):
        fit(coop(tiny_clip), MarkedImages(4), optim=optim, batch_size=4, seed=1, progress=False,
            checkpoint_path=str(path))


def test_cli_non_finite_parameters_exit_2_and_keep_the_last_finite_checkpoint(tmp_path, monkeypatch, capsys):
    tree = make_tree(tmp_path / "data")
    monkeypatch.setattr(optim_module, "learning_rate", lambda epoch, optim: 1e-5 if epoch == 0 else math.inf)
    capsys.readouterr()
    assert cli_run(tree, tmp_path / "runs", "--set", "data.num_workers=0") == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vlprompt train: error: training stopped"), lines
    run = next((tmp_path / "runs").rglob("config.json")).parent
    assert not (run / "results.json").exists() and not (run / "prompts.safetensors").exists()
    state = load_checkpoint(str(run / "checkpoint.pt"))
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["prompts"].values())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_loading_non_finite_prompts_names_the_file_and_the_tensor(tmp_path, bad):
    path = str(tmp_path / "prompts.safetensors")
    values = torch.zeros(2, 4)
    values[1, 2] = bad
    save_prompts(path, {"text.ctx": values, "steps": torch.arange(3)}, {"method": "coop"})
    with pytest.raises(CheckpointError) as error:
        load_prompts(path)
    assert path in str(error.value) and "'text.ctx'" in str(error.value)
    assert isinstance(error.value, VlpromptError)


# --------------------------------------------------------------------------------------------- progress


class BarSpy:
    """Stands in for tqdm: records each bar's arguments and updates."""

    bars: list = []

    def __init__(self, iterable=None, **kwargs):
        self.iterable, self.kwargs, self.n = iterable, kwargs, 0
        self.total, self.disable = kwargs.get("total"), kwargs.get("disable", False)
        BarSpy.bars.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __iter__(self):
        for item in self.iterable:
            self.n += 1
            yield item

    def update(self, n=1):
        self.n += n

    def set_description(self, *args, **kwargs):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def refresh(self):
        pass

    def close(self):
        pass


def test_one_progress_bar_per_training_run_and_no_loader_handed_to_tqdm(tiny_clip, monkeypatch):
    monkeypatch.setattr(trainer, "tqdm", BarSpy)
    monkeypatch.setattr(evaluate_module, "tqdm", BarSpy)
    BarSpy.bars = []
    method = coop(tiny_clip)
    fit(method, MarkedImages(), optim=OptimConfig(lr=0.01, epochs=3), batch_size=4, seed=1, progress=True)
    assert len(BarSpy.bars) == 1
    bar = BarSpy.bars[0]
    assert bar.iterable is None and bar.total == 3 * 2 and bar.n == 6
    BarSpy.bars = []
    evaluate(method, MarkedImages(), batch_size=5, progress=True)
    assert len(BarSpy.bars) == 1 and BarSpy.bars[0].iterable is None and BarSpy.bars[0].n == 2


def test_demo_shows_no_open_clip_tokenizer_lines(tmp_path):
    """open_clip logs "Parsing tokenizer identifier" at INFO on the root logger; the demo shows vlprompt's INFO
    lines only. (A subprocess: pytest's own root handlers would hide what the command sets up.)"""
    script = (
        "import logging, open_clip, vlprompt.cli.demo as demo\n"
        "from vlprompt.cli import main\n"
        "def fake_run_demo(*args, **kwargs):\n"
        "    open_clip.get_tokenizer('ViT-B-16')\n"
        "    logging.getLogger('vlprompt').info('a vlprompt line')\n"
        "    raise SystemExit(0)\n"
        "demo.run_demo = fake_run_demo\n"
        "main(['demo', '--quick', '--output', 'out'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "a vlprompt line" in done.stderr
    assert "Parsing tokenizer" not in done.stderr and "SimpleTokenizer" not in done.stderr, done.stderr
