"""The training engine on the tiny CLIP: schedule, determinism, resume, checkpoints, precision, non-finite steps."""

import logging
import math
import warnings

import pytest
import torch
from torch.utils.data import TensorDataset

from vlprompt.engine import OptimConfig, evaluate, fit, learning_rate, load_checkpoint
from vlprompt.engine.trainer import check_autocast, make_train_loader
from vlprompt.errors import ConfigError
from vlprompt.methods import build_method

CLASSES = ["cat", "dog", "bird"]


def toy_set(n=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    labels = torch.arange(n) % len(CLASSES)
    return TensorDataset(images, labels)


def coop(tiny_clip, seed=0):
    torch.manual_seed(seed)
    return build_method("coop", tiny_clip, CLASSES, text_n_ctx=4)


def params(method):
    return {name: p.detach().clone() for name, p in method.prompt_parameters()}


def test_schedule_matches_dassl_formula_for_five_epochs(tiny_clip):
    optim = OptimConfig(lr=0.002, epochs=5)
    expected = [1e-5] + [0.002 * 0.5 * (1 + math.cos(math.pi * (e - 1) / 5)) for e in range(1, 5)]
    assert [learning_rate(e, optim) for e in range(5)] == pytest.approx(expected, rel=1e-12)
    # and the rates the loop used (written to metrics.jsonl through on_epoch)
    records = []
    summary = fit(coop(tiny_clip), toy_set(8), optim=optim, batch_size=4, seed=1, progress=False,
                  on_epoch=records.append)
    assert records == summary.history
    assert [r["lr"] for r in summary.history] == pytest.approx(expected, rel=1e-12)
    assert [r["epoch"] for r in summary.history] == [0, 1, 2, 3, 4]
    assert expected[1] == pytest.approx(0.002) and expected[4] > 0  # cosine never reaches 0 inside training


def test_stop_epoch_trains_a_prefix_of_the_longer_schedule(tiny_clip):
    summary = fit(coop(tiny_clip), toy_set(4), optim=OptimConfig(lr=0.002, epochs=20, stop_epoch=3), batch_size=4,
                  seed=1, progress=False)
    assert [r["lr"] for r in summary.history] == pytest.approx(
        [1e-5] + [0.002 * 0.5 * (1 + math.cos(math.pi * e / 20)) for e in (0, 1)])


def test_same_seed_same_parameters_and_different_seed_differs(tiny_clip):
    results = []
    for seed in (1, 1, 2):
        method = coop(tiny_clip)
        fit(method, toy_set(), optim=OptimConfig(lr=0.01, epochs=2), batch_size=4, seed=seed, progress=False)
        results.append(params(method))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert not all(torch.equal(results[0][k], results[2][k]) for k in results[0])


def test_drop_last_only_when_the_set_fills_a_batch():
    generator = torch.Generator()
    assert make_train_loader(toy_set(3), 4, generator).drop_last is False
    assert make_train_loader(toy_set(9), 4, generator).drop_last is True
    assert len(make_train_loader(toy_set(9), 4, generator)) == 2


def test_resume_from_checkpoint_equals_uninterrupted_run(tiny_clip, tmp_path):
    optim = OptimConfig(lr=0.01, epochs=4)
    reference = coop(tiny_clip)
    full = fit(reference, toy_set(), optim=optim, batch_size=4, seed=3, progress=False,
               checkpoint_path=str(tmp_path / "full.pt"))

    method = coop(tiny_clip)
    calls = {"n": 0}
    original = method.training_loss

    def interrupt_in_epoch_three(images, labels):
        calls["n"] += 1
        if calls["n"] == 2 * 3 + 2:  # 3 steps per epoch: second step of the third epoch
            raise KeyboardInterrupt
        return original(images, labels)

    method.training_loss = interrupt_in_epoch_three
    path = str(tmp_path / "ckpt.pt")
    with pytest.raises(KeyboardInterrupt):
        fit(method, toy_set(), optim=optim, batch_size=4, seed=3, progress=False, checkpoint_path=path)
    assert load_checkpoint(path)["epoch"] == 2

    torch.manual_seed(12345)  # the resumed process starts from other random states; the checkpoint restores them
    resumed_method = coop(tiny_clip, seed=99)
    resumed = fit(resumed_method, toy_set(), optim=optim, batch_size=4, seed=3, progress=False, checkpoint_path=path)
    assert resumed.resumed_from == {"stage": 0, "epoch": 2}
    assert [r["epoch"] for r in resumed.history] == [2, 3]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history[2:]]
    for name, value in params(reference).items():
        assert torch.equal(value, params(resumed_method)[name]), name


