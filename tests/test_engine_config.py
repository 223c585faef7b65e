"""Typed configs, packaged presets and their precedence."""

import pytest

from vlprompt.engine.config import (
    PROTOCOL_NAMES,
    RunConfig,
    build_config,
    parse_override,
    preset_file,
    preset_variants,
    resolve_preset,
)
from vlprompt.errors import ConfigError
from vlprompt.methods import available, build_method


def test_precedence_preset_yaml_cli_set(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("optim: {lr: 0.1, epochs: 3}\ndata: {batch_size: 8}\ndevice: cpu\n")
    config = build_config(method="maple", protocol="base2new", dataset="dtd", config_file=str(config_file),
                          cli={"device": "cuda:1"}, overrides=["optim.lr=0.2", "method.options.text_depth=2"])
    assert (config.optim.lr, config.optim.epochs, config.data.batch_size, config.device) == (0.2, 3, 8, "cuda:1")
    assert config.method.options == {"text_depth": 2}
    default = build_config(method="maple", protocol="base2new", dataset="dtd")
    assert (default.optim.lr, default.optim.epochs, default.data.batch_size) == (0.0035, 5, 4)


def test_presets_by_shots_and_by_dataset():
    few = {k: build_config(method="align", protocol="few_shot", dataset="dtd", shots=k).optim.epochs
           for k in (1, 2, 4, 8, 16)}
    assert few == {1: 30, 2: 50, 4: 50, 8: 80, 16: 80}
    assert build_config(method="align", protocol="few_shot", dataset="imagenet", shots=1).optim.epochs == 20
    paper = {k: build_config(method="align", protocol="few_shot", dataset="imagenet", shots=k,
                             preset="paper").optim.epochs for k in (1, 16)}
    assert paper == {1: 10, 16: 40}
    maple_xd = build_config(method="maple", protocol="cross_dataset", dataset="imagenet")
    assert (maple_xd.optim.lr, maple_xd.optim.epochs, maple_xd.method.options) == (0.0026, 2, {"text_depth": 3})
    coop = build_config(method="coop", protocol="few_shot", dataset="dtd", shots=16)
    assert (coop.optim.epochs, coop.data.batch_size, coop.optim.lr) == (200, 32, 0.002)
    assert preset_variants("align", "base2new") == ["default", "paper"]
    assert preset_variants("coop", "base2new") == ["default"]


@pytest.mark.parametrize("method", available())
def test_every_packaged_preset_builds_a_valid_config_and_method(method, tiny_clip):
    """Each (method, protocol, variant, dataset/shots refinement) gives a valid config whose method options the
    method accepts."""
    checked = set()
    for protocol in PROTOCOL_NAMES:
        data = preset_file(method, protocol)
        assert data is not None, f"no preset for {method}/{protocol}"
        assert data.get("source"), "every preset says where its values come from"
        for variant in preset_variants(method, protocol):
            sections = [data["default"]] + ([data["variants"][variant]] if variant != "default" else [])
            datasets = {"dtd"} | {d for s in sections for d in (s.get("by_dataset") or {})}
            shots = {16} | {k for s in sections for k in (s.get("by_shots") or {})}
            for dataset in datasets:
                for k in shots:
                    config = build_config(method=method, protocol=protocol, dataset=dataset, shots=k,
                                          preset=variant)
                    options = repr(sorted(config.method.options.items()))
                    if options not in checked:
                        checked.add(options)
                        build_method(method, tiny_clip, ["a", "b"], **config.method.options)


def test_unknown_and_badly_typed_keys_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.shot'.*shots"):
        RunConfig.from_dict({"data": {"shot": 3}})
    with pytest.raises(ConfigError, match=r"data\.shots must be of type int, got 2\.5"):
        RunConfig.from_dict({"data": {"shots": 2.5}})
    with pytest.raises(ConfigError, match=r"optim\.epochs must be an integer >= 0, got -1"):
        build_config(method="coop", protocol="few_shot", dataset="dtd", overrides=["optim.epochs=-1"])
    with pytest.raises(ConfigError, match="precision must be one of fp32, fp16, bf16"):
        build_config(method="coop", protocol="few_shot", dataset="dtd", overrides=["precision=fp8"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.per_stage\.vision\.momentun'"):
        build_config(method="aple", protocol="few_shot", dataset="dtd",
                     overrides=["optim.per_stage={vision: {momentun: 0.5}}"])
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_override("optim.lr")


def test_identity_ignores_runtime_settings():
    a = build_config(method="coop", protocol="few_shot", dataset="dtd", cli={"device": "cpu"})
    b = build_config(method="coop", protocol="few_shot", dataset="dtd",
                     overrides=["device=cuda", "data.num_workers=0", "output=elsewhere", "eval.batch_size=7"])
    c = build_config(method="coop", protocol="few_shot", dataset="dtd", overrides=["optim.lr=0.1"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_stop_epoch_of_a_preset_is_dropped_with_a_new_schedule_length():
    assert resolve_preset("align", "base2new")["optim"]["stop_epoch"] == 15
    config = build_config(method="align", protocol="base2new", dataset="dtd", overrides=["optim.epochs=4"])
    assert (config.optim.epochs, config.optim.stop_epoch) == (4, None)
    with pytest.raises(ConfigError, match="stop_epoch must be between 0 and optim.epochs"):
        build_config(method="align", protocol="base2new", dataset="dtd",
                     overrides=["optim.epochs=4", "optim.stop_epoch=5"])


def test_train_crop_scale_is_configurable_and_validated():
    from vlprompt.data import build_transform

    config = build_config(method="coop", protocol="few_shot", dataset="dtd", overrides=["data.crop_scale=[0.5, 1.0]"])
    assert config.data.crop_scale == [0.5, 1.0]
    crop = build_transform(True, 32, (0.5,) * 3, (0.5,) * 3, crop_scale=config.data.crop_scale).transforms[1]
    assert crop.scale == (0.5, 1.0)
    assert build_config(method="coop", protocol="few_shot", dataset="dtd").data.crop_scale == [0.08, 1.0]
    with pytest.raises(ConfigError, match="data.crop_scale"):
        build_config(method="coop", protocol="few_shot", dataset="dtd", overrides=["data.crop_scale=[0.9, 0.1]"])
