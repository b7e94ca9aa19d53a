r"""VSE++ on the generated near-twin shapes data (no download): SH warm-up, then MH.

    python -m experiments.vsepp.main --config=experiments/vsepp/configs/shapes.py \
        --workdir=/tmp/vsepp_shapes

``--config.loss.max_violation=False --config.loss.warmup_steps=0`` gives the SH (VSE0)
baseline; ``--config.loss.warmup_steps=0`` alone gives MH from scratch (which collapses).
Batches hold groups of 8 near-twin images, so hard negatives are in every batch.
"""

from experiments.vsepp.configs import default


def get_config():
    config = default.get_config()
    config.data.name = "shapes"
    config.data.train_families = 1024
    config.data.dev_families = 125
    config.data.test_families = 125
    config.data.family_size = 8
    config.data.seed = 0
    config.data.group_size = 8
    config.data.max_length = 20
    config.data.vocab_threshold = 1

    config.model.image_encoder = "cnn"
    config.model.image_size = 32
    config.model.cnn_features = (16, 32, 64)
    config.model.word_dim = 64
    config.model.embed_size = 128

    config.loss.max_violation = True
    config.loss.warmup_steps = 1500

    config.num_steps = 4500
    config.learning_rate = 2e-4
    config.lr_decay_fraction = 2 / 3
    config.log_every = 50
    config.eval_every = 750
    config.checkpoint_every = 750
    config.eval_batch_size = 500
    return config