def test_checkpoint_is_weights_only_and_holds_only_prompts(tiny_clip, tmp_path):
    method = build_method("maple", tiny_clip, CLASSES)
    path = tmp_path / "ckpt.pt"
    fit(method, toy_set(4), optim=OptimConfig(epochs=1), batch_size=4, seed=1, progress=False,
        checkpoint_path=str(path))
    state = torch.load(path, weights_only=True)
    assert set(state["prompts"]) == {name for name, _ in method.prompt_parameters()}
    assert not any(name.startswith("clip.") for name in state["prompts"])
    assert {"optimizer", "schedule", "scaler", "rng", "epoch", "stage", "counters"} <= set(state)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temporary file


def test_multi_stage_method_trains_each_stage_with_a_fresh_schedule_and_resumes_between_stages(tiny_clip, tmp_path):
    def build():
        torch.manual_seed(0)
        return build_method("aple", tiny_clip, CLASSES)

    stages = [s.name for s in build().stages()]
    assert len(stages) == 2
    optim = OptimConfig(lr=0.01, epochs=2, per_stage={stages[1]: {"epochs": 3, "lr": 0.02}})
    reference = build()
    full = fit(reference, toy_set(8), optim=optim, batch_size=4, seed=5, progress=False)
    assert [(r["stage"], r["epoch"]) for r in full.history] == [(stages[0], 0), (stages[0], 1), (stages[1], 0),
                                                                (stages[1], 1), (stages[1], 2)]
    assert full.history[2]["lr"] == 1e-5 and full.history[3]["lr"] == pytest.approx(0.02)

    method = build()
    calls = {"n": 0}
    original = method.training_loss

    def interrupt_at_first_step_of_stage_two(images, labels):
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 1:
            raise KeyboardInterrupt
        return original(images, labels)

    method.training_loss = interrupt_at_first_step_of_stage_two
    path = str(tmp_path / "ckpt.pt")
    with pytest.raises(KeyboardInterrupt):
        fit(method, toy_set(8), optim=optim, batch_size=4, seed=5, progress=False, checkpoint_path=path)
    resumed_method = build()
    resumed = fit(resumed_method, toy_set(8), optim=optim, batch_size=4, seed=5, progress=False,
                  checkpoint_path=path)
    assert [(r["stage"], r["epoch"]) for r in resumed.history] == [(stages[1], 0), (stages[1], 1), (stages[1], 2)]
    for name, value in params(reference).items():
        assert torch.equal(value, params(resumed_method)[name]), name


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_mixed_precision_paths_run_on_cpu(tiny_clip, tmp_path, precision):
    """bf16 autocast works on CPU. fp16 autocast on CPU exists in recent PyTorch (2.3+): when it does, the fp16
    path (autocast + GradScaler) must train; when it does not, asking for it is a clear ConfigError."""
    device = torch.device("cpu")
    if precision == "fp16":
        try:
            check_autocast(device, "fp16")
        except ConfigError as error:
            assert "fp16" in str(error) and "use fp32 or bf16" in str(error)
            with pytest.raises(ConfigError):
                fit(coop(tiny_clip), toy_set(4), optim=OptimConfig(epochs=1), batch_size=4, seed=1,
                    precision="fp16", progress=False)
            return
    method = coop(tiny_clip)
    seen = []
    original = method.forward

    def spy(images, class_side=None):
        logits = original(images, class_side)
        seen.append(logits.dtype)
        return logits

    method.forward = spy
    before = params(method)
    path = tmp_path / "ckpt.pt"
    summary = fit(method, toy_set(8), optim=OptimConfig(lr=0.05, epochs=2), batch_size=4, seed=1,
                  precision=precision, progress=False, checkpoint_path=str(path))
    expected_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert seen and all(dtype == expected_dtype for dtype in seen)
    after = params(method)
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    assert summary.history[-1]["steps"] > 0
    scaler_state = torch.load(path, weights_only=True)["scaler"]
    assert bool(scaler_state) == (precision == "fp16")  # the grad scaler is used exactly for fp16
    result = evaluate(method, toy_set(6), batch_size=4, precision=precision, progress=False)
    assert result.total == 6


