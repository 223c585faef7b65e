"""Typed run configuration: presets per (method, protocol) + a YAML file + ``--set key=value`` overrides.

A run is described by one :class:`RunConfig` (nested dataclasses, stored as plain JSON in every run folder).
It is assembled in this order, later sources winning:

1. the dataclass defaults below;
2. the packaged preset of the (method, protocol) pair (``vlprompt/engine/presets/<method>/<protocol>.yaml``): its
   ``default`` section reproduces the original code, named variants (``paper``) are applied on top of it;
   inside a preset, ``by_shots`` and ``by_dataset`` sections refine it (e.g. few-shot epochs per shot count);
3. a user YAML file (same shape as :meth:`RunConfig.to_dict`), then the dedicated command-line options
   (``--backbone``, ``--device``, ``--precision``…);
4. ``--set key=value`` overrides with dotted keys (``optim.lr=0.002``, ``method.options.n_ctx=4``); values are
   parsed as YAML scalars/lists.

Every value is checked by :func:`validate`; a bad one raises :class:`~vlprompt.errors.ConfigError` whose one-line
message names the key and the allowed values.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Mapping

import yaml

from vlprompt.errors import ConfigError
from vlprompt.values import coerce_to_type

PRECISIONS = ("fp32", "fp16", "bf16")
OPTIMIZERS = ("sgd", "adamw")
PROTOCOL_NAMES = ("few_shot", "base2new", "cross_dataset", "cross_domain")
DEFAULT_PRESET = "default"


@dataclass
class BackboneConfig:
    """The frozen CLIP: an open_clip architecture (or ``tiny``), and ``pretrained`` = an open_clip tag
    (``openai``), a local weights file, or null for random weights."""

    name: str = "ViT-B-16-quickgelu"
    pretrained: str | None = "openai"
    grad_checkpointing: bool = False


@dataclass
class MethodConfig:
    """``name`` from :func:`vlprompt.methods.available`; ``options`` are passed to ``build_method`` as keyword
    overrides (their names and allowed values are the method's; see docs/methods.md)."""

    name: str = "coop"
    options: dict[str, Any] = field(default_factory=dict)


def default_num_workers() -> int:
    """Data-loader worker processes when the config names none: one per CPU this process may run on, at most 4.

    More workers than CPUs only compete with the training for them (and make torch warn on every loader); on
    a small or shared machine the default therefore follows the CPUs the process is allowed to use
    (``os.sched_getaffinity``, which also honours ``taskset`` and container limits), not the machine's total.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


@dataclass
class DataConfig:
    """Which dataset, where, and how it is sampled and batched (``num_workers``: :func:`default_num_workers`)."""

    dataset: str = "caltech101"
    root: str = "data"
    options: dict[str, Any] = field(default_factory=dict)  # passed to build_dataset (custom datasets)
    shots: int = 16
    batch_size: int = 4
    num_workers: int = field(default_factory=default_num_workers)
    cache_dir: str | None = None  # few-shot subset cache; None = vlprompt's cache folder
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # train RandomResizedCrop scale (Dassl)


@dataclass
class OptimConfig:
    """SGD + one constant warmup epoch + cosine, stepped per epoch (Dassl semantics; docs/methods.md, 'Conventions').

    ``optimizer`` is ``sgd`` (Dassl's, with ``momentum``) or ``adamw`` (``adam_eps``; the feature baselines whose
    original code uses AdamW, e.g. Tip-Adapter-F); both take ``weight_decay`` and the same schedule.

    ``epochs`` is the length E of the cosine schedule; ``stop_epoch`` (optional) ends training after that many
    epochs of the E-epoch schedule, as the original test scripts do when they load an earlier epoch
    (ALIGN base-to-new: E = 20, epoch 15 tested). Setting ``epochs`` without ``stop_epoch`` on top of a preset
    drops the preset's ``stop_epoch`` (it belongs to the preset's schedule). ``per_stage`` overrides ``lr``/``epochs``/``stop_epoch`` for
    named stages of multi-stage methods (``{"stage2": {"epochs": 3}}``).
    """

    lr: float = 0.002
    epochs: int = 5
    optimizer: str = "sgd"
    adam_eps: float = 1e-8
    stop_epoch: int | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    per_stage: dict[str, dict[str, Any]] = field(default_factory=dict)

    def for_stage(self, stage: str) -> "OptimConfig":
        """This config with the overrides of ``stage`` applied."""
        return dataclasses.replace(self, **self.per_stage.get(stage, {}), per_stage={})


@dataclass
class EvalConfig:
    """Evaluation: batch size, and the target datasets of the transfer protocols (empty = the protocol's); a
    target is a dataset name, or ``name@root`` for one with its own data root (a custom folder)."""

    batch_size: int = 100
    targets: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    """Everything one run needs. ``tag`` distinguishes runs that share (protocol, dataset, method, shots, seed)
    but differ in settings (an ablation); ``preset`` names the preset variant the config was built from."""

    protocol: str = "few_shot"
    preset: str = DEFAULT_PRESET
    seed: int = 1
    tag: str = ""
    precision: str = "fp32"
    device: str = "auto"
    output: str = "runs"
    progress: bool = True
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        return _build(cls, data, "")

    def identity(self) -> dict[str, Any]:
        """The settings that determine the results (what a resumed run must share with the stored one)."""
        data = self.to_dict()
        for key in RUNTIME_KEYS:
            section, _, name = key.rpartition(".")
            (data[section] if section else data).pop(name)
        return data

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


# Keys that may change between a run and its resumption without changing its results.
RUNTIME_KEYS = ("device", "output", "progress", "data.root", "data.num_workers", "data.cache_dir",
                "eval.batch_size", "backbone.grad_checkpointing")


# --------------------------------------------------------------------------------------------- building


def _build(cls, data: Mapping[str, Any], prefix: str):
    """Instantiate dataclass ``cls`` from a mapping, checking key names and value types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key {prefix + str(key)!r}; allowed keys: {', '.join(names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = coerce_to_type(value, hint, prefix + key)
    return cls(**kwargs)


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (``update`` wins); neither input is modified."""
    result = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def parse_override(text: str) -> dict[str, Any]:
    """``"optim.lr=0.002"`` → ``{"optim": {"lr": 0.002}}`` (the value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_0-9][\w]*)*", key):
        raise ConfigError(f"--set expects key=value with a dotted key (e.g. optim.lr=0.002), got {text!r}")
    value = read_yaml_value(raw)
    nested: dict[str, Any] = {}
    cursor = nested
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's numbers: ``2e-3`` and ``1e5`` are floats (YAML 1.1, which PyYAML
    follows, wants a dot and a signed exponent and reads them as text), so ``--set optim.lr=2e-3`` is a number."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml_value(text: str) -> Any:
    """A command-line value read as YAML (``3`` → 3, ``2e-3`` → 0.002, ``[a, b]`` → a list, ``true`` → True); text
    YAML cannot read stays text, an empty value is ""."""
    if not text.strip():
        return ""
    try:
        return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return text


def load_yaml(path: str) -> dict[str, Any]:
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a folder; give a YAML file (see --print-config for its keys)")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.load(handle, Loader=YamlLoader) or {}  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path} cannot be read: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of config keys")
    return data


