"""Tests for jaxeff.train.config: command-line-style overrides and JSON export."""

import json
import textwrap

import ml_collections
import pytest

from jaxeff.train import config_to_json, load_config, parse_config_overrides


def get_config():
    config = ml_collections.ConfigDict()
    config.batch_size = 128
    config.learning_rate = 2e-4
    config.loss = "mh"
    config.warmup = False
    config.model = ml_collections.ConfigDict({"dim": 1024, "name": "gru"})
    return config


def test_overrides_parse_like_the_command_line():
    base = get_config()
    config = parse_config_overrides(
        base, ["batch_size=64", "--config.model.dim=256", "learning_rate=1", "warmup", "loss=sh"]
    )
    assert config.batch_size == 64 and isinstance(config.batch_size, int)
    assert config.model.dim == 256
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.warmup is True
    assert config.loss == "sh"
    assert base.batch_size == 128 and base.model.dim == 1024 and base.warmup is False
    assert parse_config_overrides(base).to_dict() == base.to_dict()


def test_bad_overrides_name_the_problem():
    with pytest.raises(ValueError, match="no_such_field"):
        parse_config_overrides(get_config(), ["no_such_field=1"])
    with pytest.raises(ValueError, match="batch_size"):
        parse_config_overrides(get_config(), ["batch_size=big"])
    with pytest.raises(TypeError, match="overrides"):
        parse_config_overrides(get_config(), "batch_size=64")
    with pytest.raises(TypeError, match="config"):
        parse_config_overrides({"batch_size": 1}, [])


def test_load_config_file_with_overrides(tmp_path):
    path = tmp_path / "default.py"
    path.write_text(
        textwrap.dedent(
            """
        # python -m experiments.toy.main --config=default.py
        import ml_collections

        def get_config(arg=None):
          config = ml_collections.ConfigDict()
          config.num_steps = 3000 if arg is None else int(arg)
          config.optim = ml_collections.ConfigDict({"lr": 2e-4, "clip": 2.0})
          return config
        """
        )
    )
    config = load_config(str(path), ["num_steps=10", "optim.clip=0.5"])
    assert config.num_steps == 10 and config.optim.clip == 0.5 and config.optim.lr == 2e-4
    assert load_config(f"{path}:500").num_steps == 500
    with pytest.raises(FileNotFoundError, match="path"):
        load_config(str(tmp_path / "missing.py"))


def test_config_to_json_round_trip(tmp_path):
    config = get_config()
    config.schedule = (1000, 2000)
    out = tmp_path / "results" / "config.json"
    text = config_to_json(config, out)
    loaded = json.loads(out.read_text())
    assert loaded == json.loads(text)
    assert loaded["model"] == {"dim": 1024, "name": "gru"}
    assert loaded["schedule"] == [1000, 2000] and loaded["learning_rate"] == 2e-4
    assert json.loads(config_to_json({"a": 1, "f": print}))["f"].startswith("<built-in")
    with pytest.raises(TypeError, match="config"):
        config_to_json([1, 2])