def test_non_finite_loss_under_fp16_is_skipped_and_reported(tiny_clip, caplog):
    """Under fp16 the loss scaler owns an overflow (fp32/bf16 stop: tests/test_reliability_training.py)."""
    method = coop(tiny_clip)
    original = method.training_loss
    calls = {"n": 0}

    def sometimes_nan(images, labels):
        calls["n"] += 1
        loss, logits = original(images, labels)
        return (loss * float("nan") if calls["n"] == 2 else loss), logits

    method.training_loss = sometimes_nan
    with caplog.at_level(logging.WARNING, logger="vlprompt"):
        summary = fit(method, toy_set(8), optim=OptimConfig(lr=0.05, epochs=2), batch_size=4, seed=1,
                      precision="fp16", progress=False)
    assert [r["nonfinite_loss"] for r in summary.history] == [1, 0]
    assert summary.skipped_steps == sum(r["skipped_steps"] for r in summary.history)
    assert any("loss is nan" in record.message for record in caplog.records)
    assert all(torch.isfinite(v).all() for v in params(method).values())


def test_non_finite_gradients_under_fp16_are_skipped_without_touching_parameters(tiny_clip):
    method = coop(tiny_clip)
    original = method.training_loss

    def infinite_gradient(images, labels):
        loss, logits = original(images, labels)
        ctx = next(p for _, p in method.trainable_parameters())
        return loss + torch.sqrt((ctx - ctx).sum()), logits  # finite value 0, gradient inf * 0 = nan

    method.training_loss = infinite_gradient
    before = params(method)
    summary = fit(method, toy_set(4), optim=OptimConfig(lr=0.05, epochs=2), batch_size=4, seed=1, precision="fp16",
                  progress=False)
    assert summary.skipped_steps == 2 and summary.history[1]["nonfinite_grad"] == 1
    assert all(torch.equal(before[k], v) for k, v in params(method).items())


def test_evaluate_caches_the_class_side_and_reports_per_class_accuracy(tiny_clip, tmp_path):
    from PIL import Image

    from vlprompt.data import Datum, ImageDataset, build_transform

    method = coop(tiny_clip)
    calls = {"n": 0}
    original = method.encode_classes

    def counting():
        calls["n"] += 1
        return original()

    method.encode_classes = counting
    items = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 40), (40 * i, 100, 200)).save(path)
        items.append(Datum(str(path), i % 3, CLASSES[i % 3]))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    items.append(Datum(str(broken), 0, CLASSES[0]))
    dataset = ImageDataset(items, build_transform(False, 32, tiny_clip.image_mean, tiny_clip.image_std))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = evaluate(method, dataset, batch_size=2, progress=False)
    assert calls["n"] == 1  # once per class set, not per batch
    assert result.total == 5 and result.skipped == [str(broken)]
    assert result.per_class_total == [2, 2, 1]
    assert result.accuracy == pytest.approx(100 * result.correct / 5)
    expected = [100 * c / t for c, t in zip(_per_class_correct(method, dataset), [2, 2, 1])]
    assert result.per_class_accuracy == pytest.approx(expected)


def _per_class_correct(method, dataset):
    correct = [0, 0, 0]
    with torch.no_grad():
        for index in range(len(dataset)):
            sample = dataset[index]
            if sample is None:
                continue
            image, label = sample
            correct[label] += int(method(image[None]).argmax() == label)
    return correct
