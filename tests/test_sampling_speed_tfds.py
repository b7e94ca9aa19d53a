"""The sampling-speed study on MNIST and CIFAR-10 read from tfds files in the real format."""

import ml_collections
import numpy as np
import pytest
from test_data_classification import write_tiny_image_dataset

from experiments.sampling_speed import train
from experiments.sampling_speed.configs import cifar10, default, mnist


@pytest.mark.parametrize("name, module", [("mnist", mnist), ("cifar10", cifar10)])
def test_study_reads_prepared_tfds_data(tmp_path, name, module):
    write_tiny_image_dataset(name, tmp_path / "tfds", {"train": 40, "test": 12})
    config = module.get_config()
    config.data.data_dir = str(tmp_path / "tfds")
    config.regimes = ml_collections.ConfigDict(
        {"clean": default.regime(), "duplicates": default.regime(duplicates=2, duplicate_copies=10)}
    )
    config.samplers = ("uniform", "gc")
    config.learning_rates = (0.1,)
    config.num_seeds = 1
    config.model.hidden = (8,)
    config.model.features = (4,)
    config.model.dense = 8
    config.batch_size = 8
    config.num_steps = 8
    config.target_step = 4
    config.eval_every = 2
    config.refresh_every = 4
    config.chunk_size = 16
    config.gc.num_clusters = 4
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert {(r["regime"], r["num_train"]) for r in results["runs"]} == {
        ("clean", 40),
        ("duplicates", 60),
    }
    for run in results["runs"]:
        losses = [p["train_loss"] for p in run["curve"]]
        assert len(losses) == 5 and np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert set(results["regimes"]) == {"clean", "duplicates"}
