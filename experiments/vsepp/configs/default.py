r"""VSE++ (MH loss) on precomputed image features, the reference hyperparameters.

    python -m experiments.vsepp.main --config=experiments/vsepp/configs/default.py \
        --config.data.manual_dir=/path/to/coco_precomp --workdir=/tmp/vsepp_coco

The manual dir holds the reference "precomp" files (`train_ims.npy`, `train_caps.txt`,
`dev_*`, `test_*`, `testall_*` for COCO). Faghri et al., VSE++, arXiv 1707.05612.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "coco"  # precomp: coco | f30k | f8k ; generated: shapes
    config.data.manual_dir = ""  # where the precomp files are
    config.data.data_dir = ""  # tfds data dir ("" = <workdir>/tfds)
    config.data.max_length = 32  # caption tokens incl. <start>/<end>, fixed for jit
    config.data.vocab_threshold = 4  # words seen >= 4 times in the training captions
    config.data.group_size = 0  # >0: batches made of groups of near-twin images
    config.data.eval_split = "dev"
    config.data.test_split = "test"
    config.data.test_folds = 1  # 5 on COCO's 5K test set ("testall") = the 1K protocol

    config.model = ml_collections.ConfigDict()
    config.model.image_encoder = "precomp"  # precomp | cnn
    config.model.img_dim = 4096
    config.model.image_size = 32  # cnn only
    config.model.cnn_features = (32, 64, 128)  # cnn only
    config.model.word_dim = 300
    config.model.embed_size = 1024
    config.model.num_layers = 1
    config.model.no_imgnorm = False
    config.model.use_abs = False

    config.loss = ml_collections.ConfigDict()
    config.loss.measure = "cosine"
    config.loss.margin = 0.2
    config.loss.max_violation = True  # False: SH (VSE0); True: MH (VSE++)
    config.loss.warmup_steps = 0  # >0: SH for these steps, then MH
    config.loss.top_k = 1
    config.loss.reduction = "sum"

    config.batch_size = 128
    config.num_epochs = 30
    config.num_steps = 0  # >0 overrides num_epochs
    config.learning_rate = 2e-4
    config.lr_decay_epochs = 15  # x0.1 after this many epochs
    config.lr_decay_fraction = 0.0  # >0: x0.1 after this fraction of the steps instead
    config.grad_clip = 2.0

    config.log_every = 100
    config.eval_every = 0  # 0: once per epoch
    config.checkpoint_every = 1000
    config.eval_batch_size = 256
    return config
