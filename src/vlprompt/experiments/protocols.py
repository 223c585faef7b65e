"""The four evaluation protocols, run exactly as the reference code runs them (docs/datasets.md, docs/reproduce.md).

* ``few_shot``      — all classes, k shots per class, seeds; test on the full test split.
* ``base2new``      — 16 shots sampled over **all** classes first, then the first ceil(C/2) labels are the base
                      classes: train on base, test on base; the same prompts with the new class names test on new
                      (an (C − m)-way accuracy). H = 2·B·N / (B + N).
* ``cross_dataset`` — train on a source (ImageNet, all classes, 16 shots); test on the source and on each target
                      dataset with the target's own class names and template.
* ``cross_domain``  — the same with ImageNet-V2 / -Sketch / -A / -R as targets (A and R: their 200-class sets).
                      The source model is the same as cross_dataset's: when one of the two protocols has trained
                      it with identical settings, the other reuses its prompts and only evaluates.

:func:`run_experiment` runs one (protocol, dataset, method, shots, seed) into its run folder (resuming an
unfinished one, skipping a finished one); :func:`sweep` loops methods × datasets × shots × seeds in this process
(:func:`vlprompt.experiments.sweep.run_sweep` runs them in parallel worker processes). Launched by ``torchrun``, every
process calls :func:`run_experiment` with the same config; they train and evaluate together and rank 0 alone
writes the run folder (:mod:`vlprompt.engine.distributed`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

from vlprompt.engine import checkpoint as ckpt
from vlprompt.engine import distributed
from vlprompt.engine.config import RunConfig, build_config, normalize_protocol
from vlprompt.engine.evaluate import evaluate
from vlprompt.engine.runs import RunFolder, environment, run_dir, run_identity
from vlprompt.engine.trainer import fit, resolve_device

log = logging.getLogger("vlprompt")

ELEVEN_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                   "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
DOMAIN_TARGETS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")


@dataclass(frozen=True)
class Protocol:
    """A protocol's fixed parts and the defaults ``vlprompt run`` loops over."""

    name: str
    title: str
    train_classes: str  # "all" or "base"
    datasets: tuple[str, ...]
    shots: tuple[int, ...]
    seeds: tuple[int, ...]
    targets: tuple[str, ...] = ()


PROTOCOLS: dict[str, Protocol] = {
    "few_shot": Protocol("few_shot", "few-shot classification", "all", ELEVEN_DATASETS, (1, 2, 4, 8, 16),
                         (1, 2, 3)),
    "base2new": Protocol("base2new", "base-to-new generalisation", "base", ELEVEN_DATASETS, (16,), (1, 2, 3)),
    "cross_dataset": Protocol("cross_dataset", "cross-dataset transfer", "all", ("imagenet",), (16,), (1, 2, 3),
                              ELEVEN_DATASETS[1:]),
    "cross_domain": Protocol("cross_domain", "cross-domain generalisation", "all", ("imagenet",), (16,),
                             (1, 2, 3), DOMAIN_TARGETS),
}


def get_protocol(name: str) -> Protocol:
    return PROTOCOLS[normalize_protocol(name)]


def harmonic_mean(base: float, new: float) -> float:
    """H = 2·B·N / (B + N) (0 when both are 0)."""
    return 2 * base * new / (base + new) if base + new else 0.0


def parse_target(target: str, default_root: str) -> tuple[str, str, str]:
    """``"name"`` or ``"name@root"`` (a target with its own data root, e.g. a custom folder) →
    ``(label, dataset name, root)``."""
    name, _, root = target.partition("@")
    return target, name, root or default_root


# --------------------------------------------------------------------------------------------- one run


