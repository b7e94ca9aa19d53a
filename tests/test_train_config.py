"""Tests for jaxeff.train.config: start-up checks, workdir binding and JSON export."""

import json
import math
import os

import ml_collections
import pytest

from jaxeff.train import bind_config_to_workdir, check_numbers, config_differences, config_to_json


def get_config():
    config = ml_collections.ConfigDict()
    config.batch_size = 128
    config.learning_rate = 2e-4
    config.loss = "mh"
    config.warmup = False
    config.decay = 0.5
    config.log_every = 100
    config.model = ml_collections.ConfigDict({"dim": 1024, "name": "gru", "margin": 0.0})
    return config


def test_check_numbers_names_the_field():
    rules = dict(
        positive=["batch_size", "learning_rate", "model.dim"],
        non_negative=["model.margin"],
        fraction=["decay"],
    )
    check_numbers(get_config(), **rules)  # a valid config passes
    bad_values = [
        ("batch_size", 0),
        ("learning_rate", -1e-3),
        ("learning_rate", math.nan),
        ("learning_rate", math.inf),
        ("model.dim", True),
        ("model.dim", "big"),
        ("model.margin", -0.2),
        ("decay", 1.0),
        ("decay", -0.1),
    ]
    for field, value in bad_values:
        config = get_config().to_dict()  # nested dicts take any type, as a loose config would
        *parents, leaf = field.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
        with pytest.raises(ValueError, match=rf"^config\.{field} must be .*got {value!r}"):
            check_numbers(config, **rules)


def test_check_numbers_integers_have_a_least_value():
    integers = {"batch_size": 1, "model.dim": 1024, "log_every": 0}
    check_numbers(get_config(), integers=integers)  # a valid config passes
    for field, value in [
        ("batch_size", 0),
        ("batch_size", 32.0),
        ("batch_size", True),
        ("batch_size", "32"),
        ("model.dim", 1023),
        ("log_every", -1),
    ]:
        config = get_config().to_dict()
        *parents, leaf = field.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
        with pytest.raises(
            ValueError,
            match=rf"^config\.{field} must be an integer >= {integers[field]}, got {value!r}\.$",
        ):
            check_numbers(config, integers=integers)


def test_config_differences_lists_changed_and_missing_fields():
    old = json.loads(config_to_json(get_config()))
    new = get_config()
    new.learning_rate = 1e-3
    new.model.dim = 512
    with new.unlocked():
        new.extra = 1
    assert config_differences(old, new) == {
        "extra": ("<missing>", 1),
        "learning_rate": (2e-4, 1e-3),
        "model.dim": (1024, 512),
    }
    assert config_differences(old, get_config()) == {}


def test_workdir_refuses_a_different_config(tmp_path):
    workdir = str(tmp_path / "run")
    path = os.path.join(workdir, "config.json")
    assert bind_config_to_workdir(get_config(), workdir) == {}
    first = open(path).read()
    assert json.loads(first)["learning_rate"] == 2e-4

    changed = get_config()
    changed.learning_rate = 1e-3
    changed.model.name = "lstm"
    changed.log_every = 10
    with pytest.raises(ValueError) as error:
        bind_config_to_workdir(changed, workdir, may_differ=["log_every"])
    message = str(error.value)
    assert "learning_rate: 0.0002 -> 0.001" in message and "model.name: 'gru' -> 'lstm'" in message
    assert "log_every" not in message and "--allow_config_change" in message
    assert open(path).read() == first  # refused: config.json untouched

    # Fields allowed to differ, alone, pass and are saved.
    only_logging = get_config()
    only_logging.log_every = 10
    changes = bind_config_to_workdir(only_logging, workdir, may_differ=["log_every"])
    assert changes == {"log_every": (100, 10)}
    assert json.loads(open(path).read())["log_every"] == 10

    # An explicit allowance continues with the new config.
    changes = bind_config_to_workdir(changed, workdir, allow_changes=True)
    assert set(changes) == {"learning_rate", "model.name"}
    assert json.loads(open(path).read())["learning_rate"] == 1e-3


def test_truncated_saved_config_is_an_error(tmp_path):
    bind_config_to_workdir(get_config(), tmp_path)
    path = tmp_path / "config.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        bind_config_to_workdir(get_config(), tmp_path)


def test_config_to_json_round_trip(tmp_path):
    config = get_config()
    config.schedule = (1000, 2000)
    out = tmp_path / "results" / "config.json"
    text = config_to_json(config, out)
    loaded = json.loads(out.read_text())
    assert loaded == json.loads(text)
    assert loaded["model"] == {"dim": 1024, "name": "gru", "margin": 0.0}
    assert loaded["schedule"] == [1000, 2000] and loaded["learning_rate"] == 2e-4
    assert os.listdir(out.parent) == ["config.json"]  # no temporary file left behind
    assert json.loads(config_to_json({"a": 1, "f": print}))["f"].startswith("<built-in")
    with pytest.raises(TypeError, match="config"):
        config_to_json([1, 2])
