r"""A small CNN on scikit-learn's 8x8 digits, then PGD in L∞, L2 and Fourier-L∞ (about a minute).

    python -m experiments.robust_cnn.main --config=experiments/robust_cnn/configs/default.py \
        --workdir=/tmp/robust_cnn_digits

The digits ship with scikit-learn (no download): 1438 training and 359 test images in
``[0, 1]``. A two-stage CNN trained with Adam on the cross-entropy, then each test image
attacked by projected gradient ascent (:func:`jaxeff.robust.pgd_attack`) at every radius
of ``attack.eps.<norm>``, inside the image box ``[0, 1]``. L∞ and Fourier-L∞ share their
radii (the same ε bounds every pixel, or the modulus of every per-channel 2-D DFT
coefficient); ``attack.spectrum_eps`` is the radius whose perturbations make the spectrum
figure. Faghri, Gowal, Vasconcelos, Fleet, Pedregosa, Le Roux, "Bridging the Gap Between
Adversarial Robustness and Optimization Bias", arXiv 2102.08868.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0  # model initialisation and the training batch order

    config.data = ml_collections.ConfigDict()
    config.data.name = "digits"  # digits (scikit-learn, no download) | cifar10 (tfds files)
    config.data.data_dir = ""  # tfds data dir with the prepared array_record files
    config.data.max_examples = 0  # >0: only the first training examples
    config.data.test_fraction = 0.2  # digits: held-out fraction
    config.data.seed = 0  # digits: the train/test split

    config.model = ml_collections.ConfigDict()
    config.model.name = "cnn"  # cnn | linear (closed-form robust accuracy as a check)
    config.model.features = (16, 32)  # channels of each conv + 2x2 max-pool stage
    config.model.dense = 64

    config.batch_size = 64
    config.learning_rate = 0.003  # Adam, constant
    config.num_steps = 1500  # 67 epochs of digits
    config.log_every = 100
    config.checkpoint_every = 500

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 512  # rows per clean-accuracy pass
    config.eval.num_examples = 0  # test images attacked, the first ones (0: all)
    config.eval.save_examples = 16  # perturbations kept in attacks.npz per norm and ε

    config.attack = ml_collections.ConfigDict()
    config.attack.norms = ("linf", "l2", "fourier_inf")  # of train.NORMS
    config.attack.eps = ml_collections.ConfigDict()  # one increasing grid per norm
    config.attack.eps.linf = (0.0, 0.01, 0.02, 0.04, 0.08, 0.16)
    config.attack.eps.l2 = (0.0, 0.08, 0.16, 0.32, 0.64, 1.28)
    config.attack.eps.l1 = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
    config.attack.eps.fourier_inf = (0.0, 0.01, 0.02, 0.04, 0.08, 0.16)
    config.attack.spectrum_eps = 0.04  # in the L∞ and Fourier-L∞ grids
    config.attack.steps = 20
    config.attack.step_size = 0.125  # α = step_size · ε: 2.5 ε in all (Madry et al.)
    config.attack.restarts = 1
    config.attack.random_start = True  # uniform start in [-ε, ε]^n projected on the ball
    config.attack.loss = "cross_entropy"  # cross_entropy | margin
    config.attack.multi_targeted = False  # attack each other class as a target, keep any
    config.attack.clip = True  # keep x + δ in the image box [0, 1]
    config.attack.batch_size = 128  # images per attack call, all processes together
    config.attack.seed = 0
    return config