# --------------------------------------------------------------------------------------------- presets


def normalize_protocol(name: str) -> str:
    """Accept ``few-shot``/``fewshot``/``base-to-new``… spellings; return the canonical protocol name."""
    key = name.strip().lower().replace("-", "_")
    key = {"fewshot": "few_shot", "base_to_new": "base2new", "b2n": "base2new", "xd": "cross_dataset",
           "dg": "cross_domain", "domain_generalization": "cross_domain"}.get(key, key)
    if key not in PROTOCOL_NAMES:
        raise ConfigError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOL_NAMES)}")
    return key


def preset_file(method: str, protocol: str) -> dict[str, Any] | None:
    """The raw preset file of (method, protocol), or None if the library ships none."""
    resource = resources.files("vlprompt.engine") / "presets" / method / f"{protocol}.yaml"
    if not resource.is_file():
        return None
    return yaml.safe_load(resource.read_text(encoding="utf-8")) or {}


def preset_variants(method: str, protocol: str) -> list[str]:
    data = preset_file(method, protocol) or {}
    return [DEFAULT_PRESET] + sorted(k for k in data.get("variants", {}) or {})


def resolve_preset(method: str, protocol: str, variant: str = DEFAULT_PRESET, *, dataset: str | None = None,
                   shots: int | None = None) -> dict[str, Any]:
    """The config overrides a preset makes for one run (a nested dict, possibly empty).

    The preset's ``default`` section is the original code's setting; ``variants.<name>`` (``paper``) is applied
    on top of it. In both, ``by_shots`` entries for ``shots`` and then ``by_dataset`` entries for ``dataset`` refine
    the section they are in.
    """
    data = preset_file(method, protocol)
    variants = ((data or {}).get("variants") or {})
    if variant != DEFAULT_PRESET and variant not in variants:
        allowed = ", ".join([DEFAULT_PRESET] + sorted(variants))
        raise ConfigError(f"preset {variant!r} does not exist for method {method!r}, protocol {protocol!r}; "
                          f"allowed: {allowed}")
    if data is None:
        return {}
    sections = [data.get("default") or {}]
    if variant != DEFAULT_PRESET:
        sections.append(variants[variant] or {})
    result: dict[str, Any] = {}
    for section in sections:
        section = dict(section)
        by_shots = section.pop("by_shots", None) or {}
        by_dataset = section.pop("by_dataset", None) or {}
        section.pop("notes", None)
        result = merge(result, section)
        if shots is not None and shots in by_shots:
            result = merge(result, by_shots[shots])
        if dataset is not None and dataset in by_dataset:
            result = merge(result, by_dataset[dataset])
    return result


