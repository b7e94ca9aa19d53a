r"""VSE0: sum of hinges, no image-embedding normalisation (the baseline row of VSE++).

    python -m experiments.vsepp.main --config=experiments/vsepp/configs/vse0.py \
        --config.data.manual_dir=/path/to/coco_precomp --workdir=/tmp/vse0_coco
"""

from experiments.vsepp.configs import default


def get_config():
    config = default.get_config()
    config.loss.max_violation = False
    config.model.no_imgnorm = True
    return config
