"""Contrastive pretraining of the toy CLIP on image–caption pairs generated on the fly.

Photo domain only, held-out compositions excluded (:data:`~vlprompt.toyworld.world.PRETRAIN_COMPOSITIONS`).
Symmetric InfoNCE with a learnable temperature (initialised at ln(1/0.07), clamped at 100), AdamW with linear
warmup and cosine decay. The batch of step ``t`` is drawn from ``seed`` and ``t`` alone, so a run interrupted and
resumed from its last checkpoint trains on the same data as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.model import CLIP

from vlprompt.errors import ConfigError
from vlprompt.toyworld.model import (
    CONFIG_FILE,
    IMAGE_MEAN,
    IMAGE_STD,
    MODEL_CFG,
    TOKENIZER,
    WEIGHTS_FILE,
    build_toy_clip,
    get_tokenizer,
    images_to_tensor,
)
from vlprompt.toyworld.render import generate
from vlprompt.toyworld.world import (
    COLOR_NAMES,
    HELD_OUT,
    IMAGE_SIZE,
    PRETRAIN_COMPOSITIONS,
    PRETRAIN_ONLY_COLORS,
    caption_matches,
    captions_of,
    sample_templates,
)
from vlprompt.toyworld.zeroshot import evaluate_zero_shot


@dataclass
class PretrainConfig:
    """Settings of ``vlprompt toyworld pretrain``.

    Attributes:
        steps: optimisation steps (batches).
        batch_size: image–caption pairs per step; also the number of negatives in the contrastive loss.
        lr: peak learning rate, reached after ``warmup_steps`` and decayed to 0 by a cosine.
        warmup_steps: steps of linear warmup.
        weight_decay: AdamW decoupled weight decay on matrices (not on gains, biases or the temperature).
        seed: seeds the initialisation and every batch.
        threads: torch CPU threads. One is the default: on a busy shared machine a second thread mostly spins
            waiting for the first (measured on 2 loaded cores: 2.4x the CPU time for the same forward/backward).
        device: ``"cpu"`` or ``"cuda"``; numbers differ slightly between devices.
        work_dir: holds ``resume.pt`` (every ``checkpoint_every`` steps) and ``pretrain.log``.
        output_dir: where ``toyclip.safetensors`` and ``toyclip.json`` are written.
        checkpoint_every: steps between resumable checkpoints.
        eval_per_class: generated test images per class for the final zero-shot numbers.
        eval_every: steps between quick zero-shot checks in the log (``toy_objects`` and its held-out compositions,
            10 images per class; 0: none). They do not change the training.
        extra_colors: also draw objects in the pretraining-only colors
            (:data:`~vlprompt.toyworld.world.PRETRAIN_ONLY_COLORS`), every shape in each.
    """

    steps: int = 6000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 1
    device: str = "cpu"
    work_dir: Path = Path("toyclip_pretrain")
    output_dir: Path = Path("toyclip")
    checkpoint_every: int = 100
    eval_per_class: int = 50
    eval_every: int = 500
    extra_colors: bool = True
    model_cfg: dict[str, Any] = field(default_factory=lambda: json.loads(json.dumps(MODEL_CFG)))

    def command(self) -> str:
        """The command line that reproduces this run (output paths left out)."""
        default = PretrainConfig()
        options = ["steps", "batch_size", "lr", "warmup_steps", "weight_decay", "seed", "threads", "device"]
        args = [f"--{o.replace('_', '-')} {getattr(self, o)}" for o in options]
        if not self.extra_colors:
            args.append("--no-extra-colors")
        if self.model_cfg != default.model_cfg:
            args.append("# with a model_cfg other than vlprompt.toyworld.model.MODEL_CFG")
        return " ".join(["vlprompt toyworld pretrain", *args])


def pretrain(config: PretrainConfig, log=print) -> dict[str, Any]:
    """Pretrain the toy CLIP, write its weights and JSON into ``config.output_dir``, and return the JSON dict.

    Resumes from ``config.work_dir / "resume.pt"`` when it holds a checkpoint of the same settings.
    """
    from safetensors.torch import save_file

    if config.steps < 1 or config.batch_size < 2:
        raise ConfigError("pretrain needs steps >= 1 and batch_size >= 2")
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    work_dir, output_dir = Path(config.work_dir), Path(config.output_dir)
    work_dir.mkdir(parents=True, exist_ok=True)

    def note(message: str) -> None:
        log(message)
        with (work_dir / "pretrain.log").open("a") as log_file:
            log_file.write(message + "\n")

    model = build_toy_clip(config.model_cfg).to(device)
    optimizer = _optimizer(model, config)
    tokenizer = get_tokenizer()
    token_cache: dict[str, torch.Tensor] = {}
    compositions = np.array(PRETRAIN_COMPOSITIONS)
    if not config.extra_colors:
        compositions = compositions[compositions[:, 0] < len(COLOR_NAMES)]

    settings = _resume_key(config)
    resume_path = work_dir / "resume.pt"
    start_step, elapsed, cpu_time = 0, 0.0, 0.0
    if resume_path.is_file():
        state = torch.load(resume_path, map_location=device, weights_only=True)
        if state["settings"] == settings:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_step, elapsed, cpu_time = state["step"], state["elapsed"], state.get("cpu_time", 0.0)
            note(f"resumed from {resume_path} at step {start_step}")
        else:
            note(f"ignoring {resume_path}: it was made with other settings")
    note(f"pretraining: {config.command()}")

    model.train()
    started = time.perf_counter() - elapsed
    cpu_started = time.process_time() - cpu_time  # CPU seconds: what contention from other processes leaves alone
    for step in range(start_step, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, config)
        images, captions, matches = _batch(config.seed, step, config.batch_size, compositions)
        tokens = _tokenize(captions, tokenizer, token_cache).to(device)
        image_features = F.normalize(model.encode_image(images_to_tensor(images).to(device)), dim=-1)
        text_features = F.normalize(encode_text_truncated(model, tokens), dim=-1)
        logit_scale = model.logit_scale.exp()
        logits = logit_scale * image_features @ text_features.T  # (B, B)
        loss = caption_match_loss(logits, torch.from_numpy(matches).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

        done = step + 1
        if done % 10 == 0 or done == config.steps:
            seconds = time.perf_counter() - started
            note(
                f"step {done}/{config.steps} loss {loss.item():.4f} lr {_learning_rate(step, config):.2e} "
                f"scale {logit_scale.item():.1f} elapsed {seconds:.0f}s"
            )
        if config.eval_every and done % config.eval_every == 0 and done < config.steps:
            quick = evaluate_zero_shot(model, ("toy_objects", "toy_objects_held_out"), n_per_class=10)
            note(f"step {done} zero-shot (10 images per class): {quick}")
        if done % config.checkpoint_every == 0 or done == config.steps:
            state = {
                "settings": settings,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": done,
                "elapsed": time.perf_counter() - started,
                "cpu_time": time.process_time() - cpu_started,
            }
            torch.save(state, work_dir / "resume.pt.tmp")
            (work_dir / "resume.pt.tmp").replace(resume_path)

    wall_time = time.perf_counter() - started
    cpu_time = time.process_time() - cpu_started
    note(f"training done in {wall_time:.0f}s; evaluating zero-shot")
    model = model.cpu().eval()
    state = {name: tensor.detach().to(torch.float16).contiguous() for name, tensor in model.state_dict().items()}
    model.load_state_dict(state)  # evaluate exactly what is shipped: the float16 weights, upcast
    zero_shot = evaluate_zero_shot(model, n_per_class=config.eval_per_class)
    eval_time = time.perf_counter() - started - wall_time
    note(f"zero-shot: {zero_shot}")

    output_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "model_cfg": config.model_cfg,
        "image_size": IMAGE_SIZE,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "tokenizer": TOKENIZER,
        "weights_dtype": "float16",
        "command": config.command(),
        "seed": config.seed,
        "train_steps": config.steps,
        "pretrain_only_colors": list(PRETRAIN_ONLY_COLORS) if config.extra_colors else [],
        "batch_size": config.batch_size,
        "wall_time_s": round(wall_time, 1),
        "eval_time_s": round(eval_time, 1),
        "cpu_time_s": round(cpu_time, 1),
        "torch_threads": config.threads,
        "device": config.device,
        "held_out_compositions": [f"{c} {s}" for c, s in HELD_OUT],
        "zero_shot_template": "a photo of a {}.",
        "zero_shot_test_images_per_class": config.eval_per_class,
        "zero_shot": zero_shot,
    }
    # Written beside the targets, then renamed: an interruption never leaves a truncated file in the package.
    save_file(state, str(output_dir / (WEIGHTS_FILE + ".tmp")))
    (output_dir / (CONFIG_FILE + ".tmp")).write_text(json.dumps(record, indent=2) + "\n")
    (output_dir / (WEIGHTS_FILE + ".tmp")).replace(output_dir / WEIGHTS_FILE)
    (output_dir / (CONFIG_FILE + ".tmp")).replace(output_dir / CONFIG_FILE)
    note(f"wrote {output_dir / WEIGHTS_FILE} and {output_dir / CONFIG_FILE}")
    return record


def encode_text_truncated(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` (unnormalised, (B, D)) computed on the first L positions only, L the longest
    sequence in the batch.

    Exact, not an approximation: the text transformer is causal and pools at the end-of-text token, so positions
    after the longest caption never influence the output. Toy captions are at most ~25 of the 77 positions, which
    makes the text tower about three times cheaper to train.
    """
    length = int((tokens != 0).sum(dim=1).max())
    tokens = tokens[:, :length]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(len(x), device=x.device), tokens.argmax(dim=-1)]  # the end-of-text token has the largest id
    return x @ model.text_projection