def build_config(
    *,
    method: str,
    protocol: str,
    dataset: str | None = None,
    shots: int | None = None,
    seed: int | None = None,
    preset: str = DEFAULT_PRESET,
    config_file: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    cli: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Assemble and validate the config of one run.

    Args:
        method, protocol, dataset, shots, seed: the run's identity (``dataset``/``shots``/``seed`` may come from
            the YAML file or ``overrides`` instead).
        preset: preset variant (``default`` = original code, ``paper`` = paper values where they differ).
        config_file: a YAML file with any part of :class:`RunConfig`.
        overrides: ``key=value`` strings (``--set``), applied last.
        cli: already-nested values from dedicated command-line options (``--backbone``, ``--device``…), applied
            after the YAML file and before ``overrides``.
    """
    protocol = normalize_protocol(protocol)
    late = merge(load_yaml(config_file) if config_file else {}, cli or {})
    for text in overrides:
        late = merge(late, parse_override(text))
    identity: dict[str, Any] = {"protocol": protocol, "preset": preset, "method": {"name": method}}
    if dataset is not None:
        identity.setdefault("data", {})["dataset"] = dataset
    if shots is not None:
        identity.setdefault("data", {})["shots"] = shots
    if seed is not None:
        identity["seed"] = seed
    # The preset depends on the final method, dataset and shots, which the user layers may still change.
    probe = merge(identity, late)
    method_name = (probe.get("method") or {}).get("name", method)
    data = probe.get("data") or {}
    preset_name = probe.get("preset", preset)
    protocol = normalize_protocol(str(probe.get("protocol", protocol)))
    _check_method(method_name)
    config = merge(RunConfig().to_dict(), {"protocol": protocol})
    # The preset's by_shots / by_dataset entries follow the shots and dataset the run uses: the given ones,
    # else the defaults (presets never set these two themselves).
    defaults = DataConfig()
    config = merge(config, resolve_preset(method_name, protocol, preset_name,
                                          dataset=data.get("dataset", defaults.dataset),
                                          shots=data.get("shots", defaults.shots)))
    config = merge(config, identity)
    user_optim = late.get("optim") if isinstance(late.get("optim"), Mapping) else {}
    if "epochs" in user_optim and "stop_epoch" not in user_optim:
        # A preset's stop_epoch belongs to the preset's schedule length: a new length trains to its end.
        config["optim"]["stop_epoch"] = None
    config = merge(config, late)
    run = RunConfig.from_dict(config)
    validate(run)
    return run


# --------------------------------------------------------------------------------------------- validation


def _check_method(name: str) -> None:
    try:
        from vlprompt.methods import available
    except ImportError:  # methods not installed in this build: build_method will say so
        return
    names = list(available())
    if name not in names:
        raise ConfigError(f"method.name: unknown method {name!r}; choose one of {', '.join(names)}")


def _check_method_options(name: str, options: dict[str, Any]) -> None:
    """Names, types and choices of the method's options (:mod:`vlprompt.methods.options`)."""
    from vlprompt.methods.options import check_options

    check_options(name, options)


def _check_backbone(name: str, pretrained: str | None) -> None:
    """A known architecture, and an open_clip tag it has (local files are checked when read)."""
    from vlprompt.weights import check_backbone

    check_backbone(name, pretrained)


