r"""DP-SGD on scikit-learn's 8x8 digits with an MLP: test accuracy against ε (half a minute).

    python -m experiments.dp.main --config=experiments/dp/configs/default.py \
        --workdir=/tmp/dp_digits_mlp

The digits ship with scikit-learn (no download): 1438 training and 359 test images in
``[0, 1]``. One training run per noise multiplier σ of ``privacy.noise_multipliers``:
Poisson-sampled batches (each example drawn with probability ``q = expected_batch_size /
N`` at every step, padded to a fixed batch with weight-0 slots,
:class:`jaxeff.privacy.PoissonSampler`), per-example gradients clipped to L2 norm
``privacy.l2_clip_norm`` and summed (:func:`jaxeff.privacy.clipped_grad`), Gaussian noise
of standard deviation ``σ C`` added by jax-privacy's ``gaussian_privatizer``, divided by
``qN``, then SGD with momentum. ε at ``δ = 1e-5`` after every evaluated step from
dp-accounting's PLD accountant (:func:`jaxeff.privacy.dpsgd_epsilon`). The baselines train
on the same batches: ``non_private`` with the plain mean gradient, ``clip_only`` with the
clipped one and no noise. Every run starts from the same weights, sees the same batches and
draws the same standard normals (scaled by its σ): the runs differ only in σ. Abadi et
al., "Deep Learning with Differential Privacy", CCS 2016, arXiv 1607.00133; tanh
activations as Papernot et al., "Tempered Sigmoid Activations for Deep Learning with
Differential Privacy", AAAI 2021, arXiv 2007.14191.

The small CNN has its own config, ``cnn.py``; ``quick.py`` is the seconds-long run of the
tests.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0  # initial weights, the Poisson batches and the noise (all runs alike)

    config.data = ml_collections.ConfigDict()
    config.data.test_fraction = 0.2  # held-out fraction of the 1797 digits
    config.data.seed = 0  # the train/test split

    config.model = ml_collections.ConfigDict()
    config.model.name = "mlp"  # mlp | cnn
    config.model.activation = "tanh"  # tanh | relu
    config.model.hidden = (128,)  # mlp: widths of the hidden layers
    config.model.features = (8, 16)  # cnn: channels of each 3x3 conv + 2x2 average-pool stage
    config.model.dense = 32  # cnn: width of the hidden dense layer

    config.privacy = ml_collections.ConfigDict()
    config.privacy.noise_multipliers = (0.6, 1.0, 2.0)  # σ: noise std / l2_clip_norm
    config.privacy.l2_clip_norm = 1.0  # C
    config.privacy.method = "book-keeping"  # book-keeping | ghost (jaxeff.privacy.clipped_grad)
    config.privacy.delta = 1e-5
    config.privacy.accountant = "pld"  # pld | rdp
    # Reference runs on the same batches: "non_private" (the plain mean gradient, no
    # clipping, no noise) and "clip_only" (the clipped gradient, σ = 0).
    config.privacy.baselines = ("non_private", "clip_only")

    # Poisson sampling: q = expected_batch_size / N; the gradient sum is divided by qN.
    config.expected_batch_size = 128
    # Slots of the padded batch; 0: the smallest with P(Binomial(N, q) > b) below
    # overflow_probability (jaxeff.privacy.padded_batch_size).
    config.batch_size = 0
    config.overflow_probability = 1e-6

    config.optimizer = "sgd"  # sgd | adam
    config.momentum = 0.9  # sgd
    config.learning_rate = 0.1  # constant
    config.num_steps = 500  # 44 epochs at q = 128 / 1438
    config.eval_every = 50  # steps between evaluations (ε, test accuracy, clipped fraction)
    config.checkpoint_every = 250
    return config
