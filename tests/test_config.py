"""Configs: every registry entry has its YAML, every YAML composes and validates."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_cfg

from vgrad import config
from vgrad.errors import ConfigError
from vgrad.train import CONF_DIR

CHOICES = [(g, n) for g, registry in config.GROUPS.items() for n in sorted(registry)]


@pytest.mark.parametrize("group", sorted(config.GROUPS))
def test_registry_and_yaml_files_name_the_same_choices(group):
    files = {p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml")}
    assert files == set(config.GROUPS[group])


@pytest.mark.parametrize("group,name", CHOICES)
def test_every_choice_composes_with_its_schema(group, name):
    cfg = compose_cfg(f"{group}={name}")
    node = cfg[group]
    assert node.name == name
    schema = config.GROUPS[group][name].schema
    assert set(node.keys()) == set(schema.__dataclass_fields__)


def test_nielsen_init_brings_nielsens_bias_init_unless_overridden():
    cfg = compose_cfg("init=nielsen")
    assert cfg.bias_init.name == "normal" and cfg.bias_init.std == 1.0
    assert compose_cfg("init=nielsen", "bias_init=zeros").bias_init.name == "zeros"


def test_validate_accepts_the_default_config():
    config.validate(compose_cfg())


@pytest.mark.parametrize("override,key", [
    ("depth=0", "depth"), ("width=0", "width"), ("epochs=0", "epochs"),
    ("batch_size=0", "batch_size"), ("seeds=0", "seeds"), ("optim.lr=0", "optim.lr"),
    ("record.every=0", "record.every"), ("bn_momentum=1.0", "bn_momentum"),
    ("data.test_size=1.0", "data.test_size"), ("data.scale=log", "data.scale"),
    ("record.sat_threshold=0", "record.sat_threshold"),
])
def test_validate_rejects_out_of_range_values_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        config.validate(compose_cfg(override))
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}=") and "expected" in str(err.value)
    assert "\n" not in str(err.value)


def test_config_yaml_lists_every_registered_probe():
    from vgrad import probes

    cfg = compose_cfg()
    assert list(cfg.record.step_probes) == [p for p in probes.STEP_PROBES
                                            if p not in probes.OPT_IN]
    assert list(cfg.record.epoch_probes) == [p for p in probes.EPOCH_PROBES
                                             if p not in probes.OPT_IN]
    with pytest.raises(ConfigError, match="record.step_probes=nope"):
        config.validate(compose_cfg("record.step_probes=[nope]"))


@pytest.mark.parametrize("launcher,key,value", [("slurm", "gpus_per_node", 1),
                                                ("parallel", "n_jobs", 2)])
def test_launcher_examples_compose_over_hydras_plugins(launcher, key, value):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher[key] == value
    assert "hydra_plugins" in cfg.hydra.launcher._target_
