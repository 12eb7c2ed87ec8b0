"""Configuration: one validated model, the same keys everywhere."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.config import FederationConfig, load_config_file, parse_site_values
from common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_equals_the_defaults() -> None:
    """`flwr run .` and deployments start from exactly FederationConfig's defaults."""
    with (ROOT / "pyproject.toml").open("rb") as fh:
        app_config = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    assert app_config == FederationConfig().to_run_config()
    assert FederationConfig.from_mapping(app_config) == FederationConfig()


def test_kebab_and_snake_keys_and_round_trip() -> None:
    a = FederationConfig.from_mapping({"local-epochs": 3})
    b = FederationConfig.from_mapping({"local_epochs": 3})
    assert a == b and a.local_epochs == 3
    assert FederationConfig.from_mapping(a.to_run_config()) == a


@pytest.mark.parametrize("values, needle", [
    ({"secagg-num-shares": 2}, "secagg-num-shares"),
    ({"secagg-num-shares": 5, "secagg-threshold": 5}, "below secagg-num-shares"),
    ({"site-epsilon": "site-1"}, "site-epsilon"),
    ({"site-epsilon": "site-1=-3"}, "site-epsilon"),
    ({"accountant": "moments"}, "'rdp' or 'prv'"),
    ({"delta": 1.5}, "delta"),
])
def test_invalid_values_name_the_field(values: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        FederationConfig.from_mapping(values, "test")


def test_site_budgets() -> None:
    cfg = FederationConfig(epsilon=4.0, site_epsilon="site-0=1.5, site-2=3")
    assert parse_site_values(cfg.site_epsilon) == {"site-0": 1.5, "site-2": 3.0}
    assert cfg.site_budget("site-0") == 1.5 and cfg.site_budget("site-1") == 4.0


def test_config_file_flat_or_pyproject_style(tmp_path: Path) -> None:
    flat = tmp_path / "a.toml"
    flat.write_text("rounds = 4\n")
    assert load_config_file(flat) == {"rounds": 4}
    nested = tmp_path / "b.toml"
    nested.write_text("[tool.flwr.app.config]\nrounds = 5\n")
    assert load_config_file(nested) == {"rounds": 5}


def test_shipped_configs_are_valid() -> None:
    paths = sorted((ROOT / "simulations" / "configs").glob("*.toml"))
    assert len(paths) >= 3, "the shipped configs moved: update this test"  # not vacuous
    for path in paths:
        FederationConfig.from_mapping(load_config_file(path), str(path))


def test_image_and_feature_folders_get_defaults_that_learn(tmp_path: Path) -> None:
    from cli._shared import settings
    from common.config import SMALL_DATA_DEFAULTS

    images = tmp_path / "images"
    images.mkdir()
    (images / "labels.csv").write_text("image,label\n")
    cfg = settings(None, [], {"data": str(images)})
    assert cfg.optimizer == "adam" and cfg.rounds == SMALL_DATA_DEFAULTS["rounds"]
    assert settings(None, ["rounds=5"], {"data": str(images)}).rounds == 5  # --set wins
    assert settings(None, [f'data="{images}"'], {}).batch_size == 4
    assert settings(None, [], {}).optimizer == "sgd"  # synthetic bags keep their defaults
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("rounds = 3\n")
    assert settings(str(cfg_file), [], {"data": str(images)}).optimizer == "sgd"  # a config
