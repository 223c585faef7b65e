"""The training loop. It knows nothing about which method it trains: it only calls the
:class:`~vlprompt.methods.base.PromptMethod` interface (``stages``, ``set_stage``, ``trainable_parameters``,
``training_loss``, ``prompt_state_dict``, ``load_prompt_state_dict``).

One call of :func:`fit` trains every stage of a method in order; each stage gets a fresh SGD optimizer and
warmup + cosine schedule (:mod:`vlprompt.engine.optim`). After every epoch a checkpoint is written atomically;
given the same checkpoint path, an interrupted call resumes after the last completed epoch and ends with the
same parameters as an uninterrupted one (the random states, including the sampler's, are restored).

Mixed precision: ``fp32``; ``bf16`` autocast; ``fp16`` autocast with a gradient scaler. Non-finite values never
reach a result in silence. Under fp16 the loss scaler owns them: a step whose loss or gradients overflow is
skipped (no parameter update), counted and logged, and the scale lowered — unless it happens
``FP16_SKIPS_IN_A_ROW`` times in a row. Anywhere else a non-finite loss or gradient, and under any precision
non-finite parameters after a step, stop the run with :class:`~vlprompt.errors.NonFiniteTrainingError`; the
checkpoint of the last finished epoch (finite by construction) is kept, and a checkpoint whose prompts are
not finite is refused on resume.

Data order and augmentation depend only on the seed: each epoch's order is the seeded ``RandomSampler`` order
(drawn once per epoch, by the training loop alone: nothing else iterates the loader), and each image's random
augmentation is drawn under torch, Python and NumPy seeds derived from (seed, stage, epoch, image) — so the
images a step sees and how they are augmented are the same with any number of data-loader workers or of
processes. The workers are started once per :func:`fit` and kept across epochs; they draw their own seeds from
a private generator, never from the global random state the method may use. One progress bar covers the
whole of a :func:`fit` call (every stage and epoch), so its time estimate is the run's.

Under ``torchrun`` (:mod:`vlprompt.engine.distributed`) each process takes its share of every global batch of
``batch_size`` images and the gradients are averaged so that every step equals the single-process step; only
rank 0 writes the checkpoint.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler
from tqdm import tqdm  # not tqdm.auto: its asyncio class iterates what it is given once more on its own

from vlprompt.engine import checkpoint as ckpt
from vlprompt.engine import distributed
from vlprompt.engine.config import OptimConfig
from vlprompt.engine.optim import EpochSchedule, build_optimizer
from vlprompt.errors import CheckpointError, ConfigError, NonFiniteTrainingError

log = logging.getLogger("vlprompt")

AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
LOGGED_SKIPS = 5  # non-finite steps logged one by one per run; the rest only counted
# GradScaler starts at a scale of 2**16 and halves it at each overflow: this many overflows in a row take it
# below 2**-16, where the gradients of a healthy model no longer overflow fp16 — the run itself has diverged.
FP16_SKIPS_IN_A_ROW = 32


@dataclass
class TrainSummary:
    """What :func:`fit` did. ``history`` holds one record per epoch trained in this call (as in metrics.jsonl)."""

    epochs_trained: int = 0
    skipped_steps: int = 0
    skipped_images: int = 0
    seconds: float = 0.0
    resumed_from: dict[str, int] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA if available, else MPS, else CPU. Under ``torchrun``, ``auto`` and ``cuda`` mean
    ``cuda:LOCAL_RANK`` (one GPU per process)."""
    if name == "auto":
        if torch.cuda.is_available():
            return distributed.local_cuda_device()
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return distributed.local_cuda_device() if name == "cuda" else device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32).

    Raises :class:`ConfigError` when this PyTorch cannot autocast to that dtype on that device (rather than
    letting ``torch.autocast`` warn and silently run in fp32).
    """
    if precision not in AUTOCAST_DTYPES:
        raise ConfigError(f"precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {precision!r}")
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    check_autocast(device, precision)
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_autocast(device: torch.device, precision: str) -> None:
    dtype = AUTOCAST_DTYPES[precision]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device_type=device.type, dtype=dtype):
                probe = torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
    except (RuntimeError, AssertionError) as error:
        raise ConfigError(f"precision {precision}: autocast to {dtype} is not supported on {device.type} by "
                          f"torch {torch.__version__} ({error}); use fp32 or bf16") from None
    if probe.dtype != dtype:
        raise ConfigError(f"precision {precision}: torch {torch.__version__} does not autocast to {dtype} on "
                          f"{device.type}; use fp32 or bf16")


class EpochSampler(Sampler):
    """One epoch of training indices, each paired with the seed of its augmentation: ``(index, seed)``.

    The order is that of ``RandomSampler(range(size), generator=generator)``, cut into global batches of
    ``batch_size`` (the last, partial one dropped when the set fills at least one batch, as Dassl does); rank
    ``rank`` of ``world_size`` yields its contiguous share of every global batch. With one process that is the
    plain ``RandomSampler`` order. Call :meth:`set_epoch` before each epoch: the augmentation seeds depend on
    (``generator``'s seed, stage, epoch, index), never on the rank or the number of processes.
    """

    def __init__(self, size: int, batch_size: int, generator: torch.Generator, rank: int = 0, world_size: int = 1):
        self.size, self.batch_size, self.generator = size, batch_size, generator
        self.rank, self.world_size = rank, world_size
        self.order = RandomSampler(range(size), generator=generator)
        self.drop_last = size >= batch_size
        self.global_batches = size // batch_size if self.drop_last else 1
        self.epoch_key = (0, 0)

    def set_epoch(self, stage: int, epoch: int) -> None:
        self.epoch_key = (stage, epoch)

    def _share(self, batch_length: int) -> slice:
        return slice(batch_length * self.rank // self.world_size, batch_length * (self.rank + 1) // self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = list(self.order)
        seeds = augmentation_seeds(self.generator.initial_seed(), self.epoch_key, self.size)
        for start in range(0, self.global_batches * self.batch_size, self.batch_size):
            for index in order[start:start + self.batch_size][self._share(min(self.batch_size, self.size))]:
                yield index, seeds[index]

    def __len__(self) -> int:
        first = min(self.batch_size, self.size)  # every global batch has this length
        return self.global_batches * len(range(first)[self._share(first)])


def augmentation_seeds(seed: int, epoch_key: tuple[int, int], size: int) -> list[int]:
    """One torch seed per image for one (stage, epoch) of a run with ``seed``."""
    entropy = np.random.SeedSequence([seed, *epoch_key]).generate_state(2, np.uint32)
    generator = torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))
    return torch.randint(0, 2**62, (size,), generator=generator).tolist()


class SeededItems(Dataset):
    """``dataset[index]`` drawn under torch's, Python's and NumPy's random states seeded with ``seed`` for the
    key ``(index, seed)`` (torchvision's random transforms draw from torch; a user's transform may draw from
    the others); the caller's random states are left as they were."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        python_state, numpy_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                return self.dataset[index]
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def make_train_loader(dataset: Dataset, batch_size: int, generator: torch.Generator, num_workers: int = 0,
                      device: torch.device | None = None, rank: int = 0, world_size: int = 1) -> DataLoader:
    """This rank's batches (``batch_size / world_size`` images) of an :class:`EpochSampler` order drawn from
    ``generator``; ``drop_last`` only when the set fills at least one global batch (Dassl).

    The workers persist across epochs, and their base seed comes from a private generator rather than from
    torch's global state (which a loader draws from on every ``iter`` unless given one): how many workers
    there are, or how often they start, then changes no random number the training draws.
    """
    from vlprompt.data import collate_skip_corrupt

    if batch_size % world_size:
        raise ConfigError(f"data.batch_size ({batch_size}) must be a multiple of the number of processes "
                          f"({world_size}), so that the global batch stays {batch_size} images")
    sampler = EpochSampler(len(dataset), batch_size, generator, rank, world_size)
    return DataLoader(
        SeededItems(dataset),
        batch_size=batch_size // world_size,
        sampler=sampler,
        drop_last=sampler.drop_last,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(generator.initial_seed()),
        collate_fn=collate_skip_corrupt,
        pin_memory=device is not None and device.type == "cuda",
    )


def _all_finite(tensors) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def fit(
    method,
    train_set: Dataset,
    *,
    optim: OptimConfig,
    batch_size: int,
    seed: int,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    checkpoint_path: str | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> TrainSummary:
    """Train ``method`` on ``train_set`` (items ``(image, label)``, or None for an unreadable image).

    Args:
        method: a :class:`~vlprompt.methods.base.PromptMethod` already on ``device``.
        optim: learning rate, schedule length and SGD settings; ``optim.per_stage`` refines them per stage.
        batch_size: training batch size.
        seed: seeds the sampler's generator (the order of images in every epoch).
        precision: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast + gradient scaler).
        checkpoint_path: where the per-epoch checkpoint lives; if the file exists, training resumes from it.
        on_epoch: called with each epoch's record (stage, epoch, lr, loss, accuracy, skipped steps, time).
        progress: show tqdm progress bars.

    Under ``torchrun`` (after :func:`vlprompt.engine.distributed.init`) every rank calls ``fit`` with the same
    arguments: ``batch_size`` stays the global batch, rank 0 reads and writes the checkpoint (the others receive
    it), and every rank ends with the same parameters and the same records.
    """
    device = torch.device(device) if isinstance(device, str) else device
    if len(train_set) == 0:
        raise ConfigError("the training set is empty")
    world = distributed.world()
    stages = method.stages()
    sampler_generator = torch.Generator().manual_seed(seed)
    loader = make_train_loader(train_set, batch_size, sampler_generator, num_workers, device, world.rank, world.size)
    context = autocast(device, precision)
    summary = TrainSummary()
    counters = {"skipped_steps": 0, "skips_in_a_row": 0, "train_seconds": 0.0}
    progress = progress and world.main

    resume = distributed.on_main(
        lambda: ckpt.load_checkpoint(checkpoint_path) if checkpoint_path and os.path.isfile(checkpoint_path) else None)
    if resume is not None:
        if [s.name for s in stages] != resume["stage_names"]:
            raise CheckpointError(f"{checkpoint_path}: stages {resume['stage_names']} do not match the method's "
                                  f"{[s.name for s in stages]}; use --overwrite to start again")
        non_finite = ckpt.non_finite_tensors(resume["prompts"])
        if non_finite:  # e.g. written by a version that let a diverged run go on: it must not "finish"
            raise CheckpointError(f"{checkpoint_path}: the checkpoint's prompts hold non-finite values "
                                  f"({', '.join(non_finite)}); it cannot be resumed; use --overwrite to train again")
        method.load_prompt_state_dict(resume["prompts"])
        ckpt.restore_rng(resume["rng"], sampler_generator)
        counters.update(resume["counters"])
        summary.resumed_from = {"stage": resume["stage"], "epoch": resume["epoch"]}
        log.info("resuming from %s: stage %s, %d epoch(s) done", checkpoint_path,
                 stages[resume["stage"]].name, resume["epoch"])
    earlier = resume["history"] if resume is not None else []  # the epoch records of the checkpoint
    distributed.broadcast_parameters(p for _, p in method.prompt_parameters())  # one starting point everywhere

    steps_per_epoch = loader.sampler.global_batches
    epochs_left = _epochs_left(stages, optim, resume)
    kept = f"{checkpoint_path}, after {resume['epoch']} epoch(s) of stage {stages[resume['stage']].name}" \
        if resume is not None else None
    with tqdm(total=sum(epochs_left) * steps_per_epoch, unit="step", leave=False, disable=not progress,
              dynamic_ncols=True) as bar:  # one bar for the whole call: its time estimate is the run's
        for stage_index, stage in enumerate(stages):
            stage_optim = optim.for_stage(stage.name)
            last_epoch = stage_optim.epochs if stage_optim.stop_epoch is None else stage_optim.stop_epoch
            first_epoch = 0
            if resume is not None and stage_index < resume["stage"]:
                continue
            method.set_stage(stage)
            parameters = [p for _, p in method.trainable_parameters()]
            if not parameters or last_epoch == 0:
                log.info("stage %s: nothing to train (%d trainable tensors, %d epochs)", stage.name,
                         len(parameters), last_epoch)
                bar.total -= epochs_left[stage_index] * steps_per_epoch
                bar.refresh()
                continue
            optimizer = build_optimizer(parameters, stage_optim)
            schedule = EpochSchedule(optimizer, stage_optim)
            scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
            if resume is not None and stage_index == resume["stage"]:
                optimizer.load_state_dict(resume["optimizer"])
                schedule.load_state_dict(resume["schedule"])
                if resume["scaler"]:
                    scaler.load_state_dict(resume["scaler"])
                first_epoch = resume["epoch"]
                if first_epoch >= last_epoch:  # the checkpoint ends this stage
                    continue
            log.info("stage %s: %d trainable tensors (%d values), epochs %d..%d of %d, lr %g, batch %d%s, %s",
                     stage.name, len(parameters), sum(p.numel() for p in parameters), first_epoch + 1, last_epoch,
                     stage_optim.epochs, stage_optim.lr, batch_size,
                     f" ({batch_size // world.size} on each of {world.size} processes)" if world.size > 1 else "",
                     precision)

            for epoch in range(first_epoch, last_epoch):
                started = time.perf_counter()
                lr = schedule.start_epoch(epoch)
                loader.sampler.set_epoch(stage_index, epoch)
                bar.set_description(f"{stage.name} {epoch + 1}/{last_epoch}")
                try:
                    record = _train_epoch(method, loader, optimizer, scaler, parameters, context, device, counters,
                                          world.size, bar, desc=f"stage {stage.name}, epoch {epoch + 1}/{last_epoch}")
                except NonFiniteTrainingError as error:
                    saved = (f"; the last finite checkpoint is kept ({kept})" if kept else
                             "; no epoch had finished, so there is no checkpoint" if checkpoint_path else "")
                    raise NonFiniteTrainingError(f"training stopped: {error}; lower optim.lr or check the method "
                                                 f"options and the data{saved}") from None
                method.on_epoch_end(epoch, last_epoch)  # before the checkpoint, which must hold what the hook keeps
                seconds = time.perf_counter() - started
                counters["train_seconds"] += seconds
                record = {"stage": stage.name, "epoch": epoch, "lr": lr, **record, "seconds": round(seconds, 3)}
                if checkpoint_path and world.main:
                    ckpt.save_checkpoint(checkpoint_path, {
                        "stage": stage_index,
                        "stage_names": [s.name for s in stages],
                        "epoch": epoch + 1,
                        "prompts": method.prompt_state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(),
                        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                        "rng": ckpt.capture_rng(sampler_generator),
                        "counters": dict(counters),
                        "history": [*earlier, *summary.history, record],  # metrics.jsonl is rebuilt from it on resume
                    })
                if checkpoint_path:  # (written by rank 0; every rank names it)
                    kept = f"{checkpoint_path}, after {epoch + 1} epoch(s) of stage {stage.name}"
                summary.history.append(record)
                summary.epochs_trained += 1
                log.info("%s epoch %d/%d: lr %.3g, loss %.4f, train acc %.2f%%%s", stage.name, epoch + 1, last_epoch,
                         lr, record["loss"], record["accuracy"],
                         f", {record['skipped_steps']} step(s) skipped" if record["skipped_steps"] else "")
                if on_epoch is not None:
                    on_epoch(record)

    summary.skipped_steps = counters["skipped_steps"]
    summary.seconds = counters["train_seconds"]
    skipped_per_rank = distributed.gather_objects(list(getattr(train_set, "skipped", [])))  # each read its share
    summary.skipped_images = len(set().union(*skipped_per_rank))
    return summary


def _epochs_left(stages, optim: OptimConfig, resume: dict[str, Any] | None) -> list[int]:
    """The epochs each stage still has to train (a checkpoint has done the earlier ones)."""
    left = []
    for index, stage in enumerate(stages):
        stage_optim = optim.for_stage(stage.name)
        last = stage_optim.epochs if stage_optim.stop_epoch is None else stage_optim.stop_epoch
        done = 0 if resume is None or index > resume["stage"] else resume["epoch"] if index == resume["stage"] \
            else last
        left.append(max(0, last - done))
    return left


def _train_epoch(method, loader, optimizer, scaler, parameters, context, device, counters, world_size: int, bar,
                 *, desc: str) -> dict[str, Any]:
    """One epoch of steps (``bar`` advances by one per step). Raises :class:`NonFiniteTrainingError` for a
    non-finite value the fp16 loss scaler does not own (see :func:`_non_finite_step`)."""
    method.train()
    loss_sum, correct, seen, steps = 0.0, 0, 0, 0
    skipped = {"nonfinite_loss": 0, "nonfinite_grad": 0}
    batches: Any = loader
    if world_size > 1:  # every rank takes part in every step, also one whose share of a short batch is empty
        batches = itertools.islice(itertools.chain(loader, itertools.repeat(None)), loader.sampler.global_batches)
    for step, batch in enumerate(batches, 1):
        bar.update()
        where = f"{desc}, step {step}"
        optimizer.zero_grad(set_to_none=True)
        loss = logits = labels = None
        if batch is not None:  # None: every image of this rank's batch was unreadable
            images, labels = (t.to(device, non_blocking=True) for t in batch)
            with context:
                loss, logits = method.training_loss(images, labels)
        loss_finite = loss is None or bool(torch.isfinite(loss))
        if loss is not None and loss_finite:
            scaler.scale(loss).backward()
        images_in_step = labels.numel() if loss is not None and loss_finite else 0
        images_in_step, any_loss_nonfinite = distributed.average_gradients(parameters, images_in_step,
                                                                           not loss_finite)
        if any_loss_nonfinite:
            shown = f"loss is {loss.item()}" if not loss_finite else "loss is not finite in another process"
            _non_finite_step(scaler, counters, skipped, "nonfinite_loss", f"{where}: {shown}")
            continue
        if images_in_step == 0:
            continue
        if scaler.is_enabled():
            scaler.unscale_(optimizer)
        if not _all_finite(p.grad for p in parameters if p.grad is not None):
            reason = "gradient overflow (fp16 loss scale reduced)" if scaler.is_enabled() else "non-finite gradient"
            _non_finite_step(scaler, counters, skipped, "nonfinite_grad", f"{where}: {reason}")  # fp16 goes on
            scaler.step(optimizer)  # sees the inf found by unscale_: no update, only bookkeeping
            scaler.update()  # lowers the loss scale
            continue
        scaler.step(optimizer)
        scaler.update()
        counters["skips_in_a_row"] = 0
        if not _all_finite(parameters):  # finite gradients, yet e.g. an infinite learning rate
            names = [name for name, p in method.trainable_parameters() if not torch.isfinite(p).all()]
            raise NonFiniteTrainingError(f"non-finite prompt values ({', '.join(names)}) after {where}")
        steps += 1
        if logits is not None:
            loss_sum += loss.item() * labels.numel()
            correct += int((logits.argmax(dim=-1) == labels).sum())
            seen += labels.numel()
        if not bar.disable:
            bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}", acc=f"{100 * correct / max(seen, 1):.1f}")
    if world_size > 1:  # the epoch's numbers over the global batches
        totals = distributed.all_reduce_sum(torch.tensor([loss_sum, float(correct), float(seen)], dtype=torch.float64))
        loss_sum, correct, seen = totals[0].item(), int(totals[1].item()), int(totals[2].item())
    total_skipped = sum(skipped.values())
    if steps == 0 and total_skipped:
        log.warning("%s: every step of this epoch was skipped (non-finite values); check the learning rate "
                    "and precision", desc)
    return {
        "loss": loss_sum / seen if seen else math.nan,
        "accuracy": 100.0 * correct / seen if seen else math.nan,
        "steps": steps,
        "skipped_steps": total_skipped,
        **skipped,
    }


def _non_finite_step(scaler, counters: dict, skipped: dict, kind: str, message: str) -> None:
    """A step whose loss or gradients are not finite. Under fp16 the loss scaler owns it: a scale too large for
    fp16 overflows now and then, the step is skipped (and the scale lowered). Without a scaler, or when it
    goes on for ``FP16_SKIPS_IN_A_ROW`` steps, the run has diverged: :class:`NonFiniteTrainingError`."""
    if not scaler.is_enabled():
        raise NonFiniteTrainingError(f"{message} (no fp16 loss scaler owns it)")
    counters["skips_in_a_row"] = counters.get("skips_in_a_row", 0) + 1
    if counters["skips_in_a_row"] >= FP16_SKIPS_IN_A_ROW:
        raise NonFiniteTrainingError(f"{message}, {counters['skips_in_a_row']} non-finite steps in a row under "
                                     f"fp16 loss scaling")
    _skip(counters, skipped, kind, f"{message}; step skipped")


def _skip(counters: dict, skipped: dict, kind: str, message: str) -> None:
    skipped[kind] += 1
    counters["skipped_steps"] += 1
    if counters["skipped_steps"] <= LOGGED_SKIPS:
        log.warning(message)
    elif counters["skipped_steps"] == LOGGED_SKIPS + 1:
        log.warning("further skipped steps are only counted (metrics.jsonl: skipped_steps)")
