"""Data-parallel training on several processes (GPUs or CPU cores, one or many machines), launched by ``torchrun``.

``torchrun`` starts one process per device and describes each one in its environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``…). :func:`init` joins that process group (NCCL when the run uses CUDA, gloo
otherwise); without those variables everything here is a no-op and the engine runs as one process.

What a run on W processes does, and why it equals the run on one process:

* **sampling** — every rank draws the same seeded random order of the few-shot subset (the single-process
  order), cuts it into global batches of ``data.batch_size`` and takes its contiguous share (batch / W images);
  an image's augmentation is seeded by (run seed, stage, epoch, image), not by the process
  (:mod:`vlprompt.engine.trainer`);
* **gradients** — after ``backward`` the gradients of the trainable parameters are summed over ranks, each
  weighted by the number of images it saw, and divided by the global count (:func:`average_gradients`): the
  gradient of the global batch's mean loss, so every rank takes the single-process SGD step;
* **evaluation** — each rank classifies a contiguous shard of the test set; the per-class counts are summed;
* **files** — only rank 0 reads and writes the run folder (config, metrics, checkpoints, prompts, results, log);
  what the other ranks need from it (a checkpoint to resume, earlier prompts) is read by rank 0 and broadcast,
  so multi-node runs need no shared filesystem for the output folder.

Why not ``DistributedDataParallel(method)``: the engine never calls the method's ``forward`` directly (it calls
``training_loss``, which calls ``self(...)`` on the unwrapped module, so DDP's forward bookkeeping would not run),
multi-stage methods change which parameters train between stages (DDP fixes the set when it wraps), some
parameters are unused in some steps (``find_unused_parameters`` costs a graph traversal per step), and DDP
always divides by W — wrong for an uneven last batch, a rank with only unreadable images, or a rank whose loss
is not finite. The learned prompts are small (kilobytes to a few megabytes), so one flat all-reduce of their
gradients per step costs nothing next to the frozen backbone's forward and backward passes. This is also what
broke ``DataParallel`` in the original code bases: it replicates modules per step, and the replicas of
``nn.ParameterList`` prompt parameters are empty; here nothing is replicated.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the ``size`` processes of a run (``size == 1``: not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        """Rank 0: the process that reads and writes files and prints."""
        return self.rank == 0


def launched() -> World:
    """The world ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def world() -> World:
    """The process group this process has joined (:func:`init`), or a single-process world."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=launched().local_rank,
                 backend=str(dist.get_backend()))


def init(device: torch.device) -> World:
    """Join the process group ``torchrun`` set up (once per process): NCCL if ``device`` is CUDA, else gloo.

    A no-op without ``torchrun``'s environment or when already joined. ``device`` should come from
    :func:`~vlprompt.engine.trainer.resolve_device`, which maps ``auto``/``cuda`` to ``cuda:LOCAL_RANK``.
    """
    if launched().size <= 1 or dist.is_initialized():
        return world()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return world()


@contextmanager
def session() -> Iterator[None]:
    """Leave the process group at the end of the block if it was joined inside it (what a CLI command does)."""
    joined_before = dist.is_available() and dist.is_initialized()
    try:
        yield
    finally:
        if not joined_before and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def local_cuda_device() -> torch.device:
    """``cuda:LOCAL_RANK`` under ``torchrun``; plain ``cuda`` (the current device) in a single process."""
    here = launched()
    return torch.device("cuda", here.local_rank) if here.size > 1 else torch.device("cuda")


# --------------------------------------------------------------------------------------------- collectives


def _comm_device() -> torch.device:
    """Where tensors must be for the backend's collectives (CUDA for NCCL)."""
    if world().backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(value: T, src: int = 0) -> T:
    """Rank ``src``'s ``value`` on every rank (picklable values; ``value`` is ignored on the other ranks)."""
    if world().size == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src, device=_comm_device())
    return holder[0]


def on_main(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``function`` on rank 0 only and return its result on every rank; if it raises, every rank raises the
    same exception (so one bad file does not leave the other ranks waiting forever)."""
    if world().size == 1:
        return function(*args, **kwargs)
    outcome: tuple[bool, Any] = (True, None)
    if world().main:
        try:
            outcome = (True, function(*args, **kwargs))
        except Exception as error:  # noqa: BLE001 - re-raised below, on every rank
            outcome = (False, error)
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value
    return value


def gather_objects(value: T) -> list[T]:
    """Every rank's ``value``, in rank order (a one-element list in a single process)."""
    if world().size == 1:
        return [value]
    gathered: list[Any] = [None] * world().size
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over ranks (a new tensor on ``tensor``'s device and dtype)."""
    if world().size == 1:
        return tensor.clone()
    reduced = tensor.to(_comm_device(), copy=True)
    dist.all_reduce(reduced)
    return reduced.to(tensor.device)


def broadcast_parameters(parameters: Iterable[torch.nn.Parameter], src: int = 0) -> None:
    """Copy rank ``src``'s parameter values to every rank (the same starting point everywhere)."""
    if world().size == 1:
        return
    with torch.no_grad():
        for parameter in parameters:
            data = parameter.detach().to(_comm_device(), copy=True)
            dist.broadcast(data, src=src)
            parameter.copy_(data.to(parameter.device))


def average_gradients(parameters: list[torch.nn.Parameter], count: int, failed: bool) -> tuple[int, bool]:
    """Turn each rank's gradients into the gradient of the **global** batch's mean loss, the same on every rank.

    Each rank holds the gradient of the mean loss over its ``count`` images; the global batch's is
    ``Σ_r count_r · grad_r / Σ_r count_r`` — the plain average when the shares are equal, and still right for an
    uneven batch or a rank without a readable image (``count = 0``). A parameter that got no gradient on any rank
    keeps ``grad = None`` (SGD leaves it alone, as on one process). ``failed`` (this rank's loss is not finite)
    makes every rank skip the step. One all-reduce of one flat buffer.

    Returns:
        ``(global image count, whether any rank failed)``.
    """
    if world().size == 1:
        return count, failed
    device = parameters[0].device
    pieces = [p.grad.detach().reshape(-1).float() * count if p.grad is not None
              else torch.zeros(p.numel(), device=device) for p in parameters]
    has_grad = torch.tensor([float(p.grad is not None) for p in parameters], device=device)
    flat = all_reduce_sum(torch.cat(pieces + [has_grad, torch.tensor([float(count), float(failed)], device=device)]))
    total, failures = int(flat[-2].item()), flat[-1].item() > 0
    offset = 0
    for index, parameter in enumerate(parameters):
        size = parameter.numel()
        if flat[-2 - len(parameters) + index] > 0 and total > 0:
            parameter.grad = (flat[offset:offset + size] / total).view_as(parameter).to(parameter.dtype)
        else:
            parameter.grad = None
        offset += size
    return total, failures


# --------------------------------------------------------------------------------------------- sharding


def shard(size: int) -> range:
    """This rank's contiguous share of ``range(size)`` (shares differ by at most one item; rank order = index
    order, so gathering per-rank lists in rank order keeps the dataset's order)."""
    here = world()
    return range(size * here.rank // here.size, size * (here.rank + 1) // here.size)
