r"""Order0: order-embedding similarity with the sum of hinges (margin 0.05, abs embeddings).

    python -m experiments.vsepp.main --config=experiments/vsepp/configs/order0.py \
        --config.data.manual_dir=/path/to/coco_precomp --workdir=/tmp/order0_coco
"""

from experiments.vsepp.configs import default


def get_config():
    config = default.get_config()
    config.loss.measure = "order"
    config.loss.margin = 0.05
    config.loss.max_violation = False
    config.model.use_abs = True
    return config
