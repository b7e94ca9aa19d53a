r"""Gradient variance of SGD, SGD with twice the batch, SVRG, gradient clustering and
importance sampling on the digits MLP.

    python -m experiments.gvar.main --config=experiments/gvar/configs/default.py \
        --workdir=/tmp/gvar_digits

scikit-learn's 8x8 handwritten digits (no download), an MLP 64-128-128-10 trained with
plain SGD; every ``gvar.measure_every`` steps each estimator is drawn ``gvar.num_draws``
times for the mean and as many again for the variance, with its own PRNG stream, so the
training run is the same with or without the measurements. Variants of the data:
``--config.data.duplicates=10 --config.data.duplicate_copies=100`` (duplicated examples),
``--config.data.label_noise=0.2`` (random labels), ``--config.data.imbalance=0.1``
(long-tailed classes). Faghri et al., "A Study of Gradient Variance in Deep Learning",
arXiv 2007.04532.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0  # model initialisation and the training batch order

    config.data = ml_collections.ConfigDict()
    config.data.name = "digits"  # digits | linreg | mnist | cifar10 (and other tfds sets)
    config.data.data_dir = ""  # tfds data dir with the prepared array_record files
    config.data.max_examples = 0  # >0: only the first examples of the training split
    config.data.test_fraction = 0.2  # digits: held-out fraction
    config.data.seed = 0  # the digits split, the generated data and the variants
    # Linear regression (data.name = "linreg"): x ~ N(0, I/dim), y = w*.x + noise.
    config.data.dim = 1000
    config.data.num_examples = 500
    config.data.num_test = 1000
    config.data.noise = 0.1
    # Variants, applied in this order: imbalance, label noise, duplicates.
    config.data.imbalance = 1.0  # size of the last class / the first (1: balanced)
    config.data.label_noise = 0.0  # fraction of examples given a uniformly random label
    config.data.duplicates = 0  # distinct examples duplicated ...
    config.data.duplicate_copies = 0  # ... this many extra times each

    config.model = ml_collections.ConfigDict()
    config.model.name = "mlp"  # linear | mlp | cnn
    config.model.hidden = (128, 128)  # mlp
    config.model.features = (32, 64)  # cnn: channels of the 5x5 convolutions
    config.model.dense = 128  # cnn: width of the hidden dense layer

    config.batch_size = 32
    # Training batches: "uniform" (seeded epochs) or "gc" (stratified over gradient
    # clusters, weighted N_k / (N n_k); the clusters are refreshed every gc.recluster_every).
    config.sampler = "uniform"
    config.learning_rate = 0.05  # plain SGD, constant
    config.num_steps = 3000
    config.log_every = 50
    config.checkpoint_every = 1000

    config.gvar = ml_collections.ConfigDict()
    config.gvar.measure_every = 100  # 0: no measurement
    config.gvar.num_draws = 10  # m: draws for the mean, then m more for the variance
    config.gvar.estimators = "sgd,sgd_2b,svrg,gc,importance"  # see train.ESTIMATORS
    config.gvar.svrg_snapshot_every = 500  # steps between SVRG's full-gradient snapshots
    config.gvar.exact = True  # also log SGD's exact variance from per-example statistics
    config.gvar.replace = True  # draw measurement batches with replacement
    config.gvar.chunk_size = 1024  # examples per pass for full gradients and evaluation
    config.gvar.seed = 1  # the measurement's own PRNG stream
    config.gvar.importance_score = "grad_norm"  # importance sampling p_i ∝ ||g_i|| (or "loss")
    config.gvar.importance_smoothing = 0.0  # mix in this fraction of uniform sampling

    # Gradient clustering (the "gc" estimator and sampler = "gc").
    config.gc = ml_collections.ConfigDict()
    config.gc.num_clusters = 10
    config.gc.num_passes = 3  # batch-mode passes each time the data is clustered
    config.gc.min_fraction = 0.0  # re-seed clusters below this fraction of the examples
    config.gc.allocation = "equal"  # slots per cluster: "equal" or "proportional"
    config.gc.recluster_every = 100  # sampler = "gc": steps between clusterings
    config.gc.seed = 2  # the initial centres
    return config
