r"""Order++: order-embedding similarity with the max of hinges (margin 0.05, abs).

    python -m experiments.vsepp.main --config=experiments/vsepp/configs/orderpp.py \
        --config.data.manual_dir=/path/to/coco_precomp --workdir=/tmp/orderpp_coco
"""

from experiments.vsepp.configs import order0


def get_config():
    config = order0.get_config()
    config.loss.max_violation = True
    return config