def _check_dataset(key: str, name: str) -> None:
    try:
        from vlprompt.data import available_datasets
    except ImportError:
        return
    names = list(available_datasets())
    if name not in names:
        raise ConfigError(f"{key}: unknown dataset {name!r}; choose one of {', '.join(names)}")


FLOAT32_MAX = 3.4028234663852886e38  # training runs in float32 (at least): a larger number is infinite there


def _check_finite(values: Any, key: str = "") -> None:
    """Every number anywhere in the config (method options included) is finite in float32: NaN or infinity in a
    learning rate, a weight or a temperature only ever trains a model into NaN."""
    if isinstance(values, Mapping):
        for name, value in values.items():
            _check_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(values, (list, tuple)):
        for value in values:
            _check_finite(value, key)
    elif isinstance(values, float) and not (math.isfinite(values) and abs(values) <= FLOAT32_MAX):
        raise ConfigError(f"{key} must be a finite number (at most {FLOAT32_MAX:.4g} in size), got {values}")


def _positive_int(key: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value}")


def validate(config: RunConfig) -> None:
    """Raise :class:`ConfigError` for the first invalid value (message: key, value, what is allowed)."""
    _check_finite(config.to_dict())
    normalize_protocol(config.protocol)
    _check_method(config.method.name)
    _check_method_options(config.method.name, config.method.options)
    _check_backbone(config.backbone.name, config.backbone.pretrained)
    _check_dataset("data.dataset", config.data.dataset)
    for target in config.eval.targets:  # "name" or "name@root"
        _check_dataset("eval.targets", target.partition("@")[0])
    if config.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", config.device):
        raise ConfigError(f"device must be auto, cpu, mps, cuda or cuda:N, got {config.device!r}")
    _positive_int("seed", config.seed, 0)
    _positive_int("data.shots", config.data.shots)
    _positive_int("data.batch_size", config.data.batch_size)
    scale = config.data.crop_scale
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"data.crop_scale must be two numbers 0 < low <= high <= 1, got {scale}")
    _positive_int("data.num_workers", config.data.num_workers, 0)
    _positive_int("eval.batch_size", config.eval.batch_size)
    if config.tag and not re.fullmatch(r"[\w.+=-]+", config.tag):
        raise ConfigError(f"tag may hold letters, digits and . _ + = - only, got {config.tag!r}")
    _validate_optim("optim", config.optim)
    allowed = {f.name for f in dataclasses.fields(OptimConfig)} - {"per_stage"}
    for stage, values in config.optim.per_stage.items():
        if not isinstance(values, Mapping):
            raise ConfigError(f"optim.per_stage.{stage} must be a mapping of optim keys")
        for key in values:
            if key not in allowed:
                raise ConfigError(f"unknown config key 'optim.per_stage.{stage}.{key}'; "
                                  f"allowed keys: {', '.join(sorted(allowed))}")
        _validate_optim(f"optim.per_stage.{stage}", config.optim.for_stage(stage))


def _validate_optim(prefix: str, optim: OptimConfig) -> None:
    checked = _build(OptimConfig, dataclasses.asdict(optim), prefix + ".")  # types of per-stage values
    if not checked.lr > 0:
        raise ConfigError(f"{prefix}.lr must be > 0, got {checked.lr}")
    _positive_int(f"{prefix}.epochs", checked.epochs, 0)
    _positive_int(f"{prefix}.warmup_epochs", checked.warmup_epochs, 0)
    if checked.stop_epoch is not None and not 0 <= checked.stop_epoch <= checked.epochs:
        raise ConfigError(f"{prefix}.stop_epoch must be between 0 and {prefix}.epochs ({checked.epochs}), "
                          f"got {checked.stop_epoch}")
    if not 0 <= checked.momentum < 1:
        raise ConfigError(f"{prefix}.momentum must be in [0, 1), got {checked.momentum}")
    if checked.weight_decay < 0 or checked.warmup_lr < 0:
        raise ConfigError(f"{prefix}.weight_decay and {prefix}.warmup_lr must be >= 0")
    if checked.optimizer not in OPTIMIZERS:
        raise ConfigError(f"{prefix}.optimizer must be one of {', '.join(OPTIMIZERS)}, got {checked.optimizer!r}")
    if not checked.adam_eps > 0:
        raise ConfigError(f"{prefix}.adam_eps must be > 0, got {checked.adam_eps}")


def to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
