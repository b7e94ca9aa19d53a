r"""Does redundancy-aware sampling train faster? Time to a target loss on five digits regimes.

    python -m experiments.sampling_speed.main \
        --config=experiments/sampling_speed/configs/default.py --workdir=/tmp/sampling_speed

scikit-learn's 8x8 digits (no download), the MLP 64-128-128-10 of ``experiments/gvar``
trained with plain SGD at a constant learning rate, in five data regimes: the digits as
they are; 10 images repeated 100 times each (+1000 rows); 10 images repeated 1000 times
each (+10000 rows, 87 % of the training set); one class 20 times as frequent as each of
the others; 20 % of the labels replaced by random ones. Four samplers: uniform batches
of ``batch_size`` (seeded epochs), uniform batches of twice that (the variance GC aims at,
for twice the examples per step), GC batches (stratified over ``gc.num_clusters``
gradient clusters, weights ``N_k/(N n_k)``, re-clustered every ``refresh_every`` steps)
and importance sampling (``p_i`` proportional to each example's gradient norm, mixed with
``importance.smoothing`` of uniform, weights ``1/(N b p_i)``, norms refreshed every
``refresh_every`` steps). Every sampler's learning rate is tuned over the same grid of
five, five seeds each: 500 runs, 4.3 minutes (258 s) on two CPU cores. ``mnist.py`` and
``cifar10.py`` run the same study on tensorflow-datasets data; ``diagnostics.py`` the
ablations of GC's refresh schedule and draws; ``quickstart.py`` the quickstart's line;
``quick.py`` the tests' seconds-long run.
"""

import ml_collections

#: The data regimes of the study, by name: the variants applied to the training split.
REGIMES = {
    "clean": {},
    "duplicates": {"duplicates": 10, "duplicate_copies": 100},
    "duplicates_heavy": {"duplicates": 10, "duplicate_copies": 1000},
    "imbalance": {"majority_factor": 20},
    "label_noise": {"label_noise": 0.2},
}


def regime(duplicates=0, duplicate_copies=0, majority_factor=1, label_noise=0.0):
    """One data regime; variants applied in this order: imbalance, label noise, duplicates."""
    return ml_collections.ConfigDict(
        {
            # Every class but class 0 keeps 1/majority_factor of its examples (1: balanced).
            "majority_factor": majority_factor,
            "label_noise": label_noise,  # fraction of examples given a uniformly random label
            "duplicates": duplicates,  # distinct examples duplicated ...
            "duplicate_copies": duplicate_copies,  # ... this many extra times each
        }
    )


def regimes(*names):
    """The named regimes of :data:`REGIMES` as a ConfigDict (all of them by default)."""
    return ml_collections.ConfigDict({n: regime(**REGIMES[n]) for n in names or REGIMES})


def get_config():
    config = ml_collections.ConfigDict()
    config.regimes = regimes()
    config.samplers = ("uniform", "uniform_2b", "gc", "importance")
    config.learning_rates = (0.1, 0.2, 0.4, 0.8, 1.6)  # the grid every sampler is tuned over
    config.num_seeds = 5  # seeds 0..4: initial weights and batches; paired across samplers

    config.data = ml_collections.ConfigDict()
    config.data.name = "digits"  # digits | mnist | cifar10 (and other tfds image sets)
    config.data.data_dir = ""  # tfds data dir with the prepared array_record files
    config.data.max_examples = 0  # >0: only the first examples of each split
    config.data.test_fraction = 0.2  # digits: held-out fraction
    config.data.seed = 0  # the digits split and the variants (the same data for every seed)

    config.model = ml_collections.ConfigDict()
    config.model.name = "mlp"  # mlp | cnn (experiments.gvar.models)
    config.model.hidden = (128, 128)  # mlp
    config.model.features = (32, 64)  # cnn: channels of the 5x5 convolutions
    config.model.dense = 128  # cnn: width of the hidden dense layer

    config.batch_size = 32  # uniform_2b draws twice this
    config.num_steps = 1000  # every run; plain SGD at a constant learning rate
    # The target: the tuned uniform run's training loss at target_step, seed by seed; the
    # steps after it let a sampler up to num_steps / target_step times slower reach it.
    config.target_step = 500
    config.eval_every = 25  # steps between evaluations (the resolution of steps to target)
    config.refresh_every = 100  # steps between re-clusterings (gc) and norm refreshes
    config.chunk_size = 1024  # examples per pass for clustering, norms and evaluation

    config.gc = ml_collections.ConfigDict()
    config.gc.num_clusters = 10
    config.gc.num_passes = 1  # batch-mode passes per clustering, from the previous centres
    config.gc.min_fraction = 0.0  # re-seed clusters below this fraction of the examples
    config.gc.allocation = "equal"  # slots per cluster: "equal" or "proportional"
    # False: the slots walk through each cluster's shuffled members (random reshuffling
    # within the clusters, as uniform's epochs); True: independent draws within a cluster.
    config.gc.replace = False

    config.importance = ml_collections.ConfigDict()
    config.importance.score = "grad_norm"  # p_i ∝ ||g_i|| (or "loss")
    config.importance.smoothing = 0.1  # mix in this fraction of uniform: weights <= 1/(b λ)
    return config
