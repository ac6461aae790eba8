from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from distill.config import RecipeConfig, load_recipe, shipped_recipes
from distill.errors import UserError

NEEDS_DATA = {"cifar10_resnet": "data.root=/data/cifar", "image_folder": "data.root=/data/img"}


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_loads_and_round_trips(name, tmp_path):
    if name in NEEDS_DATA:
        with pytest.raises(UserError, match=r"missing required value for 'data.root'"):
            load_recipe(name)
    cfg = load_recipe(name, [NEEDS_DATA[name]] if name in NEEDS_DATA else [])
    assert cfg.name == name
    saved = tmp_path / "r.yaml"
    saved.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    again = load_recipe(saved)
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, RecipeConfig)


def test_default_recipe_is_digits_kd():
    cfg = load_recipe(None)
    assert cfg.name == "digits_kd" and cfg.data.name == "digits"


def test_overrides_are_typed_and_applied():
    cfg = load_recipe(None, ["trainer.max_epochs=3", "seed=7", "targets.p99_ms=2.5"])
    assert cfg.trainer.max_epochs == 3 and cfg.seed == 7 and cfg.targets.p99_ms == 2.5


def test_caller_config_is_not_mutated():
    overrides = ["seed=3"]
    load_recipe(None, overrides)
    assert overrides == ["seed=3"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["trainer.max_epoch=3"], r"unknown key 'trainer.max_epoch'"),
        (["seed=abc"], r"bad value for 'seed'"),
        (["targets.p99_ms=-1"], r"'targets.p99_ms' must be > 0; got -1"),
        (["targets.accuracy=1.5"], r"'targets.accuracy' must be in \[0, 1\]; got 1.5"),
        (["prune.target_sparsity=1.0"], r"'prune.target_sparsity' must be in \[0, 1\)"),
        (["prune.start_epoch=5", "prune.end_epoch=2"], r"'prune.end_epoch' \(2\) is before"),
        (["prune.schedule=quadratic"], r"'prune.schedule' must be one of constant"),
        (["trainer.devices=0"], r"'trainer.devices' must be >= 1"),
        (["prune.method=structured", "qat.mode=qat", "qat.start_epoch=2", "prune.end_epoch=3"],
         r"'prune.end_epoch' \(3\) must be before 'qat.start_epoch' \(2\): prune first"),
        (["name=../../x"], r"'name' must be a plain name"),
        (["seed"], r"override 'seed' is not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(overrides, match):
    with pytest.raises(UserError, match=match):
        load_recipe(None, overrides)


def test_missing_recipe_file():
    with pytest.raises(UserError, match=r"recipe file not found: 'nope.yaml'"):
        load_recipe("nope.yaml")


def test_yaml_syntax_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match=r"cannot parse YAML"):
        load_recipe(bad)


def test_unknown_key_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrainer:\n  max_epoch: 3\n")
    with pytest.raises(UserError, match=r"unknown key 'trainer.max_epoch'"):
        load_recipe(bad)


def test_missing_required_value(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndistill:\n  feature:\n    weight: 1.0\n    pairs:\n"
                   "      - {student: stages.0}\n")
    with pytest.raises(UserError, match=r"missing required value for 'distill.feature.pairs"):
        load_recipe(bad)