def run_experiment(config: RunConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume, or skip if finished) one experiment; return the content of its ``results.json``.

    Under ``torchrun`` this joins the process group (NCCL on CUDA, else gloo); every rank returns rank 0's
    results.
    """
    world = distributed.init(resolve_device(config.device))
    folder = RunFolder(run_dir(config))
    # Data, then weights, then the method: what is missing or wrong fails before the run folder exists.
    inputs = None if folder.finished and not overwrite else _load_inputs(config)
    with contextlib.ExitStack() as claimed:
        # Rank 0 alone holds the folder's lock, for the whole run, and checks the stored identity; every rank
        # gets its status, or its error (another identity, another process in the folder).
        status = distributed.on_main(lambda: claimed.enter_context(folder.claim(config, overwrite=overwrite)))
        if status == "finished":
            log.info("%s: finished already, same settings (use --overwrite to run it again)", folder.path)
            return distributed.on_main(folder.results)
        with folder.logging_to_file(log) if world.main else contextlib.nullcontext():
            log.info("%s run %s%s", "resuming" if status == "partial" else "starting", folder.path,
                     f" on {world.size} processes ({world.backend})" if world.size > 1 else "")
            return _run(config, folder, world, inputs or _load_inputs(config))


@dataclass
class RunInputs:
    """What a run reads before it writes anything (:func:`_load_inputs`)."""

    started: float  # time.perf_counter() when loading began
    device: Any
    splits: Any  # the k-shot DatasetSplits of every class
    train_splits: Any  # the classes the protocol trains on
    eval_sets: list  # (label, dataset name, class set, DatasetSplits) of each evaluation
    clip: Any
    method: Any


def _load_inputs(config: RunConfig) -> RunInputs:
    """The run's data, then its backbone, then its method.

    Data first: a wrong data root is reported as such, not after (or hidden behind) a weights download; every
    evaluation target is read here too, not after hours of training. Loading the backbone does not change the
    random state that sampling the shots left (:func:`~vlprompt.weights.load_clip`), so the method's prompts are
    initialised exactly as when the backbone was loaded first.
    """
    from vlprompt.weights import load_clip
    from vlprompt.data import build_dataset, sample_few_shot, subsample_classes
    from vlprompt.data.fewshot import FewShotWarning
    from vlprompt.methods import build_method

    started = time.perf_counter()
    protocol = get_protocol(config.protocol)
    device = resolve_device(config.device)
    # Seeds Python/NumPy/torch with the run seed, then draws the k-shot subset (Dassl's order of calls).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewShotWarning)  # logged by _run, so that the run's log has it too
        splits = sample_few_shot(build_dataset(config.data.dataset, config.data.root, **config.data.options),
                                 config.data.shots, config.seed, cache_dir=config.data.cache_dir)
    train_splits = subsample_classes(splits, protocol.train_classes)
    eval_sets = _evaluation_sets(config, protocol, splits, subsample_classes, build_dataset)
    clip = load_clip(config.backbone.name, config.backbone.pretrained, device=device)
    if config.backbone.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    method = build_method(config.method.name, clip, train_splits.classnames, train_splits.template,
                          **config.method.options).to(device)
    return RunInputs(started, device, splits, train_splits, eval_sets, clip, method)


def _run(config: RunConfig, folder: RunFolder, world: distributed.World, inputs: RunInputs) -> dict[str, Any]:
    from vlprompt.backbone import describe
    from vlprompt.data import ImageDataset, build_transform
    from vlprompt.data.fewshot import short_classes, shortfall_message

    started, device, clip, method = inputs.started, inputs.device, inputs.clip, inputs.method
    splits, train_splits = inputs.splits, inputs.train_splits
    protocol = get_protocol(config.protocol)
    train_transform = build_transform(True, clip.image_size, clip.image_mean, clip.image_std,
                                      crop_scale=config.data.crop_scale)
    test_transform = build_transform(False, clip.image_size, clip.image_mean, clip.image_std)
    short = short_classes(splits, config.data.shots)  # recorded in results.json
    if short:
        log.warning(shortfall_message(splits, config.data.shots, short))
    log.info("%s (preset %s) on %s, %s classes: %d training images of %d classes (%d shots, seed %d); backbone "
             "%s on %s, %s", config.method.name, config.preset, config.data.dataset, protocol.train_classes,
             len(train_splits.train), train_splits.num_classes, config.data.shots, config.seed, clip.name, device,
             config.precision)

    # Methods on frozen image features: encoded once (or read back from the run folder), before training or
    # loading, since their learned state may be shaped by them (a cache model's keys).
    features = None
    if method.feature_needs is not None:
        from vlprompt.engine.features import prepare_features

        features = prepare_features(method.feature_needs, clip, train_splits.train, train_splits.val,
                                    train_transform=train_transform, test_transform=test_transform, seed=config.seed,
                                    folder=folder.path, batch_size=config.eval.batch_size, device=device,
                                    precision=config.precision, num_workers=config.data.num_workers,
                                    write=world.main)
        method.prepare_features(features)

    # Rank 0 reads the run folder; the other ranks receive what it found.
    earlier = distributed.on_main(_trained_earlier, config, folder)
    if earlier is not None:  # trained earlier (or by the sibling protocol)
        tensors, metadata = earlier
        method.load_prompt_state_dict(tensors)
        training = metadata.get("training", {})
        log.info("training finished earlier; loaded %s", folder.prompts_file)
    else:
        train_set = features.train_dataset() if features else ImageDataset(train_splits.train, train_transform)
        summary = fit(method, train_set, optim=config.optim,
                      batch_size=config.data.batch_size, seed=config.seed, precision=config.precision,
                      device=device, num_workers=config.data.num_workers, checkpoint_path=folder.checkpoint_file,
                      on_epoch=folder.append_metrics if world.main else None, progress=config.progress)
        history = distributed.on_main(folder.metrics)
        training = {
            "epochs": sum(1 for r in history if "epoch" in r),
            "final_loss": history[-1]["loss"] if history else None,
            "skipped_steps": summary.skipped_steps,
            "skipped_images": summary.skipped_images,
            "train_images": len(train_splits.train),
            "seconds": round(summary.seconds, 3),
        }
        if features is not None:  # a fit on the cached features (closed form, search on val) ends the training
            fit_started = time.perf_counter()
            training["feature_fit"] = method.fit_features(features)
            training["seconds"] = round(training["seconds"] + time.perf_counter() - fit_started, 3)
            training["features"] = features.record
        metadata = {"method": config.method.name, "options": method.options, "backbone": clip.name,
                    "classnames": list(train_splits.classnames), "template": train_splits.template,
                    "stages": [s.name for s in method.stages()], "training": training,
                    "vlprompt": environment()["vlprompt"], "config": config.to_dict()}
        if world.main:
            ckpt.save_prompts(folder.prompts_file, method.prompt_state_dict(), metadata)

    evaluations: dict[str, Any] = {}
    eval_seconds = 0.0
    for label, dataset_name, class_set, target in inputs.eval_sets:
        method.set_classnames(target.classnames, target.template)
        reason = method.unavailable_reason(target.classnames)
        if reason is not None:  # e.g. a linear probe on unseen classes: no number rather than an invented one
            evaluations[label] = {"dataset": dataset_name, "class_set": class_set, "accuracy": None,
                                  "not_available": reason}
            log.info("%s (%s, %s classes): not available (%s)", label, dataset_name, class_set, reason)
            continue
        result = evaluate(method, ImageDataset(target.test, test_transform), batch_size=config.eval.batch_size,
                          precision=config.precision, device=device, num_workers=config.data.num_workers,
                          progress=config.progress, desc=f"eval {label}")  # split over the ranks
        eval_seconds += result.seconds
        evaluations[label] = {"dataset": dataset_name, "class_set": class_set, **result.to_dict()}
        log.info("%s (%s, %s classes, %d images): accuracy %.2f%%", label, dataset_name, class_set, result.total,
                 result.accuracy)

    results = {
        "protocol": config.protocol,
        "dataset": config.data.dataset,
        "method": config.method.name,
        "preset": config.preset,
        "tag": config.tag,
        "shots": config.data.shots,
        "short_classes": short,  # classes with fewer training images than shots: {name: images used}
        "seed": config.seed,
        "train_classes": protocol.train_classes,
        "metrics": _metrics(config.protocol, evaluations),
        # why a metric is None: {evaluation label: reason}
        "not_available": {k: e["not_available"] for k, e in evaluations.items() if "not_available" in e},
        "evaluations": evaluations,
        "training": training,
        "method_options": method.options,
        "backbone": describe(clip),
        "precision": config.precision,
        "environment": environment(),
        "wall_time_s": round(training.get("seconds", 0.0) + eval_seconds, 3),
        "this_session_s": round(time.perf_counter() - started, 3),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config_fingerprint": config.fingerprint(),
        "processes": world.size,
    }
    if world.main:
        folder.write_results(results)
        if os.path.isfile(folder.checkpoint_file):
            os.remove(folder.checkpoint_file)  # the resume state is no longer needed; prompts.safetensors stays
    log.info("results: %s", ", ".join(f"{k} {'n/a' if v is None else f'{v:.2f}'}"
                                      for k, v in results["metrics"].items()))
    return distributed.broadcast_object(results)  # also waits for rank 0's writes


def _trained_earlier(config: RunConfig, folder: RunFolder) -> tuple[dict, dict] | None:
    """The prompts and metadata of a run whose training finished earlier (or the sibling transfer protocol's,
    copied in); None if it must train — then metrics.jsonl is made to hold the epochs of its checkpoint."""
    shared = None if os.path.isfile(folder.prompts_file) else _trained_sibling(config)
    if shared is not None:  # cross_dataset and cross_domain evaluate the same source model
        log.info("reusing the prompts trained by %s (same source training)", shared.path)
        shutil.copyfile(shared.prompts_file, folder.prompts_file)
        if os.path.isfile(shared.metrics_file):
            shutil.copyfile(shared.metrics_file, folder.metrics_file)
    if os.path.isfile(folder.prompts_file):
        return ckpt.load_prompts(folder.prompts_file)
    folder.restore_metrics(ckpt.load_checkpoint(folder.checkpoint_file)
                           if os.path.isfile(folder.checkpoint_file) else None)
    return None


def _trained_sibling(config: RunConfig) -> RunFolder | None:
    """The run of the other transfer protocol that trained exactly this source model, if it finished training."""
    others = {"cross_dataset": "cross_domain", "cross_domain": "cross_dataset"}
    if config.protocol not in others:
        return None
    sibling_config = RunConfig.from_dict({**config.to_dict(), "protocol": others[config.protocol]})
    sibling = RunFolder(run_dir(sibling_config))
    if not (os.path.isfile(sibling.prompts_file) and os.path.isfile(sibling.config_file)):
        return None

    def training_part(identity: dict) -> dict:
        return {**identity, "protocol": None, "eval": {**identity["eval"], "targets": None}}

    stored = sibling.stored_identity()
    if stored is None:  # a folder written before identity.json existed
        stored, ours = sibling.config().identity(), config.identity()
    else:
        ours = run_identity(config)
    return sibling if training_part(stored) == training_part(ours) else None


def _evaluation_sets(config: RunConfig, protocol: Protocol, splits, subsample_classes, build_dataset):
    """``(label, dataset, class set, DatasetSplits)`` for each evaluation of the protocol."""
    if protocol.name == "few_shot":
        return [("test", config.data.dataset, "all", splits)]
    if protocol.name == "base2new":
        return [("base", config.data.dataset, "base", subsample_classes(splits, "base")),
                ("new", config.data.dataset, "new", subsample_classes(splits, "new"))]
    sets = [("source", config.data.dataset, "all", splits)]
    for target in config.eval.targets or protocol.targets:
        label, name, root = parse_target(target, config.data.root)
        sets.append((label, name, "all", build_dataset(name, root)))
    return sets


def _metrics(protocol: str, evaluations: dict[str, Any]) -> dict[str, float | None]:
    """The headline numbers of a run (what the report tables show); None where an evaluation was not available
    (and so for H or an average that would need it)."""
    if protocol == "few_shot":
        return {"accuracy": evaluations["test"]["accuracy"]}
    if protocol == "base2new":
        base, new = evaluations["base"]["accuracy"], evaluations["new"]["accuracy"]
        return {"base": base, "new": new, "hm": None if None in (base, new) else harmonic_mean(base, new)}
    metrics = {label: e["accuracy"] for label, e in evaluations.items()}
    targets = [v for k, v in metrics.items() if k != "source"]
    if targets:
        metrics["average"] = None if None in targets else sum(targets) / len(targets)
    return metrics


# --------------------------------------------------------------------------------------------- sweeps


def plan(protocol: str, *, methods: Sequence[str], datasets: Sequence[str] | None = None,
         shots: Sequence[int] | None = None, seeds: Sequence[int] | None = None, preset: str = "default",
         config_file: str | None = None, overrides: Sequence[str] = (), cli: dict | None = None) -> list[RunConfig]:
    """The validated configs of a sweep (methods × datasets × shots × seeds; protocol defaults where None).

    Every config is built before anything runs, so a bad value fails at once rather than hours into a sweep.
    """
    spec = get_protocol(protocol)
    configs = []
    for method in methods:
        for dataset in datasets or spec.datasets:
            for k in shots or spec.shots:
                for seed in seeds or spec.seeds:
                    configs.append(build_config(method=method, protocol=spec.name, dataset=dataset, shots=k,
                                                seed=seed, preset=preset, config_file=config_file,
                                                overrides=list(overrides), cli=cli))
    return configs


def sweep(configs: Sequence[RunConfig], *, overwrite: bool = False) -> list[dict[str, Any]]:
    """Run every config in order (finished runs are skipped, unfinished ones resumed)."""
    results = []
    for index, config in enumerate(configs, 1):
        log.info("[%d/%d] %s", index, len(configs), run_dir(config))
        results.append(run_experiment(config, overwrite=overwrite))
    return results


__all__ = ["DOMAIN_TARGETS", "ELEVEN_DATASETS", "PROTOCOLS", "Protocol", "get_protocol", "harmonic_mean", "plan",
           "run_experiment", "sweep"]