def caption_match_loss(logits: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE whose targets are every true caption of an image and every image a caption is true of.

    Args:
        logits: (B, B) scaled similarities, image ``i`` × caption ``j``.
        matches: (B, B) bool, caption ``j`` true of image ``i``; the diagonal is true.

    With one positive per row (``matches`` the identity) this is CLIP's loss. In the toy world a batch of 128 holds
    about four scenes per composition and many partial captions ("a photo of a red shape."), so CLIP's loss would
    push apart pairs that are true; the targets here spread each row's mass uniformly over its true pairs.
    """
    targets = matches.float()
    image_to_text = -(targets / targets.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    text_to_image = -(targets / targets.sum(0, keepdim=True) * F.log_softmax(logits, dim=0)).sum(0).mean()
    return (image_to_text + text_to_image) / 2


def _batch(
    seed: int, step: int, batch_size: int, compositions: np.ndarray
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Step ``step``'s images (B, 64, 64, 3), captions (B,) and caption-match matrix (B, B), from (seed, step)."""
    images, attributes = generate(batch_size, [seed, step], "photo", compositions=compositions)
    templates = sample_templates(batch_size, np.random.default_rng([seed, step, 1]))
    return images, captions_of(attributes, templates), caption_matches(attributes, templates)


def _tokenize(captions: list[str], tokenizer, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, 77) token ids; captions repeat a lot, so each is tokenized once."""
    new = [c for c in dict.fromkeys(captions) if c not in cache]
    if new:
        cache.update(zip(new, tokenizer(new)))
    return torch.stack([cache[c] for c in captions])


def _optimizer(model: torch.nn.Module, config: PretrainConfig) -> torch.optim.AdamW:
    # open_clip's rule: no decay on gains, biases, norms and the temperature.
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        exempt = parameter.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exempt else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)


def _learning_rate(step: int, config: PretrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * config.lr * (1 + math.cos(math.pi * progress))


def _resume_key(config: PretrainConfig) -> dict[str, Any]:
    """The settings a checkpoint must share to be resumed (threads, device and paths may change)."""
    key = asdict(config)
    for name in ("threads", "device", "work_dir", "output_dir", "checkpoint_every", "eval_per_class", "eval_every"):
        key.pop(name)
    key["objective"] = "caption-match targets"  # checkpoints of the one-positive InfoNCE recipe are not resumed
    return json.loads(json.dumps(key))
